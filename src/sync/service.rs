//! The sidecar's gRPC service: forwards weight-sync calls to the WeightReceiver actor, and
//! answers health checks from the receiver's health board (never through its mailbox).

use std::net::SocketAddr;
use std::path::PathBuf;

use ractor::ActorRef;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::inference::{AdapterUpdate, IpcInstall, SharedEngine};
use crate::engine::vllm_transfer::{IpcDtype, IpcExport, IpcTensor};
use crate::engine::PolicyVersion;
use crate::rpc::pb;
use crate::rpc::pb::sidecar_server::{Sidecar, SidecarServer};

use super::plan::Digest;
use crate::rpc::tls::Tls;

use super::receiver::{Applied, HealthBoard, ReceiverMsg};
use crate::rpc::auth::{CheckToken, Token};

/// The service state.
pub struct SidecarService {
    pub receiver: ActorRef<ReceiverMsg>,
    pub health: HealthBoard,
    pub engine: SharedEngine,
    /// The served model's directory, told by `Info` only where calls are authenticated.
    pub model_dir: Option<PathBuf>,
    pub http_address: String,
    /// Checkpoint reloads must come from under this directory (`--checkpoint-root`).
    pub checkpoint_root: Option<PathBuf>,
}

/// `path` canonicalized, if it lies under `root` (canonicalized too): no `..`, no symbolic
/// link out of it.
pub fn confine(root: Option<&std::path::Path>, path: &str) -> Result<PathBuf, Status> {
    let root = root.ok_or_else(|| {
        Status::permission_denied(
            "checkpoint reloads are off: start the sidecar with --checkpoint-root <the learner's --save-path>",
        )
    })?;
    let root = root
        .canonicalize()
        .map_err(|e| Status::failed_precondition(format!("--checkpoint-root {}: {e}", root.display())))?;
    // A step number names that step's checkpoint under the root (checkpoint mode's
    // `sync_step_N`, else `step_N`); a relative path is taken under the root too.
    let named = match path.parse::<u64>() {
        Ok(n) => [
            format!("sync_step_{n}"),
            format!("step_{n}"),
            format!("sync_adapter_step_{n}"),
            format!("adapter_step_{n}"),
        ]
        .into_iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| root.join(format!("step_{n}"))),
        Err(_) => root.join(path),
    };
    let full = named
        .canonicalize()
        .map_err(|e| Status::invalid_argument(format!("checkpoint {path:?}: {e}")))?;
    if !full.starts_with(&root) || full == root {
        return Err(Status::permission_denied(format!(
            "checkpoint {path:?} is outside --checkpoint-root {}",
            root.display()
        )));
    }
    Ok(full)
}

fn version_of(v: Option<pb::PolicyVersion>) -> Result<PolicyVersion, Status> {
    v.map(|v| PolicyVersion(v.step))
        .ok_or_else(|| Status::invalid_argument("missing version"))
}

fn pv(v: PolicyVersion) -> Option<pb::PolicyVersion> {
    Some(pb::PolicyVersion { step: v.0 })
}

