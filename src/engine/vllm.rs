//! The vLLM driver: an [`InferenceEngine`] over a vLLM server that the VllmSupervisor actor
//! runs. Generation goes to `/v1/completions` with token-id prompts. A new version is written
//! as safetensors under the sidecar's weights directory (tmpfs by default) and swapped in with
//! pause -> `reload_weights` -> resume, so no request sees half-updated weights; a logprob
//! canary then compares vLLM's prompt logprobs with our transformer on the same weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, watch, Mutex};

use super::core::{Completion, JobParams, PolicyVersion};
use super::inference::{
    AdapterUpdate, EngineFailure, InferenceEngine, Installed, IpcInstall, NamedTensor, Served, SharedParams,
};
use super::vllm_api::{PauseMode, SwapTimes, VllmApi};
use crate::model::safetensors_io::write_file;
use crate::model::{ModelSpec, ParamStore, Transformer};
use crate::version::{digest_tensors, Digest};

mod lora;
mod shared;

/// Where the supervised vLLM stands, as the supervisor posts it.
#[derive(Debug, Clone, PartialEq)]
pub enum VllmState {
    /// Launched (or relaunched), not ready yet.
    Starting { launch: u64 },
    /// Ready at this base URL.
    Ready { launch: u64, base: String },
    /// Gave up: the sidecar must stop. The reason names vLLM's log.
    Failed { reason: String },
}

/// The version vLLM serves and where its weights are on disk (a resync after a restart
/// reloads them; a version that came over CUDA IPC has no copy on disk).
#[derive(Debug, Clone)]
pub struct Current {
    pub version: PolicyVersion,
    pub dir: Option<PathBuf>,
    /// Written by the sidecar (deleted when replaced), or a checkpoint of the learner's.
    pub owned: bool,
    pub digest: Option<Digest>,
    /// The LoRA adapter served on top of the base model: (name in vLLM, PEFT directory).
    pub adapter: Option<(String, PathBuf)>,
}

/// What the driver asks of the supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum SupervisorOrder {
    /// Restart vLLM on this model directory (a checkpoint `reload_weights` could not load).
    RestartOn(PathBuf),
    /// Restart vLLM with this LoRA adapter (name, PEFT directory) loaded (lora-restart).
    RestartWithAdapter(String, PathBuf),
}

/// The driver's and the supervisor's shared state. The `current` mutex is also the update
/// lock: a weight update, a checkpoint load and a resync after a restart never overlap, and
/// the liveness probe skips while it is held (vLLM is paused then).
pub struct VllmShared {
    pub current: Arc<Mutex<Option<Current>>>,
    /// Generations (and the supervisor's probe) read-hold it; the canary of a new LoRA adapter
    /// write-holds it. vLLM 0.26 with `--enable-lora` fails its whole engine when a
    /// prompt-logprobs request shares a batch with other requests (the LoRA logits processor's
    /// einsum gets the batch's token mapping and the prompt's hidden states), so that canary
    /// runs alone.
    pub gate: tokio::sync::RwLock<()>,
}

/// How full weights get into vLLM (`--vllm-weight-transfer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightTransfer {
    /// The sidecar writes safetensors on tmpfs; vLLM's `reload_weights` reads them.
    Reload,
    /// vLLM's workers copy out of a learner's GPU memory on the same GPU (CUDA IPC).
    Ipc,
    /// A learner on another GPU broadcasts into vLLM's workers (NCCL, the learner rank 0).
    Nccl,
    /// Nothing moves: a learner on the same GPU maps vLLM's parameters and trains them in
    /// place (`--weight-bridge-mode shared`), pausing vLLM around each optimizer write.
    Shared,
}

/// Tunables of the driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub served_name: String,
    /// Model directory (config and tokenizer; the canary's spec).
    pub model_dir: PathBuf,
    /// Where versions are written.
    pub weights_dir: PathBuf,
    /// Longest a generation waits for vLLM to be ready (during a restart).
    pub ready_wait: Duration,
    /// Per-call deadline of the update routes.
    pub update_deadline: Duration,
    /// Deadline of one generation request.
    pub generate_deadline: Duration,
    /// Tokens of the logprob canary after each install (0: off).
    pub canary_tokens: usize,
    /// How a swap pauses vLLM.
    pub pause_mode: PauseMode,
    /// How full weights get into vLLM.
    pub transfer: WeightTransfer,
    /// Largest LoRA rank vLLM serves (`--vllm-lora-rank`), when it serves adapters.
    pub lora_rank: Option<u32>,
}

