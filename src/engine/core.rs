//! The engine thread: owns a model, batches every request that is waiting into one generation
//! round (left-padded prefill, then cached decode for all rows together), and swaps weights
//! only between rounds, so a request always finishes on the weights it started with.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::engine::inference::EngineFailure;
use crate::model::lora::LoraSpec;
use crate::model::{KvCache, ModelError, ModelSpec, ParamStore, Transformer};

use super::protocol::{FinishReason, PositionLogprobs};
use super::sampler::{sample, top_k_ids, Rng, SamplingParams};

/// What one request asks for, validated.
#[derive(Debug, Clone)]
pub struct JobParams {
    pub n: usize,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<i64>,
    pub stop_strings: Vec<String>,
    pub include_stop_str: bool,
    pub skip_special_tokens: bool,
    pub ignore_eos: bool,
    pub seed: Option<u64>,
    pub top_logprobs: usize,
}

impl JobParams {
    /// One greedy completion of at most `max_tokens`, no stops but EOS, special tokens skipped.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            n: 1,
            max_tokens,
            min_tokens: 0,
            sampling: SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
            },
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            include_stop_str: false,
            skip_special_tokens: true,
            ignore_eos: false,
            seed: None,
            top_logprobs: 0,
        }
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub token_ids: Vec<i64>,
    pub logprobs: Vec<PositionLogprobs>,
    pub text: String,
    pub finish: FinishReason,
}

pub use crate::version::PolicyVersion;

/// Engine status.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineInfo {
    pub version: PolicyVersion,
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
}

type Reply<T> = oneshot::Sender<T>;
/// What a generation request gets back: its completions, or why its round failed.
type Generated = Result<Vec<Completion>, EngineError>;
/// A generation request waiting for its round: prompt, parameters, where the answer goes.
type Job = (Vec<i64>, JobParams, Reply<Generated>);

enum Command {
    Generate(Vec<i64>, JobParams, Reply<Generated>),
    Swap(Vec<(String, Tensor)>, PolicyVersion, Reply<Result<(), SwapError>>),
    /// Serve the base weights with this LoRA adapter (replacing any earlier one).
    SwapAdapter(
        LoraSpec,
        Vec<(String, Tensor)>,
        PolicyVersion,
        Reply<Result<(), SwapError>>,
    ),
    /// The served model's logprob of each of `ids[1..]` after its prefix.
    Logprobs(Vec<i64>, Reply<Result<Vec<f64>, EngineFailure>>),
    Snapshot(Reply<(PolicyVersion, Vec<(String, Tensor)>)>),
    /// Version, parameter count and digest of the served weights, computed in place.
    Served(Reply<Result<(PolicyVersion, u64, crate::version::Digest), tch::TchError>>),
    Info(Reply<EngineInfo>),
}

/// Errors of the engine handle.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the engine thread is gone")]
    Gone,
    /// The round this request was in panicked; the engine caught it and serves on.
    #[error("the generation round failed: {0}")]
    RoundFailed(String),
}

