//! The `/generate` wire format of the Atropos `server_type=vllm` contract (the example
//! trainer's `vllm_api_server.py`): request body, response body, and validation that turns bad
//! input into a 4xx with a JSON error.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// `prompt`: a string, or `{"prompt_token_ids": [...]}` (what Atropos sends).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids { prompt_token_ids: Vec<i64> },
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

fn one() -> usize {
    1
}
fn sixteen() -> usize {
    16
}
fn unit() -> f64 {
    1.0
}

/// The request body. Keys other than these are rejected (vLLM would raise on them too).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    #[serde(default)]
    pub stream: bool,
    #[serde(default = "one")]
    pub n: usize,
    #[serde(default = "sixteen")]
    pub max_tokens: usize,
    #[serde(default = "unit")]
    pub temperature: f64,
    #[serde(default = "unit")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: i64,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stop_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Present (any value) = return logprobs, token_ids and prompt_token_ids; k > 0 adds the
    /// top-k alternatives per position.
    #[serde(default)]
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub min_tokens: usize,
    #[serde(default)]
    pub include_stop_str_in_output: bool,
    #[serde(default = "yes")]
    pub skip_special_tokens: bool,
    #[serde(default)]
    pub presence_penalty: f64,
    #[serde(default)]
    pub frequency_penalty: f64,
    #[serde(default = "unit")]
    pub repetition_penalty: f64,
}

fn yes() -> bool {
    true
}

/// Largest `n` per request.
pub const MAX_N: usize = 256;
/// Largest `logprobs` k.
pub const MAX_LOGPROBS: usize = 20;

/// A `/generate` request the engine cannot honour, though its types allow it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("stream=true is not supported; omit it")]
    Stream,
    #[error("n must be in 1..={MAX_N} (got {0})")]
    N(usize),
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error("temperature must be >= 0 (got {0})")]
    Temperature(f64),
    #[error("top_p must be in (0, 1] (got {0})")]
    TopP(f64),
    #[error("logprobs must be at most {MAX_LOGPROBS}")]
    Logprobs,
    #[error("min_tokens must not exceed max_tokens")]
    MinTokens,
    #[error("presence/frequency/repetition penalties are not supported (leave them neutral)")]
    Penalties,
    #[error("prompt_token_ids is empty")]
    EmptyPrompt,
}

impl GenerateRequest {
    /// Checks values that the types allow but the engine cannot honour.
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        if self.stream {
            return Err(InvalidRequest::Stream);
        }
        if self.n == 0 || self.n > MAX_N {
            return Err(InvalidRequest::N(self.n));
        }
        if self.max_tokens == 0 {
            return Err(InvalidRequest::NoTokens);
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(InvalidRequest::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InvalidRequest::TopP(self.top_p));
        }
        if self.logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
            return Err(InvalidRequest::Logprobs);
        }
        if self.min_tokens > self.max_tokens {
            return Err(InvalidRequest::MinTokens);
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0 {
            return Err(InvalidRequest::Penalties);
        }
        if let Prompt::Ids { prompt_token_ids } = &self.prompt {
            if prompt_token_ids.is_empty() {
                return Err(InvalidRequest::EmptyPrompt);
            }
        }
        Ok(())
    }

    /// Stop strings as a list.
    pub fn stop_strings(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }
}

/// What one `/generate` request may ask of this server (`--generate-max-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerateLimits {
    /// Largest `max_tokens`.
    pub max_tokens: usize,
    /// Longest prompt in tokens (`None`: the model's context window).
    pub max_prompt_tokens: Option<usize>,
    /// Largest `n`.
    pub max_n: usize,
}

impl Default for GenerateLimits {
    fn default() -> Self {
        Self {
            max_tokens: 8192,
            max_prompt_tokens: None,
            max_n: MAX_N,
        }
    }
}

/// A request over this server's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("max_tokens {asked} is over this server's limit of {limit}")]
    MaxTokens { asked: usize, limit: usize },
    #[error("the prompt has {asked} tokens, over this server's limit of {limit}")]
    Prompt { asked: usize, limit: usize },
    #[error("n {asked} is over this server's limit of {limit}")]
    N { asked: usize, limit: usize },
}

impl GenerateLimits {
    /// Checks a request with a prompt of `prompt_tokens` against the limits; `context` is
    /// the model's window, the prompt limit when none is configured.
    pub fn check(&self, req: &GenerateRequest, prompt_tokens: usize, context: usize) -> Result<(), LimitExceeded> {
        if req.max_tokens > self.max_tokens {
            return Err(LimitExceeded::MaxTokens {
                asked: req.max_tokens,
                limit: self.max_tokens,
            });
        }
        if req.n > self.max_n {
            return Err(LimitExceeded::N {
                asked: req.n,
                limit: self.max_n,
            });
        }
        let limit = self.max_prompt_tokens.unwrap_or(context);
        if prompt_tokens > limit {
            return Err(LimitExceeded::Prompt {
                asked: prompt_tokens,
                limit,
            });
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` (or the context window) reached.
    Length,
}

/// Logprobs at one generated position: the sampled token first, then any top-k alternatives.
/// Serialised as `[{"<id>": lp, ...}]` (a one-element list holding a dict), keys in this order.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionLogprobs(pub Vec<(i64, f32)>);

impl Serialize for PositionLogprobs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Dict<'a>(&'a [(i64, f32)]);
        impl Serialize for Dict<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for (id, lp) in self.0 {
                    map.serialize_entry(&id.to_string(), lp)?;
                }
                map.end()
            }
        }
        [Dict(&self.0)].serialize(serializer)
    }
}

/// The response body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerateResponse {
    pub text: Vec<String>,
    pub prompt: String,
    pub finish_reasons: Vec<FinishReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Vec<PositionLogprobs>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<Vec<i64>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_atropos_request_and_rejects_unknown_keys() {
        let req: GenerateRequest = serde_json::from_str(
            r#"{"prompt":{"prompt_token_ids":[1,2]},"logprobs":0,"n":4,"max_tokens":8,"temperature":1.0}"#,
        )
        .expect("atropos request");
        assert_eq!(
            req.prompt,
            Prompt::Ids {
                prompt_token_ids: vec![1, 2]
            }
        );
        assert_eq!((req.n, req.max_tokens, req.logprobs), (4, 8, Some(0)));
        req.validate().expect("valid");
        let err = serde_json::from_str::<GenerateRequest>(r#"{"prompt":"hi","best_of":2}"#).expect_err("unknown key");
        assert!(err.to_string().contains("best_of"), "{err}");
    }

    #[test]
    fn logprobs_serialise_as_one_element_lists_in_order() {
        let pos = PositionLogprobs(vec![(42, -0.5), (7, -1.0)]);
        assert_eq!(serde_json::to_string(&pos).expect("json"), r#"[{"42":-0.5,"7":-1.0}]"#);
    }
}
