//! Shared mode in vLLM (`--vllm-weight-transfer shared`): nothing moves. vLLM runs with our
//! worker extension; the learner on the same GPU asks for vLLM's parameters (names, layout and
//! CUDA IPC handles), maps them and trains them in place. Around each optimizer write it pauses
//! vLLM here (no forward runs while the weights change) and resumes it with the new version,
//! which the canary then checks. A pause holds the update lock, so nothing else swaps weights or
//! probes vLLM meanwhile. A pause the learner never ends restarts vLLM at its deadline (its
//! weights may be half written); the learner then maps the new launch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedMutexGuard};

use super::SupervisorOrder;
use super::{ready_launch, remove_replaced, Canary, Current, VllmEngine, VllmState, WeightTransfer};
use crate::engine::core::PolicyVersion;
use crate::engine::inference::{EngineFailure, Installed, SharedParams};
use crate::engine::vllm_api::VllmApi;
use crate::engine::vllm_shared::{check_layout, parse_export};

/// vLLM paused for a learner's write: the launch, this pause's id, the update lock.
struct Hold {
    launch: u64,
    id: u64,
    api: VllmApi,
    current: OwnedMutexGuard<Option<Current>>,
}

/// The pause in force, if any.
#[derive(Default)]
pub struct Holds {
    hold: Arc<Mutex<Option<Hold>>>,
    made: AtomicU64,
}

impl VllmEngine {
    fn check_shared(&self) -> Result<(), EngineFailure> {
        if self.cfg.transfer == WeightTransfer::Shared {
            Ok(())
        } else {
            Err(EngineFailure::Rejected(
                "this vLLM does not share its weights (--vllm-weight-transfer shared)".into(),
            ))
        }
    }

    /// The ready vLLM's launch and API, if it is that of `launch`.
    fn launch_api(&self, launch: u64) -> Result<VllmApi, EngineFailure> {
        match &*self.state.borrow() {
            VllmState::Ready { launch: now, base } if *now == launch => {
                VllmApi::new(base.clone(), self.cfg.served_name.clone())
            }
            VllmState::Ready { launch: now, .. } => Err(EngineFailure::Unavailable(format!(
                "vLLM was restarted: launch {now} serves, the learner mapped launch {launch}"
            ))),
            VllmState::Starting { .. } => Err(EngineFailure::Unavailable("vLLM is restarting".into())),
            VllmState::Failed { reason } => Err(EngineFailure::Unavailable(reason.clone())),
        }
    }

    /// vLLM's parameters as its one worker exports them, checked against our model.
    pub(super) async fn export_shared(&self) -> Result<SharedParams, EngineFailure> {
        self.check_shared()?;
        let mut state = self.state.clone();
        let (launch, base) = ready_launch(&mut state, self.cfg.ready_wait).await?;
        let api = VllmApi::new(base, self.cfg.served_name.clone())?;
        let results = api.shared_export(self.cfg.update_deadline).await?;
        let [one] = results.as_slice() else {
            return Err(EngineFailure::Rejected(format!(
                "shared mode needs one vLLM worker (tensor and pipeline parallel 1); vLLM has {}",
                results.len()
            )));
        };
        let export = parse_export(one).map_err(|e| EngineFailure::Failed(e.to_string()))?;
        check_layout(&self.spec, &export).map_err(|e| EngineFailure::Rejected(e.to_string()))?;
        tracing::info!(launch, params = export.params.len(), gpu = %export.gpu_uuid, "vLLM exported its parameters");
        Ok(SharedParams { launch, export })
    }

    /// Pauses vLLM `launch` for a write, holding the update lock until the resume. A pause that no
    /// resume ends within `deadline` (the learner died or hung mid-write, or this call was
    /// abandoned after vLLM paused) restarts vLLM: its weights may be half written.
    pub(super) async fn pause_shared(&self, launch: u64, deadline: Duration) -> Result<f64, EngineFailure> {
        self.check_shared()?;
        let t0 = Instant::now();
        let current = tokio::time::timeout(deadline, self.shared.current.clone().lock_owned())
            .await
            .map_err(|_| EngineFailure::Unavailable(format!("another update held vLLM past {deadline:?}")))?;
        let api = self.launch_api(launch)?;
        let id = self.holds.made.fetch_add(1, Ordering::SeqCst);
        let stored = Arc::new(AtomicBool::new(false));
        self.arm_watchdog(launch, id, deadline, stored.clone());
        tracing::info!(launch, pause = id, "pausing vLLM for a shared write");
        api.pause(self.cfg.pause_mode, deadline.min(self.cfg.update_deadline))
            .await?;
        *self.holds.hold.lock().await = Some(Hold {
            launch,
            id,
            api,
            current,
        });
        stored.store(true, Ordering::SeqCst);
        Ok(t0.elapsed().as_secs_f64())
    }

