//! Starting, watching and tearing down the processes of a manifest.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::manifest::{Manifest, ManifestError, Placeholders, Process, Ready, Step};
use super::progress::{records, summary, Progress};

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Placeholder(#[from] super::manifest::PlaceholderError),
    #[error("the readiness probe's HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    #[error("no free run directory name under {}", .0.display())]
    RunDir(PathBuf),
    #[error("--ports: {0:?} is not name=port")]
    PortsEntry(String),
    #[error("--ports: {0:?} is not a port")]
    PortsValue(String),
    #[error("group {group} is not in {} (groups: {})", manifest.display(), groups.join(", "))]
    UnknownGroup {
        group: String,
        manifest: PathBuf,
        groups: Vec<String>,
    },
    #[error("SLURMD_NODENAME is not set: launch-task runs inside a Slurm job step (or pass --address)")]
    NotInSlurm,
    #[error("scontrol show node {node}: no NodeAddr in {text:?}")]
    NoNodeAddr { node: String, text: String },
    #[error("NodeAddr {0} resolves to nothing")]
    Unresolved(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setup step {name} failed (exit {code}); see {log}")]
    Setup { name: String, code: i32, log: String },
    #[error("{name} was not ready within {seconds} s; see {log}")]
    NotReady { name: String, seconds: u64, log: String },
    #[error("{name} exited early (exit {code}); see {log}")]
    Died { name: String, code: i32, log: String },
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("the run ended: {0}")]
    Ended(super::rendezvous::End),
    #[error("secret {name}: {reason}")]
    Secret { name: String, reason: String },
    #[error("{0}")]
    Backend(String),
}

pub(super) struct Running {
    pub(super) name: String,
    pub(super) child: Child,
    /// Its pid (= its process group's id), kept after the child is reaped.
    pub(super) pid: Option<u32>,
    pub(super) log: PathBuf,
    pub(super) main: bool,
    /// Exit 0 before the main process is no failure (`may_finish`).
    pub(super) may_finish: bool,
    /// It already finished that way.
    pub(super) finished: bool,
}

impl Running {
    /// Whether an exit with `code` is this process finishing its part (it is then marked
    /// finished and no longer watched).
    pub(super) fn finished_its_part(&mut self, code: i32) -> bool {
        if self.finished {
            return true;
        }
        if !self.main && self.may_finish && code == 0 {
            tracing::info!(process = %self.name, "finished its part of the run");
            self.finished = true;
            return true;
        }
        false
    }
}

pub(super) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let context = context.into();
    move |source| LaunchError::Io { context, source }
}

fn command(args: &[String], p: &mut Placeholders) -> Result<Vec<String>, LaunchError> {
    args.iter()
        .map(|a| p.fill(a).map_err(LaunchError::Placeholder))
        .collect()
}

fn log_file(run: &Path, name: &str) -> Result<(std::fs::File, PathBuf), LaunchError> {
    let path = run.join("logs").join(format!("{name}.log"));
    let file = std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
    Ok((file, path))
}

pub(super) async fn run_step(step: &Step, run: &Path, p: &mut Placeholders) -> Result<(), LaunchError> {
    let argv = command(&step.command, p)?;
    let (file, log) = log_file(run, &step.name)?;
    let err = file.try_clone().map_err(io("log file"))?;
    tracing::info!(step = %step.name, "setup");
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(file)
        .stderr(err)
        .status()
        .await
        .map_err(io(format!("running {}", argv[0])))?;
    if status.success() {
        Ok(())
    } else {
        Err(LaunchError::Setup {
            name: step.name.clone(),
            code: status.code().unwrap_or(-1),
            log: log.display().to_string(),
        })
    }
}

