//! Weight sync over gRPC between real processes: the learner binary publishes every version to
//! an inference-sidecar binary; the sidecar's weights equal the learner's bit for bit (digest)
//! and its logprobs equal the learner's within 1e-5; the canary; a sidecar killed mid-stream
//! never blocks training and gets a full sync when it returns; `--resume` republishes; health
//! answers while a commit waits for a generation round.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{metrics, path_str, prom_value, scrape, wait_until, wait_until_fast, Learner, RunApi};
use grpo_node::engine::PolicyVersion;
use grpo_node::model::safetensors_io::load_params;
use grpo_node::model::{ModelSpec, Transformer};
use grpo_node::rpc::auth::Token;
use grpo_node::sync::client::{Deadlines, SidecarClient};
use grpo_node::sync::WeightSet;
use serde_json::{json, Value};
use tch::{Device, Tensor};

const TOKEN: &str = "s3cret";

struct Sidecar {
    proc: Learner,
    http: u16,
    grpc: u16,
    rt: tokio::runtime::Runtime,
}

impl Sidecar {
    fn start(model: &Path, near: &Path) -> Self {
        Self::start_on(model, near, common::free_port(), common::free_port())
    }

    fn start_with(model: &Path, near: &Path, extra: &[&str]) -> Self {
        let s = Self::spawn(model, near, common::free_port(), common::free_port(), extra);
        wait_until(Duration::from_secs(60), "sidecar gRPC", || s.health().is_some());
        s
    }

    fn start_on(model: &Path, near: &Path, http: u16, grpc: u16) -> Self {
        let s = Self::spawn(model, near, http, grpc, &[]);
        wait_until(Duration::from_secs(60), "sidecar gRPC", || s.health().is_some());
        s
    }

