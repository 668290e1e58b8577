//! Training state saved beside each `step_N` checkpoint (`training_state/`): optimizer moments
//! (`optimizer.safetensors`) and `state.json` with the step, the schedule and the last batch
//! consumed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::model::safetensors_io::{read_file, write_file};

use super::spool::{write_synced, BatchSeq};
use super::{io_err, CheckpointError};

/// Subdirectory of a checkpoint holding the training state.
pub const STATE_DIR: &str = "training_state";
const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Bumped when the layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// Everything besides weights and moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// AdamW's own step count (bias correction).
    pub optimizer_steps: u64,
    /// The last API batch fully processed (trained or rejected); later ones replay from the spool.
    pub batches_consumed: BatchSeq,
    /// Groups rejected so far, all reasons.
    pub rejected_groups: u64,
    /// Steps skipped for a non-finite loss or gradient norm (absent in older checkpoints).
    #[serde(default)]
    pub skipped_steps: u64,
    pub seed: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub training_steps: u64,
}

impl TrainingState {
    /// Writes `state.json` and the optimizer moments into `checkpoint_dir/training_state`.
    pub fn write(&self, checkpoint_dir: &Path, optimizer: &[(String, Tensor)]) -> Result<(), CheckpointError> {
        let dir = checkpoint_dir.join(STATE_DIR);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        write_file(&dir.join(OPTIMIZER_FILE), optimizer)?;
        let path = dir.join(STATE_FILE);
        let body = serde_json::to_vec_pretty(self).map_err(|e| CheckpointError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_synced(&path, &body)
    }

    /// Reads the state and optimizer moments of a checkpoint directory.
    pub fn read(checkpoint_dir: &Path) -> Result<(Self, Vec<(String, Tensor)>), CheckpointError> {
        let dir = checkpoint_dir.join(STATE_DIR);
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let state: Self = serde_json::from_str(&text).map_err(|e| CheckpointError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.format_version != FORMAT_VERSION {
            return Err(CheckpointError::Format {
                path,
                reason: format!(
                    "training state format {} (this build reads {FORMAT_VERSION})",
                    state.format_version
                ),
            });
        }
        Ok((state, read_file(&dir.join(OPTIMIZER_FILE))?))
    }
}

/// The newest `step_N` under `save_path` that has a training state.
pub fn latest_resumable(save_path: &Path) -> Result<Option<(u64, PathBuf)>, CheckpointError> {
    latest_resumable_with(save_path, super::hf::STEP_PREFIX)
}

/// The newest `<prefix>N` under `save_path` that has a training state (`adapter_step_` for
/// LoRA runs).
pub fn latest_resumable_with(save_path: &Path, prefix: &str) -> Result<Option<(u64, PathBuf)>, CheckpointError> {
    let mut steps = super::hf::dirs_with_prefix(save_path, prefix)?;
    steps.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    Ok(steps
        .into_iter()
        .find(|(_, dir)| dir.join(STATE_DIR).join(STATE_FILE).is_file()))
}
