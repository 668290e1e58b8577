//! AdamW with decoupled weight decay, step for step as `torch.optim.AdamW` (non-fused,
//! non-amsgrad), with its moments exposed for checkpointing.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

/// AdamW hyper-parameters; the defaults are torch's and the Atropos trainer's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Optimizer state: first and second moments per parameter name, and the step count.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Completed optimizer steps (torch's `state["step"]`).
    pub steps: u64,
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// Fresh state for the named parameters.
    pub fn new(config: AdamWConfig, params: &[(String, Tensor)]) -> Self {
        let moments = params
            .iter()
            .map(|(name, p)| (name.clone(), (p.zeros_like(), p.zeros_like())))
            .collect();
        Self {
            config,
            steps: 0,
            moments,
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self, params: &[(String, Tensor)], lr: f64) {
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        tch::no_grad(|| {
            for (name, p) in params {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let Some((m, v)) = self.moments.get_mut(name) else {
                    continue;
                };
                let mut p = p.shallow_clone();
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                let _ = m.lerp_(&grad, 1.0 - c.beta1);
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.g_add_(&(&grad * &grad * (1.0 - c.beta2)));
                let denom = v.sqrt() / bias2_sqrt + c.eps;
                let _ = p.g_add_(&(&*m / &denom * (-lr / bias1)));
            }
        });
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.moments.len() * 2);
        for (name, (m, v)) in &self.moments {
            out.push((format!("exp_avg.{name}"), m.to_device(tch::Device::Cpu).copy()));
            out.push((format!("exp_avg_sq.{name}"), v.to_device(tch::Device::Cpu).copy()));
        }
        out
    }

    /// Restores moments written by [`AdamW::state_tensors`]; every parameter must be present.
    pub fn load_state_tensors(&mut self, tensors: Vec<(String, Tensor)>, steps: u64) -> Result<(), String> {
        let mut by_name: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        for (name, (m, v)) in self.moments.iter_mut() {
            for (prefix, slot) in [("exp_avg", &mut *m), ("exp_avg_sq", &mut *v)] {
                let key = format!("{prefix}.{name}");
                let saved = by_name
                    .remove(&key)
                    .ok_or_else(|| format!("optimizer state lacks {key}"))?;
                if saved.size() != slot.size() {
                    return Err(format!("{key}: shape {:?}, expected {:?}", saved.size(), slot.size()));
                }
                tch::no_grad(|| slot.copy_(&saved.to_kind(Kind::Float)));
            }
        }
        self.steps = steps;
        Ok(())
    }
}
