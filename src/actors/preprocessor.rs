//! Preprocessor: parses each group on its own, validates it, computes advantages and aligned
//! labels, and packs the survivors into micro-batches. Rejections are logged with the env id
//! and counted; they never reach the model.

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::atropos::{EnvId, ScoredGroup};
use crate::grpo::pack::{align_group, pack_as, Layout, Packing};
use crate::grpo::validate::validate;
use crate::grpo::{Limits, RejectReason, Rejection};

use super::messages::{LearnerMsg, PreparedBatch, PreprocessorMsg, RawBatch};

pub struct Preprocessor;

/// Start-up arguments.
pub struct PreprocessorArgs {
    pub limits: Limits,
    pub micro_batch: usize,
    /// Token-budget packing (`--micro-batch-tokens`) instead of `micro_batch` rows.
    pub micro_batch_tokens: Option<usize>,
    /// With token-budget packing: each group's prompt once (`--shared-prompt on`).
    pub shared_prompt: bool,
    pub learner: ActorRef<LearnerMsg>,
}

/// Parses, validates and packs one raw batch (sorted by length).
pub fn prepare(raw: RawBatch, limits: &Limits, micro_batch: usize) -> PreparedBatch {
    prepare_with(raw, limits, micro_batch, Packing::Sorted)
}

/// [`prepare`] with a choice of packing.
pub fn prepare_with(raw: RawBatch, limits: &Limits, micro_batch: usize, packing: Packing) -> PreparedBatch {
    prepare_as(raw, limits, Layout::Rows { micro_batch, packing })
}

/// [`prepare`] into any micro-batch layout.
pub fn prepare_as(raw: RawBatch, limits: &Limits, layout: Layout) -> PreparedBatch {
    let mut rejections = Vec::new();
    let mut sequences = Vec::new();
    for value in raw.groups {
        let env_id = value.get("env_id").and_then(serde_json::Value::as_i64).map(EnvId);
        let outcome = serde_json::from_value::<ScoredGroup>(value)
            .map_err(|e| Rejection {
                reason: RejectReason::Malformed,
                detail: e.to_string(),
                env_id,
            })
            .and_then(|g| validate(g, limits));
        match outcome {
            Ok(group) => sequences.push(align_group(&group)),
            Err(r) => {
                tracing::warn!(batch_seq = raw.seq.0, env_id = ?r.env_id.map(|e| e.0), reason = %r.reason,
                    detail = %r.detail, "rejected group");
                rejections.push(r);
            }
        }
    }
    PreparedBatch {
        seq: raw.seq,
        batch: (!sequences.is_empty()).then(|| pack_as(sequences, layout)),
        rejections,
        wait_time_s: raw.wait_time_s,
    }
}

impl Actor for Preprocessor {
    type Msg = PreprocessorMsg;
    type State = PreprocessorArgs;
    type Arguments = PreprocessorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<PreprocessorMsg>,
        args: PreprocessorArgs,
    ) -> Result<PreprocessorArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<PreprocessorMsg>,
        msg: PreprocessorMsg,
        state: &mut PreprocessorArgs,
    ) -> Result<(), ActorProcessingErr> {
        let PreprocessorMsg::Raw(raw) = msg;
        let layout = match state.micro_batch_tokens {
            Some(budget) => Layout::Tokens {
                budget,
                shared_prompt: state.shared_prompt,
            },
            None => Layout::Rows {
                micro_batch: state.micro_batch,
                packing: Packing::Sorted,
            },
        };
        let prepared = prepare_as(raw, &state.limits, layout);
        state.learner.cast(LearnerMsg::Train(prepared))?;
        Ok(())
    }
}
