//! BatchFetcher: polls `GET /batch` with capped exponential backoff, spools every batch to
//! disk before handing it on, replays the spool first after a resume, re-registers when the
//! API lost its registration, and never crashes on a slow or absent API.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;

use crate::atropos::{AtroposClient, AtroposError, BatchPoll, Registration};
use crate::checkpoint::{BatchSeq, Spool};

use super::messages::{FetcherMsg, PreprocessorMsg, RawBatch};

/// First wait after an empty poll.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);

pub struct BatchFetcher;

/// Start-up arguments.
pub struct FetcherArgs {
    pub client: AtroposClient,
    pub registration: Registration,
    pub reset_api: bool,
    pub spool: Spool,
    /// Spooled batches not yet trained, replayed before the API is polled.
    pub replay: Vec<BatchSeq>,
    pub next_seq: BatchSeq,
    pub credits: Arc<Semaphore>,
    pub max_backoff: Duration,
    pub preprocessor: ActorRef<PreprocessorMsg>,
}

pub struct FetcherState {
    args: FetcherArgs,
    replay: VecDeque<BatchSeq>,
    backoff: Duration,
    waiting_since: Instant,
    waiting_for_credit: bool,
    failures: u64,
}

impl FetcherState {
    fn schedule(&mut self, myself: &ActorRef<FetcherMsg>) {
        myself.send_after(self.backoff, || FetcherMsg::Poll);
        self.backoff = (self.backoff * 2).min(self.args.max_backoff);
    }

    fn hand_on(&mut self, seq: BatchSeq, groups: Vec<serde_json::Value>) -> Result<(), ActorProcessingErr> {
        let wait_time_s = self.waiting_since.elapsed().as_secs_f64();
        self.args.preprocessor.cast(PreprocessorMsg::Raw(RawBatch {
            seq,
            groups,
            wait_time_s,
        }))?;
        self.waiting_since = Instant::now();
        self.backoff = MIN_BACKOFF;
        Ok(())
    }

    fn note_failure(&mut self, err: &AtroposError) {
        self.failures += 1;
        crate::telemetry::prom::learner().api_errors.inc();
        // First failure, then every 20th, so an API that is down for minutes stays readable.
        if self.failures == 1 || self.failures.is_multiple_of(20) {
            tracing::warn!(failures = self.failures, error = %err, retry_in_ms = self.backoff.as_millis() as u64,
                "Atropos API unavailable; retrying");
        }
    }
}

impl Actor for BatchFetcher {
    type Msg = FetcherMsg;
    type State = FetcherState;
    type Arguments = FetcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<FetcherMsg>,
        args: FetcherArgs,
    ) -> Result<FetcherState, ActorProcessingErr> {
        myself.cast(FetcherMsg::Poll)?;
        Ok(FetcherState {
            replay: args.replay.iter().copied().collect(),
            args,
            backoff: MIN_BACKOFF,
            waiting_since: Instant::now(),
            waiting_for_credit: false,
            failures: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<FetcherMsg>,
        msg: FetcherMsg,
        state: &mut FetcherState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // A waiter is already parked on the semaphore; it will send CreditReturned.
            FetcherMsg::Poll if state.waiting_for_credit => return Ok(()),
            FetcherMsg::Poll => {}
            FetcherMsg::CreditReturned => state.waiting_for_credit = false,
        }
        match state.args.credits.clone().try_acquire_owned() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                // Wait for the learner to return a credit, then poll again; no busy loop.
                state.waiting_for_credit = true;
                let credits = state.args.credits.clone();
                let me = myself.clone();
                tokio::spawn(async move {
                    if let Ok(permit) = credits.acquire_owned().await {
                        drop(permit);
                        let _ = me.cast(FetcherMsg::CreditReturned);
                    }
                });
                return Ok(());
            }
        }
        if let Some(seq) = state.replay.pop_front() {
            let spool = state.args.spool.clone();
            let groups = tokio::task::spawn_blocking(move || spool.read(seq)).await??;
            tracing::info!(batch_seq = seq.0, groups = groups.len(), "replaying spooled batch");
            state.hand_on(seq, groups)?;
            myself.cast(FetcherMsg::Poll)?;
            return Ok(());
        }
        let outcome = state.args.client.poll_batch().await;
        if !matches!(outcome, Ok(BatchPoll::Batch(_))) {
            state.args.credits.add_permits(1);
        }
        match outcome {
            Ok(BatchPoll::Batch(groups)) => {
                state.failures = 0;
                let seq = state.args.next_seq;
                state.args.next_seq = BatchSeq(seq.0 + 1);
                // The spool write ends in an fsync: on a blocking thread.
                let spool = state.args.spool.clone();
                let groups = tokio::task::spawn_blocking(move || spool.write(seq, &groups).map(|()| groups)).await??;
                tracing::debug!(batch_seq = seq.0, groups = groups.len(), "batch received");
                state.hand_on(seq, groups)?;
                myself.cast(FetcherMsg::Poll)?;
            }
            Ok(BatchPoll::Empty) => {
                state.failures = 0;
                state.schedule(&myself);
            }
            Ok(BatchPoll::NotRegistered) => {
                tracing::warn!(url = %state.args.client.base(), "the Atropos API lost our registration (restarted or reset); registering again");
                match state
                    .args
                    .client
                    .register_checked(&state.args.registration, state.args.reset_api)
                    .await
                {
                    Ok(uuid) => {
                        crate::telemetry::prom::learner().api_registrations.inc();
                        tracing::info!(uuid = %uuid.0, "registered again");
                    }
                    Err(e @ AtroposError::Wedged { .. }) => return Err(e.into()),
                    Err(e) => state.note_failure(&e),
                }
                state.schedule(&myself);
            }
            Err(e) => {
                state.note_failure(&e);
                state.schedule(&myself);
            }
        }
        Ok(())
    }
}
