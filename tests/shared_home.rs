//! Shared mode's trainer side on the CPU: the compute weights move into memory the learner does
//! not own (on the GPU, vLLM's parameters mapped through CUDA IPC; here plain tensors standing in
//! for them) and every optimizer write is fenced. The owner's death is a fault no CPU test can
//! cause in vLLM, so a named test double (`DoubleFence`) plays the owner: it records the fence
//! calls and can be told it died. Whatever happens to the owner, the trainer must train exactly
//! what a trainer that never shared trains (same losses, bit-identical fp32 masters), and the
//! owner's memory must hold the newest compute weights while it is alive.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use grpo_node::model::safetensors_io::load_params;
use grpo_node::model::{ModelSpec, Transformer};
use grpo_node::train::{ComputeConfig, FenceError, Home, Precision, SharedWrite, Trainer, TrainerConfig, WriteFence};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Before,
    After(u64),
}

/// Test double of the weights' owner (vLLM): records the fence calls; once `dead`, refuses.
struct DoubleFence {
    calls: Arc<Mutex<Vec<Call>>>,
    dead: Arc<AtomicBool>,
}

impl WriteFence for DoubleFence {
    fn before_write(&mut self) -> Result<f64, FenceError> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(FenceError("the owner died (test double)".into()));
        }
        self.calls.lock().expect("calls").push(Call::Before);
        Ok(0.0)
    }

    fn after_write(&mut self, version: u64, _model: &Transformer, _paused_s: f64) -> Result<SharedWrite, FenceError> {
        self.calls.lock().expect("calls").push(Call::After(version));
        Ok(SharedWrite {
            version,
            seconds: 0.0,
            canary_max_abs_diff: None,
        })
    }
}

fn trainer(dir: &std::path::Path) -> Trainer {
    let spec = ModelSpec::from_dir(dir).expect("spec");
    let params = load_params(&spec, dir, Device::Cpu).expect("load");
    let cfg = TrainerConfig {
        compute: ComputeConfig {
            precision: Precision::Bf16,
            exp_avg: Precision::Bf16,
            ..ComputeConfig::default()
        },
        ..common::trainer_config(common::ppo_loss(), 3e-3, 1, 20)
    };
    Trainer::new(&spec, params, None, cfg).expect("trainer")
}

/// The owner's memory: a zeroed bf16 tensor per parameter, shaped as ours.
fn owner_memory(t: &Trainer) -> BTreeMap<String, Tensor> {
    t.compute_params()
        .iter()
        .map(|(n, p)| (n.clone(), Tensor::zeros(p.size(), (Kind::BFloat16, Device::Cpu))))
        .collect()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.to_kind(Kind::Float).equal(&b.to_kind(Kind::Float))
}

/// Every compute weight of `t` equals the owner's copy of it.
fn owner_holds(t: &Trainer, memory: &BTreeMap<String, Tensor>) -> bool {
    t.compute_params().iter().all(|(n, p)| same(&p.detach(), &memory[n]))
}

fn masters_equal(a: &Trainer, b: &Trainer) {
    for ((n, x), (_, y)) in a.master_snapshot().iter().zip(b.master_snapshot().iter()) {
        assert!(x.equal(y), "fp32 master {n} differs");
    }
}

#[test]
fn shared_weights_train_exactly_and_survive_the_owners_death() {
    let model = common::tiny_model("llama", &[]);
    let mut plain = trainer(model.path());
    let mut shared = trainer(model.path());
    let (tx, rx) = std::sync::mpsc::channel();
    shared.set_homes(rx);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let dead = Arc::new(AtomicBool::new(false));
    let offer = |t: &Trainer| {
        let memory = owner_memory(t);
        let fence = DoubleFence {
            calls: calls.clone(),
            dead: dead.clone(),
        };
        let views = memory.iter().map(|(n, m)| (n.clone(), m.shallow_clone())).collect();
        (
            memory,
            Home {
                views,
                fence: Box::new(fence),
            },
        )
    };

    // Adopted between steps: the current weights go into the owner's memory, fenced.
    let (first, home) = offer(&shared);
    tx.send(home).expect("offer");
    let adopted = shared.adopt_home().expect("adopt").expect("a fenced write");
    assert_eq!(adopted.version, 0);
    assert!(shared.is_rehomed() && owner_holds(&shared, &first));
    assert_eq!(*calls.lock().expect("calls"), vec![Call::Before, Call::After(0)]);

    // Steps write into the owner's memory, each between a pause and a resume.
    for step in 1..=2 {
        let batch = common::varied_batch(step, 3, 4);
        let (a, b) = (
            plain.train(&batch).expect("plain"),
            shared.train(&batch).expect("shared"),
        );
        assert_eq!(a.loss, b.loss, "step {step}: the shared trainer computes the same loss");
        assert!(b.shared.is_some_and(|w| w.version == step));
        assert!(
            owner_holds(&shared, &first),
            "step {step}: the owner holds the new weights"
        );
        masters_equal(&plain, &shared);
    }
    assert_eq!(calls.lock().expect("calls").len(), 6);

    // The owner dies: the next write finds out, the trainer takes its weights back and the step
    // trains in its own memory; the dead owner's memory is left as it was.
    dead.store(true, Ordering::SeqCst);
    let before: BTreeMap<String, Tensor> = first.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let batch = common::varied_batch(3, 3, 4);
    let (a, b) = (
        plain.train(&batch).expect("plain"),
        shared.train(&batch).expect("shared"),
    );
    assert_eq!(a.loss, b.loss);
    assert!(b.shared.is_none() && !shared.is_rehomed());
    assert!(
        first.iter().all(|(n, t)| t.equal(&before[n])),
        "no write into a dead owner's memory"
    );
    masters_equal(&plain, &shared);

    // The restarted owner is offered: the current weights go into its memory, and training
    // goes on in it.
    dead.store(false, Ordering::SeqCst);
    let (second, home) = offer(&shared);
    tx.send(home).expect("offer");
    let batch = common::varied_batch(4, 3, 4);
    let (a, b) = (
        plain.train(&batch).expect("plain"),
        shared.train(&batch).expect("shared"),
    );
    assert_eq!(a.loss, b.loss);
    assert!(b.shared.is_some_and(|w| w.version == 4));
    assert!(shared.is_rehomed() && owner_holds(&shared, &second));
    masters_equal(&plain, &shared);
    assert_eq!(
        calls.lock().expect("calls")[6..],
        [Call::Before, Call::After(3), Call::Before, Call::After(4)],
        "re-adoption writes version 3, the step writes version 4"
    );
}

/// A home that does not fit (a missing tensor) is refused before anything is written.
#[test]
fn a_home_that_does_not_fit_is_refused() {
    let model = common::tiny_model("llama", &[]);
    let mut t = trainer(model.path());
    let (tx, rx) = std::sync::mpsc::channel();
    t.set_homes(rx);
    let mut memory = owner_memory(&t);
    let dropped = memory.keys().next().cloned().expect("a parameter");
    memory.remove(&dropped);
    let fence = DoubleFence {
        calls: Arc::new(Mutex::new(Vec::new())),
        dead: Arc::new(AtomicBool::new(false)),
    };
    tx.send(Home {
        views: memory.iter().map(|(n, m)| (n.clone(), m.shallow_clone())).collect(),
        fence: Box::new(fence),
    })
    .expect("offer");
    let e = t.adopt_home().expect_err("refused");
    assert!(e.to_string().contains(&dropped), "{e}");
    assert!(!t.is_rehomed());
    assert!(memory
        .values()
        .all(|m| m.abs().sum(Kind::Float).double_value(&[]) == 0.0));
}
