//! `grpo-node launch cluster/<name>.toml`: runs every process a manifest describes, each in its
//! own process group with its log under the run directory, waits for each to be ready, shows
//! progress from the learner's metrics, and tears down only what it started (on success,
//! failure or Ctrl-C). On this machine (`--backend local`) or as a Slurm heterogeneous job
//! (`--backend slurm`), where one task per group runs that group's processes on its node; or
//! printed as Kubernetes objects (`--backend kubernetes`).
//!
//! | module | what |
//! |---|---|
//! | [`manifest`] | the manifest schema, its checks and placeholders |
//! | [`runner`] | the local backend: start, watch, tear down; run directories and secrets |
//! | [`rendezvous`] | how the groups of a run on several nodes meet (files in the run directory) |
//! | [`task`] | one group's processes on one node, inside a cluster job |
//! | [`slurm`] | the Slurm backend: the sbatch script, submission and following the job |
//! | [`kubernetes`] | the Kubernetes backend: Jobs, headless Services and the ConfigMap, and our lints |
//! | [`progress`] | the progress bar and summary from the learner's metrics |

pub mod kubernetes;
pub mod manifest;
pub mod progress;
pub mod rendezvous;
pub mod runner;
pub mod slurm;
pub mod task;

pub use manifest::Manifest;
pub use runner::{launch, LaunchError};
