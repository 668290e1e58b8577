//! A learner rank above 0 (`--learner-ranks N --learner-rank R`, R > 0): builds the same
//! trainer as rank 0, takes rank 0's state when the ranks meet, then trains its share of every
//! batch rank 0 sends until rank 0 says stop. It talks to no API, writes no checkpoint and
//! publishes no weights: rank 0 does all of that for the run.

use std::future::Future;

use crate::actors::messages::RunOutcome;
use crate::comm::gloo::Rendezvous;
use crate::config::learner::DataParallelConfig;
use crate::config::LearnerConfig;
use crate::model::ModelSpec;
use crate::train::data_parallel::DataParallel;
use crate::train::{TrainError, Trainer};

use super::learner::{build_trainer, trainer_config, LearnerError};

/// Meets the other ranks and takes rank 0's state (rank 0 sends it).
pub fn join(trainer: &mut Trainer, dp: &DataParallelConfig, device: tch::Device) -> Result<(), TrainError> {
    let rv = Rendezvous {
        host: dp.host.clone(),
        port: dp.port,
        bind: dp.bind.to_string(),
        rank: dp.rank,
        world: dp.ranks,
        timeout: dp.timeout,
    };
    let group = DataParallel::join(&rv, device, dp.bucket_bytes)?;
    trainer.join_data_parallel(group)
}

/// Builds, joins and follows rank 0 on a thread of its own; returns the steps trained.
fn follow(cfg: &LearnerConfig, dp: &DataParallelConfig, device: tch::Device) -> Result<u64, LearnerError> {
    let spec = ModelSpec::from_dir(&cfg.model_name)?;
    let tcfg = trainer_config(cfg, device, &spec);
    tch::manual_seed(cfg.seed as i64);
    let mut trainer = build_trainer(
        &spec,
        &cfg.model_name,
        None,
        cfg.lora.clone(),
        cfg.train_layer_indices.as_ref(),
        (tcfg, cfg.seed as i64),
    )?;
    join(&mut trainer, dp, device)?;
    tracing::info!(
        rank = dp.rank,
        ranks = dp.ranks,
        step = trainer.steps_done(),
        "following learner rank 0"
    );
    let steps = trainer.follow_rank0(|m| {
        tracing::info!(
            rank = dp.rank,
            step = m.step,
            loss = m.loss,
            grad_norm = m.grad_norm,
            allreduce_wait_s = m.allreduce_wait_s,
            "step"
        );
    })?;
    Ok(steps)
}

/// Runs this rank until rank 0 stops it, it fails, or `shutdown` resolves.
pub async fn run(cfg: LearnerConfig, shutdown: impl Future<Output = ()>) -> Result<RunOutcome, LearnerError> {
    let Some(dp) = cfg.data_parallel.clone() else {
        return Err(LearnerError::Actors(
            "a learner rank above 0 needs --learner-ranks".into(),
        ));
    };
    let device = cfg.device.to_tch().map_err(LearnerError::Device)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("grpo-rank-{}", dp.rank))
        .spawn(move || {
            let _ = tx.send(follow(&cfg, &dp, device));
        })
        .map_err(|source| LearnerError::Io {
            context: "starting the rank's model thread".into(),
            source,
        })?;
    tokio::select! {
        done = rx => match done {
            Ok(Ok(steps)) => Ok(RunOutcome::Completed { steps }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LearnerError::Actors("the rank's model thread died".into())),
        },
        _ = shutdown => Ok(RunOutcome::Interrupted { steps: 0 }),
    }
}