/// The vLLM engine.
pub struct VllmEngine {
    /// A forwarded NCCL transfer in progress (`--vllm-weight-transfer nccl`).
    forward: Mutex<Forward>,
    /// Where generations go: the newest LoRA adapter, or the base model.
    route: lora::Routes,
    /// Shared mode: vLLM paused for a learner's write.
    holds: shared::Holds,
    cfg: DriverConfig,
    spec: ModelSpec,
    manifest: Vec<(String, Vec<i64>)>,
    tokenizer: Arc<Tokenizer>,
    state: watch::Receiver<VllmState>,
    orders: mpsc::Sender<SupervisorOrder>,
    shared: Arc<VllmShared>,
}

impl VllmEngine {
    /// A driver of the vLLM that the supervisor holding the other ends runs.
    pub fn new(
        cfg: DriverConfig,
        tokenizer: Arc<Tokenizer>,
        state: watch::Receiver<VllmState>,
        orders: mpsc::Sender<SupervisorOrder>,
        shared: Arc<VllmShared>,
    ) -> Result<Self, EngineFailure> {
        let spec = ModelSpec::from_dir(&cfg.model_dir).map_err(|e| EngineFailure::Rejected(e.to_string()))?;
        std::fs::create_dir_all(&cfg.weights_dir)
            .map_err(|e| EngineFailure::Failed(format!("creating {}: {e}", cfg.weights_dir.display())))?;
        let manifest = crate::model::params::expected_shapes(&spec);
        Ok(Self {
            forward: Mutex::new(Forward::default()),
            route: lora::Routes::default(),
            holds: shared::Holds::default(),
            cfg,
            spec,
            manifest,
            tokenizer,
            state,
            orders,
            shared,
        })
    }

    /// The API of the ready server, waiting at most `wait` for it.
    async fn ready(&self, wait: Duration) -> Result<VllmApi, EngineFailure> {
        let mut state = self.state.clone();
        let ready = tokio::time::timeout(wait, async {
            loop {
                match &*state.borrow_and_update() {
                    VllmState::Ready { base, .. } => return Ok(base.clone()),
                    VllmState::Failed { reason } => return Err(EngineFailure::Unavailable(reason.clone())),
                    VllmState::Starting { .. } => {}
                }
                if state.changed().await.is_err() {
                    return Err(EngineFailure::Unavailable("the vLLM supervisor has stopped".into()));
                }
            }
        })
        .await
        .map_err(|_| EngineFailure::Unavailable(format!("vLLM not ready within {wait:?} (restarting)")))??;
        VllmApi::new(ready, self.cfg.served_name.clone())
    }

    /// Waits (at most 30 s) until the supervisor has taken the current launch out of service
    /// for a restart it was ordered to make.
    async fn restart_begun(&self) {
        let mut state = self.state.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            state.wait_for(|s| !matches!(s, VllmState::Ready { .. })),
        )
        .await;
    }

    /// Compares vLLM's prompt logprobs on the canary tokens with our reference.
    async fn check_canary(&self, api: &VllmApi, reference: Option<Canary>) -> Result<Option<f64>, EngineFailure> {
        let Some(c) = reference else {
            return Ok(None);
        };
        let served = api.prompt_logprobs(&c.ids, self.cfg.update_deadline).await?;
        let worst = served
            .iter()
            .zip(&c.logprobs)
            .map(|(s, o)| (s - o).abs())
            .fold(0.0f64, f64::max);
        Ok(Some(worst))
    }
}

/// Where a forwarded NCCL transfer stands: vLLM's ranks joining the learner's communicator,
/// then one version's `/update_weights` receiving, with vLLM paused and the update lock held.
#[derive(Default)]
struct Forward {
    /// vLLM's ranks joining; yields the vLLM launch that joined.
    join: Option<tokio::task::JoinHandle<Result<u64, EngineFailure>>>,
    /// The launch whose ranks are in the learner's communicator.
    joined_launch: Option<u64>,
    pending: Option<Receiving>,
}