    /// Starts the process without waiting for it.
    fn spawn(model: &Path, near: &Path, http: u16, grpc: u16, extra: &[&str]) -> Self {
        // The sidecar reads the token from a file (the learner gets it on its command line).
        std::fs::create_dir_all(near.parent().unwrap_or(near)).expect("dir");
        let token_file = near.with_extension("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
        let mut args: Vec<String> = [
            "--role",
            "inference-sidecar",
            "--model-name",
            path_str(model),
            "--auth-token-file",
            path_str(&token_file),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend([
            "--listen".into(),
            format!("127.0.0.1:{http}"),
            "--grpc-listen".into(),
            format!("127.0.0.1:{grpc}"),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self {
            proc: Learner::spawn_args(&args, near),
            http,
            grpc,
            rt: tokio::runtime::Runtime::new().expect("rt"),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    fn client(&self, token: Option<&str>) -> SidecarClient {
        let deadlines = Deadlines {
            rpc: Duration::from_secs(5),
            min_bytes_per_s: 20e6,
        };
        SidecarClient::new(&self.url(), Token(token.map(String::from)), deadlines).expect("client")
    }

    /// (version, updating), or None while unreachable.
    fn health(&self) -> Option<(u64, bool)> {
        self.rt
            .block_on(async { self.client(Some(TOKEN)).health().await })
            .ok()
            .map(|h| (h.version.map_or(0, |v| v.step), h.updating))
    }

    fn digest(&self) -> (u64, String) {
        let info = self
            .rt
            .block_on(async { self.client(Some(TOKEN)).info().await })
            .expect("info");
        (info.version.map_or(0, |v| v.step), info.digest)
    }

    fn generate(&self, body: Value) -> Value {
        let url = format!("http://127.0.0.1:{}/generate", self.http);
        self.rt.block_on(async {
            reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json")
        })
    }
}

fn weights_of_dir(dir: &Path) -> WeightSet {
    let spec = ModelSpec::from_dir(dir).expect("spec");
    let params = load_params(&spec, dir, Device::Cpu).expect("params");
    let named: Vec<(String, Tensor)> = params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    WeightSet::pack(&named).expect("pack")
}

fn digest_of_dir(dir: &Path) -> String {
    weights_of_dir(dir).digest().to_string()
}

/// A group of two sequences; `logprobs` overrides the rollout logprobs of the completions.
fn group(salt: i64) -> Value {
    let seq = |k: i64| -> (Vec<i64>, Vec<i64>, Vec<f64>) {
        let tokens: Vec<i64> = (0..12).map(|i| (salt * 53 + k * 7 + i * 29 + 2) % 500 + 2).collect();
        let masks = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < 5 { -100 } else { t })
            .collect();
        let lps = (0..12).map(|i| if i < 5 { 1.0 } else { -6.0 }).collect();
        (tokens, masks, lps)
    };
    let (a, b) = (seq(0), seq(1));
    json!({"tokens": [a.0, b.0], "masks": [a.1, b.1], "scores": [1.0, 0.0], "inference_logprobs": [a.2, b.2]})
}

/// A group generated by the sidecar itself (what an environment would post).
fn generated_group(sidecar: &Sidecar, prompt: &[i64], seed: u64) -> Value {
    group_from_reply(prompt, &sidecar.generate(generate_body(prompt, seed)))
}

fn generate_body(prompt: &[i64], seed: u64) -> Value {
    json!({"prompt": {"prompt_token_ids": prompt}, "n": 2, "max_tokens": 6, "temperature": 1.0,
           "logprobs": 0, "seed": seed, "ignore_eos": true})
}

/// Turns a `/generate` reply into a scored group, as Atropos' ManagedServer does.
fn group_from_reply(prompt: &[i64], r: &Value) -> Value {
    let (mut tokens, mut masks, mut lps) = (Vec::new(), Vec::new(), Vec::new());
    for (out, lp) in common::completions(r) {
        tokens.push([prompt.to_vec(), out.clone()].concat());
        masks.push([vec![-100; prompt.len()], out].concat());
        lps.push([vec![1.0; prompt.len()], lp].concat());
    }
    json!({"tokens": tokens, "masks": masks, "scores": [1.0, 0.0], "inference_logprobs": lps})
}

/// Learner flags that keep `sidecar` in sync with the test token.
fn synced_to<'a>(sidecar_url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--sidecar", sidecar_url, "--auth-token", TOKEN];
    args.extend_from_slice(extra);
    args
}

#[test]
fn published_weights_are_bit_identical_and_logprobs_match() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let sidecar = Sidecar::start(model.path(), &work.path().join("sidecar"));
    // Every RPC needs the token.
    let denied = sidecar.rt.block_on(async { sidecar.client(None).health().await });
    assert!(
        denied.is_err_and(|e| e.to_string().contains("token")),
        "calls without the token are refused"
    );
    let api = RunApi::start();
    let save = work.path().join("run");
    let learner = Learner::spawn(
        model.path(),
        &api,
        &save,
        &synced_to(&sidecar.url(), &["--training-steps", "2"]),
    );
    api.wait_registered(4);
    api.post("/scored_data_list", &json!((0..4).map(group).collect::<Vec<_>>()));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    wait_until(Duration::from_secs(30), "version 2 on the sidecar", || {
        sidecar.health().map(|h| h.0) == Some(2)
    });
    let (version, digest) = sidecar.digest();
    assert_eq!(version, 2);
    let final_dir = save.join("final_model");
    assert_eq!(
        digest,
        digest_of_dir(&final_dir),
        "the engine serves exactly the learner's final weights"
    );
    let m = metrics(&save);
    assert!(m[1]["sync_bytes"].as_u64().is_some_and(|b| b > 0), "{}", m[1]);
    assert!(
        m[1]["sync_time_s"].as_f64().is_some() && m[1]["engine_version"].as_u64().is_some(),
        "{}",
        m[1]
    );

    // Logprobs of a fixed prompt: served vs recomputed by the learner's model from the checkpoint.
    let prompt = vec![3i64, 14, 15, 92, 65];
    let r = sidecar.generate(json!({"prompt": {"prompt_token_ids": prompt}, "max_tokens": 8, "temperature": 0.0, "logprobs": 0, "ignore_eos": true}));
    let (out, served) = common::completions(&r).remove(0);
    let spec = ModelSpec::from_dir(&final_dir).expect("spec");
    let params = load_params(&spec, &final_dir, Device::Cpu).expect("params");
    let tm = Transformer::new(&spec, &params).expect("model");
    let learner = common::learner_logprobs(&tm, &prompt, &out, 1.0);
    for (j, (s, l)) in served.iter().zip(&learner).enumerate() {
        assert!((s - l).abs() < 1e-5, "position {j}: served {s} vs learner {l}");
    }
}

#[test]
fn canary_first_batch_on_new_weights_has_near_zero_logprob_diff() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let sidecar = Sidecar::start(model.path(), &work.path().join("sidecar"));
    let api = RunApi::start();
    let save = work.path().join("run");
    let learner = Learner::spawn(
        model.path(),
        &api,
        &save,
        &synced_to(&sidecar.url(), &["--training-steps", "2"]),
    );
    api.wait_registered(4);
    api.post("/scored_data_list", &json!([group(1), group(2)]));
    wait_until(Duration::from_secs(60), "step 1", || !metrics(&save).is_empty());
    wait_until(Duration::from_secs(30), "version 1 on the sidecar", || {
        sidecar.health().map(|h| h.0) == Some(1)
    });
    // The environment's next batch comes from the new weights: the learner's ratio must be ~1.
    let batch = json!([
        generated_group(&sidecar, &[5, 6, 7, 8], 1),
        generated_group(&sidecar, &[9, 10, 11], 2)
    ]);
    api.post("/scored_data_list", &batch);
    let (code, log) = learner.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    let m = metrics(&save);
    let first = m[0]["logprob_diff_abs_mean"].as_f64().expect("diff");
    let canary = m[1]["logprob_diff_abs_mean"].as_f64().expect("diff");
    println!("logprob_diff_abs_mean: synthetic batch {first:.3}, first batch from synced weights {canary:.2e}");
    assert!(canary < 1e-4, "weights did not arrive: canary {canary}");
    assert!(first > 1.0);
    assert_eq!(m[1]["engine_version"], 1);
}

#[test]
fn a_sidecar_killed_mid_stream_is_marked_stale_then_fully_resynced() {
    // Large enough (~25 MB) that a stream of 1 MiB buckets takes a moment, to kill into it.
    let model = common::tiny_model(
        "llama",
        &[
            "--vocab",
            "4096",
            "--hidden",
            "256",
            "--layers",
            "4",
            "--intermediate",
            "1024",
        ],
    );
    let work = tempfile::tempdir().expect("work");
    let (http, grpc) = (common::free_port(), common::free_port());
    let mut sidecar = Sidecar::start_on(model.path(), &work.path().join("sidecar"), http, grpc);
    let api = RunApi::start();
    let save = work.path().join("run");
    let url = sidecar.url();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let prom = format!("http://{listen}/metrics");
    let args = synced_to(
        &url,
        &[
            "--training-steps",
            "4",
            "--sync-bucket-mb",
            "1",
            "--metrics-listen",
            &listen,
        ],
    );
    let learner = Learner::spawn(model.path(), &api, &save, &args);
    api.wait_registered(4);
    api.post("/scored_data_list", &json!((0..4).map(group).collect::<Vec<_>>()));
    // Kill the sidecar while an update is staged (between BeginUpdate and CommitUpdate).
    wait_until_fast(Duration::from_secs(60), "an update in flight", || {
        sidecar.health().is_some_and(|h| h.1)
    });
    sidecar.proc.signal("-KILL");
    wait_until(Duration::from_secs(60), "steps 1 and 2", || metrics(&save).len() >= 2);
    wait_until(Duration::from_secs(30), "the failed send counted", || {
        common::scraped(&prom, "grpo_publications", Some(("reason", "failed"))) >= 1.0
    });
    // Back on the same ports: the broadcaster's health check finds it and sends a full sync.
    sidecar = Sidecar::start_on(model.path(), &work.path().join("sidecar2"), http, grpc);
    wait_until(Duration::from_secs(60), "full resync", || {
        sidecar.health().is_some_and(|h| h.0 >= 2)
    });
    assert!(
        common::scraped(&prom, "grpo_sidecar_resyncs", None) >= 1.0,
        "counted as a full resync"
    );
    api.post("/scored_data_list", &json!((4..8).map(group).collect::<Vec<_>>()));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    wait_until(Duration::from_secs(30), "version 4", || {
        sidecar.health().map(|h| h.0) == Some(4)
    });
    assert_eq!(sidecar.digest().1, digest_of_dir(&save.join("final_model")));
    assert_eq!(metrics(&save).len(), 4, "training never waited for the dead sidecar");
}

/// A sidecar that hangs (SIGSTOP: its sockets accept, nothing answers) under a long deadline
/// must not hold back the other sidecar or training; once it runs again it catches up to the
/// newest version.
#[test]
fn a_frozen_sidecar_does_not_hold_back_the_others() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let a = Sidecar::start(model.path(), &work.path().join("a"));
    let b = Sidecar::start(model.path(), &work.path().join("b"));
    let api = RunApi::start();
    let save = work.path().join("run");
    let both = format!("{},{}", a.url(), b.url());
    let args = synced_to(&both, &["--training-steps", "6", "--sync-deadline-s", "600"]);
    let learner = Learner::spawn(model.path(), &api, &save, &args);
    api.wait_registered(4);
    api.post("/scored_data_list", &json!([group(1), group(2)]));
    wait_until(Duration::from_secs(60), "version 1 on both sidecars", || {
        a.health().map(|h| h.0) == Some(1) && b.health().map(|h| h.0) == Some(1)
    });
    b.proc.signal("-STOP");
    api.post("/scored_data_list", &json!((3..13).map(group).collect::<Vec<_>>()));
    // Under the old all-sidecars round, A would wait out B's 600 s deadline here.
    let frozen = common::try_wait_until(Duration::from_secs(90), "version 6 on A while B is frozen", || {
        a.health().map(|h| h.0) == Some(6)
    });
    b.proc.signal("-CONT");
    frozen.unwrap_or_else(|e| panic!("{e}\n{}", learner.log()));
    assert_eq!(metrics(&save).len(), 6, "training went on");
    wait_until(Duration::from_secs(60), "B catches up to version 6", || {
        b.health().map(|h| h.0) == Some(6)
    });
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    let final_digest = digest_of_dir(&save.join("final_model"));
    assert_eq!(a.digest().1, final_digest);
    assert_eq!(b.digest().1, final_digest);
}

#[test]
fn a_resumed_learner_republishes_its_weights() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let (http, grpc) = (common::free_port(), common::free_port());
    let sidecar = Sidecar::start_on(model.path(), &work.path().join("sidecar"), http, grpc);
    let api = RunApi::start();
    let save = work.path().join("run");
    let url = sidecar.url();
    let args = synced_to(&url, &["--training-steps", "6", "--checkpoint-interval", "2"]);
    let learner = Learner::spawn(model.path(), &api, &save, &args);
    api.wait_registered(4);
    api.post("/scored_data_list", &json!((0..4).map(group).collect::<Vec<_>>()));
    wait_until(Duration::from_secs(60), "step_2", || {
        save.join("step_2/training_state/state.json").is_file()
    });
    learner.signal("-KILL");
    let _ = learner.wait(Duration::from_secs(30));
    // A fresh sidecar (base weights) and a resumed learner: the sidecar must get step 2's weights.
    drop(sidecar);
    let sidecar = Sidecar::start_on(model.path(), &work.path().join("sidecar2"), http, grpc);
    assert_eq!(sidecar.health().map(|h| h.0), Some(0));
    let resumed = Learner::spawn(model.path(), &api, &save, &[&args[..], &["--resume"]].concat());
    wait_until(Duration::from_secs(60), "the resumed version", || {
        sidecar.health().map(|h| h.0) == Some(2)
    });
    assert_eq!(sidecar.digest().1, digest_of_dir(&save.join("step_2")));
    drop(resumed);
}

