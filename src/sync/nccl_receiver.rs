//! The sidecar's half of NCCL weight sync, owned by the WeightReceiver: joins the learner's
//! communicator in the background, receives a version on a blocking thread under a deadline,
//! and hands the received tensors and their digest to the commit. A failed or timed-out
//! transfer drops (aborts) the communicator; the learner makes a new one for its next try.
//! Builds without the `cuda` feature answer every call with an error, and the learner falls
//! back to the gRPC stream.

/// What a finished receive produced: the tensors in plan order and their GPU digest.
pub type Received = (Vec<(String, tch::Tensor)>, String);

/// Why an NCCL join, receive or commit failed.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("this sidecar was built without the `cuda` feature (no NCCL); use the gRPC stream")]
    NotBuilt,
    #[error("the engine is not on a CUDA device; use the gRPC stream")]
    NotCuda,
    #[error("NCCL is not loadable here; use the gRPC stream")]
    NotLoadable,
    #[error("the NCCL join did not finish")]
    JoinTimeout,
    #[error("the NCCL join was abandoned")]
    JoinAbandoned,
    #[error("no NCCL communicator (JoinNccl first)")]
    NoCommunicator,
    #[error("the communicator went away")]
    CommunicatorGone,
    #[error("no NCCL update in progress")]
    NotStarted,
    #[error("commit of version {got} during the update to {staged}")]
    OtherVersion { got: u64, staged: u64 },
    #[error("the receive did not finish in {0:.1}s")]
    Timeout(f64),
    #[error("the receive was abandoned")]
    Abandoned,
    #[error("GPU digest mismatch: received {got}, learner sent {sent}")]
    Digest { got: String, sent: String },
    #[error(transparent)]
    Plan(#[from] crate::sync::plan::PlanError),
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tch::Device;
    use tokio::sync::oneshot;

    use super::{NcclError, Received};
    use crate::comm::nccl::{deadline_for, Communicator, UniqueId};
    use crate::engine::PolicyVersion;
    use crate::lock::recover;
    use crate::rpc::pb;
    use crate::sync::nccl_sync::plan_layout;

    type Slot = Arc<Mutex<Option<Communicator>>>;

    /// A receive in flight: its version, deadline, and where its result arrives.
    struct Pending {
        version: PolicyVersion,
        deadline: Duration,
        result: oneshot::Receiver<Result<Received, NcclError>>,
    }

    /// NCCL state of one sidecar.
    pub struct NcclReceiver {
        device: Device,
        comm: Slot,
        /// A join in progress: its result arrives here.
        joining: Option<oneshot::Receiver<Result<(), NcclError>>>,
        pending: Option<Pending>,
    }

    impl NcclReceiver {
        pub fn new(device: Device) -> Self {
            Self {
                device,
                comm: Arc::new(Mutex::new(None)),
                joining: None,
                pending: None,
            }
        }

        /// Starts joining the learner's communicator; returns at once.
        pub fn join(&mut self, id_hex: &str, rank: i32, world: i32) -> Result<(), NcclError> {
            let Device::Cuda(gpu) = self.device else {
                return Err(NcclError::NotCuda);
            };
            if !crate::comm::nccl::available() {
                return Err(NcclError::NotLoadable);
            }
            let id = UniqueId::from_hex(id_hex).map_err(NcclError::from)?;
            let slot = self.comm.clone();
            // A new communicator replaces the old one (aborted on drop).
            *recover(&slot) = None;
            let (tx, rx) = oneshot::channel();
            self.joining = Some(rx);
            tokio::task::spawn_blocking(move || {
                let _call = crate::runtime::DriverCall::enter();
                let outcome = Communicator::join(&id, rank, world, gpu, Duration::from_secs(120))
                    .map(|c| {
                        *recover(&slot) = Some(c);
                    })
                    .map_err(NcclError::from);
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, "joining the learner's NCCL communicator failed");
                } else {
                    tracing::info!(rank, world, gpu, "joined the learner's NCCL communicator");
                }
                let _ = tx.send(outcome);
            });
            Ok(())
        }

        /// Starts receiving `version` as `plan` describes; returns once the receive is queued.
        pub async fn begin(&mut self, version: PolicyVersion, plan: pb::BucketPlan) -> Result<(), NcclError> {
            plan_layout(&plan)?;
            if let Some(joining) = self.joining.take() {
                tokio::time::timeout(Duration::from_secs(120), joining)
                    .await
                    .map_err(|_| NcclError::JoinTimeout)?
                    .map_err(|_| NcclError::JoinAbandoned)??;
            }
            let slot = self.comm.clone();
            if recover(&slot).is_none() {
                return Err(NcclError::NoCommunicator);
            }
            let deadline = deadline_for(plan.total_bytes, Duration::from_secs(10));
            let device = self.device;
            let (tx, rx) = oneshot::channel();
            tokio::task::spawn_blocking(move || {
                let _call = crate::runtime::DriverCall::enter();
                let mut guard = recover(&slot);
                let result = match guard.as_mut() {
                    Some(comm) => {
                        let r = crate::sync::nccl_sync::receive(comm, &plan, device, deadline);
                        if r.is_err() {
                            // Aborted or broken: the learner will make a new one.
                            *guard = None;
                        }
                        r.map_err(NcclError::from)
                    }
                    None => Err(NcclError::CommunicatorGone),
                };
                drop(guard);
                let _ = tx.send(result);
            });
            self.pending = Some(Pending {
                version,
                deadline,
                result: rx,
            });
            Ok(())
        }

        /// Waits for the receive of `version` and checks the learner's digest.
        pub async fn finish(&mut self, version: PolicyVersion, digest: &str) -> Result<Received, NcclError> {
            let Pending {
                version: v,
                deadline,
                result: rx,
            } = self.pending.take().ok_or(NcclError::NotStarted)?;
            if v != version {
                return Err(NcclError::OtherVersion {
                    got: version.0,
                    staged: v.0,
                });
            }
            let started = Instant::now();
            let (tensors, got) = tokio::time::timeout(deadline + Duration::from_secs(5), rx)
                .await
                .map_err(|_| NcclError::Timeout(started.elapsed().as_secs_f64()))?
                .map_err(|_| NcclError::Abandoned)??;
            if got != digest {
                return Err(NcclError::Digest {
                    got,
                    sent: digest.to_owned(),
                });
            }
            Ok((tensors, got))
        }

        /// Whether an update is staged.
        pub fn busy(&self) -> bool {
            self.pending.is_some()
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use tch::Device;

    use super::{NcclError, Received};
    use crate::engine::PolicyVersion;
    use crate::rpc::pb;

    /// Without CUDA there is no NCCL: every call says so.
    pub struct NcclReceiver;

    impl NcclReceiver {
        pub fn new(_device: Device) -> Self {
            Self
        }

        pub fn join(&mut self, _id_hex: &str, _rank: i32, _world: i32) -> Result<(), NcclError> {
            Err(NcclError::NotBuilt)
        }

        pub async fn begin(&mut self, _version: PolicyVersion, _plan: pb::BucketPlan) -> Result<(), NcclError> {
            Err(NcclError::NotBuilt)
        }

        pub async fn finish(&mut self, _version: PolicyVersion, _digest: &str) -> Result<Received, NcclError> {
            Err(NcclError::NotBuilt)
        }

        pub fn busy(&self) -> bool {
            false
        }
    }
}

pub use imp::NcclReceiver;
