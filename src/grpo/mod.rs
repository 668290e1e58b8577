//! GRPO math with no I/O: validation of scored groups, advantages, label/logprob alignment,
//! packing into micro-batches, and the loss.

pub mod advantages;
pub mod loss;
pub mod pack;
pub mod validate;

pub use loss::{ClipMode, LossAgg, LossConfig};
pub use pack::{MicroBatch, Sequence, TrainBatch};
pub use validate::{Limits, RejectReason, Rejection};
