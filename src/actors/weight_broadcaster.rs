//! WeightBroadcaster (learner): keeps a registry of sidecars and publishes each new policy
//! version to all of them concurrently, each send in its own task under its own deadline. A
//! sidecar still busy with an older version skips to the newest when it is done, so a slow or
//! dead sidecar never delays the others; one that fails or misses a deadline is marked stale
//! and never blocks training; a periodic health check gives it a full sync of the newest
//! version once it answers again (or the next version, when the newest was lent and is gone).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::engine::PolicyVersion;
use crate::lock::recover;
use crate::rpc::auth::Token;
use crate::rpc::tls::Tls;
use crate::sync::client::{Deadlines, Published, SidecarClient, SyncError};
use crate::sync::WeightSet;

/// What a version is published as.
pub enum Payload {
    /// Full weights over the gRPC stream.
    Weights(Arc<WeightSet>),
    /// An HF checkpoint directory the sidecar reloads from (checkpoint mode).
    Checkpoint(String),
    /// A LoRA adapter version, PEFT's files as bytes (lora mode).
    Adapter(Arc<crate::rpc::pb::InstallAdapterRequest>),
    /// A PEFT adapter directory the sidecar restarts its engine with (lora-restart mode).
    AdapterCheckpoint(String),
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

impl PublishJob {
    /// Whether the payload can still be sent (lent GPU weights are void once their lease ended).
    pub fn is_current(&self) -> bool {
        match &self.payload {
            #[cfg(feature = "cuda")]
            Payload::Device(w) => w.is_current(),
            _ => true,
        }
    }

