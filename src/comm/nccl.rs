//! NCCL through cudarc's raw bindings, made unable to hang: communicators are created
//! non-blocking (`blocking = 0`), every call is polled with `ncclCommGetAsyncError` and
//! `cuStreamQuery` until a deadline, and a deadline or an asynchronous error aborts the
//! communicator (`ncclCommAbort`), which releases the GPU kernels waiting on a dead peer.
//! Collectives run on the communicator's own non-blocking stream, ordered against tch's work
//! (the legacy default stream) with events both ways, so a digest of bucket k can run while
//! bucket k+1 is on the wire.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::sys as nc;
use tch::Tensor;

use super::CommError;

/// Waits (on the host, until the given instant) until bucket k may be sent, and returns the
/// event after which its data is ready on the GPU.
pub type ReadyFn<'a> = dyn FnMut(usize, Instant) -> Result<cu::CUevent, CommError> + 'a;

/// Records an event on tch's stream (the legacy default stream of `ctx`'s device): it passes
/// once everything queued there so far has run.
pub fn mark_torch_stream(ctx: &Arc<CudaContext>) -> Result<CudaEvent, CommError> {
    let cuda = |e: cudarc::driver::DriverError| CommError::Cuda(e.to_string());
    ctx.bind_to_thread().map_err(cuda)?;
    let ev = ctx
        .new_event(Some(cu::CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .map_err(cuda)?;
    // SAFETY: recording a live event on the legacy default stream of the bound context.
    unsafe { cu::cuEventRecord(ev.cu_event(), std::ptr::null_mut()) }
        .result()
        .map_err(cuda)?;
    Ok(ev)
}

/// The CUDA context (the device's primary one, which libtorch uses too) of device `gpu`.
///
/// cudarc's event tracking is turned off: it orders cudarc's own buffers across streams, which
/// we do not use, and with it on, the first stream made on a context handle synchronizes the
/// whole device (`cuCtxSynchronize`). That waits for every kernel of the process, so one NCCL
/// kernel stuck on a peer that died mid-transfer would block every later communicator's join
/// for good.
pub fn device_context(gpu: usize) -> Result<Arc<CudaContext>, CommError> {
    if !available() {
        return Err(CommError::Unavailable);
    }
    let ctx = CudaContext::new(gpu).map_err(|e| CommError::Cuda(e.to_string()))?;
    // SAFETY: no cudarc-managed buffer (CudaSlice) is made on this handle; our streams are
    // ordered with explicit events.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// A communicator's 128-byte unique id, passed from rank 0 to the others (hex on the wire).
#[derive(Clone, PartialEq, Eq)]
pub struct UniqueId(pub [u8; 128]);

impl UniqueId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`UniqueId::to_hex`].
    pub fn from_hex(s: &str) -> Result<Self, CommError> {
        let s = s.trim();
        if s.len() != 256 {
            return Err(CommError::BadId(format!("{} hex digits, expected 256", s.len())));
        }
        let mut out = [0u8; 128];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| CommError::BadId(e.to_string()))?;
        }
        Ok(Self(out))
    }
}

/// Whether this process can load libnccl and libcuda (cudarc panics on a missing library, so
/// every entry point checks this first).
pub fn available() -> bool {
    // SAFETY: only probes for the shared libraries.
    unsafe { nc::is_culib_present() && cu::is_culib_present() }
}

fn check(call: &'static str, r: nc::ncclResult_t) -> Result<(), CommError> {
    match r {
        nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress => Ok(()),
        other => Err(CommError::Nccl {
            call,
            message: error_string(other),
        }),
    }
}

fn error_string(r: nc::ncclResult_t) -> String {
    // SAFETY: NCCL returns a static NUL-terminated string.
    let msg = unsafe { std::ffi::CStr::from_ptr(nc::ncclGetErrorString(r)) };
    format!("{r:?}: {}", msg.to_string_lossy())
}

/// A new unique id (rank 0 makes it).
pub fn new_unique_id() -> Result<UniqueId, CommError> {
    if !available() {
        return Err(CommError::Unavailable);
    }
    let mut id = nc::ncclUniqueId { internal: [0; 128] };
    // SAFETY: `id` is a valid out-pointer.
    check("ncclGetUniqueId", unsafe { nc::ncclGetUniqueId(&mut id) })?;
    let mut out = [0u8; 128];
    for (o, i) in out.iter_mut().zip(id.internal.iter()) {
        *o = *i as u8;
    }
    Ok(UniqueId(out))
}

