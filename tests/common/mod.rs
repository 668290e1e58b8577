//! Helpers shared by the integration tests: the Python reference tools, tiny models, and a
//! real `run-api` process on a free loopback port.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use std::time::{Duration, Instant};

/// The project venv's Python (torch, transformers, atroposlib), set up by `.ci/setup`.
pub fn python() -> PathBuf {
    std::env::var_os("GRPO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/grpo/venv/bin/python"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `python/grpo_ref/<script>` and returns its stdout; panics with stderr on failure.
pub fn run_ref(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo().join("python/grpo_ref").join(script))
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); run .ci/setup first", python().display()));
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tiny random HF model made by transformers (`make_tiny_model.py`).
pub fn tiny_model(arch: &str, extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf8 path");
    let mut args = vec!["--arch", arch, "--out", out];
    args.extend_from_slice(extra);
    run_ref("make_tiny_model.py", &args);
    dir
}

/// A loopback port that was free a moment ago and that no other test in this binary got.
///
/// Tests run in parallel threads of one process, and the kernel may hand the same port to two
/// `bind(0)` calls once the first is released; the registry makes each port go out once.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if given.insert(port) {
            return port;
        }
    }
}

/// Whether process `pid` holds a listening TCP socket on `port` (Linux `/proc`).
///
/// "Something answers on the port" is not enough to know a server is ours: another process may
/// hold the port, and a connect to a free ephemeral port can connect to itself.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let local = format!(":{port:04X}");
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st (0A = LISTEN), ..., inode (field 9)
            if f.len() > 9 && f[1].ends_with(&local) && f[3] == "0A" {
                inodes.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| inodes.contains(target.to_string_lossy().as_ref()))
            .unwrap_or(false)
    })
}

/// Polls `ready` until it returns true or `limit` passes (backing off up to 500 ms).
pub fn wait_until(limit: Duration, what: &str, ready: impl FnMut() -> bool) {
    poll_until(limit, what, Duration::from_millis(500), ready)
}

/// Polls `ready` every few milliseconds, for short-lived conditions.
pub fn wait_until_fast(limit: Duration, what: &str, ready: impl FnMut() -> bool) {
    poll_until(limit, what, Duration::from_millis(5), ready)
}

fn poll_until(limit: Duration, what: &str, max_delay: Duration, ready: impl FnMut() -> bool) {
    if let Err(e) = try_poll_until(limit, what, max_delay, ready) {
        panic!("{e}");
    }
}

/// Like [`wait_until`], but a timeout is an `Err` so the caller can attach a log to it.
pub fn try_wait_until(limit: Duration, what: &str, ready: impl FnMut() -> bool) -> Result<(), String> {
    try_poll_until(limit, what, Duration::from_millis(500), ready)
}