/// Waits (at most `wait`) for a ready vLLM: its launch number and base URL.
async fn ready_launch(state: &mut watch::Receiver<VllmState>, wait: Duration) -> Result<(u64, String), EngineFailure> {
    let ready = tokio::time::timeout(wait, async {
        loop {
            match &*state.borrow_and_update() {
                VllmState::Ready { launch, base } => return Ok((*launch, base.clone())),
                VllmState::Failed { reason } => return Err(EngineFailure::Unavailable(reason.clone())),
                VllmState::Starting { .. } => {}
            }
            if state.changed().await.is_err() {
                return Err(EngineFailure::Unavailable("the vLLM supervisor has stopped".into()));
            }
        }
    })
    .await;
    ready.map_err(|_| EngineFailure::Unavailable(format!("vLLM not ready within {wait:?}")))?
}

/// One version being received: the task that waits for vLLM's `/update_weights`, then
/// finishes, resumes and records the version (holding the update lock throughout), or on
/// failure resumes and restarts vLLM, whose ranks may be stuck in the broadcast.
struct Receiving {
    version: PolicyVersion,
    task: tokio::task::JoinHandle<Result<(), EngineFailure>>,
}

/// Longest vLLM's ranks wait in a forwarded NCCL receive before vLLM is restarted.
const FORWARD_RECEIVE_LIMIT: Duration = Duration::from_secs(300);

/// How a CUDA IPC swap failed: before vLLM touched its weights (it serves the old ones), or
/// after (a restart is needed).
enum IpcSwapError {
    Untouched(EngineFailure),
    Touched(EngineFailure),
}

impl VllmEngine {
    /// Pause, `/start_weight_update`, `/update_weights`, `/finish_weight_update`, resume, all
    /// by `until` (the learner keeps its memory unchanged until then). The resume runs
    /// whatever happened in between.
    async fn ipc_swap(
        &self,
        api: &VllmApi,
        info: serde_json::Value,
        until: Instant,
    ) -> Result<SwapTimes, IpcSwapError> {
        let limit = || {
            until
                .saturating_duration_since(Instant::now())
                .min(self.cfg.update_deadline)
        };
        let t0 = Instant::now();
        api.init_ipc_transfer(limit()).await.map_err(IpcSwapError::Untouched)?;
        api.pause(self.cfg.pause_mode, limit())
            .await
            .map_err(IpcSwapError::Untouched)?;
        let paused = t0.elapsed();
        let started = if limit() < Duration::from_secs(1) {
            Err(EngineFailure::Unavailable(
                "too little of the learner's deadline left to copy".into(),
            ))
        } else {
            api.start_weight_update(limit()).await
        };
        if let Err(e) = started {
            let _ = api.resume(self.cfg.update_deadline).await;
            return Err(IpcSwapError::Untouched(e));
        }
        let updated = async {
            api.update_weights(info, limit()).await?;
            api.finish_weight_update(limit()).await
        }
        .await;
        let update_done = t0.elapsed();
        let resumed = api.resume(self.cfg.update_deadline).await;
        updated.and(resumed).map_err(IpcSwapError::Touched)?;
        Ok(SwapTimes {
            pause_s: paused.as_secs_f64(),
            reload_s: (update_done - paused).as_secs_f64(),
            resume_s: (t0.elapsed() - update_done).as_secs_f64(),
        })
    }
}

