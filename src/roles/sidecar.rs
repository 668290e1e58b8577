//! `grpo-node --role inference-sidecar`: serves `/generate` from the embedded engine and
//! receives weight updates from the learner over gRPC (WeightReceiver).

use std::future::Future;
use std::time::Duration;

use ractor::Actor;

use crate::config::SidecarConfig;
use crate::engine::{http, load, BatchConfig, EngineHandle};
use crate::rpc::pb::learner_client::LearnerClient;
use crate::rpc::pb::RegisterSidecarRequest;
use crate::sync::auth::{AddToken, Token};
use crate::sync::receiver::{ReceiverArgs, WeightReceiver};
use crate::sync::service::{self, SidecarService};

/// Why a sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("loading the model: {0}")]
    Load(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the weight receiver: {0}")]
    Actor(String),
}

/// Registers with the learner, retrying until it answers, then again every 10 s (so a
/// restarted learner learns about us); runs until aborted.
async fn keep_registered(learner: String, advertise: String, token: Token) {
    let mut delay = Duration::from_millis(200);
    let mut registered = false;
    loop {
        let attempt = async {
            let channel = tonic::transport::Endpoint::from_shared(learner.clone())?
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
                if registered {
                    tracing::warn!(learner = %learner, error = %e, "learner unreachable; will register again");
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
    let device = cfg.device.to_tch().map_err(SidecarError::Load)?;
    let model_dir = cfg.model_name.clone();
    let model = tokio::task::spawn_blocking(move || load::load(&model_dir, device))
        .await
        .map_err(|e| SidecarError::Load(e.to_string()))?
        .map_err(|e| SidecarError::Load(e.to_string()))?;
    let params = model.params.numel();
    let engine = EngineHandle::start(
        model,
        BatchConfig {
            max_rows: cfg.max_batch_rows,
            window: Duration::from_millis(5),
        },
    )
    .map_err(|e| SidecarError::Load(e.to_string()))?;
    let (http_addr, http_task) =
        http::serve(cfg.http_listen, engine.clone())
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
    let svc = SidecarService {
        receiver: receiver.clone(),
        health,
        engine,
        model_dir: cfg.model_name.clone(),
        http_address: format!("http://{http_addr}"),
    };
    let (grpc_addr, grpc_task) = service::serve(cfg.grpc_listen, svc, token.clone())
        .await
        .map_err(|source| SidecarError::Io {
            context: format!("binding --grpc-listen {}", cfg.grpc_listen),
            source,
        })?;
    tracing::info!(http = %http_addr, grpc = %grpc_addr, params, model = %cfg.model_name.display(), "sidecar ready");
    let registration = cfg.learner_url.clone().map(|learner| {
        let advertise = cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{grpc_addr}"));
        tokio::spawn(keep_registered(learner, advertise, token))
    });
    shutdown.await;
    tracing::info!("shutting down");
    if let Some(task) = registration {
        task.abort();
    }
    http_task.abort();
    grpc_task.abort();
    receiver.stop(None);
    let _ = receiver_handle.await;
    Ok(())
}
