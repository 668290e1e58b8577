//! The engine's HTTP API: `POST /generate` (Atropos `server_type=vllm` contract), `GET /health`
//! and `GET /info`. Malformed requests get a 4xx with `{"error": "..."}`, never a crash.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::core::JobParams;
use super::inference::{EngineFailure, SharedEngine};
use super::protocol::{GenerateLimits, GenerateRequest, GenerateResponse, Prompt};
use super::sampler::SamplingParams;
use crate::telemetry::prom;

/// What `/generate` allows: the request limits, and the token it requires (if any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpPolicy {
    pub limits: GenerateLimits,
    /// When set, `/generate` needs `authorization: Bearer <token>` (`--generate-requires-token`).
    pub token: Option<String>,
    /// When set, `/metrics` needs the token (a listener off loopback).
    pub metrics_token: Option<String>,
}

/// The router's state: the engine, and the policy its `/generate` enforces.
#[derive(Clone)]
struct Served {
    engine: SharedEngine,
    policy: Arc<HttpPolicy>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// 200 while the engine answers (the embedded engine's thread, or a ready vLLM), else 503.
async fn health(State(s): State<Served>) -> StatusCode {
    if s.engine.healthy().await {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn info(State(Served { engine, .. }): State<Served>) -> Response {
    match engine.version().await {
        Ok(version) => Json(json!({
            "version": version.0,
            "vocab_size": engine.vocab_size(),
            "engine": engine.kind(),
        }))
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn failure(e: EngineFailure) -> Response {
    match e {
        EngineFailure::Rejected(m) => error(StatusCode::BAD_REQUEST, m),
        other => error(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

async fn metrics(State(s): State<Served>, headers: HeaderMap) -> Response {
    let up = i64::from(s.engine.healthy().await);
    prom::sidecar().engine_up.set(up);
    let access = prom::Access {
        token: s.policy.metrics_token.clone(),
    };
    prom::respond(prom::Role::Sidecar, &access, &headers)
}

/// `/generate`, counted by status on `/metrics`.
async fn generate(state: State<Served>, headers: HeaderMap, body: Bytes) -> Response {
    let m = prom::sidecar();
    m.generate_in_flight.inc();
    let response = generate_inner(state, headers, body).await;
    m.generate_in_flight.dec();
    m.generate_requests
        .get_or_create(&prom::Code {
            code: response.status().as_u16(),
        })
        .inc();
    response
}

async fn generate_inner(State(Served { engine, policy }): State<Served>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(token) = &policy.token {
        let presented = headers.get("authorization").map(|v| v.as_bytes());
        if !crate::secret::bearer_matches(presented, token) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token (authorization: Bearer ...)",
            );
        }
    }
    let req: GenerateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
    };
    if let Err(e) = req.validate() {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let (prompt_ids, prompt_text) = match encode_prompt(&req, &engine) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    // Bodies are capped at 2 MB (axum's default), so a text prompt is encoded before its
    // token count is checked.
    if let Err(e) = policy.limits.check(&req, prompt_ids.len(), engine.context_len()) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let params = job_params(&req);
    let completions = match engine.generate(prompt_ids.clone(), params).await {
        Ok(c) => c,
        Err(e) => return failure(e),
    };
    let generated: usize = completions.iter().map(|c| c.token_ids.len()).sum();
    prom::sidecar().generated_tokens.inc_by(generated as u64);
    let with_logprobs = req.logprobs.is_some();
    let resp = GenerateResponse {
        text: completions.iter().map(|c| c.text.clone()).collect(),
        prompt: prompt_text,
        finish_reasons: completions.iter().map(|c| c.finish).collect(),
        logprobs: with_logprobs.then(|| completions.iter().map(|c| c.logprobs.clone()).collect()),
        prompt_token_ids: with_logprobs.then_some(prompt_ids),
        token_ids: with_logprobs.then(|| completions.iter().map(|c| c.token_ids.clone()).collect()),
    };
    Json(resp).into_response()
}

/// The prompt's token ids and text, or the 4xx that refuses it.
fn encode_prompt(req: &GenerateRequest, engine: &SharedEngine) -> Result<(Vec<i64>, String), Box<Response>> {
    match &req.prompt {
        Prompt::Ids { prompt_token_ids } => {
            if let Some(bad) = prompt_token_ids.iter().find(|&&t| t < 0 || t >= engine.vocab_size()) {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    format!("prompt token {bad} outside vocabulary 0..{}", engine.vocab_size()),
                )));
            }
            let ids: Vec<u32> = prompt_token_ids.iter().map(|&t| t as u32).collect();
            Ok((
                prompt_token_ids.clone(),
                engine.tokenizer().decode(&ids, false).unwrap_or_default(),
            ))
        }
        Prompt::Text(text) => match engine.tokenizer().encode(text.as_str(), true) {
            Ok(enc) if !enc.get_ids().is_empty() => {
                Ok((enc.get_ids().iter().map(|&i| i64::from(i)).collect(), text.clone()))
            }
            Ok(_) => Err(Box::new(error(StatusCode::BAD_REQUEST, "prompt encodes to no tokens"))),
            Err(e) => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("cannot tokenize prompt: {e}"),
            ))),
        },
    }
}

fn job_params(req: &GenerateRequest) -> JobParams {
    JobParams {
        n: req.n,
        max_tokens: req.max_tokens,
        min_tokens: req.min_tokens,
        sampling: SamplingParams {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
        },
        stop_token_ids: req.stop_token_ids.clone().unwrap_or_default(),
        stop_strings: req.stop_strings(),
        include_stop_str: req.include_stop_str_in_output,
        skip_special_tokens: req.skip_special_tokens,
        ignore_eos: req.ignore_eos,
        seed: req.seed,
        top_logprobs: req.logprobs.unwrap_or(0),
    }
}

/// The router, for serving or for tests.
pub fn router(engine: SharedEngine, policy: HttpPolicy) -> Router {
    Router::new()
        .route("/generate", post(generate))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(Served {
            engine,
            policy: Arc::new(policy),
        })
}

/// Binds `addr` (port 0 picks one) and serves in a task; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    engine: SharedEngine,
    policy: HttpPolicy,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(engine, policy);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((bound, task))
}