/// The engine thread could not start: its model did not build, or no thread was made.
#[derive(Debug, thiserror::Error)]
pub enum EngineStartError {
    #[error("the engine did not start: {0}")]
    Model(#[from] ModelError),
    #[error("the engine did not start: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the engine did not start: its thread ended while starting")]
    Ended,
}

/// A weight or adapter swap the engine refused; the old weights serve on.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("update has {got} tensors, the engine has {have}")]
    Count { got: usize, have: usize },
    #[error("unknown tensor {0}")]
    Unknown(String),
    #[error("{name}: shape {sent:?}, engine has {have:?}")]
    Shape {
        name: String,
        sent: Vec<i64>,
        have: Vec<i64>,
    },
    #[error(transparent)]
    Lora(#[from] crate::model::lora::LoraError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// How long the engine thread may go without a beat before it counts as stalled.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);
/// The idle engine thread beats at least this often.
const BEAT_EVERY: Duration = Duration::from_millis(500);

/// The engine thread's heartbeat, read without going through its queue (a health check must
/// not wait behind a generation round). The thread beats while idle and at every decode step.
#[derive(Debug)]
pub struct Pulse {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last beat.
    beat_ms: AtomicU64,
    exited: AtomicBool,
    round_panics: AtomicU64,
    stall_after: Duration,
}

impl Pulse {
    fn new(stall_after: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            beat_ms: AtomicU64::new(0),
            exited: AtomicBool::new(false),
            round_panics: AtomicU64::new(0),
            stall_after,
        }
    }

    fn beat(&self) {
        self.beat_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Whether the thread runs and beat within its stall limit.
    pub fn alive(&self) -> bool {
        !self.exited.load(Ordering::SeqCst) && self.silence() < self.stall_after
    }

    /// Generation rounds that panicked (each caught; the engine served on).
    pub fn round_panics(&self) -> u64 {
        self.round_panics.load(Ordering::Relaxed)
    }
}

/// Marks the pulse dead when the engine thread ends, however it ends.
struct ExitMark(Arc<Pulse>);

impl Drop for ExitMark {
    fn drop(&mut self) {
        self.0.exited.store(true, Ordering::SeqCst);
    }
}

/// The model an engine serves. In `shared` mode the parameters are the learner's own tensors
/// and `gate` orders generation rounds against optimizer steps.
pub struct EngineModel {
    pub spec: ModelSpec,
    pub params: ParamStore,
    pub tokenizer: Arc<Tokenizer>,
    pub eos_ids: Vec<i64>,
    pub device: Device,
    pub version: PolicyVersion,
    /// Shared-weights mode: read-held during a round; the trainer write-holds it to update.
    pub gate: Option<Arc<RwLock<()>>>,
    /// Shared-weights mode: where the trainer publishes its step.
    pub shared_version: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Tunables of batching.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most rows (sequences) in one round.
    pub max_rows: usize,
    /// How long the first request of a round waits for company.
    pub window: Duration,
}

/// Handle on the engine thread; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    pub tokenizer: Arc<Tokenizer>,
    pub vocab_size: i64,
    /// The model's context window in tokens.
    pub context_len: usize,
    /// Where the engine's weights live.
    pub device: Device,
    /// The served tensors' names and shapes.
    pub manifest: Arc<Vec<(String, Vec<i64>)>>,
    /// The served model's shape.
    pub spec: ModelSpec,
    /// The engine thread's heartbeat and failure counts.
    pub pulse: Arc<Pulse>,
}

impl EngineHandle {
    /// Starts the engine thread and returns once its model is built; a model that does not
    /// build is this call's error.
    pub fn start(model: EngineModel, batch: BatchConfig) -> Result<Self, EngineStartError> {
        Self::start_with(model, batch, DEFAULT_STALL_AFTER)
    }