#[test]
fn checkpoint_mode_reloads_the_sidecar_from_checkpoints() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let save = work.path().join("run");
    std::fs::create_dir_all(&save).expect("save dir");
    let root = ["--checkpoint-root", path_str(&save)];
    let sidecar = Sidecar::start_with(model.path(), &work.path().join("sidecar"), &root);
    // A reload from outside the root is refused, whatever the path looks like.
    for outside in [path_str(model.path()).to_string(), format!("{}/../..", save.display())] {
        let err = sidecar
            .rt
            .block_on(async {
                sidecar
                    .client(Some(TOKEN))
                    .load_checkpoint(&outside, PolicyVersion(9), false)
                    .await
            })
            .expect_err("outside the root");
        assert!(
            err.to_string().contains("outside --checkpoint-root"),
            "{outside}: {err}"
        );
    }
    let api = RunApi::start();
    let url = sidecar.url();
    let args = synced_to(
        &url,
        &[
            "--training-steps",
            "4",
            "--weight-bridge-mode",
            "checkpoint",
            "--vllm-restart-interval",
            "2",
        ],
    );
    let learner = Learner::spawn(model.path(), &api, &save, &args);
    api.wait_registered(4);
    api.post("/scored_data_list", &json!((0..8).map(group).collect::<Vec<_>>()));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    wait_until(Duration::from_secs(30), "version 4", || {
        sidecar.health().map(|h| h.0) == Some(4)
    });
    assert_eq!(sidecar.digest().1, digest_of_dir(&save.join("final_model")));
    assert!(save.join("sync_step_4/config.json").is_file());
    // The reload after step 2 happened too (asynchronously: training does not wait for it),
    // besides the one after step 4.
    let loads = common::scraped(
        &format!("http://127.0.0.1:{}/metrics", sidecar.http),
        "grpo_weight_updates",
        Some(("reason", "checkpoint_loaded")),
    );
    assert!(loads >= 2.0, "checkpoint reloads: {loads}: {log}");
}

