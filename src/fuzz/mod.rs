//! Seeded fuzzing on stable Rust (`grpo-node bench fuzz`): the parsers and validators that
//! take outside input, driven by [`arbitrary`] over bytes from a SplitMix64 stream.
//!
//! Each case gets its own seed (from the run's seed and the case number), becomes a buffer of
//! pseudo-random bytes, and a target turns those bytes ([`arbitrary::Unstructured`]) into an
//! input: a mutated copy of a real input, or a structure-aware one (the right shape, hostile
//! values). The target then runs the real code path on it. Every case runs under
//! [`std::panic::catch_unwind`]; a panic is counted and the first one kept as a repro. An
//! input the code accepts but that breaks what the next stage relies on (a NaN reaching the
//! trainer, a timeout that overflows `Instant`) is a *violation*, kept the same way.
//!
//! | target | real code path |
//! |---|---|
//! | [`batch`] | `GET /batch` body: `serde_json` as the Atropos client reads it, the client's mapping to groups, the spool's JSON round trip, [`crate::actors::preprocessor::prepare_with`] (parse, `grpo::validate`, align, `grpo::pack`) |
//! | [`generate`] | `/generate` body: `serde_json` into [`crate::engine::protocol::GenerateRequest`], `validate`, [`crate::engine::protocol::GenerateLimits::check`] |
//! | [`plan`] | `BeginUpdate`: protobuf decoding, [`crate::sync::plan::check_plan`], `check_against`, `unpack` |
//! | [`config`] | `--config FILE`: [`crate::config::LearnerArgs::from_toml_str`], `merged_with`, `resolve` |
//! | [`manifest`] | `grpo-node launch`: [`crate::launch::Manifest::from_toml_str`] and the runner's use of it |
//!
//! A case is replayed with `--seed S --case K` (the numbers of a repro line).

pub mod batch;
pub mod config;
pub mod generate;
mod hostile;
pub mod manifest;
pub mod plan;
mod run;

pub use run::{run_range, run_target, Failure, FailureKind, Report, Site};

use std::time::Duration;

/// What a target does with one case's bytes.
pub trait FuzzTarget {
    /// The target's name (`--target`).
    fn name(&self) -> &'static str;
    /// Builds an input from `data` and runs the real code path on it.
    fn case(&mut self, data: &[u8]) -> Result<Verdict, Violation>;
    /// The input `data` builds, printable (for a repro).
    fn render(&self, data: &[u8]) -> String;
}

/// How the code under test answered a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The input was taken.
    Accepted,
    /// The input was refused with an error; the label says which check refused it.
    Rejected(&'static str),
    /// Not run: the input hits a known, reported problem that would stall the run.
    Skipped(&'static str),
}

/// An input the code accepted although it breaks what the next stage relies on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{check}: {detail}")]
pub struct Violation {
    /// Which invariant broke (violations are grouped by it).
    pub check: &'static str,
    /// What the input made of it.
    pub detail: String,
}

/// Fails with a [`Violation`] of `check` unless `ok`.
pub(crate) fn ensure(ok: bool, check: &'static str, detail: impl FnOnce() -> String) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(Violation {
            check,
            detail: detail(),
        })
    }
}

/// `--target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetName {
    /// The Atropos `/batch` body, its groups validated and packed.
    Batch,
    /// The `/generate` request body and its limits.
    Generate,
    /// The weight-sync plan of `BeginUpdate`, and unpacking the stream.
    Plan,
    /// The learner's `--config` TOML file.
    Config,
    /// A cluster manifest of `grpo-node launch`.
    Manifest,
    /// Each of the above in turn.
    All,
}

impl TargetName {
    /// The single targets `self` stands for.
    pub fn expand(self) -> Vec<TargetName> {
        match self {
            Self::All => vec![Self::Batch, Self::Generate, Self::Plan, Self::Config, Self::Manifest],
            one => vec![one],
        }
    }
}

