//! Typed calls to one vLLM 0.26 OpenAI-compatible server: readiness routes, `/v1/completions`
//! with token-id prompts, and the dev-mode routes a weight update needs (`/pause`,
//! `/collective_rpc reload_weights`, `/resume`). Every call has a deadline.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::core::{Completion, JobParams};
use super::inference::EngineFailure;
use super::protocol::{FinishReason, PositionLogprobs};

/// vLLM versions this driver is tested against (major.minor).
pub const TESTED_VLLM: &[&str] = &["0.26"];

/// One vLLM server.
#[derive(Clone)]
pub struct VllmApi {
    http: reqwest::Client,
    base: String,
    served_name: String,
}

fn unavailable(route: &str, e: reqwest::Error) -> EngineFailure {
    EngineFailure::Unavailable(format!("vLLM {route}: {e}"))
}

#[derive(Deserialize)]
struct CompletionReply {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    index: usize,
    text: String,
    finish_reason: Option<String>,
    token_ids: Option<Vec<i64>>,
    logprobs: Option<ChoiceLogprobs>,
    prompt_logprobs: Option<Vec<Option<serde_json::Map<String, Value>>>>,
}

#[derive(Deserialize)]
struct ChoiceLogprobs {
    token_logprobs: Vec<Option<f64>>,
    top_logprobs: Option<Vec<Option<serde_json::Map<String, Value>>>>,
}

/// `"token_id:42"` or `"42"` -> 42.
fn token_of(key: &str) -> Option<i64> {
    key.strip_prefix("token_id:").unwrap_or(key).parse().ok()
}

