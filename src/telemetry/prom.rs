//! Prometheus `/metrics` (OpenMetrics text) for the learner and the sidecar. Each role has its
//! own registry, created on first use and shared by the whole process (as Prometheus client
//! libraries' default registries are); names carry the `grpo_` prefix and the standard
//! `_seconds`, `_bytes` and `_total` suffixes (in the names: strict OpenMetrics parsers refuse
//! a `# UNIT` line on histograms).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The OpenMetrics exposition's content type.
pub const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A float gauge.
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// One label: why (a rejection reason, a skip reason, an outcome).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// One label: the sidecar's gRPC URL.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Sidecar {
    pub sidecar: String,
}

/// One label: a phase of a weight sync (`begin`, `transfer`, `commit`, `total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub phase: String,
}

/// One label: a queue's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Queue {
    pub queue: String,
}

/// One label: an HTTP status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: u16,
}

fn reason_label(reason: &str) -> Reason {
    Reason { reason: reason.into() }
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// The learner's metrics.
#[derive(Debug)]
pub struct LearnerMetrics {
    pub steps: Counter,
    pub loss: FloatGauge,
    pub grad_norm: FloatGauge,
    pub tokens_per_second: FloatGauge,
    pub rejected_groups: Family<Reason, Counter>,
    pub skipped_steps: Family<Reason, Counter>,
    pub sidecar_policy_version: Family<Sidecar, Gauge>,
    pub sidecar_staleness: Family<Sidecar, Gauge>,
    pub sync_seconds: Family<Phase, Histogram, fn() -> Histogram>,
    pub sync_bytes: Counter,
    pub publications: Family<Reason, Counter>,
    pub sidecar_resyncs: Counter,
    pub queue_depth: Family<Queue, Gauge>,
    pub api_wait: Histogram,
    pub api_errors: Counter,
    pub api_registrations: Counter,
}

/// The sidecar's metrics.
#[derive(Debug)]
pub struct SidecarMetrics {
    pub policy_version: Gauge,
    pub engine_up: Gauge,
    pub generate_requests: Family<Code, Counter>,
    pub generated_tokens: Counter,
    pub generate_in_flight: Gauge,
    pub round_panics: Counter,
    pub engine_restarts: Counter,
    pub weight_updates: Family<Reason, Counter>,
    pub apply_seconds: Histogram,
    pub canary_max_abs_diff: FloatGauge,
    /// lora-restart: seconds generation stalled in the last restart with a new adapter.
    pub lora_restart_seconds: FloatGauge,
}

impl Default for LearnerMetrics {
    fn default() -> Self {
        Self {
            steps: Counter::default(),
            loss: FloatGauge::default(),
            grad_norm: FloatGauge::default(),
            tokens_per_second: FloatGauge::default(),
            rejected_groups: Family::default(),
            skipped_steps: Family::default(),
            sidecar_policy_version: Family::default(),
            sidecar_staleness: Family::default(),
            sync_seconds: Family::new_with_constructor(seconds_histogram),
            sync_bytes: Counter::default(),
            publications: Family::default(),
            sidecar_resyncs: Counter::default(),
            queue_depth: Family::default(),
            api_wait: seconds_histogram(),
            api_errors: Counter::default(),
            api_registrations: Counter::default(),
        }
    }
}

impl LearnerMetrics {
    /// Takes in one step's record.
    pub fn observe_step(&self, r: &crate::telemetry::metrics::StepRecord) {
        self.steps.inc();
        self.loss.set(r.train.loss);
        self.grad_norm.set(r.train.grad_norm);
        let tps = if r.step_time_s > 0.0 {
            r.train.tokens as f64 / r.step_time_s
        } else {
            0.0
        };
        self.tokens_per_second.set(tps);
        for (reason, n) in &r.rejected_by_reason {
            self.rejected_groups.get_or_create(&reason_label(reason)).inc_by(*n);
        }
        if let Some(skip) = r.train.skip_reason {
            self.skipped_steps.get_or_create(&reason_label(skip.as_str())).inc();
        }
        self.api_wait.observe(r.wait_time_s);
    }

    /// Sets a queue's depth.
    pub fn queue(&self, name: &str, depth: usize) {
        self.queue_depth
            .get_or_create(&Queue { queue: name.into() })
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Takes in one send of a version to one sidecar.
    pub fn observe_send(&self, outcome: &str, phases: &[(&str, f64)], bytes: u64) {
        self.publications.get_or_create(&reason_label(outcome)).inc();
        for (phase, seconds) in phases {
            self.sync_seconds
                .get_or_create(&Phase { phase: (*phase).into() })
                .observe(*seconds);
        }
        self.sync_bytes.inc_by(bytes);
    }

    /// Sets a sidecar's acknowledged version and how far it is behind `newest`.
    pub fn sidecar_at(&self, sidecar: &str, version: Option<u64>, newest: Option<u64>) {
        let label = Sidecar {
            sidecar: sidecar.into(),
        };
        let held = version.unwrap_or(0);
        self.sidecar_policy_version
            .get_or_create(&label)
            .set(i64::try_from(held).unwrap_or(i64::MAX));
        let behind = newest.unwrap_or(held).saturating_sub(held);
        self.sidecar_staleness
            .get_or_create(&label)
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
    }

    /// Drops a forgotten sidecar's gauges.
    pub fn forget_sidecar(&self, sidecar: &str) {
        let label = Sidecar {
            sidecar: sidecar.into(),
        };
        self.sidecar_policy_version.remove(&label);
        self.sidecar_staleness.remove(&label);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "steps",
            "Optimizer steps taken (skipped ones included)",
            self.steps.clone(),
        );
        r.register("loss", "Loss of the last step", self.loss.clone());
        r.register(
            "grad_norm",
            "Gradient norm of the last step, before clipping",
            self.grad_norm.clone(),
        );
        r.register(
            "tokens_per_second",
            "Scored tokens per second of the last step",
            self.tokens_per_second.clone(),
        );
        r.register(
            "rejected_groups",
            "Groups rejected by the validator, by reason",
            self.rejected_groups.clone(),
        );
        r.register(
            "skipped_steps",
            "Steps skipped for a non-finite loss or gradient norm",
            self.skipped_steps.clone(),
        );
        r.register(
            "sidecar_policy_version",
            "Policy version each sidecar acknowledged",
            self.sidecar_policy_version.clone(),
        );
        r.register(
            "sidecar_staleness_versions",
            "Versions each sidecar is behind the newest publication",
            self.sidecar_staleness.clone(),
        );
        r.register(
            "sync_seconds",
            "Weight sync time per sidecar send, by phase",
            self.sync_seconds.clone(),
        );
        r.register(
            "sync_bytes",
            "Bytes of weights sent to sidecars",
            self.sync_bytes.clone(),
        );
        r.register(
            "publications",
            "Sends of a version to one sidecar, by outcome",
            self.publications.clone(),
        );
        r.register(
            "sidecar_resyncs",
            "Full syncs sent to a sidecar that had been stale",
            self.sidecar_resyncs.clone(),
        );
        r.register("queue_depth", "Items waiting in a queue", self.queue_depth.clone());
        r.register(
            "api_wait_seconds",
            "Time the learner waited for each Atropos batch",
            self.api_wait.clone(),
        );
        r.register(
            "api_errors",
            "Failed calls to the Atropos API (each retried)",
            self.api_errors.clone(),
        );
        r.register(
            "api_registrations",
            "Registrations with the Atropos API (the first, and again after it lost ours)",
            self.api_registrations.clone(),
        );
    }
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self {
            policy_version: Gauge::default(),
            engine_up: Gauge::default(),
            generate_requests: Family::default(),
            generated_tokens: Counter::default(),
            generate_in_flight: Gauge::default(),
            round_panics: Counter::default(),
            engine_restarts: Counter::default(),
            weight_updates: Family::default(),
            apply_seconds: seconds_histogram(),
            canary_max_abs_diff: FloatGauge::default(),
            lora_restart_seconds: FloatGauge::default(),
        }
    }
}

