//! The learner's half of NCCL weight sync for one sidecar: make a communicator (the learner is
//! rank 0 and creates the unique id; the sidecar gets it over gRPC and joins), announce the
//! plan, broadcast the packed weights bucket by bucket from the GPU, and commit with the GPU
//! digest. Any
//! failure or missed deadline drops the communicator (aborting it); the next full sync makes a
//! new one. A sidecar without NCCL answers JoinNccl with `Unimplemented`, and a pair NCCL
//! refuses to connect (both ranks on one GPU) fails its join with an NCCL error: such a sidecar
//! is then served over the gRPC stream.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::CudaEvent;
use tch::{Device, Kind, Tensor};

use crate::comm::nccl::{deadline_for, device_context, mark_torch_stream, new_unique_id, Communicator};
use crate::comm::CommError;
use crate::engine::PolicyVersion;
use crate::lock::recover;
use crate::rpc::pb;

use super::client::{Published, SidecarClient, SyncError};
use super::gpu_digest::GpuDigest;
use super::nccl_sync::device_plan;
use super::packing::{flat_buffer, pack_into, PackLayout};
use super::plan::WeightSet;
use crate::engine::vllm_transfer::{vllm_nccl_chunks, IpcDtype, IpcExport, IpcTensor};
use crate::train::lease::Lease;

/// How far the packing got: an event per packed bucket, or why it stopped.
#[derive(Default)]
struct Progress {
    ready: Vec<CudaEvent>,
    /// The last event in `ready` covers every bucket (lent weights: nothing to pack).
    whole: bool,
    failed: Option<String>,
}

/// One version's weights on the learner's GPU for NCCL (see [`super::nccl_sync`]), in one of
/// two ways:
/// - packed: a buffer is allocated first; [`PackedWeights::pack_from`] then queues the packing
///   copies and marks each bucket ready as its copies are queued, while a sender on another
///   thread already broadcasts the buckets that are ready;
/// - lent ([`PackedWeights::lend`]): the learner's live flat buffer already is the packed
///   layout, so the buckets are sent from it without a copy, under a [`Lease`] that holds the
///   next optimizer update until [`PackedWeights::release`]. Once the lease ended these
///   weights are void: sending or a CPU copy is refused.
///
/// A CPU packing for sidecars served over the gRPC stream is made on demand.
pub struct PackedWeights {
    names: Vec<(String, Vec<i64>)>,
    layout: PackLayout,
    wire: Kind,
    flat: Mutex<Tensor>,
    progress: Mutex<Progress>,
    packed: Condvar,
    cpu: OnceLock<Arc<WeightSet>>,
    lease: Option<Arc<Lease>>,
    /// The learner's logprobs of canary tokens on these weights (CUDA IPC sends them along).
    canary: OnceLock<(Vec<i64>, Vec<f64>)>,
    /// The learner's CUDA device index.
    pub gpu: usize,
}

impl PackedWeights {
    /// Allocates the packed buffer for `tensors` (on CUDA device `gpu`) in buckets of about
    /// `bucket_bytes`, in their dtype when it is bf16 or fp32 (bf16 otherwise).
    pub fn new(tensors: &[(String, Tensor)], gpu: usize, bucket_bytes: u64) -> Self {
        let wire = match tensors.first().map(|(_, t)| t.kind()) {
            Some(Kind::Float) => Kind::Float,
            _ => Kind::BFloat16,
        };
        let (names, layout) = plan_of(tensors, wire, bucket_bytes);
        let flat = flat_buffer(&layout, wire, Device::Cuda(gpu));
        Self {
            names,
            layout,
            wire,
            flat: Mutex::new(flat),
            progress: Mutex::new(Progress::default()),
            packed: Condvar::new(),
            cpu: OnceLock::new(),
            lease: None,
            canary: OnceLock::new(),
            gpu,
        }
    }

