//! `grpo.v1.Learner/Status`: a read-only view of the run for operators and other nodes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use crate::actors::learner::LearnerStatus;

use super::pb::learner_server::{Learner, LearnerServer};
use super::pb::{PolicyVersion, StatusRequest, StatusResponse, StepMetrics};

/// Serves the status of one learner.
pub struct StatusService {
    pub status: Arc<Mutex<LearnerStatus>>,
    pub training_steps: u64,
}

#[tonic::async_trait]
impl Learner for StatusService {
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
}

/// Binds `addr` (port 0 picks a free port) and serves until the task is dropped; returns the
/// bound address.
pub async fn serve(
    addr: SocketAddr,
    service: StatusService,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let incoming = tokio_stream_of(listener);
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(LearnerServer::new(service))
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "status server stopped");
        }
    });
    Ok((bound, task))
}

fn tokio_stream_of(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}