impl SidecarMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "policy_version",
            "Policy version the engine serves",
            self.policy_version.clone(),
        );
        r.register(
            "engine_up",
            "1 while the engine answers its heartbeat or probe",
            self.engine_up.clone(),
        );
        r.register(
            "generate_requests",
            "/generate requests, by HTTP status",
            self.generate_requests.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens generated for /generate",
            self.generated_tokens.clone(),
        );
        r.register(
            "generate_in_flight",
            "/generate requests being served",
            self.generate_in_flight.clone(),
        );
        r.register(
            "engine_round_panics",
            "Generation rounds that panicked (caught)",
            self.round_panics.clone(),
        );
        r.register(
            "engine_restarts",
            "Restarts of the supervised vLLM",
            self.engine_restarts.clone(),
        );
        r.register(
            "weight_updates",
            "Weight updates received, by outcome",
            self.weight_updates.clone(),
        );
        r.register(
            "weight_apply_seconds",
            "Time from a verified commit to serving it",
            self.apply_seconds.clone(),
        );
        r.register(
            "sync_canary_max_abs_diff",
            "Logprob canary of the last installed version",
            self.canary_max_abs_diff.clone(),
        );
        r.register(
            "lora_restart_seconds",
            "Generation stall of the last vLLM restart with a new LoRA adapter",
            self.lora_restart_seconds.clone(),
        );
    }
}

