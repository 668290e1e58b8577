//! LoRA adapters in vLLM (`--vllm-lora-rank`). `lora` mode hot-swaps: each version is written
//! in PEFT format under the weights directory and loaded with `/v1/load_lora_adapter` under a
//! new name (vLLM's prefix cache keys on the name, so a name is never reused), checked with the
//! learner's canary, and only then made the route of new generations. A request keeps the route
//! it began with until it returns; once no request holds an old adapter it is unloaded and its
//! directory removed. `lora-restart` mode restarts vLLM with the newest adapter preloaded
//! (`--lora-modules`) and measures the stall.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Current, SupervisorOrder, VllmEngine, VllmState};
use crate::engine::core::PolicyVersion;
use crate::engine::inference::{read_adapter_dir, AdapterUpdate, EngineFailure, Installed};
use crate::engine::vllm_api::VllmApi;

/// One adapter in vLLM: its name there and its PEFT directory.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub dir: PathBuf,
}

/// The route of new generations, and the names handed out so far.
#[derive(Debug, Default)]
pub struct Routes {
    current: std::sync::Mutex<Option<Arc<Route>>>,
    made: AtomicU64,
}

impl Routes {
    /// The adapter new generations go to (`None`: the base model). Holding the `Arc` marks
    /// the adapter in use.
    pub fn current(&self) -> Option<Arc<Route>> {
        crate::lock::recover(&self.current).clone()
    }

    fn replace(&self, route: Option<Arc<Route>>) -> Option<Arc<Route>> {
        std::mem::replace(&mut *crate::lock::recover(&self.current), route)
    }

    /// New generations go to the base model (full weights replaced the adapter).
    pub fn clear(&self) {
        self.replace(None);
    }