/// Deletes the directory of a replaced version the sidecar wrote (unless it is `keep`).
fn remove_replaced(old: Option<Current>, keep: Option<&Path>) {
    if let Some(Current {
        owned: true,
        dir: Some(dir),
        ..
    }) = old
    {
        if Some(dir.as_path()) != keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// The canary's token ids for a vocabulary: fixed, spread over it.
pub fn canary_ids(vocab: i64, tokens: usize) -> Vec<i64> {
    let vocab = vocab.max(1);
    (0..tokens as i64).map(|i| (i * 7919 + 13) % vocab).collect()
}

impl VllmEngine {
    /// Cleans up after a forwarded receive the learner gave up on (its task was aborted, so the
    /// update lock is free): resume, forget the served version, restart vLLM.
    async fn abandon_receive(&self, version: PolicyVersion) {
        tracing::warn!(
            version = version.0,
            "a forwarded NCCL receive was abandoned; restarting vLLM"
        );
        if let Ok(api) = self.ready(Duration::from_secs(1)).await {
            let _ = api.resume(Duration::from_secs(5)).await;
        }
        *self.shared.current.lock().await = None;
        let _ = self
            .orders
            .send(SupervisorOrder::RestartOn(self.cfg.model_dir.clone()))
            .await;
    }

    /// The body of one forwarded receive (see [`Receiving`]).
    async fn receive_forwarded(
        api: VllmApi,
        info: serde_json::Value,
        mut lock: tokio::sync::OwnedMutexGuard<Option<Current>>,
        version: PolicyVersion,
        cfg: DriverConfig,
        orders: mpsc::Sender<SupervisorOrder>,
    ) -> Result<(), EngineFailure> {
        let received = async {
            api.update_weights(info, FORWARD_RECEIVE_LIMIT).await?;
            api.finish_weight_update(cfg.update_deadline).await
        }
        .await;
        let resumed = api.resume(cfg.update_deadline).await;
        match received.and(resumed) {
            Ok(()) => {
                remove_replaced(
                    lock.replace(Current {
                        version,
                        dir: None,
                        owned: false,
                        digest: None,
                        adapter: None,
                    }),
                    None,
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(version = version.0, error = %e,
                    "the forwarded NCCL receive failed; restarting vLLM (its ranks may sit in the broadcast)");
                *lock = None;
                drop(lock);
                let _ = orders.send(SupervisorOrder::RestartOn(cfg.model_dir.clone())).await;
                Err(e)
            }
        }
    }
}

/// Fixed tokens and our transformer's logprobs of them on a version's weights.
struct Canary {
    ids: Vec<i64>,
    logprobs: Vec<f64>,
}

/// A version on disk, ready to be swapped in.
struct Prepared {
    dir: PathBuf,
    digest: Digest,
    canary: Option<Canary>,
}

/// Writes `weights` as `<root>/v<version>/model.safetensors` (under a temporary name, then
/// renamed), digests them, and computes the canary's reference logprobs.
fn prepare(
    root: &Path,
    spec: &ModelSpec,
    canary_tokens: usize,
    weights: &[(String, Tensor)],
    version: PolicyVersion,
) -> Result<Prepared, EngineFailure> {
    let dir = root.join(format!("v{}", version.0));
    let tmp = root.join(format!(".v{}.partial", version.0));
    let failed = |what: &str, e: &dyn std::fmt::Display| EngineFailure::Failed(format!("{what}: {e}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&tmp).map_err(|e| failed("creating the version directory", &e))?;
    write_file(&tmp.join("model.safetensors"), weights).map_err(|e| failed("writing safetensors", &e))?;
    std::fs::rename(&tmp, &dir).map_err(|e| failed("renaming the version directory", &e))?;
    let digest = digest_tensors(weights).map_err(|e| failed("digesting", &e))?;
    let canary = if canary_tokens >= 2 {
        let ids = canary_ids(spec.vocab_size, canary_tokens);
        let logprobs = reference_logprobs(spec, weights, &ids)?;
        Some(Canary { ids, logprobs })
    } else {
        None
    };
    Ok(Prepared { dir, digest, canary })
}

/// Our transformer's logprob of each of `ids[1..]` after its prefix, on `weights` (CPU, fp32).
pub fn reference_logprobs(
    spec: &ModelSpec,
    weights: &[(String, Tensor)],
    ids: &[i64],
) -> Result<Vec<f64>, EngineFailure> {
    let params = ParamStore::from_tensors(
        weights
            .iter()
            .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).to_kind(Kind::Float)))
            .collect(),
    );
    let model = Transformer::new(spec, &params).map_err(|e| EngineFailure::Rejected(e.to_string()))?;
    model_logprobs(&model, ids, Device::Cpu)
}

/// `model`'s logprob of each of `ids[1..]` after its prefix (one forward on `device`, where
/// the model's weights are), read back as f64.
pub fn model_logprobs(model: &Transformer, ids: &[i64], device: Device) -> Result<Vec<f64>, EngineFailure> {
    if ids.len() < 2 {
        return Err(EngineFailure::Rejected("the canary needs at least 2 tokens".into()));
    }
    let n = ids.len() as i64;
    let lp = tch::no_grad(|| {
        let input = Tensor::from_slice(&ids[..ids.len() - 1])
            .view([1, n - 1])
            .to_device(device);
        let next = Tensor::from_slice(&ids[1..]).view([1, n - 1, 1]).to_device(device);
        let logits = model.forward(&input);
        logits
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
            .gather(-1, &next, false)
            .view([-1])
            .to_device(Device::Cpu)
    });
    Vec::<f32>::try_from(lp)
        .map(|v| v.into_iter().map(f64::from).collect())
        .map_err(|e| EngineFailure::Failed(format!("reading reference logprobs: {e}")))
}

#[async_trait::async_trait]
impl InferenceEngine for VllmEngine {
    fn kind(&self) -> &'static str {
        "vllm"
    }

    fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    fn vocab_size(&self) -> i64 {
        self.spec.vocab_size
    }

    fn context_len(&self) -> usize {
        self.spec.rope.max_position_embeddings.max(1) as usize
    }

    fn manifest(&self) -> &[(String, Vec<i64>)] {
        &self.manifest
    }

    fn nccl_device(&self) -> Option<Device> {
        None
    }

    async fn generate(&self, prompt: Vec<i64>, params: JobParams) -> Result<Vec<Completion>, EngineFailure> {
        let api = self.ready(self.cfg.ready_wait).await?;
        // A request runs to its end on the adapter it began with (held until it returns).
        let _shared = self.shared.gate.read().await;
        let route = self.route.current();
        let api = match &route {
            Some(r) => api.for_model(&r.name),
            None => api,
        };
        api.complete(&prompt, &params, self.cfg.generate_deadline).await
    }

    async fn install_adapter(&self, update: AdapterUpdate, version: PolicyVersion) -> Result<Installed, EngineFailure> {
        self.hot_swap_adapter(update, version).await
    }

    async fn load_adapter_checkpoint(&self, dir: &Path, version: PolicyVersion) -> Result<(), EngineFailure> {
        self.restart_with_adapter(dir, version).await
    }

    fn manifest_spec(&self) -> Result<ModelSpec, EngineFailure> {
        Ok(self.spec.clone())
    }

    async fn install(
        &self,
        weights: Vec<(String, Tensor)>,
        version: PolicyVersion,
    ) -> Result<Installed, EngineFailure> {
        if self.cfg.lora_rank.is_some() {
            return Err(EngineFailure::Rejected(
                "this sidecar serves LoRA adapters (--vllm-lora-rank): vLLM 0.26's reload_weights fails while --enable-lora is on; \
                 send adapters (--weight-bridge-mode lora or lora-restart), use checkpoint mode (it restarts vLLM), \
                 or start the sidecar without --vllm-lora-rank"
                    .into(),
            ));
        }
        let mut current = self.shared.current.lock().await;
        let api = self.ready(Duration::from_secs(5)).await?;
        let started = Instant::now();
        let (root, spec, canary_tokens) = (self.cfg.weights_dir.clone(), self.spec.clone(), self.cfg.canary_tokens);
        let prepared = tokio::task::spawn_blocking(move || prepare(&root, &spec, canary_tokens, &weights, version))
            .await
            .map_err(|e| EngineFailure::Failed(format!("writing the version: {e}")))??;
        let written = started.elapsed();
        let times = api
            .swap_in(&prepared.dir, self.cfg.pause_mode, self.cfg.update_deadline)
            .await?;
        let old = current.replace(Current {
            version,
            dir: Some(prepared.dir.clone()),
            owned: true,
            digest: Some(prepared.digest),
            adapter: None,
        });
        remove_replaced(old, Some(&prepared.dir));
        drop(current);
        let swapped = started.elapsed();
        let canary_max_abs_diff = self.check_canary(&api, prepared.canary).await?;
        tracing::info!(
            version = version.0,
            write_s = written.as_secs_f64(),
            pause_s = times.pause_s,
            reload_s = times.reload_s,
            resume_s = times.resume_s,
            swap_s = swapped.as_secs_f64(),
            total_s = started.elapsed().as_secs_f64(),
            canary_max_abs_diff,
            "vLLM serves the new version"
        );
        Ok(Installed { canary_max_abs_diff })
    }

    async fn load_checkpoint(&self, dir: &Path, version: PolicyVersion) -> Result<(), EngineFailure> {
        let mut current = self.shared.current.lock().await;
        let api = self.ready(Duration::from_secs(5)).await?;
        let entry = Current {
            version,
            dir: Some(dir.to_path_buf()),
            owned: false,
            digest: None,
            adapter: None,
        };
        // Full weights from here on: generations go to the base model again.
        self.route.clear();
        match api.swap_in(dir, self.cfg.pause_mode, self.cfg.update_deadline).await {
            Ok(_) => {
                remove_replaced(current.replace(entry), None);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(version = version.0, error = %e, dir = %dir.display(), "reload_weights failed; restarting vLLM on the checkpoint");
                *current = Some(entry);
                drop(current);
                self.orders
                    .send(SupervisorOrder::RestartOn(dir.to_path_buf()))
                    .await
                    .map_err(|_| EngineFailure::Unavailable("the vLLM supervisor has stopped".into()))?;
                // The restart must be seen before waiting for readiness.
                self.restart_begun().await;
                self.ready(self.cfg.ready_wait).await.map(|_| ())
            }
        }
    }

    fn takes_ipc(&self) -> bool {
        self.cfg.transfer == WeightTransfer::Ipc
    }

    async fn install_ipc(&self, update: IpcInstall, version: PolicyVersion) -> Result<Installed, EngineFailure> {
        if !self.takes_ipc() {
            return Err(EngineFailure::Rejected(
                "this vLLM runs without CUDA IPC weight transfer (--vllm-weight-transfer ipc)".into(),
            ));
        }
        let info = update
            .export
            .update_info()
            .map_err(|e| EngineFailure::Rejected(e.to_string()))?;
        let until = Instant::now() + update.deadline;
        let mut current = self.shared.current.lock().await;
        let api = self.ready(Duration::from_secs(5)).await?;
        let started = Instant::now();
        let times = match self.ipc_swap(&api, info, until).await {
            Ok(times) => times,
            Err(IpcSwapError::Untouched(e)) => return Err(e),
            Err(IpcSwapError::Touched(e)) => {
                // vLLM's layers may be half loaded (or still reading the learner's memory):
                // restart it on the base model, which serves version 0 until the next version.
                tracing::error!(version = version.0, error = %e, "the CUDA IPC update failed; restarting vLLM on the base model");
                *current = None;
                drop(current);
                let _ = self
                    .orders
                    .send(SupervisorOrder::RestartOn(self.cfg.model_dir.clone()))
                    .await;
                return Err(e);
            }
        };
        remove_replaced(
            current.replace(Current {
                version,
                dir: None,
                owned: false,
                digest: None,
                adapter: None,
            }),
            None,
        );
        drop(current);
        let swapped = started.elapsed();
        let canary = update.canary.map(|(ids, logprobs)| Canary { ids, logprobs });
        let canary_max_abs_diff = self.check_canary(&api, canary).await?;
        tracing::info!(
            version = version.0,
            transfer = "ipc",
            pause_s = times.pause_s,
            update_s = times.reload_s,
            resume_s = times.resume_s,
            swap_s = swapped.as_secs_f64(),
            canary_max_abs_diff,
            "vLLM serves the new version"
        );
        Ok(Installed { canary_max_abs_diff })
    }

    async fn shared_export(&self) -> Result<SharedParams, EngineFailure> {
        self.export_shared().await
    }

    async fn shared_pause(&self, launch: u64, deadline: Duration) -> Result<f64, EngineFailure> {
        self.pause_shared(launch, deadline).await
    }

    async fn shared_resume(
        &self,
        launch: u64,
        version: PolicyVersion,
        canary: Option<(Vec<i64>, Vec<f64>)>,
    ) -> Result<Installed, EngineFailure> {
        self.resume_shared(launch, version, canary).await
    }

    fn forwards_nccl(&self) -> bool {
        self.cfg.transfer == WeightTransfer::Nccl
    }

    async fn forwarded_nccl_world(&self) -> Option<i32> {
        if !self.forwards_nccl() {
            return None;
        }
        let api = self.ready(Duration::from_secs(5)).await.ok()?;
        api.world_size(self.cfg.update_deadline).await.ok().map(|w| w + 1)
    }

    async fn nccl_forward_join(&self, unique_id: Vec<u8>, world: i32) -> Result<(), EngineFailure> {
        if self.cfg.transfer != WeightTransfer::Nccl {
            return Err(self.no_forwarded_nccl());
        }
        let mut forward = self.forward.lock().await;
        let restarting = match forward.pending.take() {
            Some(old) => {
                // The learner gave up on that receive: vLLM's ranks may sit in its broadcast,
                // which only a restart ends.
                old.task.abort();
                self.abandon_receive(old.version).await;
                true
            }
            None => false,
        };
        let mut state = self.state.clone();
        let ready_wait = self.cfg.ready_wait;
        let (served_name, update_deadline) = (self.cfg.served_name.clone(), self.cfg.update_deadline);
        // vLLM's ranks block in ncclCommInitRank until the learner joins too.
        forward.join = Some(tokio::spawn(async move {
            if restarting {
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    state.wait_for(|s| !matches!(s, VllmState::Ready { .. })),
                )
                .await;
            }
            let (launch, base) = ready_launch(&mut state, ready_wait).await?;
            let api = VllmApi::new(base, served_name)?;
            let vllm_world = api.world_size(update_deadline).await?;
            if world != vllm_world + 1 {
                return Err(EngineFailure::Rejected(format!(
                    "a world of {world} for vLLM's {vllm_world} ranks (it must be {})",
                    vllm_world + 1
                )));
            }
            api.init_nccl_transfer(&unique_id, world, FORWARD_RECEIVE_LIMIT).await?;
            Ok(launch)
        }));
        Ok(())
    }

    async fn nccl_forward_begin(
        &self,
        version: PolicyVersion,
        tensors: Vec<NamedTensor>,
        buffer_bytes: u64,
    ) -> Result<(), EngineFailure> {
        let mut forward = self.forward.lock().await;
        if let Some(join) = forward.join.take() {
            let launch = join
                .await
                .map_err(|e| EngineFailure::Failed(format!("vLLM's NCCL join: {e}")))??;
            forward.joined_launch = Some(launch);
        }
        let now = match &*self.state.borrow() {
            VllmState::Ready { launch, .. } => Some(*launch),
            _ => None,
        };
        if forward.joined_launch.is_none() || forward.joined_launch != now {
            return Err(EngineFailure::Unavailable(
                "vLLM has not joined this communicator (it restarted since): the learner makes a new one".into(),
            ));
        }
        let lock = self.shared.current.clone().lock_owned().await;
        let api = self.ready(Duration::from_secs(5)).await?;
        api.pause(self.cfg.pause_mode, self.cfg.update_deadline).await?;
        if let Err(e) = api.start_weight_update(self.cfg.update_deadline).await {
            let _ = api.resume(self.cfg.update_deadline).await;
            return Err(e);
        }
        let info = serde_json::json!({
            "names": tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            "dtype_names": tensors.iter().map(|t| t.dtype.torch_name()).collect::<Vec<_>>(),
            "shapes": tensors.iter().map(|t| t.shape.clone()).collect::<Vec<_>>(),
            "packed": true,
            "packed_buffer_size_bytes": buffer_bytes,
            "packed_num_buffers": 2,
        });
        let task = tokio::spawn(Self::receive_forwarded(
            api,
            info,
            lock,
            version,
            self.cfg.clone(),
            self.orders.clone(),
        ));
        forward.pending = Some(Receiving { version, task });
        Ok(())
    }

    async fn nccl_forward_commit(
        &self,
        version: PolicyVersion,
        canary: Option<(Vec<i64>, Vec<f64>)>,
    ) -> Result<Installed, EngineFailure> {
        let pending = self.forward.lock().await.pending.take();
        let Some(r) = pending.filter(|r| r.version == version) else {
            return Err(EngineFailure::Rejected(format!(
                "no forwarded receive of version {} began",
                version.0
            )));
        };
        r.task
            .await
            .map_err(|e| EngineFailure::Failed(format!("the forwarded receive: {e}")))??;
        let api = self.ready(Duration::from_secs(5)).await?;
        let canary = canary.map(|(ids, logprobs)| Canary { ids, logprobs });
        let canary_max_abs_diff = self.check_canary(&api, canary).await?;
        tracing::info!(
            version = version.0,
            transfer = "nccl",
            canary_max_abs_diff,
            "vLLM serves the new version"
        );
        Ok(Installed { canary_max_abs_diff })
    }

    async fn served(&self) -> Result<Served, EngineFailure> {
        let current = self.shared.current.lock().await;
        let (version, digest) = current
            .as_ref()
            .map_or((PolicyVersion(0), None), |c| (c.version, c.digest));
        let parameters = self
            .manifest
            .iter()
            .map(|(_, shape)| crate::version::numel_of(shape).unwrap_or(0))
            .sum();
        Ok(Served {
            version,
            parameters,
            digest,
        })
    }

    async fn healthy(&self) -> bool {
        matches!(*self.state.borrow(), VllmState::Ready { .. })
    }
}