    /// After `deadline`: if pause `id` still holds vLLM (or was abandoned before it was stored),
    /// forget the served version and restart vLLM on the base model, unless vLLM has been
    /// restarted meanwhile (the paused process is gone, and the new launch was never paused).
    fn arm_watchdog(&self, launch: u64, id: u64, deadline: Duration, stored: Arc<AtomicBool>) {
        let (holds, orders, model) = (self.holds.hold.clone(), self.orders.clone(), self.cfg.model_dir.clone());
        let state = self.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let expired = {
                let mut slot = holds.lock().await;
                match slot.as_ref() {
                    Some(h) if h.id == id => slot.take(),
                    _ => None,
                }
            };
            let serves = matches!(&*state.borrow(), VllmState::Ready { launch: now, .. } if *now == launch);
            let verdict = overdue(expired.is_some(), stored.load(Ordering::SeqCst), serves);
            if let Some(mut h) = expired {
                // The version it recorded may be half written: a restart reloads the base model.
                *h.current = None;
            }
            match verdict {
                Overdue::Nothing => {}
                Overdue::Forget => tracing::warn!(
                    launch,
                    pause = id,
                    "a pause passed its deadline after vLLM had restarted; nothing to undo"
                ),
                Overdue::Restart => {
                    tracing::error!(
                        launch,
                        pause = id,
                        "no resume within the pause's deadline; restarting vLLM"
                    );
                    let _ = orders.send(SupervisorOrder::RestartOn(model)).await;
                }
            }
        });
    }

    /// Resumes vLLM `launch`, which now serves `version` (the learner wrote it in place), and
    /// checks the canary.
    pub(super) async fn resume_shared(
        &self,
        launch: u64,
        version: PolicyVersion,
        canary: Option<(Vec<i64>, Vec<f64>)>,
    ) -> Result<Installed, EngineFailure> {
        self.check_shared()?;
        let hold = self.holds.hold.lock().await.take();
        let hold = match hold {
            Some(h) if h.launch == launch => h,
            other => {
                if let Some(h) = other {
                    // Paused for another launch: resume it rather than leave it held.
                    if let Err(e) = h.api.resume(self.cfg.update_deadline).await {
                        tracing::warn!(launch = h.launch, error = %e, "resuming a stale shared pause failed");
                    }
                }
                return Err(EngineFailure::Rejected(format!(
                    "vLLM launch {launch} is not paused for a write (its pause passed its deadline, or vLLM restarted)"
                )));
            }
        };
        let Hold { api, mut current, .. } = hold;
        let t0 = Instant::now();
        if let Err(e) = api.resume(self.cfg.update_deadline).await {
            tracing::error!(launch, error = %e, "vLLM did not resume after a shared write");
            *current = None;
            return Err(e);
        }
        let old = current.replace(Current {
            version,
            dir: None,
            owned: false,
            digest: None,
            adapter: None,
        });
        drop(current);
        remove_replaced(old, None);
        let resume_s = t0.elapsed().as_secs_f64();
        let canary = canary.map(|(ids, logprobs)| Canary { ids, logprobs });
        // vLLM serves the version either way: a canary that cannot run costs only the canary.
        let canary_max_abs_diff = self.check_canary(&api, canary).await.unwrap_or_else(|e| {
            tracing::warn!(version = version.0, error = %e, "the shared-mode canary failed");
            None
        });
        tracing::info!(
            version = version.0,
            transfer = "shared",
            resume_s,
            canary_max_abs_diff,
            "vLLM serves the new version"
        );
        Ok(Installed { canary_max_abs_diff })
    }
}

/// What a pause's watchdog does at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overdue {
    /// The pause was resumed in time (or failed before vLLM could have paused and was settled).
    Nothing,
    /// The pause is overdue, but the launch it paused no longer serves: forget, do not restart.
    Forget,
    /// The paused launch still serves and may be paused with half-written weights: restart it.
    Restart,
}

/// `held`: the pause still holds vLLM (no resume came). `stored`: the pause call got as far as
/// recording its hold (false: it failed or was abandoned, and vLLM may be paused anyway).
/// `serves`: the launch the pause was for is still the one serving.
fn overdue(held: bool, stored: bool, serves: bool) -> Overdue {
    match (held || !stored, serves) {
        (false, _) => Overdue::Nothing,
        (true, true) => Overdue::Restart,
        (true, false) => Overdue::Forget,
    }
}

#[cfg(test)]
mod tests {
    use super::{overdue, Overdue};

    /// A resumed pause costs nothing; an overdue one restarts vLLM only while the launch it
    /// paused still serves. The H200 kill drill met the last case: the learner's pause failed on
    /// the killed launch, and its watchdog must not restart the launch that replaced it.
    #[test]
    fn an_overdue_pause_restarts_only_the_launch_it_paused() {
        assert_eq!(overdue(false, true, true), Overdue::Nothing);
        assert_eq!(overdue(false, true, false), Overdue::Nothing);
        assert_eq!(overdue(true, true, true), Overdue::Restart);
        assert_eq!(overdue(false, false, true), Overdue::Restart);
        assert_eq!(overdue(true, true, false), Overdue::Forget);
        assert_eq!(overdue(false, false, false), Overdue::Forget);
    }
}
