//! `grpo-node launch cluster/<name>.toml`: runs every process a manifest describes on this
//! machine, each in its own process group with its log under the run directory, waits for each
//! to be ready, shows progress from the learner's metrics, and tears down only what it started
//! (on success, failure or Ctrl-C).

pub mod manifest;
pub mod progress;
pub mod runner;

pub use manifest::Manifest;
pub use runner::{launch, LaunchError};
