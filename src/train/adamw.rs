//! AdamW with decoupled weight decay, step for step as `torch.optim.AdamW` (non-amsgrad),
//! with its moments exposed for checkpointing. Two implementations of the same update:
//! libtorch's fused kernel (`_fused_adamw_`, the default; a few launches for all parameters)
//! and a per-tensor loop of tch ops (the reference the fused one is tested against).
//!
//! The update runs on slices of at most [`SLICE_ELEMENTS`] elements, grouped a few at a time,
//! so that the fp32 temporaries it needs (gradients cast to fp32, masters joined from their
//! halves, a bf16 first moment widened) never exceed a few hundred MB, whatever the size of the
//! largest tensor (an embedding of 150k x 1.5k is 233M elements).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::optim_state::{check_grad_count, restore_slot, OptimizerError};
use super::split;

/// Elements per slice and per group of slices in one update call.
pub const SLICE_ELEMENTS: i64 = 1 << 25;
/// Slices per group (the fused kernel takes lists).
const GROUP_SLICES: usize = 64;

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

/// A trainable parameter as the optimizer sees it: `value` is the fp32 master itself, or (with
/// `low`) the bf16 high half of a master split by [`split`], `low` being its int16 low half.
pub struct MasterParam {
    pub name: String,
    pub value: Tensor,
    pub low: Option<Tensor>,
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

/// Cuts tensors of `numels` elements into slices `(tensor, offset, length)` of at most
/// `max` elements, and groups consecutive slices into groups of at most `max` elements and
/// `per_group` slices.
pub fn slice_groups(numels: &[i64], max: i64, per_group: usize) -> Vec<Vec<(usize, i64, i64)>> {
    let max = max.max(1);
    let mut groups: Vec<Vec<(usize, i64, i64)>> = Vec::new();
    let mut filled = 0i64;
    for (i, &n) in numels.iter().enumerate() {
        let mut off = 0;
        while off < n {
            let len = (n - off).min(max);
            match groups.last_mut() {
                Some(g) if filled + len <= max && g.len() < per_group => {
                    g.push((i, off, len));
                    filled += len;
                }
                _ => {
                    groups.push(vec![(i, off, len)]);
                    filled = len;
                }
            }
            off += len;
        }
    }
    groups
}

/// A flat view of a contiguous tensor's slice.
fn slice_of(t: &Tensor, off: i64, len: i64) -> Tensor {
    t.detach().reshape([-1]).narrow(0, off, len)
}

/// Optimizer state: first and second moments per parameter name, and the step count. The
/// second moment is fp32; the first is fp32 or bf16 (`exp_avg_kind`).
pub struct AdamW {
    pub config: AdamWConfig,
    /// Use libtorch's fused kernel.
    pub fused: bool,
    /// Completed optimizer steps (torch's `state["step"]`).
    pub steps: u64,
    /// Elements per slice (and per group of slices) of one update call.
    pub slice_elements: i64,
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

/// One group's fp32 operands, and where the temporaries among them go back to.
#[derive(Default)]
struct Operands {
    params: Vec<Tensor>,
    grads: Vec<Tensor>,
    exp_avgs: Vec<Tensor>,
    exp_avg_sqs: Vec<Tensor>,
    /// (joined master, high half, low half) for split masters.
    split_back: Vec<(Tensor, Tensor, Tensor)>,
    /// (widened fp32 first moment, its bf16 storage).
    exp_avg_back: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    /// Fresh state for the named parameters (zeros shaped like each, on its device).
    pub fn new(config: AdamWConfig, params: &[MasterParam], exp_avg_kind: Kind) -> Self {
        let moments = params
            .iter()
            .map(|p| {
                let (shape, device) = (p.value.size(), p.value.device());
                (
                    p.name.clone(),
                    (
                        Tensor::zeros(shape.as_slice(), (exp_avg_kind, device)),
                        Tensor::zeros(shape.as_slice(), (Kind::Float, device)),
                    ),
                )
            })
            .collect();
        Self {
            config,
            fused: false,
            steps: 0,
            slice_elements: SLICE_ELEMENTS,
            moments,
        }
    }