/// The reply to an install the engine applied.
fn committed(version: PolicyVersion, applied: Applied) -> Response<pb::CommitUpdateResponse> {
    Response::new(pb::CommitUpdateResponse {
        version: pv(version),
        apply_seconds: applied.seconds,
        canary_max_abs_diff: applied.installed.canary_max_abs_diff,
    })
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl SidecarService {
    /// Has the receiver verify and install the version a commit names.
    async fn commit(&self, req: pb::CommitUpdateRequest, version: PolicyVersion) -> Result<Applied, Status> {
        if req.transport == pb::Transport::Nccl as i32 {
            let canary = (req.canary_ids.len() >= 2 && req.canary_logprobs.len() + 1 == req.canary_ids.len())
                .then(|| (req.canary_ids.clone(), req.canary_logprobs.clone()));
            ractor::call!(self.receiver, ReceiverMsg::CommitNccl, version, req.digest, canary)
                .map_err(internal)?
                .map_err(|e| Status::data_loss(e.to_string()))
        } else {
            let digest: Digest = req
                .digest
                .parse()
                .map_err(|e: crate::version::BadDigest| Status::invalid_argument(e.to_string()))?;
            ractor::call!(self.receiver, ReceiverMsg::Commit, version, digest)
                .map_err(internal)?
                .map_err(|e| Status::data_loss(e.to_string()))
        }
    }
}

#[tonic::async_trait]
impl Sidecar for SidecarService {
    async fn info(&self, _req: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let served = self.engine.served().await.map_err(internal)?;
        // A learner decides how to reach the engine from this reply: never answer without the
        // forwarded world when there is one.
        let vllm_nccl_world = match self.engine.forwards_nccl() {
            true => self
                .engine
                .forwarded_nccl_world()
                .await
                .ok_or_else(|| Status::unavailable("vLLM is not ready: its NCCL world is not known yet"))?,
            false => 0,
        };
        Ok(Response::new(pb::InfoResponse {
            version: pv(served.version),
            model_dir: self
                .model_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            vocab_size: self.engine.vocab_size(),
            parameters: served.parameters,
            digest: served.digest.map(|d| d.to_string()).unwrap_or_default(),
            http_address: self.http_address.clone(),
            engine: self.engine.kind().into(),
            ipc: self.engine.takes_ipc(),
            vllm_nccl_world,
        }))
    }

    async fn health(&self, _req: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        // A dropped sender means the receiver actor is gone: the sidecar cannot take updates.
        if self.health.has_changed().is_err() {
            return Err(Status::unavailable("the weight receiver has stopped"));
        }
        // A restarting vLLM cannot take updates: the learner marks this sidecar stale and
        // gives it a full sync once it answers again.
        if !self.engine.healthy().await {
            return Err(Status::unavailable("the engine is not ready"));
        }
        let health = *self.health.borrow();
        Ok(Response::new(pb::HealthResponse {
            version: pv(health.version),
            updating: health.updating,
        }))
    }

    async fn begin_update(
        &self,
        req: Request<pb::BeginUpdateRequest>,
    ) -> Result<Response<pb::BeginUpdateResponse>, Status> {
        let req = req.into_inner();
        let version = version_of(req.version)?;
        let plan = req.plan.ok_or_else(|| Status::invalid_argument("missing plan"))?;
        if req.transport == pb::Transport::Nccl as i32 {
            ractor::call!(self.receiver, ReceiverMsg::BeginNccl, version, plan)
                .map_err(internal)?
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
        } else if req.transport == pb::Transport::GrpcStream as i32 {
            ractor::call!(self.receiver, ReceiverMsg::Begin, version, plan)
                .map_err(internal)?
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
        } else {
            return Err(Status::invalid_argument("unknown transport"));
        }
        Ok(Response::new(pb::BeginUpdateResponse {}))
    }

    async fn stream_weights(
        &self,
        req: Request<Streaming<pb::WeightBucket>>,
    ) -> Result<Response<pb::StreamWeightsResponse>, Status> {
        let mut stream = req.into_inner();
        let (mut buckets, mut bytes) = (0u32, 0u64);
        while let Some(b) = stream.message().await? {
            let version = version_of(b.version)?;
            bytes += b.data.len() as u64;
            ractor::call!(self.receiver, ReceiverMsg::Bucket, version, b.index, b.data)
                .map_err(internal)?
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            buckets += 1;
        }
        Ok(Response::new(pb::StreamWeightsResponse { buckets, bytes }))
    }

    async fn commit_update(
        &self,
        req: Request<pb::CommitUpdateRequest>,
    ) -> Result<Response<pb::CommitUpdateResponse>, Status> {
        let req = req.into_inner();
        let version = version_of(req.version)?;
        let applied = self.commit(req, version).await;
        let prom = crate::telemetry::prom::sidecar();
        let outcome = if applied.is_ok() { "installed" } else { "refused" };
        prom.weight_updates
            .get_or_create(&crate::telemetry::prom::Reason { reason: outcome.into() })
            .inc();
        let applied = applied?;
        prom.apply_seconds.observe(applied.seconds);
        if let Some(c) = applied.installed.canary_max_abs_diff {
            prom.canary_max_abs_diff.set(c);
        }
        Ok(Response::new(pb::CommitUpdateResponse {
            version: pv(version),
            apply_seconds: applied.seconds,
            canary_max_abs_diff: applied.installed.canary_max_abs_diff,
        }))
    }

    async fn join_nccl(&self, req: Request<pb::JoinNcclRequest>) -> Result<Response<pb::JoinNcclResponse>, Status> {
        let req = req.into_inner();
        ractor::call!(self.receiver, ReceiverMsg::JoinNccl, req.unique_id, req.rank, req.world)
            .map_err(internal)?
            .map_err(|e| Status::unimplemented(e.to_string()))?;
        Ok(Response::new(pb::JoinNcclResponse {}))
    }

    async fn load_checkpoint(
        &self,
        req: Request<pb::LoadCheckpointRequest>,
    ) -> Result<Response<pb::LoadCheckpointResponse>, Status> {
        let req = req.into_inner();
        let version = version_of(req.version)?;
        let path = confine(self.checkpoint_root.as_deref(), &req.path).map_err(|e| {
            // Without the token the caller learns nothing of the filesystem: not the root, not
            // whether a path exists.
            if self.model_dir.is_some() {
                return e;
            }
            tracing::warn!(path = %req.path, error = %e.message(), "checkpoint reload refused");
            Status::permission_denied("checkpoint reload refused (the sidecar's log says why)")
        })?;
        ractor::call!(self.receiver, ReceiverMsg::LoadCheckpoint, version, path, req.adapter)
            .map_err(internal)?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::LoadCheckpointResponse { version: pv(version) }))
    }

    async fn install_ipc(
        &self,
        req: Request<pb::InstallIpcRequest>,
    ) -> Result<Response<pb::CommitUpdateResponse>, Status> {
        if !self.engine.takes_ipc() {
            return Err(Status::unimplemented(format!(
                "the {} engine here takes no CUDA IPC weights",
                self.engine.kind()
            )));
        }
        let req = req.into_inner();
        let version = version_of(req.version)?;
        let update = Box::new(ipc_install_of(req)?);
        let applied = ractor::call!(self.receiver, ReceiverMsg::InstallIpc, version, update)
            .map_err(internal)?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(committed(version, applied))
    }

    async fn export_shared(
        &self,
        _req: Request<pb::ExportSharedRequest>,
    ) -> Result<Response<pb::ExportSharedResponse>, Status> {
        // Unavailable (vLLM restarting) is worth waiting for; anything else is not.
        let shared = self.engine.shared_export().await.map_err(|e| match e {
            crate::engine::inference::EngineFailure::Unavailable(_) => Status::unavailable(e.to_string()),
            other => Status::failed_precondition(other.to_string()),
        })?;
        Ok(Response::new(super::shared_vllm::export_response(shared)))
    }

    async fn pause_shared(
        &self,
        req: Request<pb::PauseSharedRequest>,
    ) -> Result<Response<pb::PauseSharedResponse>, Status> {
        let req = req.into_inner();
        let deadline = std::time::Duration::from_millis(req.deadline_ms.clamp(1_000, 600_000));
        let pause_seconds = self
            .engine
            .shared_pause(req.launch, deadline)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::PauseSharedResponse { pause_seconds }))
    }

    async fn resume_shared(
        &self,
        req: Request<pb::ResumeSharedRequest>,
    ) -> Result<Response<pb::CommitUpdateResponse>, Status> {
        let req = req.into_inner();
        let version = version_of(req.version)?;
        let canary = (!req.canary_ids.is_empty()).then_some((req.canary_ids, req.canary_logprobs));
        let applied = ractor::call!(self.receiver, ReceiverMsg::ResumeShared, req.launch, version, canary)
            .map_err(internal)?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(committed(version, applied))
    }

    async fn install_adapter(
        &self,
        req: Request<Streaming<pb::AdapterChunk>>,
    ) -> Result<Response<pb::CommitUpdateResponse>, Status> {
        let mut stream = req.into_inner();
        let mut assembly = AdapterAssembly::default();
        // A learner that stops sending mid-stream costs a deadline, not a held call and buffer.
        loop {
            let next = tokio::time::timeout(ADAPTER_CHUNK_WAIT, stream.message())
                .await
                .map_err(|_| Status::deadline_exceeded("adapter stream: no chunk for 60 s"))??;
            let Some(chunk) = next else { break };
            assembly.push(chunk)?;
        }
        let req = assembly.finish()?;
        let version = version_of(req.version)?;
        let spec = self
            .engine
            .manifest_spec()
            .map_err(|e| Status::unimplemented(e.to_string()))?;
        let update = Box::new(adapter_update_of(req, &spec)?);
        let applied = ractor::call!(self.receiver, ReceiverMsg::InstallAdapter, version, update)
            .map_err(internal)?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(committed(version, applied))
    }
}

