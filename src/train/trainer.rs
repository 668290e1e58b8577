//! One optimizer step over a [`TrainBatch`]: forward and backward per micro-batch (gradients
//! accumulate), global grad-norm clipping, AdamW at the scheduled learning rate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::grpo::loss::{LossStats, MicroTensors, StepNorm};
use crate::grpo::{LossConfig, TrainBatch};
use crate::model::lora::LoraSpec;
use crate::model::params::layer_of;
use crate::model::{ModelError, ModelSpec, ParamStore, Transformer};
use crate::train::lease::{Lease, LeaseEnd};

use super::adamw::{AdamWConfig, MasterParam, SLICE_ELEMENTS};
use super::data_parallel::{plan_buckets, Bucket, DataParallel, DpError, GradReduction, Op, ReduceReport};
use super::layers::LayerSet;
use super::optimizer::{Optimizer, OptimizerError};
use super::schedule::LrSchedule;
use super::split;
use super::step::{forward_backward_reporting, StepPlan};

mod home;
pub use home::{FenceError, Home, SharedWrite, WriteFence, HOME_POLL};

/// A floating-point dtype choice: what matmuls and attention run in (`--precision`), or what
/// AdamW's first moment is stored in (`--exp-avg-dtype`). Master weights, the second moment,
/// logprobs and ratios stay fp32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    Fp32,
    Bf16,
}

impl Precision {
    /// The compute dtype.
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

/// How the step computes, as opposed to what it computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ComputeConfig {
    pub precision: Precision,
    /// Recompute each layer in the backward instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// With checkpointing, this many of the last decoder layers keep their activations instead.
    pub keep_layers: usize,
    /// Positions per chunk of the LM head and logprob computation.
    pub logprob_chunk_tokens: i64,
    /// libtorch's fused AdamW kernel instead of a per-tensor loop.
    pub fused_adamw: bool,
    /// dtype of AdamW's first moment.
    pub exp_avg: Precision,
}

impl ComputeConfig {
    /// How many decoder layers, from the first, a step recomputes in its backward.
    pub fn recompute_layers(&self, num_layers: usize) -> usize {
        if self.gradient_checkpointing {
            num_layers.saturating_sub(self.keep_layers)
        } else {
            0
        }
    }
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            precision: Precision::Fp32,
            gradient_checkpointing: false,
            keep_layers: 0,
            logprob_chunk_tokens: 1024,
            fused_adamw: true,
            exp_avg: Precision::Fp32,
        }
    }
}

/// Hyper-parameters of the step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    pub loss: LossConfig,
    pub schedule: LrSchedule,
    pub adamw: AdamWConfig,
    /// Which optimizer runs (Adafactor takes its weight decay from `adamw`).
    pub optimizer: super::optimizer::OptimizerKind,
    /// Gradients are rescaled so their global L2 norm is at most this.
    pub max_grad_norm: f64,
    pub device: Device,
    pub compute: ComputeConfig,
}

/// What one step measured. `grad_norm` is taken before clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepMetrics {
    /// 1-based number of this optimizer step.
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub mean_ratio: f64,
    /// Share of scored tokens whose objective was actually clipped.
    pub clipped_fraction: f64,
    pub logprob_diff_mean: f64,
    pub logprob_diff_abs_mean: f64,
    pub logprob_diff_max: f64,
    pub kl_mean: f64,
    /// Mean policy logprob of scored tokens with positive / negative advantage.
    pub pos_logp_mean: f64,
    pub neg_logp_mean: f64,
    pub tokens: u64,
    pub sequences: u64,
    pub micro_batches: u64,
    /// Positions computed, padding included.
    pub padded_tokens: u64,
    pub compute_time_s: f64,
    /// Seconds this step's optimizer update waited for a weight sync sending straight from the
    /// live weights (see [`crate::train::lease`]).
    pub sync_hold_s: f64,
    /// Why this step left the weights untouched (null when it trained).
    pub skip_reason: Option<SkipReason>,
    /// Steps skipped so far in the run, this one included.
    pub skipped_steps: u64,
    /// Data parallel: learner ranks of the step (1 without).
    pub ranks: u64,
    /// Data parallel: seconds the step waited for gradient all-reduces after its backward (the
    /// part not overlapped), and the bytes reduced.
    pub allreduce_wait_s: f64,
    pub allreduce_bytes: u64,
    /// CUDA: the caching allocator's live and reserved bytes on the learner's device at the end
    /// of the step (null on CPU).
    pub cuda_allocated_bytes: Option<u64>,
    pub cuda_reserved_bytes: Option<u64>,
    /// Shared mode with vLLM: the fenced write of this step (reported as the step's sync).
    #[serde(skip)]
    pub shared: Option<SharedWrite>,
}