    /// One update of every parameter whose gradient (`grads[i]`, aligned with `params`) is
    /// defined. Gradients may be in any float dtype: each is used as `fp32(grad) * grad_scale`
    /// (the clip coefficient).
    pub fn step(
        &mut self,
        params: &[MasterParam],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), OptimizerError> {
        check_grad_count(params.len(), grads.len())?;
        self.steps += 1;
        let live: Vec<(&MasterParam, &Tensor, &(Tensor, Tensor))> = params
            .iter()
            .zip(grads)
            .filter(|(_, g)| g.defined())
            .filter_map(|(p, g)| self.moments.get(&p.name).map(|mv| (p, g, mv)))
            .collect();
        let Some(first) = live.first() else {
            return Ok(());
        };
        // The fused kernel only reads the step count, so every slice can share one counter.
        let step = Tensor::from(self.steps as f32).to_device(first.0.value.device());
        let numels: Vec<i64> = live.iter().map(|(p, _, _)| p.value.numel() as i64).collect();
        tch::no_grad(|| {
            for group in slice_groups(&numels, self.slice_elements, GROUP_SLICES) {
                let mut ops = Operands::default();
                for (i, off, len) in group {
                    let (p, g, (m, v)) = live[i];
                    let value = slice_of(&p.value, off, len);
                    match &p.low {
                        Some(low) => {
                            let low = slice_of(low, off, len);
                            let master = split::join(&value, &low);
                            ops.params.push(master.shallow_clone());
                            ops.split_back.push((master, value, low));
                        }
                        None => ops.params.push(value),
                    }
                    ops.grads.push(scaled_fp32(&slice_of(g, off, len), grad_scale));
                    let m = slice_of(m, off, len);
                    if m.kind() == Kind::Float {
                        ops.exp_avgs.push(m);
                    } else {
                        let wide = m.to_kind(Kind::Float);
                        ops.exp_avgs.push(wide.shallow_clone());
                        ops.exp_avg_back.push((wide, m));
                    }
                    ops.exp_avg_sqs.push(slice_of(v, off, len));
                }
                if self.fused {
                    self.update_fused(&ops, &step, lr)?;
                } else {
                    self.update_loop(&ops, lr);
                }
                for (master, hi, lo) in &ops.split_back {
                    split::split_into(master, hi, lo);
                }
                for (wide, m) in &ops.exp_avg_back {
                    let mut m = m.shallow_clone();
                    m.copy_(wide);
                }
            }
            Ok(())
        })
    }

    fn update_fused(&self, ops: &Operands, step: &Tensor, lr: f64) -> Result<(), OptimizerError> {
        let c = self.config;
        crate::torch_ext::fused_adamw(
            &crate::torch_ext::AdamWGroup {
                params: &ops.params,
                grads: &ops.grads,
                exp_avgs: &ops.exp_avgs,
                exp_avg_sqs: &ops.exp_avg_sqs,
                steps: &ops.params.iter().map(|_| step.shallow_clone()).collect::<Vec<_>>(),
            },
            crate::torch_ext::FusedAdamW {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                weight_decay: c.weight_decay,
                eps: c.eps,
            },
        )?;
        Ok(())
    }

    fn update_loop(&self, ops: &Operands, lr: f64) {
        let c = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (((p, g), m), v) in ops
            .params
            .iter()
            .zip(&ops.grads)
            .zip(&ops.exp_avgs)
            .zip(&ops.exp_avg_sqs)
        {
            let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
            let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            let _ = m.lerp_(g, 1.0 - c.beta1);
            let _ = v.g_mul_scalar_(c.beta2);
            let _ = v.g_add_(&(g * g * (1.0 - c.beta2)));
            let denom = v.sqrt() / bias2_sqrt + c.eps;
            let _ = p.g_add_(&(&m / &denom * (-lr / bias1)));
        }
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.moments.len() * 2);
        for (name, (m, v)) in &self.moments {
            out.push((
                format!("exp_avg.{name}"),
                m.to_device_(tch::Device::Cpu, Kind::Float, false, true),
            ));
            out.push((
                format!("exp_avg_sq.{name}"),
                v.to_device_(tch::Device::Cpu, v.kind(), false, true),
            ));
        }
        out
    }

