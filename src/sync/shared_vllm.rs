//! Shared mode with a vLLM sidecar on the learner's GPU (`--weight-bridge-mode shared --sidecar
//! URL`, the sidecar with `--vllm-weight-transfer shared`): the learner's bf16 compute weights
//! are vLLM's own parameters. The sidecar exports them (`ExportShared`: vLLM's names, layout and
//! CUDA IPC handles); the learner locates each of its HF parameters in vLLM's fused tensors
//! ([`crate::engine::vllm_shared`]), maps the allocations and hands the views to the trainer as
//! a new home, with a fence that pauses vLLM through the sidecar before each optimizer write and
//! resumes it (with the canary) after. When vLLM dies, the next write's pause fails, the trainer
//! copies its weights back into its own memory and the fence is dropped; this loop then waits
//! for the restarted vLLM and offers its memory as the next home, into which the trainer writes
//! its current weights. Nothing is transferred at any step.

use crate::engine::inference::SharedParams;
use crate::engine::vllm_shared::{ExportedParam, SharedExport};
use crate::rpc::pb;

/// The sidecar's answer to `ExportShared`.
pub fn export_response(shared: SharedParams) -> pb::ExportSharedResponse {
    let params = shared
        .export
        .params
        .into_iter()
        .map(|p| pb::SharedParam {
            name: p.name,
            dtype: p.dtype,
            shape: p.shape,
            stride: p.stride,
            storage_offset: p.storage_offset,
            handle: p.handle.unwrap_or_default(),
            alloc_offset_bytes: p.alloc_offset_bytes,
            storage_bytes: p.storage_bytes,
        })
        .collect();
    pb::ExportSharedResponse {
        launch: shared.launch,
        gpu_uuid: shared.export.gpu_uuid,
        params,
    }
}

/// The export in an `ExportShared` answer (an empty handle: none, as off CUDA).
pub fn export_of(resp: &pb::ExportSharedResponse) -> SharedExport {
    SharedExport {
        gpu_uuid: resp.gpu_uuid.clone(),
        params: resp
            .params
            .iter()
            .map(|p| ExportedParam {
                name: p.name.clone(),
                dtype: p.dtype.clone(),
                shape: p.shape.clone(),
                stride: p.stride.clone(),
                storage_offset: p.storage_offset,
                handle: (!p.handle.is_empty()).then(|| p.handle.clone()),
                alloc_offset_bytes: p.alloc_offset_bytes,
                storage_bytes: p.storage_bytes,
            })
            .collect(),
    }
}

#[cfg(feature = "cuda")]
pub use link::{attach_loop, AttachError, SharedFence};

#[cfg(feature = "cuda")]
mod link {
    use std::collections::BTreeMap;
    use std::sync::mpsc::Sender;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tch::{Device, Kind, Tensor};
    use tokio::sync::Notify;

    use super::export_of;
    use crate::comm::ipc_map::{device_uuid, Mapping};
    use crate::comm::CommError;
    use crate::engine::vllm::{canary_ids, model_logprobs};
    use crate::engine::vllm_shared::{locate, Placement};
    use crate::engine::PolicyVersion;
    use crate::model::{ModelSpec, Transformer};
    use crate::sync::client::SidecarClient;
    use crate::train::{FenceError, Home, SharedWrite, WriteFence};

    /// vLLM resumes by itself this long after a pause the learner never ended.
    const HOLD: Duration = Duration::from_secs(60);
    /// Tokens of the canary checked after every write.
    const CANARY_TOKENS: usize = 16;
    /// How long one export waits for vLLM (it may be starting).
    const EXPORT_WAIT: Duration = Duration::from_secs(900);

    /// The fence of one mapped vLLM launch; dropping it closes the mappings and wakes the
    /// attach loop.
    pub struct SharedFence {
        client: SidecarClient,
        rt: tokio::runtime::Handle,
        launch: u64,
        canary: Vec<i64>,
        device: Device,
        released: Arc<Notify>,
        _maps: Vec<Mapping>,
    }

    impl WriteFence for SharedFence {
        fn before_write(&mut self) -> Result<f64, FenceError> {
            self.rt
                .block_on(self.client.pause_shared(self.launch, HOLD))
                .map_err(|e| FenceError(e.to_string()))
        }

        fn after_write(&mut self, version: u64, model: &Transformer, paused_s: f64) -> Result<SharedWrite, FenceError> {
            let t0 = Instant::now();
            let canary = match model_logprobs(model, &self.canary, self.device) {
                Ok(lps) => Some((self.canary.clone(), lps)),
                Err(e) => {
                    tracing::warn!(error = %e, "the learner's canary logprobs failed; this version goes without");
                    None
                }
            };
            let resume = self.client.resume_shared(self.launch, PolicyVersion(version), canary);
            let canary_max_abs_diff = self.rt.block_on(resume).map_err(|e| FenceError(e.to_string()))?;
            Ok(SharedWrite {
                version,
                seconds: paused_s + t0.elapsed().as_secs_f64(),
                canary_max_abs_diff,
            })
        }
    }