/// The longest wait for the next message of an adapter stream.
const ADAPTER_CHUNK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The largest adapter file a sidecar takes (it holds one in memory while it installs it).
pub const MAX_ADAPTER_BYTES: u64 = 16 << 30;

/// InstallAdapter's stream put back together: the head first, then slices up to its declared
/// size. Anything else (no head, a second head, more or fewer bytes) is refused.
#[derive(Default)]
pub struct AdapterAssembly {
    head: Option<pb::InstallAdapterRequest>,
}

impl AdapterAssembly {
    /// Takes the next message of the stream.
    pub fn push(&mut self, chunk: pb::AdapterChunk) -> Result<(), Status> {
        let bad = |why: &str| Err(Status::invalid_argument(format!("adapter stream: {why}")));
        match (&mut self.head, chunk.head) {
            (None, Some(head)) => {
                if head.adapter_bytes > MAX_ADAPTER_BYTES {
                    return bad(&format!(
                        "{} bytes declared, over the sidecar's {} GiB",
                        head.adapter_bytes,
                        MAX_ADAPTER_BYTES >> 30
                    ));
                }
                if !head.adapter_safetensors.is_empty() || !chunk.data.is_empty() {
                    return bad("the head carries no file bytes");
                }
                let mut head = head;
                // Reserve what was declared, up to 1 GiB; beyond that the buffer grows.
                head.adapter_safetensors = Vec::with_capacity(head.adapter_bytes.min(1 << 30) as usize);
                self.head = Some(head);
                Ok(())
            }
            (None, None) => bad("the first message must carry the head"),
            (Some(_), Some(_)) => bad("a second head"),
            (Some(head), None) => {
                let have = head.adapter_safetensors.len() as u64 + chunk.data.len() as u64;
                if have > head.adapter_bytes {
                    return bad(&format!("more than the {} bytes declared", head.adapter_bytes));
                }
                head.adapter_safetensors.extend_from_slice(&chunk.data);
                Ok(())
            }
        }
    }

