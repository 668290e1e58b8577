//! Inference engines behind one seam ([`inference::InferenceEngine`]): the embedded engine
//! (the learner's transformer with a KV cache and batched sampling) and the vLLM driver; and the
//! HTTP server speaking the Atropos `/generate` contract in front of either.

pub mod core;
pub mod http;
pub mod inference;
pub mod load;
pub mod protocol;
pub mod sampler;
pub mod vllm;
pub mod vllm_api;
pub mod vllm_shared;
pub mod vllm_transfer;

pub use self::core::{BatchConfig, Completion, EngineHandle, EngineModel, JobParams, PolicyVersion};