impl VllmApi {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:8011`) serving `served_name`.
    pub fn new(base: String, served_name: String) -> Result<Self, EngineFailure> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| EngineFailure::Failed(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            served_name,
        })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, route: &str, req: reqwest::RequestBuilder, limit: Duration) -> Result<Value, EngineFailure> {
        let resp = req.timeout(limit).send().await.map_err(|e| unavailable(route, e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| unavailable(route, e))?;
        if status.is_client_error() {
            return Err(EngineFailure::Rejected(format!(
                "vLLM {route} answered {status}: {text}"
            )));
        }
        if !status.is_success() {
            return Err(EngineFailure::Failed(format!("vLLM {route} answered {status}: {text}")));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, route: &str, limit: Duration) -> Result<Value, EngineFailure> {
        self.send(route, self.http.get(format!("{}{route}", self.base)), limit)
            .await
    }

    async fn post(&self, route: &str, body: Option<Value>, limit: Duration) -> Result<Value, EngineFailure> {
        let mut req = self.http.post(format!("{}{route}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(route, req, limit).await
    }

    /// `GET /health` answers 200.
    pub async fn health(&self, limit: Duration) -> Result<(), EngineFailure> {
        self.get("/health", limit).await.map(|_| ())
    }

    /// `GET /version`.
    pub async fn version(&self, limit: Duration) -> Result<String, EngineFailure> {
        let v = self.get("/version", limit).await?;
        v.get("version")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| EngineFailure::Failed(format!("vLLM /version answered {v}")))
    }

    /// Whether `/v1/models` lists the served name.
    pub async fn serves_model(&self, limit: Duration) -> Result<bool, EngineFailure> {
        self.serves(&self.served_name, limit).await
    }

    /// Whether `/v1/models` lists `name` (the base model, or a LoRA adapter).
    pub async fn serves(&self, name: &str, limit: Duration) -> Result<bool, EngineFailure> {
        let v = self.get("/v1/models", limit).await?;
        Ok(v.get("data")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|m| m.get("id").and_then(Value::as_str) == Some(name))))
    }

    /// The same server, with requests naming `model` (a LoRA adapter's name) instead.
    pub fn for_model(&self, model: &str) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            served_name: model.to_string(),
        }
    }

    /// `POST /v1/load_lora_adapter`: loads the PEFT adapter in `dir` under `name`.
    pub async fn load_lora_adapter(
        &self,
        name: &str,
        dir: &std::path::Path,
        limit: Duration,
    ) -> Result<(), EngineFailure> {
        let body = serde_json::json!({"lora_name": name, "lora_path": dir.display().to_string()});
        self.post("/v1/load_lora_adapter", Some(body), limit).await.map(|_| ())
    }

    /// `POST /v1/unload_lora_adapter`: forgets the adapter `name`.
    pub async fn unload_lora_adapter(&self, name: &str, limit: Duration) -> Result<(), EngineFailure> {
        let body = serde_json::json!({"lora_name": name});
        self.post("/v1/unload_lora_adapter", Some(body), limit)
            .await
            .map(|_| ())
    }

    /// Generates through `/v1/completions` with a token-id prompt; every completion carries the
    /// sampled tokens' processed logprobs (vLLM runs with `--logprobs-mode processed_logprobs`).
    pub async fn complete(
        &self,
        prompt: &[i64],
        p: &JobParams,
        limit: Duration,
    ) -> Result<Vec<Completion>, EngineFailure> {
        let mut body = json!({
            "model": self.served_name, "prompt": prompt, "n": p.n, "max_tokens": p.max_tokens,
            "min_tokens": p.min_tokens, "temperature": p.sampling.temperature, "top_p": p.sampling.top_p,
            "stop": p.stop_strings, "stop_token_ids": p.stop_token_ids, "ignore_eos": p.ignore_eos,
            "include_stop_str_in_output": p.include_stop_str, "skip_special_tokens": p.skip_special_tokens,
            "logprobs": p.top_logprobs, "return_tokens_as_token_ids": true, "return_token_ids": true,
        });
        if p.sampling.top_k > 0 {
            body["top_k"] = json!(p.sampling.top_k);
        }
        if let Some(seed) = p.seed {
            body["seed"] = json!(seed);
        }
        let reply = self.post("/v1/completions", Some(body), limit).await?;
        let reply: CompletionReply = serde_json::from_value(reply)
            .map_err(|e| EngineFailure::Failed(format!("vLLM /v1/completions reply: {e}")))?;
        let mut choices = reply.choices;
        choices.sort_by_key(|c| c.index);
        choices.into_iter().map(completion_of).collect()
    }

    /// vLLM's logprob of every token of `ids` after its prefix (positions 1..), unprocessed.
    pub async fn prompt_logprobs(&self, ids: &[i64], limit: Duration) -> Result<Vec<f64>, EngineFailure> {
        let body = json!({"model": self.served_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                          "prompt_logprobs": 0});
        let reply = self.post("/v1/completions", Some(body), limit).await?;
        let reply: CompletionReply = serde_json::from_value(reply)
            .map_err(|e| EngineFailure::Failed(format!("vLLM prompt logprobs reply: {e}")))?;
        let positions = reply
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.prompt_logprobs)
            .ok_or_else(|| EngineFailure::Failed("vLLM returned no prompt logprobs".into()))?;
        ids.iter()
            .zip(&positions)
            .skip(1)
            .map(|(&id, pos)| {
                pos.as_ref()
                    .and_then(|m| m.iter().find(|(k, _)| token_of(k) == Some(id)))
                    .and_then(|(_, v)| v.get("logprob").and_then(Value::as_f64))
                    .ok_or_else(|| EngineFailure::Failed(format!("no prompt logprob for token {id}")))
            })
            .collect()
    }

    /// `POST /pause?mode=...`: `wait` lets running requests finish on the old weights, `keep`
    /// freezes them where they are (they continue on the new weights, their KV recomputed); new
    /// requests queue either way.
    pub async fn pause(&self, mode: PauseMode, limit: Duration) -> Result<(), EngineFailure> {
        let route = match mode {
            PauseMode::Wait => "/pause?mode=wait",
            PauseMode::Keep => "/pause?mode=keep",
        };
        self.post(route, None, limit).await.map(|_| ())
    }

    /// `POST /resume`.
    pub async fn resume(&self, limit: Duration) -> Result<(), EngineFailure> {
        self.post("/resume", None, limit).await.map(|_| ())
    }

    /// `reload_weights` from the safetensors in `dir` (complete modules, HF names).
    pub async fn reload_weights(&self, dir: &Path, limit: Duration) -> Result<(), EngineFailure> {
        let body = json!({"method": "reload_weights", "kwargs": {"weights_path": dir.display().to_string()},
                          "timeout": limit.as_secs_f64()});
        self.post("/collective_rpc", Some(body), limit + Duration::from_secs(5))
            .await
            .map(|_| ())
    }

    /// Shared mode: every worker's `grpo_shared_export` (our worker extension), one dict each.
    pub async fn shared_export(&self, limit: Duration) -> Result<Vec<Value>, EngineFailure> {
        let body = json!({"method": "grpo_shared_export", "timeout": limit.as_secs_f64()});
        let v = self
            .post("/collective_rpc", Some(body), limit + Duration::from_secs(5))
            .await?;
        v.get("results")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| EngineFailure::Failed(format!("vLLM's grpo_shared_export answered {v}")))
    }

    /// `GET /get_world_size`: vLLM's ranks (TP x PP x DP), each of which joins an NCCL transfer.
    pub async fn world_size(&self, limit: Duration) -> Result<i32, EngineFailure> {
        let v = self.get("/get_world_size", limit).await?;
        v["world_size"]
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .filter(|&n| n >= 1)
            .ok_or_else(|| EngineFailure::Failed(format!("vLLM /get_world_size answered {v}")))
    }

    /// `POST /init_weight_transfer_engine` for our `grpo_nccl` engine: every vLLM rank joins
    /// the communicator `unique_id` (as ranks 1..world); returns once all of them (and so the
    /// learner, rank 0) have joined.
    pub async fn init_nccl_transfer(&self, unique_id: &[u8], world: i32, limit: Duration) -> Result<(), EngineFailure> {
        use base64::Engine as _;
        let uid = base64::engine::general_purpose::STANDARD.encode(unique_id);
        let body = json!({"init_info": {"nccl_unique_id_b64": uid, "rank_offset": 1, "world_size": world}});
        self.post("/init_weight_transfer_engine", Some(body), limit)
            .await
            .map(|_| ())
    }

    /// `POST /start_weight_update`.
    pub async fn start_weight_update(&self, limit: Duration) -> Result<(), EngineFailure> {
        self.post("/start_weight_update", None, limit).await.map(|_| ())
    }

    /// `POST /update_weights` (returns once the workers received and loaded everything).
    pub async fn update_weights(&self, update_info: Value, limit: Duration) -> Result<(), EngineFailure> {
        self.post("/update_weights", Some(json!({"update_info": update_info})), limit)
            .await
            .map(|_| ())
    }

    /// `POST /finish_weight_update`.
    pub async fn finish_weight_update(&self, limit: Duration) -> Result<(), EngineFailure> {
        self.post("/finish_weight_update", None, limit).await.map(|_| ())
    }

    /// `POST /init_weight_transfer_engine` with an empty `init_info` (all the `ipc` backend takes).
    pub async fn init_ipc_transfer(&self, limit: Duration) -> Result<(), EngineFailure> {
        self.post("/init_weight_transfer_engine", Some(json!({"init_info": {}})), limit)
            .await
            .map(|_| ())
    }

    /// Swaps in the weights of `dir`: pause (which clears the KV and prefix caches), reload,
    /// resume. The resume runs even when the reload failed, so a failure never leaves the
    /// server paused.
    pub async fn swap_in(&self, dir: &Path, mode: PauseMode, limit: Duration) -> Result<SwapTimes, EngineFailure> {
        let t0 = std::time::Instant::now();
        self.pause(mode, limit).await?;
        let paused = t0.elapsed();
        let reloaded = self.reload_weights(dir, limit).await;
        let reload_done = t0.elapsed();
        let resumed = self.resume(limit).await;
        reloaded.and(resumed)?;
        Ok(SwapTimes {
            pause_s: paused.as_secs_f64(),
            reload_s: (reload_done - paused).as_secs_f64(),
            resume_s: (t0.elapsed() - reload_done).as_secs_f64(),
        })
    }
}

/// How a weight swap pauses vLLM (`--vllm-pause-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PauseMode {
    /// Running requests finish on the weights they started with (the default).
    Wait,
    /// Running requests are frozen and continue on the new weights.
    Keep,
}

/// Where the seconds of one swap went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwapTimes {
    /// Until vLLM was paused (with `wait`: until running requests finished).
    pub pause_s: f64,
    pub reload_s: f64,
    pub resume_s: f64,
}

