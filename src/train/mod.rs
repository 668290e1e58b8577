//! The training step: model + AdamW, 8-bit AdamW or Adafactor over fp32 master weights (plain, or split into a bf16
//! compute half and an int16 low half), gradient accumulation over
//! micro-batches, grad-norm clipping, and the learning-rate schedule; data parallel across
//! learner ranks. Runs on whatever thread
//! owns it (the learner gives it a dedicated OS thread).

pub mod adafactor;
pub mod adamw;
pub mod adamw8bit;
pub mod data_parallel;
pub mod layers;
pub mod lease;
pub mod optim_state;
pub mod optimizer;
pub mod schedule;
pub mod split;
pub mod step;
pub mod trainer;

pub use adamw::{AdamW, AdamWConfig, MasterParam};
pub use layers::LayerSet;
pub use optimizer::{Optimizer, OptimizerError, OptimizerKind};
pub use schedule::{LrSchedule, ScheduleKind};
pub use trainer::{
    ComputeConfig, FenceError, Home, Precision, SharedWeights, SharedWrite, SkipReason, StepMetrics, TrainError,
    Trainer, TrainerConfig, WriteFence, HOME_POLL,
};
