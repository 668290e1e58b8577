//! Collective transports. [`nccl`] (feature `cuda`) broadcasts GPU tensors in place between
//! processes (weight sync) and all-reduces gradients, with non-blocking communicators, a
//! deadline on every collective and `ncclCommAbort` when it passes. The gRPC stream in
//! [`crate::sync`] is the fallback when NCCL is absent. [`ipc_map`] (feature `cuda`) maps
//! another process's GPU memory (CUDA IPC) for shared mode with vLLM. [`gloo`] is libtorch's c10d gloo group
//! on the CPU: the data-parallel learner's control plane, and its gradients without CUDA.

pub mod gloo;
#[cfg(feature = "cuda")]
pub mod ipc_map;
#[cfg(feature = "cuda")]
pub mod nccl;

/// Errors of a collective transport.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("NCCL or the CUDA driver library is not loadable in this process")]
    Unavailable,
    #[error("{call}: {message}")]
    Nccl { call: &'static str, message: String },
    #[error("{what} did not finish within {secs:.1}s; the communicator was aborted")]
    Deadline { what: &'static str, secs: f64 },
    #[error("{what} was cancelled (the peer is gone); the communicator was aborted")]
    Cancelled { what: &'static str },
    #[error("unique id: {0}")]
    BadId(String),
    #[error("CUDA: {0}")]
    Cuda(String),
}
