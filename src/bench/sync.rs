//! `grpo-node bench sync` (feature `cuda`): NCCL weight broadcast between two processes, one
//! per GPU, for a model shape's weights in bf16. Rank 0 plays the learner, rank 1 the sidecar.
//! Measured on rank 0 in the same run: the raw broadcast of one flat buffer of the same bytes,
//! and the publish as the learner and sidecar run it, two ways: `lent` (rank 0 sends the
//! `--sync-bucket-mb` buckets straight from the live flat weights, as a learner with split
//! masters does, holding its next update) and `packed` (rank 0 packs the weights into a new
//! buffer and sends each bucket once packed, as a learner with fp32 masters does). The lent
//! publish is measured again with the communicator's stream at the default priority instead
//! of the greatest (`lent_default_priority`), to show what the priority buys. Rank 1
//! receives into one flat buffer; both digest every bucket on the GPU while later ones are on
//! the wire; then the digests are compared. The reference,
//! `torch.distributed.broadcast`, is `python/bench/ref_broadcast.py` on the same two GPUs.
//! `--fault peer-exits` makes rank 1 leave after joining: rank 0's broadcast must end with a
//! deadline error and an aborted communicator, not a hang.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::comm::nccl::{deadline_for, new_unique_id, Communicator, StreamPriority, UniqueId};
use crate::comm::CommError;
use crate::model::params::expected_shapes;
use crate::sync::nccl_publish::PackedWeights;
use crate::sync::nccl_sync::{device_plan, receive};
use crate::sync::packing::PackLayout;
use crate::train::lease::Lease;

use super::shapes::Shape;
use super::BenchError;

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Rank 1 exits right after joining the communicator.
    PeerExits,
}

/// Flags of `grpo-node bench sync`.
#[derive(Debug, clap::Args)]
pub struct SyncBenchArgs {
    /// 0 (sender) or 1 (receiver).
    #[arg(long, env = "GRPO_BENCH_RANK")]
    pub rank: i32,
    /// File through which rank 0 hands the NCCL unique id to rank 1.
    #[arg(long, env = "GRPO_BENCH_ID_FILE")]
    pub id_file: PathBuf,
    /// CUDA device index of this rank.
    #[arg(long, env = "GRPO_BENCH_GPU")]
    pub gpu: usize,
    /// Model shape whose weights are sent (random bf16).
    #[arg(long, env = "GRPO_BENCH_SHAPE", value_enum)]
    pub shape: Shape,
    /// Bucket size: tensors are grouped into NCCL groups of about this many MiB.
    #[arg(long, env = "GRPO_SYNC_BUCKET_MB", default_value_t = 512)]
    pub sync_bucket_mb: u64,
    /// Timed repetitions (after 2 warm-ups).
    #[arg(long, env = "GRPO_BENCH_ITERS", default_value_t = 5)]
    pub iters: usize,
    /// Inject a fault instead of measuring.
    #[arg(long, env = "GRPO_BENCH_FAULT", value_enum)]
    pub fault: Option<Fault>,
}

fn comm_err(e: CommError) -> BenchError {
    BenchError::Batches(format!("nccl: {e}"))
}

/// A digest's 32 hex digits as a `[4]` int64 tensor on `device` (to broadcast and compare).
fn digest_tensor(hex: &str, device: Device) -> Tensor {
    let words: Vec<i64> = (0..4)
        .map(|i| {
            hex.get(8 * i..8 * i + 8)
                .and_then(|w| i64::from_str_radix(w, 16).ok())
                .unwrap_or(-1)
        })
        .collect();
    Tensor::from_slice(&words).to_device(device)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Where rank 0 sends from.
#[derive(Clone, Copy)]
enum Source {
    /// The live flat weights, lent (what a learner with split masters does).
    Lent,
    /// A packed copy, each bucket sent once packed (a learner with fp32 masters).
    Packed,
}

/// Per-iteration times of one way of publishing.
struct Timings {
    publish: Vec<f64>,
    data: Vec<f64>,
    digest_ok: bool,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            publish: Vec::new(),
            data: Vec::new(),
            digest_ok: true,
        }
    }
}

