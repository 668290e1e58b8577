//! Messages that cross actors. Each carries the batch sequence number it concerns.

use std::path::PathBuf;

use ractor::RpcReplyPort;
use serde_json::Value;
use tch::Tensor;

use crate::checkpoint::{BatchSeq, CheckpointKind, TrainingState};
use crate::grpo::{Rejection, TrainBatch};

/// A batch as the API served it (or as the spool replays it).
#[derive(Debug)]
pub struct RawBatch {
    pub seq: BatchSeq,
    pub groups: Vec<Value>,
    /// Seconds the fetcher waited for it.
    pub wait_time_s: f64,
}

/// A validated, packed batch; `batch` is `None` when every group was rejected.
#[derive(Debug)]
pub struct PreparedBatch {
    pub seq: BatchSeq,
    pub batch: Option<TrainBatch>,
    pub rejections: Vec<Rejection>,
    pub wait_time_s: f64,
}

/// Copies of everything a checkpoint holds, taken on the model thread.
pub struct CheckpointJob {
    pub kind: CheckpointKind,
    /// The model's weights as an HF checkpoint (LoRA: the merged model, or nothing).
    pub weights: Vec<(String, Tensor)>,
    /// LoRA: the adapter, written in PEFT format (`adapter_step_N`, `final_adapter`, ...)
    /// with the training state beside it.
    pub adapter: Option<(crate::model::lora::LoraSpec, Vec<(String, Tensor)>)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub state: TrainingState,
}

/// BatchFetcher's mailbox.
pub enum FetcherMsg {
    /// Try to take a batch from the API (self-scheduled).
    Poll,
    /// The learner returned a credit the fetcher was waiting for.
    CreditReturned,
}

/// Preprocessor's mailbox.
pub enum PreprocessorMsg {
    Raw(RawBatch),
}

/// Learner's mailbox.
pub enum LearnerMsg {
    Train(PreparedBatch),
    /// Finish the step in progress, save a checkpoint if steps are unsaved, then reply.
    Drain(RpcReplyPort<()>),
}

/// Checkpointer's mailbox.
pub enum CheckpointerMsg {
    /// Write a checkpoint; the reply (if asked for) carries its path.
    Save(
        Box<CheckpointJob>,
        Option<RpcReplyPort<Result<PathBuf, crate::checkpoint::CheckpointError>>>,
    ),
}

/// Root supervisor's mailbox.
pub enum SupervisorMsg {
    /// Graceful stop (signal): drain, checkpoint, stop the children, then reply.
    Shutdown(RpcReplyPort<()>),
}

/// How a learner run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// `--training-steps` reached and the final checkpoint written.
    Completed { steps: u64 },
    /// A signal stopped the run after draining and saving; `--resume` continues it.
    Interrupted { steps: u64 },
    /// An actor failed; the node stops with this error.
    Failed(String),
}
