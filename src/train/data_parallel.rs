//! Data-parallel training across learner ranks, each with a full copy of the model.
//!
//! - **One step per batch, on every rank.** Rank 0 takes each batch from the Atropos API and
//!   broadcasts it ([`Op::Train`]); every rank trains its share of the micro-batches
//!   ([`crate::grpo::pack::share_micro_batches`]) with the batch's global loss normalization, so
//!   the summed gradients are exactly the one-rank gradients.
//! - **Gradients are all-reduced in buckets during the backward**: whole decoder layers per
//!   bucket (about `--dp-bucket-mb`), each started as soon as the backward through its layers is
//!   done on the rank's last micro-batch. gloo (libtorch's c10d) on the CPU; NCCL on CUDA.
//! - **Everything else is identical on every rank by construction**: the loss statistics are
//!   all-reduced, so the grad norm, the clip factor, a skipped step and AdamW agree.
//! - **Rank 0's state is everyone's at the start** ([`StateHeader`]): weights, optimizer
//!   moments and counters are broadcast when the ranks meet, so a resumed rank 0 resumes them
//!   all, and the other ranks need no checkpoint of their own.
//! - **No wait is unbounded**: every collective has the `--dp-timeout-s` deadline, and an idle
//!   rank 0 sends [`Op::KeepAlive`] at a quarter of it, so a rank that dies or hangs fails the
//!   others within the deadline.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::comm::gloo::{GlooError, Group, ReduceOp, Rendezvous, Store, Work};
use crate::grpo::loss::LossStats;
use crate::grpo::TrainBatch;

/// Errors between learner ranks.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error(transparent)]
    Gloo(#[from] GlooError),
    #[cfg(feature = "cuda")]
    #[error("NCCL between learner ranks: {0}")]
    Nccl(#[from] crate::comm::CommError),
    #[error("learner rank {rank} differs from rank 0: {what}")]
    Mismatch { rank: usize, what: String },
    #[error("a message from rank 0 is malformed: {0}")]
    Decode(String),
    #[error("an earlier collective failed, the group is unusable: {0}")]
    Broken(String),
}

/// What rank 0 tells the other ranks between steps.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Train one step on this batch.
    Train(Box<TrainBatch>),
    /// Rank 0 is alive and waiting for a batch.
    KeepAlive,
    /// The run is over: leave.
    Stop,
}

const OP_TRAIN: i64 = 1;
const OP_KEEP_ALIVE: i64 = 2;
const OP_STOP: i64 = 3;
const OP_STATE: i64 = 4;
/// Largest message rank 0 sends (a batch or the state header).
const MAX_MESSAGE_BYTES: i64 = 1 << 34;

/// A tensor of the optimizer's state as rank 0 holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateTensor {
    pub name: String,
    pub shape: Vec<i64>,
    /// tch's name of the dtype (`Float`, `BFloat16`, ...).
    pub kind: String,
}

/// Rank 0's counters and the shape of what follows, broadcast when the ranks meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateHeader {
    /// Names, shapes and dtypes of every parameter: each rank must compute the same.
    pub fingerprint: String,
    pub steps_done: u64,
    pub skipped_steps: u64,
    pub optimizer_steps: u64,
    pub optimizer: Vec<StateTensor>,
}

/// The kind named by [`StateTensor::kind`].
pub fn kind_of_name(name: &str) -> Option<Kind> {
    [
        Kind::Float,
        Kind::BFloat16,
        Kind::Half,
        Kind::Double,
        Kind::Int16,
        Kind::Int,
        Kind::Int64,
        Kind::Uint8,
        Kind::Int8,
    ]
    .into_iter()
    .find(|k| format!("{k:?}") == name)
}

/// One all-reduce bucket: trainable parameters (indices) of whole layers, or the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub params: Vec<usize>,
    /// The lowest decoder layer in the bucket: its gradients are final once the backward
    /// through that layer is done. `None`: the parameters outside the layers (embedding, final
    /// norm, head), final only at the end of the backward.
    pub ready_after: Option<usize>,
}

