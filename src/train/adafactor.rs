//! Adafactor with a factored second moment, step for step as `transformers.optimization.
//! Adafactor` with an external learning rate (`scale_parameter=False, relative_step=False,
//! warmup_init=False`, no first moment): a matrix keeps one row and one column statistic
//! instead of a full second moment, so the optimizer state is about the size of the rows plus
//! the columns. Vectors keep a full second moment. Updates are clipped to an RMS of
//! `clip_threshold`; weight decay is decoupled (`p -= lr * wd * p`).
//!
//! Each parameter is updated whole, in fp32 (a split master is joined, updated, split back).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::adamw::MasterParam;
use super::optim_state::{check_grad_count, restore_slot, OptimizerError};
use super::split;

/// Adafactor hyper-parameters; the defaults are transformers'.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorConfig {
    /// Added to the squared gradient.
    pub eps1: f64,
    pub clip_threshold: f64,
    /// The second moment's decay is `1 - step^decay_rate`.
    pub decay_rate: f64,
    pub weight_decay: f64,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            eps1: 1e-30,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter's second moment.
enum Moment {
    /// Matrices and up: the mean over the last dim (rows) and over the one before (columns).
    Factored {
        row: Tensor,
        col: Tensor,
    },
    Full(Tensor),
}

pub struct Adafactor {
    pub config: AdafactorConfig,
    /// Completed optimizer steps.
    pub steps: u64,
    moments: BTreeMap<String, Moment>,
}

fn rms(t: &Tensor) -> Tensor {
    t.square().mean(Kind::Float).sqrt()
}

impl Adafactor {
    /// Fresh (zero) state for the named parameters, on each one's device.
    pub fn new(config: AdafactorConfig, params: &[MasterParam]) -> Self {
        let moments = params
            .iter()
            .map(|p| {
                let (shape, device) = (p.value.size(), p.value.device());
                let m = if shape.len() >= 2 {
                    let (rows, cols) = (
                        &shape[..shape.len() - 1],
                        [&shape[..shape.len() - 2], &shape[shape.len() - 1..]].concat(),
                    );
                    Moment::Factored {
                        row: Tensor::zeros(rows, (Kind::Float, device)),
                        col: Tensor::zeros(cols.as_slice(), (Kind::Float, device)),
                    }
                } else {
                    Moment::Full(Tensor::zeros(shape.as_slice(), (Kind::Float, device)))
                };
                (p.name.clone(), m)
            })
            .collect();
        Self {
            config,
            steps: 0,
            moments,
        }
    }

    /// One update of every parameter whose gradient (aligned with `params`) is defined; each
    /// gradient is used as `fp32(grad) * grad_scale`.
    pub fn step(
        &mut self,
        params: &[MasterParam],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), OptimizerError> {
        check_grad_count(params.len(), grads.len())?;
        self.steps += 1;
        let beta2t = 1.0 - (self.steps as f64).powf(self.config.decay_rate);
        let c = self.config;
        tch::no_grad(|| {
            for (p, g) in params.iter().zip(grads).filter(|(_, g)| g.defined()) {
                let Some(moment) = self.moments.get(&p.name) else {
                    continue;
                };
                let g32 = g.detach().to_kind(Kind::Float);
                let grad = if grad_scale == 1.0 { g32 } else { g32 * grad_scale };
                let master = match &p.low {
                    Some(low) => split::join(&p.value, low),
                    None => p.value.shallow_clone(),
                };
                let sq = grad.square() + c.eps1;
                let mut update = match moment {
                    Moment::Factored { row, col } => {
                        let (mut row, mut col) = (row.shallow_clone(), col.shallow_clone());
                        let _ = row.g_mul_scalar_(beta2t);
                        let _ = row.g_add_(&(sq.mean_dim(-1, false, Kind::Float) * (1.0 - beta2t)));
                        let _ = col.g_mul_scalar_(beta2t);
                        let _ = col.g_add_(&(sq.mean_dim(-2, false, Kind::Float) * (1.0 - beta2t)));
                        let r = (&row / row.mean_dim(-1, true, Kind::Float)).rsqrt().unsqueeze(-1);
                        let cf = col.unsqueeze(-2).rsqrt();
                        r * cf * &grad
                    }
                    Moment::Full(v) => {
                        let mut v = v.shallow_clone();
                        let _ = v.g_mul_scalar_(beta2t);
                        let _ = v.g_add_(&(&sq * (1.0 - beta2t)));
                        v.rsqrt() * &grad
                    }
                };
                let scale = (rms(&update) / c.clip_threshold).clamp_min(1.0);
                update = update / scale * lr;
                let mut m = master.shallow_clone();
                if c.weight_decay != 0.0 {
                    let _ = m.g_add_(&(&master * (-c.weight_decay * lr)));
                }
                let _ = m.g_sub_(&update);
                if let Some(low) = &p.low {
                    split::split_into(&m, &p.value, low);
                }
            }
        });
        Ok(())
    }

    /// The second moments as named tensors for a checkpoint (`exp_avg_sq_row.NAME`,
    /// `exp_avg_sq_col.NAME`, or `exp_avg_sq.NAME`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device_(tch::Device::Cpu, Kind::Float, false, true);
        let mut out = Vec::new();
        for (name, m) in &self.moments {
            match m {
                Moment::Factored { row, col } => {
                    out.push((format!("exp_avg_sq_row.{name}"), cpu(row)));
                    out.push((format!("exp_avg_sq_col.{name}"), cpu(col)));
                }
                Moment::Full(v) => out.push((format!("exp_avg_sq.{name}"), cpu(v))),
            }
        }
        out
    }

    /// Restores state written by [`Adafactor::state_tensors`]; every parameter must be present.
    pub fn load_state_tensors(&mut self, tensors: Vec<(String, Tensor)>, steps: u64) -> Result<(), OptimizerError> {
        let mut by_name: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        let mut take = |key: String, slot: &Tensor| restore_slot(&mut by_name, key, slot, "Adafactor", false);
        for (name, m) in &self.moments {
            match m {
                Moment::Factored { row, col } => {
                    take(format!("exp_avg_sq_row.{name}"), row)?;
                    take(format!("exp_avg_sq_col.{name}"), col)?;
                }
                Moment::Full(v) => take(format!("exp_avg_sq.{name}"), v)?,
            }
        }
        self.steps = steps;
        Ok(())
    }
}
