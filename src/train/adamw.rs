//! AdamW with decoupled weight decay, step for step as `torch.optim.AdamW` (non-amsgrad),
//! with its moments exposed for checkpointing. Two implementations of the same update:
//! libtorch's fused kernel (`_fused_adamw_`, the default; a few launches for all parameters)
//! and a per-tensor loop of tch ops (the reference the fused one is tested against).

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

/// `fp32(grad) * scale`, without a copy when there is nothing to do.
fn scaled_fp32(grad: &Tensor, scale: f64) -> Tensor {
    let g = if grad.kind() == Kind::Float {
        grad.shallow_clone()
    } else {
        grad.to_kind(Kind::Float)
    };
    if scale == 1.0 {
        g
    } else {
        g * scale
    }
}

/// Optimizer state: first and second moments per parameter name, and the step count.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Use libtorch's fused kernel.
    pub fused: bool,
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
            fused: false,
            steps: 0,
            moments,
        }
    }

    /// One update of every parameter whose gradient (`grads[i]`, aligned with `params`) is
    /// defined. Gradients may be in any float dtype: each is used as `fp32(grad) * grad_scale`
    /// (the clip coefficient), converted a group of tensors at a time so that fp32 copies of
    /// all gradients never exist at once.
    pub fn step(
        &mut self,
        params: &[(String, Tensor)],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), String> {
        if grads.len() != params.len() {
            return Err(format!("{} gradients for {} parameters", grads.len(), params.len()));
        }
        if self.fused {
            self.step_fused(params, grads, lr, grad_scale)
        } else {
            self.step_unfused(params, grads, lr, grad_scale);
            Ok(())
        }
    }

    fn step_fused(
        &mut self,
        params: &[(String, Tensor)],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), String> {
        /// Parameters per fused call.
        const GROUP: usize = 32;
        let c = self.config;
        self.steps += 1;
        let live: Vec<(&Tensor, &Tensor, &(Tensor, Tensor))> = params
            .iter()
            .zip(grads)
            .filter(|(_, g)| g.defined())
            .filter_map(|((name, p), g)| self.moments.get(name).map(|mv| (p, g, mv)))
            .collect();
        let Some(first) = live.first() else {
            return Ok(());
        };
        // The kernel only reads the step count, so every parameter can share one counter.
        let step = Tensor::from(self.steps as f32).to_device(first.0.device());
        tch::no_grad(|| {
            for chunk in live.chunks(GROUP) {
                let grads: Vec<Tensor> = chunk.iter().map(|(_, g, _)| scaled_fp32(g, grad_scale)).collect();
                crate::torch_ext::fused_adamw(
                    &crate::torch_ext::AdamWGroup {
                        params: &chunk.iter().map(|(p, _, _)| p.detach()).collect::<Vec<_>>(),
                        grads: &grads,
                        exp_avgs: &chunk.iter().map(|(_, _, mv)| mv.0.shallow_clone()).collect::<Vec<_>>(),
                        exp_avg_sqs: &chunk.iter().map(|(_, _, mv)| mv.1.shallow_clone()).collect::<Vec<_>>(),
                        steps: &chunk.iter().map(|_| step.shallow_clone()).collect::<Vec<_>>(),
                    },
                    crate::torch_ext::FusedAdamW {
                        lr,
                        beta1: c.beta1,
                        beta2: c.beta2,
                        weight_decay: c.weight_decay,
                        eps: c.eps,
                    },
                )?;
            }
            Ok(())
        })
    }

    fn step_unfused(&mut self, params: &[(String, Tensor)], grads: &[Tensor], lr: f64, grad_scale: f64) {
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        tch::no_grad(|| {
            for ((name, p), grad) in params.iter().zip(grads) {
                if !grad.defined() {
                    continue;
                }
                let Some((m, v)) = self.moments.get_mut(name) else {
                    continue;
                };
                let grad = &scaled_fp32(grad, grad_scale);
                let mut p = p.shallow_clone();
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                let _ = m.lerp_(grad, 1.0 - c.beta1);
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.g_add_(&(grad * grad * (1.0 - c.beta2)));
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

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    /// The fused kernel and the per-tensor loop give the same parameters and moments over
    /// several steps (fp32, CPU).
    #[test]
    fn fused_matches_unfused() {
        let make = || {
            tch::manual_seed(7);
            vec![
                (
                    "a".to_string(),
                    Tensor::randn([3, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                ),
                (
                    "b".to_string(),
                    Tensor::randn([7], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                ),
            ]
        };
        let (pa, pb) = (make(), make());
        let mut fused = AdamW::new(AdamWConfig::default(), &pa);
        fused.fused = true;
        let mut plain = AdamW::new(AdamWConfig::default(), &pb);
        for step in 0..4 {
            for params in [&pa, &pb] {
                for (_, p) in params.iter() {
                    let mut p = p.shallow_clone();
                    p.zero_grad();
                }
                let loss = params
                    .iter()
                    .map(|(_, p)| (p * p * (step as f64 + 1.0)).sin().sum(Kind::Float))
                    .fold(Tensor::from(0f32), |acc, x| acc + x);
                loss.backward();
            }
            let grads = |ps: &[(String, Tensor)]| ps.iter().map(|(_, p)| p.grad()).collect::<Vec<_>>();
            fused.step(&pa, &grads(&pa), 1e-2, 0.5).expect("fused step");
            plain.step(&pb, &grads(&pb), 1e-2, 0.5).expect("plain step");
        }
        for ((_, a), (_, b)) in pa.iter().zip(&pb) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "parameters differ by {diff}");
            assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
        let (sa, sb) = (fused.state_tensors(), plain.state_tensors());
        for ((na, a), (_, b)) in sa.iter().zip(&sb) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{na} differs by {diff}");
        }
        assert_eq!(fused.steps, 4);
    }
}
