//! The embedded inference engine: the learner's transformer with a KV cache, batched sampling,
//! and an HTTP server speaking the Atropos `/generate` contract.

pub mod core;
pub mod http;
pub mod load;
pub mod protocol;
pub mod sampler;

pub use self::core::{BatchConfig, Completion, EngineHandle, EngineModel, JobParams, PolicyVersion};
