//! Learner: feeds prepared batches to the model thread one step at a time, records metrics,
//! returns fetch credits, and asks for checkpoints on schedule, at the end, and on drain.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;

use crate::checkpoint::{BatchSeq, CheckpointKind, TrainingState};
use crate::config::LearnerConfig;
use crate::telemetry::metrics::{human_line, MetricsFile, StepRecord};

use super::messages::{CheckpointJob, CheckpointerMsg, LearnerMsg, PreparedBatch, RunOutcome};
use super::model_worker::ModelWorker;
use super::weight_broadcaster::{put_latest, BroadcasterMsg, LatestSlot, Payload, PublishJob, SyncStats};
use crate::config::BridgeMode;
use crate::engine::PolicyVersion;
use crate::lock::recover;
use crate::sync::service::MAX_ADAPTER_BYTES;
use crate::sync::WeightSet;

/// Why no adapter version could be made for the sidecars.
#[derive(Debug, thiserror::Error)]
pub enum AdapterRequestError {
    #[error("lora mode needs a LoRA trainer")]
    NotLora,
    #[error(transparent)]
    Bytes(#[from] crate::model::ModelError),
    #[error("the adapter is {} MiB in fp32, over the {} GiB a sidecar takes: lower --lora-r or target fewer modules", .0 >> 20, MAX_ADAPTER_BYTES >> 30)]
    TooLarge(u64),
}

/// How the learner hands new versions to the WeightBroadcaster.
pub struct SyncHook {
    pub mode: BridgeMode,
    /// Publish after every this many steps.
    pub every: u64,
    pub slot: LatestSlot,
    pub broadcaster: ActorRef<BroadcasterMsg>,
    pub stats: Arc<Mutex<SyncStats>>,
    /// The learner's CUDA device when full weights go over NCCL.
    pub nccl_gpu: Option<usize>,
    /// NCCL bucket size (`--sync-bucket-mb`).
    pub nccl_bucket_bytes: u64,
    /// CUDA IPC is on: each version carries the learner's canary logprobs, and lent weights
    /// stay lent for the IPC deadline.
    pub ipc: bool,
}

/// Tokens of the canary the learner sends along with a CUDA IPC or LoRA adapter version.
const IPC_CANARY_TOKENS: usize = 16;

/// The learner's logprobs of the canary tokens on its current weights, recorded in `weights`
/// (a failure only costs the canary).
#[cfg(feature = "cuda")]
fn canary_into(t: &crate::train::Trainer, gpu: usize, weights: &crate::sync::nccl_publish::PackedWeights) {
    let ids = crate::engine::vllm::canary_ids(t.model().spec().vocab_size, IPC_CANARY_TOKENS);
    match crate::engine::vllm::model_logprobs(t.model(), &ids, tch::Device::Cuda(gpu)) {
        Ok(lps) => weights.set_canary(ids, lps),
        Err(e) => tracing::warn!(error = %e, "the learner's canary logprobs failed; this version goes without"),
    }
}

/// Puts the current weights in the slot and tells the broadcaster (broadcast mode): packed on
/// the GPU in NCCL's buckets (the compute weights: the fp32 masters, or their bf16 halves), or
/// the gRPC stream's packing of the fp32 masters.
pub async fn publish_weights(worker: &ModelWorker, hook: &SyncHook) -> Result<(), ActorProcessingErr> {
    match hook.nccl_gpu {
        #[cfg(feature = "cuda")]
        Some(gpu) => {
            // Split masters keep the bf16 weights in one flat buffer that already is the wire
            // layout: it is lent to the broadcaster (no copy) and the next optimizer update
            // waits until the sends are done. Otherwise the model thread allocates a packed
            // buffer, hands it over, then queues the packing copies; the broadcaster sends
            // each bucket as soon as it is packed.
            let bucket_bytes = hook.nccl_bucket_bytes;
            let ipc = hook.ipc;
            let (handed_tx, handed_rx) = tokio::sync::oneshot::channel();
            let packing = worker.with_trainer(move |t| {
                use crate::sync::nccl_publish::PackedWeights;
                let weights: Vec<(String, tch::Tensor)> = t
                    .compute_params()
                    .iter()
                    .map(|(n, w)| (n.clone(), w.shallow_clone()))
                    .collect();
                if let Some(flat) = t.flat_compute() {
                    let bytes = (flat.numel() * flat.kind().elt_size_in_bytes()) as u64;
                    let mut limit = crate::comm::nccl::deadline_for(bytes, std::time::Duration::from_secs(20));
                    if ipc {
                        // vLLM may copy straight out of these weights until the IPC deadline.
                        use crate::sync::ipc_publish::{IPC_DEADLINE, IPC_LEASE_MARGIN};
                        limit = limit.max(IPC_DEADLINE + IPC_LEASE_MARGIN);
                    }
                    let lease = Arc::new(crate::train::lease::Lease::new(limit));
                    let lent = PackedWeights::lend(&weights, &flat, gpu, bucket_bytes, lease.clone())?;
                    if ipc {
                        canary_into(t, gpu, &lent);
                    }
                    t.lend(lease);
                    let _ = handed_tx.send((t.steps_done(), Arc::new(lent)));
                    return Ok(());
                }
                let packed = Arc::new(PackedWeights::new(&weights, gpu, bucket_bytes));
                if ipc {
                    canary_into(t, gpu, &packed);
                }
                let _ = handed_tx.send((t.steps_done(), packed.clone()));
                let values: Vec<tch::Tensor> = weights.into_iter().map(|(_, w)| w).collect();
                packed.pack_from(&values)
            });
            tokio::pin!(packing);
            let handed = tokio::select! {
                biased;
                handed = handed_rx => handed.ok(),
                // The model thread returned before handing a buffer over: that failed.
                done = &mut packing => {
                    not_published(Ok::<_, std::convert::Infallible>(done?));
                    return Ok(());
                }
            };
            let Some((step, packed)) = handed else {
                // Training goes on and the sidecars keep their version until the next
                // publication (a dead model thread fails the next step anyway).
                not_published(packing.await);
                return Ok(());
            };
            hook.put(step, Payload::Device(packed))?;
            if let Err(e) = packing.await? {
                // The sender sees the failure too and fails this version's publication.
                tracing::error!(error = %e, "packing the weights for NCCL failed");
            }
            Ok(())
        }
        _ => {
            let (step, weights) = worker.weights().await?;
            match tokio::task::spawn_blocking(move || WeightSet::pack(&weights)).await? {
                Ok(set) => hook.put(step, Payload::Weights(Arc::new(set))),
                Err(e) => {
                    // Nothing is sent: the sidecars keep the version they have until the next
                    // publication packs cleanly.
                    tracing::error!(step, error = %e, "packing the weights failed; this version is not published");
                    Ok(())
                }
            }
        }
    }
}

/// Puts the current LoRA adapter in the slot and tells the broadcaster (lora mode): PEFT's
/// two files as bytes, with the learner's canary logprobs under it.
pub async fn publish_adapter(worker: &ModelWorker, hook: &SyncHook) -> Result<(), ActorProcessingErr> {
    let made = worker.with_trainer(adapter_request).await?;
    match made {
        Ok((step, req)) => hook.put(step, Payload::Adapter(Arc::new(req))),
        Err(e) => {
            tracing::error!(error = %e, "packing the adapter failed; this version is not published");
            Ok(())
        }
    }
}

/// The adapter version a LoRA trainer stands at (on the model thread).
fn adapter_request(
    t: &crate::train::Trainer,
) -> Result<(u64, crate::rpc::pb::InstallAdapterRequest), AdapterRequestError> {
    let (Some(lora), Some(tensors)) = (t.lora(), t.adapter_snapshot()) else {
        return Err(AdapterRequestError::NotLora);
    };
    let config = lora.peft_config("base").to_string();
    let bytes = crate::model::safetensors_io::to_file_bytes(&tensors)?;
    if bytes.len() as u64 > MAX_ADAPTER_BYTES {
        return Err(AdapterRequestError::TooLarge(bytes.len() as u64));
    }
    let ids = crate::engine::vllm::canary_ids(t.model().spec().vocab_size, IPC_CANARY_TOKENS);
    let (canary_ids, canary_logprobs) = match crate::engine::vllm::model_logprobs(t.model(), &ids, t.device()) {
        Ok(lps) => (ids, lps),
        Err(e) => {
            tracing::warn!(error = %e, "the learner's canary logprobs failed; this version goes without");
            (Vec::new(), Vec::new())
        }
    };
    let req = crate::rpc::pb::InstallAdapterRequest {
        version: None,
        adapter_config: config,
        adapter_safetensors: bytes,
        canary_ids,
        canary_logprobs,
        adapter_bytes: 0,
    };
    Ok((t.steps_done(), req))
}

impl SyncHook {
    /// Makes `payload` the newest version to publish and wakes the broadcaster: the one way
    /// a version reaches it (every mode, and the first publication at start).
    pub fn put(&self, step: u64, payload: Payload) -> Result<(), ActorProcessingErr> {
        let job = PublishJob {
            version: PolicyVersion(step),
            payload,
        };
        put_latest(&self.slot, job);
        self.broadcaster.cast(BroadcasterMsg::Publish)?;
        Ok(())
    }
}

/// Logs why a version was not handed to the broadcaster for NCCL.
#[cfg(feature = "cuda")]
fn not_published<E: std::fmt::Display, F: std::fmt::Display>(outcome: Result<Result<(), E>, F>) {
    let why = match outcome {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => "no buffer handed over".to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(error = %why, "packing the weights for NCCL failed; this version is not published");
}

pub struct Learner;

/// What other parts of the node may read about the run (gRPC status).
#[derive(Debug, Clone, Default)]
pub struct LearnerStatus {
    pub step: u64,
    pub rejected_groups: u64,
    pub last: Option<StepRecord>,
}

/// Start-up arguments.
pub struct LearnerArgs {
    pub config: Arc<LearnerConfig>,
    pub worker: ModelWorker,
    pub steps_done: u64,
    pub batches_consumed: BatchSeq,
    pub rejected_groups: u64,
    pub credits: Arc<Semaphore>,
    pub checkpointer: ActorRef<CheckpointerMsg>,
    pub metrics: MetricsFile,
    pub draining: Arc<AtomicBool>,
    pub status: Arc<Mutex<LearnerStatus>>,
    pub outcome: tokio::sync::mpsc::Sender<RunOutcome>,
    /// Weight sync to sidecars, when the run has any (shared mode needs none).
    pub sync: Option<SyncHook>,
}

pub struct LearnerState {
    args: LearnerArgs,
    /// Rejections since the last step, reported on the next step's record.
    pending_rejections: BTreeMap<&'static str, u64>,
    steps_done: u64,
    last_checkpoint: u64,
    last_step_end: Instant,
}

impl LearnerState {
    fn training_state(&self) -> TrainingState {
        let c = &self.args.config;
        TrainingState {
            format_version: crate::checkpoint::state::FORMAT_VERSION,
            step: self.steps_done,
            optimizer_steps: 0,
            batches_consumed: self.args.batches_consumed,
            rejected_groups: self.args.rejected_groups,
            skipped_steps: 0,
            seed: c.seed,
            lr: c.lr,
            warmup_steps: c.warmup_steps,
            training_steps: c.training_steps,
        }
    }

    /// Snapshots the model and sends checkpoint jobs; with `wait`, returns after they are on disk.
    async fn checkpoint(&mut self, kinds: &[CheckpointKind], wait: bool) -> Result<(), ActorProcessingErr> {
        let c = &self.args.config;
        let snap = self
            .args
            .worker
            .snapshot(c.lora.is_none() || c.merge_lora_on_save)
            .await?;
        let mut state = self.training_state();
        state.optimizer_steps = snap.optimizer_steps;
        state.skipped_steps = snap.skipped_steps;
        let shallow = |v: &[(String, tch::Tensor)]| v.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        for &kind in kinds {
            let job = CheckpointJob {
                kind,
                weights: shallow(&snap.weights),
                adapter: snap.adapter.as_ref().map(|(l, t)| (l.clone(), shallow(t))),
                optimizer: shallow(&snap.optimizer),
                state: state.clone(),
            };
            if wait {
                let written = ractor::call!(self.args.checkpointer, |reply| CheckpointerMsg::Save(
                    Box::new(job),
                    Some(reply)
                ))?;
                written.map_err(ActorProcessingErr::from)?;
            } else {
                self.args
                    .checkpointer
                    .cast(CheckpointerMsg::Save(Box::new(job), None))?;
            }
        }
        self.last_checkpoint = self.steps_done;
        Ok(())
    }

    /// Publishes the new version if one is due.
    async fn sync(&mut self) -> Result<(), ActorProcessingErr> {
        let Some((mode, every)) = self.args.sync.as_ref().map(|h| (h.mode, h.every)) else {
            return Ok(());
        };
        let step = self.steps_done;
        match mode {
            BridgeMode::Broadcast if step.is_multiple_of(every) => match &self.args.sync {
                Some(hook) => publish_weights(&self.args.worker, hook).await,
                None => Ok(()),
            },
            BridgeMode::Checkpoint if step.is_multiple_of(self.args.config.sync.restart_interval) => {
                self.checkpoint_only(CheckpointKind::Sync(step)).await?;
                let path = self.args.config.save_path.join(CheckpointKind::Sync(step).dir_name());
                let path = std::path::absolute(&path).unwrap_or(path).display().to_string();
                match &self.args.sync {
                    Some(hook) => hook.put(step, Payload::Checkpoint(path)),
                    None => Ok(()),
                }
            }
            BridgeMode::Lora if step.is_multiple_of(every) => match &self.args.sync {
                Some(hook) => publish_adapter(&self.args.worker, hook).await,
                None => Ok(()),
            },
            BridgeMode::LoraRestart if step.is_multiple_of(self.args.config.sync.restart_interval) => {
                self.checkpoint_only(CheckpointKind::Sync(step)).await?;
                let path = self
                    .args
                    .config
                    .save_path
                    .join(CheckpointKind::Sync(step).adapter_dir_name());
                let path = std::path::absolute(&path).unwrap_or(path).display().to_string();
                match &self.args.sync {
                    Some(hook) => hook.put(step, Payload::AdapterCheckpoint(path)),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Writes one checkpoint of the current weights (LoRA: the adapter) and waits for it.
    async fn checkpoint_only(&mut self, kind: CheckpointKind) -> Result<(), ActorProcessingErr> {
        let (step, weights, adapter) = if self.args.config.lora.is_some() {
            let snap = self.args.worker.snapshot(false).await?;
            (snap.steps_done, snap.weights, snap.adapter)
        } else {
            let (step, weights) = self.args.worker.weights().await?;
            (step, weights, None)
        };
        let mut state = self.training_state();
        state.step = step;
        let job = CheckpointJob {
            kind,
            weights,
            adapter,
            optimizer: Vec::new(),
            state,
        };
        let written = ractor::call!(self.args.checkpointer, |reply| CheckpointerMsg::Save(
            Box::new(job),
            Some(reply)
        ))?;
        written.map_err(ActorProcessingErr::from)?;
        Ok(())
    }

    async fn train(&mut self, prepared: PreparedBatch) -> Result<(), ActorProcessingErr> {
        for r in &prepared.rejections {
            *self.pending_rejections.entry(r.reason.as_str()).or_default() += 1;
        }
        let rejected = prepared.rejections.len() as u64;
        self.args.rejected_groups += rejected;
        let Some(batch) = prepared.batch else {
            tracing::warn!(
                batch_seq = prepared.seq.0,
                rejected,
                "every group of the batch was rejected; no optimizer step"
            );
            self.args.batches_consumed = prepared.seq;
            self.args.credits.add_permits(1);
            return Ok(());
        };
        let reward_mean = if batch.sequences > 0 {
            batch.score_sum / batch.sequences as f64
        } else {
            0.0
        };
        let metrics = self.args.worker.train(batch).await??;
        self.steps_done = metrics.step;
        self.args.batches_consumed = prepared.seq;
        self.args.credits.add_permits(1);
        let now = Instant::now();
        let by_reason = std::mem::take(&mut self.pending_rejections);
        let stats = self.args.sync.as_ref().map(|h| recover(&h.stats).clone());
        let stats = stats.or_else(|| metrics.shared.map(shared_stats));
        let record = StepRecord {
            reward_mean,
            engine_version: stats.as_ref().and_then(|s| s.engine_version),
            sync_time_s: stats
                .as_ref()
                .filter(|s| s.engine_version.is_some())
                .map(|s| s.sync_time_s),
            sync_bytes: stats
                .as_ref()
                .filter(|s| s.engine_version.is_some())
                .map(|s| s.sync_bytes),
            sidecars_synced: stats.as_ref().map(|s| s.synced_sidecars as u64),
            sidecars_stale: stats.as_ref().map(|s| s.stale_sidecars as u64),
            sync_canary_max_abs_diff: stats.as_ref().and_then(|s| s.canary_max_abs_diff),
            train: metrics,
            rejected_groups: by_reason.values().sum(),
            rejected_by_reason: by_reason,
            step_time_s: now.duration_since(self.last_step_end).as_secs_f64(),
            wait_time_s: prepared.wait_time_s,
            batch_seq: prepared.seq.0,
        };
        self.last_step_end = now;
        // The status is updated before the record reaches metrics.jsonl, so anyone who has seen
        // the step in the file also sees it over gRPC.
        {
            let mut status = recover(&self.args.status);
            status.step = self.steps_done;
            status.rejected_groups = self.args.rejected_groups;
            status.last = Some(record.clone());
        }
        self.args.metrics.append(&record)?;
        let prom = crate::telemetry::prom::learner();
        prom.observe_step(&record);
        let waiting = self
            .args
            .config
            .prefetch
            .saturating_sub(self.args.credits.available_permits());
        prom.queue("batches", waiting);
        eprintln!("{}", human_line(&record, self.args.config.training_steps));
        self.sync().await?;
        let total = self.args.config.training_steps;
        let interval = self.args.config.checkpoint_interval;
        if self.steps_done >= total {
            self.checkpoint(&[CheckpointKind::Step(self.steps_done), CheckpointKind::Final], true)
                .await?;
            let _ = self
                .args
                .outcome
                .send(RunOutcome::Completed { steps: self.steps_done })
                .await;
        } else if interval > 0 && self.steps_done.is_multiple_of(interval) {
            self.checkpoint(&[CheckpointKind::Step(self.steps_done)], false).await?;
        }
        Ok(())
    }
}

impl Actor for Learner {
    type Msg = LearnerMsg;
    type State = LearnerState;
    type Arguments = LearnerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<LearnerMsg>,
        args: LearnerArgs,
    ) -> Result<LearnerState, ActorProcessingErr> {
        Ok(LearnerState {
            pending_rejections: BTreeMap::new(),
            steps_done: args.steps_done,
            last_checkpoint: args.steps_done,
            last_step_end: Instant::now(),
            args,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<LearnerMsg>,
        msg: LearnerMsg,
        state: &mut LearnerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LearnerMsg::Train(prepared) => {
                // While draining, or once done, batches stay in the spool for the next run.
                if state.args.draining.load(Ordering::SeqCst) || state.steps_done >= state.args.config.training_steps {
                    return Ok(());
                }
                state.train(prepared).await
            }
            LearnerMsg::Drain(reply) => {
                if state.steps_done > state.last_checkpoint && state.steps_done < state.args.config.training_steps {
                    tracing::info!(step = state.steps_done, "saving a checkpoint before exit");
                    state
                        .checkpoint(&[CheckpointKind::Step(state.steps_done)], true)
                        .await?;
                }
                let _ = reply.send(());
                Ok(())
            }
        }
    }
}

/// Shared mode with vLLM: a step's fenced write, reported as its weight sync (no bytes move).
fn shared_stats(w: crate::train::SharedWrite) -> crate::actors::weight_broadcaster::SyncStats {
    crate::actors::weight_broadcaster::SyncStats {
        engine_version: Some(w.version),
        sync_time_s: w.seconds,
        sync_bytes: 0,
        stale_sidecars: 0,
        synced_sidecars: 1,
        canary_max_abs_diff: w.canary_max_abs_diff,
        sidecars: Default::default(),
    }
}
