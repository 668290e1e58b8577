//! Node roles: each builds its supervision tree and runs until done or signalled.

pub mod endpoints;
pub mod learner;
pub mod learner_rank;
pub mod learner_service;
pub mod sidecar;
