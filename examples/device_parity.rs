//! Device parity: one optimizer step of the same tiny random Qwen2-shaped model on the same
//! GRPO batch, in several configurations, each compared with the CPU fp32 step (full graph,
//! one logprob chunk, per-tensor AdamW): CPU with checkpointing + small chunks + fused AdamW,
//! CUDA fp32 both ways, and CUDA bf16. Prints a table and exits non-zero if a tolerance is
//! exceeded: fp32 loss 1e-5 relative (grad norm 1e-4); bf16 loss 2e-3 absolute, grad norm
//! 5e-2 relative, mean policy logprob 5e-2 nats.
//!
//! Build here with `cargo build --release --features cuda --example device_parity`, run on the
//! GPU machine with `scripts/gpu/device_parity.sh`.

use std::process::ExitCode;

use grpo_node::actors::messages::RawBatch;
use grpo_node::actors::preprocessor::prepare;
use grpo_node::checkpoint::BatchSeq;
use grpo_node::grpo::{ClipMode, Limits, LossAgg, LossConfig};
use grpo_node::model::{ModelSpec, ParamStore};
use grpo_node::train::{
    AdamWConfig, ComputeConfig, LrSchedule, OptimizerKind, Precision, ScheduleKind, StepMetrics, Trainer, TrainerConfig,
};
use serde_json::json;
use tch::Device;

const CONFIG: &str = r#"{"model_type":"qwen2","vocab_size":1024,"hidden_size":128,"intermediate_size":384,
  "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-6,
  "rope_theta":1000000.0,"max_position_embeddings":512,"tie_word_embeddings":false}"#;

fn batch(vocab: i64) -> Vec<serde_json::Value> {
    (0..4i64)
        .map(|g| {
            let seqs: Vec<Vec<i64>> = (0..4i64)
                .map(|k| {
                    (0..(20 + 7 * k + g))
                        .map(|i| (g * 131 + k * 17 + i * 29 + 3) % vocab)
                        .collect()
                })
                .collect();
            let masks: Vec<Vec<i64>> = seqs
                .iter()
                .map(|s| {
                    s.iter()
                        .enumerate()
                        .map(|(i, &t)| if i < 8 { -100 } else { t })
                        .collect()
                })
                .collect();
            let lps: Vec<Vec<f64>> = seqs
                .iter()
                .map(|s| {
                    (0..s.len())
                        .map(|i| {
                            if i < 8 {
                                1.0
                            } else {
                                -6.5 - 0.05 * ((i as i64 + g) % 9) as f64
                            }
                        })
                        .collect()
                })
                .collect();
            json!({"tokens": seqs, "masks": masks, "scores": [1.0, 0.0, 0.5, (g % 2) as f64],
                   "inference_logprobs": lps, "generation_params": {"temperature": 0.8}})
        })
        .collect()
}

fn run(
    spec: &ModelSpec,
    base: &ParamStore,
    device: Device,
    compute: ComputeConfig,
    groups: &[serde_json::Value],
) -> Result<StepMetrics, String> {
    run_steps(spec, base, device, compute, groups, OptimizerKind::Adamw, 1)
}

/// `steps` optimizer steps on the same batch; the last step's metrics (from the second on,
/// they depend on the optimizer's update).
fn run_steps(
    spec: &ModelSpec,
    base: &ParamStore,
    device: Device,
    compute: ComputeConfig,
    groups: &[serde_json::Value],
    optimizer: OptimizerKind,
    steps: u64,
) -> Result<StepMetrics, String> {
    let tensors = base
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(device).copy()))
        .collect();
    let config = TrainerConfig {
        loss: LossConfig {
            clip_mode: ClipMode::Standard,
            clip_eps_low: 0.2,
            clip_eps_high: 0.28,
            is_cap: Some(3.0),
            kl_coef: 0.01,
            agg: LossAgg::SeqMeanTokenMean,
        },
        schedule: LrSchedule {
            lr: 1e-3,
            warmup_steps: 0,
            total_steps: steps,
            kind: ScheduleKind::Constant,
        },
        adamw: AdamWConfig::default(),
        optimizer,
        max_grad_norm: 1.0,
        device,
        compute,
    };
    let mut trainer = Trainer::new(spec, ParamStore::from_tensors(tensors), None, config).map_err(|e| e.to_string())?;
    let limits = Limits {
        vocab_size: spec.vocab_size,
        seq_len: 128,
        truncate_long: false,
        allow_missing_logprobs: false,
    };
    let prepared = prepare(
        RawBatch {
            seq: BatchSeq(1),
            groups: groups.to_vec(),
            wait_time_s: 0.0,
        },
        &limits,
        4,
    );
    let batch = prepared.batch.ok_or("batch rejected")?;
    let mut last = trainer.train(&batch).map_err(|e| e.to_string())?;
    for _ in 1..steps {
        last = trainer.train(&batch).map_err(|e| e.to_string())?;
    }
    Ok(last)
}

