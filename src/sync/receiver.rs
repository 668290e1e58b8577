//! WeightReceiver (sidecar): stages an incoming version bucket by bucket, verifies its digest
//! at commit, and has the engine swap it in between generation rounds (new requests wait for
//! the swap; requests already running finish on the weights they started with).

use std::path::PathBuf;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tch::{Device, Tensor};
use tokio::sync::watch;

use crate::engine::inference::{AdapterUpdate, Installed, IpcInstall, SharedEngine};
use crate::engine::PolicyVersion;
use crate::rpc::pb;

use super::nccl_receiver::{NcclError, NcclReceiver};
use super::plan::{check_against, check_plan, digest_bytes, unpack, Digest, PlanError};

/// Why the receiver refused an update, or lost one.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("no update in progress (BeginUpdate first)")]
    NotStarted,
    #[error("{what} of version {got} during the update to {staged}")]
    OtherVersion { what: &'static str, got: u64, staged: u64 },
    #[error("bucket {index} of {count}")]
    NoSuchBucket { index: u32, count: usize },
    #[error("bucket {index} has {got} bytes, expected {expected}")]
    BucketSize { index: u32, got: usize, expected: usize },
    #[error("bucket {0} never arrived")]
    BucketMissing(usize),
    #[error("verifying the update: {0}")]
    Verify(#[source] tokio::task::JoinError),
    #[error("digest mismatch: received {got}, learner sent {sent}")]
    Digest { got: Digest, sent: Digest },
    #[error(transparent)]
    Engine(#[from] crate::engine::inference::EngineFailure),
    #[error(transparent)]
    Nccl(#[from] NcclError),
    #[error("the unique id is not 128 bytes of hex")]
    UniqueId,
    #[error("the engine's ranks start at 1 of a world of 2 or more (asked: rank {rank} of {world})")]
    ForwardRank { rank: i32, world: i32 },
}

/// WeightReceiver's mailbox.
pub enum ReceiverMsg {
    Begin(PolicyVersion, pb::BucketPlan, RpcReplyPort<Result<(), UpdateError>>),
    Bucket(PolicyVersion, u32, Vec<u8>, RpcReplyPort<Result<(), UpdateError>>),
    Commit(PolicyVersion, Digest, RpcReplyPort<Result<Applied, UpdateError>>),
    /// Load a checkpoint directory: an HF model, or (`true`) a PEFT adapter.
    LoadCheckpoint(PolicyVersion, PathBuf, bool, RpcReplyPort<Result<(), UpdateError>>),
    /// NCCL: join the learner's communicator (unique id hex, rank, world).
    JoinNccl(String, i32, i32, RpcReplyPort<Result<(), UpdateError>>),
    /// NCCL: receive this version as the plan says.
    BeginNccl(PolicyVersion, pb::BucketPlan, RpcReplyPort<Result<(), UpdateError>>),
    /// NCCL: check the learner's GPU digest and swap the received weights in.
    /// (With the learner's canary, for an engine whose own ranks received: vLLM.)
    CommitNccl(
        PolicyVersion,
        String,
        Option<(Vec<i64>, Vec<f64>)>,
        RpcReplyPort<Result<Applied, UpdateError>>,
    ),
    /// CUDA IPC: have the engine copy this version out of the learner's GPU memory.
    InstallIpc(
        PolicyVersion,
        Box<IpcInstall>,
        RpcReplyPort<Result<Applied, UpdateError>>,
    ),
    /// LoRA: serve the base model with this adapter.
    InstallAdapter(
        PolicyVersion,
        Box<AdapterUpdate>,
        RpcReplyPort<Result<Applied, UpdateError>>,
    ),
    /// Shared mode: the learner wrote this version into the engine launch's own weights.
    ResumeShared(
        u64,
        PolicyVersion,
        Option<(Vec<i64>, Vec<f64>)>,
        RpcReplyPort<Result<Applied, UpdateError>>,
    ),
}

/// How a committed version was applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Applied {
    /// Seconds from the verified commit to the engine serving it.
    pub seconds: f64,
    pub installed: Installed,
}

struct Staging {
    version: PolicyVersion,
    plan: pb::BucketPlan,
    bytes: Vec<u8>,
    received: Vec<bool>,
}

/// What the sidecar's health check reports: the served version, and whether an update is
/// under way (announced and not yet committed or rejected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub version: PolicyVersion,
    pub updating: bool,
}

/// Where the receiver posts its [`Health`] after every message. The gRPC health check reads
/// it without going through the mailbox, so it answers at once even while a commit waits for
/// a long generation round.
pub type HealthBoard = watch::Receiver<Health>;

/// The receiver's start arguments: its engine and the sending half of its health board.
pub struct ReceiverArgs {
    pub engine: SharedEngine,
    pub health: watch::Sender<Health>,
}

impl ReceiverArgs {
    /// Arguments for a receiver of `engine`, and the board it will post its health on.
    pub fn new(engine: SharedEngine) -> (Self, HealthBoard) {
        let (health, board) = watch::channel(Health {
            version: PolicyVersion(0),
            updating: false,
        });
        (Self { engine, health }, board)
    }
}

pub struct WeightReceiver;

pub struct ReceiverState {
    engine: SharedEngine,
    version: PolicyVersion,
    staging: Option<Staging>,
    nccl: NcclReceiver,
    health: watch::Sender<Health>,
}

impl ReceiverState {
    fn post_health(&self) {
        let served = i64::try_from(self.version.0).unwrap_or(i64::MAX);
        crate::telemetry::prom::sidecar().policy_version.set(served);
        self.health.send_replace(Health {
            version: self.version,
            updating: self.staging.is_some() || self.nccl.busy(),
        });
    }

    fn begin(&mut self, version: PolicyVersion, plan: pb::BucketPlan) -> Result<(), UpdateError> {
        check_plan(&plan)?;
        check_against(&plan, self.engine.manifest())?;
        if let Some(old) = &self.staging {
            tracing::warn!(
                abandoned = old.version.0,
                new = version.0,
                "a new update replaces an unfinished one"
            );
        }
        let count = plan.bucket_count as usize;
        self.staging = Some(Staging {
            version,
            bytes: vec![0; plan.total_bytes as usize],
            received: vec![false; count],
            plan,
        });
        Ok(())
    }

    fn bucket(&mut self, version: PolicyVersion, index: u32, data: Vec<u8>) -> Result<(), UpdateError> {
        let st = self.staging.as_mut().ok_or(UpdateError::NotStarted)?;
        if st.version != version {
            return Err(UpdateError::OtherVersion {
                what: "bucket",
                got: version.0,
                staged: st.version.0,
            });
        }
        let i = index as usize;
        if i >= st.received.len() {
            return Err(UpdateError::NoSuchBucket {
                index,
                count: st.received.len(),
            });
        }
        let start = i * st.plan.bucket_bytes as usize;
        let end = (start + st.plan.bucket_bytes as usize).min(st.bytes.len());
        if data.len() != end - start {
            return Err(UpdateError::BucketSize {
                index,
                got: data.len(),
                expected: end - start,
            });
        }
        st.bytes[start..end].copy_from_slice(&data);
        st.received[i] = true;
        Ok(())
    }

    async fn commit(&mut self, version: PolicyVersion, digest: Digest) -> Result<Applied, UpdateError> {
        let st = self.staging.take().ok_or(UpdateError::NotStarted)?;
        if st.version != version {
            return Err(UpdateError::OtherVersion {
                what: "commit",
                got: version.0,
                staged: st.version.0,
            });
        }
        if let Some(missing) = st.received.iter().position(|r| !r) {
            return Err(UpdateError::BucketMissing(missing));
        }
        let started = Instant::now();
        // Digesting and unpacking a whole model is CPU work: off the async threads.
        let weights = tokio::task::spawn_blocking(move || verify_and_unpack(st, digest))
            .await
            .map_err(UpdateError::Verify)??;
        self.install(weights, version, started).await
    }

    async fn install(
        &mut self,
        weights: Vec<(String, Tensor)>,
        version: PolicyVersion,
        started: Instant,
    ) -> Result<Applied, UpdateError> {
        let installed = self.engine.install(weights, version).await?;
        self.version = version;
        Ok(Applied {
            seconds: started.elapsed().as_secs_f64(),
            installed,
        })
    }

    async fn commit_nccl(&mut self, version: PolicyVersion, digest: &str) -> Result<Applied, UpdateError> {
        let (weights, _) = self.nccl.finish(version, digest).await?;
        self.install(weights, version, Instant::now()).await
    }

    async fn install_ipc(&mut self, version: PolicyVersion, update: IpcInstall) -> Result<Applied, UpdateError> {
        check_ipc_against(&update.export.tensors, self.engine.manifest())?;
        let started = Instant::now();
        let result = self.engine.install_ipc(update, version).await;
        self.settle(version, started, result).await
    }

    /// Records how an install straight into the engine's own memory ended: the new version, or
    /// after a failure whatever the engine serves now (a failed update may have cost it its
    /// weights: vLLM restarts).
    async fn settle(
        &mut self,
        version: PolicyVersion,
        started: Instant,
        result: Result<Installed, crate::engine::inference::EngineFailure>,
    ) -> Result<Applied, UpdateError> {
        match result {
            Ok(installed) => {
                self.version = version;
                Ok(Applied {
                    seconds: started.elapsed().as_secs_f64(),
                    installed,
                })
            }
            Err(e) => {
                self.version = self.engine.version().await.unwrap_or(PolicyVersion(0));
                Err(e.into())
            }
        }
    }

    async fn commit_forwarded(
        &mut self,
        version: PolicyVersion,
        canary: Option<(Vec<i64>, Vec<f64>)>,
    ) -> Result<Applied, UpdateError> {
        let started = Instant::now();
        let result = self.engine.nccl_forward_commit(version, canary).await;
        self.settle(version, started, result).await
    }

    async fn install_adapter(&mut self, version: PolicyVersion, update: AdapterUpdate) -> Result<Applied, UpdateError> {
        let started = Instant::now();
        let result = self.engine.install_adapter(update, version).await;
        self.settle(version, started, result).await
    }

    async fn load_checkpoint(
        &mut self,
        version: PolicyVersion,
        path: PathBuf,
        adapter: bool,
    ) -> Result<(), UpdateError> {
        let loaded = if adapter {
            self.engine.load_adapter_checkpoint(&path, version).await
        } else {
            self.engine.load_checkpoint(&path, version).await
        };
        loaded?;
        self.version = version;
        Ok(())
    }
}

/// Forwarded NCCL: the engine's own ranks join the learner's communicator as ranks 1.. of
/// `world` (the learner asks for rank 1, the first of them).
async fn forward_join(engine: &SharedEngine, id_hex: &str, rank: i32, world: i32) -> Result<(), UpdateError> {
    let id = unique_id_bytes(id_hex).ok_or(UpdateError::UniqueId)?;
    if rank != 1 || world < 2 {
        return Err(UpdateError::ForwardRank { rank, world });
    }
    Ok(engine.nccl_forward_join(id, world).await?)
}

/// An ncclUniqueId from its 256 hex digits.
fn unique_id_bytes(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim();
    if hex.len() != 256 || !hex.is_ascii() {
        return None;
    }
    (0..128)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Forwarded NCCL: the engine gets ready to receive the plan's tensors (vLLM's packed chunks
/// past the plan's bucket size).
async fn forward_begin(engine: &SharedEngine, version: PolicyVersion, plan: pb::BucketPlan) -> Result<(), UpdateError> {
    let tensors = plan
        .tensors
        .iter()
        .map(|t| {
            let dtype = crate::engine::vllm_transfer::IpcDtype::parse(&t.dtype).ok_or_else(|| PlanError::Dtype {
                name: t.name.clone(),
                dtype: t.dtype.clone(),
            })?;
            Ok(crate::engine::inference::NamedTensor {
                name: t.name.clone(),
                dtype,
                shape: t.shape.clone(),
            })
        })
        .collect::<Result<Vec<_>, PlanError>>()?;
    Ok(engine.nccl_forward_begin(version, tensors, plan.bucket_bytes).await?)
}

/// An IPC update must name exactly the engine's tensors, with their shapes: vLLM processes a
/// module that gets only some of its weights with the rest uninitialized.
fn check_ipc_against(
    tensors: &[crate::engine::vllm_transfer::IpcTensor],
    manifest: &[(String, Vec<i64>)],
) -> Result<(), PlanError> {
    let mut sent: std::collections::BTreeMap<&str, &[i64]> = std::collections::BTreeMap::new();
    for t in tensors {
        if sent.insert(t.name.as_str(), t.shape.as_slice()).is_some() {
            return Err(PlanError::Twice(t.name.clone()));
        }
    }
    for (name, shape) in manifest {
        match sent.remove(name.as_str()) {
            None => return Err(PlanError::Missing(name.clone())),
            Some(s) if s != shape.as_slice() => {
                return Err(PlanError::Mismatch {
                    name: name.clone(),
                    sent: s.to_vec(),
                    served: shape.clone(),
                })
            }
            Some(_) => {}
        }
    }
    match sent.keys().next() {
        Some(extra) => Err(PlanError::Unknown((*extra).to_owned())),
        None => Ok(()),
    }
}

/// Checks the staged stream against the learner's digest and cuts it into tensors.
fn verify_and_unpack(st: Staging, digest: Digest) -> Result<Vec<(String, Tensor)>, UpdateError> {
    let got = digest_bytes(&st.bytes);
    if got != digest {
        return Err(UpdateError::Digest { got, sent: digest });
    }
    Ok(unpack(&st.plan, &st.bytes)?)
}

impl Actor for WeightReceiver {
    type Msg = ReceiverMsg;
    type State = ReceiverState;
    type Arguments = ReceiverArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ReceiverMsg>,
        args: ReceiverArgs,
    ) -> Result<ReceiverState, ActorProcessingErr> {
        let ReceiverArgs { engine, health } = args;
        let version = engine.served().await?.version;
        let nccl = NcclReceiver::new(engine.nccl_device().unwrap_or(Device::Cpu));
        let state = ReceiverState {
            engine,
            version,
            staging: None,
            nccl,
            health,
        };
        state.post_health();
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ReceiverMsg>,
        msg: ReceiverMsg,
        state: &mut ReceiverState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReceiverMsg::Begin(v, plan, reply) => {
                let _ = reply.send(state.begin(v, plan));
            }
            ReceiverMsg::Bucket(v, i, data, reply) => {
                let _ = reply.send(state.bucket(v, i, data));
            }
            ReceiverMsg::Commit(v, digest, reply) => {
                let result = state.commit(v, digest).await;
                log_commit(v, "grpc", &result);
                let _ = reply.send(result);
            }
            ReceiverMsg::LoadCheckpoint(v, path, adapter, reply) => {
                let result = state.load_checkpoint(v, path, adapter).await;
                report_checkpoint(v, &result);
                let _ = reply.send(result);
            }
            ReceiverMsg::JoinNccl(id, rank, world, reply) => {
                let result = if state.engine.forwards_nccl() {
                    forward_join(&state.engine, &id, rank, world).await
                } else {
                    state.nccl.join(&id, rank, world).map_err(UpdateError::from)
                };
                let _ = reply.send(result);
            }
            ReceiverMsg::BeginNccl(v, plan, reply) => {
                let result = match check_against(&plan, state.engine.manifest()) {
                    Ok(()) if state.engine.forwards_nccl() => forward_begin(&state.engine, v, plan).await,
                    Ok(()) => state.nccl.begin(v, plan).await.map_err(UpdateError::from),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(result);
            }
            ReceiverMsg::CommitNccl(v, digest, canary, reply) => {
                let result = if state.engine.forwards_nccl() {
                    state.commit_forwarded(v, canary).await
                } else {
                    state.commit_nccl(v, &digest).await
                };
                log_commit(v, "nccl", &result);
                let _ = reply.send(result);
            }
            ReceiverMsg::InstallIpc(v, update, reply) => {
                let result = state.install_ipc(v, *update).await;
                report_install(v, "ipc", &result);
                let _ = reply.send(result);
            }
            ReceiverMsg::ResumeShared(launch, v, canary, reply) => {
                let started = Instant::now();
                let result = state.engine.shared_resume(launch, v, canary).await;
                let result = state.settle(v, started, result).await;
                report_install(v, "shared", &result);
                let _ = reply.send(result);
            }
            ReceiverMsg::InstallAdapter(v, update, reply) => {
                let result = state.install_adapter(v, *update).await;
                report_install(v, "adapter", &result);
                let _ = reply.send(result);
            }
        }
        state.post_health();
        Ok(())
    }
}

/// Logs how a streamed commit ended (the gRPC service counts it).
fn log_commit(v: PolicyVersion, transport: &'static str, result: &Result<Applied, UpdateError>) {
    match result {
        Ok(a) => tracing::info!(
            version = v.0,
            apply_s = a.seconds,
            transport,
            canary_max_abs_diff = a.installed.canary_max_abs_diff,
            "weights updated"
        ),
        Err(e) => tracing::warn!(version = v.0, error = %e, transport, "update rejected"),
    }
}

/// Logs and counts how a checkpoint reload ended.
fn report_checkpoint(v: PolicyVersion, result: &Result<(), UpdateError>) {
    if let Err(e) = result {
        tracing::warn!(version = v.0, error = %e, "checkpoint load failed");
    }
    let outcome = if result.is_ok() {
        "checkpoint_loaded"
    } else {
        "checkpoint_refused"
    };
    crate::telemetry::prom::sidecar()
        .weight_updates
        .get_or_create(&crate::telemetry::prom::Reason { reason: outcome.into() })
        .inc();
}

/// Logs and counts how an install straight into the engine ended.
fn report_install(v: PolicyVersion, transport: &'static str, result: &Result<Applied, UpdateError>) {
    let outcome = match result {
        Ok(a) => {
            tracing::info!(
                version = v.0,
                apply_s = a.seconds,
                transport,
                canary_max_abs_diff = a.installed.canary_max_abs_diff,
                "weights updated"
            );
            "installed"
        }
        Err(e) => {
            tracing::warn!(version = v.0, error = %e, transport, "update rejected");
            "refused"
        }
    };
    let prom = crate::telemetry::prom::sidecar();
    prom.weight_updates
        .get_or_create(&crate::telemetry::prom::Reason { reason: outcome.into() })
        .inc();
    if let Ok(a) = result {
        prom.apply_seconds.observe(a.seconds);
        if let Some(c) = a.installed.canary_max_abs_diff {
            prom.canary_max_abs_diff.set(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use tch::Kind;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::Tokenizer;

    use super::*;
    use crate::engine::inference::{EngineFailure, InferenceEngine, Served};
    use crate::engine::{Completion, JobParams};
    use crate::sync::WeightSet;

    /// The values of one installed version, by tensor.
    type Values = Vec<(String, Vec<f32>)>;

    /// A test double of an engine: records what it was asked to serve.
    struct FakeEngine {
        tokenizer: Arc<Tokenizer>,
        installed: Mutex<Vec<(PolicyVersion, Values)>>,
        fail_install: bool,
        manifest: Vec<(String, Vec<i64>)>,
    }

    impl FakeEngine {
        fn new(fail_install: bool) -> Arc<Self> {
            Arc::new(Self {
                tokenizer: Arc::new(Tokenizer::new(WordLevel::default())),
                installed: Mutex::new(Vec::new()),
                fail_install,
                manifest: vec![("a".into(), vec![2, 3]), ("b".into(), vec![2])],
            })
        }
    }

    #[async_trait::async_trait]
    impl InferenceEngine for FakeEngine {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn tokenizer(&self) -> &Arc<Tokenizer> {
            &self.tokenizer
        }
        fn vocab_size(&self) -> i64 {
            8
        }

        fn context_len(&self) -> usize {
            64
        }
        fn manifest(&self) -> &[(String, Vec<i64>)] {
            &self.manifest
        }
        fn nccl_device(&self) -> Option<Device> {
            None
        }
        async fn generate(&self, _p: Vec<i64>, _j: JobParams) -> Result<Vec<Completion>, EngineFailure> {
            Err(EngineFailure::Unavailable("fake".into()))
        }
        async fn install(
            &self,
            weights: Vec<(String, Tensor)>,
            version: PolicyVersion,
        ) -> Result<Installed, EngineFailure> {
            if self.fail_install {
                return Err(EngineFailure::Failed("fake engine refuses".into()));
            }
            let values = weights
                .iter()
                .map(|(n, t)| (n.clone(), Vec::<f32>::try_from(t.view([-1])).expect("values")))
                .collect();
            self.installed.lock().expect("lock").push((version, values));
            Ok(Installed {
                canary_max_abs_diff: Some(0.0),
            })
        }
        async fn load_checkpoint(&self, _dir: &Path, _v: PolicyVersion) -> Result<(), EngineFailure> {
            Err(EngineFailure::Rejected("fake".into()))
        }
        async fn served(&self) -> Result<Served, EngineFailure> {
            Ok(Served {
                version: PolicyVersion(0),
                parameters: 0,
                digest: None,
            })
        }
        async fn healthy(&self) -> bool {
            true
        }
    }

    fn state(engine: Arc<FakeEngine>) -> (ReceiverState, HealthBoard) {
        let (health, board) = watch::channel(Health {
            version: PolicyVersion(0),
            updating: false,
        });
        let st = ReceiverState {
            engine,
            version: PolicyVersion(0),
            staging: None,
            nccl: NcclReceiver::new(Device::Cpu),
            health,
        };
        (st, board)
    }

    fn weights() -> (WeightSet, pb::BucketPlan) {
        let named = vec![
            (
                "a".to_string(),
                Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]),
            ),
            ("b".to_string(), Tensor::from_slice(&[0.5f32, -1.5])),
        ];
        let set = WeightSet::pack(&named).expect("pack");
        let plan = set.plan(12);
        (set, plan)
    }

    fn send_all(st: &mut ReceiverState, set: &WeightSet, plan: &pb::BucketPlan, v: PolicyVersion) {
        for i in 0..plan.bucket_count {
            st.bucket(v, i, set.bucket(plan, i).to_vec()).expect("bucket");
        }
    }

    #[tokio::test]
    async fn a_verified_version_reaches_the_engine_and_health_follows() {
        let engine = FakeEngine::new(false);
        let (mut st, board) = state(engine.clone());
        let (set, plan) = weights();
        let v = PolicyVersion(3);
        st.begin(v, plan.clone()).expect("begin");
        st.post_health();
        assert!(board.borrow().updating, "an announced update shows in health");
        send_all(&mut st, &set, &plan, v);
        let applied = st.commit(v, set.digest()).await.expect("commit");
        st.post_health();
        assert_eq!(applied.installed.canary_max_abs_diff, Some(0.0));
        assert_eq!(
            *board.borrow(),
            Health {
                version: v,
                updating: false
            }
        );
        let installed = engine.installed.lock().expect("lock");
        assert_eq!(installed.len(), 1);
        assert_eq!(installed[0].0, v);
        assert_eq!(installed[0].1[0], ("a".to_string(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]));
        assert_eq!(installed[0].1[1], ("b".to_string(), vec![0.5, -1.5]));
    }

    #[tokio::test]
    async fn bad_digests_missing_buckets_and_stray_versions_never_reach_the_engine() {
        let engine = FakeEngine::new(false);
        let (mut st, _board) = state(engine.clone());
        let (set, plan) = weights();
        let v = PolicyVersion(1);
        // A wrong digest.
        st.begin(v, plan.clone()).expect("begin");
        send_all(&mut st, &set, &plan, v);
        let err = st.commit(v, Digest(set.digest().0 ^ 1)).await.expect_err("digest");
        assert!(matches!(err, UpdateError::Digest { .. }), "{err}");
        // A missing bucket.
        st.begin(v, plan.clone()).expect("begin");
        st.bucket(v, 0, set.bucket(&plan, 0).to_vec()).expect("bucket 0");
        let err = st.commit(v, set.digest()).await.expect_err("missing");
        assert!(matches!(err, UpdateError::BucketMissing(1)), "{err}");
        // Buckets and commits of another version; a bucket of the wrong size; no update at all.
        st.begin(v, plan.clone()).expect("begin");
        assert!(matches!(
            st.bucket(PolicyVersion(2), 0, set.bucket(&plan, 0).to_vec()),
            Err(UpdateError::OtherVersion { got: 2, staged: 1, .. })
        ));
        assert!(matches!(
            st.bucket(v, 0, vec![0; 3]),
            Err(UpdateError::BucketSize { got: 3, .. })
        ));
        assert!(matches!(
            st.bucket(v, plan.bucket_count, vec![0; 4]),
            Err(UpdateError::NoSuchBucket { .. })
        ));
        assert!(st.commit(PolicyVersion(2), set.digest()).await.is_err());
        assert!(
            st.commit(v, set.digest()).await.is_err(),
            "the stray commit ended the update"
        );
        assert_eq!(st.version, PolicyVersion(0));
        assert!(engine.installed.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn an_engine_that_fails_to_install_keeps_the_old_version() {
        let (mut st, _board) = state(FakeEngine::new(true));
        let (set, plan) = weights();
        let v = PolicyVersion(5);
        st.begin(v, plan.clone()).expect("begin");
        send_all(&mut st, &set, &plan, v);
        let err = st.commit(v, set.digest()).await.expect_err("install fails");
        assert!(
            matches!(err, UpdateError::Engine(_)) && err.to_string().contains("fake engine refuses"),
            "{err}"
        );
        assert_eq!(st.version, PolicyVersion(0));
    }

    #[test]
    fn an_update_for_another_model_is_refused_before_allocating() {
        let (mut st, _board) = state(FakeEngine::new(false));
        let other = vec![("a".to_string(), Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)))];
        let plan = WeightSet::pack(&other).expect("pack").plan(12);
        let err = st.begin(PolicyVersion(1), plan).expect_err("wrong model");
        assert!(matches!(err, UpdateError::Plan(_)), "{err}");
        assert!(st.staging.is_none(), "nothing staged");
    }
}