/// Buckets of whole layers, last layer first (the backward's order), each closed once it holds
/// at least `cap_bytes`; the parameters outside the layers form the last bucket. `params` is
/// (decoder layer, bytes) of each trainable parameter.
pub fn plan_buckets(params: &[(Option<usize>, usize)], cap_bytes: usize) -> Vec<Bucket> {
    let mut layers: Vec<usize> = params.iter().filter_map(|(l, _)| *l).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut buckets = Vec::new();
    let mut current = Bucket {
        params: Vec::new(),
        ready_after: None,
    };
    let mut bytes = 0usize;
    for &layer in layers.iter().rev() {
        for (i, (l, b)) in params.iter().enumerate() {
            if *l == Some(layer) {
                current.params.push(i);
                bytes += b;
            }
        }
        current.ready_after = Some(layer);
        if bytes >= cap_bytes {
            buckets.push(std::mem::replace(
                &mut current,
                Bucket {
                    params: Vec::new(),
                    ready_after: None,
                },
            ));
            bytes = 0;
        }
    }
    if !current.params.is_empty() {
        buckets.push(current);
    }
    let rest: Vec<usize> = (0..params.len()).filter(|&i| params[i].0.is_none()).collect();
    if !rest.is_empty() {
        buckets.push(Bucket {
            params: rest,
            ready_after: None,
        });
    }
    buckets
}

/// This rank's membership of the data-parallel group.
pub struct DataParallel {
    group: Group,
    #[cfg(feature = "cuda")]
    nccl: Option<crate::comm::nccl::Communicator>,
    timeout: Duration,
    bucket_bytes: usize,
    broken: Option<String>,
}

impl DataParallel {
    /// Meets the other ranks (rank 0 serves the store): waits at most `rv.timeout` for all of
    /// them. With a CUDA `device`, gradients go over an NCCL communicator whose id rank 0
    /// broadcasts through gloo.
    pub fn join(rv: &Rendezvous, device: Device, bucket_bytes: usize) -> Result<Self, DpError> {
        Self::join_with_store(Store::open(rv)?, rv, device, bucket_bytes)
    }

    /// [`Self::join`] through a store already open (rank 0's, bound to a free port).
    pub fn join_with_store(
        store: Store,
        rv: &Rendezvous,
        device: Device,
        bucket_bytes: usize,
    ) -> Result<Self, DpError> {
        let group = Group::join(store, rv)?;
        tracing::info!(rank = rv.rank, world = rv.world, store = %format!("{}:{}", rv.host, rv.port), "learner ranks met (gloo)");
        let mut me = Self {
            group,
            #[cfg(feature = "cuda")]
            nccl: None,
            timeout: rv.timeout,
            bucket_bytes,
            broken: None,
        };
        me.join_nccl(device)?;
        Ok(me)
    }

