//! What every optimizer shares: the error of a step or of a state restore, and restoring one
//! saved state tensor into its slot.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

/// An optimizer step or state restore that cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum OptimizerError {
    #[error("{grads} gradients for {params} parameters")]
    GradCount { grads: usize, params: usize },
    #[error("optimizer state lacks {key} (was it written by {writer}?)")]
    MissingState { key: String, writer: &'static str },
    #[error("{key}: {saved_kind:?} {saved:?}, expected {kind:?} {shape:?}")]
    StateMismatch {
        key: String,
        saved_kind: Kind,
        saved: Vec<i64>,
        kind: Kind,
        shape: Vec<i64>,
    },
    #[error("{0}: the 8-bit quantization map is not on its device")]
    NoCode(String),
    #[error(transparent)]
    Fused(#[from] crate::torch_ext::ShimError),
}

/// Every optimizer's first check: one gradient slot per parameter.
pub fn check_grad_count(params: usize, grads: usize) -> Result<(), OptimizerError> {
    if grads == params {
        Ok(())
    } else {
        Err(OptimizerError::GradCount { grads, params })
    }
}

/// Copies the saved state `key` (taken out of `saved`) into `slot`, which it must match in
/// shape (and in dtype with `same_kind`); `writer` names the optimizer in the error.
pub fn restore_slot(
    saved: &mut BTreeMap<String, Tensor>,
    key: String,
    slot: &Tensor,
    writer: &'static str,
    same_kind: bool,
) -> Result<(), OptimizerError> {
    let Some(value) = saved.remove(&key) else {
        return Err(OptimizerError::MissingState { key, writer });
    };
    if value.size() != slot.size() || (same_kind && value.kind() != slot.kind()) {
        return Err(OptimizerError::StateMismatch {
            key,
            saved_kind: value.kind(),
            saved: value.size(),
            kind: slot.kind(),
            shape: slot.size(),
        });
    }
    tch::no_grad(|| slot.shallow_clone().copy_(&value));
    Ok(())
}
