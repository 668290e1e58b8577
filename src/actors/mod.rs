//! The nodes' actors (ractor), one file each, and the typed messages between them. The
//! sidecar node runs the VllmSupervisor (with `--engine vllm`) and the WeightReceiver
//! (`sync::receiver`); the rest belong to the learner node.
//!
//! ```text
//! BatchFetcher --RawBatch--> Preprocessor --PreparedBatch--> Learner --CheckpointJob--> Checkpointer
//!      ^                                                        |
//!      +------------------- credit (semaphore) -----------------+
//! ```
//! Backpressure: the fetcher takes a credit per batch and the learner returns it once the
//! batch is trained, so at most `--prefetch` batches are in flight.

pub mod batch_fetcher;
pub mod checkpointer;
pub mod learner;
pub mod messages;
pub mod model_worker;
pub mod preprocessor;
pub mod supervisor;
pub mod vllm_supervisor;
pub mod weight_broadcaster;
