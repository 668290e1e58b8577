//! The learner binary against the real Atropos API (`run-api` from PyPI atroposlib 0.4.0) on
//! a free loopback port: registration, null batches, the wedge, rejection of malformed groups,
//! checkpoints on disk, an API restart, SIGTERM, and kill -9 followed by `--resume`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{metrics, wait_until, Learner, RunApi};
use grpo_node::rpc::pb::learner_client::LearnerClient;
use grpo_node::rpc::pb::StatusRequest;
use serde_json::{json, Value};

const VOCAB: i64 = 512;

/// A group of two sequences with valid rollout logprobs; `salt` varies the content.
fn group(salt: i64) -> Value {
    let seq = |k: i64| -> (Vec<i64>, Vec<i64>, Vec<f64>) {
        let tokens: Vec<i64> = (0..12).map(|i| (salt * 53 + k * 7 + i * 29 + 1) % VOCAB).collect();
        let masks = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < 5 { -100 } else { t })
            .collect();
        let lps = (0..12)
            .map(|i| {
                if i < 5 {
                    1.0
                } else {
                    -5.0 - 0.1 * ((i + salt) % 7) as f64
                }
            })
            .collect();
        (tokens, masks, lps)
    };
    let (a, b) = (seq(0), seq(1));
    json!({"tokens": [a.0, b.0], "masks": [a.1, b.1], "scores": [1.0, (salt % 3) as f64 * 0.25],
           "inference_logprobs": [a.2, b.2], "generation_params": {"temperature": 1.0}, "env_id": null})
}

#[test]
fn registers_polls_null_batches_trains_and_checkpoints() {
    let model = common::tiny_model("llama", &[]);
    let api = RunApi::start();
    let save = tempfile::tempdir().expect("save");
    let learner = Learner::spawn(
        model.path(),
        &api,
        save.path(),
        &["--training-steps", "3", "--checkpoint-interval", "2"],
    );
    api.wait_registered(4);
    assert_eq!(api.get("/info").expect("info")["max_token_len"], 64);
    // An environment can only register after the trainer's first /batch: proves we poll.
    wait_until(Duration::from_secs(30), "env registration", || {
        api.post(
            "/register-env",
            &json!({"max_token_length": 64, "desired_name": "t", "weight": 1.0, "group_size": 2}),
        )["status"]
            == "success"
    });
    let batches: Vec<Value> = (0..6).map(group).collect();
    assert_eq!(api.post("/scored_data_list", &json!(batches))["groups_processed"], 6);
    let (code, log) = learner.wait(Duration::from_secs(180));
    assert_eq!(code, 0, "{log}");
    let m = metrics(save.path());
    assert_eq!(
        m.iter().map(|r| r["step"].as_u64().expect("step")).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for r in &m {
        assert_eq!(r["sequences"], 4);
        assert_eq!(r["tokens"], 4 * 7);
        for key in [
            "loss",
            "grad_norm",
            "lr",
            "mean_ratio",
            "clipped_fraction",
            "logprob_diff_mean",
            "logprob_diff_abs_mean",
            "logprob_diff_max",
            "rejected_groups",
            "step_time_s",
            "wait_time_s",
        ] {
            assert!(r.get(key).is_some_and(Value::is_number), "{key} missing in {r}");
        }
    }
    for dir in ["step_2", "step_3", "final_model"] {
        let d = save.path().join(dir);
        assert!(
            d.join("config.json").is_file() && d.join("model.safetensors").is_file(),
            "{dir} incomplete"
        );
    }
    assert!(save.path().join("step_2/training_state/state.json").is_file());
    assert_eq!(
        std::fs::read_dir(save.path().join("spool")).expect("spool").count(),
        0,
        "spool released after the final checkpoint"
    );
    assert!(log.contains("step 3/3"), "human progress line: {log}");
}

#[test]
fn wedged_api_is_explained_and_reset_api_recovers() {
    let model = common::tiny_model("llama", &[]);
    let api = RunApi::start();
    // An environment posts before any trainer registered: the API's wedge.
    assert_eq!(api.post("/scored_data", &group(1))["status"], "received");
    let save = tempfile::tempdir().expect("save");
    let (code, log) =
        Learner::spawn(model.path(), &api, save.path(), &["--training-steps", "1"]).wait(Duration::from_secs(120));
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("wedge") && log.contains("--reset-api") && log.contains("batch_size=-1"),
        "{log}"
    );

    let learner = Learner::spawn(
        model.path(),
        &api,
        save.path(),
        &["--training-steps", "1", "--reset-api"],
    );
    api.wait_registered(4);
    wait_until(Duration::from_secs(30), "polling", || api.get("/status").is_ok());
    api.post("/scored_data_list", &json!([group(2), group(3)]));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    assert_eq!(metrics(save.path()).len(), 1);
}