    /// Restores moments written by [`AdamW::state_tensors`]; every parameter must be present.
    pub fn load_state_tensors(&mut self, tensors: Vec<(String, Tensor)>, steps: u64) -> Result<(), OptimizerError> {
        let mut by_name: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        for (name, (m, v)) in &self.moments {
            restore_slot(&mut by_name, format!("exp_avg.{name}"), m, "AdamW", false)?;
            restore_slot(&mut by_name, format!("exp_avg_sq.{name}"), v, "AdamW", false)?;
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    fn plain(name: &str, t: Tensor) -> MasterParam {
        MasterParam {
            name: name.into(),
            value: t.set_requires_grad(true),
            low: None,
        }
    }

    fn make() -> Vec<MasterParam> {
        tch::manual_seed(7);
        vec![
            plain("a", Tensor::randn([3, 5], (Kind::Float, Device::Cpu))),
            plain("b", Tensor::randn([7], (Kind::Float, Device::Cpu))),
        ]
    }

    /// Gradients of a fixed function of the parameters' fp32 values.
    fn grads_of(values: &[Tensor], step: usize) -> Vec<Tensor> {
        values
            .iter()
            .map(|v| {
                let v = v.detach().to_kind(Kind::Float);
                (&v * (step as f64 + 1.0)).cos() * &v * 2.0 * (step as f64 + 1.0)
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[])
    }

    #[test]
    fn slices_cover_every_element_once_within_bounds() {
        let groups = slice_groups(&[10, 3, 25, 0, 4], 8, 3);
        for g in &groups {
            assert!(g.len() <= 3);
            assert!(g.iter().map(|s| s.2).sum::<i64>() <= 8);
        }
        let flat: Vec<(usize, i64, i64)> = groups.concat();
        for (i, n) in [10i64, 3, 25, 0, 4].iter().enumerate() {
            let mut next = 0;
            for &(_, off, len) in flat.iter().filter(|s| s.0 == i) {
                assert_eq!(off, next, "tensor {i} slices are contiguous and in order");
                assert!(len > 0);
                next += len;
            }
            assert_eq!(next, *n, "tensor {i} fully covered");
        }
    }

    /// The fused kernel and the per-tensor loop give the same parameters and moments over
    /// several steps (fp32, CPU), also when tensors are cut into slices.
    #[test]
    fn fused_matches_unfused() {
        let pa = make();
        let pb: Vec<MasterParam> = pa.iter().map(|p| plain(&p.name, p.value.detach().copy())).collect();
        let mut fused = AdamW::new(AdamWConfig::default(), &pa, Kind::Float);
        fused.fused = true;
        fused.slice_elements = 4;
        let mut plain = AdamW::new(AdamWConfig::default(), &pb, Kind::Float);
        for step in 0..4 {
            let ga = grads_of(&pa.iter().map(|p| p.value.shallow_clone()).collect::<Vec<_>>(), step);
            let gb = grads_of(&pb.iter().map(|p| p.value.shallow_clone()).collect::<Vec<_>>(), step);
            fused.step(&pa, &ga, 1e-2, 0.5).expect("fused step");
            plain.step(&pb, &gb, 1e-2, 0.5).expect("plain step");
        }
        for (a, b) in pa.iter().zip(&pb) {
            let diff = max_diff(&a.value, &b.value);
            assert!(diff < 1e-6, "parameters differ by {diff}");
            assert!(a.value.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
        let (sa, sb) = (fused.state_tensors(), plain.state_tensors());
        for ((na, a), (_, b)) in sa.iter().zip(&sb) {
            let diff = max_diff(a, b);
            assert!(diff < 1e-6, "{na} differs by {diff}");
        }
        assert_eq!(fused.steps, 4);
    }

    /// Split masters (bf16 high half + int16 low half) follow the same fp32 trajectory as
    /// plain fp32 masters given the same gradients; a bf16 first moment stays within bf16
    /// rounding of the fp32 one.
    #[test]
    fn split_masters_train_like_fp32_masters() {
        let reference = make();
        let as_split = |ps: &[MasterParam]| -> Vec<MasterParam> {
            ps.iter()
                .map(|p| {
                    let (hi, lo) = split::split(&p.value.detach());
                    MasterParam {
                        name: p.name.clone(),
                        value: hi.set_requires_grad(true),
                        low: Some(lo),
                    }
                })
                .collect()
        };
        let split_fp32_m = as_split(&reference);
        let split_bf16_m = as_split(&reference);
        let mut opt_ref = AdamW::new(AdamWConfig::default(), &reference, Kind::Float);
        let mut opt_a = AdamW::new(AdamWConfig::default(), &split_fp32_m, Kind::Float);
        let mut opt_b = AdamW::new(AdamWConfig::default(), &split_bf16_m, Kind::BFloat16);
        for opt in [&mut opt_ref, &mut opt_a, &mut opt_b] {
            opt.fused = true;
            opt.slice_elements = 6;
        }
        let masters = |ps: &[MasterParam]| -> Vec<Tensor> {
            ps.iter()
                .map(|p| match &p.low {
                    Some(lo) => split::join(&p.value.detach(), lo),
                    None => p.value.detach().copy(),
                })
                .collect()
        };
        for step in 0..5 {
            // The same gradients for all three: computed from the reference's masters.
            let g = grads_of(&masters(&reference), step);
            opt_ref.step(&reference, &g, 1e-2, 0.7).expect("reference step");
            opt_a.step(&split_fp32_m, &g, 1e-2, 0.7).expect("split step");
            opt_b.step(&split_bf16_m, &g, 1e-2, 0.7).expect("split bf16-m step");
        }
        for ((r, a), b) in masters(&reference)
            .iter()
            .zip(masters(&split_fp32_m))
            .zip(masters(&split_bf16_m))
        {
            assert_eq!(
                max_diff(r, &a),
                0.0,
                "split fp32 masters are the fp32 masters, bit for bit"
            );
            let d = max_diff(r, &b);
            // Five steps of lr 1e-2 move each weight by at most 5e-2; bf16 first moments
            // perturb each update by about 2^-9 of itself.
            assert!(d < 5e-2 * 2f64.powi(-7), "bf16 first moment drifted by {d}");
        }
        // The compute weights (high halves) are the masters rounded to bf16.
        for (p, m) in split_fp32_m.iter().zip(masters(&split_fp32_m)) {
            assert!(max_diff(&p.value, &m) <= m.abs().max().double_value(&[]) * 2f64.powi(-8));
        }
    }
}