fn finish_of(reason: Option<&str>) -> Result<FinishReason, EngineFailure> {
    match reason {
        Some("stop") => Ok(FinishReason::Stop),
        Some("length") => Ok(FinishReason::Length),
        other => Err(EngineFailure::Failed(format!(
            "vLLM finished a sequence with {other:?}"
        ))),
    }
}

fn completion_of(c: Choice) -> Result<Completion, EngineFailure> {
    let finish = finish_of(c.finish_reason.as_deref())?;
    let token_ids = c
        .token_ids
        .ok_or_else(|| EngineFailure::Failed("vLLM reply lacks token_ids".into()))?;
    let lp = c
        .logprobs
        .ok_or_else(|| EngineFailure::Failed("vLLM reply lacks logprobs".into()))?;
    if lp.token_logprobs.len() != token_ids.len() {
        return Err(EngineFailure::Failed(format!(
            "vLLM gave {} logprobs for {} tokens",
            lp.token_logprobs.len(),
            token_ids.len()
        )));
    }
    let tops = lp.top_logprobs.unwrap_or_default();
    let logprobs = token_ids
        .iter()
        .zip(&lp.token_logprobs)
        .enumerate()
        .map(|(j, (&tok, sampled))| {
            let mut entry = vec![(tok, sampled.unwrap_or(-9999.0) as f32)];
            let mut alts: Vec<(i64, f32)> = tops
                .get(j)
                .and_then(Option::as_ref)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((token_of(k)?, v.as_f64()? as f32)))
                        .filter(|(id, _)| *id != tok)
                        .collect()
                })
                .unwrap_or_default();
            alts.sort_by(|a, b| b.1.total_cmp(&a.1));
            entry.extend(alts);
            PositionLogprobs(entry)
        })
        .collect();
    Ok(Completion {
        token_ids,
        logprobs,
        text: c.text,
        finish,
    })
}