impl Timings {
    fn summary(self, bytes: u64, raw: f64) -> serde_json::Value {
        let publish = median(self.publish);
        let data = median(self.data);
        json!({
            "publish_median_s": publish, "publish_data_median_s": data, "data_over_raw": data / raw,
            "publish_gb_per_s": bytes as f64 / 1e9 / publish, "publish_over_raw": publish / raw,
            "digest_ok": self.digest_ok,
        })
    }
}

/// Rank 0's half of one publish; returns its digest.
fn send(
    how: Source,
    named: &[(String, Tensor)],
    live: &Tensor,
    args: &SyncBenchArgs,
    comm: &mut Communicator,
    deadline: Duration,
) -> Result<String, BenchError> {
    let bucket_bytes = args.sync_bucket_mb << 20;
    match how {
        Source::Lent => {
            let lease = std::sync::Arc::new(Lease::new(deadline));
            let lent = PackedWeights::lend(named, live, args.gpu, bucket_bytes, lease.clone()).map_err(comm_err)?;
            let hex = lent.broadcast(comm, deadline).map_err(comm_err);
            lent.release();
            // What the trainer's next update does first.
            let _ = lease.end();
            hex
        }
        Source::Packed => {
            // As the learner does it: the model thread packs (one copy per tensor) while the
            // broadcaster sends.
            let packed = PackedWeights::new(named, args.gpu, bucket_bytes);
            let values: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
            std::thread::scope(|scope| {
                let packed = &packed;
                let packer = scope.spawn(move || packed.pack_from(&values));
                let sent = packed.broadcast(comm, deadline);
                let packing = packer
                    .join()
                    .unwrap_or_else(|_| Err(CommError::Cuda("the packing thread panicked".into())));
                packing.and(sent)
            })
            .map_err(comm_err)
        }
    }
}