/// Starts `proc` with its log under `run/logs/`, `env` added to its own environment.
pub(super) fn spawn(
    proc: &Process,
    run: &Path,
    p: &mut Placeholders,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<Running, LaunchError> {
    let argv = command(&proc.command, p)?;
    let (file, log) = log_file(run, &proc.name)?;
    let err = file.try_clone().map_err(io("log file"))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    cmd.envs(env);
    for (k, v) in &proc.env {
        cmd.env(k, p.fill(v).map_err(LaunchError::Placeholder)?);
    }
    if !proc.gpus.is_empty() {
        let list: Vec<String> = proc.gpus.iter().map(u32::to_string).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", list.join(","));
    }
    let child = cmd
        .spawn()
        .map_err(io(format!("starting {} ({})", proc.name, argv[0])))?;
    tracing::info!(process = %proc.name, pid = child.id().unwrap_or(0), log = %log.display(), "started");
    Ok(Running {
        name: proc.name.clone(),
        pid: child.id(),
        child,
        log,
        main: proc.main,
        may_finish: proc.may_finish,
        finished: false,
    })
}

pub(super) async fn ready(proc: &Process, running: &mut Running, p: &mut Placeholders) -> Result<(), LaunchError> {
    let Some(check) = &proc.ready else { return Ok(()) };
    let check = match check {
        Ready::Http(url) => Ready::Http(p.fill(url).map_err(LaunchError::Placeholder)?),
        Ready::Log(text) => Ready::Log(p.fill(text).map_err(LaunchError::Placeholder)?),
    };
    let deadline = Instant::now() + Duration::from_secs(proc.ready_timeout_s);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(LaunchError::Http)?;
    let mut delay = Duration::from_millis(50);
    loop {
        let ok = match &check {
            Ready::Http(url) => http.get(url).send().await.is_ok_and(|r| r.status().is_success()),
            Ready::Log(text) => std::fs::read_to_string(&running.log).is_ok_and(|l| l.contains(text.as_str())),
        };
        if ok {
            return Ok(());
        }
        if let Ok(Some(status)) = running.child.try_wait() {
            return Err(LaunchError::Died {
                name: running.name.clone(),
                code: status.code().unwrap_or(-1),
                log: running.log.display().to_string(),
            });
        }
        if Instant::now() > deadline {
            return Err(LaunchError::NotReady {
                name: running.name.clone(),
                seconds: proc.ready_timeout_s,
                log: running.log.display().to_string(),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Writes `{run}/processes.json` (name -> pid) so operators and tests can see what was started.
fn record_pids(run: &Path, running: &[Running]) {
    record_pids_in(&run.join("processes.json"), running);
}

/// Writes `path` (name -> pid of each process in `running`).
pub(super) fn record_pids_in(path: &Path, running: &[Running]) {
    let map: serde_json::Map<String, serde_json::Value> = running
        .iter()
        .map(|r| (r.name.clone(), serde_json::Value::from(r.pid.unwrap_or(0))))
        .collect();
    if let Err(e) = std::fs::write(path, serde_json::Value::Object(map).to_string()) {
        tracing::warn!(error = %e, "cannot write processes.json");
    }
}

/// SIGTERM to each process group we started (newest first), then SIGKILL after a grace period.
pub(super) async fn teardown(running: &mut [Running]) {
    for r in running.iter().rev() {
        if let Some(pid) = r.pid {
            // SAFETY: kill(2) on the process group this launcher created for its own child.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for r in running.iter_mut().rev() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, r.child.wait()).await.is_err() {
            tracing::warn!(process = %r.name, "did not stop on SIGTERM; killing");
            if let Some(pid) = r.pid {
                // SAFETY: as above.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            let _ = r.child.wait().await;
        }
    }
}

/// The repository a manifest belongs to (its directory's parent: `cluster/x.toml`).
pub fn repo_of(manifest: &Path) -> PathBuf {
    std::path::absolute(manifest)
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The placeholders of a run in `run`, ports picked free on `bind`.
pub fn placeholders(run: &Path, repo: PathBuf, bind: std::net::IpAddr) -> Placeholders {
    Placeholders {
        run: run.to_path_buf(),
        python: std::env::var("GRPO_PYTHON").unwrap_or_else(|_| "python3".into()),
        grpo_node: std::env::current_exe()
            .map(|e| e.display().to_string())
            .unwrap_or_else(|_| "grpo-node".into()),
        repo,
        ports: Default::default(),
        hosts: Default::default(),
        bind,
    }
}

/// Seconds since the Unix epoch (0 before it): run directories' time stamps.
pub(super) fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Creates a new run directory (with `logs/`) under the manifest's `runs_dir` (or `runs_dir`
/// given here), named after the manifest, the time and this process: never one that exists, so
/// two runs (two queued jobs) never share one.
pub fn reserve_run_dir(manifest: &Manifest, runs_dir: Option<&Path>) -> Result<PathBuf, LaunchError> {
    let parent = runs_dir.map_or_else(|| PathBuf::from(&manifest.runs_dir), Path::to_path_buf);
    let parent = std::path::absolute(parent).map_err(io("run dir"))?;
    std::fs::create_dir_all(&parent).map_err(io(format!("creating {}", parent.display())))?;
    let stamp = unix_seconds();
    for n in 0..1000 {
        let name = match n {
            0 => format!("{}-{stamp}", manifest.name),
            _ => format!("{}-{stamp}-{n}", manifest.name),
        };
        let run = parent.join(name);
        match std::fs::create_dir(&run) {
            Ok(()) => {
                std::fs::create_dir(run.join("logs")).map_err(io(format!("creating {}/logs", run.display())))?;
                return Ok(run);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(format!("creating {}", run.display()))(e)),
        }
    }
    Err(LaunchError::RunDir(parent.to_path_buf()))
}

/// Writes each of the manifest's secrets to `{run}/secrets/NAME`, readable by the owner only.
pub fn write_secrets(manifest: &Manifest, run: &Path) -> Result<(), LaunchError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if manifest.secrets.is_empty() {
        return Ok(());
    }
    let dir = run.join("secrets");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    for (name, source) in &manifest.secrets {
        let bad = |reason: String| LaunchError::Secret {
            name: name.clone(),
            reason,
        };
        let value = if source == "generate" {
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .map_err(|e| bad(format!("/dev/urandom: {e}")))?;
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        } else if let Some(path) = source.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .map_err(|e| bad(format!("{path}: {e}")))?
                .trim()
                .to_string()
        } else if let Some(var) = source.strip_prefix("env:") {
            std::env::var(var).map_err(|_| bad(format!("${var} is not set")))?
        } else {
            return Err(bad(format!("unknown source {source:?}")));
        };
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(format!("creating {}", path.display())))?;
        f.write_all(value.as_bytes())
            .map_err(io(format!("writing {}", path.display())))?;
    }
    Ok(())
}

/// Runs a manifest to completion; returns the main process's exit code.
pub async fn launch(
    path: &Path,
    runs_dir: Option<&Path>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<i32, LaunchError> {
    let manifest = Manifest::read(path)?;
    let repo = repo_of(path);
    let run = reserve_run_dir(&manifest, runs_dir)?;
    write_secrets(&manifest, &run)?;
    let mut p = placeholders(&run, repo, std::net::Ipv4Addr::LOCALHOST.into());
    // One machine: every group's host is this one.
    for g in manifest.group_names() {
        p.hosts.insert(g, "127.0.0.1".into());
    }
    eprintln!("run directory: {}", run.display());
    let started = Instant::now();
    for step in &manifest.setup {
        run_step(step, &run, &mut p).await?;
    }
    let mut running: Vec<Running> = Vec::new();
    let result = supervise(&manifest, &run, &mut p, &mut running, shutdown).await;
    teardown(&mut running).await;
    let code = result?;
    if code == 0 {
        for step in &manifest.finally {
            if let Err(e) = run_step(step, &run, &mut p).await {
                tracing::warn!(error = %e, "report step failed");
            }
        }
    }
    if let Some(metrics) = &manifest.metrics {
        let path = PathBuf::from(p.fill(metrics).map_err(LaunchError::Placeholder)?);
        eprintln!(
            "\n{}\n{}",
            manifest.name,
            summary(&records(&path), started.elapsed().as_secs_f64())
        );
    }
    eprintln!("logs, checkpoints and plots: {}", run.display());
    Ok(code)
}

async fn supervise(
    manifest: &Manifest,
    run: &Path,
    p: &mut Placeholders,
    running: &mut Vec<Running>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<i32, LaunchError> {
    tokio::pin!(shutdown);
    for proc in &manifest.process {
        running.push(spawn(proc, run, p, &Default::default())?);
        record_pids(run, running);
        let last = running.len() - 1;
        tokio::select! {
            r = ready(proc, &mut running[last], p) => r?,
            _ = &mut shutdown => return Ok(130),
        }
    }
    let metrics = match &manifest.metrics {
        Some(m) => Some(PathBuf::from(p.fill(m).map_err(LaunchError::Placeholder)?)),
        None => None,
    };
    let mut progress = Progress::new(manifest.steps);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut shutdown => {
                progress.finish();
                eprintln!("interrupted: stopping every process this launch started");
                return Ok(130);
            }
        }
        if let Some(m) = &metrics {
            progress.update(&records(m));
        }
        for r in running.iter_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                let code = status.code().unwrap_or(-1);
                if r.finished_its_part(code) {
                    continue;
                }
                progress.finish();
                if r.main {
                    return Ok(code);
                }
                return Err(LaunchError::Died {
                    name: r.name.clone(),
                    code,
                    log: r.log.display().to_string(),
                });
            }
        }
    }
}
