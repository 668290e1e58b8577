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
    /// Run every process of a cluster manifest (cluster/<name>.toml): on this machine, or as
    /// a Slurm job across nodes.
    Launch {
        /// The manifest.
        manifest: PathBuf,
        /// Where the processes run: local (this machine) or slurm (one heterogeneous job, a
        /// component per group of the manifest).
        #[arg(long, env = "GRPO_LAUNCH_BACKEND", value_enum, default_value_t = Backend::Local)]
        backend: Backend,
        /// Print the script that would be submitted and submit nothing (slurm).
        #[arg(long, env = "GRPO_LAUNCH_DRY_RUN")]
        dry_run: bool,
        /// Parent of the run directory [default: the manifest's runs_dir].
        #[arg(long, env = "GRPO_RUNS_DIR")]
        runs_dir: Option<PathBuf>,
    },
    /// Inside a cluster job: run one group of a manifest on this node (the Slurm script that
    /// `launch --backend slurm` renders calls it once per group).
    LaunchTask {
        /// The manifest (its copy in the run directory).
        manifest: PathBuf,
        /// The run directory, on a filesystem every node shares.
        #[arg(long, env = "GRPO_LAUNCH_RUN")]
        run: PathBuf,
        /// The repository the manifest came from (`{repo}`).
        #[arg(long, env = "GRPO_LAUNCH_REPO")]
        repo: PathBuf,
        /// The group this node runs.
        #[arg(long, env = "GRPO_LAUNCH_GROUP")]
        group: String,
        /// This node's address [default: Slurm's NodeAddr of $SLURMD_NODENAME].
        #[arg(long, env = "GRPO_LAUNCH_ADDRESS")]
        address: Option<std::net::IpAddr>,
        /// Ports fixed in advance, `name=port,...` (Kubernetes); the others are picked free.
        #[arg(long, env = "GRPO_LAUNCH_PORTS", default_value = "")]
        ports: String,
    },
    /// Benchmarks against references run on the same machine (scripts/gpu/).
    #[command(subcommand)]
    Bench(grpo_node::bench::BenchCommand),
}

/// Where `launch` runs a manifest's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// Every process on this machine.
    Local,
    /// A Slurm batch job: one heterogeneous-job component (one node) per group.
    Slurm,
    /// Kubernetes objects for `kubectl apply -f -`, printed (a Job, a headless Service per
    /// group, the manifest's ConfigMap); nothing is applied.
    Kubernetes,
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
        Some(Tool::Launch {
            manifest,
            backend,
            dry_run,
            runs_dir,
        }) => {
            let code = match backend {
                Backend::Local => {
                    if dry_run {
                        anyhow::bail!("--dry-run shows what a cluster backend would submit; use --backend slurm");
                    }
                    block_on(grpo_node::launch::launch(
                        &manifest,
                        runs_dir.as_deref(),
                        shutdown_signal(),
                    ))??
                }
                Backend::Slurm => {
                    let opts = grpo_node::launch::slurm::SlurmOptions { dry_run, runs_dir };
                    block_on(grpo_node::launch::slurm::launch(&manifest, &opts, shutdown_signal()))??
                }
                Backend::Kubernetes => {
                    print!("{}", grpo_node::launch::kubernetes::render_file(&manifest)?);
                    0
                }
            };
            if code != 0 {
                anyhow::bail!("the run failed (exit {code})");
            }
            return Ok(None);
        }
        Some(Tool::LaunchTask {
            manifest,
            run,
            repo,
            group,
            address,
            ports,
        }) => {
            let task = grpo_node::launch::task::Task {
                manifest,
                run,
                repo,
                group,
                address,
                ports: grpo_node::launch::task::parse_ports(&ports)?,
            };
            let code = block_on(grpo_node::launch::task::run_task(&task, shutdown_signal()))??;
            if code != 0 {
                std::process::exit(code);
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
