//! Checkpoints: HF model directories written atomically, the training state beside them, the
//! batch spool that makes resumes lose no data, and retention.

pub mod hf;
pub mod spool;
pub mod state;

pub use hf::{write_hf_checkpoint, CheckpointKind};
pub use spool::{BatchSeq, Spool};
pub use state::{latest_resumable, TrainingState};

use std::path::PathBuf;

/// Errors writing or reading checkpoints and the spool.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Lora(#[from] crate::model::lora::LoraError),
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}
