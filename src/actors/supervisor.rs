//! The learner node's root actor: spawns and links the children, turns a child's failure into
//! the run's outcome, and runs the one shutdown path (drain -> checkpoint -> stop).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::batch_fetcher::{BatchFetcher, FetcherArgs};
use super::checkpointer::{Checkpointer, CheckpointerArgs};
use super::learner::{Learner, LearnerArgs};
use super::messages::{CheckpointerMsg, FetcherMsg, LearnerMsg, PreprocessorMsg, RunOutcome, SupervisorMsg};
use super::preprocessor::{Preprocessor, PreprocessorArgs};

pub struct LearnerSupervisor;

/// Everything the children need; the supervisor wires their references together.
pub struct SupervisorArgs {
    pub checkpointer: CheckpointerArgs,
    /// Learner arguments less the checkpointer reference.
    pub learner: Box<dyn FnOnce(ActorRef<CheckpointerMsg>) -> LearnerArgs + Send>,
    /// Preprocessor arguments less the learner reference.
    /// Limits, micro-batch rows, the token budget of token-budget packing, shared prompts.
    pub preprocessor: (crate::grpo::Limits, usize, Option<usize>, bool),
    /// Fetcher arguments less the preprocessor reference.
    pub fetcher: Box<dyn FnOnce(ActorRef<PreprocessorMsg>) -> FetcherArgs + Send>,
    pub draining: Arc<AtomicBool>,
    pub outcome: tokio::sync::mpsc::Sender<RunOutcome>,
}

pub struct SupervisorState {
    fetcher: ActorRef<FetcherMsg>,
    learner: ActorRef<LearnerMsg>,
    checkpointer: ActorRef<CheckpointerMsg>,
    preprocessor: ActorRef<PreprocessorMsg>,
    draining: Arc<AtomicBool>,
    outcome: tokio::sync::mpsc::Sender<RunOutcome>,
}

impl Actor for LearnerSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let cell = myself.get_cell();
        let (draining, outcome) = (args.draining, args.outcome);
        let (checkpointer, _) = Actor::spawn_linked(
            Some("checkpointer".into()),
            Checkpointer,
            args.checkpointer,
            cell.clone(),
        )
        .await?;
        let learner_args = (args.learner)(checkpointer.clone());
        let (learner, _) = Actor::spawn_linked(Some("learner".into()), Learner, learner_args, cell.clone()).await?;
        let (limits, micro_batch, micro_batch_tokens, shared_prompt) = args.preprocessor;
        let pre_args = PreprocessorArgs {
            limits,
            micro_batch,
            micro_batch_tokens,
            shared_prompt,
            learner: learner.clone(),
        };
        let (preprocessor, _) =
            Actor::spawn_linked(Some("preprocessor".into()), Preprocessor, pre_args, cell.clone()).await?;
        let fetcher_args = (args.fetcher)(preprocessor.clone());
        let (fetcher, _) = Actor::spawn_linked(Some("batch_fetcher".into()), BatchFetcher, fetcher_args, cell).await?;
        Ok(SupervisorState {
            fetcher,
            learner,
            checkpointer,
            preprocessor,
            draining,
            outcome,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisorMsg::Shutdown(reply) = msg;
        state.draining.store(true, Ordering::SeqCst);
        state.fetcher.stop(Some("shutdown".into()));
        if let Err(e) = ractor::call!(state.learner, LearnerMsg::Drain) {
            tracing::error!(error = %e, "the learner could not drain");
        }
        for cell in [
            state.preprocessor.get_cell(),
            state.learner.get_cell(),
            state.checkpointer.get_cell(),
        ] {
            cell.stop(Some("shutdown".into()));
        }
        let _ = reply.send(());
        myself.stop(None);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let who = cell.get_name().unwrap_or_else(|| "actor".into());
                tracing::error!(actor = %who, error = %err, "actor failed; stopping the node");
                state.draining.store(true, Ordering::SeqCst);
                let _ = state
                    .outcome
                    .send(RunOutcome::Failed(format!("{who} failed: {err}")))
                    .await;
                myself.stop_children(None);
                myself.stop(None);
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) if !state.draining.load(Ordering::SeqCst) => {
                let who = cell.get_name().unwrap_or_else(|| "actor".into());
                tracing::error!(actor = %who, reason = ?reason, "actor stopped unexpectedly; stopping the node");
                let _ = state
                    .outcome
                    .send(RunOutcome::Failed(format!("{who} stopped unexpectedly")))
                    .await;
                myself.stop_children(None);
                myself.stop(None);
            }
            _ => {}
        }
        Ok(())
    }
}
