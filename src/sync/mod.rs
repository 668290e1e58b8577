//! Weight synchronisation between the learner and inference sidecars: the bucket plan, digests,
//! authentication, the sidecar's gRPC service and WeightReceiver, and the learner's client.

pub mod client;
pub mod gpu_digest;
#[cfg(feature = "cuda")]
pub mod ipc_publish;
#[cfg(feature = "cuda")]
pub mod nccl_publish;
pub mod nccl_receiver;
pub mod nccl_sync;
pub mod packing;
pub mod plan;
pub mod receiver;
pub mod service;
pub mod shared_vllm;

pub use plan::{Digest, WeightSet};
