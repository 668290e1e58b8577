//! `grpo-node --role learner`: loads (or resumes) the model on its own thread, registers with
//! the Atropos API, starts the actors, and runs until `--training-steps`, a signal, or a failure.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::sync::Semaphore;

use crate::actors::batch_fetcher::FetcherArgs;
use crate::actors::checkpointer::CheckpointerArgs;
use crate::actors::learner::{publish_adapter, publish_weights, SyncHook};
use crate::actors::learner::{LearnerArgs, LearnerStatus};
use crate::actors::messages::{RunOutcome, SupervisorMsg};
use crate::actors::model_worker::ModelWorker;
use crate::actors::supervisor::{LearnerSupervisor, SupervisorArgs};
use crate::actors::weight_broadcaster::{
    BroadcasterArgs, BroadcasterMsg, LatestSlot, Payload, SyncStats, WeightBroadcaster,
};
use crate::atropos::{AtroposClient, AtroposError, Registration};
use crate::checkpoint::{BatchSeq, CheckpointError, Spool, TrainingState};
use crate::config::learner::SyncTransport;
use crate::config::BridgeMode;
use crate::config::LearnerConfig;
use crate::engine::{http as engine_http, BatchConfig, EngineHandle};
use crate::grpo::{Limits, LossConfig};
use crate::model::safetensors_io::load_params;
use crate::model::{ModelError, ModelSpec};
use crate::roles::learner_service::{serve, LearnerService, SidecarAllow};
use crate::rpc::auth::Token;
use crate::sync::client::Deadlines;
use crate::telemetry::metrics::MetricsFile;
use crate::train::{AdamWConfig, ComputeConfig, LrSchedule, Precision, TrainError, Trainer, TrainerConfig};

/// Why a learner could not run.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Worker(#[from] crate::actors::model_worker::StartError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Atropos(#[from] AtroposError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the actors: {0}")]
    Actors(String),
    #[error("--device: {0}")]
    Device(#[source] crate::config::device::DeviceError),
    #[error("colocated engine: {0}")]
    Engine(String),
}

/// The learner's GPU when `--sync-transport` (auto or nccl) sends weights over NCCL.
fn nccl_device(cfg: &LearnerConfig) -> Option<usize> {
    let crate::config::DeviceSpec::Cuda(gpu) = cfg.device else {
        return None;
    };
    match cfg.sync.transport {
        SyncTransport::Grpc => None,
        #[cfg(feature = "cuda")]
        SyncTransport::Auto | SyncTransport::Nccl | SyncTransport::Ipc if crate::comm::nccl::available() => Some(gpu),
        SyncTransport::Auto | SyncTransport::Nccl | SyncTransport::Ipc => {
            if cfg.sync.transport != SyncTransport::Auto {
                tracing::warn!(
                    gpu,
                    transport = ?cfg.sync.transport,
                    "the GPU sync path needs libnccl and libcuda, which do not load here; using the gRPC stream"
                );
            }
            None
        }
    }
}

/// Models at least this large recompute layers in the backward unless told otherwise.
const CHECKPOINTING_FROM_PARAMS: i64 = 100_000_000;

pub(super) fn trainer_config(cfg: &LearnerConfig, device: tch::Device, spec: &ModelSpec) -> TrainerConfig {
    let params: i64 = crate::model::params::expected_shapes(spec)
        .iter()
        .map(|(_, shape)| shape.iter().product::<i64>())
        .sum();
    let precision = cfg.precision.unwrap_or(if device.is_cuda() {
        Precision::Bf16
    } else {
        Precision::Fp32
    });
    let gradient_checkpointing = cfg
        .gradient_checkpointing
        .unwrap_or(params >= CHECKPOINTING_FROM_PARAMS);
    if !gradient_checkpointing && cfg.checkpoint_keep_layers > 0 {
        tracing::warn!(
            params,
            keep_layers = cfg.checkpoint_keep_layers,
            "--checkpoint-keep-layers has nothing to do: gradient checkpointing is off for a model this small (every layer keeps its activations)"
        );
    }
    TrainerConfig {
        compute: ComputeConfig {
            precision,
            gradient_checkpointing,
            keep_layers: cfg.checkpoint_keep_layers,
            logprob_chunk_tokens: cfg.logprob_chunk_tokens,
            fused_adamw: cfg.fused_adamw,
            exp_avg: cfg.exp_avg_dtype.unwrap_or(precision),
        },
        loss: LossConfig {
            clip_mode: cfg.clip_mode,
            clip_eps_low: cfg.clip_eps,
            clip_eps_high: cfg.clip_eps_high,
            is_cap: cfg.is_cap,
            kl_coef: cfg.kl_coef,
            agg: cfg.loss_agg,
        },
        schedule: LrSchedule {
            lr: cfg.lr,
            warmup_steps: cfg.warmup_steps,
            total_steps: cfg.training_steps,
            kind: cfg.lr_schedule,
        },
        adamw: AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
        optimizer: cfg.optimizer,
        max_grad_norm: cfg.max_grad_norm,
        device,
    }
}

