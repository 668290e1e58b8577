//! Checkpointer: writes HF checkpoints (or LoRA adapters in PEFT format) with their training
//! state off the async workers, then releases the spooled batches the checkpoint covers and prunes old checkpoints.

use std::path::{Path, PathBuf};

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::checkpoint::hf::{
    prune_dirs, prune_step_checkpoints, prune_sync_checkpoints, prune_sync_dirs, write_checkpoint_dir,
    ADAPTER_STEP_PREFIX, STEP_PREFIX,
};
use crate::checkpoint::{write_hf_checkpoint, CheckpointError, CheckpointKind, Spool};

use super::messages::{CheckpointJob, CheckpointerMsg};

pub struct Checkpointer;

/// Start-up arguments.
#[derive(Clone)]
pub struct CheckpointerArgs {
    pub save_path: PathBuf,
    pub source_model: PathBuf,
    pub max_shard_bytes: u64,
    pub keep: Option<usize>,
    pub spool: Spool,
}

/// Writes one checkpoint synchronously (also used directly by tests).
pub fn write_job(args: &CheckpointerArgs, job: &CheckpointJob) -> Result<PathBuf, CheckpointError> {
    if let Some((lora, tensors)) = &job.adapter {
        return write_adapter_job(args, job, lora, tensors);
    }
    let with_state = matches!(job.kind, CheckpointKind::Step(_));
    let path = write_hf_checkpoint(
        &args.save_path,
        job.kind,
        &args.source_model,
        &job.weights,
        args.max_shard_bytes,
        |dir: &Path| {
            if with_state {
                job.state.write(dir, &job.optimizer)
            } else {
                Ok(())
            }
        },
    )?;
    if let CheckpointKind::Sync(n) = job.kind {
        prune_sync_checkpoints(&args.save_path, n)?;
    }
    if with_state {
        args.spool.release_through(job.state.batches_consumed)?;
        if let Some(keep) = args.keep {
            for old in prune_step_checkpoints(&args.save_path, keep)? {
                tracing::debug!(path = %old.display(), "pruned checkpoint");
            }
        }
    }
    Ok(path)
}

/// A LoRA checkpoint: the adapter in PEFT format with the training state beside it (step
/// checkpoints), and the merged model as an HF checkpoint when the job carries it
/// (`--merge-lora-on-save`).
fn write_adapter_job(
    args: &CheckpointerArgs,
    job: &CheckpointJob,
    lora: &crate::model::lora::LoraSpec,
    tensors: &[(String, tch::Tensor)],
) -> Result<PathBuf, CheckpointError> {
    let with_state = matches!(job.kind, CheckpointKind::Step(_));
    let base = std::path::absolute(&args.source_model).unwrap_or_else(|_| args.source_model.clone());
    let path = write_checkpoint_dir(
        &args.save_path,
        &job.kind.adapter_dir_name(),
        &args.source_model,
        |dir| {
            crate::model::lora::save_adapter(dir, lora, tensors, &base.display().to_string())?;
            if with_state {
                job.state.write(dir, &job.optimizer)?;
            }
            Ok(())
        },
    )?;
    if !job.weights.is_empty() {
        write_hf_checkpoint(
            &args.save_path,
            job.kind,
            &args.source_model,
            &job.weights,
            args.max_shard_bytes,
            |_| Ok(()),
        )?;
    }
    if let CheckpointKind::Sync(n) = job.kind {
        prune_sync_dirs(&args.save_path, "sync_adapter_step_", n)?;
    }
    if with_state {
        args.spool.release_through(job.state.batches_consumed)?;
        if let Some(keep) = args.keep {
            for prefix in [ADAPTER_STEP_PREFIX, STEP_PREFIX] {
                for old in prune_dirs(&args.save_path, prefix, keep)? {
                    tracing::debug!(path = %old.display(), "pruned checkpoint");
                }
            }
        }
    }
    Ok(path)
}

impl Actor for Checkpointer {
    type Msg = CheckpointerMsg;
    type State = CheckpointerArgs;
    type Arguments = CheckpointerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<CheckpointerMsg>,
        args: CheckpointerArgs,
    ) -> Result<CheckpointerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<CheckpointerMsg>,
        msg: CheckpointerMsg,
        state: &mut CheckpointerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let CheckpointerMsg::Save(job, reply) = msg;
        let args = state.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || write_job(&args, &job)).await?;
        match &result {
            Ok(path) => {
                tracing::info!(path = %path.display(), seconds = started.elapsed().as_secs_f64(), "checkpoint written")
            }
            Err(e) => tracing::error!(error = %e, "checkpoint failed"),
        }
        let failed = result.is_err();
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
        if failed {
            return Err("checkpoint write failed".into());
        }
        Ok(())
    }
}
