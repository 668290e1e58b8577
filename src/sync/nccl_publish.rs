//! The learner's half of NCCL weight sync for one sidecar: make a communicator (the learner is
//! rank 0 and creates the unique id; the sidecar gets it over gRPC and joins), announce the
//! plan, broadcast the weights in buckets from the GPU, and commit with the GPU digest. Any
//! failure or missed deadline drops the communicator (aborting it); the next full sync makes a
//! new one. A sidecar without NCCL answers JoinNccl with `Unimplemented`, and a pair NCCL
//! refuses to connect (both ranks on one GPU) fails its join with an NCCL error: such a sidecar
//! is then served over the gRPC stream.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::comm::nccl::{deadline_for, new_unique_id, Communicator};
use crate::comm::CommError;
use crate::engine::PolicyVersion;

use super::client::{Published, SidecarClient, SyncError};
use super::nccl_sync::{device_plan, send};
use super::plan::WeightSet;

/// One version's weights on the learner's GPU, with a CPU packing made on demand for sidecars
/// served over the gRPC stream.
pub struct DeviceWeights {
    tensors: Mutex<Vec<(String, Tensor)>>,
    cpu: OnceLock<Arc<WeightSet>>,
    /// The learner's CUDA device index.
    pub gpu: usize,
}

impl DeviceWeights {
    pub fn new(tensors: Vec<(String, Tensor)>, gpu: usize) -> Self {
        Self {
            tensors: Mutex::new(tensors),
            cpu: OnceLock::new(),
            gpu,
        }
    }

    /// The gRPC stream's packing of the same weights.
    pub fn cpu_set(&self) -> Arc<WeightSet> {
        self.cpu
            .get_or_init(|| {
                let tensors = self.tensors.lock().map(|t| WeightSet::pack(&t));
                Arc::new(tensors.unwrap_or_else(|_| WeightSet::pack(&[])))
            })
            .clone()
    }
}

/// Why an NCCL publish failed.
#[derive(Debug, thiserror::Error)]
pub enum NcclPublishError {
    #[error("the sidecar has no NCCL: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("{0}")]
    Comm(#[from] CommError),
    #[error("the NCCL thread stopped: {0}")]
    Thread(String),
}

/// Publishes `weights` as `version` over NCCL to one sidecar; returns the outcome and the
/// communicator to keep (none after a failure).
pub async fn publish(
    client: &SidecarClient,
    comm: Option<Communicator>,
    weights: Arc<DeviceWeights>,
    version: PolicyVersion,
    bucket_bytes: u64,
) -> (Result<Published, NcclPublishError>, Option<Communicator>) {
    let started = Instant::now();
    let comm = match comm {
        Some(c) => c,
        None => match connect(client, weights.gpu).await {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        },
    };
    let plan = match weights.tensors.lock() {
        Ok(t) => device_plan(&t, bucket_bytes),
        Err(_) => return (Err(NcclPublishError::Thread("weights lock poisoned".into())), None),
    };
    let bytes = plan.total_bytes;
    if let Err(e) = client.begin_nccl(version, plan).await {
        return (Err(e.into()), None);
    }
    let deadline = deadline_for(bytes, Duration::from_secs(10));
    let w = weights.clone();
    let sent = tokio::task::spawn_blocking(move || {
        let mut comm = comm;
        let result = match w.tensors.lock() {
            Ok(t) => {
                let ts: Vec<Tensor> = t.iter().map(|(_, x)| x.shallow_clone()).collect();
                send(&mut comm, &ts, bucket_bytes, deadline)
            }
            Err(_) => Err(CommError::Nccl {
                call: "send",
                message: "weights lock poisoned".into(),
            }),
        };
        (result, comm)
    })
    .await;
    let (digest, comm) = match sent {
        Ok((Ok(d), comm)) => (d, comm),
        Ok((Err(e), _)) => return (Err(e.into()), None),
        Err(e) => return (Err(NcclPublishError::Thread(e.to_string())), None),
    };
    if let Err(e) = client.commit_nccl(version, digest, deadline).await {
        return (Err(e.into()), None);
    }
    (
        Ok(Published {
            version,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        }),
        Some(comm),
    )
}

/// Creates a communicator with the sidecar: a new unique id, JoinNccl, and our own join.
async fn connect(client: &SidecarClient, gpu: usize) -> Result<Communicator, NcclPublishError> {
    let id = new_unique_id()?;
    match client.join_nccl(id.to_hex(), 1, 2).await {
        Ok(()) => {}
        Err(SyncError::Rpc { status, .. }) if status.code() == tonic::Code::Unimplemented => {
            return Err(NcclPublishError::Unsupported(status.message().to_string()));
        }
        Err(e) => return Err(e.into()),
    }
    let joined = tokio::task::spawn_blocking(move || Communicator::join(&id, 0, 2, gpu, Duration::from_secs(120)))
        .await
        .map_err(|e| NcclPublishError::Thread(e.to_string()))?;
    match joined {
        Ok(c) => Ok(c),
        // Both ends answered but NCCL refused (for example both ranks on one GPU): this pair
        // cannot use NCCL, so the sidecar gets the gRPC stream from now on.
        Err(CommError::Nccl { call, message }) => Err(NcclPublishError::Unsupported(format!(
            "NCCL could not connect ({call}: {message})"
        ))),
        Err(e) => Err(e.into()),
    }
}
