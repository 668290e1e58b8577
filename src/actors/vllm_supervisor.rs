//! VllmSupervisor (sidecar node): runs the vLLM server process. It launches the configured
//! command in its own process group, bound to loopback with dev mode on and usage stats off,
//! and appends its output to a log file. Readiness is `/health`, then `/version` in the tested
//! range, then `/v1/models` listing the served name, then one real generation, then a resync
//! of the newest installed version. Liveness is a one-token generation under a deadline
//! (vLLM's `/health` stays 200 while its engine is wedged). A dead or wedged vLLM is restarted
//! with capped backoff; stopping kills only its own process group.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, watch};

use crate::engine::core::JobParams;
use crate::engine::vllm::{SupervisorOrder, VllmShared, VllmState};
use crate::engine::vllm_api::{is_tested, PauseMode, VllmApi};

/// How to run vLLM.
#[derive(Debug, Clone)]
pub struct VllmLaunch {
    /// Program and leading arguments, e.g. `python -m vllm.entrypoints.openai.api_server`.
    pub command: Vec<String>,
    /// Extra arguments appended after ours (e.g. `--dtype float32 --enforce-eager`).
    pub extra_args: Vec<String>,
    pub model_dir: PathBuf,
    pub served_name: String,
    /// Loopback port vLLM listens on (the same across restarts).
    pub port: u16,
    pub log: PathBuf,
    pub ready_timeout: Duration,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// Consecutive failed launches before giving up.
    pub max_restarts: u32,
    pub allow_untested: bool,
    /// Per-call deadline of a resync's update routes.
    pub update_deadline: Duration,
    /// vLLM's weight-transfer engine, where one is used: the directory holding our vLLM plugin
    /// (see [`crate::engine::vllm_transfer`]) and the backend name it registers.
    pub weight_transfer: Option<(PathBuf, &'static str)>,
    /// LoRA serving: (max rank, adapters held at once); vLLM then runs with `--enable-lora`
    /// and runtime adapter loading.
    pub lora: Option<(u32, u32)>,
}

/// The supervisor's mailbox.
pub enum VllmMsg {
    /// Launch (or relaunch) now.
    Launch,
    /// The process of this launch exited.
    Exited(u64, String),
    /// The readiness checks of this launch ended: Ok, a retryable failure, or a fatal one.
    ReadyCheck(u64, Result<(), Readiness>),
    /// Periodic liveness probe.
    Probe,
    /// A probe of this launch ended.
    Probed(u64, bool),
    /// An order from the driver.
    Order(SupervisorOrder),
}

/// Why a launch did not become ready.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// Timed out or failed a check; a restart may help.
    NotReady(String),
    /// Refused for good (an untested vLLM version).
    Refused(String),
}

/// Why vLLM's process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("empty --vllm-command")]
    EmptyCommand,
    #[error("opening vLLM's log {}: {source}", path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("starting {program}: {source}")]
    Start { program: String, source: std::io::Error },
    #[error("vLLM exited at once")]
    ExitedAtOnce,
    #[error(transparent)]
    Api(#[from] crate::engine::inference::EngineFailure),
}

/// Start arguments.
pub struct VllmArgs {
    pub launch: VllmLaunch,
    pub state: watch::Sender<VllmState>,
    pub orders: mpsc::Receiver<SupervisorOrder>,
    pub shared: Arc<VllmShared>,
}

pub struct VllmSupervisor;

pub struct VllmSupervisorState {
    launch: VllmLaunch,
    state: watch::Sender<VllmState>,
    shared: Arc<VllmShared>,
    /// Number of the newest launch.
    generation: u64,
    /// Process group (= leader pid) of the running launch.
    pgid: Option<i32>,
    /// Failed launches in a row (reset once a launch has been ready for a minute).
    failures: u32,
    ever_ready: bool,
    ready_since: Option<Instant>,
    probe_failures: u32,
    probing: bool,
    /// Model to start from instead of `launch.model_dir` (a checkpoint the driver could not
    /// reload).
    model_override: Option<PathBuf>,
    /// lora-restart: the adapter (name, directory) vLLM starts with (`--lora-modules`).
    lora_module: Option<(String, PathBuf)>,
    restarts: u64,
}

