//! The learner's client of one sidecar: publish a version (begin -> stream buckets -> commit
//! with digest), health and info, each under a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::engine::PolicyVersion;
use crate::rpc::pb;
use crate::rpc::pb::sidecar_client::SidecarClient as Raw;

use super::plan::WeightSet;
use crate::rpc::auth::{AddToken, Token};
use crate::rpc::tls::Tls;

/// Errors of one sync; all mean "mark the sidecar stale and move on".
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{addr}: cannot connect: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{addr}: {stage} failed: {status}")]
    Rpc {
        addr: String,
        stage: &'static str,
        status: tonic::Status,
    },
    #[error("{addr}: {stage} missed its {deadline:?} deadline")]
    Deadline {
        addr: String,
        stage: &'static str,
        deadline: Duration,
    },
}

/// What a publish measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub version: PolicyVersion,
    pub bytes: u64,
    pub seconds: f64,
    /// The sidecar's logprob canary after installing it, where its engine checks one.
    pub canary_max_abs_diff: Option<f64>,
    /// Seconds of each phase (`begin`, `stream`, `commit`; `load` for a checkpoint).
    pub phases: Vec<(&'static str, f64)>,
}

/// Deadlines: a fixed allowance per RPC plus the stream's bytes at a floor bandwidth.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub rpc: Duration,
    pub min_bytes_per_s: f64,
}

impl Deadlines {
    fn stream(&self, bytes: u64) -> Duration {
        self.rpc + Duration::from_secs_f64(bytes as f64 / self.min_bytes_per_s)
    }
}

/// A connection to one sidecar.
#[derive(Clone)]
pub struct SidecarClient {
    pub addr: String,
    raw: Raw<InterceptedService<Channel, AddToken>>,
    deadlines: Deadlines,
}

impl SidecarClient {
    /// A lazily connecting plaintext (`http://`) client (no I/O until the first call).
    pub fn new(addr: &str, token: Token, deadlines: Deadlines) -> Result<Self, SyncError> {
        Self::with_tls(addr, token, deadlines, &Tls::default())
    }

    /// A lazily connecting client; an `https://` address is dialled over TLS and its
    /// certificate verified against `tls`'s CA.
    pub fn with_tls(addr: &str, token: Token, deadlines: Deadlines, tls: &Tls) -> Result<Self, SyncError> {
        let endpoint = tls
            .endpoint(addr)
            .map_err(|e| SyncError::Connect {
                addr: addr.into(),
                reason: e.to_string(),
            })?
            .connect_timeout(deadlines.rpc)
            .tcp_nodelay(true);
        let raw = Raw::with_interceptor(endpoint.connect_lazy(), AddToken(token)).max_decoding_message_size(256 << 20);
        Ok(Self {
            addr: addr.to_string(),
            raw,
            deadlines,
        })
    }