#[test]
fn shared_mode_serves_the_learners_own_tensors() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let api = RunApi::start();
    let save = work.path().join("run");
    let http = common::free_port();
    let listen = format!("127.0.0.1:{http}");
    let learner = Learner::spawn(
        model.path(),
        &api,
        &save,
        &["--training-steps", "2", "--colocate-engine", "--engine-listen", &listen],
    );
    api.wait_registered(4);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let get_version = || -> Option<u64> {
        rt.block_on(async {
            let r = reqwest::get(format!("http://{listen}/info")).await.ok()?;
            r.json::<Value>().await.ok()?["version"].as_u64()
        })
    };
    wait_until(Duration::from_secs(30), "the colocated engine", || {
        get_version() == Some(0)
    });
    api.post("/scored_data_list", &json!([group(1), group(2)]));
    wait_until(Duration::from_secs(60), "step 1", || get_version() == Some(1));
    // Generate from the colocated engine right after step 1 and train on it: ratio ~1.
    let engine = SharedEngine {
        listen: listen.clone(),
        rt: &rt,
    };
    let batch = json!([engine.group(&[5, 6, 7, 8], 1), engine.group(&[9, 10, 11], 2)]);
    api.post("/scored_data_list", &batch);
    let (code, log) = learner.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    let canary = metrics(&save)[1]["logprob_diff_abs_mean"].as_f64().expect("diff");
    assert!(
        canary < 1e-4,
        "the engine did not serve the learner's step-1 tensors: {canary}"
    );
}

struct SharedEngine<'a> {
    listen: String,
    rt: &'a tokio::runtime::Runtime,
}

impl SharedEngine<'_> {
    fn group(&self, prompt: &[i64], seed: u64) -> Value {
        let url = format!("http://{}/generate", self.listen);
        let body = generate_body(prompt, seed);
        let r: Value = self.rt.block_on(async {
            reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json")
        });
        group_from_reply(prompt, &r)
    }
}

#[test]
fn a_sidecar_that_dials_in_is_registered_and_synced() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let learner_grpc = common::free_port();
    let api = RunApi::start();
    let save = work.path().join("run");
    let grpc_listen = format!("127.0.0.1:{learner_grpc}");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let learner = Learner::spawn(
        model.path(),
        &api,
        &save,
        &[
            "--training-steps",
            "2",
            "--grpc-listen",
            &grpc_listen,
            "--auth-token",
            TOKEN,
            "--metrics-listen",
            &listen,
        ],
    );
    api.wait_registered(4);
    // The sidecar knows only the learner's address; the learner learns the sidecar's from it.
    let (http, grpc) = (common::free_port(), common::free_port());
    let learner_url = format!("http://{grpc_listen}");
    let sidecar = Sidecar::spawn(
        model.path(),
        &work.path().join("sidecar"),
        http,
        grpc,
        &["--learner-url", &learner_url],
    );
    let prom = format!("http://{listen}/metrics");
    let sidecar_url = format!("http://127.0.0.1:{grpc}");
    wait_until(Duration::from_secs(60), "registration and the first sync", || {
        let tracked = sidecar
            .rt
            .block_on(async { reqwest::get(&prom).await.ok()?.text().await.ok() });
        let tracked = tracked
            .and_then(|b| openmetrics_parser::openmetrics::parse_openmetrics(&b).ok())
            .and_then(|exp| prom_value(&exp, "grpo_sidecar_policy_version", Some(("sidecar", &sidecar_url))));
        sidecar.health().is_some() && tracked.is_some()
    });
    api.post("/scored_data_list", &json!((0..4).map(group).collect::<Vec<_>>()));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    wait_until(Duration::from_secs(30), "version 2", || {
        sidecar.health().map(|h| h.0) == Some(2)
    });
    assert_eq!(sidecar.digest().1, digest_of_dir(&save.join("final_model")));
}

