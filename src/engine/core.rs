//! The engine thread: owns a model, batches every request that is waiting into one generation
//! round (left-padded prefill, then cached decode for all rows together), and swaps weights
//! only between rounds, so a request always finishes on the weights it started with.

use std::sync::{mpsc, Arc, RwLock};
use std::time::Duration;

use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::model::{KvCache, ModelSpec, ParamStore, Transformer};

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
/// A generation request waiting for its round: prompt, parameters, where the answer goes.
type Job = (Vec<i64>, JobParams, Reply<Vec<Completion>>);

enum Command {
    Generate(Vec<i64>, JobParams, Reply<Vec<Completion>>),
    Swap(Vec<(String, Tensor)>, PolicyVersion, Reply<Result<(), String>>),
    Snapshot(Reply<(PolicyVersion, Vec<(String, Tensor)>)>),
    /// Version, parameter count and digest of the served weights, computed in place.
    Served(Reply<Result<(PolicyVersion, u64, crate::version::Digest), String>>),
    Info(Reply<EngineInfo>),
}

/// Errors of the engine handle.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine thread is gone")]
    Gone,
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
    /// Where the engine's weights live.
    pub device: Device,
    /// The served tensors' names and shapes.
    pub manifest: Arc<Vec<(String, Vec<i64>)>>,
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn start(model: EngineModel, batch: BatchConfig) -> Result<Self, ModelErrorString> {
        let (tx, rx) = mpsc::channel();
        let tokenizer = model.tokenizer.clone();
        let vocab_size = model.spec.vocab_size;
        let device = model.device;
        let manifest = Arc::new(model.params.iter().map(|(n, t)| (n.clone(), t.size())).collect());
        std::thread::Builder::new()
            .name("grpo-engine".into())
            .spawn(move || Engine::new(model, batch).map(|e| e.run(rx)))
            .map_err(|e| ModelErrorString(e.to_string()))?;
        Ok(Self {
            tx,
            tokenizer,
            vocab_size,
            device,
            manifest,
        })
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| EngineError::Gone)?;
        rx.await.map_err(|_| EngineError::Gone)
    }

    /// Generates `params.n` completions of `prompt`.
    pub async fn generate(&self, prompt: Vec<i64>, params: JobParams) -> Result<Vec<Completion>, EngineError> {
        self.ask(|r| Command::Generate(prompt, params, r)).await
    }

    /// Replaces the weights (same names and shapes) between rounds.
    pub async fn swap(
        &self,
        weights: Vec<(String, Tensor)>,
        version: PolicyVersion,
    ) -> Result<Result<(), String>, EngineError> {
        self.ask(|r| Command::Swap(weights, version, r)).await
    }

    /// CPU copies of the served weights and their version.
    pub async fn snapshot(&self) -> Result<(PolicyVersion, Vec<(String, Tensor)>), EngineError> {
        self.ask(Command::Snapshot).await
    }

    /// Version, size and digest of the served weights, without copying the model out.
    pub async fn served(&self) -> Result<Result<(PolicyVersion, u64, crate::version::Digest), String>, EngineError> {
        self.ask(Command::Served).await
    }

    /// Version and shape facts.
    pub async fn info(&self) -> Result<EngineInfo, EngineError> {
        self.ask(Command::Info).await
    }
}

/// A thread start failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ModelErrorString(pub String);

struct Engine {
    m: EngineModel,
    model: Transformer,
    batch: BatchConfig,
    seed_counter: u64,
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
    fn new(m: EngineModel, batch: BatchConfig) -> Result<Self, String> {
        let model = Transformer::new(&m.spec, &m.params).map_err(|e| e.to_string())?;
        Ok(Self {
            m,
            model,
            batch,
            seed_counter: 0x5EED,
        })
    }

    fn version(&self) -> PolicyVersion {
        match &self.m.shared_version {
            Some(v) => PolicyVersion(v.load(std::sync::atomic::Ordering::SeqCst)),
            None => self.m.version,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = Vec::new();
            let mut pending = Some(first);
            let mut rows = 0;
            loop {
                match pending.take() {
                    Some(Command::Generate(prompt, params, reply)) => {
                        rows += params.n;
                        jobs.push((prompt, params, reply));
                    }
                    Some(other) => self.control(other),
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

    fn control(&mut self, cmd: Command) {
        match cmd {
            Command::Swap(weights, version, reply) => {
                let _ = reply.send(self.swap(weights).map(|()| self.m.version = version));
            }
            Command::Snapshot(reply) => {
                let _ = reply.send((self.version(), self.m.params.snapshot()));
            }
            Command::Served(reply) => {
                let named: Vec<(String, Tensor)> = self
                    .m
                    .params
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect();
                let digest = crate::version::digest_tensors(&named).map_err(|e| e.to_string());
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

    fn swap(&mut self, weights: Vec<(String, Tensor)>) -> Result<(), String> {
        let names: Vec<String> = self.m.params.iter().map(|(n, _)| n.clone()).collect();
        if weights.len() != names.len() {
            return Err(format!(
                "update has {} tensors, the engine has {}",
                weights.len(),
                names.len()
            ));
        }
        for (name, new) in &weights {
            let cur = self
                .m
                .params
                .get(name)
                .ok_or_else(|| format!("unknown tensor {name}"))?;
            if cur.size() != new.size() {
                return Err(format!("{name}: shape {:?}, engine has {:?}", new.size(), cur.size()));
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

    fn round(&mut self, jobs: Vec<Job>) {
        let gate = self.m.gate.clone();
        let _guard = gate.as_ref().map(|g| g.read());
        let results = tch::no_grad(|| self.generate(&jobs));
        for ((_, _, reply), completions) in jobs.into_iter().zip(results) {
            let _ = reply.send(completions);
        }
    }

    fn generate(&mut self, jobs: &[Job]) -> Vec<Vec<Completion>> {
        let device = self.m.device;
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
        let mut cache = KvCache::default();
        let ids_t = Tensor::from_slice(&ids).view([r, l_max]).to_device(device);
        let pos_t = Tensor::from_slice(&pos).view([r, l_max]).to_device(device);
        let logits = self.model.forward_cached(&ids_t, &pos_t, &mask, &mut cache);
        let mut last = logits.select(1, l_max - 1);
        let mut key_valid = key_valid;
        let max_new = jobs.iter().map(|(_, p, _)| p.max_tokens).max().unwrap_or(1);
        let max_pos = self.m.spec.rope.max_position_embeddings as usize;
        for step in 0..max_new {
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
            let t = Tensor::from_slice(&temps).to_device(device).view([r, 1]);
            let lp = (last.to_kind(Kind::Float) / t)
                .log_softmax(-1, Kind::Float)
                .to_device(Device::Cpu)
                .contiguous();
            let v = lp.size()[1] as usize;
            let flat: Vec<f32> = Vec::try_from(lp.view([-1])).unwrap_or_default();
            let mut next = vec![0i64; r as usize];
            for (i, row) in rows.iter_mut().enumerate() {
                if row.done.is_some() {
                    continue;
                }
                let params = &jobs[row.job].1;
                let mut dist = flat[i * v..(i + 1) * v].to_vec();
                if row.out.len() < params.min_tokens {
                    for &id in self.m.eos_ids.iter().chain(&params.stop_token_ids) {
                        if let Some(x) = dist.get_mut(id as usize) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let tok = sample(&dist, &params.sampling, &mut row.rng);
                let full = &flat[i * v..(i + 1) * v];
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