/// Removes what a crash mid-checkpoint left behind (`.tmp-*`, `.old-*`); complete
/// checkpoints are only ever renamed into place.
fn remove_partial_checkpoints(save: &std::path::Path) -> Result<(), LearnerError> {
    let io = |source| LearnerError::Io {
        context: format!("cleaning {}", save.display()),
        source,
    };
    for entry in std::fs::read_dir(save).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_dir() && (name.starts_with(".tmp-") || name.starts_with(".old-")) {
            tracing::warn!(path = %path.display(), "removing a partial checkpoint left by a crash");
            std::fs::remove_dir_all(&path).map_err(io)?;
        }
    }
    Ok(())
}

/// The trainer of a run: full weights from the model (or the resumed checkpoint), or LoRA on
/// the model's frozen weights with a fresh adapter (or the resumed one).
pub(super) fn build_trainer(
    spec: &ModelSpec,
    model: &Path,
    resumed: Option<&Path>,
    lora: Option<crate::model::lora::LoraSpec>,
    layers: Option<&crate::train::LayerSet>,
    (tcfg, seed): (TrainerConfig, i64),
) -> Result<Trainer, TrainError> {
    let Some(lora) = lora else {
        let params = load_params(spec, resumed.unwrap_or(model), tcfg.device)?;
        return Trainer::new(spec, params, layers, tcfg);
    };
    // The base goes to the device tensor by tensor, already in the compute dtype.
    let base = load_params(spec, model, tch::Device::Cpu)?;
    let tensors = match resumed {
        Some(dir) => {
            let (saved, tensors) = crate::model::lora::load_adapter(dir, spec)?;
            if saved != lora {
                return Err(TrainError::Lora(crate::model::lora::LoraError::Invalid(format!(
                    "{} was trained with {saved:?}, this run asks for {lora:?}",
                    dir.display()
                ))));
            }
            tensors
        }
        None => lora.init(spec, seed, tch::Device::Cpu),
    };
    Trainer::with_lora(spec, base, lora, tensors, tcfg)
}

/// A checkpoint to resume from: its directory, training state and optimizer tensors.
struct Restore {
    dir: PathBuf,
    state: TrainingState,
    optimizer: Vec<(String, tch::Tensor)>,
}

/// Where a run starts: the checkpoint it resumes (if any) and the counters saved with it.
struct ResumePoint {
    /// The newest resumable checkpoint's step and directory.
    from: Option<(u64, PathBuf)>,
    /// Its directory, training state and optimizer tensors, for the model thread.
    restore: Option<Restore>,
    start_step: u64,
    consumed: BatchSeq,
    rejected: u64,
}

/// Creates `--save-path`, clears partial checkpoints, opens the batch spool and finds where
/// the run resumes; without `--resume`, an earlier run's spool is discarded.
fn open_save_path(cfg: &LearnerConfig) -> Result<(Spool, ResumePoint), LearnerError> {
    let save = &cfg.save_path;
    std::fs::create_dir_all(save).map_err(|source| LearnerError::Io {
        context: format!("creating {}", save.display()),
        source,
    })?;
    remove_partial_checkpoints(save)?;
    let spool = Spool::open(save.join("spool"))?;
    let prefix = if cfg.lora.is_some() {
        crate::checkpoint::hf::ADAPTER_STEP_PREFIX
    } else {
        crate::checkpoint::hf::STEP_PREFIX
    };
    let from = if cfg.resume {
        crate::checkpoint::state::latest_resumable_with(save, prefix)?
    } else {
        None
    };
    let restore = match &from {
        Some((_, dir)) => {
            let (state, optimizer) = TrainingState::read(dir)?;
            Some(Restore {
                dir: dir.clone(),
                state,
                optimizer,
            })
        }
        None => {
            if cfg.resume {
                tracing::info!(save_path = %save.display(), "--resume: no checkpoint with training state yet; starting fresh");
            }
            let stale = spool.list()?;
            if let Some(last) = stale.last() {
                tracing::warn!(
                    batches = stale.len(),
                    "discarding the spool of an earlier run (use --resume to train on it)"
                );
                spool.release_through(*last)?;
            }
            None
        }
    };
    let (start_step, consumed, rejected) = restore.as_ref().map_or((0, BatchSeq(0), 0), |r| {
        let s = &r.state;
        (s.step, s.batches_consumed, s.rejected_groups)
    });
    let point = ResumePoint {
        from,
        restore,
        start_step,
        consumed,
        rejected,
    };
    Ok((spool, point))
}