struct Node<M> {
    metrics: M,
    registry: Registry,
}

impl<M: Default> Node<M> {
    fn new(register: impl FnOnce(&M, &mut Registry)) -> Self {
        let metrics = M::default();
        let mut registry = Registry::with_prefix("grpo");
        register(&metrics, &mut registry);
        Self { metrics, registry }
    }
}

static LEARNER: OnceLock<Node<LearnerMetrics>> = OnceLock::new();
static SIDECAR: OnceLock<Node<SidecarMetrics>> = OnceLock::new();

fn learner_node() -> &'static Node<LearnerMetrics> {
    LEARNER.get_or_init(|| Node::new(LearnerMetrics::register))
}

fn sidecar_node() -> &'static Node<SidecarMetrics> {
    SIDECAR.get_or_init(|| Node::new(SidecarMetrics::register))
}

/// This process's learner metrics.
pub fn learner() -> &'static LearnerMetrics {
    &learner_node().metrics
}

/// This process's sidecar metrics.
pub fn sidecar() -> &'static SidecarMetrics {
    &sidecar_node().metrics
}

/// Which registry an endpoint exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Learner,
    Sidecar,
}

/// The OpenMetrics text of a role's registry.
pub fn render(role: Role) -> String {
    let registry = match role {
        Role::Learner => &learner_node().registry,
        Role::Sidecar => &sidecar_node().registry,
    };
    let mut body = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut body, registry);
    body
}

/// Who may scrape: anyone, or only callers presenting the token.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub token: Option<String>,
}

/// The `/metrics` response: 401 without the required token, else the exposition.
pub fn respond(role: Role, access: &Access, headers: &HeaderMap) -> Response {
    if let Some(denied) = unauthorized(access.token.as_deref(), headers) {
        return denied;
    }
    ([(CONTENT_TYPE, CONTENT)], render(role)).into_response()
}

/// A 401 when `token` is required and the request does not present it as a bearer token.
pub fn unauthorized(token: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    let token = token?;
    let presented = headers.get("authorization").map(|v| v.as_bytes());
    (!crate::secret::bearer_matches(presented, token))
        .then(|| (StatusCode::UNAUTHORIZED, "missing or wrong token").into_response())
}

async fn learner_metrics(State(access): State<Arc<Access>>, headers: HeaderMap) -> Response {
    respond(Role::Learner, &access, &headers)
}

/// Serves the learner's `/metrics` on `addr` in a task; returns the bound address.
/// `more` adds the caller's routes (the learner's `/endpoints`).
pub async fn serve_learner(
    addr: SocketAddr,
    access: Access,
    more: Router,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(learner_metrics))
        .with_state(Arc::new(access))
        .merge(more);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_the_standard_names() {
        learner().steps.inc();
        learner().sync_bytes.inc_by(10);
        learner()
            .rejected_groups
            .get_or_create(&Reason {
                reason: "too_long".into(),
            })
            .inc();
        let text = render(Role::Learner);
        assert!(text.contains("grpo_steps_total "), "{text}");
        assert!(text.contains("grpo_sync_bytes_total "), "{text}");
        assert!(
            text.contains("grpo_rejected_groups_total{reason=\"too_long\"}"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