    /// The live weights, lent: `flat` holds `tensors` back to back in plan order, in a wire
    /// dtype (the bf16 high halves of split masters). Nothing is copied; the buckets are views
    /// of `flat`, ready once the work tch queued so far (the update that made this version)
    /// has run. The caller hands `lease` to the writer of `flat` (the trainer), whose next
    /// update waits for it.
    pub fn lend(
        tensors: &[(String, Tensor)],
        flat: &Tensor,
        gpu: usize,
        bucket_bytes: u64,
        lease: Arc<Lease>,
    ) -> Result<Self, CommError> {
        let wire = flat.kind();
        let (names, layout) = plan_of(tensors, wire, bucket_bytes);
        if !matches!(wire, Kind::BFloat16 | Kind::Float)
            || flat.numel() as i64 != layout.total
            || flat.device() != Device::Cuda(gpu)
        {
            return Err(CommError::Cuda(format!(
                "cannot lend a flat buffer of {} {wire:?} elements on {:?} for {} elements on cuda:{gpu}",
                flat.numel(),
                flat.device(),
                layout.total
            )));
        }
        let ctx = device_context(gpu)?;
        let ready = mark_torch_stream(&ctx)?;
        Ok(Self {
            names,
            layout,
            wire,
            flat: Mutex::new(flat.shallow_clone()),
            progress: Mutex::new(Progress {
                ready: vec![ready],
                whole: true,
                failed: None,
            }),
            packed: Condvar::new(),
            cpu: OnceLock::new(),
            lease: Some(lease),
            canary: OnceLock::new(),
            gpu,
        })
    }

    /// Whether these weights may still be read: always for a packed copy; for lent weights,
    /// until the lease ended.
    pub fn is_current(&self) -> bool {
        self.lease.as_ref().is_none_or(|l| l.is_out())
    }

    /// Lent weights: every send that reads them has finished; the optimizer may go on.
    pub fn release(&self) {
        if let Some(l) = &self.lease {
            l.give_back();
        }
    }

    fn void() -> CommError {
        CommError::Cuda("the lent weights changed (a newer version exists); this version is void".into())
    }

    /// Queues the copies of `tensors` (the same ones, in order, as given to `new`) into the
    /// buffer on tch's stream. Call it on the thread whose CUDA work changes the tensors (the
    /// model thread): the copies are queued before any later update, so they see this version.
    pub fn pack_from(&self, tensors: &[Tensor]) -> Result<(), CommError> {
        self.settle(self.pack_inner(tensors))
    }

    /// Records a failed packing, so that a sender waiting for a bucket stops waiting.
    fn settle(&self, outcome: Result<(), CommError>) -> Result<(), CommError> {
        if let Err(e) = &outcome {
            recover(&self.progress).failed = Some(e.to_string());
            self.packed.notify_all();
        }
        outcome
    }

    /// Records that the next bucket's packing is queued on tch's stream, and wakes the senders.
    fn mark_ready(&self, ctx: &Arc<cudarc::driver::CudaContext>) -> Result<(), CommError> {
        let ev = mark_torch_stream(ctx)?;
        recover(&self.progress).ready.push(ev);
        self.packed.notify_all();
        Ok(())
    }

    fn pack_inner(&self, tensors: &[Tensor]) -> Result<(), CommError> {
        if tensors.len() != self.names.len() {
            return Err(CommError::Cuda(format!(
                "{} tensors to pack, the plan has {}",
                tensors.len(),
                self.names.len()
            )));
        }
        let ctx = device_context(self.gpu)?;
        let flat = self.flat.lock().map(|f| f.shallow_clone()).map_err(|_| poisoned())?;
        let mut failed = None;
        pack_into(tensors, &self.layout, &flat, |_| {
            if let Err(e) = self.mark_ready(&ctx) {
                failed.get_or_insert(e);
            }
        });
        failed.map_or(Ok(()), Err)
    }

    /// Allocates and packs in one go (on the thread that owns the tensors).
    pub fn pack(tensors: &[(String, Tensor)], gpu: usize, bucket_bytes: u64) -> Result<Self, CommError> {
        let me = Self::new(tensors, gpu, bucket_bytes);
        let values: Vec<Tensor> = tensors.iter().map(|(_, t)| t.shallow_clone()).collect();
        me.pack_from(&values)?;
        Ok(me)
    }

