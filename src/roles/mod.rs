//! Node roles: each builds its supervision tree and runs until done or signalled.

pub mod learner;
pub mod sidecar;
