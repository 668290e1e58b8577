//! `grpo-node bench learner`: the learner's optimizer step on the batches of
//! `python/bench/make_batches.py`, timed like `python/bench/ref_learner.py` times the Atropos
//! example trainer's step (same batches, same shapes, same GPU), with the same result keys.

use std::path::PathBuf;
use std::time::Instant;

use serde::Deserialize;
use serde_json::json;
use tch::Device;

use crate::actors::messages::RawBatch;
use crate::actors::preprocessor::prepare_as;
use crate::checkpoint::BatchSeq;
use crate::config::DeviceSpec;
use crate::grpo::pack::{Layout, Packing};
use crate::grpo::{ClipMode, Limits, LossAgg, LossConfig};
use crate::model::params::expected_shapes;
use crate::model::ParamStore;
use crate::train::{AdamWConfig, ComputeConfig, LrSchedule, Precision, ScheduleKind, Trainer, TrainerConfig};

use super::shapes::Shape;
use super::BenchError;

/// Flags of `grpo-node bench learner`.
#[derive(Debug, clap::Args)]
pub struct LearnerBenchArgs {
    /// JSON written by python/bench/make_batches.py.
    #[arg(long, env = "GRPO_BENCH_BATCHES")]
    pub batches: PathBuf,
    /// Model shape (random weights).
    #[arg(long, env = "GRPO_BENCH_SHAPE", value_enum)]
    pub shape: Shape,
    /// Rows per micro-batch.
    #[arg(long, env = "GRPO_BENCH_BATCH_SIZE", default_value_t = 4)]
    pub batch_size: usize,
    /// Steps left out of the timing.
    #[arg(long, env = "GRPO_BENCH_WARMUP_STEPS", default_value_t = 1)]
    pub warmup_steps: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "GRPO_DEVICE", default_value = "cuda")]
    pub device: String,
    /// How sequences become micro-batches.
    #[arg(long, env = "GRPO_BENCH_PACKING", value_enum, default_value = "sorted")]
    pub packing: Packing,
    /// Token-budget packing (no padding, varlen attention) with this budget per micro-batch,
    /// instead of --batch-size rows.
    #[arg(long, env = "GRPO_MICRO_BATCH_TOKENS")]
    pub micro_batch_tokens: Option<usize>,
    /// With --micro-batch-tokens: each group's prompt once.
    #[arg(long, env = "GRPO_SHARED_PROMPT", value_enum, default_value = "off")]
    pub shared_prompt: crate::grpo::pack::SharedPrompt,
    /// Compute dtype.
    #[arg(long, env = "GRPO_PRECISION", value_enum, default_value = "bf16")]
    pub precision: Precision,
    /// Recompute layers in the backward.
    #[arg(long, env = "GRPO_GRADIENT_CHECKPOINTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// With checkpointing, the last N layers keep their activations.
    #[arg(long, env = "GRPO_CHECKPOINT_KEEP_LAYERS", default_value_t = 0)]
    pub checkpoint_keep_layers: usize,
    /// Positions per logprob chunk.
    #[arg(long, env = "GRPO_LOGPROB_CHUNK_TOKENS", default_value_t = 1024)]
    pub logprob_chunk_tokens: i64,
    /// Fused AdamW kernel.
    #[arg(long, env = "GRPO_FUSED_ADAMW", default_value_t = true, action = clap::ArgAction::Set)]
    pub fused_adamw: bool,
    /// dtype of AdamW's first moment (the second stays fp32).
    #[arg(long, env = "GRPO_EXP_AVG_DTYPE", value_enum, default_value = "bf16")]
    pub exp_avg_dtype: Precision,
    /// Learning rate (constant).
    #[arg(long, env = "GRPO_LR", default_value_t = 1e-6)]
    pub lr: f64,
    /// Optimizer of full fine-tuning (and of the adapter with --lora-r).
    #[arg(long, env = "GRPO_OPTIMIZER", value_enum, default_value = "adamw")]
    pub optimizer: crate::train::OptimizerKind,
    /// LoRA rank on all seven linear modules of every layer (alpha = 2r, dropout 0.05); 0 trains
    /// the full weights.
    #[arg(long, env = "GRPO_LORA_R", default_value_t = 0)]
    pub lora_r: i64,
    /// LoRA dropout with --lora-r.
    #[arg(long, env = "GRPO_LORA_DROPOUT", default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Also write the result here.
    #[arg(long, env = "GRPO_BENCH_OUT")]
    pub out: Option<PathBuf>,
}

