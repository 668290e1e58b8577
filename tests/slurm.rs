//! `grpo-node launch --backend slurm` on a real 2-node Slurm cluster: Debian's slurm-wlm 22.05,
//! two slurmd each in a network namespace of its own with its own address (10.77.0.11 and .12),
//! set up and torn down by `scripts/slurm/ci-cluster.sh` (root; it installs slurm-wlm if
//! missing). `cluster/two-node.toml` runs the local loop as a heterogeneous job: the API, the
//! learner and the environment on one node, the sidecar on the other, so the learner's weight
//! sync and the environment's generations really cross between the namespaces.
//!
//! - the loop learns across the two nodes (the same bar as the local loop: reward up by more
//!   than 0.2, first 10 vs last 10 of 80 steps), with each group on its own node's address;
//! - killing the sidecar fails the whole job fast, with a message that names it, and leaves no
//!   process behind;
//! - `--dry-run` prints the script, stable against `tests/golden/slurm.sbatch`
//!   (`GRPO_UPDATE_GOLDEN=1` rewrites it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One cluster at a time: each loop keeps both cores busy.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A running 2-node cluster, torn down (daemons by pid, namespaces) on drop.
struct Cluster {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn script() -> PathBuf {
    common::repo().join("scripts/slurm/ci-cluster.sh")
}

impl Cluster {
    fn up() -> Self {
        let tmp = tempfile::Builder::new().prefix("sl").tempdir().expect("tempdir");
        let dir = tmp.path().join("c");
        let out = Command::new("bash")
            .arg(script())
            .arg("up")
            .arg(&dir)
            .output()
            .expect("ci-cluster.sh");
        assert!(
            out.status.success(),
            "the Slurm cluster did not come up (needs root and apt): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir, _tmp: tmp }
    }

    /// `grpo-node launch --backend slurm` on node n1's network, the manifest `text` in `work`.
    fn launch(&self, text: &str, work: &Path) -> Child {
        let manifest = work.join("manifest.toml");
        std::fs::write(&manifest, text).expect("manifest");
        Command::new("bash")
            .arg(script())
            .arg("exec")
            .arg(&self.dir)
            .arg(env!("CARGO_BIN_EXE_grpo-node"))
            .args(["launch", "--backend", "slurm", "--runs-dir"])
            .arg(work.join("runs"))
            .arg(&manifest)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("launch.log")).expect("log"))
            .spawn()
            .expect("launch")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("down").arg(&self.dir).status();
    }
}

/// `cluster/two-node.toml` training `steps` steps; `{repo}` is this repository's (the manifest is
/// copied outside it).
fn manifest(steps: usize) -> String {
    let text = std::fs::read_to_string(common::repo().join("cluster/two-node.toml")).expect("cluster/two-node.toml");
    let text = text
        .replace(
            "\"--training-steps\", \"200\"",
            &format!("\"--training-steps\", \"{steps}\""),
        )
        .replace("steps = 200", &format!("steps = {steps}"))
        .replace("{repo}", &common::repo().display().to_string());
    assert!(text.contains(&format!("\"--training-steps\", \"{steps}\"")));
    text
}

fn the_run(work: &Path) -> PathBuf {
    let runs: Vec<PathBuf> = std::fs::read_dir(work.join("runs"))
        .expect("runs dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(runs.len(), 1, "one run directory: {runs:?}");
    runs[0].clone()
}

fn wait_exit(child: &mut Child, limit: Duration, log: &Path) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s.code().unwrap_or(-1);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!(
                "the launch did not end in {limit:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every pid a group recorded is gone.
fn assert_no_leftovers(run: &Path) {
    for group in ["head", "inference"] {
        let text = std::fs::read_to_string(run.join(format!("processes-{group}.json"))).unwrap_or_default();
        let pids: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        for (name, pid) in pids.as_object().into_iter().flatten() {
            let pid = pid.as_i64().expect("pid") as i32;
            // SAFETY: signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            assert!(!alive, "{name} (pid {pid}, group {group}) outlived the job");
        }
    }
}

#[test]
fn the_loop_learns_as_a_slurm_job_across_two_nodes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::up();
    let work = tempfile::tempdir().expect("work");
    let log = work.path().join("launch.log");
    let mut launch = cluster.launch(&manifest(80), work.path());
    let code = wait_exit(&mut launch, Duration::from_secs(900), &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, 0, "{text}");
    let run = the_run(work.path());
    // Each group ran on its own node, at the address Slurm gave that node.
    let host = |g: &str| std::fs::read_to_string(run.join("launch/hosts").join(g)).expect("host file");
    assert_eq!(host("head"), "10.77.0.11");
    assert_eq!(host("inference"), "10.77.0.12");
    let end: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("launch/end")).expect("end")).expect("json");
    assert_eq!(end["code"], 0, "{end}");
    let rows = common::metrics(&run.join("checkpoints"));
    assert_eq!(rows.len(), 80, "every step trained");
    let mean = |rows: &[Value]| {
        rows.iter()
            .map(|r| r["reward_mean"].as_f64().expect("reward"))
            .sum::<f64>()
            / rows.len() as f64
    };
    let (first, last) = (mean(&rows[..10]), mean(&rows[70..]));
    assert!(last - first > 0.2, "reward {first:.3} -> {last:.3}");
    // Weights crossed nodes: the sidecar served versions the learner published.
    assert!(
        rows.iter().any(|r| r["sync_time_s"].as_f64().is_some_and(|s| s > 0.0)),
        "no weight sync was recorded"
    );
    let secret = std::fs::metadata(run.join("secrets/auth_token")).expect("token file");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&secret.permissions()) & 0o777,
        0o600
    );
    assert_no_leftovers(&run);
}

