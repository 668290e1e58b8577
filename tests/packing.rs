//! Token-budget packing (`--micro-batch-tokens`): sequences laid end to end with no padding,
//! attention and RoPE positions restarting at every sequence. On the CPU in fp32 one packed
//! step must equal one padded step: the loss within 1e-5 (relative), the grad norm and every
//! gradient tensor within 1e-4 (relative to the tensor's largest entry), for Llama and Qwen3, both loss
//! aggregations, with and without activation checkpointing, and with a sequence longer than the
//! budget.

mod common;

use std::path::Path;

use grpo_node::actors::messages::RawBatch;
use grpo_node::actors::preprocessor::prepare_as;
use grpo_node::checkpoint::BatchSeq;
use grpo_node::grpo::pack::{Layout, Packing};
use grpo_node::grpo::{Limits, LossAgg, TrainBatch};
use grpo_node::model::safetensors_io::load_params;
use grpo_node::model::ModelSpec;
use grpo_node::train::{ComputeConfig, StepMetrics, Trainer, TrainerConfig};
use serde_json::{json, Value};
use tch::{Device, Tensor};

/// Groups of four completions of varied lengths, with rollout logprobs (ratios away from 1)
/// and a temperature per group; the last group's prompt is long.
fn groups() -> Vec<Value> {
    (0..4i64)
        .map(|g| {
            let prompt_len = if g == 3 { 40 } else { 3 + g * 2 };
            let prompt: Vec<i64> = (0..prompt_len).map(|i| 10 + (g * 17 + i * 5) % 300).collect();
            let tokens: Vec<Vec<i64>> = (0..4)
                .map(|c| {
                    let len = 2 + (g * 3 + c * 5) % 11;
                    prompt
                        .iter()
                        .copied()
                        .chain((0..len).map(|i| 40 + (g * 29 + c * 13 + i * 7) % 400))
                        .collect()
                })
                .collect();
            let masks: Vec<Vec<i64>> = tokens
                .iter()
                .map(|t| {
                    t.iter()
                        .enumerate()
                        .map(|(i, &x)| if (i as i64) < prompt_len { -100 } else { x })
                        .collect()
                })
                .collect();
            let logprobs: Vec<Vec<f64>> = tokens
                .iter()
                .map(|t| {
                    (0..t.len())
                        .map(|i| {
                            if (i as i64) < prompt_len {
                                1.0
                            } else {
                                -5.5 - 0.05 * ((i as i64 + g) % 9) as f64
                            }
                        })
                        .collect()
                })
                .collect();
            let scores: Vec<f64> = (0..4).map(|c| ((g + c) % 3) as f64 - 0.5).collect();
            json!({"tokens": tokens, "masks": masks, "scores": scores, "inference_logprobs": logprobs,
                   "generation_params": {"temperature": 0.6 + 0.1 * g as f64}})
        })
        .collect()
}

fn batch(layout: Layout) -> TrainBatch {
    let limits = Limits {
        vocab_size: 512,
        seq_len: 64,
        truncate_long: false,
        allow_missing_logprobs: false,
    };
    let raw = RawBatch {
        seq: BatchSeq(1),
        groups: groups(),
        wait_time_s: 0.0,
    };
    let prepared = prepare_as(raw, &limits, layout);
    assert!(prepared.rejections.is_empty(), "{:?}", prepared.rejections);
    prepared.batch.expect("a batch")
}

fn step(dir: &Path, batch: &TrainBatch, agg: LossAgg, checkpointing: bool) -> (StepMetrics, Vec<(String, Tensor)>) {
    let spec = ModelSpec::from_dir(dir).expect("spec");
    let params = load_params(&spec, dir, Device::Cpu).expect("load");
    let mut loss = common::ppo_loss();
    loss.agg = agg;
    loss.kl_coef = 0.05;
    let cfg = TrainerConfig {
        compute: ComputeConfig {
            gradient_checkpointing: checkpointing,
            logprob_chunk_tokens: 37,
            ..ComputeConfig::default()
        },
        ..common::trainer_config(loss, 1e-3, 0, 10)
    };
    let mut t = Trainer::new(&spec, params, None, cfg).expect("trainer");
    let m = t.train(batch).expect("step");
    (m, t.last_gradients())
}