    /// [`Self::start`], counting the engine stalled after `stall_after` without a beat.
    pub fn start_with(model: EngineModel, batch: BatchConfig, stall_after: Duration) -> Result<Self, EngineStartError> {
        let (tx, rx) = mpsc::channel();
        let tokenizer = model.tokenizer.clone();
        let vocab_size = model.spec.vocab_size;
        let context_len = model.spec.rope.max_position_embeddings.max(1) as usize;
        let device = model.device;
        let spec = model.spec.clone();
        let manifest = Arc::new(model.params.iter().map(|(n, t)| (n.clone(), t.size())).collect());
        let pulse = Arc::new(Pulse::new(stall_after));
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_pulse = pulse.clone();
        std::thread::Builder::new()
            .name("grpo-engine".into())
            .spawn(move || {
                let _exit = ExitMark(thread_pulse.clone());
                match Engine::new(model, batch, thread_pulse) {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(()));
                        engine.run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(EngineStartError::Spawn)?;
        ready_rx.recv().map_err(|_| EngineStartError::Ended)??;
        Ok(Self {
            tx,
            tokenizer,
            vocab_size,
            context_len,
            device,
            manifest,
            spec,
            pulse,
        })
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| EngineError::Gone)?;
        rx.await.map_err(|_| EngineError::Gone)
    }

    /// Generates `params.n` completions of `prompt`.
    pub async fn generate(&self, prompt: Vec<i64>, params: JobParams) -> Result<Vec<Completion>, EngineError> {
        self.ask(|r| Command::Generate(prompt, params, r)).await?
    }

    /// Replaces the weights (same names and shapes) between rounds.
    pub async fn swap(
        &self,
        weights: Vec<(String, Tensor)>,
        version: PolicyVersion,
    ) -> Result<Result<(), SwapError>, EngineError> {
        self.ask(|r| Command::Swap(weights, version, r)).await
    }

    /// Serves the base weights with `tensors` (PEFT keys) as the LoRA adapter, between rounds.
    pub async fn swap_adapter(
        &self,
        lora: LoraSpec,
        tensors: Vec<(String, Tensor)>,
        version: PolicyVersion,
    ) -> Result<Result<(), SwapError>, EngineError> {
        self.ask(|r| Command::SwapAdapter(lora, tensors, version, r)).await
    }

    /// The served model's logprob of each of `ids[1..]` after its prefix.
    pub async fn logprobs(&self, ids: Vec<i64>) -> Result<Result<Vec<f64>, EngineFailure>, EngineError> {
        self.ask(|r| Command::Logprobs(ids, r)).await
    }

    /// CPU copies of the served weights and their version.
    pub async fn snapshot(&self) -> Result<(PolicyVersion, Vec<(String, Tensor)>), EngineError> {
        self.ask(Command::Snapshot).await
    }

    /// Version, size and digest of the served weights, without copying the model out.
    pub async fn served(
        &self,
    ) -> Result<Result<(PolicyVersion, u64, crate::version::Digest), tch::TchError>, EngineError> {
        self.ask(Command::Served).await
    }

    /// Version and shape facts.
    pub async fn info(&self) -> Result<EngineInfo, EngineError> {
        self.ask(Command::Info).await
    }
}

struct Engine {
    m: EngineModel,
    model: Transformer,
    /// The LoRA adapter served on top of the base weights, if any (on the engine's device).
    adapter: Option<Vec<(String, Tensor)>>,
    batch: BatchConfig,
    seed_counter: u64,
    pulse: Arc<Pulse>,
}

struct Row {
    job: usize,
    prompt_len: usize,
    rng: Rng,
    out: Vec<i64>,
    logprobs: Vec<PositionLogprobs>,
    /// Set when a stop string cut the text short.
    text: Option<String>,
    done: Option<FinishReason>,
}

impl Engine {
    fn new(m: EngineModel, batch: BatchConfig, pulse: Arc<Pulse>) -> Result<Self, ModelError> {
        let model = Transformer::new(&m.spec, &m.params)?;
        pulse.beat();
        Ok(Self {
            m,
            model,
            adapter: None,
            batch,
            seed_counter: 0x5EED,
            pulse,
        })
    }

    fn version(&self) -> PolicyVersion {
        match &self.m.shared_version {
            Some(v) => PolicyVersion(v.load(std::sync::atomic::Ordering::SeqCst)),
            None => self.m.version,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            self.pulse.beat();
            let first = match rx.recv_timeout(BEAT_EVERY) {
                Ok(cmd) => cmd,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut jobs = Vec::new();
            let mut pending = Some(first);
            let mut rows = 0;
            loop {
                match pending.take() {
                    Some(Command::Generate(prompt, params, reply)) => {
                        rows += params.n;
                        jobs.push((prompt, params, reply));
                    }
                    Some(other) => self.guarded_control(other),
                    None => {}
                }
                if rows >= self.batch.max_rows {
                    break;
                }
                let wait = if jobs.is_empty() { None } else { Some(self.batch.window) };
                pending = match wait {
                    Some(w) => rx.recv_timeout(w).ok(),
                    None => rx.try_recv().ok(),
                };
                if pending.is_none() {
                    break;
                }
            }
            if !jobs.is_empty() {
                self.round(jobs);
            }
        }
    }

    /// A control command; a panic in one is caught and logged (its caller sees its reply
    /// dropped) so the engine serves on.
    fn guarded_control(&mut self, cmd: Command) {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.control(cmd)));
        if let Err(panic) = ran {
            tracing::error!(error = %panic_text(panic.as_ref()), "an engine command panicked; the engine serves on");
        }
    }