/// Builds (or restores) the trainer on its own thread; returns it and the steps it has done.
async fn start_model(
    cfg: &LearnerConfig,
    spec: &ModelSpec,
    device: tch::Device,
    restore: Option<Restore>,
    homes: Option<std::sync::mpsc::Receiver<crate::train::Home>>,
) -> Result<(ModelWorker, u64), LearnerError> {
    let tcfg = trainer_config(cfg, device, spec);
    let layers = cfg.train_layer_indices.clone();
    let seed = cfg.seed;
    let init_spec = spec.clone();
    let (model_name, lora) = (cfg.model_name.clone(), cfg.lora.clone());
    let data_parallel = cfg.data_parallel.clone();
    let started = ModelWorker::start(move || {
        tch::manual_seed(seed as i64);
        let resumed_dir = restore.as_ref().map(|r| r.dir.clone());
        let mut trainer = build_trainer(
            &init_spec,
            &model_name,
            resumed_dir.as_deref(),
            lora,
            layers.as_ref(),
            (tcfg, seed as i64),
        )?;
        if let Some(Restore { state, optimizer, .. }) = restore {
            trainer.restore(optimizer, state.optimizer_steps, state.step, state.skipped_steps)?;
        }
        if let Some(dp) = &data_parallel {
            super::learner_rank::join(&mut trainer, dp, device)?;
        }
        if let Some(rx) = homes {
            trainer.set_homes(rx);
        }
        tracing::info!(params = trainer.param_count(), trainable = trainer.trainable_names().len(),
            step = trainer.steps_done(), device = ?device, "model ready");
        Ok(trainer)
    })
    .await?;
    Ok(started)
}

/// What the learner registers with the Atropos API.
fn registration(cfg: &LearnerConfig, steps_done: u64) -> Registration {
    let save = &cfg.save_path;
    Registration {
        wandb_group: cfg.wandb_group.clone(),
        wandb_project: cfg.wandb_project.clone(),
        batch_size: cfg.api_batch_size(),
        max_token_len: cfg.seq_len,
        checkpoint_dir: std::path::absolute(save)
            .unwrap_or_else(|_| save.clone())
            .display()
            .to_string(),
        save_checkpoint_interval: if cfg.checkpoint_interval == 0 {
            cfg.training_steps
        } else {
            cfg.checkpoint_interval
        },
        starting_step: steps_done,
        num_steps: cfg.training_steps,
    }
}

/// Binds `/metrics` and `/endpoints` (before registering: a port in use fails the start before
/// any batch is taken).
async fn serve_metrics(
    cfg: &LearnerConfig,
    stats: Arc<Mutex<SyncStats>>,
) -> Result<tokio::task::JoinHandle<()>, LearnerError> {
    let metrics_access = crate::telemetry::prom::Access {
        token: cfg
            .sync
            .auth_token
            .clone()
            .filter(|_| !cfg.metrics_listen.ip().is_loopback()),
    };
    let endpoints = super::endpoints::router(super::endpoints::EndpointsState {
        stats,
        token: Token(cfg.sync.auth_token.clone()),
        tls: cfg.sync.tls.clone(),
    });
    let (metrics_addr, metrics_server) =
        crate::telemetry::prom::serve_learner(cfg.metrics_listen, metrics_access, endpoints)
            .await
            .map_err(|source| LearnerError::Io {
                context: format!("binding --metrics-listen {}", cfg.metrics_listen),
                source,
            })?;
    tracing::info!(addr = %metrics_addr, "Prometheus /metrics and /endpoints listening");
    Ok(metrics_server)
}