#[test]
fn killing_the_sidecar_fails_the_job_fast() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::up();
    let work = tempfile::tempdir().expect("work");
    let log = work.path().join("launch.log");
    let mut launch = cluster.launch(&manifest(100_000), work.path());
    // Wait for the learner to be up (its readiness is recorded once it registered).
    let start = Instant::now();
    let run = loop {
        let run = std::fs::read_dir(work.path().join("runs"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok().map(|e| e.path()));
        if let Some(run) = run.filter(|r| r.join("launch/ready/env").exists()) {
            break run;
        }
        assert!(
            launch.try_wait().expect("try_wait").is_none(),
            "the launch ended early: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the run never got ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let pids: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("processes-inference.json")).expect("pids"))
            .expect("json");
    let sidecar = pids["sidecar"].as_i64().expect("sidecar pid") as i32;
    // SAFETY: kill(2) of the sidecar this job started.
    assert_eq!(unsafe { libc::kill(sidecar, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let code = wait_exit(&mut launch, Duration::from_secs(120), &log);
    let took = killed.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_ne!(code, 0, "{text}");
    assert!(took < Duration::from_secs(30), "the job took {took:?} to fail");
    assert!(text.contains("sidecar (group inference) exited early"), "{text}");
    assert_no_leftovers(&run);
}

#[test]
fn the_dry_run_prints_the_golden_script() {
    let out = common::grpo_node()
        .args([
            "launch",
            "--backend",
            "slurm",
            "--dry-run",
            "--runs-dir",
            "/shared/runs",
        ])
        .arg(common::repo().join("cluster/two-node.toml"))
        .output()
        .expect("dry run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)
        .expect("utf8")
        .replace(env!("CARGO_BIN_EXE_grpo-node"), "/opt/bin/grpo-node")
        .replace(&common::repo().display().to_string(), "/src/grpo-node");
    let golden = common::repo().join("tests/golden/slurm.sbatch");
    if std::env::var("GRPO_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(&golden, &text).expect("golden");
    }
    let want = std::fs::read_to_string(&golden).expect("tests/golden/slurm.sbatch (GRPO_UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        text, want,
        "the dry run changed; if on purpose, rerun with GRPO_UPDATE_GOLDEN=1"
    );
}

/// A role in a run that spans nodes refuses an address other nodes cannot reach.
#[test]
fn a_multi_node_role_refuses_a_loopback_address() {
    let model = common::tiny_model("llama", &[]);
    let out = common::grpo_node()
        .args(["--role", "inference-sidecar", "--engine", "embedded", "--model-name"])
        .arg(model.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "10.77.0.12:0",
            "--auth-token",
            "t0ken-for-the-test",
        ])
        .env("GRPO_MULTI_NODE", "1")
        .output()
        .expect("sidecar");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--listen 127.0.0.1:0: a loopback address in a run that spans nodes"),
        "{err}"
    );
    let out = common::grpo_node()
        .args(["--role", "learner", "--model-name"])
        .arg(model.path())
        .args([
            "--atropos-url",
            "http://10.77.0.11:8000",
            "--sidecar",
            "http://localhost:50051",
        ])
        .env("GRPO_MULTI_NODE", "1")
        .output()
        .expect("learner");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--sidecar http://localhost:50051: a loopback address"),
        "{err}"
    );
}
