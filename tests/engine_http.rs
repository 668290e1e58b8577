//! The embedded engine over real HTTP: the `/generate` contract (fields, types, n, stop,
//! finish reasons, logprobs shape, 4xx on bad input), batching of concurrent requests, and
//! logprobs that equal the learner's own computation.

mod common;

use std::net::SocketAddr;

use grpo_node::engine::core::EngineHandle;
use grpo_node::engine::{http, load, BatchConfig};
use grpo_node::model::safetensors_io::load_params;
use grpo_node::model::{ModelSpec, Transformer};
use serde_json::{json, Value};
use tch::Device;

struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

impl Server {
    fn start() -> Self {
        Self::start_with(http::HttpPolicy::default())
    }

    fn start_with(policy: http::HttpPolicy) -> Self {
        let dir = common::tiny_model("llama", &[]);
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let model = load::load(dir.path(), Device::Cpu).expect("load");
        let engine = EngineHandle::start(
            model,
            BatchConfig {
                max_rows: 64,
                window: std::time::Duration::from_millis(5),
            },
        )
        .expect("engine");
        let (addr, _) = runtime
            .block_on(http::serve(
                "127.0.0.1:0".parse().expect("addr"),
                std::sync::Arc::new(engine),
                policy,
            ))
            .expect("serve");
        Self {
            addr,
            _dir: dir,
            runtime,
        }
    }

    fn post(&self, body: Value) -> (u16, Value) {
        self.post_raw(body.to_string())
    }

    fn post_raw(&self, body: String) -> (u16, Value) {
        self.post_as(body, None)
    }

    fn post_as(&self, body: String, authorization: Option<&str>) -> (u16, Value) {
        let url = format!("http://{}/generate", self.addr);
        self.runtime.block_on(async {
            let mut req = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json");
            if let Some(a) = authorization {
                req = req.header("authorization", a);
            }
            let resp = req.body(body).send().await.expect("send");
            let status = resp.status().as_u16();
            (status, resp.json().await.expect("json body"))
        })
    }
}

fn prompt() -> Vec<i64> {
    vec![5, 17, 42, 99, 7, 3]
}

#[test]
fn generate_follows_the_atropos_vllm_contract() {
    let s = Server::start();
    let (status, r) = s.post(
        json!({"prompt": {"prompt_token_ids": prompt()}, "logprobs": 0, "n": 3, "max_tokens": 6, "temperature": 1.0}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["text"].as_array().expect("text").len(), 3);
    assert_eq!(r["prompt_token_ids"], json!(prompt()));
    assert!(r["prompt"].is_string());
    let token_ids = r["token_ids"].as_array().expect("token_ids");
    for (i, out) in r["logprobs"].as_array().expect("logprobs").iter().enumerate() {
        let ids = token_ids[i].as_array().expect("ids");
        let positions = out.as_array().expect("positions");
        assert_eq!(positions.len(), ids.len());
        assert!(!ids.is_empty() && ids.len() <= 6);
        for (pos, id) in positions.iter().zip(ids) {
            let list = pos.as_array().expect("one-element list");
            assert_eq!(list.len(), 1);
            let dict = list[0].as_object().expect("dict");
            assert_eq!(dict.len(), 1, "logprobs: 0 returns only the sampled token");
            let (key, lp) = dict.iter().next().expect("entry");
            assert_eq!(key.parse::<i64>().expect("id key"), id.as_i64().expect("id"));
            assert!(lp.as_f64().expect("lp") <= 0.0);
        }
        let reason = &r["finish_reasons"][i];
        let eos_last = ids.last().and_then(Value::as_i64) == Some(1);
        assert_eq!(reason, if eos_last { "stop" } else { "length" }, "{r}");
    }
    // Without `logprobs`, only text, prompt and finish reasons come back.
    let (_, r) = s.post(json!({"prompt": {"prompt_token_ids": prompt()}, "max_tokens": 3}));
    let keys: Vec<&String> = r.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    // top-k alternatives follow the sampled token.
    let (_, r) =
        s.post(json!({"prompt": {"prompt_token_ids": prompt()}, "logprobs": 3, "max_tokens": 2, "temperature": 0.0}));
    let first = r["logprobs"][0][0][0].as_object().expect("dict");
    assert!(first.len() >= 3);
    assert_eq!(
        first.keys().next().and_then(|k| k.parse::<i64>().ok()),
        r["token_ids"][0][0].as_i64()
    );
}

#[test]
fn stop_strings_seeds_and_greedy() {
    let s = Server::start();
    let greedy = |extra: Value| {
        let mut body = json!({"prompt": {"prompt_token_ids": prompt()}, "max_tokens": 8, "temperature": 0.0, "ignore_eos": true, "logprobs": 0});
        body.as_object_mut()
            .expect("obj")
            .extend(extra.as_object().expect("obj").clone());
        s.post(body).1
    };
    let full = greedy(json!({}));
    assert_eq!(full["finish_reasons"][0], "length");
    let text = full["text"][0].as_str().expect("text").to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 3, "{text}");
    let cut = greedy(json!({"stop": words[2]}));
    assert_eq!(cut["finish_reasons"][0], "stop");
    let cut_text = cut["text"][0].as_str().expect("text");
    assert!(
        !cut_text.contains(words[2]) && text.starts_with(cut_text.trim_end()),
        "{cut_text:?} vs {text:?}"
    );
    let sampled = |seed: u64| {
        s.post(json!({"prompt": {"prompt_token_ids": prompt()}, "n": 4, "max_tokens": 8, "seed": seed, "logprobs": 0}))
            .1["token_ids"]
            .clone()
    };
    assert_eq!(sampled(11), sampled(11), "same seed, same samples");
    assert_ne!(sampled(11), sampled(12));
}