    /// The whole request, once the stream has ended.
    pub fn finish(self) -> Result<pb::InstallAdapterRequest, Status> {
        let head = self
            .head
            .ok_or_else(|| Status::invalid_argument("adapter stream: empty"))?;
        let have = head.adapter_safetensors.len() as u64;
        if have != head.adapter_bytes {
            return Err(Status::invalid_argument(format!(
                "adapter stream: {have} of the {} bytes declared",
                head.adapter_bytes
            )));
        }
        Ok(head)
    }
}

/// The engine's view of an InstallAdapter request: the PEFT config and tensors parsed and
/// checked against the served model (all keys, shapes, finite values).
fn adapter_update_of(req: pb::InstallAdapterRequest, spec: &crate::model::ModelSpec) -> Result<AdapterUpdate, Status> {
    use crate::model::lora::{check_tensors, LoraSpec};
    let bad = |what: &str, e: &dyn std::fmt::Display| Status::invalid_argument(format!("{what}: {e}"));
    let config: serde_json::Value =
        serde_json::from_str(&req.adapter_config).map_err(|e| bad("adapter_config.json", &e))?;
    let lora = LoraSpec::from_peft_config(&config).map_err(|e| bad("adapter_config.json", &e))?;
    lora.check(spec).map_err(|e| bad("adapter", &e))?;
    let tensors = crate::model::safetensors_io::read_bytes(&req.adapter_safetensors)
        .map_err(|e| bad("adapter_model.safetensors", &e))?
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(tch::Kind::Float)))
        .collect::<Vec<_>>();
    check_tensors(&lora, spec, &tensors).map_err(|e| bad("adapter", &e))?;
    let canary = canary_of(req.canary_ids, req.canary_logprobs)?;
    Ok(AdapterUpdate { lora, tensors, canary })
}