    /// Every send of lent weights is done: give the lease back.
    fn release(&self) {
        #[cfg(feature = "cuda")]
        if let Payload::Device(w) = &self.payload {
            w.release();
        }
    }
}

/// Keeps a version's lent weights lent while a send reads them; the last clone to drop gives
/// the lease back, so the optimizer waits for the slowest healthy send and no longer.
pub struct Hold(Arc<PublishJob>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// How one send to one sidecar ended.
pub enum Outcome {
    Published(Published),
    /// A communicator was made, but the lent weights were gone by then: the sidecar gets the
    /// next version.
    Connected,
    Failed(String),
}

/// The newest job, overwritten by the learner; a slow sync therefore skips stale versions.
pub type LatestSlot = Arc<Mutex<Option<Arc<PublishJob>>>>;

/// Makes `job` the newest one in `slot` (overwriting an older one not yet taken).
pub fn put_latest(slot: &LatestSlot, job: PublishJob) {
    *recover(slot) = Some(Arc::new(job));
}

/// Sync measurements the learner copies into its step records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncStats {
    /// Newest version every healthy sidecar acknowledged.
    pub engine_version: Option<u64>,
    pub sync_time_s: f64,
    pub sync_bytes: u64,
    pub stale_sidecars: usize,
    pub synced_sidecars: usize,
    /// The newest publication's logprob canary (largest over the sidecars that checked one).
    pub canary_max_abs_diff: Option<f64>,
    /// Every known sidecar (its gRPC address) and the version it holds (none while stale or
    /// new), for `/endpoints`.
    pub sidecars: BTreeMap<String, Option<u64>>,
}

pub enum BroadcasterMsg {
    /// A new job is in the slot.
    Publish,
    /// Add a sidecar (from `--sidecar` or a RegisterSidecar call); replies with the version it
    /// will receive.
    AddSidecar(String, Option<RpcReplyPort<u64>>),
    /// Periodic: retry stale sidecars.
    Tick,
    /// Replies once every send in flight has ended and every stale sidecar has been checked at
    /// once (one that answers gets the newest version first); used at shutdown, bounded by the
    /// caller.
    Flush(RpcReplyPort<()>),
    /// A send task ended (internal).
    Sent(String, Outcome, Link),
    /// A stale sidecar's health check ended: whether it answered (internal).
    Checked(String, bool),
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
    /// How weights reach it; `None` while a send task owns it.
    link: Option<Link>,
    /// A health check of it is running.
    checking: bool,
    /// Dialled in with RegisterSidecar (not a --sidecar): forgotten once dead long enough.
    registered: bool,
    /// When it last became stale.
    stale_since: Option<std::time::Instant>,
    /// No health check (and so no full sync) before this: failures in a row back off, so a
    /// sidecar that answers health but fails every update does not get the model every second.
    retry_at: Option<std::time::Instant>,
    /// A flush waits for this stale sidecar's health check (and, if it answers, its full sync).
    flush_check: bool,
}

impl Entry {
    /// Starts a health check of this sidecar in its own task (a sidecar that hangs costs its own
    /// RPC deadline); the answer comes back as `Checked`.
    fn check_health(&mut self, addr: &str, myself: &ActorRef<BroadcasterMsg>) {
        self.checking = true;
        let (client, addr, me) = (self.client.clone(), addr.to_string(), myself.clone());
        tokio::spawn(async move {
            let ok = client.health().await.is_ok();
            let _ = me.cast(BroadcasterMsg::Checked(addr, ok));
        });
    }
}

/// The wait before retrying a sidecar after `failures` failed sends in a row: 0 s after the
/// first, then 2, 4, ... up to 60 s.
fn retry_delay(failures: u64) -> Duration {
    if failures <= 1 {
        Duration::ZERO
    } else {
        Duration::from_secs(1u64 << (failures - 1).min(6)).min(Duration::from_secs(60))
    }
}

/// How weights reach one sidecar.
#[derive(Default)]
pub struct Link {
    /// The sidecar said it has no NCCL: always the gRPC stream.
    #[cfg(feature = "cuda")]
    grpc_only: bool,
    /// The live communicator with this sidecar, if any.
    #[cfg(feature = "cuda")]
    comm: Option<crate::comm::nccl::Communicator>,
    /// Whether the sidecar takes CUDA IPC (its vLLM is on our GPU).
    #[cfg(feature = "cuda")]
    ipc: IpcLink,
    /// Who the communicator's other ranks are (the sidecar, or its vLLM's workers).
    #[cfg(feature = "cuda")]
    peer: Option<crate::sync::nccl_publish::Peer>,
}

/// Whether a sidecar is served over CUDA IPC.
#[cfg(feature = "cuda")]
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum IpcLink {
    /// Not asked yet (its Info says).
    #[default]
    Unknown,
    /// It takes IPC; `proven` once one install worked (later failures are then transient).
    Yes { proven: bool },
    /// It does not, or the first install failed (another GPU): NCCL or the gRPC stream.
    No,
}

pub struct WeightBroadcaster;

/// Start-up arguments.
pub struct BroadcasterArgs {
    pub sidecars: Vec<String>,
    pub token: Token,
    /// TLS for `https://` sidecars.
    pub tls: Tls,
    pub deadlines: Deadlines,
    pub bucket_bytes: u64,
    /// NCCL buckets (groups of whole tensors).
    pub nccl_bucket_bytes: u64,
    pub slot: LatestSlot,
    pub stats: Arc<Mutex<SyncStats>>,
    pub health_every: Duration,
    /// A registered sidecar stale this long is dropped (it may register again).
    pub forget_after: Duration,
}

pub struct BroadcasterState {
    args: BroadcasterArgs,
    sidecars: BTreeMap<String, Entry>,
    latest: Option<Arc<PublishJob>>,
    /// The newest version's hold, while sends of it run.
    hold: Weak<Hold>,
    flushes: Vec<RpcReplyPort<()>>,
}

async fn send(
    client: SidecarClient,
    job: Arc<PublishJob>,
    bucket_bytes: u64,
    link: Link,
    hold: Arc<Hold>,
) -> (Outcome, Link) {
    match &job.payload {
        // Only lent GPU weights need the hold.
        Payload::Weights(set) => {
            drop(hold);
            (
                published(client.publish(set.clone(), job.version, bucket_bytes).await),
                link,
            )
        }
        Payload::Checkpoint(path) => {
            drop(hold);
            (published(client.load_checkpoint(path, job.version, false).await), link)
        }
        Payload::AdapterCheckpoint(path) => {
            drop(hold);
            (published(client.load_checkpoint(path, job.version, true).await), link)
        }
        Payload::Adapter(req) => {
            drop(hold);
            (published(client.install_adapter(req.clone(), job.version).await), link)
        }
        #[cfg(feature = "cuda")]
        Payload::Device(weights) => send_device(&client, job.version, weights, bucket_bytes, link, hold).await,
    }
}

/// How a publication over the gRPC stream or a reload ended.
fn published(r: Result<Published, SyncError>) -> Outcome {
    match r {
        Ok(p) => Outcome::Published(p),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Sends GPU weights: over CUDA IPC where the sidecar shares this GPU, else over NCCL (making
/// the communicator first), else copied to the host for the gRPC stream. The lent weights are
/// held only while a transfer reads them.
#[cfg(feature = "cuda")]
async fn send_device(
    client: &SidecarClient,
    version: PolicyVersion,
    weights: &Arc<crate::sync::nccl_publish::PackedWeights>,
    bucket_bytes: u64,
    mut link: Link,
    hold: Arc<Hold>,
) -> (Outcome, Link) {
    use crate::sync::nccl_publish::{connect, publish, NcclPublishError};
    if link.ipc == IpcLink::Unknown || link.peer.is_none() {
        if let Err(e) = learn_link(client, weights, &mut link).await {
            return (Outcome::Failed(e.to_string()), link);
        }
    }
    let peer = link.peer.unwrap_or(crate::sync::nccl_publish::Peer::Sidecar);
    if let IpcLink::Yes { proven } = link.ipc {
        let result = crate::sync::ipc_publish::publish(client, weights.clone(), version).await;
        drop(hold);
        return ipc_outcome(client, result, proven, link);
    }
    let mut hold = Some(hold);
    if !link.grpc_only && link.comm.is_none() {
        // Making a communicator may take long: the lent weights are not held meanwhile.
        let weak = hold.take().map(|h| Arc::downgrade(&h));
        match connect(client, weights.gpu, peer).await {
            Ok(comm) => link.comm = Some(comm),
            Err(NcclPublishError::Unsupported(why)) => {
                tracing::info!(sidecar = %client.addr, reason = %why, "no NCCL with this sidecar: using the gRPC stream");
                link.grpc_only = true;
            }
            Err(e) => return (Outcome::Failed(format!("nccl: {e}")), link),
        }
        hold = weak.and_then(|w| w.upgrade());
        if hold.is_none() {
            return (Outcome::Connected, link);
        }
    }
    if link.grpc_only {
        let set = weights.cpu_set();
        drop(hold);
        return match set {
            Ok(set) => (published(client.publish(set, version, bucket_bytes).await), link),
            Err(e) => (
                Outcome::Failed(format!("copying the weights for the gRPC stream: {e}")),
                link,
            ),
        };
    }
    let Some(comm) = link.comm.take() else {
        return (Outcome::Failed("no NCCL communicator".into()), link);
    };
    let (result, comm) = publish(client, comm, weights.clone(), version, peer).await;
    drop(hold);
    nccl_outcome(client, result, comm, peer)
}

/// How an NCCL publication ended, and the link to keep: a wedged or dead peer's communicator
/// is dropped (a new one is made when the sidecar answers again).
#[cfg(feature = "cuda")]
fn nccl_outcome(
    client: &SidecarClient,
    result: Result<Published, crate::sync::nccl_publish::NcclPublishError>,
    comm: Option<crate::comm::nccl::Communicator>,
    peer: crate::sync::nccl_publish::Peer,
) -> (Outcome, Link) {
    use crate::sync::nccl_publish::NcclPublishError;
    match result {
        Ok(p) => (
            Outcome::Published(p),
            Link {
                grpc_only: false,
                comm,
                ipc: IpcLink::No,
                peer: Some(peer),
            },
        ),
        Err(e @ (NcclPublishError::Wedged(_) | NcclPublishError::PeerDead)) => {
            tracing::error!(sidecar = %client.addr, error = %e,
                "NCCL send ended early; a new communicator is made when the sidecar answers again");
            (
                Outcome::Failed(format!("nccl: {e}")),
                Link {
                    grpc_only: false,
                    comm: None,
                    ipc: IpcLink::No,
                    peer: Some(peer),
                },
            )
        }
        Err(e) => (
            Outcome::Failed(format!("nccl: {e}")),
            Link {
                grpc_only: false,
                comm,
                ipc: IpcLink::No,
                peer: Some(peer),
            },
        ),
    }
}

/// Asks the sidecar (its Info) whether it takes CUDA IPC, and who NCCL would reach: the
/// sidecar, or its vLLM's ranks (vLLM's packed-receive buffer is then our bucket size).
#[cfg(feature = "cuda")]
async fn learn_link(
    client: &SidecarClient,
    weights: &crate::sync::nccl_publish::PackedWeights,
    link: &mut Link,
) -> Result<(), SyncError> {
    use crate::sync::nccl_publish::Peer;
    let info = client.info().await?;
    link.ipc = if info.ipc {
        IpcLink::Yes { proven: false }
    } else {
        IpcLink::No
    };
    link.peer = Some(match info.vllm_nccl_world {
        w if w >= 2 => Peer::Vllm {
            world: w,
            buffer_bytes: weights.plan().bucket_bytes,
        },
        _ => Peer::Sidecar,
    });
    Ok(())
}

/// How a CUDA IPC send ended. A first install that fails (vLLM on another GPU, say) turns IPC
/// off for this sidecar; after one worked, a failure is taken as transient.
#[cfg(feature = "cuda")]
fn ipc_outcome(
    client: &SidecarClient,
    result: Result<Published, crate::sync::ipc_publish::IpcPublishError>,
    proven: bool,
    mut link: Link,
) -> (Outcome, Link) {
    match result {
        Ok(p) => {
            link.ipc = IpcLink::Yes { proven: true };
            (Outcome::Published(p), link)
        }
        Err(e) => {
            if !proven {
                tracing::warn!(sidecar = %client.addr, error = %e,
                    "the first CUDA IPC install failed (is its vLLM on another GPU?): using NCCL or the gRPC stream");
                link.ipc = IpcLink::No;
            }
            (Outcome::Failed(format!("ipc: {e}")), link)
        }
    }
}

impl BroadcasterState {
    fn add(&mut self, addr: String, registered: bool) -> Result<(), SyncError> {
        if !self.sidecars.contains_key(&addr) {
            let client = SidecarClient::with_tls(&addr, self.args.token.clone(), self.args.deadlines, &self.args.tls)?;
            tracing::info!(sidecar = %addr, "sidecar added");
            self.sidecars.insert(
                addr,
                Entry {
                    client,
                    status: Status::New,
                    failures: 0,
                    link: Some(Link::default()),
                    checking: false,
                    registered,
                    stale_since: None,
                    retry_at: None,
                    flush_check: false,
                },
            );
            self.record(0.0, 0, None);
        }
        Ok(())
    }

    /// The hold for `job`: the running one when sends of it are in flight, a new one when it
    /// can still be sent, none when its lent weights are gone.
    fn hold_for(&mut self, job: &Arc<PublishJob>) -> Option<Arc<Hold>> {
        if let Some(h) = self.hold.upgrade().filter(|h| Arc::ptr_eq(&h.0, job)) {
            return Some(h);
        }
        if !job.is_current() {
            return None;
        }
        let h = Arc::new(Hold(job.clone()));
        self.hold = Arc::downgrade(&h);
        Some(h)
    }

    /// Starts a send of `job` to each named sidecar that is not busy (a busy one catches up
    /// when its send ends). Returns without waiting for them.
    async fn dispatch(&mut self, job: Arc<PublishJob>, targets: Vec<String>, myself: &ActorRef<BroadcasterMsg>) {
        let targets: Vec<String> = targets
            .into_iter()
            .filter(|a| self.sidecars.get(a).is_some_and(|e| e.link.is_some()))
            .collect();
        if targets.is_empty() {
            return;
        }
        let Some(hold) = self.hold_for(&job) else {
            // Lent weights already changed: these sidecars get the next version.
            for a in &targets {
                if let Some(e) = self.sidecars.get_mut(a) {
                    e.status = Status::New;
                }
            }
            return;
        };
        #[cfg(feature = "cuda")]
        if let Payload::Device(w) = &job.payload {
            // The gRPC stream's CPU copy of lent weights is taken while they are held.
            let grpc = targets.iter().any(|a| {
                self.sidecars
                    .get(a)
                    .and_then(|e| e.link.as_ref())
                    .is_some_and(|l| l.grpc_only)
            });
            if grpc {
                let w = w.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || w.cpu_set().map(|_| ())).await {
                    tracing::warn!(error = %e, "cannot copy the weights for the gRPC stream");
                }
            }
        }
        for addr in targets {
            let Some(e) = self.sidecars.get_mut(&addr) else {
                continue;
            };
            let Some(link) = e.link.take() else { continue };
            let bytes = match &job.payload {
                #[cfg(feature = "cuda")]
                Payload::Device(_) if !link.grpc_only => self.args.nccl_bucket_bytes,
                _ => self.args.bucket_bytes,
            };
            let (client, job, hold, me) = (e.client.clone(), job.clone(), hold.clone(), myself.clone());
            tokio::spawn(async move {
                let (outcome, link) = send(client, job, bytes, link, hold).await;
                if me.cast(BroadcasterMsg::Sent(addr.clone(), outcome, link)).is_err() {
                    tracing::debug!(sidecar = %addr, "broadcaster stopped before a send ended");
                }
            });
        }
    }

    /// Records how a send ended; a sidecar that is behind gets the newest version.
    async fn sent(&mut self, addr: String, outcome: Outcome, link: Link, myself: &ActorRef<BroadcasterMsg>) {
        let Some(entry) = self.sidecars.get_mut(&addr) else {
            return;
        };
        entry.link = Some(link);
        let prom = crate::telemetry::prom::learner();
        let (seconds, bytes, canary) = match outcome {
            Outcome::Published(p) => {
                let phases: Vec<(&str, f64)> = std::iter::once(("total", p.seconds))
                    .chain(p.phases.iter().copied())
                    .collect();
                prom.observe_send("published", &phases, p.bytes);
                entry.status = Status::Synced(p.version);
                entry.failures = 0;
                entry.retry_at = None;
                tracing::info!(sidecar = %addr, version = p.version.0, bytes = p.bytes, seconds = p.seconds,
                    canary_max_abs_diff = p.canary_max_abs_diff, "weights published");
                (p.seconds, p.bytes, p.canary_max_abs_diff)
            }
            Outcome::Connected => {
                entry.status = Status::New;
                tracing::info!(sidecar = %addr, "communicator made; weights follow with the next version");
                (0.0, 0, None)
            }
            Outcome::Failed(e) => {
                prom.observe_send("failed", &[], 0);
                if entry.status != Status::Stale {
                    entry.stale_since = Some(std::time::Instant::now());
                }
                entry.failures += 1;
                entry.retry_at = Some(std::time::Instant::now() + retry_delay(entry.failures));
                if entry.status != Status::Stale || entry.failures == 1 {
                    tracing::warn!(sidecar = %addr, error = %e, "sync failed; sidecar marked stale, training goes on");
                }
                entry.status = Status::Stale;
                (0.0, 0, None)
            }
        };
        let behind = match (entry.status, &self.latest) {
            (Status::Synced(v), Some(job)) => job.version > v,
            (Status::New, Some(_)) => true,
            _ => false,
        };
        self.record(seconds, bytes, canary);
        if let (true, Some(job)) = (behind, self.latest.clone()) {
            self.dispatch(job, vec![addr], myself).await;
        }
        self.try_flush();
    }

    /// Answers the waiting flushes once no send is in flight and no stale sidecar a flush asked
    /// about is still being checked.
    fn try_flush(&mut self) {
        let settled = self.sidecars.values().all(|e| e.link.is_some() && !e.flush_check);
        if settled {
            for reply in self.flushes.drain(..) {
                let _ = reply.send(());
            }
        }
    }

    /// At a flush, stale sidecars are checked at once, backoff or not: one that answers gets the
    /// newest version before the flush is answered, one that does not costs its health check.
    fn check_stale_for_flush(&mut self, myself: &ActorRef<BroadcasterMsg>) {
        for (addr, e) in self.sidecars.iter_mut() {
            if e.status != Status::Stale || e.link.is_none() {
                continue;
            }
            e.flush_check = true;
            e.retry_at = None;
            if !e.checking {
                e.check_health(addr, myself);
            }
        }
    }

    /// Drops registered sidecars that stayed stale past `forget_after` (a `--sidecar` stays:
    /// it is part of the configuration and nobody would register it again).
    fn forget_dead(&mut self) {
        let limit = self.args.forget_after;
        let dead: Vec<String> = self
            .sidecars
            .iter()
            .filter(|(_, e)| {
                e.registered
                    && e.status == Status::Stale
                    && e.link.is_some()
                    && e.stale_since.is_some_and(|t| t.elapsed() >= limit)
            })
            .map(|(a, _)| a.clone())
            .collect();
        let forgot = !dead.is_empty();
        for addr in dead {
            self.sidecars.remove(&addr);
            tracing::warn!(sidecar = %addr, after_s = limit.as_secs_f64(), "registered sidecar unreachable too long: forgotten");
            crate::telemetry::prom::learner().forget_sidecar(&addr);
        }
        if forgot {
            self.record(0.0, 0, None);
        }
    }

    fn record(&self, seconds: f64, bytes: u64, canary: Option<f64>) {
        let synced: Vec<PolicyVersion> = self
            .sidecars
            .values()
            .filter_map(|e| match e.status {
                Status::Synced(v) => Some(v),
                Status::Stale | Status::New => None,
            })
            .collect();
        let mut s = recover(&self.args.stats);
        s.engine_version = synced.iter().min().map(|v| v.0);
        if bytes > 0 || seconds > 0.0 {
            s.sync_time_s = seconds;
            s.sync_bytes = bytes;
            s.canary_max_abs_diff = canary;
        }
        s.synced_sidecars = synced.len();
        s.stale_sidecars = self.sidecars.len() - synced.len();
        s.sidecars = self
            .sidecars
            .iter()
            .map(|(addr, e)| match e.status {
                Status::Synced(v) => (addr.clone(), Some(v.0)),
                Status::Stale | Status::New => (addr.clone(), None),
            })
            .collect();
        let newest = self.latest.as_ref().map(|j| j.version.0);
        for (addr, e) in &self.sidecars {
            let held = match e.status {
                Status::Synced(v) => Some(v.0),
                Status::Stale | Status::New => None,
            };
            crate::telemetry::prom::learner().sidecar_at(addr, held, newest);
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
            hold: Weak::new(),
            flushes: Vec::new(),
        };
        for addr in initial {
            state.add(addr, false)?;
        }
        myself.send_interval(state.args.health_every, || BroadcasterMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<BroadcasterMsg>,
        msg: BroadcasterMsg,
        state: &mut BroadcasterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BroadcasterMsg::Publish => {
                let job = recover(&state.args.slot).take();
                let Some(job) = job else { return Ok(()) };
                state.latest = Some(job.clone());
                let targets: Vec<String> = state
                    .sidecars
                    .iter()
                    .filter(|(_, e)| e.status != Status::Stale)
                    .map(|(a, _)| a.clone())
                    .collect();
                state.dispatch(job.clone(), targets, &myself).await;
                // With no send running, lent weights go straight back to the optimizer.
                drop(state.hold_for(&job));
            }
            BroadcasterMsg::AddSidecar(addr, reply) => {
                if let Err(e) = state.add(addr.clone(), reply.is_some()) {
                    tracing::warn!(sidecar = %addr, error = %e, "cannot add sidecar");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(state.latest.as_ref().map_or(0, |j| j.version.0));
                }
                // A newcomer gets the newest version right away.
                if let Some(job) = state.latest.clone() {
                    if state.sidecars.get(&addr).is_some_and(|e| e.status == Status::New) {
                        state.dispatch(job, vec![addr], &myself).await;
                    }
                }
            }
            BroadcasterMsg::Flush(reply) => {
                state.flushes.push(reply);
                if state.latest.is_some() {
                    state.check_stale_for_flush(&myself);
                }
                state.try_flush();
            }
            BroadcasterMsg::Sent(addr, outcome, link) => state.sent(addr, outcome, link, &myself).await,
            BroadcasterMsg::Tick => {
                if state.latest.is_none() {
                    return Ok(());
                }
                state.forget_dead();
                // Each check runs in its own task: a sidecar that hangs instead of refusing
                // costs its own RPC deadline and delays nothing else.
                for (addr, e) in state.sidecars.iter_mut() {
                    let due = e.retry_at.is_none_or(|t| t <= std::time::Instant::now());
                    if e.status == Status::Stale && e.link.is_some() && !e.checking && due {
                        e.check_health(addr, &myself);
                    }
                }
            }
            BroadcasterMsg::Checked(addr, ok) => {
                let Some(e) = state.sidecars.get_mut(&addr) else {
                    return Ok(());
                };
                e.checking = false;
                e.flush_check = false;
                if !ok || e.status != Status::Stale {
                    state.try_flush();
                    return Ok(());
                }
                let Some(job) = state.latest.clone() else {
                    state.try_flush();
                    return Ok(());
                };
                tracing::info!(sidecar = %addr, version = job.version.0, "sidecar answers again: full sync");
                crate::telemetry::prom::learner().sidecar_resyncs.inc();
                state.dispatch(job, vec![addr], &myself).await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn failures_in_a_row_back_off_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|f| retry_delay(f).as_secs()).collect();
        assert_eq!(secs, vec![0, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_delay(u64::MAX), Duration::from_secs(60));
    }
}