/// The WeightBroadcaster, for sidecars given or registering over gRPC (none in shared mode).
async fn start_broadcaster(
    cfg: &LearnerConfig,
    slot: &LatestSlot,
    stats: &Arc<Mutex<SyncStats>>,
) -> Result<Option<ActorRef<BroadcasterMsg>>, LearnerError> {
    let wants_broadcaster =
        cfg.sync.mode != BridgeMode::Shared && (!cfg.sync.sidecars.is_empty() || cfg.grpc_listen.is_some());
    if !wants_broadcaster {
        return Ok(None);
    }
    let args = BroadcasterArgs {
        sidecars: cfg.sync.sidecars.clone(),
        token: Token(cfg.sync.auth_token.clone()),
        tls: cfg.sync.tls.clone(),
        deadlines: Deadlines {
            rpc: Duration::from_secs(cfg.sync.deadline_s),
            min_bytes_per_s: 20e6,
        },
        bucket_bytes: cfg.sync.bucket_bytes,
        nccl_bucket_bytes: cfg.sync.nccl_bucket_bytes,
        slot: slot.clone(),
        stats: stats.clone(),
        health_every: Duration::from_secs(1),
        forget_after: cfg.sync.forget_after,
    };
    let (b, _) = Actor::spawn(Some("weight_broadcaster".into()), WeightBroadcaster, args)
        .await
        .map_err(|e| LearnerError::Actors(e.to_string()))?;
    Ok(Some(b))
}

/// How the learner actor hands versions to the broadcaster, if there is one.
fn sync_hook(
    cfg: &LearnerConfig,
    broadcaster: Option<ActorRef<BroadcasterMsg>>,
    slot: &LatestSlot,
    stats: &Arc<Mutex<SyncStats>>,
) -> Option<SyncHook> {
    let broadcaster = broadcaster?;
    let nccl_gpu = nccl_device(cfg);
    if let Some(gpu) = nccl_gpu {
        tracing::info!(
            gpu,
            "full weights go to sidecars over NCCL (the gRPC stream for sidecars without it)"
        );
    }
    Some(SyncHook {
        mode: cfg.sync.mode,
        every: cfg.sync.every,
        slot: slot.clone(),
        broadcaster,
        stats: stats.clone(),
        nccl_gpu,
        nccl_bucket_bytes: cfg.sync.nccl_bucket_bytes,
        ipc: cfg.sync.transport == SyncTransport::Ipc,
    })
}

/// Sidecars start from the learner's weights: the current ones, or after `--resume` the
/// checkpoint the run resumed from where the mode reloads checkpoints.
async fn seed_sidecars(
    cfg: &LearnerConfig,
    worker: &ModelWorker,
    hook: &SyncHook,
    resumed: Option<&(u64, PathBuf)>,
    steps_done: u64,
) -> Result<(), LearnerError> {
    let actors = |e: &dyn std::fmt::Display| LearnerError::Actors(e.to_string());
    let resumed_path = resumed.map(|(_, dir)| std::path::absolute(dir).unwrap_or(dir.clone()).display().to_string());
    match (cfg.sync.mode, resumed_path) {
        (BridgeMode::Broadcast, _) => publish_weights(worker, hook).await.map_err(|e| actors(&e)),
        (BridgeMode::Lora, _) => publish_adapter(worker, hook).await.map_err(|e| actors(&e)),
        (BridgeMode::Checkpoint, Some(path)) => hook.put(steps_done, Payload::Checkpoint(path)).map_err(|e| actors(&e)),
        (BridgeMode::LoraRestart, Some(path)) => hook
            .put(steps_done, Payload::AdapterCheckpoint(path))
            .map_err(|e| actors(&e)),
        (BridgeMode::Checkpoint | BridgeMode::LoraRestart | BridgeMode::Shared, _) => Ok(()),
    }
}

