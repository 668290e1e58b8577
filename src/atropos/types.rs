//! Atropos wire types (`atroposlib==0.4.0`, `atroposlib/api/server.py`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An environment's id as the API assigns it at `/register-env`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EnvId(pub i64);

impl std::fmt::Display for EnvId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The trainer id `/register` returns: Python's `uuid4().int`, wider than u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainerUuid(pub u128);

/// The body of `POST /register`; every field is required by the server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Registration {
    pub wandb_group: String,
    pub wandb_project: String,
    /// Sequences per optimizer step (micro-batch x accumulation).
    pub batch_size: u64,
    pub max_token_len: u64,
    pub checkpoint_dir: String,
    pub save_checkpoint_interval: u64,
    pub starting_step: u64,
    pub num_steps: u64,
}

/// One scored group (`ScoredData`) as `/batch` returns it. Unknown keys (messages, images,
/// distill_*) are ignored; optional fields may be null or empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredGroup {
    pub tokens: Vec<Vec<i64>>,
    pub masks: Vec<Vec<i64>>,
    pub scores: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advantages: Option<Vec<Vec<f64>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_logprobs: Option<Vec<Vec<f64>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<Vec<Option<Map<String, Value>>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_params: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_overrides: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_id: Option<EnvId>,
}

impl ScoredGroup {
    /// The per-sequence override dict of sequence `i`, if any.
    pub fn override_of(&self, i: usize) -> Option<&Map<String, Value>> {
        self.overrides.as_ref()?.get(i)?.as_ref()
    }
}

/// `GET /info`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Info {
    pub batch_size: i64,
    pub max_token_len: i64,
}
