//! `grpo-node bench ...`: measurements that the scripts in `scripts/gpu/` run next to a
//! reference in the same process tree and on the same GPU. Each prints one `RESULT {json}`
//! line; the ratios are computed by `python/bench/report.py`.

pub mod learner;
#[cfg(feature = "cuda")]
pub mod publish;
pub mod shapes;
#[cfg(feature = "cuda")]
pub mod sync;

use clap::Subcommand;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Training throughput and peak memory of the learner's step on a batches file.
    Learner(learner::LearnerBenchArgs),
    /// NCCL weight broadcast between two processes (feature `cuda`; run one per rank).
    #[cfg(feature = "cuda")]
    Sync(sync::SyncBenchArgs),
    /// Fault drill: a stand-in learner publishing every step to real sidecars (feature `cuda`).
    #[cfg(feature = "cuda")]
    Publish(publish::PublishBenchArgs),
    /// Seeded fuzzing of the input parsers and validators: cases/s and panics per target.
    Fuzz(crate::fuzz::FuzzArgs),
}

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("batches file: {0}")]
    Batches(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("model: {0}")]
    Spec(#[from] crate::model::config::SpecError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("--device: {0}")]
    Device(#[from] crate::config::device::DeviceError),
    #[error(transparent)]
    Fuzz(#[from] crate::fuzz::FuzzError),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> Result<(), BenchError> {
    match cmd {
        BenchCommand::Learner(args) => learner::run(&args),
        BenchCommand::Fuzz(args) => Ok(crate::fuzz::run(&args)?),
        #[cfg(feature = "cuda")]
        BenchCommand::Sync(args) => sync::run(&args),
        #[cfg(feature = "cuda")]
        BenchCommand::Publish(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::Io("runtime".into(), e))?
            .block_on(publish::run(&args)),
    }
}
