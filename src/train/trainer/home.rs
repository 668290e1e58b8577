//! Compute weights in memory another process owns: shared mode with vLLM. The trainer's bf16
//! compute weights (the high halves of its split fp32 masters) become views of vLLM's own
//! parameters, mapped by the learner; the int16 low halves and the optimizer state stay ours,
//! so the masters stay exact. Around each optimizer write a [`WriteFence`] pauses the owner and
//! lets it serve the new version after. If the owner is gone, the trainer copies its compute
//! weights back into its own memory before the write (the mapping outlives the owner until it is
//! closed), so no step and no bit of the masters is lost; a later [`Trainer::adopt_home`] writes
//! them into the restarted owner's memory.

use std::collections::{BTreeMap, BTreeSet};

use tch::{Device, Kind, Tensor};

use super::{TrainError, Trainer};
use crate::model::{ParamStore, Transformer};

/// Why the owner of the compute weights cannot take a write now.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FenceError(pub String);

/// What a fenced write cost and what the owner served after it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SharedWrite {
    /// The version the owner serves now.
    pub version: u64,
    /// Seconds of pause and resume around the write.
    pub seconds: f64,
    /// The owner's canary against ours on the new weights.
    pub canary_max_abs_diff: Option<f64>,
}

/// The owner of the compute weights' memory, asked around each optimizer write. Dropped when the
/// trainer takes its weights back (after the memory is no longer used).
pub trait WriteFence: Send {
    /// Before the optimizer writes: Ok once the owner reads no weight until [`Self::after_write`];
    /// Err when it is gone (the trainer then takes its weights back and writes its own copy).
    fn before_write(&mut self) -> Result<f64, FenceError>;
    /// After the write of `version`: the owner may read the weights again. `model` computes on
    /// them (for the canary).
    fn after_write(&mut self, version: u64, model: &Transformer, paused_s: f64) -> Result<SharedWrite, FenceError>;
}

/// Memory offered to hold the compute weights: one tensor per parameter (normally views of
/// vLLM's parameters, mapped), and the fence of their owner.
pub struct Home {
    pub views: BTreeMap<String, Tensor>,
    pub fence: Box<dyn WriteFence>,
}

/// How often an idle trainer with a home channel looks for a new home.
pub const HOME_POLL: std::time::Duration = std::time::Duration::from_millis(500);

impl Trainer {
    /// Shared mode: the trainer adopts the homes that arrive on `homes` (between steps, or within
    /// [`HOME_POLL`] when idle).
    pub fn set_homes(&mut self, homes: std::sync::mpsc::Receiver<Home>) {
        self.homes = Some(homes);
    }

    /// Adopts the newest home offered, if any: pauses its owner, copies the current weights in,
    /// computes with it from now on, and lets the owner serve them. Returns what the owner
    /// reported.
    pub fn adopt_home(&mut self) -> Result<Option<SharedWrite>, TrainError> {
        let Some(home) = self.homes.as_ref().and_then(|rx| rx.try_iter().last()) else {
            return Ok(None);
        };
        if self.fence.is_some() {
            self.take_home_back()?;
        }
        let Home { views, mut fence } = home;
        let paused = match fence.before_write() {
            Ok(paused) => paused,
            Err(e) => {
                tracing::warn!(error = %e, "the offered home's owner cannot pause; the weights stay ours");
                return Ok(None);
            }
        };
        let moved = self.move_into(views);
        self.fence = Some(fence);
        if let Err(e) = moved {
            // Nothing was written: the owner resumes on what it had.
            tracing::error!(error = %e, "the offered home does not fit; the weights stay ours");
            let _ = self.fence_after_write(paused);
            self.fence = None;
            return Err(e);
        }
        let done = self.fence_after_write(paused)?;
        if let Some(d) = &done {
            tracing::info!(
                version = d.version,
                seconds = d.seconds,
                canary_max_abs_diff = d.canary_max_abs_diff,
                "the compute weights live in the shared engine's memory"
            );
        }
        Ok(done)
    }