    impl Drop for SharedFence {
        fn drop(&mut self) {
            tracing::info!(launch = self.launch, "the learner let go of vLLM's memory");
            self.released.notify_one();
        }
    }

    /// Why a launch of vLLM could not be mapped.
    #[derive(Debug, thiserror::Error)]
    pub enum AttachError {
        #[error(transparent)]
        Sync(#[from] crate::sync::client::SyncError),
        #[error(transparent)]
        Layout(#[from] crate::engine::vllm_shared::SharedLayoutError),
        #[error(transparent)]
        Cuda(#[from] CommError),
        #[error("vLLM runs on GPU {theirs}, the learner on GPU {ours} (shared mode needs one GPU)")]
        OtherGpu { theirs: String, ours: String },
        #[error("vLLM holds {name} in {dtype}; shared mode needs vLLM's --dtype bfloat16")]
        Dtype { name: String, dtype: String },
    }

    impl AttachError {
        /// Whether waiting cannot help: vLLM runs, and what it serves cannot be shared.
        fn permanent(&self) -> bool {
            match self {
                Self::Sync(crate::sync::client::SyncError::Rpc { status, .. }) => {
                    status.code() == tonic::Code::FailedPrecondition
                }
                Self::Sync(_) | Self::Cuda(_) => false,
                Self::Layout(_) | Self::OtherGpu { .. } | Self::Dtype { .. } => true,
            }
        }
    }

    /// Our parameters as bf16 tensors over the mapped allocations.
    fn views(placement: &Placement, maps: &[Mapping], gpu: usize) -> Result<BTreeMap<String, Tensor>, AttachError> {
        placement
            .params
            .iter()
            .map(|p| {
                if p.dtype != "bfloat16" {
                    return Err(AttachError::Dtype {
                        name: p.hf_name.clone(),
                        dtype: p.dtype.clone(),
                    });
                }
                let ptr = (maps[p.allocation].base() + p.offset_bytes) as *const u8;
                // SAFETY: `locate` checked that the tensor's rows lie inside its bf16 storage in
                // this allocation; the mapping outlives the tensor (the fence that owns it is
                // dropped only after the trainer let go of the views).
                let t = unsafe { Tensor::f_from_blob(ptr, &p.shape, &[], Kind::BFloat16, Device::Cuda(gpu)) }
                    .map_err(|e| AttachError::Cuda(CommError::Cuda(e.to_string())))?;
                Ok((p.hf_name.clone(), t))
            })
            .collect()
    }

    /// Maps the launch vLLM exports and builds its home.
    async fn attach(
        client: &SidecarClient,
        spec: &ModelSpec,
        gpu: usize,
        released: &Arc<Notify>,
    ) -> Result<Home, AttachError> {
        let resp = client.export_shared(EXPORT_WAIT).await?;
        let export = export_of(&resp);
        let ours = device_uuid(gpu)?;
        if export.gpu_uuid != ours {
            return Err(AttachError::OtherGpu {
                theirs: export.gpu_uuid,
                ours,
            });
        }
        let placement = locate(spec, &export)?;
        let maps = placement
            .allocations
            .iter()
            .map(|h| Mapping::open(gpu, h))
            .collect::<Result<Vec<_>, _>>()?;
        let views = views(&placement, &maps, gpu)?;
        tracing::info!(
            launch = resp.launch,
            tensors = views.len(),
            allocations = maps.len(),
            "mapped vLLM's parameters"
        );
        let fence = SharedFence {
            client: client.clone(),
            rt: tokio::runtime::Handle::current(),
            launch: resp.launch,
            canary: canary_ids(spec.vocab_size, CANARY_TOKENS),
            device: Device::Cuda(gpu),
            released: released.clone(),
            _maps: maps,
        };
        Ok(Home {
            views,
            fence: Box::new(fence),
        })
    }

    /// Offers the trainer vLLM's memory, and again after each time the trainer lets go of it
    /// (vLLM died); runs until the trainer is gone (Ok), or until vLLM serves something that
    /// cannot be shared (the error: the run must not train on while vLLM serves other weights).
    pub async fn attach_loop(
        client: SidecarClient,
        spec: ModelSpec,
        gpu: usize,
        homes: Sender<Home>,
    ) -> Result<(), AttachError> {
        let released = Arc::new(Notify::new());
        loop {
            match attach(&client, &spec, gpu, &released).await {
                Ok(home) => {
                    if homes.send(home).is_err() {
                        return Ok(());
                    }
                    released.notified().await;
                }
                Err(e) if e.permanent() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot map vLLM's parameters yet; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }
}
