//! The data-parallel learner on the CPU: ranks on threads of one process, each with its own
//! trainer, meeting through libtorch's c10d (a real TCPStore and ProcessGroupGloo on loopback).
//! N ranks must train what one rank trains: the same per-step losses (1e-5) and the same final
//! weights, whether a rank starts from other weights, resumes, or gets no micro-batch at all.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use grpo_node::comm::gloo::{Rendezvous, Store};
use grpo_node::grpo::TrainBatch;
use grpo_node::model::safetensors_io::load_params;
use grpo_node::model::{ModelSpec, ParamStore};
use grpo_node::train::data_parallel::DataParallel;
use grpo_node::train::{ComputeConfig, TrainError, Trainer, TrainerConfig};
use serde_json::{json, Value};
use tch::{Device, Tensor};

fn batch(step: u64, n_groups: i64, micro_batch: usize) -> TrainBatch {
    common::varied_batch(step, n_groups, micro_batch)
}

fn config(checkpointing: bool) -> TrainerConfig {
    config_keeping(checkpointing, 0)
}

/// With checkpointing, `keep_layers` of the last layers keep their activations.
fn config_keeping(checkpointing: bool, keep_layers: usize) -> TrainerConfig {
    TrainerConfig {
        compute: ComputeConfig {
            gradient_checkpointing: checkpointing,
            keep_layers,
            ..ComputeConfig::default()
        },
        ..common::trainer_config(common::ppo_loss(), 3e-3, 2, 20)
    }
}

fn trainer(dir: &Path, cfg: TrainerConfig) -> Trainer {
    let spec = ModelSpec::from_dir(dir).expect("spec");
    let params = load_params(&spec, dir, Device::Cpu).expect("load");
    Trainer::new(&spec, params, None, cfg).expect("trainer")
}

fn rendezvous(port: u16, rank: usize, world: usize) -> Rendezvous {
    Rendezvous {
        host: "127.0.0.1".into(),
        port,
        bind: "127.0.0.1".into(),
        rank,
        world,
        timeout: Duration::from_secs(20),
    }
}

/// Rank 0's store (bound to a free port) and that port.
fn store() -> (Store, u16) {
    let store = Store::open(&rendezvous(0, 0, 2)).expect("store");
    let port = store.port();
    (store, port)
}

/// Joins `trainer` to the group as `rank` of `world`, with 4 KiB buckets (several per step).
fn join(trainer: &mut Trainer, port: u16, rank: usize, world: usize) {
    let rv = rendezvous(port, rank, world);
    let dp = DataParallel::join(&rv, Device::Cpu, 4096).expect("join");
    trainer.join_data_parallel(dp).expect("state of rank 0");
}

/// What a rank above 0 ends with: its losses and its weights.
type RankEnd = (Vec<f64>, Vec<(String, Tensor)>);

/// Every rank above 0: a thread that builds a trainer (its weights zeroed, so that only rank
/// 0's broadcast can make it right), joins, and follows rank 0; returns its losses and weights.
fn follower(dir: &Path, cfg: TrainerConfig, port: u16, rank: usize, world: usize) -> std::thread::JoinHandle<RankEnd> {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let mut t = trainer(&dir, cfg);
        tch::no_grad(|| {
            for (_, p) in t.compute_params().iter() {
                let _ = p.shallow_clone().zero_();
            }
        });
        join(&mut t, port, rank, world);
        let mut losses = Vec::new();
        t.follow_rank0(|m| losses.push(m.loss)).expect("follow rank 0");
        (losses, t.master_snapshot())
    })
}

fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// N ranks sum the gradients in another order than one rank does, which moves each by about
/// 1e-7 of its size. AdamW divides by the root of the second moment, so a gradient that is a
/// cancellation of opposite contributions (a rare token's embedding row) can turn that into a
/// visible fraction of one step's change. So: all but a few in ten thousand weights within
/// 1e-6, and none off by more than 1e-4 (the learning rate is 3e-3).
fn assert_weights_match(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    let (mut off, mut total) = (0i64, 0i64);
    for ((name, x), (other, y)) in a.iter().zip(b) {
        assert_eq!(name, other);
        let d = (x - y).abs();
        off += d.gt(1e-6).sum(tch::Kind::Int64).int64_value(&[]);
        total += d.numel() as i64;
    }
    let worst = max_diff(a, b);
    assert!(worst < 1e-4, "a weight differs by {worst}");
    assert!(
        (off as f64) < 5e-4 * total as f64,
        "{off} of {total} weights differ by more than 1e-6"
    );
}

fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}, step {}: {x} vs {y}", i + 1);
    }
}

