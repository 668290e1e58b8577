//! Forward parity: tiny random Llama, Qwen2 and Qwen3 models made by PyPI `transformers`;
//! our fp32 logits match transformers' within 1e-4 relative (max |diff| / max |ref|).

mod common;

use std::path::Path;

use grpo_node::model::safetensors_io::{load_params, read_file};
use grpo_node::model::{ModelSpec, Transformer};
use tch::{Device, Kind, Tensor};

const REL_TOL: f64 = 1e-4;

fn ids(batch: i64, len: i64, vocab: i64) -> Vec<Vec<i64>> {
    (0..batch)
        .map(|b| (0..len).map(|t| (b * 131 + t * 17 + 3) % vocab).collect())
        .collect()
}

fn check(dir: &Path, len: i64) -> f64 {
    let spec = ModelSpec::from_dir(dir).expect("spec");
    let params = load_params(&spec, dir, Device::Cpu).expect("load");
    let model = Transformer::new(&spec, &params).expect("bind");
    let rows = ids(2, len, spec.vocab_size);
    let ids_path = dir.join("ids.json");
    std::fs::write(&ids_path, serde_json::json!({ "input_ids": rows }).to_string()).expect("write ids");
    let ref_path = dir.join("ref_logits.safetensors");
    common::run_ref(
        "ref_forward.py",
        &[
            "--model",
            dir.to_str().expect("utf8"),
            "--ids",
            ids_path.to_str().expect("utf8"),
            "--out",
            ref_path.to_str().expect("utf8"),
        ],
    );
    let reference = read_file(&ref_path).expect("read ref").remove(0).1;
    let flat: Vec<i64> = rows.concat();
    let ours = tch::no_grad(|| model.forward(&Tensor::from_slice(&flat).view([2, len])));
    assert_eq!(ours.size(), reference.size());
    let diff = (&ours - &reference).abs().max().double_value(&[]);
    let scale = reference.abs().max().double_value(&[]);
    assert_eq!(ours.kind(), Kind::Float);
    diff / scale
}

fn assert_parity(arch: &str, extra: &[&str], len: i64) {
    let dir = common::tiny_model(arch, extra);
    let rel = check(dir.path(), len);
    println!("{arch} {extra:?}: max relative diff {rel:.2e}");
    assert!(rel < REL_TOL, "{arch} {extra:?}: relative diff {rel:.3e} >= {REL_TOL}");
}

#[test]
fn llama_sharded_matches_transformers() {
    assert_parity("llama", &["--shard"], 24);
}

#[test]
fn qwen2_tied_with_qkv_bias_matches_transformers() {
    assert_parity("qwen2", &["--tie"], 24);
}

#[test]
fn qwen3_with_qk_norm_matches_transformers() {
    assert_parity("qwen3", &[], 24);
    assert_parity("qwen3", &["--head-dim", "32"], 16);
}

#[test]
fn rope_scaling_variants_match_transformers() {
    for kind in ["linear", "llama3", "yarn"] {
        assert_parity("llama", &["--rope-scaling", kind], 40);
    }
    // Dynamic NTK only changes anything past max_position_embeddings (512).
    assert_parity("llama", &["--rope-scaling", "dynamic"], 530);
}