    /// Waits until bucket k is packed (queued), at most until `until`; returns its event.
    fn wait_bucket(&self, k: usize, until: Instant) -> Result<cudarc::driver::sys::CUevent, CommError> {
        if !self.is_current() {
            return Err(Self::void());
        }
        let mut p = self.progress.lock().map_err(|_| poisoned())?;
        loop {
            let covered = if p.whole { p.ready.last() } else { p.ready.get(k) };
            if let Some(ev) = covered {
                return Ok(ev.cu_event());
            }
            if let Some(why) = &p.failed {
                return Err(CommError::Cuda(format!("packing failed: {why}")));
            }
            let now = Instant::now();
            if now >= until {
                return Err(CommError::Deadline {
                    what: "packing",
                    secs: 0.0,
                });
            }
            p = self.packed.wait_timeout(p, until - now).map_err(|_| poisoned())?.0;
        }
    }

    /// Records the learner's canary logprobs on these weights (the first call wins).
    pub fn set_canary(&self, ids: Vec<i64>, logprobs: Vec<f64>) {
        let _ = self.canary.set((ids, logprobs));
    }

    /// The canary [`Self::set_canary`] recorded.
    pub fn canary(&self) -> Option<&(Vec<i64>, Vec<f64>)> {
        self.canary.get()
    }

    /// Waits until every bucket is packed and the copies have run on the GPU (another process
    /// reads the memory next, unordered with our stream), then describes the tensors as CUDA
    /// IPC exports them: the allocation holding the buffer, and each tensor's offset in it.
    pub fn ipc_export(&self, until: Instant) -> Result<IpcExport, CommError> {
        let cuda = |e: cudarc::driver::DriverError| CommError::Cuda(e.to_string());
        let last = self.layout.bucket_count().saturating_sub(1);
        let ev = self.wait_bucket(last, until)?;
        let ctx = device_context(self.gpu)?;
        ctx.bind_to_thread().map_err(cuda)?;
        // SAFETY: a live event of this context (held by `progress`, which outlives the call).
        unsafe { cudarc::driver::sys::cuEventSynchronize(ev) }
            .result()
            .map_err(cuda)?;
        let flat = self.flat.lock().map(|f| f.shallow_clone()).map_err(|_| poisoned())?;
        let (base, alloc_bytes) = allocation_of(flat.data_ptr() as u64)?;
        let mut handle = cudarc::driver::sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: `base` is the start of a live allocation of the bound context.
        unsafe { cudarc::driver::sys::cuIpcGetMemHandle(&mut handle, base) }
            .result()
            .map_err(cuda)?;
        let uuid = ctx.uuid().map_err(cuda)?;
        let shapes: Vec<Vec<i64>> = self.names.iter().map(|(_, s)| s.clone()).collect();
        let views = self.layout.tensor_views(&flat, &shapes);
        let dtype = if self.wire == Kind::Float {
            IpcDtype::Float32
        } else {
            IpcDtype::BFloat16
        };
        let tensors = self
            .names
            .iter()
            .zip(&views)
            .map(|((name, shape), v)| IpcTensor {
                name: name.clone(),
                dtype,
                shape: shape.clone(),
                offset_bytes: v.data_ptr() as u64 - base,
            })
            .collect();
        if !self.is_current() {
            return Err(Self::void());
        }
        Ok(IpcExport {
            gpu_uuid: crate::comm::ipc_map::uuid_text(&uuid.bytes),
            handle: handle.reserved.iter().map(|&b| b as u8).collect(),
            alloc_bytes: alloc_bytes as u64,
            tensors,
        })
    }

    /// The plan announcing these weights.
    pub fn plan(&self) -> pb::BucketPlan {
        device_plan(&self.names, self.wire, &self.layout)
    }