#[test]
fn malformed_groups_are_rejected_counted_and_never_trained() {
    let model = common::tiny_model("llama", &[]);
    let api = RunApi::start();
    let save = tempfile::tempdir().expect("save");
    let learner = Learner::spawn(model.path(), &api, save.path(), &["--training-steps", "1"]);
    api.wait_registered(4);
    let mut positive = group(7);
    positive["inference_logprobs"][0][8] = json!(0.5);
    let mut out_of_vocab = group(8);
    out_of_vocab["tokens"][1][9] = json!(VOCAB + 5);
    out_of_vocab["masks"][1][9] = json!(VOCAB + 5);
    // Served LIFO: the bad batch (posted last) comes first and must not make a step.
    api.post(
        "/scored_data_list",
        &json!([group(5), group(6), positive, out_of_vocab]),
    );
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
    let m = metrics(save.path());
    assert_eq!(m.len(), 1, "only the good batch trained");
    assert_eq!(m[0]["rejected_groups"], 2);
    assert_eq!(
        m[0]["rejected_by_reason"],
        json!({"logprobs_invalid": 1, "token_out_of_vocab": 1})
    );
}

#[test]
fn survives_an_api_restart() {
    let model = common::tiny_model("llama", &[]);
    let mut api = RunApi::start();
    let port = api.port;
    let save = tempfile::tempdir().expect("save");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let prom = format!("http://{listen}/metrics");
    let learner = Learner::spawn(
        model.path(),
        &api,
        save.path(),
        &[
            "--training-steps",
            "1",
            "--poll-max-ms",
            "200",
            "--metrics-listen",
            &listen,
        ],
    );
    api.wait_registered(4);
    api.kill();
    wait_until(Duration::from_secs(30), "the learner to meet the dead API", || {
        common::scraped(&prom, "grpo_api_errors", None) >= 1.0
    });
    let api = RunApi::start_on(port);
    api.wait_registered_by(4, &learner); // the learner noticed "not registered" and registered again
                                         // The API records the registration before the learner has its reply and counts it.
    wait_until(
        Duration::from_secs(30),
        "the learner to count its second registration",
        || common::scraped(&prom, "grpo_api_registrations", None) >= 2.0,
    );
    assert_eq!(
        common::scraped(&prom, "grpo_api_registrations", None),
        2.0,
        "registered again"
    );
    wait_until(Duration::from_secs(30), "env registration", || {
        api.post(
            "/register-env",
            &json!({"max_token_length": 64, "desired_name": "t", "weight": 1.0, "group_size": 2}),
        )["status"]
            == "success"
    });
    api.post("/scored_data_list", &json!([group(1), group(2)]));
    let (code, log) = learner.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{log}");
}

fn losses(save: &Path) -> Vec<(u64, f64)> {
    metrics(save)
        .iter()
        .map(|r| (r["step"].as_u64().expect("step"), r["loss"].as_f64().expect("loss")))
        .collect()
}

/// Both runs see the same data in the same order: three batches, then (after step 3) three more.
/// The killed run dies after step 3 with only step 2 checkpointed, so step 3's batch exists
/// nowhere but in the spool (the API already served it).
#[test]
fn kill_and_resume_matches_an_uninterrupted_run() {
    kill_and_resume(&["--training-steps", "6", "--checkpoint-interval", "2"], "step_2");
}

/// The same with LoRA training (dropout on, 8-bit AdamW): the resumed run restores the adapter
/// and its optimizer state from `adapter_step_2/` and its losses equal the uninterrupted run's.
#[test]
fn lora_kill_and_resume_matches_an_uninterrupted_run() {
    let args = [
        "--training-steps",
        "6",
        "--checkpoint-interval",
        "2",
        "--weight-bridge-mode",
        "lora",
        "--lora-r",
        "4",
        "--lora-target-modules",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "--optimizer",
        "adamw_8bit",
    ];
    kill_and_resume(&args, "adapter_step_2");
}

