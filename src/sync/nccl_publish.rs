//! The learner's half of NCCL weight sync for one sidecar: make a communicator (the learner is
//! rank 0 and creates the unique id; the sidecar gets it over gRPC and joins), announce the
//! plan, broadcast the packed weights bucket by bucket from the GPU, and commit with the GPU
//! digest. Any
//! failure or missed deadline drops the communicator (aborting it); the next full sync makes a
//! new one. A sidecar without NCCL answers JoinNccl with `Unimplemented`, and a pair NCCL
//! refuses to connect (both ranks on one GPU) fails its join with an NCCL error: such a sidecar
//! is then served over the gRPC stream.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::CudaEvent;
use tch::{Device, Kind, Tensor};

use crate::comm::nccl::{deadline_for, device_context, mark_torch_stream, new_unique_id, Communicator};
use crate::comm::CommError;
use crate::engine::PolicyVersion;
use crate::rpc::pb;

use super::client::{Published, SidecarClient, SyncError};
use super::nccl_sync::{device_plan, send};
use super::packing::{pack, PackLayout};
use super::plan::WeightSet;

/// The flat buffer and its per-bucket ready events.
struct Packed {
    flat: Tensor,
    ready: Vec<CudaEvent>,
}

/// One version's weights packed on the learner's GPU for NCCL (see
/// [`super::nccl_sync`]), with a CPU packing made on demand for sidecars served over the gRPC
/// stream.
pub struct PackedWeights {
    names: Vec<(String, Vec<i64>)>,
    layout: PackLayout,
    wire: Kind,
    packed: Mutex<Packed>,
    cpu: OnceLock<Arc<WeightSet>>,
    /// The learner's CUDA device index.
    pub gpu: usize,
}

impl PackedWeights {
    /// Packs `tensors` (on CUDA device `gpu`) into buckets of about `bucket_bytes`, in their
    /// own dtype when it is bf16 or fp32 (bf16 otherwise). Call it on the thread whose CUDA
    /// work changes the tensors (the model thread): the packing copies are queued on tch's
    /// stream before any later update, so they see this version whatever runs next.
    pub fn pack(tensors: &[(String, Tensor)], gpu: usize, bucket_bytes: u64) -> Result<Self, CommError> {
        let wire = match tensors.first().map(|(_, t)| t.kind()) {
            Some(Kind::Float) => Kind::Float,
            _ => Kind::BFloat16,
        };
        let numels: Vec<i64> = tensors.iter().map(|(_, t)| t.numel() as i64).collect();
        let layout = PackLayout::new(&numels, wire.elt_size_in_bytes() as u64, bucket_bytes);
        let ctx = device_context(gpu)?;
        let values: Vec<Tensor> = tensors.iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut ready = Vec::with_capacity(layout.bucket_count());
        let mut failed = None;
        let flat = pack(&values, &layout, wire, Device::Cuda(gpu), |_| {
            match mark_torch_stream(&ctx) {
                Ok(ev) => ready.push(ev),
                Err(e) => failed = Some(e),
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(Self {
            names: tensors.iter().map(|(n, t)| (n.clone(), t.size())).collect(),
            layout,
            wire,
            packed: Mutex::new(Packed { flat, ready }),
            cpu: OnceLock::new(),
            gpu,
        })
    }

    /// The plan announcing these weights.
    pub fn plan(&self) -> pb::BucketPlan {
        device_plan(&self.names, self.wire, &self.layout)
    }

    /// The gRPC stream's packing of the same weights (fp32 on the CPU).
    pub fn cpu_set(&self) -> Arc<WeightSet> {
        self.cpu
            .get_or_init(|| {
                let tensors = self.packed.lock().map(|p| {
                    let shapes: Vec<Vec<i64>> = self.names.iter().map(|(_, s)| s.clone()).collect();
                    let views = self.layout.tensor_views(&p.flat, &shapes);
                    let named: Vec<(String, Tensor)> = self
                        .names
                        .iter()
                        .zip(views)
                        .map(|((n, _), v)| (n.clone(), v.to_device(Device::Cpu).to_kind(Kind::Float)))
                        .collect();
                    WeightSet::pack(&named)
                });
                Arc::new(tensors.unwrap_or_else(|_| WeightSet::pack(&[])))
            })
            .clone()
    }

    /// Broadcasts the buckets over `comm` (as rank 0); returns their digest.
    pub fn broadcast(&self, comm: &mut Communicator, deadline: Duration) -> Result<String, CommError> {
        let p = self.packed.lock().map_err(|_| CommError::Nccl {
            call: "send",
            message: "packed weights lock poisoned".into(),
        })?;
        send(comm, &self.layout.bucket_views(&p.flat), &p.ready, deadline)
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
    weights: Arc<PackedWeights>,
    version: PolicyVersion,
) -> (Result<Published, NcclPublishError>, Option<Communicator>) {
    let started = Instant::now();
    let comm = match comm {
        Some(c) => c,
        None => match connect(client, weights.gpu).await {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        },
    };
    let plan = weights.plan();
    let bytes = plan.total_bytes;
    if let Err(e) = client.begin_nccl(version, plan).await {
        return (Err(e.into()), None);
    }
    let deadline = deadline_for(bytes, Duration::from_secs(10));
    let w = weights.clone();
    let sent = tokio::task::spawn_blocking(move || {
        let mut comm = comm;
        let result = w.broadcast(&mut comm, deadline);
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
