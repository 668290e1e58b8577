//! The learner's `GET /endpoints` (on its `--metrics-listen` server): the inference servers
//! environments and the Atropos side can use, found through the learner. For every sidecar the
//! broadcaster knows (given with `--sidecar` or registered over gRPC): its `/generate` and
//! OpenAI-compatible URLs (from its own Info), the policy version it serves, and whether it is
//! healthy (it answered now, and holds the learner's newest version or an older one it was
//! sent, rather than being stale). Authenticated with the shared token whenever one is set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::actors::weight_broadcaster::SyncStats;
use crate::lock::recover;
use crate::rpc::auth::Token;
use crate::rpc::tls::Tls;
use crate::sync::client::{Deadlines, SidecarClient};

/// How long one sidecar's Info may take before it is listed as unhealthy.
const INFO_DEADLINE: Duration = Duration::from_secs(2);

/// What `/endpoints` reads.
#[derive(Clone)]
pub struct EndpointsState {
    pub stats: Arc<Mutex<SyncStats>>,
    pub token: Token,
    pub tls: Tls,
}

/// One inference server.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Endpoint {
    /// The sidecar's gRPC address (as the learner knows it).
    pub sidecar: String,
    /// `POST` here to generate (the sidecar's `/generate`); none when it did not answer.
    pub generate_url: Option<String>,
    /// The OpenAI-compatible base URL (`/v1`).
    pub openai_base_url: Option<String>,
    /// "embedded" or "vllm".
    pub engine: Option<String>,
    /// The version it serves (its own answer, else what the learner last sent it).
    pub policy_version: Option<u64>,
    pub healthy: bool,
}

/// The `/endpoints` route.
pub fn router(state: EndpointsState) -> Router {
    Router::new()
        .route("/endpoints", get(endpoints))
        .with_state(Arc::new(state))
}

async fn endpoints(State(state): State<Arc<EndpointsState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = crate::telemetry::prom::unauthorized(state.token.0.as_deref(), &headers) {
        return denied;
    }
    let known: BTreeMap<String, Option<u64>> = recover(&state.stats).sidecars.clone();
    // All sidecars are asked at once; each answer is bounded by INFO_DEADLINE.
    let asks: Vec<_> = known
        .into_iter()
        .map(|(addr, held)| {
            let (token, tls) = (state.token.clone(), state.tls.clone());
            tokio::spawn(ask(addr, held, token, tls))
        })
        .collect();
    let mut list: Vec<Endpoint> = Vec::with_capacity(asks.len());
    for a in asks {
        if let Ok(e) = a.await {
            list.push(e);
        }
    }
    Json(serde_json::json!({ "endpoints": list })).into_response()
}

async fn ask(addr: String, held: Option<u64>, token: Token, tls: Tls) -> Endpoint {
    let deadlines = Deadlines {
        rpc: INFO_DEADLINE,
        min_bytes_per_s: 1e6,
    };
    let info = match SidecarClient::with_tls(&addr, token, deadlines, &tls) {
        Ok(c) => tokio::time::timeout(INFO_DEADLINE, c.info())
            .await
            .ok()
            .and_then(Result::ok),
        Err(_) => None,
    };
    let base = info.as_ref().map(|i| i.http_address.trim_end_matches('/').to_string());
    Endpoint {
        generate_url: base.as_ref().map(|b| format!("{b}/generate")),
        openai_base_url: base.as_ref().map(|b| format!("{b}/v1")),
        engine: info.as_ref().map(|i| i.engine.clone()),
        policy_version: info.as_ref().and_then(|i| i.version.map(|v| v.step)).or(held),
        healthy: info.is_some() && held.is_some(),
        sidecar: addr,
    }
}