    /// The gRPC stream's packing of the same weights (fp32 on the CPU), once packed. Lent
    /// weights must be copied while the lease is out.
    pub fn cpu_set(&self) -> Result<Arc<WeightSet>, CommError> {
        if let Some(set) = self.cpu.get() {
            return Ok(set.clone());
        }
        let until = Instant::now() + Duration::from_secs(60);
        for k in 0..self.layout.bucket_count() {
            self.wait_bucket(k, until)?;
        }
        let flat = self.flat.lock().map_err(|_| poisoned())?;
        let shapes: Vec<Vec<i64>> = self.names.iter().map(|(_, s)| s.clone()).collect();
        let views = self.layout.tensor_views(&flat, &shapes);
        let named: Vec<(String, Tensor)> = self
            .names
            .iter()
            .zip(views)
            .map(|((n, _), v)| (n.clone(), v.to_device(Device::Cpu).to_kind(Kind::Float)))
            .collect();
        if !self.is_current() {
            return Err(Self::void());
        }
        let set = WeightSet::pack(&named).map_err(|e| CommError::Cuda(e.to_string()))?;
        Ok(self.cpu.get_or_init(|| Arc::new(set)).clone())
    }

    /// Broadcasts the buckets over `comm` (as rank 0), each as soon as it is packed; returns
    /// their digest (each bucket digested on tch's stream right behind its packing).
    pub fn broadcast(&self, comm: &mut Communicator, deadline: Duration) -> Result<String, CommError> {
        let flat = self.flat.lock().map(|f| f.shallow_clone()).map_err(|_| poisoned())?;
        let buckets = self.layout.bucket_views(&flat);
        let mut digest = GpuDigest::default();
        let mut ready = |k: usize, until: Instant| {
            let ev = self.wait_bucket(k, until)?;
            digest.add(&buckets[k]);
            Ok(ev)
        };
        comm.send_when_ready(&buckets, deadline, &mut ready)?;
        Ok(digest.finish_hex(flat.device()))
    }
}

/// The base and size of the allocation that holds device address `ptr`.
fn allocation_of(ptr: u64) -> Result<(u64, usize), CommError> {
    let (mut base, mut size) = (0u64, 0usize);
    // SAFETY: a query of the bound context's address space; both outputs are plain integers.
    unsafe { cudarc::driver::sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }
        .result()
        .map_err(|e| CommError::Cuda(format!("cuMemGetAddressRange: {e}")))?;
    Ok((base, size))
}

impl PackedWeights {
    /// Broadcasts the weights into vLLM's ranks as vLLM's packed receive expects them: uint8
    /// chunks of the tensors' concatenation, each closed after the tensor that takes it past
    /// `buffer_bytes` (see [`vllm_nccl_chunks`]); each chunk goes once the bucket holding its
    /// last byte is packed.
    pub fn broadcast_vllm(
        &self,
        comm: &mut Communicator,
        buffer_bytes: u64,
        deadline: Duration,
    ) -> Result<(), CommError> {
        let flat = self.flat.lock().map(|f| f.shallow_clone()).map_err(|_| poisoned())?;
        let elt = self.wire.elt_size_in_bytes() as u64;
        let bytes: Vec<u64> = self.layout.numels.iter().map(|&n| n as u64 * elt).collect();
        let chunks = vllm_nccl_chunks(&bytes, buffer_bytes);
        let raw = flat.view_dtype(Kind::Uint8);
        let views: Vec<Tensor> = chunks
            .iter()
            .map(|&(start, len)| raw.narrow(0, start as i64, len as i64))
            .collect();
        let per_bucket = (self.layout.bucket_elems.max(1) as u64) * elt;
        let mut ready = |k: usize, until: Instant| {
            let (start, len) = chunks[k];
            self.wait_bucket(((start + len).saturating_sub(1) / per_bucket) as usize, until)
        };
        comm.send_when_ready(&views, deadline, &mut ready)
    }
}

/// Names and shapes of `tensors`, and their layout back to back in `wire` in buckets of about
/// `bucket_bytes`.
fn plan_of(tensors: &[(String, Tensor)], wire: Kind, bucket_bytes: u64) -> (Vec<(String, Vec<i64>)>, PackLayout) {
    let numels: Vec<i64> = tensors.iter().map(|(_, t)| t.numel() as i64).collect();
    let layout = PackLayout::new(&numels, wire.elt_size_in_bytes() as u64, bucket_bytes);
    (tensors.iter().map(|(n, t)| (n.clone(), t.size())).collect(), layout)
}

