//! `grpo-node launch --backend slurm`: a manifest as one Slurm batch job.
//!
//! Each group of the manifest is one component of a heterogeneous job (one node each, its CPUs
//! and GPUs from `[[group]]`); a single `srun` starts one `grpo-node launch-task` per component
//! ([`super::task`]), with `--kill-on-bad-exit` so that any task that fails ends the job at
//! once. The run directory is reserved when the job is submitted (two queued runs never share
//! one), and holds the manifest's copy, the script, the secrets and every log. The launcher
//! then follows the job until it ends and returns the run's exit code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::manifest::Manifest;
use super::progress::{records, summary, Progress};
use super::rendezvous::Rendezvous;
use super::runner::{io, repo_of, reserve_run_dir, write_secrets, LaunchError};
use super::task::manifest_copy;

/// What the script needs to know besides the manifest.
#[derive(Debug, Clone)]
pub struct Render {
    /// The run directory (on a filesystem every node shares).
    pub run: PathBuf,
    /// `{repo}` of the manifest.
    pub repo: PathBuf,
    /// The grpo-node binary the nodes run (same path on every node).
    pub grpo_node: String,
}

/// Single-quotes `s` for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The sbatch script for `m`.
pub fn render(m: &Manifest, r: &Render) -> String {
    let groups = m.group_names();
    let run = r.run.display().to_string();
    let mut out = String::new();
    out.push_str("#!/bin/bash\n");
    out.push_str(&format!(
        "# grpo-node launch --backend slurm: {} (manifest schema {}); one heterogeneous-job\n\
         # component per group ({}), each running `grpo-node launch-task` for its group.\n",
        m.name,
        m.schema,
        groups.join(", ")
    ));
    out.push_str(&format!("#SBATCH --job-name=grpo-{}\n", m.name));
    out.push_str(&format!("#SBATCH --output={run}/logs/slurm-%j.out\n"));
    // A requeued job would meet its first attempt's rendezvous files: never requeue.
    out.push_str("#SBATCH --no-requeue\n");
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            out.push_str("#SBATCH hetjob\n");
        }
        let spec = m.group_spec(g);
        out.push_str("#SBATCH --nodes=1\n#SBATCH --ntasks=1\n");
        out.push_str(&format!("#SBATCH --cpus-per-task={}\n", spec.cpus));
        if spec.gpus > 0 {
            out.push_str(&format!("#SBATCH --gres=gpu:{}\n", spec.gpus));
        }
    }
    out.push_str("set -euo pipefail\n");
    out.push_str("# A task that exits non-zero ends every other at once (--kill-on-bad-exit).\n");
    out.push_str("srun --kill-on-bad-exit=1");
    let manifest = manifest_copy(&r.run).display().to_string();
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            out.push_str(" :");
        }
        out.push_str(&format!(
            " \\\n  {} launch-task --run {} --repo {} --group {} {}",
            quote(&r.grpo_node),
            quote(&run),
            quote(&r.repo.display().to_string()),
            quote(g),
            quote(&manifest)
        ));
    }
    out.push('\n');
    out
}

/// Options of a Slurm launch.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// Print the script (for the run directory it would reserve) and submit nothing.
    pub dry_run: bool,
    /// Parent of the run directory instead of the manifest's `runs_dir`.
    pub runs_dir: Option<PathBuf>,
}

/// Submits `path` as a Slurm job and follows it; returns the run's exit code.
pub async fn launch(
    path: &Path,
    opts: &SlurmOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<i32, LaunchError> {
    let m = Manifest::read(path)?;
    let grpo_node = std::env::current_exe()
        .map(|e| e.display().to_string())
        .unwrap_or_else(|_| "grpo-node".into());
    if opts.dry_run {
        let parent = opts.runs_dir.clone().unwrap_or_else(|| PathBuf::from(&m.runs_dir));
        let run = std::path::absolute(parent.join(format!("{}-<submit time>", m.name))).map_err(io("run dir"))?;
        print!(
            "{}",
            render(
                &m,
                &Render {
                    run,
                    repo: repo_of(path),
                    grpo_node
                }
            )
        );
        return Ok(0);
    }
    let run = reserve_run_dir(&m, opts.runs_dir.as_deref())?;
    std::fs::copy(path, manifest_copy(&run)).map_err(io("copying the manifest into the run directory"))?;
    write_secrets(&m, &run)?;
    let script = render(
        &m,
        &Render {
            run: run.clone(),
            repo: repo_of(path),
            grpo_node,
        },
    );
    let script_path = run.join("job.sbatch");
    std::fs::write(&script_path, &script).map_err(io(format!("writing {}", script_path.display())))?;
    let job = sbatch(&script_path).await?;
    eprintln!(
        "run directory: {}\nSlurm job {job} submitted ({})",
        run.display(),
        script_path.display()
    );
    let started = std::time::Instant::now();
    let code = follow(&m, &run, &job, shutdown).await?;
    if let Some(metrics) = &m.metrics {
        let metrics = metrics.replace("{run}", &run.display().to_string());
        eprintln!(
            "\n{}\n{}",
            m.name,
            summary(&records(Path::new(&metrics)), started.elapsed().as_secs_f64())
        );
    }
    eprintln!("logs, checkpoints and plots: {}", run.display());
    Ok(code)
}

async fn sbatch(script: &Path) -> Result<String, LaunchError> {
    let path = script.display().to_string();
    let text = slurm_command("sbatch", &["--parsable", &path]).await?;
    let job = text.trim().split(';').next().unwrap_or("").to_string();
    if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LaunchError::Backend(format!("sbatch printed no job id: {text:?}")));
    }
    Ok(job)
}