/// Canary token ids, and the learner's logprob of each of `ids[1..]` after its prefix.
type Canary = (Vec<i64>, Vec<f64>);

/// A canary of n >= 2 ids and n - 1 logprobs, or none.
fn canary_of(ids: Vec<i64>, logprobs: Vec<f64>) -> Result<Option<Canary>, Status> {
    if ids.len() >= 2 && logprobs.len() + 1 == ids.len() {
        Ok(Some((ids, logprobs)))
    } else if ids.is_empty() && logprobs.is_empty() {
        Ok(None)
    } else {
        Err(Status::invalid_argument(
            "the canary needs n >= 2 ids and n - 1 logprobs",
        ))
    }
}

/// The engine's view of an InstallIpc request.
fn ipc_install_of(req: pb::InstallIpcRequest) -> Result<IpcInstall, Status> {
    let tensors = req
        .tensors
        .into_iter()
        .map(|t| {
            let dtype = IpcDtype::parse(&t.dtype)
                .ok_or_else(|| Status::invalid_argument(format!("{}: dtype {:?} (bf16 or f32)", t.name, t.dtype)))?;
            Ok(IpcTensor {
                name: t.name,
                dtype,
                shape: t.shape,
                offset_bytes: t.offset_bytes,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let export = IpcExport {
        gpu_uuid: req.gpu_uuid,
        handle: req.handle,
        alloc_bytes: req.alloc_bytes,
        tensors,
    };
    export.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
    let canary = canary_of(req.canary_ids, req.canary_logprobs)?;
    if req.deadline_ms < 1000 {
        return Err(Status::invalid_argument("deadline_ms under 1 s"));
    }
    // The reply and the learner's own bookkeeping need a little of it.
    let deadline = std::time::Duration::from_millis(req.deadline_ms).saturating_sub(std::time::Duration::from_secs(2));
    Ok(IpcInstall {
        export,
        canary,
        deadline,
    })
}

/// Serves the sidecar service on `addr` (port 0 picks one); returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    service: SidecarService,
    token: Token,
    tls: &Tls,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut server = tls.server().map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let svc = tonic::service::interceptor::InterceptedService::new(
        SidecarServer::new(service).max_decoding_message_size(256 << 20),
        CheckToken(token),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = server.add_service(svc).serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "sidecar gRPC server stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reloads_take_a_step_number_or_a_path_under_the_root() {
        let root = tempfile::tempdir().expect("root");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::create_dir(root.path().join("step_3")).expect("step_3");
        std::fs::create_dir(root.path().join("sync_step_4")).expect("sync_step_4");
        let canon = |p: &std::path::Path| p.canonicalize().expect("canon");
        let r = Some(root.path());
        assert_eq!(confine(r, "3").expect("step 3"), canon(&root.path().join("step_3")));
        assert_eq!(
            confine(r, "4").expect("step 4"),
            canon(&root.path().join("sync_step_4"))
        );
        let abs = root.path().join("step_3");
        assert_eq!(confine(r, abs.to_str().expect("utf8")).expect("absolute"), canon(&abs));
        assert_eq!(confine(r, "step_3").expect("relative"), canon(&abs));
        let code = |p: &str| confine(r, p).map_err(|s| s.code()).err();
        assert_eq!(code("9"), Some(tonic::Code::InvalidArgument), "no such step");
        assert_eq!(code("step_3/../.."), Some(tonic::Code::PermissionDenied));
        assert_eq!(
            code(outside.path().to_str().expect("utf8")),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            confine(None, "3").map_err(|s| s.code()).err(),
            Some(tonic::Code::PermissionDenied)
        );
    }

    fn adapter_req(bytes: usize) -> pb::InstallAdapterRequest {
        pb::InstallAdapterRequest {
            adapter_config: "{}".into(),
            adapter_safetensors: (0..bytes).map(|i| (i % 251) as u8).collect(),
            canary_ids: vec![1, 2, 3],
            canary_logprobs: vec![-1.0, -2.0],
            ..Default::default()
        }
    }

    #[test]
    fn an_adapter_goes_in_slices_and_comes_back_whole() {
        use crate::sync::client::{adapter_chunks, ADAPTER_CHUNK_BYTES};
        let sent = adapter_req(2 * ADAPTER_CHUNK_BYTES + 12345);
        let chunks: Vec<_> = adapter_chunks(Arc::new(sent.clone()), PolicyVersion(7)).collect();
        assert_eq!(chunks.len(), 4, "the head, then three slices");
        assert!(chunks.iter().all(|c| c.data.len() <= ADAPTER_CHUNK_BYTES));
        let mut assembly = AdapterAssembly::default();
        for c in chunks {
            assembly.push(c).expect("push");
        }
        let got = assembly.finish().expect("finish");
        assert_eq!(got.adapter_safetensors, sent.adapter_safetensors);
        assert_eq!(got.version.map(|v| v.step), Some(7));
        assert_eq!(
            (got.canary_ids, got.canary_logprobs),
            (sent.canary_ids, sent.canary_logprobs)
        );
        assert_eq!(got.adapter_config, sent.adapter_config);
    }

    #[test]
    fn a_malformed_adapter_stream_is_refused() {
        use crate::sync::client::adapter_chunks;
        let chunks = || adapter_chunks(Arc::new(adapter_req(1000)), PolicyVersion(1)).collect::<Vec<_>>();
        let refused = |msgs: Vec<pb::AdapterChunk>| {
            let mut a = AdapterAssembly::default();
            for m in msgs {
                if let Err(s) = a.push(m) {
                    return s.code();
                }
            }
            a.finish().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code())
        };
        let bad = tonic::Code::InvalidArgument;
        assert_eq!(refused(chunks()), tonic::Code::Ok);
        assert_eq!(refused(chunks()[1..].to_vec()), bad, "no head");
        assert_eq!(refused(Vec::new()), bad, "empty");
        let mut two_heads = chunks();
        two_heads.insert(1, two_heads[0].clone());
        assert_eq!(refused(two_heads), bad, "a second head");
        let mut short = chunks();
        short.pop();
        assert_eq!(refused(short), bad, "fewer bytes than declared");
        let mut long = chunks();
        long.push(pb::AdapterChunk {
            head: None,
            data: vec![0],
        });
        assert_eq!(refused(long), bad, "more bytes than declared");
        let mut huge = chunks();
        if let Some(h) = huge[0].head.as_mut() {
            h.adapter_bytes = MAX_ADAPTER_BYTES + 1;
        }
        assert_eq!(refused(huge[..1].to_vec()), bad, "over the sidecar's limit");
    }
}
