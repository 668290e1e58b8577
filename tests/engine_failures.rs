//! The embedded engine's failures surface: a model that does not build is the start call's
//! error, a panicking generation round is caught and counted while the engine serves on, and
//! `/health` comes from the engine thread's heartbeat (a wedged engine reads unhealthy, so the
//! learner stops sending it full syncs until it beats again).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use grpo_node::engine::core::{EngineError, EngineHandle, JobParams};
use grpo_node::engine::{http, load, BatchConfig};
use grpo_node::model::ParamStore;
use tch::Device;

fn batch() -> BatchConfig {
    BatchConfig {
        max_rows: 8,
        window: Duration::from_millis(2),
    }
}

async fn until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_model_that_does_not_build_fails_the_start_call() {
    let dir = common::tiny_model("llama", &[]);
    let mut model = load::load(dir.path(), Device::Cpu).expect("load");
    let kept: BTreeMap<String, tch::Tensor> = model
        .params
        .iter()
        .filter(|(n, _)| !n.contains("layers.0.self_attn.q_proj"))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    model.params = ParamStore::from_tensors(kept);
    let err = EngineHandle::start(model, batch())
        .err()
        .expect("a model missing a tensor must not start");
    assert!(
        err.to_string().contains("q_proj"),
        "the error names what is missing: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_round_is_caught_counted_and_the_engine_serves_on() {
    let dir = common::tiny_model("llama", &[]);
    let engine = EngineHandle::start(load::load(dir.path(), Device::Cpu).expect("load"), batch()).expect("engine");
    // A token id far outside the vocabulary makes libtorch's embedding lookup panic inside the
    // round (the HTTP layer rejects such ids first; the engine must survive them anyway).
    let bad = engine
        .generate(vec![engine.vocab_size * 1000], JobParams::greedy(2))
        .await;
    assert!(matches!(bad, Err(EngineError::RoundFailed(_))), "{bad:?}");
    assert_eq!(engine.pulse.round_panics(), 1);
    let good = engine
        .generate(vec![1, 2, 3], JobParams::greedy(3))
        .await
        .expect("serves on");
    assert_eq!(good[0].token_ids.len(), 3);
    assert!(engine.pulse.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_engine_reads_unhealthy_until_it_beats_again() {
    let dir = common::tiny_model("llama", &[]);
    let mut model = load::load(dir.path(), Device::Cpu).expect("load");
    // Shared-weights mode: a round waits for the gate. Holding it write-locked wedges the
    // engine thread inside a round, as a stuck kernel or a never-ending step would.
    let gate = Arc::new(RwLock::new(()));
    model.gate = Some(gate.clone());
    let engine = EngineHandle::start_with(model, batch(), Duration::from_millis(400)).expect("engine");
    let pulse = engine.pulse.clone();
    let shared: grpo_node::engine::inference::SharedEngine = Arc::new(engine.clone());
    let (addr, _) = http::serve(
        "127.0.0.1:0".parse().expect("addr"),
        shared,
        http::HttpPolicy::default(),
    )
    .await
    .expect("serve");
    let health = || async move {
        let url = format!("http://{addr}/health");
        reqwest::get(url).await.expect("health").status().as_u16()
    };
    assert_eq!(health().await, 200);

    // The write lock is held on its own thread until released.
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder_gate = gate.clone();
    let holder = std::thread::spawn(move || {
        let _held = holder_gate.write().expect("gate");
        let _ = held_tx.send(());
        let _ = release_rx.recv();
    });
    held_rx.recv().expect("the gate is held");
    let stuck = tokio::spawn(async move { engine.generate(vec![1, 2], JobParams::greedy(2)).await });
    until("the stall to show", Duration::from_secs(10), || !pulse.alive()).await;
    assert_eq!(health().await, 503, "a wedged engine is not healthy");
    assert!(!stuck.is_finished());

    release_tx.send(()).expect("release");
    holder.join().expect("holder");
    let done = stuck.await.expect("join").expect("the round finishes once unwedged");
    assert_eq!(done[0].token_ids.len(), 2);
    until("the heartbeat to come back", Duration::from_secs(10), || pulse.alive()).await;
    assert_eq!(health().await, 200);
}