/// `--engine-listen`: the embedded engine serving `/generate` on the learner's own weights.
async fn start_colocated(
    cfg: &LearnerConfig,
    worker: &ModelWorker,
    spec: &ModelSpec,
    device: tch::Device,
) -> Result<Option<tokio::task::JoinHandle<()>>, LearnerError> {
    let Some(addr) = cfg.sync.engine_listen else {
        return Ok(None);
    };
    let engine_err = |e: &dyn std::fmt::Display| LearnerError::Engine(e.to_string());
    let (params, shared) = worker.share().await.map_err(|e| engine_err(&e))?;
    let mut model =
        crate::engine::load::engine_model(&cfg.model_name, spec.clone(), params, device).map_err(|e| engine_err(&e))?;
    model.gate = Some(shared.gate);
    model.shared_version = Some(shared.version);
    let batch = BatchConfig {
        max_rows: 256,
        window: Duration::from_millis(5),
    };
    let engine = tokio::task::spawn_blocking(move || EngineHandle::start(model, batch))
        .await
        .map_err(|e| engine_err(&e))?
        .map_err(|e| engine_err(&e))?;
    // Off loopback (allowed only with a token) both /generate and /metrics need it.
    let guarded = cfg.sync.auth_token.clone().filter(|_| !addr.ip().is_loopback());
    let policy = engine_http::HttpPolicy {
        token: guarded.clone(),
        metrics_token: guarded,
        ..Default::default()
    };
    let (bound, task) = engine_http::serve(addr, std::sync::Arc::new(engine), policy)
        .await
        .map_err(|source| LearnerError::Io {
            context: format!("binding --engine-listen {addr}"),
            source,
        })?;
    tracing::info!(addr = %bound, "colocated engine serving /generate on the learner's own weights");
    Ok(Some(task))
}

/// What the node's actors start from.
struct NodeParts {
    worker: ModelWorker,
    steps_done: u64,
    resume: ResumePoint,
    metrics: MetricsFile,
    sync_hook: Option<SyncHook>,
    client: AtroposClient,
    registration: Registration,
    spool: Spool,
}

/// The node's shared handles: fetch credits, the drain flag, the status the gRPC service reads,
/// and where the outcome arrives.
struct NodeHandles {
    credits: Arc<Semaphore>,
    draining: Arc<AtomicBool>,
    status: Arc<Mutex<LearnerStatus>>,
    outcome: tokio::sync::mpsc::Sender<RunOutcome>,
}

/// Spawns the supervisor with the Checkpointer, Learner, Preprocessor and BatchFetcher under it.
async fn spawn_node(
    cfg: &Arc<LearnerConfig>,
    spec: &ModelSpec,
    parts: NodeParts,
    h: &NodeHandles,
) -> Result<(ActorRef<SupervisorMsg>, tokio::task::JoinHandle<()>), LearnerError> {
    let (consumed, rejected, steps_done) = (parts.resume.consumed, parts.resume.rejected, parts.steps_done);
    let spooled = parts.spool.list()?;
    let replay: Vec<BatchSeq> = spooled.iter().copied().filter(|s| *s > consumed).collect();
    let next_seq = BatchSeq(spooled.last().copied().unwrap_or(consumed).max(consumed).0 + 1);
    let limits = Limits {
        vocab_size: spec.vocab_size,
        seq_len: cfg.seq_len as usize,
        truncate_long: cfg.truncate_long,
        allow_missing_logprobs: cfg.allow_missing_logprobs,
    };
    let learner_args = {
        let (config, credits, draining, status, outcome) = (
            cfg.clone(),
            h.credits.clone(),
            h.draining.clone(),
            h.status.clone(),
            h.outcome.clone(),
        );
        move |checkpointer| LearnerArgs {
            config,
            worker: parts.worker,
            steps_done,
            batches_consumed: consumed,
            rejected_groups: rejected,
            credits,
            checkpointer,
            metrics: parts.metrics,
            draining,
            status,
            outcome,
            sync: parts.sync_hook,
        }
    };
    let fetcher_args = {
        let (credits, spool, reset_api) = (h.credits.clone(), parts.spool.clone(), cfg.reset_api);
        let max_backoff = Duration::from_millis(cfg.poll_max_ms);
        let (client, registration) = (parts.client, parts.registration);
        move |preprocessor| FetcherArgs {
            client,
            registration,
            reset_api,
            spool,
            replay,
            next_seq,
            credits,
            max_backoff,
            preprocessor,
        }
    };
    let args = SupervisorArgs {
        checkpointer: CheckpointerArgs {
            save_path: cfg.save_path.clone(),
            source_model: cfg.model_name.clone(),
            max_shard_bytes: cfg.max_shard_bytes,
            keep: cfg.keep_checkpoints,
            spool: parts.spool,
        },
        learner: Box::new(learner_args),
        preprocessor: (
            limits,
            cfg.batch_size as usize,
            cfg.micro_batch_tokens,
            cfg.shared_prompt,
        ),
        fetcher: Box::new(fetcher_args),
        draining: h.draining.clone(),
        outcome: h.outcome.clone(),
    };
    Actor::spawn(Some("learner_node".into()), LearnerSupervisor, args)
        .await
        .map_err(|e| LearnerError::Actors(e.to_string()))
}