struct Variant {
    name: &'static str,
    device: Device,
    compute: ComputeConfig,
}

/// Adafactor and 8-bit AdamW: the second step's loss (after one update) on CUDA, fp32 and bf16
/// over split masters, against CPU fp32.
fn optimizer_parity(
    kind: OptimizerKind,
    spec: &ModelSpec,
    base: &ParamStore,
    groups: &[serde_json::Value],
    plain: ComputeConfig,
) -> bool {
    let two = |device, compute| run_steps(spec, base, device, compute, groups, kind, 2);
    let label = format!("{kind:?}").to_lowercase();
    let reference = match two(Device::Cpu, plain) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{label} cpu: {e}");
            return false;
        }
    };
    let bf16 = ComputeConfig {
        precision: Precision::Bf16,
        exp_avg: Precision::Bf16,
        ..plain
    };
    let mut ok = true;
    for (precision, compute) in [("fp32", plain), ("bf16", bf16)] {
        let name = format!("cuda {precision} {label}");
        let m = match two(Device::Cuda(0), compute) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{name}: {e}");
                return false;
            }
        };
        let d = (reference.loss - m.loss).abs();
        let pass = match compute.precision {
            Precision::Fp32 => d / reference.loss.abs().max(1e-12) <= 1e-5,
            Precision::Bf16 => d <= 2e-3,
        };
        ok &= pass;
        println!(
            "| {name}, step 2 | {:.9} (cpu {:.9}) | abs {d:.2e} | | | {} |",
            m.loss,
            reference.loss,
            if pass { "PASS" } else { "FAIL" }
        );
    }
    ok
}

fn main() -> ExitCode {
    let spec = match ModelSpec::from_json(CONFIG) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("config: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = ParamStore::random(&spec, 7, Device::Cpu);
    let groups = batch(spec.vocab_size);
    let cuda = tch::Cuda::is_available();
    println!("cuda available: {cuda}, devices: {}", tch::Cuda::device_count());
    let plain = ComputeConfig {
        precision: Precision::Fp32,
        gradient_checkpointing: false,
        keep_layers: 0,
        logprob_chunk_tokens: 1 << 20,
        fused_adamw: false,
        exp_avg: Precision::Fp32,
    };
    let staged = ComputeConfig {
        precision: Precision::Fp32,
        gradient_checkpointing: true,
        keep_layers: 0,
        logprob_chunk_tokens: 37,
        fused_adamw: true,
        exp_avg: Precision::Fp32,
    };
    let mut variants = vec![Variant {
        name: "cpu fp32 ckpt+chunk37+fused",
        device: Device::Cpu,
        compute: staged,
    }];
    if cuda {
        variants.push(Variant {
            name: "cuda fp32 plain",
            device: Device::Cuda(0),
            compute: plain,
        });
        variants.push(Variant {
            name: "cuda fp32 ckpt+chunk37+fused",
            device: Device::Cuda(0),
            compute: staged,
        });
        variants.push(Variant {
            name: "cuda bf16 ckpt+chunk37+fused",
            device: Device::Cuda(0),
            compute: ComputeConfig {
                precision: Precision::Bf16,
                exp_avg: Precision::Bf16,
                ..staged
            },
        });
    }
    let reference = match run(&spec, &base, Device::Cpu, plain, &groups) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cpu fp32 reference: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
    println!(
        "reference cpu fp32 plain: loss {:.9} grad_norm {:.9} mean logprob(A>0) {:.6}",
        reference.loss, reference.grad_norm, reference.pos_logp_mean
    );
    println!("| variant | loss | loss diff | grad norm rel diff | logprob diff (nats) | verdict |");
    println!("|---|---|---|---|---|---|");
    let mut ok = true;
    for v in variants {
        let m = match run(&spec, &base, v.device, v.compute, &groups) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{}: {e}", v.name);
                return ExitCode::FAILURE;
            }
        };
        let dl_rel = rel(reference.loss, m.loss);
        let dl_abs = (reference.loss - m.loss).abs();
        let dg = rel(reference.grad_norm, m.grad_norm);
        let dlp = (reference.pos_logp_mean - m.pos_logp_mean).abs();
        let pass = match v.compute.precision {
            Precision::Fp32 => dl_rel <= 1e-5 && dg <= 1e-4,
            Precision::Bf16 => dl_abs <= 2e-3 && dg <= 5e-2 && dlp <= 5e-2,
        };
        ok &= pass;
        println!(
            "| {} | {:.9} | rel {dl_rel:.2e} / abs {dl_abs:.2e} | {dg:.2e} | {dlp:.2e} | {} |",
            v.name,
            m.loss,
            if pass { "PASS" } else { "FAIL" }
        );
    }
    if cuda {
        for kind in [OptimizerKind::Adafactor, OptimizerKind::Adamw8bit] {
            ok &= optimizer_parity(kind, &spec, &base, &groups, plain);
        }
    } else {
        println!("no CUDA device: only the CPU variants ran");
    }
    println!("{}", if ok { "PASS" } else { "FAIL" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