/// Every gradient tensor within 1e-4 of the other, relative to its largest entry.
fn assert_gradients_match(what: &str, ga: &[(String, Tensor)], gb: &[(String, Tensor)]) {
    assert_eq!(ga.len(), gb.len());
    for ((n, x), (m, y)) in ga.iter().zip(gb) {
        assert_eq!(n, m);
        let scale = x.abs().max().double_value(&[]).max(1e-12);
        let d = (x - y).abs().max().double_value(&[]) / scale;
        assert!(d < 1e-4, "{what}: the gradient of {n} differs by {d} (relative)");
    }
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn a_packed_step_equals_a_padded_step() {
    let padded = batch(Layout::Rows {
        micro_batch: 3,
        packing: Packing::Sorted,
    });
    // A budget below the longest sequence (46 tokens): that one gets a micro-batch alone.
    let packed = batch(Layout::Tokens {
        budget: 40,
        shared_prompt: false,
    });
    assert!(packed.micro_batches.iter().all(|m| m.is_packed()));
    assert!(packed
        .micro_batches
        .iter()
        .any(|m| m.seq_lens.len() == 1 && m.seq_len > 40));
    assert!(packed.micro_batches.iter().any(|m| m.seq_lens.len() > 2));
    let real: usize = packed.micro_batches.iter().map(|m| m.seq_len).sum();
    let computed: usize = padded.micro_batches.iter().map(|m| m.rows * m.seq_len).sum();
    assert!(
        real < computed,
        "packing computes fewer positions: {real} vs {computed}"
    );
    assert_eq!(
        (packed.sequences, packed.scored_tokens),
        (padded.sequences, padded.scored_tokens)
    );
    for arch in ["llama", "qwen3"] {
        let model = common::tiny_model(arch, &["--layers", "2"]);
        for agg in [LossAgg::SeqMeanTokenMean, LossAgg::TokenMean] {
            for checkpointing in [false, true] {
                let (a, ga) = step(model.path(), &padded, agg, checkpointing);
                let (b, gb) = step(model.path(), &packed, agg, checkpointing);
                let what = format!("{arch} {agg:?} checkpointing {checkpointing}");
                assert!(relative(b.loss, a.loss) < 1e-5, "{what}: loss {} vs {}", b.loss, a.loss);
                assert!(
                    relative(b.grad_norm, a.grad_norm) < 1e-4,
                    "{what}: grad norm {} vs {}",
                    b.grad_norm,
                    a.grad_norm
                );
                assert!(
                    relative(b.kl_mean, a.kl_mean) < 1e-4,
                    "{what}: kl {} vs {}",
                    b.kl_mean,
                    a.kl_mean
                );
                assert_eq!(b.tokens, a.tokens);
                assert_eq!(b.padded_tokens as usize, real, "no padding computed");
                assert_gradients_match(&what, &ga, &gb);
            }
        }
    }
}

/// Shared-prompt packing (`--shared-prompt on`): each group's prompt once, its completions
/// attending to it. Exact: the same loss (1e-5) and gradients (1e-4) as the unshared packed
/// step and the padded step, with fewer positions computed.
#[test]
fn a_shared_prompt_step_equals_the_unshared_step() {
    let unshared = batch(Layout::Tokens {
        budget: 64,
        shared_prompt: false,
    });
    let shared = batch(Layout::Tokens {
        budget: 64,
        shared_prompt: true,
    });
    let padded = batch(Layout::Rows {
        micro_batch: 4,
        packing: Packing::Sorted,
    });
    let positions = |b: &TrainBatch| b.micro_batches.iter().map(|m| m.seq_len).sum::<usize>();
    assert!(
        positions(&shared) < positions(&unshared),
        "{} vs {}",
        positions(&shared),
        positions(&unshared)
    );
    assert!(shared
        .micro_batches
        .iter()
        .any(|m| m.seq_parents.iter().any(Option::is_some)));
    // The long-prompt group (prompt 40, four completions) alone is larger than the budget.
    assert!(shared.micro_batches.iter().any(|m| m.seq_len > 64));
    for arch in ["llama", "qwen3"] {
        let model = common::tiny_model(arch, &["--layers", "2"]);
        for checkpointing in [false, true] {
            let (a, ga) = step(model.path(), &unshared, LossAgg::SeqMeanTokenMean, checkpointing);
            let (b, gb) = step(model.path(), &shared, LossAgg::SeqMeanTokenMean, checkpointing);
            let (c, _) = step(model.path(), &padded, LossAgg::SeqMeanTokenMean, checkpointing);
            let what = format!("{arch} checkpointing {checkpointing}");
            assert!(relative(b.loss, a.loss) < 1e-5, "{what}: loss {} vs {}", b.loss, a.loss);
            assert!(
                relative(b.loss, c.loss) < 1e-5,
                "{what}: loss {} vs padded {}",
                b.loss,
                c.loss
            );
            assert!(
                relative(b.grad_norm, a.grad_norm) < 1e-4,
                "{what}: grad norm {} vs {}",
                b.grad_norm,
                a.grad_norm
            );
            assert_eq!(b.tokens, a.tokens);
            assert_gradients_match(&what, &ga, &gb);
        }
    }
}

/// The prompt a group shares stops at the first scored label and leaves every sequence a
/// position of its own; a one-sequence group shares nothing.
#[test]
fn the_shared_prefix_is_the_unscored_common_prompt() {
    use grpo_node::grpo::pack::{align_group, shared_prefix};
    let g: grpo_node::atropos::ScoredGroup = serde_json::from_value(groups()[1].clone()).expect("group");
    let seqs = align_group(&g);
    // Prompt of 5 tokens: inputs 0..4 are unscored prompt; position 4 predicts the completion.
    assert_eq!(shared_prefix(&seqs), 4);
    assert_eq!(shared_prefix(&seqs[..1]), 0);
}
