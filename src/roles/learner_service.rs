//! `grpo.v1.Learner`: the run's status for operators, and registration of sidecars that dial
//! in (`grpo-node --role inference-sidecar --learner-url ...`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ractor::ActorRef;
use tonic::{Request, Response, Status};

use crate::actors::learner::LearnerStatus;
use crate::actors::weight_broadcaster::BroadcasterMsg;
use crate::rpc::auth::{CheckToken, Token};

use crate::rpc::pb::learner_server::{Learner, LearnerServer};
use crate::rpc::pb::{
    PolicyVersion, RegisterSidecarRequest, RegisterSidecarResponse, StatusRequest, StatusResponse, StepMetrics,
};

/// Serves one learner.
pub struct LearnerService {
    pub status: Arc<Mutex<LearnerStatus>>,
    pub training_steps: u64,
    /// Absent when the run has no weight sync.
    pub broadcaster: Option<ActorRef<BroadcasterMsg>>,
}

#[tonic::async_trait]
impl Learner for LearnerService {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = self
            .status
            .lock()
            .map_err(|_| Status::internal("status lock poisoned"))?
            .clone();
        Ok(Response::new(StatusResponse {
            version: Some(PolicyVersion { step: s.step }),
            training_steps: self.training_steps,
            rejected_groups: s.rejected_groups,
            last_step: s.last.map(|r| StepMetrics {
                step: r.train.step,
                loss: r.train.loss,
                grad_norm: r.train.grad_norm,
                lr: r.train.lr,
                tokens: r.train.tokens,
                sequences: r.train.sequences,
                rejected_groups: r.rejected_groups,
            }),
        }))
    }

    async fn register_sidecar(
        &self,
        req: Request<RegisterSidecarRequest>,
    ) -> Result<Response<RegisterSidecarResponse>, Status> {
        let addr = req.into_inner().address;
        if !(addr.starts_with("http://") || addr.starts_with("https://")) {
            return Err(Status::invalid_argument(format!(
                "address {addr:?} must be an http:// URL"
            )));
        }
        let Some(b) = &self.broadcaster else {
            return Err(Status::failed_precondition("this learner runs without weight sync"));
        };
        let version = ractor::call!(b, |r| BroadcasterMsg::AddSidecar(addr, Some(r)))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RegisterSidecarResponse {
            version: Some(PolicyVersion { step: version }),
        }))
    }
}

/// Binds `addr` (port 0 picks a free port) and serves; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    service: LearnerService,
    token: Token,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let svc = tonic::service::interceptor::InterceptedService::new(LearnerServer::new(service), CheckToken(token));
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "learner gRPC server stopped");
        }
    });
    Ok((bound, task))
}