/// One rank over `batches`: losses and final weights.
fn single(dir: &Path, cfg: TrainerConfig, batches: &[TrainBatch]) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let mut t = trainer(dir, cfg);
    let losses = batches.iter().map(|b| t.train(b).expect("step").loss).collect();
    (losses, t.master_snapshot())
}

/// Two ranks train what one rank trains, with and without activation checkpointing, and with
/// the last layer kept out of it (recomputed and kept layers reporting in one backward); the
/// second rank starts from zeroed weights and ends bit-identical to rank 0.
#[test]
fn two_ranks_train_what_one_rank_trains() {
    let model = common::tiny_model("llama", &["--layers", "3"]);
    let batches: Vec<TrainBatch> = (0..5).map(|s| batch(s, 3, 2)).collect();
    assert!(
        batches.iter().all(|b| b.micro_batches.len() >= 4),
        "several micro-batches per rank"
    );
    for (checkpointing, keep) in [(false, 0), (true, 0), (true, 1)] {
        let cfg = config_keeping(checkpointing, keep);
        let (one_losses, one_weights) = single(model.path(), cfg, &batches);
        let (server, port) = store();
        let other = follower(model.path(), cfg, port, 1, 2);
        let mut t = trainer(model.path(), cfg);
        let rv = rendezvous(port, 0, 2);
        let dp = DataParallel::join_with_store(server, &rv, Device::Cpu, 4096).expect("join");
        t.join_data_parallel(dp).expect("send the state");
        let mut losses = Vec::new();
        for b in &batches {
            let m = t.train(b).expect("data-parallel step");
            assert_eq!(m.ranks, 2);
            assert!(m.allreduce_bytes > 0);
            losses.push(m.loss);
        }
        t.stop_ranks().expect("stop");
        let (other_losses, other_weights) = other.join().expect("rank 1");
        let weights = t.master_snapshot();
        assert_close("rank 0 vs one rank", &losses, &one_losses, 1e-5);
        assert_eq!(other_losses, losses, "every rank reports the step's loss");
        assert_weights_match(&weights, &one_weights);
        assert_eq!(
            max_diff(&weights, &other_weights),
            0.0,
            "the ranks' weights are identical"
        );
    }
}

/// Three ranks on batches of two micro-batches: one rank gets none and still takes part; and
/// a resumed rank 0 (weights and optimizer state from its snapshot) brings fresh ranks to its
/// state, so 3 + 3 steps equal 6 uninterrupted ones.
#[test]
fn an_idle_rank_and_a_resume_change_nothing() {
    let model = common::tiny_model("llama", &[]);
    let cfg = config(false);
    let batches: Vec<TrainBatch> = (0..6).map(|s| batch(s, 1, 2)).collect();
    assert!(batches.iter().all(|b| b.micro_batches.len() == 2));
    let (one_losses, one_weights) = single(model.path(), cfg, &batches);

    let run = |t: &mut Trainer, batches: &[TrainBatch]| -> (Vec<f64>, Vec<std::thread::JoinHandle<_>>) {
        let (server, port) = store();
        let others: Vec<_> = (1..3).map(|r| follower(model.path(), cfg, port, r, 3)).collect();
        let dp = DataParallel::join_with_store(server, &rendezvous(port, 0, 3), Device::Cpu, 4096).expect("join");
        t.join_data_parallel(dp).expect("send the state");
        let losses = batches.iter().map(|b| t.train(b).expect("step").loss).collect();
        t.stop_ranks().expect("stop");
        (losses, others)
    };
    let mut first = trainer(model.path(), cfg);
    let (mut losses, others) = run(&mut first, &batches[..3]);
    for o in others {
        o.join().expect("rank");
    }
    // "Resume": a new rank 0 from the first one's weights, optimizer state and counters.
    let spec = ModelSpec::from_dir(model.path()).expect("spec");
    let weights = ParamStore::from_tensors(first.master_snapshot().into_iter().collect());
    let (opt, opt_steps) = first.optimizer_state();
    let mut resumed = Trainer::new(&spec, weights, None, cfg).expect("trainer");
    resumed
        .restore(opt, opt_steps, first.steps_done(), first.skipped_steps())
        .expect("restore");
    drop(first);
    let (more, others) = run(&mut resumed, &batches[3..]);
    losses.extend(more);
    for o in others {
        let (_, w) = o.join().expect("rank");
        assert_eq!(max_diff(&w, &resumed.master_snapshot()), 0.0);
    }
    assert_close("3 ranks, resumed, vs one rank", &losses, &one_losses, 1e-5);
    assert_weights_match(&resumed.master_snapshot(), &one_weights);
    assert_eq!(resumed.steps_done(), 6);
}

