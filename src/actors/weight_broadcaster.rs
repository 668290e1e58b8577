//! WeightBroadcaster (learner): keeps a registry of sidecars and publishes each new policy
//! version to all of them concurrently, each under its own deadline. A sidecar that fails or
//! misses a deadline is marked stale and never blocks training; a periodic health check gives
//! it a full sync of the newest version once it answers again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::engine::PolicyVersion;
use crate::sync::auth::Token;
use crate::sync::client::{Deadlines, Published, SidecarClient, SyncError};
use crate::sync::WeightSet;

/// What a version is published as.
pub enum Payload {
    /// Full weights over the gRPC stream.
    Weights(Arc<WeightSet>),
    /// An HF checkpoint directory the sidecar reloads from (checkpoint mode).
    Checkpoint(String),
    /// Weights packed on the learner's GPU, broadcast over NCCL (the gRPC stream for sidecars
    /// without NCCL).
    #[cfg(feature = "cuda")]
    Device(Arc<crate::sync::nccl_publish::PackedWeights>),
}

/// One version to publish.
pub struct PublishJob {
    pub version: PolicyVersion,
    pub payload: Payload,
}

/// The newest job, overwritten by the learner; a slow sync therefore skips stale versions.
pub type LatestSlot = Arc<Mutex<Option<Arc<PublishJob>>>>;

/// Sync measurements the learner copies into its step records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncStats {
    /// Newest version every healthy sidecar acknowledged.
    pub engine_version: Option<u64>,
    pub sync_time_s: f64,
    pub sync_bytes: u64,
    pub stale_sidecars: usize,
    pub synced_sidecars: usize,
}

pub enum BroadcasterMsg {
    /// A new job is in the slot.
    Publish,
    /// Add a sidecar (from `--sidecar` or a RegisterSidecar call); replies with the version it
    /// will receive.
    AddSidecar(String, Option<RpcReplyPort<u64>>),
    /// Periodic: retry stale sidecars.
    Tick,
    /// Replies once everything queued before it is published (used at shutdown).
    Flush(RpcReplyPort<()>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Just added: tried with the next publication.
    New,
    /// Holds this version.
    Synced(PolicyVersion),
    /// Failed or new: gets a full sync once healthy.
    Stale,
}

struct Entry {
    client: SidecarClient,
    status: Status,
    failures: u64,
    link: Link,
}

/// How weights reach one sidecar.
#[derive(Default)]
struct Link {
    /// The sidecar said it has no NCCL: always the gRPC stream.
    #[cfg(feature = "cuda")]
    grpc_only: bool,
    /// The live communicator with this sidecar, if any.
    #[cfg(feature = "cuda")]
    comm: Option<crate::comm::nccl::Communicator>,
}

pub struct WeightBroadcaster;

/// Start-up arguments.
pub struct BroadcasterArgs {
    pub sidecars: Vec<String>,
    pub token: Token,
    pub deadlines: Deadlines,
    pub bucket_bytes: u64,
    /// NCCL buckets (groups of whole tensors).
    pub nccl_bucket_bytes: u64,
    pub slot: LatestSlot,
    pub stats: Arc<Mutex<SyncStats>>,
    pub health_every: Duration,
}

pub struct BroadcasterState {
    args: BroadcasterArgs,
    sidecars: BTreeMap<String, Entry>,
    latest: Option<Arc<PublishJob>>,
}

async fn send(
    client: SidecarClient,
    job: Arc<PublishJob>,
    bucket_bytes: u64,
    link: Link,
) -> (Result<Published, String>, Link) {
    let text = |r: Result<Published, SyncError>| r.map_err(|e| e.to_string());
    match &job.payload {
        Payload::Weights(set) => (text(client.publish(set.clone(), job.version, bucket_bytes).await), link),
        Payload::Checkpoint(path) => (text(client.load_checkpoint(path, job.version).await), link),
        #[cfg(feature = "cuda")]
        Payload::Device(weights) => {
            use crate::sync::nccl_publish::{publish, NcclPublishError};
            if link.grpc_only {
                let set = weights.cpu_set();
                return (text(client.publish(set, job.version, bucket_bytes).await), link);
            }
            let (result, comm) = publish(&client, link.comm, weights.clone(), job.version).await;
            match result {
                Ok(p) => (Ok(p), Link { grpc_only: false, comm }),
                Err(NcclPublishError::Unsupported(why)) => {
                    tracing::info!(sidecar = %client.addr, reason = %why, "sidecar has no NCCL: using the gRPC stream");
                    let set = weights.cpu_set();
                    let r = text(client.publish(set, job.version, bucket_bytes).await);
                    (
                        r,
                        Link {
                            grpc_only: true,
                            comm: None,
                        },
                    )
                }
                Err(e @ NcclPublishError::Wedged(_)) => {
                    tracing::error!(sidecar = %client.addr, error = %e,
                        "NCCL with this sidecar is wedged; it gets the gRPC stream from now on");
                    (
                        Err(format!("nccl: {e}")),
                        Link {
                            grpc_only: true,
                            comm: None,
                        },
                    )
                }
                Err(e) => (Err(format!("nccl: {e}")), Link { grpc_only: false, comm }),
            }
        }
    }
}

impl BroadcasterState {
    fn add(&mut self, addr: String) -> Result<(), SyncError> {
        if !self.sidecars.contains_key(&addr) {
            let client = SidecarClient::new(&addr, self.args.token.clone(), self.args.deadlines)?;
            tracing::info!(sidecar = %addr, "sidecar added");
            self.sidecars.insert(
                addr,
                Entry {
                    client,
                    status: Status::New,
                    failures: 0,
                    link: Link::default(),
                },
            );
        }
        Ok(())
    }

