//! The Atropos API server: wire types and an HTTP client that survives the server's quirks
//! (the registration wedge, LIFO batches, a u128 uuid, gzip).

pub mod client;
pub mod types;

pub use client::{AtroposClient, AtroposError, BatchPoll};
pub use types::{EnvId, Registration, ScoredGroup, TrainerUuid};