/// A rank that goes away fails rank 0's next step with a data-parallel error within the
/// deadline, instead of hanging it.
#[test]
fn a_lost_rank_fails_the_step_fast() {
    let model = common::tiny_model("llama", &[]);
    let cfg = config(false);
    let (server, port) = store();
    let dir = model.path().to_path_buf();
    let other = std::thread::spawn(move || {
        let mut t = trainer(&dir, cfg);
        join(&mut t, port, 1, 2);
        // Leaves without a word: its group (and sockets) go with the trainer.
    });
    let mut t = trainer(model.path(), cfg);
    let mut rv = rendezvous(port, 0, 2);
    rv.timeout = Duration::from_secs(10);
    let dp = DataParallel::join_with_store(server, &rv, Device::Cpu, 4096).expect("join");
    t.join_data_parallel(dp).expect("send the state");
    other.join().expect("rank 1");
    let started = Instant::now();
    let err = t.train(&batch(0, 2, 2)).expect_err("the step must fail");
    assert!(matches!(err, TrainError::DataParallel(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    // The group stays failed: no later collective can run out of step.
    let again = t.train(&batch(1, 2, 2)).expect_err("still failed");
    assert!(matches!(again, TrainError::DataParallel(_)), "{again}");
}

/// The learner binary with `--learner-ranks 2` against the real Atropos API: rank 0 takes the
/// batches and hands them over, both processes exit 0, only rank 0 writes metrics and
/// checkpoints, and its losses equal a one-rank learner's on the same batches (1e-5).
#[test]
fn two_learner_processes_train_like_one() {
    use common::{metrics, Learner, RunApi};
    let model = common::tiny_model("llama", &[]);
    let groups: Vec<Value> = (0..3).flat_map(|s| common::varied_groups(s, 2)).collect();
    let base = [
        "--training-steps",
        "3",
        "--allow-missing-logprobs",
        "--checkpoint-interval",
        "3",
    ];
    let run = |extra: &[&[&str]]| -> Vec<Value> {
        let api = RunApi::start();
        let saves: Vec<tempfile::TempDir> = extra.iter().map(|_| tempfile::tempdir().expect("save")).collect();
        let learners: Vec<Learner> = extra
            .iter()
            .zip(&saves)
            .map(|(args, save)| Learner::spawn(model.path(), &api, save.path(), &[&base[..], args].concat()))
            .collect();
        // Batches of 2 micro-batches of 2 sequences: 4 sequences = one group of four.
        api.wait_registered(4);
        common::wait_until(Duration::from_secs(30), "env registration", || {
            api.post(
                "/register-env",
                &json!({"max_token_length": 64, "desired_name": "t", "weight": 1.0, "group_size": 4}),
            )["status"]
                == "success"
        });
        assert_eq!(api.post("/scored_data_list", &json!(groups))["groups_processed"], 6);
        for l in learners {
            let (code, log) = l.wait(Duration::from_secs(240));
            assert_eq!(code, 0, "{log}");
        }
        for save in &saves[1..] {
            assert!(metrics(save.path()).is_empty(), "a rank above 0 writes no metrics");
            assert!(
                !save.path().join("step_3").exists(),
                "a rank above 0 writes no checkpoint"
            );
        }
        assert!(saves[0].path().join("step_3/model.safetensors").is_file());
        assert!(saves[0].path().join("step_3/training_state/state.json").is_file());
        metrics(saves[0].path())
    };
    let one = run(&[&[]]);
    let port = common::free_port().to_string();
    let rendezvous = format!("127.0.0.1:{port}");
    let dp = |rank: &'static str| -> Vec<String> {
        [
            "--learner-ranks",
            "2",
            "--learner-rank",
            rank,
            "--learner-rendezvous",
            &rendezvous,
            "--dp-timeout-s",
            "60",
        ]
        .map(String::from)
        .to_vec()
    };
    let (r0, r1) = (dp("0"), dp("1"));
    let r0: Vec<&str> = r0.iter().map(String::as_str).collect();
    let r1: Vec<&str> = r1.iter().map(String::as_str).collect();
    let two = run(&[&r0, &r1]);
    let loss = |m: &[Value]| m.iter().map(|r| r["loss"].as_f64().expect("loss")).collect::<Vec<_>>();
    assert_eq!(two.len(), 3);
    assert!(
        two.iter()
            .all(|r| r["ranks"] == 2 && r["allreduce_bytes"].as_u64() > Some(0)),
        "{two:?}"
    );
    assert!(one.iter().all(|r| r["ranks"] == 1));
    assert_close("two learner processes vs one", &loss(&two), &loss(&one), 1e-5);
}