/// The engine swaps weights only between generation rounds, so a commit can wait for a long
/// round. The health check must still answer at once: the learner reads a slow answer as a
/// dead sidecar. It is read from the receiver's health board, not queued behind the commit.
#[test]
fn health_answers_while_a_commit_waits_for_a_generation_round() {
    let model = common::tiny_model("llama", &["--hidden", "128", "--layers", "4", "--intermediate", "256"]);
    let work = tempfile::tempdir().expect("work");
    let sidecar = Sidecar::start(model.path(), work.path());
    let weights = Arc::new(weights_of_dir(model.path()));
    // The round must already run when the commit arrives; a try where it did not (the commit
    // returned quickly) proves nothing either way and is made again.
    for version in 1..=4u64 {
        let generate = format!("http://127.0.0.1:{}/generate", sidecar.http);
        let round = std::thread::spawn(move || {
            let body = json!({"prompt": {"prompt_token_ids": [5, 6, 7]}, "n": 32, "max_tokens": 300,
                              "temperature": 1.0, "seed": version, "ignore_eos": true});
            let rt = tokio::runtime::Runtime::new().expect("rt");
            rt.block_on(async {
                reqwest::Client::new()
                    .post(generate)
                    .json(&body)
                    .send()
                    .await?
                    .bytes()
                    .await
            })
            .map_err(|e| e.to_string())
        });
        let client = {
            let _rt = sidecar.rt.enter();
            sidecar.client(Some(TOKEN))
        };
        let set = weights.clone();
        let publish = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("rt");
            let started = Instant::now();
            rt.block_on(client.publish(set, PolicyVersion(version), 1 << 20))
                .expect("publish");
            started.elapsed()
        });
        let (mut slowest, mut checks) = (Duration::ZERO, 0);
        while !publish.is_finished() {
            let asked = Instant::now();
            let health = sidecar.health();
            slowest = slowest.max(asked.elapsed());
            assert!(health.is_some(), "health failed during a publish");
            checks += 1;
            // Until the publish ends, or the next check is due.
            let _ = common::try_wait_until(Duration::from_millis(20), "the publish", || publish.is_finished());
        }
        let took = publish.join().expect("publish thread");
        if let Err(e) = round.join().expect("generation thread") {
            panic!("generate: {e}\n{}", sidecar.proc.log());
        }
        assert_eq!(sidecar.health(), Some((version, false)), "version {version} served");
        if took < Duration::from_millis(1500) {
            continue;
        }
        // Behind the commit in the mailbox, a check would wait for most of the round.
        assert!(
            slowest < Duration::from_millis(750),
            "the slowest of {checks} health checks took {slowest:?} during a {took:?} publish"
        );
        return;
    }
    panic!("no publish overlapped a generation round of at least 1.5 s");
}

#[test]
fn a_grpc_listener_off_loopback_needs_a_token() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let api = RunApi::start();
    let refused = |args: Vec<String>, what: &str| {
        let proc = Learner::spawn_args(&args, &work.path().join(what));
        let (code, log) = proc.wait(Duration::from_secs(60));
        assert_ne!(code, 0, "{what} started without a token: {log}");
        assert!(
            log.contains("--grpc-listen") && log.contains("--auth-token-file"),
            "{what}: {log}"
        );
    };
    let sidecar: Vec<String> = ["--role", "inference-sidecar", "--model-name", path_str(model.path())]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--grpc-listen".into(),
            "0.0.0.0:0".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ])
        .collect();
    refused(sidecar, "sidecar");
    let http_open: Vec<String> = ["--role", "inference-sidecar", "--model-name", path_str(model.path())]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--grpc-listen".into(),
            "127.0.0.1:0".into(),
            "--listen".into(),
            "0.0.0.0:0".into(),
        ])
        .collect();
    let proc = Learner::spawn_args(&http_open, &work.path().join("http-open"));
    let (code, log) = proc.wait(Duration::from_secs(60));
    assert_ne!(code, 0, "an HTTP listener off loopback started without a token: {log}");
    assert!(log.contains("--listen") && log.contains("--auth-token-file"), "{log}");
    let save = work.path().join("run");
    let learner: Vec<String> = ["--role", "learner", "--model-name", path_str(model.path())]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--atropos-url".into(),
            api.url(),
            "--save-path".into(),
            path_str(&save).into(),
        ])
        .chain(["--grpc-listen".into(), "0.0.0.0:0".into()])
        .collect();
    refused(learner, "learner");
}