#[test]
fn bad_requests_get_4xx_json_errors() {
    let s = Server::start();
    let cases = [
        json!({"prompt": {"prompt_token_ids": prompt()}, "best_of": 2}).to_string(),
        json!({"prompt": {"prompt_token_ids": prompt()}, "n": 0}).to_string(),
        json!({"prompt": {"prompt_token_ids": [1, 100000]}}).to_string(),
        json!({"prompt": {"prompt_token_ids": []}}).to_string(),
        json!({"prompt": {"prompt_token_ids": prompt()}, "stream": true}).to_string(),
        json!({"prompt": {"prompt_token_ids": prompt()}, "temperature": -1}).to_string(),
        json!({"n": 2}).to_string(),
        "{not json".to_string(),
    ];
    for body in cases {
        let (status, r) = s.post_raw(body.clone());
        assert_eq!(status, 400, "{body} -> {r}");
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{body} -> {r}");
    }
    let health = s.runtime.block_on(async {
        reqwest::get(format!("http://{}/health", s.addr))
            .await
            .expect("health")
            .status()
    });
    assert_eq!(health.as_u16(), 200);
}

#[test]
fn concurrent_requests_are_served_together_and_logprobs_match_the_learner() {
    let s = Server::start();
    let url = format!("http://{}/generate", s.addr);
    let bodies: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": {"prompt_token_ids": [5 + i, 17, 42 + i]}, "logprobs": 0, "n": 2, "max_tokens": 10, "temperature": 0.7, "seed": i}))
        .collect();
    let replies: Vec<Value> = s.runtime.block_on(async {
        let client = reqwest::Client::new();
        let tasks: Vec<_> = bodies
            .iter()
            .map(|b| {
                let req = client.post(&url).json(b).send();
                tokio::spawn(async move { req.await.expect("send").json::<Value>().await.expect("json") })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    // Recompute each completion's logprobs the way the learner does (unpadded, fp32, t = 0.7).
    let dir = &s._dir;
    let spec = ModelSpec::from_dir(dir.path()).expect("spec");
    let params = load_params(&spec, dir.path(), Device::Cpu).expect("params");
    let model = Transformer::new(&spec, &params).expect("bind");
    let mut worst = 0f64;
    for (body, reply) in bodies.iter().zip(&replies) {
        let prompt: Vec<i64> = serde_json::from_value(body["prompt"]["prompt_token_ids"].clone()).expect("prompt");
        for (out, served) in common::completions(reply) {
            let learner = common::learner_logprobs(&model, &prompt, &out, 0.7);
            for (s, l) in served.iter().zip(&learner) {
                worst = worst.max((s - l).abs());
            }
        }
    }
    println!("max |engine - learner| logprob: {worst:.2e}");
    assert!(worst < 1e-5, "engine logprobs differ from the learner's by {worst}");
}

/// `/generate` refuses requests over the configured caps with a 400 that names the cap, and
/// serves those within them.
#[test]
fn generate_enforces_the_configured_limits() {
    let s = Server::start_with(http::HttpPolicy {
        limits: grpo_node::engine::protocol::GenerateLimits {
            max_tokens: 8,
            max_prompt_tokens: Some(6),
            max_n: 2,
        },
        token: None,
        metrics_token: None,
    });
    let ok = |n: usize, max_tokens: usize, prompt: Vec<i64>| json!({"prompt": {"prompt_token_ids": prompt}, "n": n, "max_tokens": max_tokens});
    let (status, r) = s.post(ok(2, 8, prompt()));
    assert_eq!(status, 200, "at the limits: {r}");
    for (body, what) in [
        (ok(2, 9, prompt()), "max_tokens"),
        (ok(3, 8, prompt()), "n 3"),
        (ok(1, 8, vec![5; 7]), "prompt has 7 tokens"),
    ] {
        let (status, r) = s.post(body);
        assert_eq!(status, 400, "{what}: {r}");
        let msg = r["error"].as_str().expect("error");
        assert!(msg.contains(what) && msg.contains("limit"), "{what}: {msg}");
    }
    // A text prompt is held to the limit by its encoded length.
    let (status, r) = s.post(json!({"prompt": "a b c d e f g h i j k l", "max_tokens": 2}));
    assert_eq!(status, 400, "{r}");
}

/// With a token configured for it, `/generate` answers 401 without it or with a wrong one.
#[test]
fn generate_can_require_the_token() {
    let s = Server::start_with(http::HttpPolicy {
        limits: Default::default(),
        token: Some("s3cret".into()),
        metrics_token: None,
    });
    let body = json!({"prompt": {"prompt_token_ids": prompt()}, "max_tokens": 2}).to_string();
    assert_eq!(s.post_as(body.clone(), None).0, 401);
    assert_eq!(s.post_as(body.clone(), Some("Bearer s3cre")).0, 401);
    assert_eq!(s.post_as(body.clone(), Some("s3cret")).0, 401);
    let (status, r) = s.post_as(body, Some("Bearer s3cret"));
    assert_eq!(status, 200, "{r}");
}
