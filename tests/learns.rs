//! Training actually learns: on a fixed synthetic set of scored groups, the mean logprob of
//! positive-advantage completions rises over steps and that of negative ones falls.

mod common;

use grpo_node::actors::messages::RawBatch;
use grpo_node::actors::preprocessor::prepare;
use grpo_node::checkpoint::BatchSeq;
use grpo_node::grpo::{Limits, TrainBatch};
use grpo_node::model::safetensors_io::load_params;
use grpo_node::model::ModelSpec;
use grpo_node::train::{OptimizerKind, Trainer};
use serde_json::{json, Value};
use tch::Device;

/// Four prompts; per prompt two rewarded completions (ascending runs) and two unrewarded ones.
fn groups() -> Vec<Value> {
    (0..4i64)
        .map(|p| {
            let prompt: Vec<i64> = (0..6).map(|i| 100 + p * 10 + i).collect();
            let completions: [Vec<i64>; 4] = [
                (0..6).map(|i| 300 + i).collect(),
                (0..6).map(|i| 310 + i).collect(),
                (0..6).map(|i| 400 - i * 3 - p).collect(),
                (0..6).map(|i| 450 - i * 5 - p).collect(),
            ];
            let tokens: Vec<Vec<i64>> = completions
                .iter()
                .map(|c| [prompt.clone(), c.clone()].concat())
                .collect();
            let masks: Vec<Vec<i64>> = tokens
                .iter()
                .map(|t| {
                    t.iter()
                        .enumerate()
                        .map(|(i, &x)| if i < prompt.len() { -100 } else { x })
                        .collect()
                })
                .collect();
            json!({"tokens": tokens, "masks": masks, "scores": [1.0, 1.0, 0.0, 0.0]})
        })
        .collect()
}

/// A trainer for the tiny llama in `dir`, and one batch builder over [`groups`] (no rollout
/// logprobs: on-policy training, ratio 1, as with --allow-missing-logprobs).
fn trainer_and_batches(dir: &std::path::Path, steps: u64) -> (Trainer, impl Fn(u64) -> TrainBatch) {
    trainer_and_batches_with(dir, steps, OptimizerKind::Adamw, 3e-3)
}

fn trainer_and_batches_with(
    dir: &std::path::Path,
    steps: u64,
    optimizer: OptimizerKind,
    lr: f64,
) -> (Trainer, impl Fn(u64) -> TrainBatch) {
    trainer_and_batches_lora(dir, steps, optimizer, lr, None)
}

fn trainer_and_batches_lora(
    dir: &std::path::Path,
    steps: u64,
    optimizer: OptimizerKind,
    lr: f64,
    lora: Option<grpo_node::model::lora::LoraSpec>,
) -> (Trainer, impl Fn(u64) -> TrainBatch) {
    let spec = ModelSpec::from_dir(dir).expect("spec");
    let params = load_params(&spec, dir, Device::Cpu).expect("load");
    let config = grpo_node::train::TrainerConfig {
        optimizer,
        ..common::trainer_config(common::ppo_loss(), lr, 2, steps)
    };
    let trainer = match lora {
        Some(l) => {
            let tensors = l.init(&spec, 1, Device::Cpu);
            Trainer::with_lora(&spec, params, l, tensors, config).expect("LoRA trainer")
        }
        None => Trainer::new(&spec, params, None, config).expect("trainer"),
    };
    let limits = Limits {
        vocab_size: spec.vocab_size,
        seq_len: 64,
        truncate_long: false,
        allow_missing_logprobs: true,
    };
    let batch = move |seq: u64| {
        let raw = RawBatch {
            seq: BatchSeq(seq),
            groups: groups(),
            wait_time_s: 0.0,
        };
        prepare(raw, &limits, 4).batch.expect("valid batch")
    };
    (trainer, batch)
}

#[test]
fn positive_completions_gain_probability() {
    learns_with(OptimizerKind::Adamw, 3e-3);
}

/// The same learning test with Adafactor (`--optimizer adafactor`; its update is clipped to an
/// RMS of 1, so it takes a smaller learning rate for the same step size).
#[test]
fn adafactor_learns_like_adamw() {
    learns_with(OptimizerKind::Adafactor, 3e-3);
}

/// The same learning test with 8-bit AdamW (`--optimizer adamw_8bit`), which must also track
/// AdamW itself: its gain in rewarded logprob is within 20% of AdamW's over the same batches.
#[test]
fn adamw_8bit_learns_like_adamw() {
    let exact = learns_with(OptimizerKind::Adamw, 3e-3);
    let eight = learns_with(OptimizerKind::Adamw8bit, 3e-3);
    let gain = |p: &[f64]| p[p.len() - 1] - p[0];
    assert!(
        (gain(&eight) - gain(&exact)).abs() < 0.2 * gain(&exact),
        "8-bit gain {} against AdamW's {}",
        gain(&eight),
        gain(&exact)
    );
}

/// The same learning test training a LoRA adapter (r 8 on every linear module, dropout 0.05;
/// the base frozen), with the learning rate LoRA usually takes.
#[test]
fn lora_learns() {
    let lora = grpo_node::model::lora::LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        targets: grpo_node::model::lora::LoraTarget::ALL.into_iter().collect(),
        layers: None,
    };
    learns_lora(OptimizerKind::Adamw, 1e-2, Some(lora));
}