fn base_of(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The last `n` lines of a log, for error messages.
fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A one-token generation that any model can answer.
fn probe_params() -> JobParams {
    JobParams {
        ignore_eos: true,
        ..JobParams::greedy(1)
    }
}

/// Sends SIGTERM to a process group, waits up to `grace` for it to be gone, then SIGKILLs it.
pub async fn stop_group(pgid: i32, grace: Duration) {
    // SAFETY: kill(2) on a negative pid signals that process group only; no memory is shared.
    let alive = || unsafe { libc::kill(-pgid, 0) } == 0;
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let until = Instant::now() + grace;
    while alive() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if alive() {
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        while alive() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The readiness checks of one launch, then the resync of the newest installed version (unless
/// the launch loaded it already: `loaded` is the model directory vLLM started on).
async fn check_ready(
    api: VllmApi,
    launch: VllmLaunch,
    shared: Arc<VllmShared>,
    loaded: PathBuf,
) -> Result<(), Readiness> {
    let quick = Duration::from_secs(5);
    let until = Instant::now() + launch.ready_timeout;
    let not_ready = |what: String| {
        Readiness::NotReady(format!(
            "{what} (vLLM's log: {}; last lines:\n{})",
            launch.log.display(),
            log_tail(&launch.log, 15)
        ))
    };
    loop {
        if api.health(quick).await.is_ok() {
            break;
        }
        if Instant::now() >= until {
            return Err(not_ready(format!(
                "vLLM did not answer /health within {:?}",
                launch.ready_timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let version = api.version(quick).await.map_err(|e| not_ready(e.to_string()))?;
    if !is_tested(&version) && !launch.allow_untested {
        return Err(Readiness::Refused(format!(
            "vLLM {version} is outside the tested range {:?}; pass --allow-untested-vllm to run it anyway",
            crate::engine::vllm_api::TESTED_VLLM
        )));
    }
    if !api.serves_model(quick).await.map_err(|e| not_ready(e.to_string()))? {
        return Err(not_ready(format!("/v1/models does not list {:?}", launch.served_name)));
    }
    api.complete(&[0], &probe_params(), launch.probe_timeout.max(quick))
        .await
        .map_err(|e| not_ready(format!("the first generation failed: {e}")))?;
    let mut current = shared.current.lock().await;
    if let Some((served, name, dir)) = current
        .as_ref()
        .and_then(|c| c.adapter.as_ref().map(|(n, d)| (c.version, n.clone(), d.clone())))
    {
        // An adapter this launch did not start with (`--lora-modules`) is loaded again.
        if !api.serves(&name, quick).await.map_err(|e| not_ready(e.to_string()))? {
            api.load_lora_adapter(&name, &dir, launch.update_deadline)
                .await
                .map_err(|e| not_ready(format!("reloading adapter {name} failed: {e}")))?;
        }
        tracing::info!(version = served.0, adapter = %name, "vLLM serves the newest adapter");
        drop(current);
        tracing::info!(vllm = %version, base = %api.base(), "vLLM ready");
        return Ok(());
    }
    match current.as_ref().map(|c| (c.version, c.dir.clone())) {
        Some((version, Some(dir))) if dir == loaded => {
            tracing::info!(version = version.0, dir = %dir.display(), "vLLM started on the newest version");
        }
        Some((version, Some(dir))) => {
            api.swap_in(&dir, PauseMode::Wait, launch.update_deadline)
                .await
                .map_err(|e| not_ready(format!("resync of version {} failed: {e}", version.0)))?;
            tracing::info!(version = version.0, dir = %dir.display(), "vLLM resynced to the newest version");
        }
        Some((version, None)) => {
            // A version that came over CUDA IPC has no copy here: vLLM serves the base model
            // (version 0) until the learner's next version, and says so.
            tracing::warn!(
                lost = version.0,
                "the newest version came over CUDA IPC and has no copy here: serving the base model until the next version"
            );
            *current = None;
        }
        None => {}
    }
    drop(current);
    tracing::info!(vllm = %version, base = %api.base(), "vLLM ready");
    Ok(())
}

/// Launches vLLM with one of our plugin's weight-transfer engines: the plugin on `PYTHONPATH`
/// (also in `GRPO_VLLM_PLUGIN_DIR`, for a command that sets its own `PYTHONPATH`), the
/// backend, and for CUDA IPC the unpickling of handles that backend needs; or, for shared
/// mode, the plugin's worker extension.
fn with_plugin(cmd: &mut tokio::process::Command, plugin: &Path, backend: &str) {
    let mut path = std::ffi::OsString::from(plugin.as_os_str());
    if let Some(old) = std::env::var_os("PYTHONPATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(old);
    }
    cmd.env("PYTHONPATH", path).env("GRPO_VLLM_PLUGIN_DIR", plugin);
    if backend == crate::engine::vllm_transfer::SHARED_EXTENSION {
        // Shared mode: no transfer engine, a worker method that exports the parameters.
        cmd.args(["--worker-extension-cls", backend]);
        return;
    }
    let config = format!("{{\"backend\":\"{backend}\"}}");
    cmd.args(["--weight-transfer-config", &config]);
    if backend == crate::engine::vllm_transfer::BACKEND {
        cmd.env("VLLM_ALLOW_INSECURE_SERIALIZATION", "1");
    }
}

/// Launches vLLM able to serve LoRA adapters: `--enable-lora` up to `rank`, `loras` at once,
/// adapters loadable at run time, and `module` (name, directory) loaded from the start.
fn with_lora(cmd: &mut tokio::process::Command, rank: u32, loras: u32, module: Option<&(String, PathBuf)>) {
    cmd.args(["--enable-lora", "--max-lora-rank", &rank.to_string()])
        .args(["--max-loras", &loras.to_string()])
        .env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1");
    if let Some((name, dir)) = module {
        cmd.args(["--lora-modules", &format!("{name}={}", dir.display())]);
    }
}

impl VllmSupervisorState {
    /// vLLM's command line (`program`, `lead`, then our flags) and environment for the next
    /// launch, its output appended to the launch's log.
    fn command(&self, model: &Path, program: &str, lead: &[String]) -> Result<tokio::process::Command, SpawnError> {
        let l = &self.launch;
        if let Some(parent) = l.log.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let log_err = |source| SpawnError::Log {
            path: l.log.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&l.log)
            .map_err(log_err)?;
        let err = log.try_clone().map_err(log_err)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(lead)
            .args([
                "--model",
                &model.display().to_string(),
                "--served-model-name",
                &l.served_name,
            ])
            .args(["--host", "127.0.0.1", "--port", &l.port.to_string()])
            .args(["--logprobs-mode", "processed_logprobs", "--generation-config", "vllm"])
            .args(&l.extra_args)
            .env("VLLM_SERVER_DEV_MODE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .env("DO_NOT_TRACK", "1")
            .env("VLLM_DO_NOT_TRACK", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: prctl(2) in the forked child before exec touches no memory of the parent.
        // If the sidecar dies without stopping vLLM (SIGKILL), vLLM gets SIGTERM instead of
        // living on as an orphan. (It fires when the forking thread exits: a runtime worker,
        // which lives as long as the sidecar's runtime.)
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        if std::env::var_os("VLLM_CPU_KVCACHE_SPACE").is_none() {
            cmd.env("VLLM_CPU_KVCACHE_SPACE", "1");
        }
        if let Some((plugin, backend)) = &l.weight_transfer {
            with_plugin(&mut cmd, plugin, backend);
        }
        if let Some((rank, loras)) = l.lora {
            with_lora(&mut cmd, rank, loras, self.lora_module.as_ref());
        }
        Ok(cmd)
    }

    fn spawn_process(&mut self, myself: &ActorRef<VllmMsg>) -> Result<(), SpawnError> {
        let l = &self.launch;
        let model = self.model_override.clone().unwrap_or_else(|| l.model_dir.clone());
        let (program, lead) = l.command.split_first().ok_or(SpawnError::EmptyCommand)?;
        let mut cmd = self.command(&model, program, lead)?;
        let mut child = cmd.spawn().map_err(|source| SpawnError::Start {
            program: program.clone(),
            source,
        })?;
        let pid = child.id().ok_or(SpawnError::ExitedAtOnce)? as i32;
        self.generation += 1;
        self.pgid = Some(pid);
        self.probe_failures = 0;
        let generation = self.generation;
        let me = myself.clone();
        tokio::spawn(async move {
            let status = child.wait().await.map_or_else(|e| e.to_string(), |s| s.to_string());
            let _ = me.cast(VllmMsg::Exited(generation, status));
        });
        let api = VllmApi::new(base_of(l.port), l.served_name.clone())?;
        let (launch, shared, me) = (l.clone(), self.shared.clone(), myself.clone());
        let loaded = model.clone();
        tokio::spawn(async move {
            let result = check_ready(api, launch, shared, loaded).await;
            let _ = me.cast(VllmMsg::ReadyCheck(generation, result));
        });
        self.state.send_replace(VllmState::Starting { launch: generation });
        tracing::info!(pid, launch = generation, model = %model.display(), port = l.port, log = %l.log.display(), "vLLM launched");
        Ok(())
    }

    fn fail(&mut self, reason: String) {
        tracing::error!(reason = %reason, "giving up on vLLM");
        self.state.send_replace(VllmState::Failed { reason });
    }

    /// Schedules a relaunch after a capped backoff, or gives up.
    fn relaunch_later(&mut self, myself: &ActorRef<VllmMsg>, why: String) {
        self.failures += 1;
        if !self.ever_ready || self.failures > self.launch.max_restarts {
            self.fail(why);
            return;
        }
        let delay = Duration::from_secs(1u64 << self.failures.min(5).saturating_sub(1)).min(Duration::from_secs(30));
        self.restarts += 1;
        crate::telemetry::prom::sidecar().engine_restarts.inc();
        tracing::warn!(why = %why, delay_s = delay.as_secs(), restart = self.restarts, "restarting vLLM");
        self.state.send_replace(VllmState::Starting {
            launch: self.generation,
        });
        myself.send_after(delay, || VllmMsg::Launch);
    }

    async fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            stop_group(pgid, Duration::from_secs(10)).await;
        }
    }
}

impl Actor for VllmSupervisor {
    type Msg = VllmMsg;
    type State = VllmSupervisorState;
    type Arguments = VllmArgs;

    async fn pre_start(&self, myself: ActorRef<VllmMsg>, args: VllmArgs) -> Result<Self::State, ActorProcessingErr> {
        let VllmArgs {
            launch,
            state,
            mut orders,
            shared,
        } = args;
        let me = myself.clone();
        tokio::spawn(async move {
            while let Some(order) = orders.recv().await {
                if me.cast(VllmMsg::Order(order)).is_err() {
                    return;
                }
            }
        });
        myself.send_interval(launch.probe_interval, || VllmMsg::Probe);
        myself.cast(VllmMsg::Launch)?;
        Ok(VllmSupervisorState {
            launch,
            state,
            shared,
            generation: 0,
            pgid: None,
            failures: 0,
            ever_ready: false,
            ready_since: None,
            probe_failures: 0,
            probing: false,
            model_override: None,
            lora_module: None,
            restarts: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<VllmMsg>,
        msg: VllmMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if matches!(*st.state.borrow(), VllmState::Failed { .. }) {
            st.kill().await;
            return Ok(());
        }
        match msg {
            VllmMsg::Launch => {
                st.kill().await;
                if let Err(e) = st.spawn_process(&myself) {
                    st.fail(e.to_string());
                }
            }
            // A launch this actor killed itself is relaunched by whoever killed it.
            VllmMsg::Exited(generation, status) if generation == st.generation && st.pgid.is_some() => {
                // The leader is gone; the rest of its group (vLLM's engine core) goes too.
                st.kill().await;
                st.ready_since = None;
                let why = format!(
                    "vLLM exited ({status}); its log: {}; last lines:\n{}",
                    st.launch.log.display(),
                    log_tail(&st.launch.log, 15)
                );
                st.relaunch_later(&myself, why);
            }
            VllmMsg::Exited(..) => {}
            VllmMsg::ReadyCheck(generation, result) if generation == st.generation => match result {
                Ok(()) => {
                    st.ever_ready = true;
                    st.ready_since = Some(Instant::now());
                    st.state.send_replace(VllmState::Ready {
                        launch: generation,
                        base: base_of(st.launch.port),
                    });
                }
                Err(Readiness::Refused(why)) => st.fail(why),
                Err(Readiness::NotReady(why)) => {
                    st.kill().await;
                    st.relaunch_later(&myself, why);
                }
            },
            VllmMsg::ReadyCheck(..) => {}
            VllmMsg::Probe => probe(&myself, st),
            VllmMsg::Probed(generation, ok) if generation == st.generation => {
                st.probing = false;
                st.probe_failures = if ok { 0 } else { st.probe_failures + 1 };
                if ok && st.ready_since.is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
                    st.failures = 0;
                }
                if st.probe_failures >= 2 {
                    tracing::warn!(
                        launch = generation,
                        "vLLM failed two liveness probes in a row; killing it"
                    );
                    st.kill().await;
                    st.ready_since = None;
                    st.relaunch_later(&myself, "vLLM stopped answering generations".into());
                }
            }
            VllmMsg::Probed(..) => {}
            VllmMsg::Order(SupervisorOrder::RestartWithAdapter(name, dir)) => {
                tracing::info!(adapter = %name, dir = %dir.display(), "restarting vLLM with the newest adapter");
                st.restarts += 1;
                crate::telemetry::prom::sidecar().engine_restarts.inc();
                st.lora_module = Some((name, dir));
                st.ready_since = None;
                // Not ready from now: no generation goes to the old launch for the new adapter.
                st.state.send_replace(VllmState::Starting { launch: st.generation });
                st.kill().await;
                myself.cast(VllmMsg::Launch)?;
            }
            VllmMsg::Order(SupervisorOrder::RestartOn(dir)) => {
                tracing::info!(model = %dir.display(), "restarting vLLM on a checkpoint");
                // Full weights: no adapter on top of them.
                st.lora_module = None;
                st.restarts += 1;
                crate::telemetry::prom::sidecar().engine_restarts.inc();
                st.model_override = Some(dir);
                st.ready_since = None;
                st.kill().await;
                st.state.send_replace(VllmState::Starting { launch: st.generation });
                myself.cast(VllmMsg::Launch)?;
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<VllmMsg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        st.kill().await;
        tracing::info!(restarts = st.restarts, "vLLM stopped");
        Ok(())
    }
}

/// Starts a liveness probe unless one runs, vLLM is not ready, or an update holds vLLM paused.
fn probe(myself: &ActorRef<VllmMsg>, st: &mut VllmSupervisorState) {
    if st.probing || st.ready_since.is_none() {
        return;
    }
    let Ok(api) = VllmApi::new(base_of(st.launch.port), st.launch.served_name.clone()) else {
        return;
    };
    st.probing = true;
    let (generation, limit, shared, me) = (
        st.generation,
        st.launch.probe_timeout,
        st.shared.clone(),
        myself.clone(),
    );
    tokio::spawn(async move {
        // An update pauses vLLM: a probe then would only measure the pause.
        let ok = match shared.current.try_lock() {
            Ok(guard) => {
                drop(guard);
                // Beside an adapter's canary the probe would share its batch: skip it then.
                match shared.gate.try_read() {
                    Ok(_running) => api.complete(&[0], &probe_params(), limit).await.is_ok(),
                    Err(_) => true,
                }
            }
            Err(_) => true,
        };
        let _ = me.cast(VllmMsg::Probed(generation, ok));
    });
}
