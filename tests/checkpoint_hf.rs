//! Checkpoints are real HF directories: PyPI `transformers` loads what we wrote (no missing or
//! unexpected keys) and produces our logits; the training state round-trips.

mod common;

use std::path::Path;

use grpo_node::actors::checkpointer::{write_job, CheckpointerArgs};
use grpo_node::actors::messages::{CheckpointJob, RawBatch};
use grpo_node::actors::preprocessor::prepare;
use grpo_node::checkpoint::state::FORMAT_VERSION;
use grpo_node::checkpoint::{latest_resumable, BatchSeq, CheckpointKind, Spool, TrainingState};
use grpo_node::grpo::Limits;
use grpo_node::model::safetensors_io::{load_params, weight_files, write_file};
use grpo_node::model::{ModelSpec, Transformer};
use grpo_node::train::Trainer;
use serde_json::json;
use tch::{Device, Tensor};

fn trained(dir: &Path) -> (ModelSpec, Trainer) {
    let spec = ModelSpec::from_dir(dir).expect("spec");
    let params = load_params(&spec, dir, Device::Cpu).expect("load");
    let config = common::trainer_config(common::ppo_loss(), 1e-2, 0, 1);
    let mut trainer = Trainer::new(&spec, params, None, config).expect("trainer");
    let group = json!({"tokens": [[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]], "masks": [[-100, -100, -100, 4, 5], [-100, -100, -100, 6, 7]],
                       "scores": [1.0, 0.0], "inference_logprobs": [[1, 1, 1, -6.0, -6.0], [1, 1, 1, -6.0, -6.0]]});
    let limits = Limits {
        vocab_size: spec.vocab_size,
        seq_len: 64,
        truncate_long: false,
        allow_missing_logprobs: false,
    };
    let batch = prepare(
        RawBatch {
            seq: BatchSeq(1),
            groups: vec![group],
            wait_time_s: 0.0,
        },
        &limits,
        2,
    )
    .batch
    .expect("batch");
    let m = trainer.train(&batch).expect("train step");
    assert!(m.grad_norm > 0.0);
    (spec, trainer)
}

fn roundtrip(arch: &str, extra: &[&str], max_shard_bytes: u64) {
    let src = common::tiny_model(arch, extra);
    let (spec, trainer) = trained(src.path());
    let save = tempfile::tempdir().expect("save");
    let args = CheckpointerArgs {
        save_path: save.path().to_path_buf(),
        source_model: src.path().to_path_buf(),
        max_shard_bytes,
        keep: None,
        spool: Spool::open(save.path().join("spool")).expect("spool"),
    };
    let (optimizer, optimizer_steps) = trainer.optimizer_state();
    let state = TrainingState {
        format_version: FORMAT_VERSION,
        step: 1,
        optimizer_steps,
        batches_consumed: BatchSeq(1),
        rejected_groups: 0,
        skipped_steps: 0,
        seed: 0,
        lr: 1e-2,
        warmup_steps: 0,
        training_steps: 1,
    };
    let job = CheckpointJob {
        kind: CheckpointKind::Step(1),
        weights: trainer.master_snapshot(),
        adapter: None,
        optimizer,
        state: state.clone(),
    };
    let out = write_job(&args, &job).expect("write");
    assert_eq!(out, save.path().join("step_1"));
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(f).is_file(), "{f} copied into the checkpoint");
    }
    if max_shard_bytes < 1 << 20 {
        assert!(weight_files(&out).expect("files").len() > 1, "sharded with an index");
    }

    // transformers loads it and gives our logits.
    let model = Transformer::new(&spec, trainer.compute_params()).expect("bind");
    let ids: Vec<i64> = (0..20).map(|i| (i * 37 + 11) % spec.vocab_size).collect();
    let logits = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).view([1, 20])));
    let ours = out.join("ours.safetensors");
    write_file(&ours, &[("logits".to_string(), logits)]).expect("write logits");
    let ids_path = save.path().join("ids.json");
    std::fs::write(&ids_path, json!({"input_ids": [ids]}).to_string()).expect("ids");
    let report = common::run_ref(
        "check_checkpoint.py",
        &[
            "--model",
            out.to_str().expect("utf8"),
            "--ids",
            ids_path.to_str().expect("utf8"),
            "--logits",
            ours.to_str().expect("utf8"),
        ],
    );
    assert!(report.contains("\"ok\": true"), "{report}");

    // The training state comes back intact and the checkpoint is found for --resume.
    let (read, moments) = TrainingState::read(&out).expect("state");
    assert_eq!(read, state);
    assert_eq!(moments.len(), trainer.trainable_names().len() * 2);
    let (found_step, _) = latest_resumable(save.path()).expect("scan").expect("resumable");
    assert_eq!(found_step, 1);
}

#[test]
fn llama_checkpoint_loads_in_transformers() {
    roundtrip("llama", &[], 1 << 30);
}

#[test]
fn sharded_qwen3_checkpoint_loads_in_transformers() {
    roundtrip("qwen3", &[], 200_000);
}

#[test]
fn tied_qwen2_checkpoint_loads_in_transformers() {
    roundtrip("qwen2", &["--tie"], 1 << 30);
}