    /// Moves the compute weights into `views` (shaped and typed as ours, on our device): copies
    /// the current weights in and computes with `views` from now on. The caller keeps the owner
    /// from reading meanwhile.
    fn move_into(&mut self, views: BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        if self.lora.is_some() || self.low.is_none() || self.dp.is_some() {
            return Err(TrainError::Home(
                "shared mode with vLLM needs bf16 compute over split fp32 masters, without LoRA and with one learner rank".into(),
            ));
        }
        for (name, ours) in self.params.iter() {
            let v = views
                .get(name)
                .ok_or_else(|| TrainError::Home(format!("no shared tensor for {name}")))?;
            if v.size() != ours.size() || v.kind() != ours.kind() || v.device() != ours.device() {
                return Err(TrainError::Home(format!(
                    "{name}: shared {:?} {:?} on {:?}, ours {:?} {:?} on {:?}",
                    v.size(),
                    v.kind(),
                    v.device(),
                    ours.size(),
                    ours.kind(),
                    ours.device()
                )));
            }
        }
        tch::no_grad(|| {
            for (name, ours) in self.params.iter() {
                if let Some(v) = views.get(name) {
                    let mut v = v.shallow_clone();
                    v.copy_(ours);
                }
            }
        });
        self.synchronize();
        self.install_compute(views)?;
        self.release_cached();
        Ok(())
    }

    /// Gives the caching allocator's free blocks (our former compute weights among them) back to
    /// the driver, so the GPU holds one copy of the weights, not one plus a reserve.
    fn release_cached(&self) {
        if let Device::Cuda(i) = self.config.device {
            let released = crate::torch_ext::cuda_release_cached(i);
            let now = crate::torch_ext::cuda_memory(i);
            tracing::info!(
                device = i,
                released_bytes = released,
                allocated_bytes = now.map(|m| m.allocated),
                reserved_bytes = now.map(|m| m.reserved),
                "released the allocator's cached blocks"
            );
        }
    }

    /// Whether the compute weights live in another process's memory.
    pub fn is_rehomed(&self) -> bool {
        self.fence.is_some()
    }

    /// Copies the compute weights back into memory of our own and drops the fence (which may then
    /// close its mappings).
    pub fn take_home_back(&mut self) -> Result<(), TrainError> {
        let own: BTreeMap<String, Tensor> = tch::no_grad(|| {
            self.params
                .iter()
                .map(|(n, t)| (n.clone(), t.detach().copy()))
                .collect()
        });
        self.synchronize();
        self.install_compute(own)?;
        self.fence = None;
        Ok(())
    }

    fn synchronize(&self) {
        if let Device::Cuda(i) = self.config.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Computes with `tensors` from now on (the trainable ones as the optimizer's values). Nothing
    /// changes unless every part is ready.
    fn install_compute(&mut self, tensors: BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        let names: BTreeSet<String> = self.trainable.iter().map(|p| p.name.clone()).collect();
        let mut store = ParamStore::from_tensors(tensors);
        store.set_trainable(|n| names.contains(n));
        let values = self
            .trainable
            .iter()
            .map(|p| {
                store
                    .get(&p.name)
                    .ok_or_else(|| TrainError::Home(format!("{} is missing", p.name)))
            })
            .collect::<Result<Vec<Tensor>, _>>()?;
        let spec = self.model.spec().clone();
        let model = Transformer::new(&spec, &store)?.with_compute(Kind::BFloat16);
        for (p, value) in self.trainable.iter_mut().zip(values) {
            p.value = value;
        }
        self.model = model;
        self.params = store;
        self.flat_compute = None;
        Ok(())
    }

    /// Before the optimizer writes: asks the fence; if the owner is gone, takes the weights back.
    /// Returns the pause's seconds when the write goes into the owner's memory.
    pub(super) fn fence_before_write(&mut self) -> Result<Option<f64>, TrainError> {
        let Some(fence) = self.fence.as_mut() else {
            return Ok(None);
        };
        match fence.before_write() {
            Ok(paused) => Ok(Some(paused)),
            Err(e) => {
                tracing::warn!(error = %e, "the shared weights' owner is gone; the learner takes its weights back");
                self.take_home_back()?;
                Ok(None)
            }
        }
    }

    /// After a fenced write: lets the owner serve version `steps_done`; an error takes the weights
    /// back (the owner died during the write).
    pub(super) fn fence_after_write(&mut self, paused_s: f64) -> Result<Option<SharedWrite>, TrainError> {
        self.synchronize();
        let Some(mut fence) = self.fence.take() else {
            return Ok(None);
        };
        match fence.after_write(self.steps_done, &self.model, paused_s) {
            Ok(done) => {
                self.fence = Some(fence);
                Ok(Some(done))
            }
            Err(e) => {
                tracing::warn!(error = %e, "the shared weights' owner did not take the new version; the learner takes its weights back");
                self.fence = Some(fence);
                self.take_home_back()?;
                Ok(None)
            }
        }
    }
}
