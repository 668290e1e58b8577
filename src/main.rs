//! `grpo-node`: parse, set up logging and the runtime, dispatch to a role.

use anyhow::Context;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use grpo_node::actors::messages::RunOutcome;
use grpo_node::config::{LearnerArgs, SidecarArgs};
use grpo_node::roles;
use grpo_node::telemetry;

/// Which node this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Pulls batches from the Atropos API and trains.
    Learner,
    /// Serves /generate from an inference engine and takes weight updates from the learner.
    InferenceSidecar,
}

/// One-shot commands besides the node roles.
#[derive(Debug, Subcommand)]
enum Tool {
    /// Run every process of a cluster manifest (cluster/<name>.toml) on this machine.
    Launch {
        /// The manifest.
        manifest: PathBuf,
    },
    /// Benchmarks against references run on the same machine (scripts/gpu/).
    #[command(subcommand)]
    Bench(grpo_node::bench::BenchCommand),
}

/// A Rust GRPO trainer for the Atropos RL ecosystem.
#[derive(Debug, Parser)]
#[command(name = "grpo-node", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    tool: Option<Tool>,
    /// The node to run.
    #[arg(long, env = "GRPO_ROLE", value_enum)]
    role: Option<Role>,
    #[command(flatten)]
    learner: LearnerArgs,
    #[command(flatten)]
    sidecar: SidecarArgs,
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs `fut` on the async runtime (see [`grpo_node::runtime::block_on`]).
fn block_on<F: std::future::Future>(fut: F) -> anyhow::Result<F::Output> {
    grpo_node::runtime::block_on(fut).context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<Option<RunOutcome>> {
    match cli.tool {
        Some(Tool::Launch { manifest }) => {
            let code = block_on(grpo_node::launch::launch(&manifest, shutdown_signal()))??;
            if code != 0 {
                anyhow::bail!("the main process exited with {code}");
            }
            return Ok(None);
        }
        Some(Tool::Bench(cmd)) => {
            grpo_node::bench::run(cmd)?;
            return Ok(None);
        }
        None => {}
    }
    let Some(role) = cli.role else {
        anyhow::bail!("--role is required (learner or inference-sidecar), or a subcommand such as `launch`");
    };
    match role {
        Role::Learner => {
            let cfg = cli.learner.resolve()?;
            Ok(Some(block_on(roles::learner::run(cfg, shutdown_signal()))??))
        }
        Role::InferenceSidecar => {
            let cfg = cli.sidecar.resolve(cli.learner)?;
            block_on(roles::sidecar::run(cfg, shutdown_signal()))??;
            Ok(None)
        }
    }
}

fn main() {
    let cli = Cli::parse();
    telemetry::init_logging();
    let code = match run(cli) {
        Ok(None) => 0,
        Ok(Some(RunOutcome::Completed { steps })) => {
            tracing::info!(steps, "training complete");
            0
        }
        Ok(Some(RunOutcome::Interrupted { steps })) => {
            tracing::info!(steps, "stopped by signal; rerun with --resume to continue");
            0
        }
        Ok(Some(RunOutcome::Failed(reason))) => {
            eprintln!("error: {reason}");
            1
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    grpo_node::runtime::exit(code)
}
