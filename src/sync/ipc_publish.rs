//! The learner's half of CUDA IPC into a vLLM sidecar on the learner's GPU: export the
//! version's packed (or lent) weights as one IPC handle with each tensor's offset, send it with
//! the learner's canary logprobs in one InstallIpc call, and keep the memory unchanged until
//! the reply (vLLM's workers copy straight out of it). A version whose lent weights changed
//! before vLLM finished reading them is refused as torn, so the sidecar gets a full resync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::comm::CommError;
use crate::engine::PolicyVersion;
use crate::rpc::pb;

use super::client::{Published, SidecarClient, SyncError};
use super::nccl_publish::PackedWeights;

/// How long the learner keeps a version's memory unchanged for vLLM to copy it: the sidecar
/// must be done (or have given up, restarting vLLM if it had begun) by then. Lent weights are
/// lent at least this long plus [`IPC_LEASE_MARGIN`].
pub const IPC_DEADLINE: Duration = Duration::from_secs(120);
/// What a lease of lent weights adds to [`IPC_DEADLINE`]: the learner's RPC gives up 5 s after
/// it, and only then gives the weights back.
pub const IPC_LEASE_MARGIN: Duration = Duration::from_secs(15);

/// Why an IPC publish failed.
#[derive(Debug, thiserror::Error)]
pub enum IpcPublishError {
    #[error("exporting the weights: {0}")]
    Export(#[from] CommError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("the export thread stopped: {0}")]
    Thread(String),
    #[error("the lent weights changed before vLLM finished copying them (version {0} is torn)")]
    Torn(u64),
}

/// The InstallIpc request for `weights` as `version`.
fn request(
    weights: &PackedWeights,
    version: PolicyVersion,
    until: Instant,
) -> Result<(pb::InstallIpcRequest, u64), CommError> {
    let export = weights.ipc_export(until)?;
    let bytes = export.tensors.iter().map(|t| t.bytes().unwrap_or(0)).sum::<u64>();
    let (canary_ids, canary_logprobs) = weights.canary().cloned().unwrap_or_default();
    let tensors = export
        .tensors
        .into_iter()
        .map(|t| pb::IpcTensor {
            name: t.name,
            dtype: t.dtype.wire().into(),
            shape: t.shape,
            offset_bytes: t.offset_bytes,
        })
        .collect();
    let req = pb::InstallIpcRequest {
        version: Some(pb::PolicyVersion { step: version.0 }),
        gpu_uuid: export.gpu_uuid,
        handle: export.handle,
        alloc_bytes: export.alloc_bytes,
        tensors,
        canary_ids,
        canary_logprobs,
        deadline_ms: IPC_DEADLINE.as_millis() as u64,
    };
    Ok((req, bytes))
}

/// Publishes `version` to `client` over CUDA IPC. The caller holds the lent weights (if they
/// are lent) until this returns.
pub async fn publish(
    client: &SidecarClient,
    weights: Arc<PackedWeights>,
    version: PolicyVersion,
) -> Result<Published, IpcPublishError> {
    let started = Instant::now();
    let until = started + Duration::from_secs(60);
    let w = weights.clone();
    let (req, bytes) = tokio::task::spawn_blocking(move || request(&w, version, until))
        .await
        .map_err(|e| IpcPublishError::Thread(e.to_string()))??;
    let exported = started.elapsed();
    let mut published = client.install_ipc(req, bytes).await?;
    if !weights.is_current() {
        return Err(IpcPublishError::Torn(version.0));
    }
    published.seconds = started.elapsed().as_secs_f64();
    published.phases.insert(0, ("export", exported.as_secs_f64()));
    Ok(published)
}
