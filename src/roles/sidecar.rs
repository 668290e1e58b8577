//! `grpo-node --role inference-sidecar`: serves `/generate` from its engine (embedded, or a
//! vLLM server that its VllmSupervisor runs) and receives weight updates from the learner over
//! gRPC (WeightReceiver).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, watch, Mutex};

use crate::actors::vllm_supervisor::{VllmArgs, VllmLaunch, VllmMsg, VllmSupervisor};
use crate::config::sidecar::VllmConfig;
use crate::config::SidecarConfig;
use crate::engine::inference::SharedEngine;
use crate::engine::vllm::{DriverConfig, VllmEngine, VllmShared, VllmState, WeightTransfer};
use crate::engine::vllm_transfer;
use crate::engine::{http, load, BatchConfig, EngineHandle};
use crate::rpc::auth::{AddToken, Token};
use crate::rpc::pb::learner_client::LearnerClient;
use crate::rpc::pb::RegisterSidecarRequest;
use crate::sync::receiver::{ReceiverArgs, WeightReceiver};
use crate::sync::service::{self, SidecarService};

/// Why a sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("loading the model: {0}")]
    Load(String),
    #[error("--device: {0}")]
    Device(#[from] crate::config::device::DeviceError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the weight receiver: {0}")]
    Actor(String),
    #[error("vLLM: {0}")]
    Vllm(String),
}

/// The running vLLM side: its supervisor and where it posts its state.
struct Supervised {
    actor: ActorRef<VllmMsg>,
    handle: tokio::task::JoinHandle<()>,
    state: watch::Receiver<VllmState>,
    weights_dir: std::path::PathBuf,
}

/// Deadline of each vLLM update route (pause, reload, resume), for updates and resyncs alike.
const VLLM_UPDATE_DEADLINE: Duration = Duration::from_secs(60);

fn free_loopback_port() -> Result<u16, SidecarError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| SidecarError::Io {
            context: "picking a port for vLLM".into(),
            source,
        })
}

/// Starts the VllmSupervisor, waits until vLLM is ready (or given up on), and returns the
/// driver over it.
async fn start_vllm(cfg: &SidecarConfig, v: &VllmConfig) -> Result<(SharedEngine, Supervised), SidecarError> {
    let tokenizer = Arc::new(load::tokenizer(&cfg.model_name).map_err(|e| SidecarError::Load(e.to_string()))?);
    let port = if v.port == 0 { free_loopback_port()? } else { v.port };
    let served_name = "policy".to_string();
    let backend = match v.weight_transfer {
        WeightTransfer::Reload => None,
        WeightTransfer::Ipc => Some(vllm_transfer::BACKEND),
        WeightTransfer::Nccl => Some(vllm_transfer::NCCL_BACKEND),
        WeightTransfer::Shared => Some(vllm_transfer::SHARED_EXTENSION),
    };
    let weight_transfer = match backend {
        Some(backend) => {
            let dir = v.weights_dir.join("vllm-plugin");
            let plugin = vllm_transfer::install_plugin(&dir).map_err(|source| SidecarError::Io {
                context: format!("writing the vLLM plugin under {}", dir.display()),
                source,
            })?;
            Some((plugin, backend))
        }
        None => None,
    };
    let launch = VllmLaunch {
        command: v.command.clone(),
        extra_args: v.extra_args.clone(),
        model_dir: cfg.model_name.clone(),
        served_name: served_name.clone(),
        port,
        log: v.log.clone(),
        ready_timeout: Duration::from_secs(v.ready_timeout_s),
        probe_interval: Duration::from_secs(v.probe_interval_s),
        probe_timeout: Duration::from_secs(v.probe_timeout_s),
        max_restarts: v.max_restarts,
        allow_untested: v.allow_untested,
        update_deadline: VLLM_UPDATE_DEADLINE,
        weight_transfer,
        lora: v.lora,
    };
    let shared = Arc::new(VllmShared {
        current: Arc::new(Mutex::new(None)),
        gate: tokio::sync::RwLock::new(()),
    });
    let (state_tx, mut state) = watch::channel(VllmState::Starting { launch: 0 });
    let (orders_tx, orders) = mpsc::channel(4);
    let args = VllmArgs {
        launch,
        state: state_tx,
        orders,
        shared: shared.clone(),
    };
    let (actor, handle) = Actor::spawn(Some("vllm_supervisor".into()), VllmSupervisor, args)
        .await
        .map_err(|e| SidecarError::Actor(e.to_string()))?;
    let supervised = Supervised {
        actor,
        handle,
        state: state.clone(),
        weights_dir: v.weights_dir.clone(),
    };
    let outcome = state
        .wait_for(|s| !matches!(s, VllmState::Starting { .. }))
        .await
        .map(|s| s.clone());
    let failure = match outcome {
        Ok(VllmState::Failed { reason }) => Some(reason),
        Ok(_) => None,
        Err(_) => Some("the vLLM supervisor stopped".to_string()),
    };
    if let Some(reason) = failure {
        supervised.stop().await;
        return Err(SidecarError::Vllm(reason));
    }
    let driver = DriverConfig {
        served_name,
        model_dir: cfg.model_name.clone(),
        weights_dir: v.weights_dir.clone(),
        ready_wait: Duration::from_secs(v.ready_timeout_s),
        update_deadline: VLLM_UPDATE_DEADLINE,
        generate_deadline: Duration::from_secs(600),
        canary_tokens: v.canary_tokens,
        pause_mode: v.pause_mode,
        transfer: v.weight_transfer,
        lora_rank: v.lora.map(|(rank, _)| rank),
    };
    let engine =
        VllmEngine::new(driver, tokenizer, state, orders_tx, shared).map_err(|e| SidecarError::Vllm(e.to_string()));
    match engine {
        Ok(e) => Ok((Arc::new(e), supervised)),
        Err(e) => {
            supervised.stop().await;
            Err(e)
        }
    }
}

