//! `grpo-node`: parse, set up logging and the runtime, dispatch to a role.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use grpo_node::actors::messages::RunOutcome;
use grpo_node::config::LearnerArgs;
use grpo_node::roles;
use grpo_node::telemetry;

/// Which node this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Pulls batches from the Atropos API and trains.
    Learner,
}

/// A Rust GRPO trainer for the Atropos RL ecosystem.
#[derive(Debug, Parser)]
#[command(name = "grpo-node", version, about)]
struct Cli {
    /// The node to run.
    #[arg(long, env = "GRPO_ROLE", value_enum)]
    role: Role,
    #[command(flatten)]
    learner: LearnerArgs,
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

fn run(cli: Cli) -> anyhow::Result<RunOutcome> {
    match cli.role {
        Role::Learner => {
            let cfg = cli.learner.resolve()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            Ok(runtime.block_on(roles::learner::run(cfg, shutdown_signal()))?)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging();
    match run(cli) {
        Ok(RunOutcome::Completed { steps }) => {
            tracing::info!(steps, "training complete");
            ExitCode::SUCCESS
        }
        Ok(RunOutcome::Interrupted { steps }) => {
            tracing::info!(steps, "stopped by signal; rerun with --resume to continue");
            ExitCode::SUCCESS
        }
        Ok(RunOutcome::Failed(reason)) => {
            eprintln!("error: {reason}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