/// Trains `steps` and checks it learned; returns the rewarded completions' mean logprob per step.
fn learns_with(optimizer: OptimizerKind, lr: f64) -> Vec<f64> {
    learns_lora(optimizer, lr, None)
}

fn learns_lora(optimizer: OptimizerKind, lr: f64, lora: Option<grpo_node::model::lora::LoraSpec>) -> Vec<f64> {
    let dir = common::tiny_model("llama", &[]);
    let steps = 12;
    let (mut trainer, batch) = trainer_and_batches_lora(dir.path(), steps, optimizer, lr, lora);
    let mut pos = Vec::new();
    let mut neg = Vec::new();
    for step in 0..steps {
        let m = trainer.train(&batch(step + 1)).expect("train step");
        assert!((m.mean_ratio - 1.0).abs() < 1e-6, "on-policy ratio is exactly 1");
        pos.push(m.pos_logp_mean);
        neg.push(m.neg_logp_mean);
    }
    println!("positive logp {pos:.3?}\nnegative logp {neg:.3?}");
    assert!(
        pos[steps as usize - 1] > pos[0] + 1.0,
        "rewarded completions must gain logprob: {pos:?}"
    );
    assert!(
        neg[steps as usize - 1] < neg[0],
        "unrewarded completions must lose logprob: {neg:?}"
    );
    assert!(
        pos.windows(2).filter(|w| w[1] > w[0]).count() >= steps as usize - 2,
        "mostly monotone: {pos:?}"
    );
    pos
}

/// Weights lent to a sync (sent without a copy) hold the next optimizer update: a lease given
/// back costs nothing, one never given back costs its limit once and then voids that version.
#[test]
fn a_lent_version_holds_the_optimizer_until_given_back() {
    use grpo_node::train::lease::Lease;
    use std::sync::Arc;
    use std::time::Duration;

    let dir = common::tiny_model("llama", &[]);
    let (mut trainer, batch) = trainer_and_batches(dir.path(), 4);
    let returned = Arc::new(Lease::new(Duration::from_secs(60)));
    trainer.lend(returned.clone());
    returned.give_back();
    let m = trainer.train(&batch(1)).expect("step");
    assert!(
        m.sync_hold_s < 1.0,
        "a returned lease does not hold the step: {}",
        m.sync_hold_s
    );

    let wedged = Arc::new(Lease::new(Duration::from_millis(300)));
    trainer.lend(wedged.clone());
    let before = trainer.master_snapshot();
    let m = trainer.train(&batch(1)).expect("step");
    assert!(m.sync_hold_s >= 0.3, "the step waited out the limit: {}", m.sync_hold_s);
    assert!(!wedged.is_out(), "after the limit the lent version is void");
    let changed = before
        .iter()
        .zip(trainer.master_snapshot())
        .any(|((_, a), (_, b))| !a.equal(&b));
    assert!(changed, "the step went on after the limit");
    let m = trainer.train(&batch(1)).expect("step");
    assert!(m.sync_hold_s < 1.0, "a lease holds one step only: {}", m.sync_hold_s);
}

/// A batch that reaches the trainer with a NaN advantage made the loss, the gradients and
/// then the weights NaN (the validator refuses the ones it can see, such as scores whose group
/// mean overflows; this one is crafted past it). Such a step is skipped and counted, the
/// weights stay bit for bit, and training goes on after it.
#[test]
fn a_non_finite_step_is_skipped_and_leaves_the_weights_untouched() {
    use grpo_node::train::SkipReason;

    let dir = common::tiny_model("llama", &[]);
    let (mut trainer, batch) = trainer_and_batches(dir.path(), 4);
    let mut bad = batch(1);
    // At a scored position (unscored ones never reach the loss).
    let scored = bad.micro_batches[0]
        .labels
        .iter()
        .position(|&l| l != -100)
        .expect("a scored label");
    bad.micro_batches[0].advantages[scored] = f32::NAN;
    let before = trainer.master_snapshot();
    let m = trainer.train(&bad).expect("step");
    assert_eq!(m.skip_reason, Some(SkipReason::NonFiniteLoss), "loss {}", m.loss);
    assert_eq!((m.step, m.skipped_steps), (1, 1));
    for ((name, a), (_, b)) in before.iter().zip(trainer.master_snapshot()) {
        assert!(a.equal(&b), "{name} changed in a skipped step");
    }
    let (_, adam_steps) = trainer.optimizer_state();
    assert_eq!(adam_steps, 0, "the optimizer did not step");

    let m = trainer.train(&batch(2)).expect("step");
    assert_eq!((m.skip_reason, m.step, m.skipped_steps), (None, 2, 1));
    assert!(m.loss.is_finite() && m.grad_norm.is_finite());
    let finite = trainer
        .master_snapshot()
        .iter()
        .all(|(_, t)| t.isfinite().all().int64_value(&[]) == 1);
    assert!(finite, "the next step trains on finite weights");
}