fn poisoned() -> CommError {
    CommError::Nccl {
        call: "packing",
        message: "a lock was poisoned".into(),
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
    /// The send thread outlived its deadline plus a grace and was abandoned (a thread blocked
    /// inside NCCL or the driver).
    #[error("the NCCL send thread did not return within {0:.1}s and was abandoned")]
    Wedged(f64),
    /// The sidecar stopped answering its gRPC health check during the transfer (its process
    /// died): the send is cancelled at once rather than at the deadline.
    #[error("the sidecar stopped answering health checks during the transfer; send cancelled")]
    PeerDead,
}

/// How often the sidecar's health is checked during a transfer, and how many failures in a
/// row mean it is dead.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
const HEALTH_MISSES: u32 = 2;

/// Resolves once the sidecar failed [`HEALTH_MISSES`] health checks in a row.
async fn until_dead(client: &SidecarClient) {
    let mut misses = 0;
    loop {
        tokio::time::sleep(HEALTH_EVERY).await;
        if client.health().await.is_ok() {
            misses = 0;
        } else {
            misses += 1;
            if misses >= HEALTH_MISSES {
                return;
            }
        }
    }
}

/// Who receives the broadcasts of one sidecar's communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The sidecar itself (the embedded engine): rank 1 of 2, our buckets, the GPU digest.
    Sidecar,
    /// vLLM's own ranks (1..world), through our `grpo_nccl` vLLM engine: vLLM's packed
    /// chunks past `buffer_bytes`, no digest (the canary checks the install).
    Vllm { world: i32, buffer_bytes: u64 },
}

impl Peer {
    fn world(self) -> i32 {
        match self {
            Peer::Sidecar => 2,
            Peer::Vllm { world, .. } => world,
        }
    }
}

/// Publishes `weights` as `version` over NCCL to one sidecar on `comm` (made by [`connect`]);
/// returns the outcome and the communicator to keep (none after a failure).
pub async fn publish(
    client: &SidecarClient,
    comm: Communicator,
    weights: Arc<PackedWeights>,
    version: PolicyVersion,
    peer: Peer,
) -> (Result<Published, NcclPublishError>, Option<Communicator>) {
    let started = Instant::now();
    let mut plan = weights.plan();
    if let Peer::Vllm { buffer_bytes, .. } = peer {
        plan.bucket_bytes = buffer_bytes;
    }
    let bytes = plan.total_bytes;
    if let Err(e) = client.begin_nccl(version, plan).await {
        return (Err(e.into()), None);
    }
    let deadline = deadline_for(bytes, Duration::from_secs(10));
    let w = weights.clone();
    let cancel = comm.canceller();
    let mut sending = tokio::task::spawn_blocking(move || {
        let _call = crate::runtime::DriverCall::enter();
        let mut comm = comm;
        let result = match peer {
            Peer::Sidecar => w.broadcast(&mut comm, deadline),
            Peer::Vllm { buffer_bytes, .. } => w
                .broadcast_vllm(&mut comm, buffer_bytes, deadline)
                .map(|()| String::new()),
        };
        (result, comm)
    });
    // The blocking thread polls its own deadline and aborts the communicator. Two watchers
    // stand behind it: a dead sidecar (failed health checks) cancels the send at once, and
    // should NCCL or the driver block that thread anyway, the deadline plus 5 s abandons it.
    // Training and the other sidecars go on either way.
    let watchdog = deadline + Duration::from_secs(5);
    let sent = tokio::select! {
        joined = tokio::time::timeout(watchdog, &mut sending) => match joined {
            Ok(joined) => joined,
            Err(_) => {
                cancel.store(true, Ordering::Release);
                tracing::error!(sidecar = %client.addr, seconds = watchdog.as_secs_f64(),
                    "the NCCL send thread did not return; abandoning it and its communicator");
                return (Err(NcclPublishError::Wedged(watchdog.as_secs_f64())), None);
            }
        },
        _ = until_dead(client) => {
            // The send thread sees the flag at its next poll and aborts the communicator
            // itself, which releases the kernels waiting on the dead sidecar.
            cancel.store(true, Ordering::Release);
            let returned = tokio::time::timeout(CANCEL_GRACE, &mut sending).await.is_ok();
            tracing::error!(sidecar = %client.addr, seconds = started.elapsed().as_secs_f64(), cancelled = returned,
                "the sidecar died during the NCCL transfer; send cancelled and its communicator aborted (or, if not cancelled, abandoned)");
            return (Err(NcclPublishError::PeerDead), None);
        }
    };
    let (digest, comm) = match sent {
        Ok((Ok(d), comm)) => (d, comm),
        Ok((Err(e), _)) => return (Err(e.into()), None),
        Err(e) => return (Err(NcclPublishError::Thread(e.to_string())), None),
    };
    let canary = match peer {
        Peer::Sidecar => None,
        Peer::Vllm { .. } => weights.canary(),
    };
    let canary_max_abs_diff = match client.commit_nccl(version, digest, deadline, canary).await {
        Ok(c) => c,
        Err(e) => return (Err(e.into()), None),
    };
    (
        Ok(Published {
            version,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            canary_max_abs_diff,
            phases: Vec::new(),
        }),
        Some(comm),
    )
}

