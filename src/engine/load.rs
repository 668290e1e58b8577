//! Builds an [`EngineModel`] from an HF directory: weights, `tokenizer.json`, and the EOS ids
//! of `config.json` / `generation_config.json`.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use tch::Device;
use tokenizers::Tokenizer;

use crate::model::safetensors_io::load_params;
use crate::model::{ModelError, ModelSpec, ParamStore};

use super::core::{EngineModel, PolicyVersion};

/// Errors loading an engine model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: cannot load tokenizer.json: {reason}")]
    Tokenizer { path: String, reason: String },
}

fn ids_of(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

/// EOS token ids named by the model directory.
pub fn eos_ids(dir: &Path) -> Vec<i64> {
    let mut ids = Vec::new();
    for file in ["config.json", "generation_config.json"] {
        if let Some(v) = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        {
            ids.extend(ids_of(v.get("eos_token_id")));
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Loads the tokenizer of a model directory.
pub fn tokenizer(dir: &Path) -> Result<Tokenizer, LoadError> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path).map_err(|e| LoadError::Tokenizer {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// An engine model over `params` (already loaded, e.g. shared with a trainer).
pub fn engine_model(dir: &Path, spec: ModelSpec, params: ParamStore, device: Device) -> Result<EngineModel, LoadError> {
    Ok(EngineModel {
        spec,
        params,
        tokenizer: Arc::new(tokenizer(dir)?),
        eos_ids: eos_ids(dir),
        device,
        version: PolicyVersion(0),
        gate: None,
        shared_version: None,
    })
}

/// Loads weights and tokenizer of `dir` for serving.
pub fn load(dir: &Path, device: Device) -> Result<EngineModel, LoadError> {
    let spec = ModelSpec::from_dir(dir)?;
    let params = load_params(&spec, dir, device)?;
    engine_model(dir, spec, params, device)
}
