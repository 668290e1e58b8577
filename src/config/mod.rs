//! Run configuration: CLI flags, `GRPO_*` environment variables and a TOML file, merged with
//! the precedence flag > env > file > default, then validated before anything starts.

pub mod addr;
pub mod auth;
pub mod device;
pub mod learner;
pub mod sidecar;

pub use device::DeviceSpec;
pub use learner::{BridgeMode, LearnerArgs, LearnerConfig, OptimizerKind, SyncConfig};
pub use sidecar::{EngineKind, SidecarArgs, SidecarConfig};

use std::path::PathBuf;

/// A configuration that cannot run. The message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("--{flag} is required (flag, GRPO_* env var, or the --config file)")]
    Missing { flag: &'static str },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    LocalOnly(#[from] addr::LocalOnly),
}
