//! The decoder-only transformer (Llama, Qwen2, Qwen3) in tch, its parameters, their
//! safetensors I/O and LoRA adapters in PEFT's format.

pub mod attention;
pub mod config;
pub mod lora;
pub mod params;
pub mod rope;
pub mod safetensors_io;
pub mod transformer;

use std::path::PathBuf;

pub use config::{Family, ModelSpec};
pub use params::ParamStore;
pub use transformer::{KvCache, Transformer};

/// Errors loading, building or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid model config: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: config::SpecError,
    },
    #[error("{path}: invalid safetensors: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("model weights lack {name} (expected shape {shape:?})")]
    MissingWeight { name: String, shape: Vec<i64> },
    #[error("weight {name} has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
    #[error("no model weights (*.safetensors) in {0}")]
    NoWeights(PathBuf),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