/// `Info` names the model's directory only to a caller that presented the token; a sidecar
/// without one (loopback only) answers with an empty path.
#[test]
fn info_names_the_model_directory_only_behind_the_token() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let with_token = Sidecar::start(model.path(), &work.path().join("a"));
    let info = with_token
        .rt
        .block_on(async { with_token.client(Some(TOKEN)).info().await })
        .expect("info");
    assert_eq!(info.model_dir, path_str(model.path()));
    drop(with_token);

    let grpc = common::free_port();
    let args: Vec<String> = ["--role", "inference-sidecar", "--model-name", path_str(model.path())]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--listen".into(),
            format!("127.0.0.1:{}", common::free_port()),
            "--grpc-listen".into(),
            format!("127.0.0.1:{grpc}"),
        ])
        .collect();
    let _open = Learner::spawn_args(&args, &work.path().join("b"));
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let _in_rt = rt.enter();
    let client = SidecarClient::new(
        &format!("http://127.0.0.1:{grpc}"),
        Token(None),
        Deadlines {
            rpc: Duration::from_secs(5),
            min_bytes_per_s: 20e6,
        },
    )
    .expect("client");
    let mut info = None;
    wait_until(Duration::from_secs(60), "the open sidecar", || {
        info = rt.block_on(client.info()).ok();
        info.is_some()
    });
    let info = info.expect("info");
    assert_eq!(info.model_dir, "", "no path without the token");
    assert!(info.parameters > 0, "the rest of Info is still there");
}

/// Both nodes serve Prometheus `/metrics`; a strict OpenMetrics parser reads them, and their
/// numbers agree with what happened: 3 steps, one rejected group, every version on the sidecar.
#[test]
fn prometheus_metrics_on_the_learner_and_the_sidecar_parse_and_agree() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let sidecar = Sidecar::start(model.path(), &work.path().join("sidecar"));
    let api = RunApi::start();
    let save = work.path().join("run");
    let metrics_port = common::free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let learner = Learner::spawn(
        model.path(),
        &api,
        &save,
        &synced_to(&sidecar.url(), &["--training-steps", "10", "--metrics-listen", &listen]),
    );
    api.wait_registered(4);
    let mut bad = group(9);
    bad["tokens"][0][6] = json!(999_999);
    bad["masks"][0][6] = json!(999_999);
    let groups = vec![group(0), bad, group(1), group(2), group(3), group(4)];
    api.post("/scored_data_list", &json!(groups));
    wait_until(Duration::from_secs(120), "3 steps", || metrics(&save).len() == 3);
    wait_until(Duration::from_secs(30), "version 3 on the sidecar", || {
        sidecar.health().map(|h| h.0) == Some(3)
    });
    let r = sidecar.generate(json!({"prompt": {"prompt_token_ids": [3, 4, 5]}, "max_tokens": 4}));
    assert!(r["text"].is_array(), "{r}");

    let learner_url = format!("http://{listen}/metrics");
    let mut l = scrape(&sidecar.rt, &learner_url);
    wait_until(Duration::from_secs(10), "the learner's gauges of version 3", || {
        l = scrape(&sidecar.rt, &learner_url);
        prom_value(&l, "grpo_sidecar_policy_version", Some(("sidecar", &sidecar.url()))) == Some(3.0)
    });
    assert_eq!(prom_value(&l, "grpo_steps", None), Some(3.0));
    assert_eq!(
        prom_value(&l, "grpo_rejected_groups", Some(("reason", "token_out_of_vocab"))),
        Some(1.0)
    );
    assert_eq!(prom_value(&l, "grpo_sidecar_staleness_versions", None), Some(0.0));
    for phase in ["total", "begin", "stream", "commit"] {
        let sends = prom_value(&l, "grpo_sync_seconds", Some(("phase", phase)));
        assert!(sends.is_some_and(|n| n >= 3.0), "{phase}: {sends:?}");
    }
    assert!(prom_value(&l, "grpo_sync_bytes", None).is_some_and(|b| b > 0.0));
    assert_eq!(prom_value(&l, "grpo_api_wait_seconds", None), Some(3.0));
    // Endpoint discovery: the learner lists the sidecar's /generate and the version it serves,
    // to callers with the token only.
    let url = format!("http://{listen}/endpoints");
    let denied = sidecar.rt.block_on(reqwest::get(&url)).expect("GET /endpoints");
    assert_eq!(denied.status().as_u16(), 401, "no token, no endpoints");
    let endpoints: serde_json::Value = sidecar
        .rt
        .block_on(async {
            let c = reqwest::Client::new();
            c.get(&url).bearer_auth(TOKEN).send().await?.json().await
        })
        .expect("/endpoints");
    let list = endpoints["endpoints"].as_array().expect("a list");
    assert_eq!(list.len(), 1, "{endpoints}");
    assert_eq!(list[0]["sidecar"], json!(sidecar.url()));
    assert_eq!(
        list[0]["generate_url"],
        json!(format!("http://127.0.0.1:{}/generate", sidecar.http))
    );
    assert_eq!(list[0]["policy_version"], json!(3));
    assert_eq!(list[0]["healthy"], json!(true));
    assert_eq!(list[0]["engine"], json!("embedded"));
    assert!(prom_value(&l, "grpo_loss", None).is_some_and(f64::is_finite));
    assert!(prom_value(&l, "grpo_queue_depth", Some(("queue", "batches"))).is_some());

    let s = scrape(&sidecar.rt, &format!("http://127.0.0.1:{}/metrics", sidecar.http));
    assert_eq!(prom_value(&s, "grpo_policy_version", None), Some(3.0));
    assert_eq!(prom_value(&s, "grpo_engine_up", None), Some(1.0));
    assert!(prom_value(&s, "grpo_weight_updates", Some(("reason", "installed"))).is_some_and(|n| n >= 3.0));
    assert_eq!(
        prom_value(&s, "grpo_generate_requests", Some(("code", "200"))),
        Some(1.0)
    );
    assert!(prom_value(&s, "grpo_generated_tokens", None).is_some_and(|n| n >= 1.0));
    drop(learner);
}