    fn control(&mut self, cmd: Command) {
        match cmd {
            Command::Swap(weights, version, reply) => {
                let _ = reply.send(self.swap(weights).map(|()| self.m.version = version));
            }
            Command::SwapAdapter(lora, tensors, version, reply) => {
                let _ = reply.send(self.swap_adapter(&lora, tensors).map(|()| self.m.version = version));
            }
            Command::Logprobs(ids, reply) => {
                let _ = reply.send(crate::engine::vllm::model_logprobs(&self.model, &ids, self.m.device));
            }
            Command::Snapshot(reply) => {
                let _ = reply.send((self.version(), self.m.params.snapshot()));
            }
            Command::Served(reply) => {
                // The base weights, then the adapter's tensors when one is served.
                let mut named: Vec<(String, Tensor)> = self
                    .m
                    .params
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect();
                named.extend(
                    self.adapter
                        .iter()
                        .flatten()
                        .map(|(n, t)| (n.clone(), t.shallow_clone())),
                );
                let digest = crate::version::digest_tensors(&named);
                let _ = reply.send(digest.map(|d| (self.version(), self.m.params.numel() as u64, d)));
            }
            Command::Info(reply) => {
                let _ = reply.send(EngineInfo {
                    version: self.version(),
                    vocab_size: self.m.spec.vocab_size,
                    max_position_embeddings: self.m.spec.rope.max_position_embeddings,
                });
            }
            Command::Generate(..) => {}
        }
    }

    /// Rebinds the model to the base weights plus `tensors` as the adapter (checked first; the
    /// old model serves on if anything is wrong).
    fn swap_adapter(&mut self, lora: &LoraSpec, tensors: Vec<(String, Tensor)>) -> Result<(), SwapError> {
        lora.check(&self.m.spec)?;
        crate::model::lora::check_tensors(lora, &self.m.spec, &tensors)?;
        let kind = self.m.params.iter().next().map_or(tch::Kind::Float, |(_, t)| t.kind());
        let device = self.m.device;
        let moved: Vec<(String, Tensor)> = tch::no_grad(|| {
            tensors
                .into_iter()
                .map(|(n, t)| (n, t.to_device_(device, kind, false, false)))
                .collect()
        });
        let model = Transformer::new(&self.m.spec, &self.m.params).and_then(|m| m.with_lora(lora, &moved))?;
        self.model = model;
        self.adapter = Some(moved);
        Ok(())
    }

    fn swap(&mut self, weights: Vec<(String, Tensor)>) -> Result<(), SwapError> {
        let have = self.m.params.iter().count();
        if weights.len() != have {
            return Err(SwapError::Count {
                got: weights.len(),
                have,
            });
        }
        for (name, new) in &weights {
            let cur = self
                .m
                .params
                .get(name)
                .ok_or_else(|| SwapError::Unknown(name.clone()))?;
            if cur.size() != new.size() {
                return Err(SwapError::Shape {
                    name: name.clone(),
                    sent: new.size(),
                    have: cur.size(),
                });
            }
        }
        tch::no_grad(|| {
            for (name, new) in &weights {
                if let Some(mut cur) = self.m.params.get(name) {
                    cur.copy_(&new.to_kind(cur.kind()).to_device(cur.device()));
                }
            }
        });
        Ok(())
    }