/// The scheduling priority of a communicator's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamPriority {
    /// The device's highest: blocks of a transfer are scheduled before those of kernels queued
    /// meanwhile on other streams (the digest, the next training step). What `join` makes.
    Greatest,
    /// The device's default.
    Default,
}

fn new_stream(ctx: &Arc<CudaContext>, priority: StreamPriority) -> Result<Arc<CudaStream>, CommError> {
    let cuda = |e: cudarc::driver::DriverError| CommError::Cuda(e.to_string());
    match priority {
        StreamPriority::Default => ctx.new_stream().map_err(cuda),
        StreamPriority::Greatest => {
            ctx.bind_to_thread().map_err(cuda)?;
            let (_least, greatest) = cudarc::driver::result::stream::get_priority_range().map_err(cuda)?;
            ctx.new_stream_with_priority(greatest).map_err(cuda)
        }
    }
}

/// One rank's membership of a communicator.
pub struct Communicator {
    comm: nc::ncclComm_t,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub rank: i32,
    pub world: i32,
    aborted: bool,
    cancel: Arc<AtomicBool>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent;
// every method that calls NCCL or CUDA takes `&mut self`, and the `&self` methods only read a
// flag, so shared references cannot race.
unsafe impl Send for Communicator {}
unsafe impl Sync for Communicator {}

impl Communicator {
    /// Joins communicator `id` as `rank` of `world` on CUDA device `device`, waiting at most
    /// `deadline` for every rank to arrive.
    pub fn join(id: &UniqueId, rank: i32, world: i32, device: usize, deadline: Duration) -> Result<Self, CommError> {
        if !available() {
            return Err(CommError::Unavailable);
        }
        let ctx = device_context(device)?;
        ctx.bind_to_thread().map_err(|e| CommError::Cuda(e.to_string()))?;
        let stream = new_stream(&ctx, StreamPriority::Greatest)?;
        let mut raw = nc::ncclUniqueId { internal: [0; 128] };
        for (r, b) in raw.internal.iter_mut().zip(id.0.iter()) {
            *r = *b as std::ffi::c_char;
        }
        const UNDEF: std::ffi::c_int = i32::MIN; // NCCL_CONFIG_UNDEF_INT
        let mut config = nc::ncclConfig_t {
            size: std::mem::size_of::<nc::ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: 22809, // NCCL_VERSION(2, 28, 9)
            blocking: 0,
            cgaClusterSize: UNDEF,
            minCTAs: UNDEF,
            maxCTAs: UNDEF,
            netName: std::ptr::null(),
            splitShare: UNDEF,
            trafficClass: UNDEF,
            commName: std::ptr::null(),
            collnetEnable: UNDEF,
            CTAPolicy: UNDEF,
            shrinkShare: UNDEF,
            nvlsCTAs: UNDEF,
            nChannelsPerNetPeer: UNDEF,
            nvlinkCentricSched: UNDEF,
        };
        let mut comm: nc::ncclComm_t = std::ptr::null_mut();
        // SAFETY: out-pointer and config are valid for the call.
        let r = unsafe { nc::ncclCommInitRankConfig(&mut comm, world, raw, rank, &mut config) };
        check("ncclCommInitRankConfig", r)?;
        let mut me = Self {
            comm,
            ctx,
            stream,
            rank,
            world,
            aborted: false,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        me.wait_ready("ncclCommInitRankConfig", Instant::now() + deadline)?;
        Ok(me)
    }

    /// Runs later collectives on a new stream of `priority` (call between collectives; every
    /// collective here returns only once its stream is idle).
    pub fn set_stream_priority(&mut self, priority: StreamPriority) -> Result<(), CommError> {
        self.stream = new_stream(&self.ctx, priority)?;
        Ok(())
    }

    /// One look at the communicator: `Ok(true)` when its pending call completed, `Ok(false)`
    /// while it is in progress; a cancel, an asynchronous error or (while in progress) a passed
    /// deadline aborts it.
    fn poll(&mut self, what: &'static str, started: Instant, until: Instant) -> Result<bool, CommError> {
        if self.cancel.load(Ordering::Acquire) {
            tracing::warn!(rank = self.rank, what, "NCCL call cancelled; aborting the communicator");
            self.abort();
            return Err(CommError::Cancelled { what });
        }
        let mut state = nc::ncclResult_t::ncclSuccess;
        // SAFETY: valid communicator and out-pointer.
        check("ncclCommGetAsyncError", unsafe {
            nc::ncclCommGetAsyncError(self.comm, &mut state)
        })?;
        match state {
            nc::ncclResult_t::ncclSuccess => return Ok(true),
            nc::ncclResult_t::ncclInProgress => {}
            other => {
                tracing::warn!(rank = self.rank, what, state = ?other, "NCCL reported an asynchronous error; aborting the communicator");
                self.abort();
                return Err(CommError::Nccl {
                    call: what,
                    message: error_string(other),
                });
            }
        }
        self.check_deadline(what, started, until)?;
        Ok(false)
    }

    /// Aborts the communicator and fails once `until` has passed.
    fn check_deadline(&mut self, what: &'static str, started: Instant, until: Instant) -> Result<(), CommError> {
        if Instant::now() < until {
            return Ok(());
        }
        tracing::warn!(
            rank = self.rank,
            what,
            seconds = started.elapsed().as_secs_f64(),
            "NCCL deadline passed; aborting the communicator"
        );
        self.abort();
        Err(CommError::Deadline {
            what,
            secs: started.elapsed().as_secs_f64(),
        })
    }

    /// A flag that cancels this communicator's call in progress, from any thread: the waiting
    /// thread sees it at its next poll (they run back to back), aborts the communicator itself
    /// and returns [`CommError::Cancelled`]. The abort stays on the thread that owns the
    /// communicator, so no NCCL call can race it.
    pub fn canceller(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Polls the communicator until its pending call completed; aborts it at `until`.
    fn wait_ready(&mut self, what: &'static str, until: Instant) -> Result<(), CommError> {
        let started = Instant::now();
        while !self.poll(what, started, until)? {
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Waits for the communicator's stream, watching for asynchronous errors; aborts at `until`.
    fn wait_stream(&mut self, what: &'static str, until: Instant) -> Result<(), CommError> {
        let started = Instant::now();
        tracing::trace!(rank = self.rank, what, "waiting for the stream");
        loop {
            // SAFETY: querying a live stream of this context.
            let q = unsafe { cu::cuStreamQuery(self.stream.cu_stream()) };
            match q {
                cu::cudaError_enum::CUDA_SUCCESS => return Ok(()),
                cu::cudaError_enum::CUDA_ERROR_NOT_READY => {}
                other => return Err(CommError::Cuda(format!("cuStreamQuery: {other:?}"))),
            }
            // The communicator being idle says nothing about the stream (its kernels may wait on
            // a peer that died mid-transfer): only errors, a cancel and the deadline end this
            // wait, so the deadline is checked whatever the communicator reports.
            let _idle = self.poll(what, started, until)?;
            self.check_deadline(what, started, until)?;
            std::thread::yield_now();
        }
    }

    /// Broadcasts `tensors` (contiguous, on this rank's GPU, same shapes on every rank) from
    /// `root` in place, as one NCCL group, and waits for completion until `deadline` passes.
    pub fn broadcast_group(&mut self, tensors: &[Tensor], root: i32, deadline: Duration) -> Result<(), CommError> {
        let bucket: Vec<Tensor> = tensors.iter().map(Tensor::shallow_clone).collect();
        self.broadcast_buckets(std::slice::from_ref(&bucket), root, deadline, |_, _| {})
    }

    /// Broadcasts each bucket of tensors in place as one NCCL group, in order, after
    /// everything tch queued so far. After bucket k is enqueued, tch's stream is made to wait
    /// for it and `landed(k, bucket)` runs, so work it queues with tch (a digest) sees the
    /// bucket's data and overlaps the next bucket's transfer. Returns when every transfer
    /// finished; aborts the communicator and fails at `deadline`.
    pub fn broadcast_buckets(
        &mut self,
        buckets: &[Vec<Tensor>],
        root: i32,
        deadline: Duration,
        landed: impl FnMut(usize, &[Tensor]),
    ) -> Result<(), CommError> {
        self.pipeline(buckets, root, deadline, None, Some(landed))
    }

    /// Root only: broadcasts `buckets` (one tensor each), bucket k once the event that
    /// `ready(k, until)` returns has passed on the GPU. `ready` may block until bucket k's
    /// packing has been queued (by another thread), so later buckets can still be packing while
    /// earlier ones are on the wire. tch's stream never waits for the transfers. Returns when
    /// every transfer finished; aborts at `deadline`.
    pub fn send_when_ready(
        &mut self,
        buckets: &[Tensor],
        deadline: Duration,
        ready: &mut ReadyFn<'_>,
    ) -> Result<(), CommError> {
        let buckets: Vec<Vec<Tensor>> = buckets.iter().map(|t| vec![t.shallow_clone()]).collect();
        self.pipeline(&buckets, 0, deadline, Some(ready), None::<fn(usize, &[Tensor])>)
    }

    fn pipeline(
        &mut self,
        buckets: &[Vec<Tensor>],
        root: i32,
        deadline: Duration,
        mut ready: Option<&mut ReadyFn<'_>>,
        mut landed: Option<impl FnMut(usize, &[Tensor])>,
    ) -> Result<(), CommError> {
        if self.aborted {
            return Err(CommError::Nccl {
                call: "broadcast",
                message: "the communicator was aborted".into(),
            });
        }
        let until = Instant::now() + deadline;
        let cuda = |e: cudarc::driver::DriverError| CommError::Cuda(e.to_string());
        // This may run on another thread than the join did.
        self.ctx.bind_to_thread().map_err(cuda)?;
        if ready.is_none() {
            // The collectives wait for everything tch queued so far (the tensors being sent).
            let ready = mark_torch_stream(&self.ctx)?;
            self.stream.wait(&ready).map_err(cuda)?;
        }
        // Every bucket goes on the wire back to back; then tch's stream waits for each bucket
        // in turn and `landed` queues its work, which overlaps the later transfers.
        let mut done: Vec<CudaEvent> = Vec::with_capacity(buckets.len());
        for (k, bucket) in buckets.iter().enumerate() {
            tracing::trace!(rank = self.rank, bucket = k, "bucket next");
            if let Some(ready) = ready.as_mut() {
                let ev = match ready(k, until) {
                    Ok(ev) => ev,
                    Err(e) => {
                        // Buckets already queued would wait for a peer that gives up: abort.
                        self.abort();
                        return Err(e);
                    }
                };
                // SAFETY: the communicator's stream waits on an event the caller keeps alive.
                unsafe { cu::cuStreamWaitEvent(self.stream.cu_stream(), ev, 0) }
                    .result()
                    .map_err(cuda)?;
            }
            // SAFETY: group calls bracket the broadcasts; pointers are live tensors' storage.
            unsafe {
                check("ncclGroupStart", nc::ncclGroupStart())?;
                for t in bucket {
                    let bytes = t.numel() * t.kind().elt_size_in_bytes();
                    let ptr = t.data_ptr();
                    let r = nc::ncclBroadcast(
                        ptr,
                        ptr,
                        bytes,
                        nc::ncclDataType_t::ncclUint8,
                        root,
                        self.comm,
                        self.stream.cu_stream() as nc::cudaStream_t,
                    );
                    if let Err(e) = check("ncclBroadcast", r) {
                        let _ = nc::ncclGroupEnd();
                        return Err(e);
                    }
                }
                check("ncclGroupEnd", nc::ncclGroupEnd())?;
            }
            self.wait_ready("broadcast", until)?;
            tracing::trace!(rank = self.rank, bucket = k, "bucket queued");
            if landed.is_some() {
                done.push(self.stream.record_event(None).map_err(cuda)?);
            }
        }
        if let Some(landed) = landed.as_mut() {
            for (k, (bucket, ev)) in buckets.iter().zip(&done).enumerate() {
                // SAFETY: the legacy default stream waits on a live event.
                unsafe { cu::cuStreamWaitEvent(std::ptr::null_mut(), ev.cu_event(), 0) }
                    .result()
                    .map_err(cuda)?;
                landed(k, bucket);
            }
        }
        self.wait_stream("broadcast", until)
    }

    /// The one-float sum all-reduce every vLLM rank runs right after joining (vLLM's
    /// `PyNcclCommunicator` warm-up): rank 0 must run it too before anything else.
    pub fn warm_up_all_reduce(&mut self, deadline: Duration) -> Result<(), CommError> {
        let until = Instant::now() + deadline;
        self.ctx.bind_to_thread().map_err(|e| CommError::Cuda(e.to_string()))?;
        let x = Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cuda(self.ctx.ordinal())));
        // The zeros are written on tch's stream: the all-reduce waits for them.
        let ready = mark_torch_stream(&self.ctx)?;
        self.stream.wait(&ready).map_err(|e| CommError::Cuda(e.to_string()))?;
        // SAFETY: a live one-element fp32 tensor on this communicator's device.
        let r = unsafe {
            nc::ncclAllReduce(
                x.data_ptr(),
                x.data_ptr(),
                1,
                nc::ncclDataType_t::ncclFloat32,
                nc::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as nc::cudaStream_t,
            )
        };
        check("ncclAllReduce", r)?;
        self.wait_ready("all_reduce", until)?;
        self.wait_stream("all_reduce", until)
    }

    /// Queues an in-place sum all-reduce of `t` (contiguous fp32 or bf16, on this rank's GPU)
    /// after everything tch queued so far, and returns once NCCL took it: the transfer overlaps
    /// whatever the host queues next (the rest of the backward). [`Self::all_reduce_finish`]
    /// waits for every queued one.
    pub fn all_reduce_queue(&mut self, t: &Tensor, deadline: Duration) -> Result<(), CommError> {
        if self.aborted {
            return Err(CommError::Nccl {
                call: "all_reduce",
                message: "the communicator was aborted".into(),
            });
        }
        let until = Instant::now() + deadline;
        let cuda = |e: cudarc::driver::DriverError| CommError::Cuda(e.to_string());
        self.ctx.bind_to_thread().map_err(cuda)?;
        let ready = mark_torch_stream(&self.ctx)?;
        self.stream.wait(&ready).map_err(cuda)?;
        let dtype = match t.kind() {
            tch::Kind::BFloat16 => nc::ncclDataType_t::ncclBfloat16,
            _ => nc::ncclDataType_t::ncclFloat32,
        };
        // SAFETY: a live contiguous tensor on this communicator's device; the caller keeps it
        // alive until all_reduce_finish returned.
        let r = unsafe {
            nc::ncclAllReduce(
                t.data_ptr(),
                t.data_ptr(),
                t.numel(),
                dtype,
                nc::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as nc::cudaStream_t,
            )
        };
        check("ncclAllReduce", r)?;
        self.wait_ready("all_reduce", until)
    }

    /// Waits until every queued all-reduce finished (their tensors then hold the sums); aborts
    /// the communicator and fails at `deadline`.
    pub fn all_reduce_finish(&mut self, deadline: Duration) -> Result<(), CommError> {
        self.wait_stream("all_reduce", Instant::now() + deadline)
    }

    /// Aborts the communicator: pending kernels return, resources are freed. Idempotent.
    pub fn abort(&mut self) {
        if !self.aborted {
            let started = Instant::now();
            // SAFETY: valid communicator, aborted once.
            let r = unsafe { nc::ncclCommAbort(self.comm) };
            self.aborted = true;
            tracing::debug!(rank = self.rank, result = ?r, seconds = started.elapsed().as_secs_f64(), "NCCL communicator aborted");
        }
    }

    /// Whether the communicator was aborted (after a deadline or a peer failure).
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Deadline for moving `bytes`: at a pessimistic 1 GB/s plus `slack` (init, launch, a slow
/// first call). A healthy NVLink transfer runs 100x faster; a dead peer never finishes.
pub fn deadline_for(bytes: u64, slack: Duration) -> Duration {
    slack + Duration::from_secs_f64(bytes as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_round_trips_through_hex() {
        let mut raw = [0u8; 128];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (i * 7 % 256) as u8;
        }
        let id = UniqueId(raw);
        assert!(UniqueId::from_hex(&id.to_hex()).is_ok_and(|back| back == id));
        assert!(UniqueId::from_hex("zz").is_err());
    }
}