fn try_poll_until(
    limit: Duration,
    what: &str,
    max_delay: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(5).min(max_delay);
    while !ready() {
        if start.elapsed() >= limit {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(max_delay);
    }
    Ok(())
}

/// A real Atropos API server (`run-api` from PyPI atroposlib) on 127.0.0.1; killed on drop.
pub struct RunApi {
    pub port: u16,
    child: Child,
}

impl RunApi {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let child = Command::new(python())
            .args([
                "-m",
                "atroposlib.cli.run_api",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start run-api");
        let mut api = Self { port, child };
        let pid = api.child.id();
        wait_until(Duration::from_secs(60), "run-api", || {
            let exited = api.child.try_wait().expect("try_wait run-api");
            assert!(
                exited.is_none(),
                "run-api on port {port} exited ({exited:?}): port taken?"
            );
            // Ours must hold the listener: an answer alone may come from another process.
            listens_on(pid, port) && api.get("/").is_ok()
        });
        api
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        let resp = ureq_get(&format!("{}{path}", self.url()))?;
        serde_json::from_str(&resp).map_err(|e| e.to_string())
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let text = http_post(&format!("{}{path}", self.url()), &body.to_string()).expect("post");
        serde_json::from_str(&text).expect("json reply")
    }

    /// Waits until a trainer registered with this batch size.
    pub fn wait_registered(&self, batch_size: i64) {
        wait_until(Duration::from_secs(120), "learner registration", || {
            self.get("/info").ok().and_then(|v| v["batch_size"].as_i64()) == Some(batch_size)
        });
    }

    /// [`Self::wait_registered`], with `learner`'s log in the failure message.
    pub fn wait_registered_by(&self, batch_size: i64, learner: &Learner) {
        let waited = try_wait_until(Duration::from_secs(120), "learner registration", || {
            self.get("/info").ok().and_then(|v| v["batch_size"].as_i64()) == Some(batch_size)
        });
        if let Err(e) = waited {
            panic!("{e}; learner log:\n{}", learner.log());
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunApi {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Minimal blocking HTTP/1.1 over std (keeps the test client independent of our own).
fn request(method: &str, url: &str, body: Option<&str>) -> Result<String, String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or("http only")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    if stream.local_addr().ok() == stream.peer_addr().ok() {
        return Err(format!("{host}: connected to itself (nothing listens there)"));
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    if !head.starts_with("HTTP/1.1 2") {
        return Err(head.lines().next().unwrap_or_default().to_string());
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub fn ureq_get(url: &str) -> Result<String, String> {
    request("GET", url, None)
}

pub fn http_post(url: &str, body: &str) -> Result<String, String> {
    request("POST", url, Some(body))
}

/// The grpo-node binary under test.
pub fn grpo_node() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grpo-node"));
    cmd.env("RUST_LOG", "info");
    // Learners run side by side in the tests: none takes the default /metrics port.
    cmd.env("GRPO_METRICS_LISTEN", "127.0.0.1:0");
    cmd
}

/// Reads `metrics.jsonl` lines.
pub fn metrics(save: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(save.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect()
}

/// A grpo-node process with its stderr in a log file; killed on drop.
pub struct Learner {
    child: Child,
    log: std::path::PathBuf,
}

impl Learner {
    /// A learner with small batches (2 x 2) against `api`, saving into `save`.
    pub fn spawn(model: &Path, api: &RunApi, save: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec![
            "--role".into(),
            "learner".into(),
            "--model-name".into(),
            path_str(model).into(),
            "--atropos-url".into(),
            api.url(),
        ];
        args.extend(
            [
                "--batch-size",
                "2",
                "--gradient-accumulation-steps",
                "2",
                "--seq-len",
                "64",
                "--lr",
                "1e-3",
            ]
            .map(String::from),
        );
        args.extend(["--save-path".to_string(), path_str(save).to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn_args(&args, save)
    }

    /// Any grpo-node command line; the log goes next to `near`.
    pub fn spawn_args(args: &[String], near: &Path) -> Self {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let log = near.with_extension(format!("log{stamp}"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = grpo_node()
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn grpo-node");
        Self { child, log }
    }

    pub fn wait(mut self, limit: Duration) -> (i32, String) {
        let mut status = None;
        wait_until(limit, "grpo-node to exit", || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        let log = self.log();
        (status.and_then(|s| s.code()).unwrap_or(-1), log)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }
}

impl Drop for Learner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// The default PPO loss of the tests: standard clip 0.2, seq-mean-token-mean, no KL.
pub fn ppo_loss() -> grpo_node::grpo::LossConfig {
    use grpo_node::grpo::{ClipMode, LossAgg, LossConfig};
    LossConfig {
        clip_mode: ClipMode::Standard,
        clip_eps_low: 0.2,
        clip_eps_high: 0.2,
        is_cap: None,
        kl_coef: 0.0,
        agg: LossAgg::SeqMeanTokenMean,
    }
}

/// A CPU trainer configuration with AdamW defaults and grad clip 1.0.
pub fn trainer_config(
    loss: grpo_node::grpo::LossConfig,
    lr: f64,
    warmup_steps: u64,
    total_steps: u64,
) -> grpo_node::train::TrainerConfig {
    use grpo_node::train::{AdamWConfig, LrSchedule, ScheduleKind, TrainerConfig};
    TrainerConfig {
        loss,
        schedule: LrSchedule {
            lr,
            warmup_steps,
            total_steps,
            kind: ScheduleKind::Constant,
        },
        adamw: AdamWConfig::default(),
        optimizer: Default::default(),
        max_grad_norm: 1.0,
        device: tch::Device::Cpu,
        compute: grpo_node::train::ComputeConfig::default(),
    }
}

/// The completions of a `/generate` reply made with `logprobs`: token ids and the sampled
/// tokens' logprobs, one pair per output.
pub fn completions(reply: &serde_json::Value) -> Vec<(Vec<i64>, Vec<f64>)> {
    let ids = reply["token_ids"].as_array().expect("token_ids");
    let lps = reply["logprobs"].as_array().expect("logprobs");
    ids.iter()
        .zip(lps)
        .map(|(ids, positions)| {
            let ids: Vec<i64> = serde_json::from_value(ids.clone()).expect("ids");
            let lps = positions
                .as_array()
                .expect("positions")
                .iter()
                .map(|p| {
                    p[0].as_object()
                        .and_then(|d| d.values().next())
                        .and_then(|v| v.as_f64())
                        .expect("logprob")
                })
                .collect();
            (ids, lps)
        })
        .collect()
}

/// The learner's fp32 logprobs of `completion` after `prompt` at temperature `t`, computed the
/// way training does (one unpadded sequence).
pub fn learner_logprobs(model: &grpo_node::model::Transformer, prompt: &[i64], completion: &[i64], t: f32) -> Vec<f64> {
    use tch::Tensor;
    let seq = [prompt, completion].concat();
    let n = seq.len() as i64;
    let labels: Vec<i64> = [vec![-100; prompt.len() - 1], completion.to_vec()].concat();
    let lp = tch::no_grad(|| {
        grpo_node::grpo::loss::token_logprobs(
            &model.forward(&Tensor::from_slice(&seq[..seq.len() - 1]).view([1, n - 1])),
            &Tensor::from_slice(&labels).view([1, n - 1]),
            &Tensor::from_slice(&[t]),
        )
    });
    let lp: Vec<f32> = Vec::try_from(lp.view([-1])).expect("logprobs");
    lp[prompt.len() - 1..].iter().map(|&x| f64::from(x)).collect()
}

/// The process groups of the vLLM launches a sidecar's log names ("vLLM launched pid=N").
pub fn vllm_groups(log: &str) -> Vec<i32> {
    log.lines()
        .filter(|l| l.contains("vLLM launched"))
        .filter_map(|l| l.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Whether any process of group `pgid` is alive.
pub fn group_alive(pgid: i32) -> bool {
    Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `url`'s value of `family` (see [`prom_value`]), 0 while unreachable or absent.
pub fn scraped(url: &str, family: &str, label: Option<(&str, &str)>) -> f64 {
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        return 0.0;
    };
    let body = rt.block_on(async { reqwest::get(url).await.ok()?.text().await.ok() });
    body.and_then(|b| openmetrics_parser::openmetrics::parse_openmetrics(&b).ok())
        .and_then(|exp| prom_value(&exp, family, label))
        .unwrap_or(0.0)
}

/// One sample of a parsed exposition: a counter's or gauge's value, or a histogram's count;
/// `label` picks the sample with that label value.
pub fn prom_value(exp: &Exposition, family: &str, label: Option<(&str, &str)>) -> Option<f64> {
    use openmetrics_parser::OpenMetricsValue as V;
    let fam = exp.families.get(family)?;
    let sample = fam.iter_samples().find(|s| match label {
        None => true,
        Some((k, v)) => s.get_labelset().is_ok_and(|l| l.get_label_value(k) == Some(v)),
    })?;
    match &sample.value {
        V::Counter(c) => Some(c.value.as_f64()),
        V::Gauge(g) => Some(g.as_f64()),
        V::Histogram(h) => h.count.map(|c| c as f64),
        _ => None,
    }
}

/// A parsed `/metrics` exposition.
pub type Exposition =
    openmetrics_parser::MetricsExposition<openmetrics_parser::OpenMetricsType, openmetrics_parser::OpenMetricsValue>;

/// GETs `url` (checking the content type) and parses it with a strict OpenMetrics parser.
pub fn scrape(rt: &tokio::runtime::Runtime, url: &str) -> Exposition {
    let resp = rt.block_on(reqwest::get(url)).expect("scrape");
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string());
    assert!(content_type.is_some_and(|c| c.starts_with("application/openmetrics-text")));
    let body = rt.block_on(resp.text()).expect("body");
    openmetrics_parser::openmetrics::parse_openmetrics(&body).unwrap_or_else(|e| panic!("not OpenMetrics: {e}\n{body}"))
}

/// `groups` groups of four completions of varied lengths; different for every `step`.
pub fn varied_groups(step: u64, groups: i64) -> Vec<serde_json::Value> {
    (0..groups)
        .map(|g| {
            let salt = step as i64 * 7 + g;
            let prompt: Vec<i64> = (0..(4 + salt % 5)).map(|i| 20 + (salt * 13 + i * 3) % 200).collect();
            let tokens: Vec<Vec<i64>> = (0..4)
                .map(|c| {
                    let len = 3 + (salt + c * 5) % 17;
                    let completion = (0..len).map(|i| 30 + (salt * 31 + c * 11 + i * 7) % 400);
                    prompt.iter().copied().chain(completion).collect()
                })
                .collect();
            let masks: Vec<Vec<i64>> = tokens
                .iter()
                .map(|t| {
                    t.iter()
                        .enumerate()
                        .map(|(i, &x)| if i < prompt.len() { -100 } else { x })
                        .collect()
                })
                .collect();
            let scores: Vec<f64> = (0..4).map(|c| ((salt + c) % 3) as f64 - 1.0).collect();
            serde_json::json!({"tokens": tokens, "masks": masks, "scores": scores})
        })
        .collect()
}

/// A prepared batch of [`varied_groups`] (vocabulary 512, sequences up to 64 tokens).
pub fn varied_batch(step: u64, n_groups: i64, micro_batch: usize) -> grpo_node::grpo::TrainBatch {
    let limits = grpo_node::grpo::Limits {
        vocab_size: 512,
        seq_len: 64,
        truncate_long: false,
        allow_missing_logprobs: true,
    };
    let raw = grpo_node::actors::messages::RawBatch {
        seq: grpo_node::checkpoint::BatchSeq(step),
        groups: varied_groups(step, n_groups),
        wait_time_s: 0.0,
    };
    grpo_node::actors::preprocessor::prepare(raw, &limits, micro_batch)
        .batch
        .expect("valid batch")
}
