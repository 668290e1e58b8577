//! gRPC: the generated `grpo.v1` types and services, and the learner's status service.

pub mod learner_service;

/// Generated from `proto/grpo/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("grpo.v1");
}
