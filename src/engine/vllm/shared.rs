//! Shared mode in vLLM (`--vllm-weight-transfer shared`): nothing moves. vLLM runs with our
//! worker extension; the learner on the same GPU asks for vLLM's parameters (names, layout and
//! CUDA IPC handles), maps them and trains them in place. Around each optimizer write it pauses
//! vLLM here (no forward runs while the weights change) and resumes it with the new version,
//! which the canary then checks. A pause holds the update lock, so nothing else swaps weights or
//! probes vLLM meanwhile, and ends by itself at its deadline if the learner never resumes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedMutexGuard};

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

    /// Pauses vLLM `launch` for a write, holding the update lock until the resume (or until
    /// `deadline`, when it resumes by itself). Returns the seconds the pause took.
    pub(super) async fn pause_shared(&self, launch: u64, deadline: Duration) -> Result<f64, EngineFailure> {
        self.check_shared()?;
        let t0 = Instant::now();
        let current = tokio::time::timeout(deadline, self.shared.current.clone().lock_owned())
            .await
            .map_err(|_| EngineFailure::Unavailable(format!("another update held vLLM past {deadline:?}")))?;
        let api = self.launch_api(launch)?;
        api.pause(self.cfg.pause_mode, deadline.min(self.cfg.update_deadline))
            .await?;
        let id = self.holds.made.fetch_add(1, Ordering::SeqCst);
        *self.holds.hold.lock().await = Some(Hold {
            launch,
            id,
            api,
            current,
        });
        let (holds, limit) = (self.holds.hold.clone(), self.cfg.update_deadline);
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let expired = {
                let mut slot = holds.lock().await;
                match slot.as_ref() {
                    Some(h) if h.id == id => slot.take(),
                    _ => None,
                }
            };
            if let Some(h) = expired {
                tracing::warn!(
                    launch = h.launch,
                    "the learner did not resume vLLM within its deadline; resuming it"
                );
                let _ = h.api.resume(limit).await;
            }
        });
        Ok(t0.elapsed().as_secs_f64())
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
                    let _ = h.api.resume(self.cfg.update_deadline).await;
                }
                return Err(EngineFailure::Rejected(format!(
                    "vLLM launch {launch} is not paused for a write (its pause passed its deadline, or vLLM restarted)"
                )));
            }
        };
        let Hold { api, mut current, .. } = hold;
        let t0 = Instant::now();
        let resumed = api.resume(self.cfg.update_deadline).await;
        let old = current.replace(Current {
            version,
            dir: None,
            owned: false,
            digest: None,
            adapter: None,
        });
        drop(current);
        remove_replaced(old, None);
        resumed?;
        let resume_s = t0.elapsed().as_secs_f64();
        let canary = canary.map(|(ids, logprobs)| Canary { ids, logprobs });
        let canary_max_abs_diff = self.check_canary(&api, canary).await?;
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