/// Why a fuzz run could not run or did not pass.
#[derive(Debug, thiserror::Error)]
pub enum FuzzError {
    #[error("setting up the {target} target")]
    Setup {
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the fuzz thread could not start: {0}")]
    Thread(std::io::Error),
    #[error("the fuzz thread died: {0}")]
    Died(String),
    #[error("{panics} panic(s) and {violations} violation(s); see the repro above")]
    Failed { panics: u64, violations: u64 },
}

/// Builds one target (`All` is not one).
pub fn make_target(name: TargetName) -> Result<Box<dyn FuzzTarget>, FuzzError> {
    Ok(match name {
        TargetName::Batch | TargetName::All => Box::new(batch::BatchTarget),
        TargetName::Generate => Box::new(generate::GenerateTarget),
        TargetName::Plan => Box::new(plan::PlanTarget),
        TargetName::Config => Box::new(config::ConfigTarget::new().map_err(|source| FuzzError::Setup {
            target: "config",
            source,
        })?),
        TargetName::Manifest => Box::new(manifest::ManifestTarget),
    })
}

/// Flags of `grpo-node bench fuzz`.
#[derive(Debug, Clone, clap::Args)]
pub struct FuzzArgs {
    /// Which target to fuzz; `all` runs each in turn.
    #[arg(long, env = "GRPO_FUZZ_TARGET", value_enum, default_value = "all")]
    pub target: TargetName,
    /// Cases per target.
    #[arg(long, env = "GRPO_FUZZ_CASES", default_value_t = 100_000)]
    pub cases: u64,
    /// Seed of the case stream; the same seed gives the same cases.
    #[arg(long, env = "GRPO_FUZZ_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Replay the one case with this number (from a repro line): print its input, then run it.
    #[arg(long, env = "GRPO_FUZZ_CASE")]
    pub case: Option<u64>,
    /// A case running longer than this many seconds is reported as a hang and ends the run.
    #[arg(long, env = "GRPO_FUZZ_HANG_S", default_value_t = 20)]
    pub hang_s: u64,
    /// Also print how the cases were answered (accepted, and each rejecting check).
    #[arg(long, env = "GRPO_FUZZ_BREAKDOWN")]
    pub breakdown: bool,
}

/// Runs `grpo-node bench fuzz`: one line per target; fails if any case panicked or violated.
pub fn run(args: &FuzzArgs) -> Result<(), FuzzError> {
    let (mut panics, mut violations) = (0, 0);
    for name in args.target.expand() {
        let report = run_on_fuzz_thread(name, args)?;
        println!("{report}");
        if args.breakdown || args.case.is_some() {
            println!("  {}", report.breakdown());
        }
        for site in report.sites.values() {
            println!("{site}");
        }
        panics += report.panics;
        violations += report.violations;
    }
    if panics + violations > 0 {
        return Err(FuzzError::Failed { panics, violations });
    }
    Ok(())
}

/// Stack of the fuzz thread: the 2 MiB of a tokio worker, where the learner parses batches.
const FUZZ_STACK: usize = 2 << 20;

fn run_on_fuzz_thread(name: TargetName, args: &FuzzArgs) -> Result<Report, FuzzError> {
    let args = args.clone();
    let handle = std::thread::Builder::new()
        .name(format!("fuzz-{name:?}").to_lowercase())
        .stack_size(FUZZ_STACK)
        .spawn(move || -> Result<Report, FuzzError> {
            // The code under test logs every rejection; a million of them would drown the report.
            let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
            let mut target = make_target(name)?;
            let hang = Duration::from_secs(args.hang_s.max(1));
            Ok(match args.case {
                Some(case) => {
                    println!("case {case} of seed {} ({}):", args.seed, target.name());
                    println!(
                        "{}",
                        run::clip(&target.render(&run::case_bytes(args.seed, case)), 20_000)
                    );
                    run_range(target.as_mut(), args.seed, case..case + 1, Some(hang))
                }
                None => run_target(target.as_mut(), args.seed, args.cases, Some(hang)),
            })
        })
        .map_err(FuzzError::Thread)?;
    handle
        .join()
        .map_err(|p| FuzzError::Died(crate::engine::core::panic_text(p.as_ref())))?
}
