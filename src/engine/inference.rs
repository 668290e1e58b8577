//! The engine seam: one [`InferenceEngine`] trait that the sidecar's HTTP server, gRPC service
//! and WeightReceiver use, whatever serves the tokens. Two implementations: the embedded tch
//! engine ([`EngineHandle`]) and the vLLM driver ([`super::vllm::VllmEngine`]).

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Tensor};
use tokenizers::Tokenizer;

use super::core::{Completion, EngineError, EngineHandle, JobParams, PolicyVersion};
use crate::model::safetensors_io::load_params;
use crate::model::ModelSpec;
use crate::version::Digest;

/// Why an engine call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineFailure {
    /// The engine is not serving (its thread ended, or vLLM is down or restarting).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The engine refused the input (a 4xx from vLLM, shapes that do not fit).
    #[error("engine rejected the request: {0}")]
    Rejected(String),
    /// The engine failed while doing it.
    #[error("engine failed: {0}")]
    Failed(String),
}

/// vLLM's parameters as its worker exported them (shared mode), and the launch they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedParams {
    pub launch: u64,
    pub export: super::vllm_shared::SharedExport,
}

/// What installing a version reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Installed {
    /// Largest |served - reference| logprob over the canary tokens, where the engine checks
    /// one (vLLM: its prompt logprobs against our transformer on the installed weights).
    pub canary_max_abs_diff: Option<f64>,
}

/// A version in the learner's GPU memory, and the learner's own logprobs of canary tokens on
/// it (the engine compares its own with them after the install).
#[derive(Debug, Clone, PartialEq)]
pub struct IpcInstall {
    pub export: super::vllm_transfer::IpcExport,
    /// The learner keeps the memory unchanged this long from the request: the engine must be
    /// done reading (or have given up) by then.
    pub deadline: std::time::Duration,
    /// Token ids, and the learner's logprob of each of `ids[1..]` after its prefix.
    pub canary: Option<(Vec<i64>, Vec<f64>)>,
}

/// A LoRA adapter version: what it adapts, its tensors (PEFT keys, fp32 on the CPU), and the
/// learner's logprobs of canary tokens with it.
#[derive(Debug)]
pub struct AdapterUpdate {
    pub lora: crate::model::lora::LoraSpec,
    pub tensors: Vec<(String, Tensor)>,
    pub canary: Option<(Vec<i64>, Vec<f64>)>,
}

/// One tensor of a forwarded NCCL update: HF name, vLLM dtype name, shape.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub dtype: super::vllm_transfer::IpcDtype,
    pub shape: Vec<i64>,
}

/// The facts of a running engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub version: PolicyVersion,
    /// Parameters of the served model.
    pub parameters: u64,
    /// Digest of the served weights in manifest order, where the engine knows it (vLLM does
    /// not after a checkpoint load: its weights were never in our hands).
    pub digest: Option<Digest>,
}