impl Supervised {
    async fn stop(self) {
        self.actor.stop(None);
        let _ = self.handle.await;
        let _ = std::fs::remove_dir_all(&self.weights_dir);
    }
}

async fn start_embedded(cfg: &SidecarConfig) -> Result<SharedEngine, SidecarError> {
    let device = cfg.device.to_tch()?;
    let model_dir = cfg.model_name.clone();
    let batch = BatchConfig {
        max_rows: cfg.max_batch_rows,
        window: Duration::from_millis(5),
    };
    // Loading and building the model is blocking work.
    let engine = tokio::task::spawn_blocking(move || {
        let model = load::load(&model_dir, device).map_err(|e| SidecarError::Load(e.to_string()))?;
        EngineHandle::start(model, batch).map_err(|e| SidecarError::Load(e.to_string()))
    })
    .await
    .map_err(|e| SidecarError::Load(e.to_string()))??;
    Ok(Arc::new(engine))
}

/// Resolves when vLLM has been given up on (never, without vLLM).
async fn vllm_failed(state: Option<watch::Receiver<VllmState>>) -> String {
    match state {
        Some(mut s) => match s.wait_for(|s| matches!(s, VllmState::Failed { .. })).await {
            Ok(v) => match &*v {
                VllmState::Failed { reason } => reason.clone(),
                _ => String::new(),
            },
            Err(_) => "the vLLM supervisor stopped".into(),
        },
        None => std::future::pending().await,
    }
}

/// Registers with the learner, retrying until it answers, then again every 10 s (so a
/// restarted learner learns about us); runs until aborted.
async fn keep_registered(learner: String, advertise: String, token: Token, tls: crate::rpc::tls::Tls) {
    let mut delay = Duration::from_millis(200);
    let mut registered = false;
    let mut warned = false;
    loop {
        let attempt = async {
            let channel = tls
                .endpoint(&learner)?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await?;
            let mut client = LearnerClient::with_interceptor(channel, AddToken(token.clone()));
            let mut req = tonic::Request::new(RegisterSidecarRequest {
                address: advertise.clone(),
            });
            req.set_timeout(Duration::from_secs(5));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(client.register_sidecar(req).await?.into_inner())
        };
        match attempt.await {
            Ok(r) => {
                if !registered {
                    tracing::info!(learner = %learner, version = r.version.map_or(0, |v| v.step), "registered with the learner");
                }
                registered = true;
                delay = Duration::from_secs(10);
            }
            Err(e) => {
                if registered || !warned {
                    tracing::warn!(learner = %learner, error = %e, "registration with the learner failed; retrying");
                    warned = true;
                }
                registered = false;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        tokio::time::sleep(delay).await;
    }
}

/// Runs the sidecar until `shutdown` resolves.
pub async fn run(cfg: SidecarConfig, shutdown: impl Future<Output = ()>) -> Result<(), SidecarError> {
    let (engine, supervised) = match &cfg.vllm {
        Some(v) => {
            let (engine, s) = start_vllm(&cfg, v).await?;
            (engine, Some(s))
        }
        None => (start_embedded(&cfg).await?, None),
    };
    let (http_addr, http_task) = http::serve(cfg.http_listen, engine.clone(), cfg.http.clone())
        .await
        .map_err(|source| SidecarError::Io {
            context: format!("binding --listen {}", cfg.http_listen),
            source,
        })?;
    let (receiver_args, health) = ReceiverArgs::new(engine.clone());
    let (receiver, receiver_handle) = Actor::spawn(Some("weight_receiver".into()), WeightReceiver, receiver_args)
        .await
        .map_err(|e| SidecarError::Actor(e.to_string()))?;
    let token = Token(cfg.auth_token.clone());
    let kind = engine.kind();
    let svc = SidecarService {
        receiver: receiver.clone(),
        health,
        engine,
        // Only a caller that passed the token learns where the model lives.
        model_dir: cfg.auth_token.is_some().then(|| cfg.model_name.clone()),
        http_address: format!("http://{http_addr}"),
        checkpoint_root: cfg.checkpoint_root.clone(),
    };
    let (grpc_addr, grpc_task) = service::serve(cfg.grpc_listen, svc, token.clone(), &cfg.tls)
        .await
        .map_err(|source| SidecarError::Io {
            context: format!("binding --grpc-listen {}", cfg.grpc_listen),
            source,
        })?;
    tracing::info!(http = %http_addr, grpc = %grpc_addr, engine = kind, model = %cfg.model_name.display(), "sidecar ready");
    let registration = cfg.learner_url.clone().map(|learner| {
        let advertise = cfg.advertise_url.clone().unwrap_or_else(|| {
            let scheme = if cfg.tls.identity.is_some() { "https" } else { "http" };
            format!("{scheme}://{grpc_addr}")
        });
        tokio::spawn(keep_registered(learner, advertise, token, cfg.tls.clone()))
    });
    let failed = tokio::select! {
        () = shutdown => None,
        reason = vllm_failed(supervised.as_ref().map(|s| s.state.clone())) => Some(reason),
    };
    tracing::info!("shutting down");
    if let Some(task) = registration {
        task.abort();
    }
    http_task.abort();
    grpc_task.abort();
    receiver.stop(None);
    let _ = receiver_handle.await;
    if let Some(s) = supervised {
        s.stop().await;
    }
    match failed {
        Some(reason) => Err(SidecarError::Vllm(reason)),
        None => Ok(()),
    }
}