    async fn within<T>(
        &self,
        stage: &'static str,
        deadline: Duration,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, SyncError> {
        match tokio::time::timeout(deadline, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(SyncError::Rpc {
                addr: self.addr.clone(),
                stage,
                status,
            }),
            Err(_) => Err(SyncError::Deadline {
                addr: self.addr.clone(),
                stage,
                deadline,
            }),
        }
    }

    /// Served version.
    pub async fn health(&self) -> Result<pb::HealthResponse, SyncError> {
        let mut raw = self.raw.clone();
        self.within("health", self.deadlines.rpc, raw.health(pb::HealthRequest {}))
            .await
    }

    /// Model facts and the digest of the served weights.
    pub async fn info(&self) -> Result<pb::InfoResponse, SyncError> {
        let mut raw = self.raw.clone();
        self.within("info", self.deadlines.rpc * 4, raw.info(pb::InfoRequest {}))
            .await
    }

    /// Sends a full version: begin, stream every bucket, commit with the digest.
    pub async fn publish(
        &self,
        set: Arc<WeightSet>,
        version: PolicyVersion,
        bucket_bytes: u64,
    ) -> Result<Published, SyncError> {
        let started = Instant::now();
        let plan = set.plan(bucket_bytes);
        let pbv = Some(pb::PolicyVersion { step: version.0 });
        let mut raw = self.raw.clone();
        let begin = pb::BeginUpdateRequest {
            version: pbv,
            plan: Some(plan.clone()),
            transport: pb::Transport::GrpcStream as i32,
        };
        self.within("begin", self.deadlines.rpc, raw.begin_update(begin))
            .await?;
        let begun = Instant::now();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let feeder_set = set.clone();
        let feeder_plan = plan.clone();
        tokio::spawn(async move {
            for i in 0..feeder_plan.bucket_count {
                let bucket = pb::WeightBucket {
                    version: pbv,
                    index: i,
                    data: feeder_set.bucket(&feeder_plan, i).to_vec(),
                };
                if tx.send(bucket).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let deadline = self.deadlines.stream(plan.total_bytes);
        self.within("stream", deadline, raw.stream_weights(stream)).await?;
        let streamed = Instant::now();
        let commit = pb::CommitUpdateRequest {
            version: pbv,
            digest: set.digest().to_string(),
            transport: pb::Transport::GrpcStream as i32,
            ..Default::default()
        };
        let done = self
            .within("commit", self.deadlines.rpc * 4, raw.commit_update(commit))
            .await?;
        Ok(Published {
            version,
            bytes: plan.total_bytes,
            seconds: started.elapsed().as_secs_f64(),
            canary_max_abs_diff: done.canary_max_abs_diff,
            phases: vec![
                ("begin", begun.duration_since(started).as_secs_f64()),
                ("stream", streamed.duration_since(begun).as_secs_f64()),
                ("commit", streamed.elapsed().as_secs_f64()),
            ],
        })
    }

    /// NCCL: asks the sidecar to join communicator `unique_id` as `rank` of `world`. An
    /// `Unimplemented` status means the sidecar has no NCCL (use the gRPC stream).
    pub async fn join_nccl(&self, unique_id: String, rank: i32, world: i32) -> Result<(), SyncError> {
        let mut raw = self.raw.clone();
        let req = pb::JoinNcclRequest { unique_id, rank, world };
        self.within("join_nccl", self.deadlines.rpc, raw.join_nccl(req)).await?;
        Ok(())
    }

    /// NCCL: announces `version` as `plan`; the sidecar starts receiving.
    pub async fn begin_nccl(&self, version: PolicyVersion, plan: pb::BucketPlan) -> Result<(), SyncError> {
        let mut raw = self.raw.clone();
        let req = pb::BeginUpdateRequest {
            version: Some(pb::PolicyVersion { step: version.0 }),
            plan: Some(plan),
            transport: pb::Transport::Nccl as i32,
        };
        // The sidecar may first wait for its side of the communicator's creation.
        self.within(
            "begin",
            self.deadlines.rpc * 4 + Duration::from_secs(120),
            raw.begin_update(req),
        )
        .await?;
        Ok(())
    }

    /// NCCL: the sidecar waits for its receive (at most `wait`), checks `digest` (vLLM's
    /// ranks: compares `canary` instead) and swaps; returns the sidecar's canary.
    pub async fn commit_nccl(
        &self,
        version: PolicyVersion,
        digest: String,
        wait: Duration,
        canary: Option<&(Vec<i64>, Vec<f64>)>,
    ) -> Result<Option<f64>, SyncError> {
        let mut raw = self.raw.clone();
        let (canary_ids, canary_logprobs) = canary.cloned().unwrap_or_default();
        let req = pb::CommitUpdateRequest {
            version: Some(pb::PolicyVersion { step: version.0 }),
            digest,
            transport: pb::Transport::Nccl as i32,
            canary_ids,
            canary_logprobs,
        };
        let done = self
            .within("commit", self.deadlines.rpc * 4 + wait, raw.commit_update(req))
            .await?;
        Ok(done.canary_max_abs_diff)
    }

    /// Checkpoint mode: has the sidecar reload its engine from `path`.
    pub async fn load_checkpoint(
        &self,
        path: &str,
        version: PolicyVersion,
        adapter: bool,
    ) -> Result<Published, SyncError> {
        let started = Instant::now();
        let mut raw = self.raw.clone();
        let req = pb::LoadCheckpointRequest {
            version: Some(pb::PolicyVersion { step: version.0 }),
            path: path.into(),
            adapter,
        };
        // An adapter (lora-restart) comes in through a restart of vLLM: allow for a cold start.
        let limit = if adapter {
            (self.deadlines.rpc * 12).max(Duration::from_secs(700))
        } else {
            self.deadlines.rpc * 12
        };
        self.within("load_checkpoint", limit, raw.load_checkpoint(req)).await?;
        Ok(Published {
            version,
            bytes: 0,
            seconds: started.elapsed().as_secs_f64(),
            canary_max_abs_diff: None,
            phases: vec![("load", started.elapsed().as_secs_f64())],
        })
    }

    /// LoRA mode: sends one adapter version (PEFT's two files) as a stream: the head, then the
    /// safetensors file in slices of [`ADAPTER_CHUNK_BYTES`]; returns once the sidecar serves it.
    pub async fn install_adapter(
        &self,
        req: Arc<pb::InstallAdapterRequest>,
        version: PolicyVersion,
    ) -> Result<Published, SyncError> {
        let started = Instant::now();
        let bytes = req.adapter_safetensors.len() as u64;
        let mut raw = self.raw.clone();
        // The sidecar's worst case: vLLM ready, the load, the canary's wait and the canary.
        let limit = self.deadlines.rpc * 12
            + Duration::from_secs(15)
            + Duration::from_secs_f64(bytes as f64 / self.deadlines.min_bytes_per_s);
        let stream = tokio_stream::iter(adapter_chunks(req, version));
        let done = self
            .within("install_adapter", limit, raw.install_adapter(stream))
            .await?;
        Ok(Published {
            version,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            canary_max_abs_diff: done.canary_max_abs_diff,
            phases: vec![("install_adapter", started.elapsed().as_secs_f64())],
        })
    }

    /// CUDA IPC: has the sidecar's vLLM copy the version `req` points at out of our GPU
    /// memory; returns once it serves it (the memory may change after that).
    pub async fn install_ipc(&self, req: pb::InstallIpcRequest, bytes: u64) -> Result<Published, SyncError> {
        let started = Instant::now();
        let version = PolicyVersion(req.version.map_or(0, |v| v.step));
        let mut raw = self.raw.clone();
        // The sidecar is done copying by the request's deadline; its canary follows.
        let limit = Duration::from_millis(req.deadline_ms) + self.deadlines.rpc.max(Duration::from_secs(5));
        let done = self.within("install_ipc", limit, raw.install_ipc(req)).await?;
        Ok(Published {
            version,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            canary_max_abs_diff: done.canary_max_abs_diff,
            phases: vec![("install_ipc", started.elapsed().as_secs_f64())],
        })
    }
}

/// Shared mode's calls (`--weight-bridge-mode shared` with a vLLM sidecar on the same GPU).
impl SidecarClient {
    /// vLLM's parameters, to map; waits at most `limit` (vLLM may be starting).
    pub async fn export_shared(&self, limit: Duration) -> Result<pb::ExportSharedResponse, SyncError> {
        let mut raw = self.raw.clone();
        self.within("export_shared", limit, raw.export_shared(pb::ExportSharedRequest {}))
            .await
    }

    /// Pauses vLLM `launch` for a write; it resumes by itself after `hold`.
    pub async fn pause_shared(&self, launch: u64, hold: Duration) -> Result<f64, SyncError> {
        let mut raw = self.raw.clone();
        let req = pb::PauseSharedRequest {
            launch,
            deadline_ms: hold.as_millis() as u64,
        };
        let limit = self.deadlines.rpc.max(Duration::from_secs(5));
        Ok(self
            .within("pause_shared", limit, raw.pause_shared(req))
            .await?
            .pause_seconds)
    }

    /// Resumes vLLM `launch`, which now serves `version`; its canary against ours follows.
    pub async fn resume_shared(
        &self,
        launch: u64,
        version: PolicyVersion,
        canary: Option<(Vec<i64>, Vec<f64>)>,
    ) -> Result<Option<f64>, SyncError> {
        let mut raw = self.raw.clone();
        let (canary_ids, canary_logprobs) = canary.unwrap_or_default();
        let req = pb::ResumeSharedRequest {
            launch,
            version: Some(pb::PolicyVersion { step: version.0 }),
            canary_ids,
            canary_logprobs,
        };
        let limit = self.deadlines.rpc.max(Duration::from_secs(5));
        let done = self.within("resume_shared", limit, raw.resume_shared(req)).await?;
        Ok(done.canary_max_abs_diff)
    }
}

/// The slice of an adapter's safetensors file one stream message carries (well under the
/// sidecar's 256 MiB per message).
pub const ADAPTER_CHUNK_BYTES: usize = 16 << 20;

/// InstallAdapter's stream for `req` as `version`: the head (its file left out, its size in
/// `adapter_bytes`), then the file in slices, each copied only when the stream asks for it.
pub fn adapter_chunks(
    req: Arc<pb::InstallAdapterRequest>,
    version: PolicyVersion,
) -> impl Iterator<Item = pb::AdapterChunk> + Send + 'static {
    let head = pb::InstallAdapterRequest {
        version: Some(pb::PolicyVersion { step: version.0 }),
        adapter_config: req.adapter_config.clone(),
        adapter_safetensors: Vec::new(),
        canary_ids: req.canary_ids.clone(),
        canary_logprobs: req.canary_logprobs.clone(),
        adapter_bytes: req.adapter_safetensors.len() as u64,
    };
    let slices = req.adapter_safetensors.len().div_ceil(ADAPTER_CHUNK_BYTES);
    let first = pb::AdapterChunk {
        head: Some(head),
        data: Vec::new(),
    };
    std::iter::once(first).chain((0..slices).map(move |i| {
        let end = ((i + 1) * ADAPTER_CHUNK_BYTES).min(req.adapter_safetensors.len());
        pb::AdapterChunk {
            head: None,
            data: req.adapter_safetensors[i * ADAPTER_CHUNK_BYTES..end].to_vec(),
        }
    }))
}