/// `--grpc-listen`: the grpc.v1.Learner service (status, and sidecars registering).
async fn serve_status(
    cfg: &LearnerConfig,
    status: &Arc<Mutex<LearnerStatus>>,
    broadcaster: Option<ActorRef<BroadcasterMsg>>,
) -> Result<Option<tokio::task::JoinHandle<()>>, LearnerError> {
    let Some(addr) = cfg.grpc_listen else {
        return Ok(None);
    };
    let service = LearnerService {
        allow: SidecarAllow::new(&cfg.sync.sidecars, &cfg.sync.sidecar_allow),
        status: status.clone(),
        training_steps: cfg.training_steps,
        broadcaster,
    };
    let token = Token(cfg.sync.auth_token.clone());
    let (bound, task) = serve(addr, service, token, &cfg.sync.tls)
        .await
        .map_err(|source| LearnerError::Io {
            context: format!("binding --grpc-listen {addr}"),
            source,
        })?;
    tracing::info!(addr = %bound, "grpc.v1.Learner service listening");
    Ok(Some(task))
}

/// Runs a learner until it completes, fails, or `shutdown` resolves (then drains and saves).
pub async fn run(cfg: LearnerConfig, shutdown: impl Future<Output = ()>) -> Result<RunOutcome, LearnerError> {
    if cfg.data_parallel.as_ref().is_some_and(|dp| dp.rank > 0) {
        return super::learner_rank::run(cfg, shutdown).await;
    }
    let cfg = Arc::new(cfg);
    let spec = ModelSpec::from_dir(&cfg.model_name)?;
    let device = cfg.device.to_tch().map_err(LearnerError::Device)?;
    let (spool, mut resume) = open_save_path(&cfg)?;
    if resume.start_step >= cfg.training_steps {
        tracing::info!(step = resume.start_step, "the run in --save-path is already complete");
        return Ok(RunOutcome::Completed {
            steps: resume.start_step,
        });
    }
    // Shared mode with a vLLM sidecar: the trainer adopts vLLM's memory as it is offered.
    let shared_vllm = cfg.sync.mode == BridgeMode::Shared && cfg.sync.engine_listen.is_none();
    let (homes_tx, homes_rx) = std::sync::mpsc::channel();
    let restore = resume.restore.take();
    let (worker, steps_done) = start_model(&cfg, &spec, device, restore, shared_vllm.then_some(homes_rx)).await?;
    if resume.from.is_some() {
        tracing::info!(step = steps_done, batch_seq = resume.consumed.0, "resumed");
    }
    let metrics = MetricsFile::open(&cfg.save_path, steps_done).map_err(|source| LearnerError::Io {
        context: "metrics.jsonl".into(),
        source,
    })?;
    let client = AtroposClient::new(&cfg.atropos_url, Duration::from_secs(cfg.api_timeout_s))?;
    let registration = registration(&cfg, steps_done);
    let stats = Arc::new(Mutex::new(SyncStats::default()));
    let metrics_server = serve_metrics(&cfg, stats.clone()).await?;
    tokio::pin!(shutdown);
    let uuid = tokio::select! {
        registered = client.register_when_up(&registration, cfg.reset_api) => registered?,
        _ = &mut shutdown => return Ok(RunOutcome::Interrupted { steps: steps_done }),
    };
    crate::telemetry::prom::learner().api_registrations.inc();
    tracing::info!(uuid = %uuid.0, batch_size = registration.batch_size, url = %client.base(), "registered with the Atropos API");

    // Weight sync: a broadcaster for sidecars (given, or registering over gRPC), or the
    // colocated engine on the learner's own tensors.
    let slot: LatestSlot = Arc::new(Mutex::new(None));
    let broadcaster = start_broadcaster(&cfg, &slot, &stats).await?;
    let sync_hook = sync_hook(&cfg, broadcaster.clone(), &slot, &stats);
    if let Some(hook) = &sync_hook {
        seed_sidecars(&cfg, &worker, hook, resume.from.as_ref(), steps_done).await?;
    }
    let colocated = start_colocated(&cfg, &worker, &spec, device).await?;
    let (outcome_tx, mut outcome_rx) = tokio::sync::mpsc::channel(4);
    let handles = NodeHandles {
        credits: Arc::new(Semaphore::new(cfg.prefetch)),
        draining: Arc::new(AtomicBool::new(false)),
        status: Arc::new(Mutex::new(LearnerStatus {
            step: steps_done,
            rejected_groups: resume.rejected,
            last: None,
        })),
        outcome: outcome_tx,
    };
    if shared_vllm {
        start_shared_vllm(&cfg, &spec, device, homes_tx, handles.outcome.clone())?;
    }
    let parts = NodeParts {
        worker,
        steps_done,
        resume,
        metrics,
        sync_hook,
        client,
        registration,
        spool,
    };
    let (supervisor, handle) = spawn_node(&cfg, &spec, parts, &handles).await?;
    let status_server = serve_status(&cfg, &handles.status, broadcaster.clone()).await?;

    let outcome = tokio::select! {
        o = outcome_rx.recv() => o.unwrap_or_else(|| RunOutcome::Failed("the node stopped without an outcome".into())),
        _ = &mut shutdown => {
            tracing::info!("signal received: finishing the current step and saving");
            RunOutcome::Interrupted { steps: 0 }
        }
    };
    if !matches!(outcome, RunOutcome::Failed(_)) {
        let _ = ractor::call!(supervisor, SupervisorMsg::Shutdown);
    }
    let _ = handle.await;
    for task in [status_server, Some(metrics_server), colocated].into_iter().flatten() {
        task.abort();
    }
    if let Some(b) = broadcaster {
        // Let the last version reach the sidecars before the node exits (bounded).
        let flush = ractor::call_t!(b, BroadcasterMsg::Flush, 120_000);
        if let Err(e) = flush {
            tracing::warn!(error = %e, "the final weight publication did not finish");
        }
        b.stop(None);
    }
    Ok(match outcome {
        RunOutcome::Interrupted { .. } => RunOutcome::Interrupted {
            steps: handles.status.lock().map(|s| s.step).unwrap_or(0),
        },
        other => other,
    })
}

