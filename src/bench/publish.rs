//! `grpo-node bench publish` (feature `cuda`): the learner's weight-sync path without the
//! Atropos API, for fault drills on the GPU machine. It loads a model onto a GPU as the
//! learner does, then makes one stand-in optimizer step after another (a small random update
//! of every weight) and publishes each version through the real WeightBroadcaster (NCCL, or the
//! gRPC stream for sidecars without NCCL) to real sidecar processes. Each step prints one
//! `STEP {json}` line with the broadcaster's view (newest acknowledged version, stale and
//! synced sidecars), so a drill can kill a sidecar mid-broadcast and show that steps continue,
//! the sidecar is marked stale, and it gets a full resync once it is back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::Actor;
use serde_json::json;
use tch::{Device, Tensor};

use crate::actors::weight_broadcaster::{
    BroadcasterArgs, BroadcasterMsg, LatestSlot, Payload, PublishJob, SyncStats, WeightBroadcaster,
};
use crate::engine::PolicyVersion;
use crate::model::safetensors_io::load_params;
use crate::model::ModelSpec;
use crate::rpc::auth::Token;
use crate::sync::client::Deadlines;
use crate::sync::nccl_publish::PackedWeights;

use super::BenchError;

/// Flags of `grpo-node bench publish`.
#[derive(Debug, clap::Args)]
pub struct PublishBenchArgs {
    /// HF model directory (the sidecars serve the same model).
    #[arg(long, env = "GRPO_MODEL_NAME")]
    pub model_name: PathBuf,
    /// CUDA device of the stand-in learner.
    #[arg(long, env = "GRPO_BENCH_GPU", default_value_t = 0)]
    pub gpu: usize,
    /// Sidecar gRPC URL; repeat for several.
    #[arg(long, env = "GRPO_SIDECAR", value_delimiter = ',')]
    pub sidecar: Vec<String>,
    /// Stand-in optimizer steps.
    #[arg(long, env = "GRPO_TRAINING_STEPS", default_value_t = 100)]
    pub steps: u64,
    /// Pause after each step, milliseconds.
    #[arg(long, env = "GRPO_BENCH_STEP_MS", default_value_t = 50)]
    pub step_ms: u64,
    /// NCCL bucket size, MiB.
    #[arg(long, env = "GRPO_SYNC_BUCKET_MB", default_value_t = 512)]
    pub sync_bucket_mb: u64,
}

/// Runs the drill.
pub async fn run(args: &PublishBenchArgs) -> Result<(), BenchError> {
    let spec = ModelSpec::from_dir(&args.model_name)?;
    let device = Device::Cuda(args.gpu);
    let params = load_params(&spec, &args.model_name, device)?;
    let weights: Vec<(String, Tensor)> = params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let stats = Arc::new(Mutex::new(SyncStats::default()));
    let slot: LatestSlot = Arc::new(Mutex::new(None));
    let (broadcaster, handle) = Actor::spawn(
        Some("weight_broadcaster".into()),
        WeightBroadcaster,
        BroadcasterArgs {
            sidecars: args.sidecar.clone(),
            token: Token(None),
            tls: Default::default(),
            deadlines: Deadlines {
                rpc: Duration::from_secs(10),
                min_bytes_per_s: 20e6,
            },
            bucket_bytes: 16 << 20,
            nccl_bucket_bytes: args.sync_bucket_mb << 20,
            slot: slot.clone(),
            stats: stats.clone(),
            health_every: Duration::from_secs(1),
            forget_after: Duration::from_secs(600),
        },
    )
    .await
    .map_err(|e| BenchError::Batches(format!("broadcaster: {e}")))?;
    let started = Instant::now();
    for step in 1..=args.steps {
        tch::no_grad(|| {
            for (_, w) in &weights {
                let mut w = w.shallow_clone();
                let _ = w.g_add_(&(w.randn_like() * 1e-4));
            }
        });
        let packed = PackedWeights::pack(&weights, args.gpu, args.sync_bucket_mb << 20)
            .map_err(|e| BenchError::Batches(format!("packing: {e}")))?;
        if let Ok(mut s) = slot.lock() {
            *s = Some(Arc::new(PublishJob {
                version: PolicyVersion(step),
                payload: Payload::Device(Arc::new(packed)),
            }));
        }
        broadcaster
            .cast(BroadcasterMsg::Publish)
            .map_err(|e| BenchError::Batches(e.to_string()))?;
        tokio::time::sleep(Duration::from_millis(args.step_ms)).await;
        let s = stats.lock().map(|s| s.clone()).unwrap_or_default();
        println!(
            "STEP {}",
            json!({"step": step, "t_s": started.elapsed().as_secs_f64(), "engine_version": s.engine_version,
                   "synced": s.synced_sidecars, "stale": s.stale_sidecars, "sync_time_s": s.sync_time_s})
        );
    }
    let _ = ractor::call!(broadcaster, BroadcasterMsg::Flush);
    broadcaster.stop(None);
    let _ = handle.await;
    Ok(())
}