/// Whether a `/version` string is in the tested range.
pub fn is_tested(version: &str) -> bool {
    TESTED_VLLM
        .iter()
        .any(|t| version == *t || version.strip_prefix(t).is_some_and(|rest| rest.starts_with('.')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tested_range_is_minor_exact() {
        assert!(is_tested("0.26.0"));
        assert!(is_tested("0.26.1+cpu"));
        assert!(!is_tested("0.261.0"));
        assert!(!is_tested("0.32.0"));
    }

    #[test]
    fn a_choice_maps_to_a_completion_with_the_sampled_logprob_first() {
        let c: Choice = serde_json::from_value(json!({
            "index": 0, "text": "ab", "finish_reason": "length", "token_ids": [5, 9],
            "logprobs": {"token_logprobs": [-0.5, -1.25],
                         "top_logprobs": [{"token_id:5": -0.5, "token_id:7": -0.9}, {"token_id:2": -0.1}]}
        }))
        .expect("choice");
        let done = completion_of(c).expect("completion");
        assert_eq!(done.token_ids, vec![5, 9]);
        assert_eq!(done.finish, FinishReason::Length);
        assert_eq!(done.logprobs[0].0, vec![(5, -0.5), (7, -0.9)]);
        assert_eq!(done.logprobs[1].0, vec![(9, -1.25), (2, -0.1)]);
    }

    #[test]
    fn a_reply_with_missing_logprobs_is_an_error_not_a_guess() {
        let c: Choice = serde_json::from_value(json!({
            "index": 0, "text": "a", "finish_reason": "stop", "token_ids": [5],
            "logprobs": {"token_logprobs": []}
        }))
        .expect("choice");
        assert!(completion_of(c).is_err());
    }
}