/// Shared mode with a vLLM sidecar: maps vLLM's parameters and offers them to the trainer, again
/// after every vLLM restart (see [`crate::sync::shared_vllm`]).
#[cfg(feature = "cuda")]
fn start_shared_vllm(
    cfg: &LearnerConfig,
    spec: &crate::model::ModelSpec,
    device: tch::Device,
    homes: std::sync::mpsc::Sender<crate::train::Home>,
    outcome: tokio::sync::mpsc::Sender<RunOutcome>,
) -> Result<(), LearnerError> {
    let tch::Device::Cuda(gpu) = device else {
        return Err(LearnerError::Engine(
            "shared mode with vLLM needs --device cuda:N".into(),
        ));
    };
    let url = cfg
        .sync
        .sidecars
        .first()
        .ok_or_else(|| LearnerError::Engine("shared mode with vLLM needs its --sidecar".into()))?;
    let deadlines = Deadlines {
        rpc: Duration::from_secs(cfg.sync.deadline_s.max(30)),
        min_bytes_per_s: 20e6,
    };
    let token = Token(cfg.sync.auth_token.clone());
    let client = crate::sync::client::SidecarClient::with_tls(url, token, deadlines, &cfg.sync.tls)
        .map_err(|e| LearnerError::Engine(e.to_string()))?;
    tracing::info!(sidecar = %url, gpu, "shared mode: the compute weights will live in vLLM's memory");
    let spec = spec.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::sync::shared_vllm::attach_loop(client, spec, gpu, homes).await {
            tracing::error!(error = %e, "vLLM's weights cannot be shared; stopping the run");
            let _ = outcome.send(RunOutcome::Failed(format!("shared mode: {e}"))).await;
        }
    });
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn start_shared_vllm(
    _cfg: &LearnerConfig,
    _spec: &crate::model::ModelSpec,
    _device: tch::Device,
    _homes: std::sync::mpsc::Sender<crate::train::Home>,
    _outcome: tokio::sync::mpsc::Sender<RunOutcome>,
) -> Result<(), LearnerError> {
    Err(LearnerError::Engine(
        "shared mode with a vLLM sidecar needs a build with --features cuda".into(),
    ))
}