/// What the sidecar needs from an inference engine.
#[async_trait::async_trait]
pub trait InferenceEngine: Send + Sync + 'static {
    /// `"embedded"` or `"vllm"`, for logs and `/info`.
    fn kind(&self) -> &'static str;
    /// The served model's tokenizer.
    fn tokenizer(&self) -> &Arc<Tokenizer>;
    /// The served model's vocabulary size.
    fn vocab_size(&self) -> i64;
    /// The served model's context window in tokens.
    fn context_len(&self) -> usize;
    /// The served model's tensors (names and shapes) that an update must match.
    fn manifest(&self) -> &[(String, Vec<i64>)];
    /// The device NCCL receives land on, or `None` when the engine takes weights only as host
    /// tensors (the sidecar then answers `JoinNccl` with `Unimplemented`).
    fn nccl_device(&self) -> Option<Device>;
    /// Generates `params.n` completions of `prompt`; a request runs entirely on one version.
    async fn generate(&self, prompt: Vec<i64>, params: JobParams) -> Result<Vec<Completion>, EngineFailure>;
    /// Serves `weights` (every tensor, manifest names) as `version` from the next request on.
    async fn install(&self, weights: Vec<(String, Tensor)>, version: PolicyVersion)
        -> Result<Installed, EngineFailure>;
    /// Serves the HF checkpoint in `dir` as `version`.
    async fn load_checkpoint(&self, dir: &Path, version: PolicyVersion) -> Result<(), EngineFailure>;
    /// Serves the base model with `update`'s adapter as `version` from the next request on;
    /// requests already running finish on the adapter they began with.
    async fn install_adapter(&self, update: AdapterUpdate, version: PolicyVersion) -> Result<Installed, EngineFailure> {
        let _ = (update, version);
        Err(EngineFailure::Rejected(format!(
            "the {} engine takes no LoRA adapters",
            self.kind()
        )))
    }
    /// Serves the PEFT adapter directory `dir` as `version` (lora-restart mode). The default
    /// reads it and installs it like [`Self::install_adapter`].
    async fn load_adapter_checkpoint(&self, dir: &Path, version: PolicyVersion) -> Result<(), EngineFailure> {
        let update = read_adapter_dir(dir, self.manifest_spec()?).await?;
        self.install_adapter(update, version).await.map(|_| ())
    }
    /// The served model's shape (what adapters are checked against).
    fn manifest_spec(&self) -> Result<ModelSpec, EngineFailure> {
        Err(EngineFailure::Rejected(format!(
            "the {} engine takes no LoRA adapters",
            self.kind()
        )))
    }
    /// Whether [`Self::install_ipc`] is served (vLLM launched with the CUDA IPC transfer).
    fn takes_ipc(&self) -> bool {
        false
    }
    /// Serves `version` from weights its workers read out of the learner's GPU memory; the
    /// memory must stay unchanged until this returns.
    async fn install_ipc(&self, update: IpcInstall, version: PolicyVersion) -> Result<Installed, EngineFailure> {
        let _ = (update, version);
        Err(EngineFailure::Rejected(format!(
            "the {} engine takes no CUDA IPC weights",
            self.kind()
        )))
    }
    /// Shared mode: the engine's own parameters, for a learner on the same GPU to map.
    async fn shared_export(&self) -> Result<SharedParams, EngineFailure> {
        Err(EngineFailure::Rejected(format!(
            "the {} engine exports no parameters (shared mode needs --engine vllm --vllm-weight-transfer shared)",
            self.kind()
        )))
    }
    /// Shared mode: stops every forward of `launch` until [`Self::shared_resume`] (or until
    /// `deadline`, when the engine resumes by itself); returns the seconds the pause took.
    async fn shared_pause(&self, launch: u64, deadline: std::time::Duration) -> Result<f64, EngineFailure> {
        let _ = (launch, deadline);
        Err(self.no_shared())
    }
    /// Shared mode: the learner wrote `version` into the weights of `launch`; serve it, then
    /// compare the canary.
    async fn shared_resume(
        &self,
        launch: u64,
        version: PolicyVersion,
        canary: Option<(Vec<i64>, Vec<f64>)>,
    ) -> Result<Installed, EngineFailure> {
        let _ = (launch, version, canary);
        Err(self.no_shared())
    }
    fn no_shared(&self) -> EngineFailure {
        EngineFailure::Rejected(format!("the {} engine does not share its weights", self.kind()))
    }
    /// Whether NCCL goes straight into the engine's own ranks (vLLM's workers,
    /// `--vllm-weight-transfer nccl`) rather than into tensors the sidecar hands over.
    fn forwards_nccl(&self) -> bool {
        false
    }
    /// With [`Self::forwards_nccl`]: the world a learner makes with the engine's ranks as
    /// rank 0, or `None` (not ready).
    async fn forwarded_nccl_world(&self) -> Option<i32> {
        None
    }
    /// Has the engine's ranks join communicator `unique_id` of `world` (in the background: the
    /// learner joins after this returns).
    async fn nccl_forward_join(&self, unique_id: Vec<u8>, world: i32) -> Result<(), EngineFailure> {
        let _ = (unique_id, world);
        Err(self.no_forwarded_nccl())
    }
    /// Gets the engine ready to receive `version` as vLLM's packed NCCL broadcasts of
    /// `tensors` (name, dtype, shape) in chunks past `buffer_bytes`; the learner sends next.
    async fn nccl_forward_begin(
        &self,
        version: PolicyVersion,
        tensors: Vec<NamedTensor>,
        buffer_bytes: u64,
    ) -> Result<(), EngineFailure> {
        let _ = (version, tensors, buffer_bytes);
        Err(self.no_forwarded_nccl())
    }
    /// Waits for the receive begun by [`Self::nccl_forward_begin`] and serves `version`.
    async fn nccl_forward_commit(
        &self,
        version: PolicyVersion,
        canary: Option<(Vec<i64>, Vec<f64>)>,
    ) -> Result<Installed, EngineFailure> {
        let _ = (version, canary);
        Err(self.no_forwarded_nccl())
    }
    /// The error of the forwarded-NCCL calls on an engine without them.
    fn no_forwarded_nccl(&self) -> EngineFailure {
        EngineFailure::Rejected(format!("the {} engine takes no forwarded NCCL", self.kind()))
    }
    /// The served version, size and digest.
    async fn served(&self) -> Result<Served, EngineFailure>;
    /// The served version alone (cheap: what `/info` answers anyone with).
    async fn version(&self) -> Result<PolicyVersion, EngineFailure> {
        self.served().await.map(|s| s.version)
    }
    /// Whether the engine answers now.
    async fn healthy(&self) -> bool;
}