/// How long a cancelled send may take to abort its communicator and return.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How long our own join may take once the sidecar accepted JoinNccl. A join that misses it
/// (seen after a peer died mid-transfer) means NCCL with this sidecar is not to be trusted.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);

/// How long our join into vLLM's ranks may take (they may be restarting).
const VLLM_JOIN_DEADLINE: Duration = Duration::from_secs(240);

/// Creates a communicator with the sidecar (or vLLM's ranks behind it): a new unique id,
/// JoinNccl, our own join, and for vLLM its warm-up all-reduce.
pub async fn connect(client: &SidecarClient, gpu: usize, peer: Peer) -> Result<Communicator, NcclPublishError> {
    let id = new_unique_id()?;
    let world = peer.world();
    // vLLM's ranks may first have to come back from a restart.
    let join_deadline = match peer {
        Peer::Sidecar => JOIN_DEADLINE,
        Peer::Vllm { .. } => VLLM_JOIN_DEADLINE,
    };
    match client.join_nccl(id.to_hex(), 1, world).await {
        Ok(()) => {}
        Err(SyncError::Rpc { status, .. }) if status.code() == tonic::Code::Unimplemented => {
            return Err(NcclPublishError::Unsupported(status.message().to_string()));
        }
        Err(e) => return Err(e.into()),
    }
    let joining = tokio::task::spawn_blocking(move || {
        let _call = crate::runtime::DriverCall::enter();
        let mut comm = Communicator::join(&id, 0, world, gpu, join_deadline)?;
        if peer != Peer::Sidecar {
            comm.warm_up_all_reduce(JOIN_DEADLINE)?;
        }
        Ok(comm)
    });
    // The join polls its own deadline; should CUDA or NCCL block the thread before it can,
    // the thread is abandoned a little later.
    let joined = match tokio::time::timeout(join_deadline + Duration::from_secs(10), joining).await {
        Ok(joined) => joined.map_err(|e| NcclPublishError::Thread(e.to_string()))?,
        Err(_) => {
            return Err(NcclPublishError::Unsupported(format!(
                "the NCCL join blocked past {:.0}s",
                join_deadline.as_secs_f64() + 10.0
            )))
        }
    };
    match joined {
        Ok(c) => Ok(c),
        // vLLM's ranks that missed the join are retried with a new communicator later.
        Err(e @ CommError::Deadline { .. }) if peer != Peer::Sidecar => Err(e.into()),
        Err(CommError::Deadline { secs, .. }) => Err(NcclPublishError::Unsupported(format!(
            "the NCCL join did not complete in {secs:.1}s"
        ))),
        // Both ends answered but NCCL refused (for example both ranks on one GPU): this pair
        // cannot use NCCL, so the sidecar gets the gRPC stream from now on.
        Err(CommError::Nccl { call, message }) => Err(NcclPublishError::Unsupported(format!(
            "NCCL could not connect ({call}: {message})"
        ))),
        Err(e) => Err(e.into()),
    }
}
