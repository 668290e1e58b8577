//! gRPC: the generated `grpo.v1` types and services, the shared-token authentication every
//! service and client uses, and optional TLS.

pub mod auth;
pub mod tls;

/// Generated from `proto/grpo/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("grpo.v1");
}