#[derive(Deserialize)]
struct BatchesFile {
    seq_len: usize,
    vocab: i64,
    steps: Vec<Vec<serde_json::Value>>,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The model FLOPs of one pass over sequences of these lengths (`python/bench/flops.py`:
/// 6 x matmul parameters x tokens + 6 x layers x attention width x sum of squared lengths).
fn model_flops(matmul_params: f64, layers: f64, attn_width: f64, lens: &[usize]) -> f64 {
    let tokens: f64 = lens.iter().map(|&l| l as f64).sum();
    let sq: f64 = lens.iter().map(|&l| (l as f64) * (l as f64)).sum();
    6.0 * matmul_params * tokens + 6.0 * layers * attn_width * sq
}

/// Runs the benchmark and prints `RESULT {json}`.
pub fn run(args: &LearnerBenchArgs) -> Result<(), BenchError> {
    let text =
        std::fs::read_to_string(&args.batches).map_err(|e| BenchError::Io(args.batches.display().to_string(), e))?;
    let file: BatchesFile = serde_json::from_str(&text).map_err(|e| BenchError::Batches(e.to_string()))?;
    let device = DeviceSpec::resolve(Some(&args.device))?.to_tch()?;
    let spec = args.shape.spec(file.vocab)?;
    let shapes = expected_shapes(&spec);
    let params: i64 = shapes.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    // Every weight that goes through a matmul: all but the norms and biases, with the
    // embedding counted as the LM head.
    let matmul_params: i64 = shapes
        .iter()
        .filter(|(n, s)| s.len() == 2 && (n != "model.embed_tokens.weight" || spec.tie_word_embeddings))
        .map(|(_, s)| s.iter().product::<i64>())
        .sum();
    let limits = Limits {
        vocab_size: spec.vocab_size,
        seq_len: file.seq_len,
        truncate_long: false,
        allow_missing_logprobs: false,
    };
    let config = TrainerConfig {
        loss: LossConfig {
            clip_mode: ClipMode::Atropos,
            clip_eps_low: 0.2,
            clip_eps_high: 0.2,
            is_cap: None,
            kl_coef: 0.0,
            agg: LossAgg::SeqMeanTokenMean,
        },
        schedule: LrSchedule {
            lr: args.lr,
            warmup_steps: 0,
            total_steps: file.steps.len() as u64,
            kind: ScheduleKind::Constant,
        },
        adamw: AdamWConfig::default(),
        optimizer: args.optimizer,
        max_grad_norm: 1.0,
        device,
        compute: ComputeConfig {
            precision: args.precision,
            gradient_checkpointing: args.gradient_checkpointing,
            keep_layers: args.checkpoint_keep_layers,
            logprob_chunk_tokens: args.logprob_chunk_tokens,
            fused_adamw: args.fused_adamw,
            exp_avg: args.exp_avg_dtype,
        },
    };
    let store = ParamStore::random(&spec, 0, device);
    let mut trainer = if args.lora_r > 0 {
        let lora = crate::model::lora::LoraSpec {
            r: args.lora_r,
            alpha: 2.0 * args.lora_r as f64,
            dropout: args.lora_dropout,
            targets: crate::model::lora::LoraTarget::ALL.into_iter().collect(),
            layers: None,
        };
        let tensors = lora.init(&spec, 1, device);
        Trainer::with_lora(&spec, store, lora, tensors, config)?
    } else {
        Trainer::new(&spec, store, None, config)?
    };
    let trainable = trainer.trainable_numel();
    sync(device);
    if let Device::Cuda(i) = device {
        crate::torch_ext::cuda_reset_peak(i);
    }
    let (mut timed, mut losses, mut grad_norms, mut step_times) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, groups) in file.steps.iter().enumerate() {
        let lens: Vec<usize> = groups
            .iter()
            .flat_map(|g| {
                g["tokens"]
                    .as_array()
                    .map(|seqs| {
                        seqs.iter()
                            .map(|s| s.as_array().map_or(0, |t| t.len().saturating_sub(1)))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let prep_start = Instant::now();
        let layout = match args.micro_batch_tokens {
            Some(budget) => Layout::Tokens {
                budget,
                shared_prompt: args.shared_prompt == crate::grpo::pack::SharedPrompt::On,
            },
            None => Layout::Rows {
                micro_batch: args.batch_size,
                packing: args.packing,
            },
        };
        let prepared = prepare_as(
            RawBatch {
                seq: BatchSeq(i as u64 + 1),
                groups: groups.clone(),
                wait_time_s: 0.0,
            },
            &limits,
            layout,
        );
        if !prepared.rejections.is_empty() {
            return Err(BenchError::Batches(format!(
                "step {i}: {} groups rejected, first: {}",
                prepared.rejections.len(),
                prepared.rejections[0].detail
            )));
        }
        let batch = prepared
            .batch
            .ok_or_else(|| BenchError::Batches(format!("step {i} is empty")))?;
        let prep_s = prep_start.elapsed().as_secs_f64();
        sync(device);
        let started = Instant::now();
        let m = trainer.train(&batch)?;
        sync(device);
        let step_s = started.elapsed().as_secs_f64();
        losses.push(m.loss);
        grad_norms.push(m.grad_norm);
        step_times.push(step_s);
        tracing::info!(
            step = i + 1,
            step_s,
            loss = m.loss,
            padded = m.padded_tokens,
            "bench step"
        );
        if i >= args.warmup_steps {
            let flops = model_flops(
                matmul_params as f64,
                spec.num_layers as f64,
                (spec.num_heads * spec.head_dim) as f64,
                &lens,
            );
            timed.push((step_s, prep_s, lens.iter().sum::<usize>(), m.padded_tokens, flops));
        }
    }
    let n = timed.len().max(1) as f64;
    let mean = |f: fn(&(f64, f64, usize, u64, f64)) -> f64| timed.iter().map(f).sum::<f64>() / n;
    let step_s = mean(|t| t.0);
    let train_tokens = mean(|t| t.2 as f64);
    let peak = match device {
        Device::Cuda(i) => crate::torch_ext::cuda_peak_allocated(i).map(|b| b as f64 / (1u64 << 30) as f64),
        _ => None,
    };
    let result = json!({
        "impl": "grpo-node",
        "shape": args.shape.name(),
        "params": params,
        "matmul_params": matmul_params,
        "batch_size": args.batch_size,
        "packing": match args.micro_batch_tokens {
            Some(budget) if args.shared_prompt == crate::grpo::pack::SharedPrompt::On => format!("tokens-{budget}-shared"),
            Some(budget) => format!("tokens-{budget}"),
            None => format!("{:?}", args.packing).to_lowercase(),
        },
        "precision": format!("{:?}", args.precision).to_lowercase(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "checkpoint_keep_layers": args.checkpoint_keep_layers,
        "logprob_chunk_tokens": args.logprob_chunk_tokens,
        "fused_adamw": args.fused_adamw,
        "exp_avg_dtype": format!("{:?}", args.exp_avg_dtype).to_lowercase(),
        "optimizer": format!("{:?}", args.optimizer).to_lowercase(),
        "lora_r": args.lora_r,
        "lora_dropout": args.lora_dropout,
        "trainable_params": trainable,
        "steps_total": file.steps.len(),
        "steps_timed": timed.len(),
        "step_s": step_s,
        "prep_s": mean(|t| t.1),
        "train_tokens": train_tokens,
        "padded_tokens": mean(|t| t.3 as f64),
        "tokens_per_s": if step_s > 0.0 { train_tokens / step_s } else { 0.0 },
        "peak_mem_gib": peak,
        "model_flops_per_step": mean(|t| t.4),
        "losses": losses,
        "grad_norms": grad_norms,
        "step_times_s": step_times,
        "device": format!("{device:?}"),
    });
    println!("RESULT {result}");
    if let Some(out) = &args.out {
        std::fs::write(out, result.to_string()).map_err(|e| BenchError::Io(out.display().to_string(), e))?;
    }
    Ok(())
}