/// Runs one rank.
pub fn run(args: &SyncBenchArgs) -> Result<(), BenchError> {
    let device = Device::Cuda(args.gpu);
    let spec = args.shape.spec(0)?;
    let shapes = expected_shapes(&spec);
    tch::manual_seed(1 + i64::from(args.rank));
    // As the learner holds bf16 weights: views of one flat buffer, tensor after tensor.
    let total: i64 = shapes.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    let live = Tensor::randn([total], (Kind::BFloat16, device));
    let mut offset = 0;
    let weights: Vec<Tensor> = shapes
        .iter()
        .map(|(_, s)| {
            let n: i64 = s.iter().product();
            offset += n;
            live.narrow(0, offset - n, n).view(s.as_slice())
        })
        .collect();
    let bytes: u64 = weights.iter().map(|t| (t.numel() * 2) as u64).sum();
    let id = if args.rank == 0 {
        let id = new_unique_id().map_err(comm_err)?;
        let tmp = args.id_file.with_extension("tmp");
        std::fs::write(&tmp, id.to_hex()).map_err(|e| BenchError::Io(tmp.display().to_string(), e))?;
        std::fs::rename(&tmp, &args.id_file).map_err(|e| BenchError::Io(args.id_file.display().to_string(), e))?;
        id
    } else {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(text) = std::fs::read_to_string(&args.id_file) {
                break UniqueId::from_hex(&text).map_err(comm_err)?;
            }
            if Instant::now() > until {
                return Err(BenchError::Batches("rank 0 never wrote the unique id".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut comm = Communicator::join(&id, args.rank, 2, args.gpu, Duration::from_secs(120)).map_err(comm_err)?;
    let deadline = deadline_for(bytes, Duration::from_secs(10));

    if args.fault == Some(Fault::PeerExits) {
        if args.rank == 1 {
            println!("rank 1 joined; exiting without taking part");
            std::process::exit(0);
        }
        let started = Instant::now();
        let outcome = comm.broadcast_group(&weights, 0, deadline);
        let secs = started.elapsed().as_secs_f64();
        let result = json!({
            "bench": "sync-fault", "fault": "peer-exits", "bytes": bytes,
            "deadline_s": deadline.as_secs_f64(), "returned_after_s": secs,
            "error": outcome.as_ref().err().map(ToString::to_string),
            "aborted": comm.is_aborted(),
        });
        println!("RESULT {result}");
        return Ok(());
    }

    let flat = if args.rank == 0 {
        Tensor::randint(256, [bytes as i64], (Kind::Uint8, device))
    } else {
        Tensor::zeros([bytes as i64], (Kind::Uint8, device))
    };
    let token = Tensor::ones([1], (Kind::Float, device));
    let named: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(n, _)| n.clone())
        .zip(weights.iter().map(Tensor::shallow_clone))
        .collect();
    let numels: Vec<i64> = weights.iter().map(|w| w.numel() as i64).collect();
    let layout = PackLayout::new(&numels, 2, args.sync_bucket_mb << 20);
    let plan = device_plan(
        &named.iter().map(|(n, t)| (n.clone(), t.size())).collect::<Vec<_>>(),
        Kind::BFloat16,
        &layout,
    );
    let barrier =
        |comm: &mut Communicator| comm.broadcast_group(std::slice::from_ref(&token), 0, Duration::from_secs(60));
    let mut raw_times = Vec::new();
    let mut lent = Timings::default();
    let mut lent_default = Timings::default();
    let mut packed = Timings::default();
    for i in 0..args.iters + 2 {
        comm.set_stream_priority(StreamPriority::Greatest).map_err(comm_err)?;
        barrier(&mut comm).map_err(comm_err)?;
        let t0 = Instant::now();
        comm.broadcast_group(std::slice::from_ref(&flat), 0, deadline)
            .map_err(comm_err)?;
        let raw = t0.elapsed().as_secs_f64();
        if i >= 2 {
            raw_times.push(raw);
        }
        // The lent publish twice: on the stream priority the node uses (the greatest), and on
        // the default one, to show what the priority buys against the digest's kernels.
        for (how, priority, times) in [
            (Source::Lent, StreamPriority::Greatest, &mut lent),
            (Source::Lent, StreamPriority::Default, &mut lent_default),
            (Source::Packed, StreamPriority::Greatest, &mut packed),
        ] {
            comm.set_stream_priority(priority).map_err(comm_err)?;
            barrier(&mut comm).map_err(comm_err)?;
            // The publish as the learner and the sidecar run it: rank 0 sends the buckets
            // (straight from the live weights, or packed into a new buffer while earlier
            // buckets are sent), rank 1 receives into one flat buffer, both digest every
            // bucket on the GPU, then the commit compares the digests.
            let t0 = Instant::now();
            let hex = if args.rank == 0 {
                send(how, &named, &live, args, &mut comm, deadline)?
            } else {
                receive(&mut comm, &plan, device, deadline).map_err(comm_err)?.1
            };
            let data = t0.elapsed().as_secs_f64();
            let mine = digest_tensor(&hex, device);
            let sent = mine.copy();
            comm.broadcast_group(std::slice::from_ref(&sent), 0, Duration::from_secs(60))
                .map_err(comm_err)?;
            let same = bool::try_from(mine.eq_tensor(&sent).all()).unwrap_or(false);
            times.digest_ok &= same;
            if i >= 2 {
                times.publish.push(t0.elapsed().as_secs_f64());
                times.data.push(data);
            }
        }
    }
    let raw = median(raw_times);
    let digest_ok = lent.digest_ok && lent_default.digest_ok && packed.digest_ok;
    let (lent, lent_default, packed) = (
        lent.summary(bytes, raw),
        lent_default.summary(bytes, raw),
        packed.summary(bytes, raw),
    );
    let result = json!({
        "bench": "sync", "impl": "grpo-node nccl", "rank": args.rank, "shape": args.shape.name(),
        "bytes": bytes, "tensors": weights.len(), "buckets": layout.bucket_count(),
        "bucket_mb": args.sync_bucket_mb, "iters": args.iters,
        "raw_median_s": raw, "raw_gb_per_s": bytes as f64 / 1e9 / raw,
        "lent": lent, "lent_default_priority": lent_default, "packed": packed,
        "digest_ok": digest_ok,
    });
    println!("RESULT {result}");
    if !digest_ok {
        return Err(BenchError::Batches(
            "the receiver's digest differs from the sender's".into(),
        ));
    }
    Ok(())
}