    #[cfg(feature = "cuda")]
    fn join_nccl(&mut self, device: Device) -> Result<(), DpError> {
        use crate::comm::nccl;
        let Device::Cuda(gpu) = device else {
            return Ok(());
        };
        let id = if self.rank() == 0 {
            nccl::new_unique_id()?
        } else {
            nccl::UniqueId([0; 128])
        };
        let t = Tensor::from_slice(&id.0);
        self.group.broadcast(&t, 0)?.wait()?;
        let bytes = Vec::<u8>::try_from(&t).map_err(|e| DpError::Decode(e.to_string()))?;
        let mut raw = [0u8; 128];
        raw.copy_from_slice(&bytes);
        let (rank, world) = (self.rank() as i32, self.world() as i32);
        let comm = nccl::Communicator::join(&nccl::UniqueId(raw), rank, world, gpu, self.timeout)?;
        tracing::info!(rank, world, gpu, "learner ranks' NCCL communicator ready");
        self.nccl = Some(comm);
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    fn join_nccl(&mut self, _device: Device) -> Result<(), DpError> {
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    pub fn world(&self) -> usize {
        self.group.world()
    }

    /// The deadline of every wait between ranks.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The bucket size of the gradient all-reduce.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    fn usable(&self) -> Result<(), DpError> {
        match &self.broken {
            Some(why) => Err(DpError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Remembers the first failure: after it, collectives may be out of step across ranks.
    fn check<T>(&mut self, r: Result<T, DpError>) -> Result<T, DpError> {
        if let Err(e) = &r {
            self.broken.get_or_insert_with(|| e.to_string());
        }
        r
    }

    fn broadcast_message(&mut self, kind: i64, bytes: &[u8]) -> Result<(), DpError> {
        self.usable()?;
        let sent = (|| {
            let len = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
            let head = Tensor::from_slice(&[kind, len]);
            self.group.broadcast(&head, 0)?.wait()?;
            if !bytes.is_empty() {
                self.group.broadcast(&Tensor::from_slice(bytes), 0)?.wait()?;
            }
            Ok(())
        })();
        self.check(sent)
    }

    fn receive_message(&mut self) -> Result<(i64, Vec<u8>), DpError> {
        self.usable()?;
        let got = (|| {
            let head = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
            self.group.broadcast(&head, 0)?.wait()?;
            let (kind, len) = (head.int64_value(&[0]), head.int64_value(&[1]));
            if !(0..=MAX_MESSAGE_BYTES).contains(&len) {
                return Err(DpError::Decode(format!("a message of {len} bytes")));
            }
            if len == 0 {
                return Ok((kind, Vec::new()));
            }
            let body = Tensor::zeros([len], (Kind::Uint8, Device::Cpu));
            self.group.broadcast(&body, 0)?.wait()?;
            let bytes = Vec::<u8>::try_from(&body).map_err(|e| DpError::Decode(e.to_string()))?;
            Ok((kind, bytes))
        })();
        self.check(got)
    }

    /// Rank 0: tells every other rank what comes next.
    pub fn send(&mut self, op: &Op) -> Result<(), DpError> {
        match op {
            Op::Train(batch) => {
                let bytes = serde_json::to_vec(batch).map_err(|e| DpError::Decode(e.to_string()))?;
                self.broadcast_message(OP_TRAIN, &bytes)
            }
            Op::KeepAlive => self.broadcast_message(OP_KEEP_ALIVE, &[]),
            Op::Stop => self.broadcast_message(OP_STOP, &[]),
        }
    }

    /// Ranks above 0: waits (at most the deadline) for rank 0's next message.
    pub fn receive(&mut self) -> Result<Op, DpError> {
        let (kind, bytes) = self.receive_message()?;
        match kind {
            OP_TRAIN => serde_json::from_slice(&bytes)
                .map(|b| Op::Train(Box::new(b)))
                .map_err(|e| DpError::Decode(e.to_string())),
            OP_KEEP_ALIVE => Ok(Op::KeepAlive),
            OP_STOP => Ok(Op::Stop),
            other => Err(DpError::Decode(format!("message kind {other} between steps"))),
        }
    }

    /// Rank 0 sends its header; the others receive it and check it against their own
    /// fingerprint.
    pub fn exchange_header(&mut self, mine: StateHeader) -> Result<StateHeader, DpError> {
        if self.rank() == 0 {
            let bytes = serde_json::to_vec(&mine).map_err(|e| DpError::Decode(e.to_string()))?;
            self.broadcast_message(OP_STATE, &bytes)?;
            return Ok(mine);
        }
        let (kind, bytes) = self.receive_message()?;
        if kind != OP_STATE {
            return Err(DpError::Decode(format!("message kind {kind} instead of the state")));
        }
        let header: StateHeader = serde_json::from_slice(&bytes).map_err(|e| DpError::Decode(e.to_string()))?;
        if header.fingerprint != mine.fingerprint {
            let err = DpError::Mismatch {
                rank: self.rank(),
                what: format!(
                    "its parameters are\n{}\nrank 0's are\n{}",
                    mine.fingerprint, header.fingerprint
                ),
            };
            return self.check(Err(err));
        }
        Ok(header)
    }

    /// Broadcasts `t` from rank 0 in place (over NCCL when it is on the GPU).
    pub fn broadcast_tensor(&mut self, t: &Tensor) -> Result<(), DpError> {
        self.usable()?;
        #[cfg(feature = "cuda")]
        if let (Some(comm), Device::Cuda(_)) = (self.nccl.as_mut(), t.device()) {
            let timeout = self.timeout;
            let contiguous = t.contiguous();
            let r = comm
                .broadcast_group(std::slice::from_ref(&contiguous), 0, timeout)
                .map_err(DpError::from);
            self.check(r)?;
            if contiguous.data_ptr() != t.data_ptr() {
                tch::no_grad(|| t.shallow_clone().copy_(&contiguous));
            }
            return Ok(());
        }
        let cpu = tch::no_grad(|| t.to_device(Device::Cpu).contiguous());
        let r = self
            .group
            .broadcast(&cpu, 0)
            .and_then(Work::wait)
            .map_err(DpError::from);
        self.check(r)?;
        if self.rank() != 0 {
            tch::no_grad(|| t.shallow_clone().copy_(&cpu));
        }
        Ok(())
    }

    /// Sums the step's loss statistics over the ranks (the maximum for `diff_max`).
    pub fn reduce_stats(&mut self, s: &LossStats) -> Result<LossStats, DpError> {
        self.usable()?;
        let sums = [
            s.loss,
            s.tokens,
            s.ratio_sum,
            s.clipped,
            s.diff_tokens,
            s.diff_sum,
            s.diff_abs_sum,
            s.kl_sum,
            s.pos_logp_sum,
            s.pos_tokens,
            s.neg_logp_sum,
            s.neg_tokens,
        ];
        let reduced = (|| {
            let t = Tensor::from_slice(&sums);
            let m = Tensor::from_slice(&[s.diff_max]);
            let w1 = self.group.all_reduce(&t, ReduceOp::Sum)?;
            let w2 = self.group.all_reduce(&m, ReduceOp::Max)?;
            w1.wait()?;
            w2.wait()?;
            let v = Vec::<f64>::try_from(&t).map_err(|e| DpError::Decode(e.to_string()))?;
            Ok((v, m.double_value(&[0])))
        })();
        let (v, diff_max) = self.check(reduced)?;
        Ok(LossStats {
            loss: v[0],
            tokens: v[1],
            ratio_sum: v[2],
            clipped: v[3],
            diff_tokens: v[4],
            diff_sum: v[5],
            diff_abs_sum: v[6],
            diff_max,
            kl_sum: v[7],
            pos_logp_sum: v[8],
            pos_tokens: v[9],
            neg_logp_sum: v[10],
            neg_tokens: v[11],
        })
    }
}

/// A bucket on the wire.
struct InFlight {
    bucket: usize,
    flat: Tensor,
    /// gloo's handle (CPU); NCCL's transfers are waited for all at once.
    work: Option<Work>,
}

/// What one step's gradient reduction cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReduceReport {
    /// Seconds the step waited for all-reduces after its backward ended (the part not
    /// overlapped with the backward).
    pub wait_s: f64,
    pub bytes: u64,
    pub buckets: usize,
}

/// One step's bucketed gradient all-reduce: [`Self::layer_done`] starts the buckets whose
/// layers' backward finished, [`Self::finish`] the rest, waits, and writes the sums back into
/// the gradients.
pub struct GradReduction<'a> {
    dp: &'a mut DataParallel,
    buckets: Vec<Bucket>,
    grads: Vec<Tensor>,
    next: usize,
    in_flight: Vec<InFlight>,
    error: Option<DpError>,
    bytes: u64,
}

impl<'a> GradReduction<'a> {
    /// `grads` are the trainable parameters' gradient tensors (defined), in the order the
    /// buckets index.
    pub fn new(dp: &'a mut DataParallel, buckets: Vec<Bucket>, grads: Vec<Tensor>) -> Self {
        Self {
            dp,
            buckets,
            grads,
            next: 0,
            in_flight: Vec::new(),
            error: None,
            bytes: 0,
        }
    }

    /// The backward through decoder layer `layer` is done on this rank's last micro-batch.
    pub fn layer_done(&mut self, layer: usize) {
        while self
            .buckets
            .get(self.next)
            .is_some_and(|b| b.ready_after.is_some_and(|after| after >= layer))
        {
            self.start_next();
        }
    }

    fn start_next(&mut self) {
        let k = self.next;
        self.next += 1;
        if self.error.is_some() {
            return;
        }
        match self.start(k) {
            Ok(f) => self.in_flight.push(f),
            Err(e) => self.error = Some(e),
        }
    }

    fn start(&mut self, k: usize) -> Result<InFlight, DpError> {
        self.dp.usable()?;
        let parts: Vec<Tensor> = self.buckets[k]
            .params
            .iter()
            .map(|&i| self.grads[i].reshape([-1]).to_kind(Kind::Float))
            .collect();
        let flat = tch::no_grad(|| Tensor::cat(&parts, 0));
        self.bytes += (flat.numel() * 4) as u64;
        #[cfg(feature = "cuda")]
        if let (Some(comm), Device::Cuda(_)) = (self.dp.nccl.as_mut(), flat.device()) {
            comm.all_reduce_queue(&flat, self.dp.timeout)?;
            return Ok(InFlight {
                bucket: k,
                flat,
                work: None,
            });
        }
        let flat = flat.to_device(Device::Cpu);
        let work = self.dp.group.all_reduce(&flat, ReduceOp::Sum)?;
        Ok(InFlight {
            bucket: k,
            flat,
            work: Some(work),
        })
    }

    /// Starts what is left, waits for every bucket and writes the summed gradients back.
    pub fn finish(mut self) -> Result<ReduceReport, DpError> {
        while self.next < self.buckets.len() {
            self.start_next();
        }
        let waited = Instant::now();
        let r = self.wait_all();
        let r = self.dp.check(r);
        r.map(|()| ReduceReport {
            wait_s: waited.elapsed().as_secs_f64(),
            bytes: self.bytes,
            buckets: self.buckets.len(),
        })
    }

    fn wait_all(&mut self) -> Result<(), DpError> {
        let in_flight = std::mem::take(&mut self.in_flight);
        let mut first_err = self.error.take();
        let mut landed = Vec::with_capacity(in_flight.len());
        for f in in_flight {
            if let Some(work) = f.work {
                if let Err(e) = work.wait() {
                    first_err.get_or_insert(e.into());
                }
            }
            landed.push((f.bucket, f.flat));
        }
        #[cfg(feature = "cuda")]
        if let Some(comm) = self.dp.nccl.as_mut() {
            if first_err.is_none() && landed.iter().any(|(_, f)| f.device() != Device::Cpu) {
                if let Err(e) = comm.all_reduce_finish(self.dp.timeout) {
                    first_err = Some(e.into());
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        tch::no_grad(|| {
            for (k, flat) in landed {
                let mut offset = 0i64;
                for &i in &self.buckets[k].params {
                    let g = &self.grads[i];
                    let n = g.numel() as i64;
                    let part = flat.narrow(0, offset, n).view(g.size().as_slice());
                    g.shallow_clone().copy_(&part);
                    offset += n;
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets hold whole layers, last layer first, close at the cap, and end with the
    /// parameters outside the layers; every parameter is in exactly one bucket.
    #[test]
    fn buckets_follow_the_backward() {
        // embed, layer 0 (two tensors), layer 1, layer 2, final norm.
        let params = [
            (None, 100),
            (Some(0), 10),
            (Some(0), 10),
            (Some(1), 30),
            (Some(2), 25),
            (None, 1),
        ];
        let b = plan_buckets(&params, 25);
        assert_eq!(
            b,
            vec![
                Bucket {
                    params: vec![4],
                    ready_after: Some(2)
                },
                Bucket {
                    params: vec![3],
                    ready_after: Some(1)
                },
                Bucket {
                    params: vec![1, 2],
                    ready_after: Some(0)
                },
                Bucket {
                    params: vec![0, 5],
                    ready_after: None
                },
            ]
        );
        let big = plan_buckets(&params, 1 << 30);
        assert_eq!(big.len(), 2);
        assert_eq!(
            big[0],
            Bucket {
                params: vec![4, 3, 1, 2],
                ready_after: Some(0)
            }
        );
        let mut all: Vec<usize> = big.iter().flat_map(|b| b.params.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..params.len()).collect::<Vec<_>>());
        // LoRA on layers only: no trailing bucket.
        assert!(plan_buckets(&[(Some(3), 8)], 1)
            .iter()
            .all(|b| b.ready_after == Some(3)));
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for k in [Kind::Float, Kind::BFloat16, Kind::Int16, Kind::Uint8] {
            assert_eq!(kind_of_name(&format!("{k:?}")), Some(k));
        }
        assert_eq!(kind_of_name("Complex"), None);
    }
}