/// Why an optimizer step was skipped: its batch is consumed and counted, the weights and the
/// optimizer state stay as they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    NonFiniteLoss,
    NonFiniteGradNorm,
}

impl SkipReason {
    /// The reason's name in `metrics.jsonl` and on `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NonFiniteLoss => "non_finite_loss",
            Self::NonFiniteGradNorm => "non_finite_grad_norm",
        }
    }

    /// The reason to skip a step with this loss and pre-clip gradient norm, if any.
    pub fn of(loss: f64, grad_norm: f64) -> Option<Self> {
        if !loss.is_finite() {
            Some(Self::NonFiniteLoss)
        } else if !grad_norm.is_finite() {
            Some(Self::NonFiniteGradNorm)
        } else {
            None
        }
    }
}

/// Errors building a trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("--train-layer-indices: {0}")]
    Layers(#[from] crate::train::layers::LayerError),
    #[error("optimizer state: {0}")]
    OptimizerState(#[source] OptimizerError),
    #[error("optimizer step: {0}")]
    Optimizer(#[source] OptimizerError),
    #[error(transparent)]
    Lora(#[from] crate::model::lora::LoraError),
    #[error("data parallel: {0}")]
    DataParallel(#[from] DpError),
    #[error("shared weights: {0}")]
    Home(String),
    #[error(transparent)]
    Backward(#[from] crate::torch_ext::ShimError),
}

/// Shared-weights mode: an engine reads the same tensors; the optimizer step write-holds `gate`
/// and then publishes the new step in `version`.
#[derive(Clone)]
pub struct SharedWeights {
    pub gate: Arc<RwLock<()>>,
    pub version: Arc<AtomicU64>,
}

/// The model, its optimizer and the step counter.
///
/// The master weights are fp32. With fp32 compute the model runs on them directly. With bf16
/// compute each master is held split (see [`split`]): the model runs on the bf16 high halves,
/// whose gradients accumulate over the step's micro-batches; at the step AdamW joins each
/// master from its halves a slice at a time, applies the clipped fp32 gradient and splits the
/// result back, so the compute weights are always the masters rounded to bf16.
pub struct Trainer {
    shared: Option<SharedWeights>,
    /// What the model computes with: the fp32 masters, or their bf16 high halves.
    params: ParamStore,
    /// The int16 low halves of every parameter, when the masters are split.
    low: Option<BTreeMap<String, Tensor>>,
    /// When the masters are split: the flat buffer the high halves are views of, in name order.
    flat_compute: Option<Tensor>,
    /// Leases on the live weights taken by syncs; the next optimizer step ends them first.
    lent: Mutex<Vec<Arc<Lease>>>,
    model: Transformer,
    /// LoRA training: the spec, and the same model with dropout off (evaluation, canaries).
    lora: Option<(LoraSpec, Transformer)>,
    trainable: Vec<MasterParam>,
    optimizer: Optimizer,
    config: TrainerConfig,
    steps_done: u64,
    skipped_steps: u64,
    /// `GRPO_PROFILE_STEP=1`: log stage times (synchronizes the device; slows steps down).
    profile: bool,
    /// The head's logprob gradient by hand (`GRPO_HEAD=autograd`: through autograd instead).
    manual_head: bool,
    /// Data parallel: the group, and the gradient buckets over `trainable`.
    dp: Option<(DataParallel, Vec<Bucket>)>,
    /// Shared mode with vLLM: the owner of the compute weights' memory (see [`home`]).
    fence: Option<Box<dyn WriteFence>>,
    /// Shared mode: where new homes for the compute weights arrive.
    homes: Option<std::sync::mpsc::Receiver<Home>>,
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

impl Trainer {
    /// Builds the trainer; with `layers`, only parameters inside those decoder layers train.
    /// `params` are the masters (converted to fp32 if they are not).
    pub fn new(
        spec: &ModelSpec,
        params: ParamStore,
        layers: Option<&LayerSet>,
        config: TrainerConfig,
    ) -> Result<Self, TrainError> {
        if let Some(set) = layers {
            set.check(spec.num_layers)?;
        }
        let selected = |name: &str| match layers {
            Some(set) => layer_of(name).is_some_and(|i| set.0.contains(&i)),
            None => true,
        };
        let split_masters = config.compute.precision == Precision::Bf16;
        let (params, low, flat_compute) = tch::no_grad(|| {
            let mut compute = BTreeMap::new();
            let mut low = BTreeMap::new();
            // Split halves live in two flat buffers, tensor after tensor in name order: the
            // high halves are then already packed for weight sync (one copy per bucket).
            let total: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
            let device = params.iter().next().map_or(config.device, |(_, t)| t.device());
            let flats = split_masters.then(|| {
                (
                    Tensor::empty([total], (Kind::BFloat16, device)),
                    Tensor::empty([total], (Kind::Int16, device)),
                )
            });
            let mut offset = 0i64;
            for (name, t) in params.iter() {
                let master = t.detach().to_kind(Kind::Float);
                match &flats {
                    Some((hi_flat, lo_flat)) => {
                        let n = master.numel() as i64;
                        let shape = master.size();
                        let hi = hi_flat.narrow(0, offset, n).view(shape.as_slice());
                        let lo = lo_flat.narrow(0, offset, n).view(shape.as_slice());
                        split::split_into(&master, &hi, &lo);
                        compute.insert(name.clone(), hi);
                        low.insert(name.clone(), lo);
                        offset += n;
                    }
                    None => {
                        compute.insert(name.clone(), master);
                    }
                }
            }
            let flat_compute = flats.map(|(hi, _)| hi);
            (
                ParamStore::from_tensors(compute),
                split_masters.then_some(low),
                flat_compute,
            )
        });
        let mut params = params;
        let names = params.set_trainable(selected);
        if names.is_empty() {
            return Err(crate::train::layers::LayerError::NoneTrainable.into());
        }
        let trainable: Vec<MasterParam> = names
            .into_iter()
            .filter_map(|name| {
                let value = params.get(&name)?;
                let low = low.as_ref().and_then(|l| l.get(&name)).map(Tensor::shallow_clone);
                Some(MasterParam { name, value, low })
            })
            .collect();
        let kind = config.compute.precision.kind();
        let model = Transformer::new(spec, &params)?.with_compute(kind);
        let exp_avg = config.compute.exp_avg.kind();
        Ok(Self::assemble(
            params,
            (low, flat_compute),
            model,
            None,
            trainable,
            exp_avg,
            config,
        ))
    }

    /// A LoRA trainer: the base is frozen and held once in the compute dtype (bf16 on CUDA,
    /// no fp32 masters, no optimizer state); only the adapter `tensors` (PEFT keys, fp32
    /// masters) train. `base` may live on the CPU: each tensor moves to the device already
    /// converted.
    pub fn with_lora(
        spec: &ModelSpec,
        base: ParamStore,
        lora: LoraSpec,
        tensors: Vec<(String, Tensor)>,
        config: TrainerConfig,
    ) -> Result<Self, TrainError> {
        lora.check(spec)?;
        crate::model::lora::check_tensors(&lora, spec, &tensors)?;
        let kind = config.compute.precision.kind();
        let device = config.device;
        let params = tch::no_grad(|| {
            let moved = base
                .iter()
                .map(|(n, t)| (n.clone(), t.detach().to_device_(device, kind, false, false)))
                .collect();
            ParamStore::from_tensors(moved)
        });
        drop(base);
        // With bf16 compute the adapter masters are split like the full model's: the model
        // computes with the bf16 high halves (no cast on every use), AdamW joins them.
        let split_masters = kind == Kind::BFloat16;
        let trainable: Vec<MasterParam> = tensors
            .into_iter()
            .map(|(name, t)| {
                let master = tch::no_grad(|| t.detach().to_device_(device, Kind::Float, false, true));
                let (value, low) = if split_masters {
                    let (hi, lo) = tch::no_grad(|| split::split(&master));
                    (hi, Some(lo))
                } else {
                    (master, None)
                };
                MasterParam {
                    name,
                    value: value.set_requires_grad(true),
                    low,
                }
            })
            .collect();
        let adapters: Vec<(String, Tensor)> = trainable
            .iter()
            .map(|p| (p.name.clone(), p.value.shallow_clone()))
            .collect();
        let model = Transformer::new(spec, &params)?
            .with_compute(kind)
            .with_lora(&lora, &adapters)?
            .with_training(true);
        let eval = model.eval_copy();
        // Adapters are small: their moments stay fp32.
        Ok(Self::assemble(
            params,
            (None, None),
            model,
            Some((lora, eval)),
            trainable,
            Kind::Float,
            config,
        ))
    }

    fn assemble(
        params: ParamStore,
        (low, flat_compute): (Option<BTreeMap<String, Tensor>>, Option<Tensor>),
        model: Transformer,
        lora: Option<(LoraSpec, Transformer)>,
        trainable: Vec<MasterParam>,
        exp_avg: Kind,
        config: TrainerConfig,
    ) -> Self {
        let optimizer = Optimizer::new(
            config.optimizer,
            config.adamw,
            &trainable,
            exp_avg,
            config.compute.fused_adamw,
        );
        Self {
            shared: None,
            params,
            low,
            flat_compute,
            lent: Mutex::new(Vec::new()),
            model,
            lora,
            trainable,
            optimizer,
            config,
            steps_done: 0,
            skipped_steps: 0,
            profile: std::env::var_os("GRPO_PROFILE_STEP").is_some_and(|v| v == "1"),
            manual_head: std::env::var_os("GRPO_HEAD").is_none_or(|v| v != "autograd"),
            dp: None,
            fence: None,
            homes: None,
        }
    }

    /// The device the model trains on.
    pub fn device(&self) -> Device {
        self.config.device
    }

    /// The LoRA spec, when this trainer trains an adapter.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.lora.as_ref().map(|(l, _)| l)
    }

    /// Number of trainable scalars (the adapter's, with LoRA).
    pub fn trainable_numel(&self) -> i64 {
        self.trainable.iter().map(|p| p.value.numel() as i64).sum()
    }

    /// Copies of the adapter tensors on the CPU (fp32, PEFT keys), when training LoRA.
    pub fn adapter_snapshot(&self) -> Option<Vec<(String, Tensor)>> {
        self.lora.as_ref()?;
        Some(tch::no_grad(|| {
            self.trainable
                .iter()
                .map(|p| {
                    let master = match &p.low {
                        Some(lo) => split::join(&p.value.detach(), lo),
                        None => p.value.detach().copy(),
                    };
                    (p.name.clone(), master.to_device(Device::Cpu))
                })
                .collect()
        }))
    }

    /// Optimizer steps completed (skipped ones included: each consumed its batch).
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Steps skipped for a non-finite loss or gradient norm.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// The model (for evaluation and parity checks; LoRA dropout off).
    pub fn model(&self) -> &Transformer {
        match &self.lora {
            Some((_, eval)) => eval,
            None => &self.model,
        }
    }

    /// What the model computes with: the fp32 masters, or their bf16 high halves.
    pub fn compute_params(&self) -> &ParamStore {
        &self.params
    }

    /// The flat buffer holding every compute weight back to back in name order (the bf16 high
    /// halves of split masters), when there is one.
    pub fn flat_compute(&self) -> Option<Tensor> {
        self.flat_compute.as_ref().map(Tensor::shallow_clone)
    }

    /// Lends the live weights to a sync that reads them without a copy: the next optimizer
    /// step waits until `lease` is given back (at most its limit) before changing them.
    pub fn lend(&self, lease: Arc<Lease>) {
        self.lent.lock().unwrap_or_else(|p| p.into_inner()).push(lease);
    }

    /// Ends every lease before the weights change; returns the seconds waited.
    fn end_leases(&self) -> f64 {
        let leases: Vec<Arc<Lease>> = std::mem::take(&mut *self.lent.lock().unwrap_or_else(|p| p.into_inner()));
        let mut waited = 0.0;
        for lease in leases {
            let end = lease.end();
            waited += end.waited().as_secs_f64();
            if let LeaseEnd::TimedOut(d) = end {
                tracing::warn!(
                    seconds = d.as_secs_f64(),
                    "a weight sync kept the live weights past its limit; the optimizer step goes on and that sync's version is void"
                );
            }
        }
        waited
    }

    /// Number of scalar parameters.
    pub fn param_count(&self) -> i64 {
        self.params.numel()
    }

    /// Copies of the fp32 master weights on the CPU (for checkpoints and the gRPC stream),
    /// joined one tensor at a time so that no second copy of the model exists on the device.
    /// With LoRA: the base with the adapter merged in.
    pub fn master_snapshot(&self) -> Vec<(String, Tensor)> {
        if let (Some((lora, _)), Some(adapter)) = (&self.lora, self.adapter_snapshot()) {
            let base: Vec<(String, Tensor)> = self.params.snapshot();
            return crate::model::lora::merge(&base, lora, self.model.spec(), &adapter);
        }
        tch::no_grad(|| {
            self.params
                .iter()
                .map(|(name, t)| {
                    let master = match self.low.as_ref().and_then(|l| l.get(name)) {
                        Some(lo) => split::join(&t.detach(), lo).to_device(Device::Cpu),
                        None => t.detach().to_device(Device::Cpu).copy(),
                    };
                    (name.clone(), master)
                })
                .collect()
        })
    }

    /// The gradients the last step computed (before clipping), fp32 copies on the CPU, for
    /// parity checks; a skipped step leaves zeros.
    pub fn last_gradients(&self) -> Vec<(String, Tensor)> {
        tch::no_grad(|| {
            self.trainable
                .iter()
                .filter_map(|p| {
                    let g = p.value.grad();
                    g.defined()
                        .then(|| (p.name.clone(), g.to_device(Device::Cpu).to_kind(Kind::Float)))
                })
                .collect()
        })
    }

    /// Names of the trainable parameters.
    pub fn trainable_names(&self) -> Vec<String> {
        self.trainable.iter().map(|p| p.name.clone()).collect()
    }

    /// Shares the parameters with an engine: returns handles on the same tensors and the gate
    /// that orders optimizer steps against generation rounds.
    pub fn share(&mut self) -> (ParamStore, SharedWeights) {
        let shared = self.shared.get_or_insert_with(|| SharedWeights {
            gate: Arc::new(RwLock::new(())),
            version: Arc::new(AtomicU64::new(self.steps_done)),
        });
        let tensors = self
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        (ParamStore::from_tensors(tensors), shared.clone())
    }

    /// Optimizer moments for a checkpoint, and the optimizer's step count.
    pub fn optimizer_state(&self) -> (Vec<(String, Tensor)>, u64) {
        (self.optimizer.state_tensors(), self.optimizer.steps())
    }

    /// Restores the optimizer and step counter of a resumed run.
    pub fn restore(
        &mut self,
        optimizer: Vec<(String, Tensor)>,
        optimizer_steps: u64,
        steps_done: u64,
        skipped_steps: u64,
    ) -> Result<(), TrainError> {
        self.optimizer
            .load_state_tensors(optimizer, optimizer_steps)
            .map_err(TrainError::OptimizerState)?;
        self.steps_done = steps_done;
        self.skipped_steps = skipped_steps;
        Ok(())
    }

    /// Trains one optimizer step on `batch`. Data parallel: rank 0 first hands the batch to
    /// every rank; each trains its share and the gradients are summed over the ranks.
    pub fn train(&mut self, batch: &TrainBatch) -> Result<StepMetrics, TrainError> {
        let started = Instant::now();
        self.adopt_home()?;
        if let Some((dp, _)) = self.dp.as_mut().filter(|(dp, _)| dp.rank() == 0) {
            dp.send(&Op::Train(Box::new(batch.clone())))?;
        }
        for p in &self.trainable {
            let mut v = p.value.shallow_clone();
            v.zero_grad();
        }
        let (stats, padded, reduced) = self.micro_batches(batch)?;
        let backward_done = Instant::now();
        // Gradients as the backward left them (bf16 on the high halves, or fp32 on the
        // masters); AdamW casts and scales them a slice at a time.
        let grads: Vec<Tensor> = self.trainable.iter().map(|p| p.value.grad()).collect();
        let (grad_norm, grad_scale) = self.clip_coefficient(&grads);
        let lr = self.config.schedule.lr_at(self.steps_done);
        let skip_reason = SkipReason::of(stats.loss, grad_norm);
        let (sync_hold_s, shared) = match skip_reason {
            Some(reason) => {
                drop(grads);
                self.skip(reason, stats.loss, grad_norm);
                (0.0, None)
            }
            None => self.apply(grads, lr, grad_scale)?,
        };
        if self.profile {
            if let Device::Cuda(i) = self.config.device {
                tch::Cuda::synchronize(i as i64);
            }
            tracing::info!(
                micro_batches_s = backward_done.duration_since(started).as_secs_f64(),
                clip_and_adamw_s = backward_done.elapsed().as_secs_f64(),
                allreduce_wait_s = reduced.wait_s,
                "step stages"
            );
        }
        let memory = match self.config.device {
            Device::Cuda(i) => crate::torch_ext::cuda_memory(i),
            _ => None,
        };
        Ok(StepMetrics {
            step: self.steps_done,
            loss: stats.loss,
            grad_norm,
            lr,
            mean_ratio: ratio(stats.ratio_sum, stats.tokens),
            clipped_fraction: ratio(stats.clipped, stats.tokens),
            logprob_diff_mean: ratio(stats.diff_sum, stats.diff_tokens),
            logprob_diff_abs_mean: ratio(stats.diff_abs_sum, stats.diff_tokens),
            logprob_diff_max: stats.diff_max,
            kl_mean: ratio(stats.kl_sum, stats.tokens),
            pos_logp_mean: ratio(stats.pos_logp_sum, stats.pos_tokens),
            neg_logp_mean: ratio(stats.neg_logp_sum, stats.neg_tokens),
            tokens: stats.tokens as u64,
            sequences: batch.sequences as u64,
            micro_batches: batch.micro_batches.len() as u64,
            padded_tokens: padded,
            compute_time_s: started.elapsed().as_secs_f64(),
            sync_hold_s,
            skip_reason,
            skipped_steps: self.skipped_steps,
            ranks: self.dp.as_ref().map_or(1, |(dp, _)| dp.world() as u64),
            allreduce_wait_s: reduced.wait_s,
            allreduce_bytes: reduced.bytes,
            cuda_allocated_bytes: memory.map(|m| m.allocated),
            cuda_reserved_bytes: memory.map(|m| m.reserved),
            shared,
        })
    }

    /// Forward and backward of this rank's micro-batches of `batch` (all of them without data
    /// parallelism); returns the batch's loss statistics (summed over the ranks), the positions
    /// computed, and what the gradient all-reduce cost.
    fn micro_batches(&mut self, batch: &TrainBatch) -> Result<(LossStats, u64, ReduceReport), TrainError> {
        let norm = StepNorm {
            sequences: batch.sequences as f64,
            scored_tokens: batch.scored_tokens as f64,
        };
        let mine: Vec<usize> = match &self.dp {
            Some((dp, _)) => crate::grpo::pack::share_micro_batches(batch, dp.world()).swap_remove(dp.rank()),
            None => (0..batch.micro_batches.len()).collect(),
        };
        let data_parallel = self.dp.is_some();
        let mut reduction = self.dp.as_mut().map(|(dp, buckets)| {
            let grads = self.trainable.iter().map(|p| p.value.grad()).collect();
            GradReduction::new(dp, buckets.clone(), grads)
        });
        let mut stats = LossStats::default();
        let padded = batch.micro_batches.iter().map(|mb| (mb.rows * mb.seq_len) as u64).sum();
        let dropout = self.model.has_lora_dropout();
        for (n, &i) in mine.iter().enumerate() {
            let mb = &batch.micro_batches[i];
            // Dropout masks drawn from (step, micro-batch): recomputed layers see the same
            // ones, and a resumed run (or another rank) draws what one uninterrupted rank would.
            let seed = (self.steps_done as i64)
                .wrapping_mul(1_000_003)
                .wrapping_add(i as i64 * 65_536);
            let plan = StepPlan {
                recompute_layers: self.config.compute.recompute_layers(self.model.num_layers()),
                chunk_tokens: self.config.compute.logprob_chunk_tokens,
                profile: self.profile,
                manual_head: self.manual_head,
                dropout_seed: dropout.then_some(seed),
            };
            let mt = MicroTensors::new(mb, self.config.device);
            // The last micro-batch's backward starts each layer's all-reduce once it is done.
            let mut report = |layer: usize| {
                if let Some(r) = reduction.as_mut() {
                    r.layer_done(layer);
                }
            };
            let reporter: Option<&mut dyn FnMut(usize)> = (n + 1 == mine.len() && data_parallel).then_some(&mut report);
            let s = forward_backward_reporting(&self.model, &mt, &self.config.loss, norm, plan, reporter)?;
            stats.merge(&s);
        }
        let Some(reduction) = reduction else {
            return Ok((stats, padded, ReduceReport::default()));
        };
        let report = reduction.finish()?;
        let stats = match self.dp.as_mut() {
            Some((dp, _)) => dp.reduce_stats(&stats)?,
            None => stats,
        };
        Ok((stats, padded, report))
    }

    /// Joins the data-parallel group: plans the gradient buckets and takes rank 0's weights,
    /// optimizer state and counters (rank 0 sends them), so every rank starts where rank 0
    /// stands, a resumed rank 0 included.
    pub fn join_data_parallel(&mut self, mut dp: DataParallel) -> Result<(), TrainError> {
        let sizes: Vec<(Option<usize>, usize)> = self
            .trainable
            .iter()
            .map(|p| {
                (
                    layer_of(&p.name).and_then(|l| usize::try_from(l).ok()),
                    p.value.numel() * 4,
                )
            })
            .collect();
        let buckets = plan_buckets(&sizes, dp.bucket_bytes());
        // Every gradient exists from the start: a rank without micro-batches still reduces.
        for p in &self.trainable {
            if !p.value.grad().defined() {
                (p.value.sum(Kind::Float) * 0.0).backward();
            }
        }
        self.take_rank0_state(&mut dp)?;
        tracing::info!(
            rank = dp.rank(),
            world = dp.world(),
            buckets = buckets.len(),
            step = self.steps_done,
            "data parallel: state of rank 0 taken"
        );
        self.dp = Some((dp, buckets));
        Ok(())
    }

    /// Names, shapes and dtypes of everything the ranks must agree on.
    fn fingerprint(&self) -> String {
        let mut out = String::new();
        for (name, t) in self.params.iter() {
            out.push_str(&format!("{name} {:?} {:?}\n", t.size(), t.kind()));
        }
        for p in &self.trainable {
            out.push_str(&format!("trainable {} {:?}\n", p.name, p.value.size()));
        }
        out.push_str(&format!(
            "optimizer {:?} lora {:?}\n",
            self.config.optimizer,
            self.lora.as_ref().map(|(l, _)| l)
        ));
        out
    }

    fn take_rank0_state(&mut self, dp: &mut DataParallel) -> Result<(), TrainError> {
        let (optimizer, optimizer_steps) = self.optimizer_state();
        let header = super::data_parallel::StateHeader {
            fingerprint: self.fingerprint(),
            steps_done: self.steps_done,
            skipped_steps: self.skipped_steps,
            optimizer_steps,
            optimizer: optimizer
                .iter()
                .map(|(name, t)| super::data_parallel::StateTensor {
                    name: name.clone(),
                    shape: t.size(),
                    kind: format!("{:?}", t.kind()),
                })
                .collect(),
        };
        let header = dp.exchange_header(header)?;
        let mut tensors: Vec<Tensor> = self.params.iter().map(|(_, t)| t.shallow_clone()).collect();
        tensors.extend(self.low.iter().flat_map(|l| l.values().map(Tensor::shallow_clone)));
        if self.lora.is_some() {
            for p in &self.trainable {
                tensors.push(p.value.shallow_clone());
                tensors.extend(p.low.as_ref().map(Tensor::shallow_clone));
            }
        }
        for t in &tensors {
            dp.broadcast_tensor(t)?;
        }
        let mut state = Vec::with_capacity(header.optimizer.len());
        for st in &header.optimizer {
            let kind = super::data_parallel::kind_of_name(&st.kind)
                .ok_or_else(|| DpError::Decode(format!("optimizer tensor {} of dtype {}", st.name, st.kind)))?;
            let t = match optimizer.iter().find(|(n, _)| *n == st.name) {
                Some((_, t)) if dp.rank() == 0 => t.shallow_clone(),
                _ => Tensor::zeros(st.shape.as_slice(), (kind, Device::Cpu)),
            };
            dp.broadcast_tensor(&t)?;
            state.push((st.name.clone(), t));
        }
        if dp.rank() != 0 {
            self.restore(state, header.optimizer_steps, header.steps_done, header.skipped_steps)?;
        }
        Ok(())
    }

    /// Data parallel, rank 0: how often to call [`Self::keep_ranks_alive`] while idle.
    pub fn keep_alive_every(&self) -> Option<std::time::Duration> {
        self.dp
            .as_ref()
            .filter(|(dp, _)| dp.rank() == 0)
            .map(|(dp, _)| dp.timeout() / 4)
    }

    /// How long the model thread may wait idle before [`Self::keep_ranks_alive`] and
    /// [`Self::adopt_home`] need it (`None`: forever).
    pub fn idle_every(&self) -> Option<std::time::Duration> {
        let homes = self.homes.is_some().then_some(HOME_POLL);
        match (self.keep_alive_every(), homes) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Data parallel, rank 0 between steps: tells the other ranks it is alive (they fail when
    /// they hear nothing for the deadline).
    pub fn keep_ranks_alive(&mut self) -> Result<(), TrainError> {
        match self.dp.as_mut() {
            Some((dp, _)) if dp.rank() == 0 => Ok(dp.send(&Op::KeepAlive)?),
            _ => Ok(()),
        }
    }

    /// Data parallel, rank 0 at the end of the run: the other ranks leave.
    pub fn stop_ranks(&mut self) -> Result<(), TrainError> {
        match self.dp.as_mut() {
            Some((dp, _)) if dp.rank() == 0 => Ok(dp.send(&Op::Stop)?),
            _ => Ok(()),
        }
    }

    /// Data parallel, ranks above 0: trains every batch rank 0 sends until it says stop;
    /// `on_step` sees each step's metrics. Returns the steps done.
    pub fn follow_rank0(&mut self, mut on_step: impl FnMut(&StepMetrics)) -> Result<u64, TrainError> {
        loop {
            let op = match self.dp.as_mut() {
                Some((dp, _)) if dp.rank() > 0 => dp.receive()?,
                _ => return Ok(self.steps_done),
            };
            match op {
                Op::Train(batch) => on_step(&self.train(&batch)?),
                Op::KeepAlive => {}
                Op::Stop => return Ok(self.steps_done),
            }
        }
    }

    /// The optimizer update, once the syncs reading the live weights are done with them;
    /// returns the seconds waited for those.
    fn apply(
        &mut self,
        grads: Vec<Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<(f64, Option<SharedWrite>), TrainError> {
        let sync_hold_s = self.end_leases();
        let paused = self.fence_before_write()?;
        let gate = self.shared.as_ref().map(|s| s.gate.clone());
        let exclusive = gate.as_ref().map(|g| g.write());
        let stepped = self
            .optimizer
            .step(&self.trainable, &grads, lr, grad_scale)
            .map_err(TrainError::Optimizer);
        drop(grads);
        drop(exclusive);
        if stepped.is_ok() {
            self.steps_done += 1;
        }
        // A fenced owner is resumed whatever happened to the step.
        let shared = match paused {
            Some(paused_s) => self.fence_after_write(paused_s)?,
            None => None,
        };
        stepped?;
        if let Some(s) = &self.shared {
            s.version.store(self.steps_done, Ordering::SeqCst);
        }
        Ok((sync_hold_s, shared))
    }

    /// Counts a skipped step: the batch is consumed, the gradients are dropped, the weights
    /// and the optimizer state are untouched.
    fn skip(&mut self, reason: SkipReason, loss: f64, grad_norm: f64) {
        for p in &self.trainable {
            let mut v = p.value.shallow_clone();
            v.zero_grad();
        }
        self.steps_done += 1;
        self.skipped_steps += 1;
        if let Some(s) = &self.shared {
            s.version.store(self.steps_done, Ordering::SeqCst);
        }
        tracing::warn!(
            step = self.steps_done,
            reason = ?reason,
            loss,
            grad_norm,
            skipped_steps = self.skipped_steps,
            "non-finite step skipped; the weights are untouched"
        );
    }

    /// Global L2 norm of the gradients before clipping (accumulated in fp32 whatever their
    /// dtype, a slice at a time so that no fp32 copy of a large gradient exists), and the
    /// factor that clips them to `max_grad_norm` (torch's `clip_grad_norm_`).
    fn clip_coefficient(&self, grads: &[Tensor]) -> (f64, f64) {
        tch::no_grad(|| {
            let live: Vec<Tensor> = grads.iter().filter(|g| g.defined()).map(|g| g.reshape([-1])).collect();
            let sq: Vec<Tensor> = live
                .iter()
                .flat_map(|g| g.split(SLICE_ELEMENTS, 0))
                .map(|g| {
                    let g = g.to_kind(Kind::Float);
                    g.dot(&g)
                })
                .collect();
            if sq.is_empty() {
                return (0.0, 1.0);
            }
            let total = Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[]);
            let coef = self.config.max_grad_norm / (total + 1e-6);
            (total, coef.min(1.0))
        })
    }
}