fn kill_and_resume(args: &[&str], checkpoint: &str) {
    let model = common::tiny_model("qwen2", &[]);
    let data: Vec<Value> = (0..12).map(group).collect();

    let api = RunApi::start();
    let straight = tempfile::tempdir().expect("save");
    let learner = Learner::spawn(model.path(), &api, straight.path(), args);
    api.wait_registered(4);
    api.post("/scored_data_list", &json!(data[..6]));
    wait_until(Duration::from_secs(120), "step 3", || {
        metrics(straight.path()).len() >= 3
    });
    api.post("/scored_data_list", &json!(data[6..]));
    let (code, log) = learner.wait(Duration::from_secs(180));
    assert_eq!(code, 0, "{log}");
    drop(api);

    let api = RunApi::start();
    let killed = tempfile::tempdir().expect("save");
    let learner = Learner::spawn(model.path(), &api, killed.path(), args);
    api.wait_registered(4);
    api.post("/scored_data_list", &json!(data[..6]));
    wait_until(Duration::from_secs(120), "step 3", || metrics(killed.path()).len() >= 3);
    wait_until(Duration::from_secs(60), "the step-2 checkpoint", || {
        killed
            .path()
            .join(checkpoint)
            .join("training_state/state.json")
            .is_file()
    });
    learner.signal("-KILL");
    let (code, _) = learner.wait(Duration::from_secs(30));
    assert_ne!(code, 0, "killed mid-run");
    let third = checkpoint.replace('2', "3");
    assert!(!killed.path().join(&third).exists(), "step 3 was not checkpointed");
    let resumed = Learner::spawn(model.path(), &api, killed.path(), &[args, &["--resume"]].concat());
    wait_until(Duration::from_secs(120), "the replayed step 3", || {
        metrics(killed.path()).iter().any(|r| r["step"] == 3)
    });
    api.post("/scored_data_list", &json!(data[6..]));
    let (code, log) = resumed.wait(Duration::from_secs(180));
    assert_eq!(code, 0, "{log}");
    // Step 3 trained on the spooled batch 3 (replayed, not fetched anew).
    let m = metrics(killed.path());
    let third = m.iter().find(|r| r["step"] == 3).expect("step 3");
    assert_eq!(third["batch_seq"], 3, "{third}");

    let (a, b) = (losses(straight.path()), losses(killed.path()));
    assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(
        b.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6],
        "no lost and no repeated steps"
    );
    for ((step, la), (_, lb)) in a.iter().zip(&b) {
        assert!(
            (la - lb).abs() <= 1e-6 * la.abs().max(1e-6),
            "step {step}: {la} uninterrupted vs {lb} resumed"
        );
    }
}

#[test]
fn sigterm_drains_saves_and_exits_zero() {
    let model = common::tiny_model("llama", &[]);
    let api = RunApi::start();
    let save = tempfile::tempdir().expect("save");
    let grpc = format!("127.0.0.1:{}", common::free_port());
    let learner = Learner::spawn(
        model.path(),
        &api,
        save.path(),
        &[
            "--training-steps",
            "100",
            "--checkpoint-interval",
            "50",
            "--grpc-listen",
            &grpc,
        ],
    );
    api.wait_registered(4);
    api.post("/scored_data_list", &json!((0..6).map(group).collect::<Vec<_>>()));
    wait_until(Duration::from_secs(120), "a step", || !metrics(save.path()).is_empty());
    // The learner's gRPC service answers over a real socket while the run is live.
    let status = tokio::runtime::Runtime::new().expect("runtime").block_on(async {
        let mut client = LearnerClient::connect(format!("http://{grpc}")).await.expect("connect");
        client.status(StatusRequest {}).await.expect("status").into_inner()
    });
    assert_eq!(status.training_steps, 100);
    assert!(status.version.expect("version").step >= 1);
    assert!(status.last_step.expect("last step").loss.is_finite());
    learner.signal("-TERM");
    let (code, log) = learner.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    let last = metrics(save.path())
        .last()
        .and_then(|r| r["step"].as_u64())
        .expect("a step");
    let state = save.path().join(format!("step_{last}/training_state/state.json"));
    assert!(state.is_file(), "a checkpoint of the last step ({last}) on exit: {log}");
}