/// Follows job `job` until every component ended; the run's exit code (its main process's, or
/// 1 with the reason printed when a process failed or Slurm ended the job).
async fn follow(
    m: &Manifest,
    run: &Path,
    job: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<i32, LaunchError> {
    tokio::pin!(shutdown);
    let metrics = m
        .metrics
        .as_ref()
        .map(|s| PathBuf::from(s.replace("{run}", &run.display().to_string())));
    let mut progress = Progress::new(m.steps);
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let (mut seen, mut failures) = (false, 0u32);
    let states = loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut shutdown => {
                progress.finish();
                eprintln!("interrupted: cancelling Slurm job {job}");
                let _ = slurm_command("scancel", &[job]).await;
                return Ok(130);
            }
        }
        if let Some(path) = &metrics {
            progress.update(&records(path));
        }
        match job_states(job).await {
            Ok(states) if !states.is_empty() && states.iter().all(|s| terminal(s)) => break states,
            Ok(states) if !states.is_empty() => {
                seen = true;
                failures = 0;
            }
            // Slurm forgot the job (purged after MinJobAge) after we saw it: it ended.
            Ok(_) if seen => break vec!["PURGED".to_string()],
            Ok(_) => failures += 1,
            Err(e) => {
                tracing::warn!(error = %e, job, "scontrol show job failed");
                failures += 1;
            }
        }
        if failures > MAX_QUERY_FAILURES {
            let _ = slurm_command("scancel", &[job]).await;
            return Err(LaunchError::Backend(format!(
                "Slurm did not report job {job} for {MAX_QUERY_FAILURES} queries in a row; cancelled it"
            )));
        }
    };
    progress.finish();
    let end = Rendezvous::of(run).end();
    match end {
        Some(end) if end.code == 0 && states.iter().all(|s| s == "COMPLETED" || s == "PURGED") => Ok(0),
        Some(end) => {
            eprintln!("the run failed: {end}; Slurm job {job}: {}", states.join(", "));
            Ok(if end.code == 0 { 1 } else { end.code })
        }
        None => {
            eprintln!(
                "Slurm job {job} ended ({}) before any process finished; see {}/logs/slurm-{job}.out",
                states.join(", "),
                run.display()
            );
            Ok(1)
        }
    }
}

/// Consecutive failed or empty job queries (one a second) before the launcher gives up.
const MAX_QUERY_FAILURES: u32 = 120;

/// How long one Slurm command may take.
const SLURM_COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// Runs a Slurm client command with a deadline; its stdout when it succeeded.
async fn slurm_command(program: &str, args: &[&str]) -> Result<String, LaunchError> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SLURM_COMMAND_LIMIT, run)
        .await
        .map_err(|_| LaunchError::Backend(format!("{program} took over {SLURM_COMMAND_LIMIT:?}")))?
        .map_err(io(format!("running {program}")))?;
    if !out.status.success() {
        return Err(LaunchError::Backend(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// JobState of each component of `job` (`scontrol show job -o`); empty while Slurm has none.
async fn job_states(job: &str) -> Result<Vec<String>, LaunchError> {
    let text = match slurm_command("scontrol", &["show", "job", "-o", job]).await {
        Ok(t) => t,
        // A purged job: "Invalid job id specified".
        Err(LaunchError::Backend(e)) if e.contains("Invalid job id") => String::new(),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("JobState=")))
        .map(str::to_string)
        .collect())
}

/// Whether a JobState is final.
fn terminal(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED"
            | "FAILED"
            | "CANCELLED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "PREEMPTED"
            | "OUT_OF_MEMORY"
            | "BOOT_FAIL"
            | "DEADLINE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_component_per_group_and_one_srun() {
        let text = r#"
name = "t"
[[group]]
name = "head"
cpus = 2
[[group]]
name = "gpu"
gpus = 1
[[process]]
name = "a"
group = "head"
command = ["x"]
main = true
[[process]]
name = "b"
group = "gpu"
command = ["y"]
"#;
        let m = Manifest::from_toml_str(text, Path::new("t.toml")).expect("manifest");
        let r = Render {
            run: PathBuf::from("/runs/t-1"),
            repo: PathBuf::from("/repo"),
            grpo_node: "/bin/grpo-node".into(),
        };
        let s = render(&m, &r);
        assert_eq!(s.matches("#SBATCH hetjob").count(), 1, "{s}");
        assert!(s.contains("#SBATCH --cpus-per-task=2"));
        assert!(s.contains("#SBATCH --gres=gpu:1"));
        assert_eq!(s.matches("srun ").count(), 1);
        assert!(s.contains("--group 'head' '/runs/t-1/manifest.toml' :"), "{s}");
        assert!(s.contains("set -euo pipefail"));
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