/// gRPC over TLS with a certificate made here: the learner verifies the sidecar against
/// --tls-ca and syncs every version; a client trusting another CA, or speaking plaintext, is
/// refused.
#[test]
fn weight_sync_runs_over_verified_tls() {
    let model = common::tiny_model("llama", &[]);
    let work = tempfile::tempdir().expect("work");
    let pem = |names: Vec<String>| {
        let c = rcgen::generate_simple_self_signed(names).expect("cert");
        (c.cert.pem(), c.signing_key.serialize_pem())
    };
    let (cert, key) = pem(vec!["localhost".into(), "127.0.0.1".into()]);
    let (other, _) = pem(vec!["localhost".into(), "127.0.0.1".into()]);
    let file = |name: &str, text: &str| {
        let p = work.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (cert_file, key_file) = (file("cert.pem", &cert), file("key.pem", &key));
    let (http, grpc) = (common::free_port(), common::free_port());
    let tls_args = ["--tls-cert", path_str(&cert_file), "--tls-key", path_str(&key_file)];
    let sidecar = Sidecar::spawn(model.path(), &work.path().join("sidecar"), http, grpc, &tls_args);
    let url = format!("https://127.0.0.1:{grpc}");
    let client = |ca: Option<&str>, url: &str| {
        let tls = grpo_node::rpc::tls::Tls {
            identity: None,
            ca: ca.map(String::from),
        };
        let deadlines = Deadlines {
            rpc: Duration::from_secs(5),
            min_bytes_per_s: 20e6,
        };
        let _rt = sidecar.rt.enter();
        SidecarClient::with_tls(url, Token(Some(TOKEN.into())), deadlines, &tls).expect("client")
    };
    let version = |c: &SidecarClient| sidecar.rt.block_on(c.health()).map(|h| h.version.map_or(0, |v| v.step));
    let trusted = client(Some(&cert), &url);
    wait_until(Duration::from_secs(60), "the TLS sidecar", || version(&trusted).is_ok());

    let api = RunApi::start();
    let save = work.path().join("run");
    let ca_file = path_str(&cert_file);
    let learner = Learner::spawn(
        model.path(),
        &api,
        &save,
        &synced_to(&url, &["--training-steps", "2", "--tls-ca", ca_file]),
    );
    api.wait_registered(4);
    api.post("/scored_data_list", &json!((0..4).map(group).collect::<Vec<_>>()));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    wait_until(Duration::from_secs(30), "version 2 over TLS", || {
        version(&trusted).ok() == Some(2)
    });

    let untrusted = client(Some(&other), &url);
    assert!(
        version(&untrusted).is_err(),
        "a certificate from another CA must not verify"
    );
    let plaintext = client(None, &format!("http://127.0.0.1:{grpc}"));
    assert!(version(&plaintext).is_err(), "plaintext is not served");
    drop(sidecar);
}

/// The base model with the PEFT adapter in `adapter`, as our transformer (fp32, CPU).
fn adapted_model(base: &Path, adapter: &Path) -> Transformer {
    let spec = ModelSpec::from_dir(base).expect("spec");
    let params = load_params(&spec, base, Device::Cpu).expect("params");
    let (lora, tensors) = grpo_node::model::lora::load_adapter(adapter, &spec).expect("adapter");
    Transformer::new(&spec, &params)
        .expect("model")
        .with_lora(&lora, &tensors)
        .expect("bind")
}

fn served_vs(sidecar: &Sidecar, model: &Transformer) -> f64 {
    let prompt = vec![3i64, 14, 15, 92, 65];
    let r = sidecar.generate(json!({"prompt": {"prompt_token_ids": prompt}, "max_tokens": 8, "temperature": 0.0, "logprobs": 0, "ignore_eos": true}));
    let (out, served) = common::completions(&r).remove(0);
    let learner = common::learner_logprobs(model, &prompt, &out, 1.0);
    served
        .iter()
        .zip(&learner)
        .map(|(s, l)| (s - l).abs())
        .fold(0.0, f64::max)
}

const LORA_ARGS: [&str; 6] = [
    "--lora-r",
    "4",
    "--lora-alpha",
    "8",
    "--lora-target-modules",
    "q_proj,v_proj,down_proj",
];

/// `--weight-bridge-mode lora`: only the adapter moves; the embedded engine serves the base
/// with the newest adapter, whose logprobs equal the learner's final adapter's (written in PEFT
/// format as `final_adapter/`, next to `adapter_step_N/` with its training state).
#[test]
fn lora_mode_hot_swaps_the_adapter_into_the_engine() {
    lora_mode_serves_the_final_adapter(&[], &LORA_ARGS);
}

/// An adapter larger than one slice of InstallAdapter's stream (r=1024 on all seven modules of
/// a 256-wide model: 46 MiB in fp32, three 16 MiB slices) crosses whole: the engine serves it
/// exactly.
#[test]
fn a_large_adapter_crosses_in_slices() {
    let wide = ["--hidden", "256", "--intermediate", "1024"];
    let bytes = lora_mode_serves_the_final_adapter(
        &wide,
        &[
            "--lora-r",
            "1024",
            "--lora-alpha",
            "1024",
            "--lora-target-modules",
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        ],
    );
    let slice = grpo_node::sync::client::ADAPTER_CHUNK_BYTES as u64;
    assert!(bytes > 2 * slice, "the adapter ({bytes} bytes) must need three slices");
}

/// Returns the size of the final adapter's safetensors file.
fn lora_mode_serves_the_final_adapter(model_args: &[&str], lora_args: &[&str]) -> u64 {
    let model = common::tiny_model("llama", model_args);
    let work = tempfile::tempdir().expect("work");
    let sidecar = Sidecar::start(model.path(), &work.path().join("sidecar"));
    let api = RunApi::start();
    let save = work.path().join("run");
    let mut extra = vec![
        "--training-steps",
        "3",
        "--weight-bridge-mode",
        "lora",
        "--checkpoint-interval",
        "2",
    ];
    extra.extend(lora_args);
    let learner = Learner::spawn(model.path(), &api, &save, &synced_to(&sidecar.url(), &extra));
    api.wait_registered_by(4, &learner);
    api.post("/scored_data_list", &json!((0..6).map(group).collect::<Vec<_>>()));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    wait_until(Duration::from_secs(30), "version 3 on the sidecar", || {
        sidecar.health().map(|h| h.0) == Some(3)
    });
    assert!(save.join("final_adapter/adapter_config.json").is_file());
    assert!(save.join("adapter_step_2/training_state/state.json").is_file());
    assert!(
        !save.join("final_model").exists(),
        "no merged model without --merge-lora-on-save"
    );
    let trained = adapted_model(model.path(), &save.join("final_adapter"));
    let diff = served_vs(&sidecar, &trained);
    assert!(diff < 1e-5, "served vs the learner's final adapter: {diff}");
    // The adapter changed the model: the base alone gives other logprobs.
    let spec = ModelSpec::from_dir(model.path()).expect("spec");
    let base = Transformer::new(&spec, &load_params(&spec, model.path(), Device::Cpu).expect("params")).expect("base");
    let moved = served_vs(&sidecar, &base);
    assert!(moved > 1e-4, "the adapter must matter: {moved}");
    // The sidecar installed the adapters and checked the learner's canary on each (its
    // /metrics: publications run beside training, so a step's record may predate them).
    let prom = format!("http://127.0.0.1:{}/metrics", sidecar.http);
    let installs = common::scraped(&prom, "grpo_weight_updates", Some(("reason", "installed")));
    assert!(installs >= 1.0, "adapter installs: {installs}");
    let canary = common::scraped(&prom, "grpo_sync_canary_max_abs_diff", None);
    assert!(canary < 1e-5, "the last adapter's canary: {canary}");
    let canaries: Vec<f64> = metrics(&save)
        .iter()
        .filter_map(|r| r["sync_canary_max_abs_diff"].as_f64())
        .collect();
    assert!(canaries.iter().all(|&c| c < 1e-5), "canaries {canaries:?}");
    let file = save.join("final_adapter/adapter_model.safetensors");
    std::fs::metadata(file).expect("adapter file").len()
}

/// `--weight-bridge-mode lora-restart` with `--merge-lora-on-save`: every interval the sidecar
/// reloads the newest adapter directory; the merged model lands beside the adapter.
#[test]
fn lora_restart_mode_serves_the_newest_adapter_checkpoint() {
    let model = common::tiny_model("qwen2", &[]);
    let work = tempfile::tempdir().expect("work");
    let save = work.path().join("run");
    std::fs::create_dir_all(&save).expect("save dir");
    let root = ["--checkpoint-root", path_str(&save)];
    let sidecar = Sidecar::start_with(model.path(), &work.path().join("sidecar"), &root);
    let api = RunApi::start();
    let mut extra = vec![
        "--training-steps",
        "4",
        "--weight-bridge-mode",
        "lora_restart",
        "--vllm-restart-interval",
        "2",
        "--merge-lora-on-save",
    ];
    extra.extend(LORA_ARGS);
    let url = sidecar.url();
    let learner = Learner::spawn(model.path(), &api, &save, &synced_to(&url, &extra));
    api.wait_registered(4);
    api.post("/scored_data_list", &json!((0..8).map(group).collect::<Vec<_>>()));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    wait_until(Duration::from_secs(30), "version 4", || {
        sidecar.health().map(|h| h.0) == Some(4)
    });
    assert!(save.join("sync_adapter_step_4/adapter_model.safetensors").is_file());
    assert!(save.join("final_model/config.json").is_file(), "merged on save");
    let diff = served_vs(&sidecar, &adapted_model(model.path(), &save.join("final_adapter")));
    assert!(diff < 1e-5, "served vs the final adapter: {diff}");
    // The merged checkpoint is that same model.
    let spec = ModelSpec::from_dir(&save.join("final_model")).expect("spec");
    let merged = Transformer::new(
        &spec,
        &load_params(&spec, &save.join("final_model"), Device::Cpu).expect("p"),
    )
    .expect("m");
    assert!(served_vs(&sidecar, &merged) < 1e-4);
}
