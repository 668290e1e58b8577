//! gRPC: the generated `grpo.v1` types and services, and the shared-token authentication
//! every service and client uses.

pub mod auth;

/// Generated from `proto/grpo/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("grpo.v1");
}