/// Reads and checks a PEFT adapter directory against `spec`, off the async threads.
pub async fn read_adapter_dir(dir: &Path, spec: ModelSpec) -> Result<AdapterUpdate, EngineFailure> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (lora, tensors) =
            crate::model::lora::load_adapter(&dir, &spec).map_err(|e| EngineFailure::Rejected(e.to_string()))?;
        Ok(AdapterUpdate {
            lora,
            tensors,
            canary: None,
        })
    })
    .await
    .map_err(|e| EngineFailure::Failed(format!("reading the adapter: {e}")))?
}

/// A shared engine, as the sidecar's services hold it.
pub type SharedEngine = Arc<dyn InferenceEngine>;

fn gone(e: impl std::fmt::Display) -> EngineFailure {
    EngineFailure::Unavailable(e.to_string())
}

#[async_trait::async_trait]
impl InferenceEngine for EngineHandle {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    fn context_len(&self) -> usize {
        self.context_len
    }

    fn manifest(&self) -> &[(String, Vec<i64>)] {
        &self.manifest
    }

    fn nccl_device(&self) -> Option<Device> {
        Some(self.device)
    }

    async fn generate(&self, prompt: Vec<i64>, params: JobParams) -> Result<Vec<Completion>, EngineFailure> {
        EngineHandle::generate(self, prompt, params).await.map_err(|e| match e {
            EngineError::RoundFailed(why) => EngineFailure::Failed(why),
            EngineError::Gone => gone(e),
        })
    }

    async fn install(
        &self,
        weights: Vec<(String, Tensor)>,
        version: PolicyVersion,
    ) -> Result<Installed, EngineFailure> {
        self.swap(weights, version)
            .await
            .map_err(gone)?
            .map_err(|e| EngineFailure::Rejected(e.to_string()))?;
        Ok(Installed::default())
    }

    async fn load_checkpoint(&self, dir: &Path, version: PolicyVersion) -> Result<(), EngineFailure> {
        // Reading a checkpoint is blocking file I/O: off the async threads.
        let dir = dir.to_path_buf();
        let weights = tokio::task::spawn_blocking(move || {
            let spec = ModelSpec::from_dir(&dir).map_err(|e| EngineFailure::Rejected(e.to_string()))?;
            let params = load_params(&spec, &dir, Device::Cpu).map_err(|e| EngineFailure::Rejected(e.to_string()))?;
            Ok::<_, EngineFailure>(
                params
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .map_err(|e| EngineFailure::Failed(format!("loading the checkpoint: {e}")))??;
        self.install(weights, version).await.map(|_| ())
    }

    async fn install_adapter(&self, update: AdapterUpdate, version: PolicyVersion) -> Result<Installed, EngineFailure> {
        let canary = update.canary.clone();
        self.swap_adapter(update.lora, update.tensors, version)
            .await
            .map_err(gone)?
            .map_err(|e| EngineFailure::Rejected(e.to_string()))?;
        let canary_max_abs_diff = match canary {
            Some((ids, reference)) => {
                let served = self.logprobs(ids).await.map_err(gone)??;
                Some(
                    served
                        .iter()
                        .zip(&reference)
                        .map(|(s, r)| (s - r).abs())
                        .fold(0.0, f64::max),
                )
            }
            None => None,
        };
        Ok(Installed { canary_max_abs_diff })
    }

    fn manifest_spec(&self) -> Result<ModelSpec, EngineFailure> {
        Ok(self.spec.clone())
    }

    async fn served(&self) -> Result<Served, EngineFailure> {
        let (version, parameters, digest) = EngineHandle::served(self)
            .await
            .map_err(gone)?
            .map_err(|e| EngineFailure::Failed(e.to_string()))?;
        Ok(Served {
            version,
            parameters,
            digest: Some(digest),
        })
    }

    /// Between rounds, without digesting the weights.
    async fn version(&self) -> Result<PolicyVersion, EngineFailure> {
        self.info().await.map(|i| i.version).map_err(gone)
    }

    /// From the engine thread's heartbeat (it answers its queue between rounds only, and a
    /// health check must not wait for a round): alive, and beat within its stall limit.
    async fn healthy(&self) -> bool {
        self.pulse.alive()
    }
}