    fn next_name(&self) -> String {
        format!("grpo-lora-{}", self.made.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

/// Longest the adapter canary waits for running generations to drain (new ones wait meanwhile).
pub const CANARY_WAIT: Duration = Duration::from_secs(5);

/// Once no request holds `old` (at most `limit`), unloads it from vLLM and removes its files.
fn retire(api: VllmApi, old: Arc<Route>, limit: Duration) {
    tokio::spawn(async move {
        let until = Instant::now() + limit;
        while Arc::strong_count(&old) > 1 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Err(e) = api.unload_lora_adapter(&old.name, Duration::from_secs(30)).await {
            tracing::warn!(adapter = %old.name, error = %e, "unloading a replaced adapter failed");
        }
        let _ = std::fs::remove_dir_all(&old.dir);
        tracing::debug!(adapter = %old.name, "replaced adapter unloaded");
    });
}

impl VllmEngine {
    /// The largest |vLLM - learner| logprob over the canary tokens under the new adapter, run
    /// alone (see `VllmShared::gate`): running generations finish first and new ones wait, at
    /// most [`CANARY_WAIT`]; past that this version goes without a canary rather than stall
    /// generation longer.
    async fn adapter_canary(
        &self,
        api: &VllmApi,
        ids: &[i64],
        reference: &[f64],
    ) -> Result<Option<f64>, EngineFailure> {
        let waited = Instant::now();
        let Ok(_alone) = tokio::time::timeout(CANARY_WAIT, self.shared.gate.write()).await else {
            tracing::warn!(
                wait_s = CANARY_WAIT.as_secs_f64(),
                "generations kept running: this adapter goes without a canary"
            );
            return Ok(None);
        };
        let stall = Instant::now();
        let served = api.prompt_logprobs(ids, self.cfg.update_deadline).await?;
        tracing::debug!(
            wait_s = waited.elapsed().as_secs_f64(),
            stall_s = stall.elapsed().as_secs_f64(),
            "adapter canary"
        );
        Ok(Some(
            served
                .iter()
                .zip(reference)
                .map(|(s, r)| (s - r).abs())
                .fold(0.0, f64::max),
        ))
    }

    /// The adapter rank vLLM takes, or why it takes none.
    fn check_rank(&self, r: i64) -> Result<(), EngineFailure> {
        let max = self.cfg.lora_rank.ok_or_else(|| {
            EngineFailure::Rejected("start the sidecar with --vllm-lora-rank N to serve LoRA adapters".into())
        })?;
        if r > i64::from(max) {
            return Err(EngineFailure::Rejected(format!(
                "adapter rank {r} exceeds --vllm-lora-rank {max}"
            )));
        }
        Ok(())
    }

    /// `lora` mode: loads `update` under a new name, checks the canary on it, then routes new
    /// generations to it and retires the previous adapter.
    pub(super) async fn hot_swap_adapter(
        &self,
        update: AdapterUpdate,
        version: PolicyVersion,
    ) -> Result<Installed, EngineFailure> {
        self.check_rank(update.lora.r)?;
        let mut current = self.shared.current.lock().await;
        let api = self.ready(Duration::from_secs(5)).await?;
        let started = Instant::now();
        let name = self.route.next_name();
        let dir = self.cfg.weights_dir.join(&name);
        let (lora, tensors, base) = (update.lora, update.tensors, self.cfg.model_dir.display().to_string());
        let target = dir.clone();
        let saved =
            tokio::task::spawn_blocking(move || crate::model::lora::save_adapter(&target, &lora, &tensors, &base))
                .await
                .map_err(|e| EngineFailure::Failed(format!("writing the adapter: {e}")))
                .and_then(|r| r.map_err(|e| EngineFailure::Failed(format!("writing the adapter: {e}"))));
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let written = started.elapsed();
        let checked = async {
            api.load_lora_adapter(&name, &dir, self.cfg.update_deadline).await?;
            match &update.canary {
                Some((ids, reference)) => self.adapter_canary(&api.for_model(&name), ids, reference).await,
                None => Ok(None),
            }
        }
        .await;
        let canary_max_abs_diff = match checked {
            Ok(c) => c,
            Err(e) => {
                let _ = api.unload_lora_adapter(&name, Duration::from_secs(10)).await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let route = Arc::new(Route { name, dir });
        let old = self.route.replace(Some(route.clone()));
        *current = Some(Current {
            version,
            dir: None,
            owned: false,
            digest: None,
            adapter: Some((route.name.clone(), route.dir.clone())),
        });
        drop(current);
        if let Some(old) = old {
            retire(api, old, self.cfg.generate_deadline);
        }
        tracing::info!(
            version = version.0,
            adapter = %route.name,
            write_s = written.as_secs_f64(),
            total_s = started.elapsed().as_secs_f64(),
            canary_max_abs_diff,
            "vLLM serves the new adapter"
        );
        Ok(Installed { canary_max_abs_diff })
    }

    /// `lora-restart` mode: restarts vLLM with the adapter in `dir` loaded from the start and
    /// routes generations to it; records how long generation stalled. vLLM starts from the
    /// sidecar's own copy of the adapter (the learner prunes its directories, and a later
    /// relaunch after a crash must still find it). A repeat of the version already served is a
    /// no-op (a learner that timed out waiting resends it).
    pub(super) async fn restart_with_adapter(&self, dir: &Path, version: PolicyVersion) -> Result<(), EngineFailure> {
        let update = read_adapter_dir(dir, self.spec.clone()).await?;
        self.check_rank(update.lora.r)?;
        if self.already_serving(version).await {
            return Ok(());
        }
        let started = Instant::now();
        let name = self.route.next_name();
        let copy = self.cfg.weights_dir.join(&name);
        let (lora, tensors, base, target) = (
            update.lora,
            update.tensors,
            self.cfg.model_dir.display().to_string(),
            copy.clone(),
        );
        tokio::task::spawn_blocking(move || crate::model::lora::save_adapter(&target, &lora, &tensors, &base))
            .await
            .map_err(|e| EngineFailure::Failed(format!("copying the adapter: {e}")))?
            .map_err(|e| EngineFailure::Failed(format!("copying the adapter: {e}")))?;
        let mut current = self.shared.current.lock().await;
        let previous = current.as_ref().and_then(|c| c.adapter.clone());
        *current = Some(Current {
            version,
            dir: None,
            owned: false,
            digest: None,
            adapter: Some((name.clone(), copy.clone())),
        });
        drop(current);
        self.orders
            .send(SupervisorOrder::RestartWithAdapter(name.clone(), copy.clone()))
            .await
            .map_err(|_| EngineFailure::Unavailable("the vLLM supervisor has stopped".into()))?;
        // Route to the new name only once the old launch is down (it never had it).
        self.restart_begun().await;
        self.route.replace(Some(Arc::new(Route {
            name: name.clone(),
            dir: copy,
        })));
        if let Some((_, old)) = previous.filter(|(_, d)| d.starts_with(&self.cfg.weights_dir)) {
            let _ = std::fs::remove_dir_all(old);
        }
        self.ready(self.cfg.ready_wait).await?;
        let stall = started.elapsed().as_secs_f64();
        crate::telemetry::prom::sidecar().lora_restart_seconds.set(stall);
        tracing::info!(version = version.0, adapter = %name, stall_s = stall, "vLLM restarted with the new adapter");
        Ok(())
    }

    /// Whether vLLM is ready and already serves `version` with an adapter.
    async fn already_serving(&self, version: PolicyVersion) -> bool {
        let same = self
            .shared
            .current
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| c.version == version && c.adapter.is_some());
        same && matches!(*self.state.borrow(), VllmState::Ready { .. })
    }
}