    /// One generation round. A panic inside it (a libtorch error, a bad request that got
    /// past validation) is caught, counted and reported to the round's requests; the engine
    /// serves on.
    fn round(&mut self, jobs: Vec<Job>) {
        let gate = self.m.gate.clone();
        let _guard = gate.as_ref().map(|g| g.read().unwrap_or_else(|p| p.into_inner()));
        self.pulse.beat();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tch::no_grad(|| self.generate(&jobs))));
        match ran {
            Ok(results) => {
                for ((_, _, reply), completions) in jobs.into_iter().zip(results) {
                    let _ = reply.send(Ok(completions));
                }
            }
            Err(panic) => {
                let what = panic_text(panic.as_ref());
                let count = self.pulse.round_panics.fetch_add(1, Ordering::Relaxed) + 1;
                crate::telemetry::prom::sidecar().round_panics.inc();
                tracing::error!(requests = jobs.len(), round_panics = count, error = %what,
                    "a generation round panicked; its requests fail and the engine serves on");
                for (_, _, reply) in jobs {
                    let _ = reply.send(Err(EngineError::RoundFailed(what.clone())));
                }
            }
        }
    }

    fn generate(&mut self, jobs: &[Job]) -> Vec<Vec<Completion>> {
        let device = self.m.device;
        let mut rows = self.rows_for(jobs);
        let r = rows.len() as i64;
        let mut cache = KvCache::default();
        let (mut last, mut key_valid) = self.prefill(jobs, &rows, &mut cache);
        let max_new = jobs.iter().map(|(_, p, _)| p.max_tokens).max().unwrap_or(1);
        for step in 0..max_new {
            self.pulse.beat();
            let next = self.sample_step(jobs, &mut rows, &last, step);
            if rows.iter().all(|row| row.done.is_some()) {
                break;
            }
            key_valid = Tensor::cat(&[&key_valid, &Tensor::ones([r, 1], (Kind::Bool, device))], 1);
            let mask = key_valid.view([r, 1, 1, -1]);
            let positions: Vec<i64> = rows.iter().map(|row| (row.prompt_len + step) as i64).collect();
            let pos_t = Tensor::from_slice(&positions).view([r, 1]).to_device(device);
            let ids_t = Tensor::from_slice(&next).view([r, 1]).to_device(device);
            last = self
                .model
                .forward_cached(&ids_t, &pos_t, &mask, &mut cache)
                .squeeze_dim(1);
        }
        let mut out: Vec<Vec<Completion>> = jobs.iter().map(|_| Vec::new()).collect();
        for row in rows {
            let params = &jobs[row.job].1;
            let text = row
                .text
                .unwrap_or_else(|| self.decode(&row.out, params.skip_special_tokens));
            out[row.job].push(Completion {
                token_ids: row.out,
                logprobs: row.logprobs,
                text,
                finish: row.done.unwrap_or(FinishReason::Length),
            });
        }
        out
    }

    /// One row per completion asked for, each with its own sampler seed.
    fn rows_for(&mut self, jobs: &[Job]) -> Vec<Row> {
        let mut rows = Vec::new();
        for (j, (prompt, params, _)) in jobs.iter().enumerate() {
            for k in 0..params.n {
                let seed = match params.seed {
                    Some(s) => s.wrapping_add(k as u64),
                    None => {
                        self.seed_counter = self.seed_counter.wrapping_add(0x9E37_79B9);
                        self.seed_counter ^ std::process::id() as u64
                    }
                };
                rows.push(Row {
                    job: j,
                    prompt_len: prompt.len(),
                    rng: Rng::new(seed),
                    out: Vec::new(),
                    logprobs: Vec::new(),
                    text: None,
                    done: None,
                });
            }
        }
        rows
    }

    /// Runs the rows' prompts (left-padded to the longest) into `cache`; returns the logits at
    /// each row's last position and the keys' validity so far.
    fn prefill(&self, jobs: &[Job], rows: &[Row], cache: &mut KvCache) -> (Tensor, Tensor) {
        let device = self.m.device;
        let r = rows.len() as i64;
        let l_max = rows.iter().map(|row| row.prompt_len).max().unwrap_or(1) as i64;
        let mut ids = vec![0i64; (r * l_max) as usize];
        let mut pos = vec![0i64; (r * l_max) as usize];
        let mut valid = vec![false; (r * l_max) as usize];
        for (i, row) in rows.iter().enumerate() {
            let prompt = &jobs[row.job].0;
            let pad = l_max as usize - prompt.len();
            for (t, &tok) in prompt.iter().enumerate() {
                let at = i * l_max as usize + pad + t;
                ids[at] = tok;
                pos[at] = t as i64;
                valid[at] = true;
            }
        }
        let key_valid = Tensor::from_slice(&valid).view([r, l_max]).to_device(device);
        let causal = Tensor::ones([l_max, l_max], (Kind::Bool, device)).tril(0);
        let eye = Tensor::eye(l_max, (Kind::Bool, device));
        let mask = causal
            .unsqueeze(0)
            .logical_and(&key_valid.unsqueeze(1))
            .logical_or(&eye.unsqueeze(0))
            .unsqueeze(1);
        let ids_t = Tensor::from_slice(&ids).view([r, l_max]).to_device(device);
        let pos_t = Tensor::from_slice(&pos).view([r, l_max]).to_device(device);
        let logits = self.model.forward_cached(&ids_t, &pos_t, &mask, cache);
        (logits.select(1, l_max - 1), key_valid)
    }

    /// Samples the next token of every unfinished row from `last` (its logits), records it with
    /// its logprobs, and marks the rows that end; returns the tokens to feed back.
    fn sample_step(&self, jobs: &[Job], rows: &mut [Row], last: &Tensor, step: usize) -> Vec<i64> {
        let r = rows.len() as i64;
        let max_pos = self.m.spec.rope.max_position_embeddings as usize;
        let temps: Vec<f32> = rows
            .iter()
            .map(|row| {
                let t = jobs[row.job].1.sampling.temperature;
                if t > 0.0 {
                    t as f32
                } else {
                    1.0
                }
            })
            .collect();
        let t = Tensor::from_slice(&temps).to_device(self.m.device).view([r, 1]);
        let lp = (last.to_kind(Kind::Float) / t)
            .log_softmax(-1, Kind::Float)
            .to_device(Device::Cpu)
            .contiguous();
        let v = lp.size()[1] as usize;
        let flat: Vec<f32> = Vec::try_from(lp.view([-1])).unwrap_or_default();
        let mut next = vec![0i64; rows.len()];
        for (i, row) in rows.iter_mut().enumerate() {
            if row.done.is_some() {
                continue;
            }
            let params = &jobs[row.job].1;
            let full = &flat[i * v..(i + 1) * v];
            let mut dist = full.to_vec();
            if row.out.len() < params.min_tokens {
                for &id in self.m.eos_ids.iter().chain(&params.stop_token_ids) {
                    if let Some(x) = dist.get_mut(id as usize) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let tok = sample(&dist, &params.sampling, &mut row.rng);
            let mut entry = vec![(tok as i64, full[tok])];
            for alt in top_k_ids(full, params.top_logprobs) {
                if alt != tok {
                    entry.push((alt as i64, full[alt]));
                }
            }
            row.out.push(tok as i64);
            row.logprobs.push(PositionLogprobs(entry));
            next[i] = tok as i64;
            row.done = self.finished(
                row,
                params,
                step + 1 >= params.max_tokens || row.prompt_len + row.out.len() >= max_pos,
            );
        }
        next
    }

    fn decode(&self, ids: &[i64], skip_special: bool) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.m.tokenizer.decode(&ids, skip_special).unwrap_or_default()
    }

    /// Whether `row` just ended: EOS / stop token, stop string (text truncated), or length.
    fn finished(&self, row: &mut Row, params: &JobParams, at_limit: bool) -> Option<FinishReason> {
        let last = *row.out.last()?;
        let can_stop = row.out.len() >= params.min_tokens;
        if can_stop && ((!params.ignore_eos && self.m.eos_ids.contains(&last)) || params.stop_token_ids.contains(&last))
        {
            return Some(FinishReason::Stop);
        }
        if can_stop && !params.stop_strings.is_empty() {
            let text = self.decode(&row.out, params.skip_special_tokens);
            let hit = params
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
                .min_by_key(|(at, _)| *at);
            if let Some((at, s)) = hit {
                let end = if params.include_stop_str { at + s.len() } else { at };
                row.text = Some(text[..end].to_string());
                return Some(FinishReason::Stop);
            }
        }
        at_limit.then_some(FinishReason::Length)
    }
}

/// The message of a caught panic.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}