    /// Publishes `job` to the named sidecars concurrently and records the outcome.
    async fn publish_to(&mut self, job: Arc<PublishJob>, targets: Vec<String>) {
        if targets.is_empty() {
            return;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for addr in &targets {
            if let Some(e) = self.sidecars.get_mut(addr) {
                let bytes = match &job.payload {
                    #[cfg(feature = "cuda")]
                    Payload::Device(_) if !e.link.grpc_only => self.args.nccl_bucket_bytes,
                    _ => self.args.bucket_bytes,
                };
                let (client, job) = (e.client.clone(), job.clone());
                let link = std::mem::take(&mut e.link);
                let addr = addr.clone();
                tasks.spawn(async move {
                    let (result, link) = send(client, job, bytes, link).await;
                    (addr, result, link)
                });
            }
        }
        let (mut seconds, mut bytes) = (0f64, 0u64);
        while let Some(done) = tasks.join_next().await {
            let Ok((addr, result, link)) = done else { continue };
            let Some(entry) = self.sidecars.get_mut(&addr) else {
                continue;
            };
            entry.link = link;
            match result {
                Ok(p) => {
                    seconds = seconds.max(p.seconds);
                    bytes += p.bytes;
                    entry.status = Status::Synced(p.version);
                    entry.failures = 0;
                    tracing::info!(sidecar = %addr, version = p.version.0, bytes = p.bytes, seconds = p.seconds, "weights published");
                }
                Err(e) => {
                    entry.failures += 1;
                    if entry.status != Status::Stale || entry.failures == 1 {
                        tracing::warn!(sidecar = %addr, error = %e, "sync failed; sidecar marked stale, training goes on");
                    }
                    entry.status = Status::Stale;
                }
            }
        }
        self.record(seconds, bytes);
    }

    fn record(&self, seconds: f64, bytes: u64) {
        let synced: Vec<PolicyVersion> = self
            .sidecars
            .values()
            .filter_map(|e| match e.status {
                Status::Synced(v) => Some(v),
                Status::Stale | Status::New => None,
            })
            .collect();
        if let Ok(mut s) = self.args.stats.lock() {
            s.engine_version = synced.iter().min().map(|v| v.0);
            if bytes > 0 || seconds > 0.0 {
                s.sync_time_s = seconds;
                s.sync_bytes = bytes;
            }
            s.synced_sidecars = synced.len();
            s.stale_sidecars = self.sidecars.len() - synced.len();
        }
    }
}

impl Actor for WeightBroadcaster {
    type Msg = BroadcasterMsg;
    type State = BroadcasterState;
    type Arguments = BroadcasterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<BroadcasterMsg>,
        args: BroadcasterArgs,
    ) -> Result<BroadcasterState, ActorProcessingErr> {
        let initial = args.sidecars.clone();
        let mut state = BroadcasterState {
            args,
            sidecars: BTreeMap::new(),
            latest: None,
        };
        for addr in initial {
            state.add(addr)?;
        }
        myself.send_interval(state.args.health_every, || BroadcasterMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<BroadcasterMsg>,
        msg: BroadcasterMsg,
        state: &mut BroadcasterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BroadcasterMsg::Publish => {
                let job = state.args.slot.lock().ok().and_then(|mut s| s.take());
                let Some(job) = job else { return Ok(()) };
                state.latest = Some(job.clone());
                let targets: Vec<String> = state
                    .sidecars
                    .iter()
                    .filter(|(_, e)| e.status != Status::Stale)
                    .map(|(a, _)| a.clone())
                    .collect();
                state.publish_to(job, targets).await;
            }
            BroadcasterMsg::AddSidecar(addr, reply) => {
                if let Err(e) = state.add(addr.clone()) {
                    tracing::warn!(sidecar = %addr, error = %e, "cannot add sidecar");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(state.latest.as_ref().map_or(0, |j| j.version.0));
                }
                // A newcomer gets the newest version right away.
                if let Some(job) = state.latest.clone() {
                    if state.sidecars.get(&addr).is_some_and(|e| e.status == Status::New) {
                        state.publish_to(job, vec![addr]).await;
                    }
                }
            }
            BroadcasterMsg::Flush(reply) => {
                let _ = reply.send(());
            }
            BroadcasterMsg::Tick => {
                let Some(job) = state.latest.clone() else { return Ok(()) };
                let mut healthy = Vec::new();
                for (addr, e) in &state.sidecars {
                    if e.status == Status::Stale && e.client.health().await.is_ok() {
                        healthy.push(addr.clone());
                    }
                }
                for addr in &healthy {
                    tracing::info!(sidecar = %addr, version = job.version.0, "sidecar answers again: full sync");
                }
                state.publish_to(job, healthy).await;
            }
        }
        Ok(())
    }
}
