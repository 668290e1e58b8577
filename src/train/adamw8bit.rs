//! AdamW with 8-bit blockwise moments, as bitsandbytes' `AdamW8bit` (`optim_bits=8`,
//! `block_wise=True`): each moment is stored as one byte per element, an index into a fixed
//! 256-entry "dynamic" code (signed for the first moment, unsigned for the second), scaled by
//! the absolute maximum of its block of 256 elements. Each step dequantizes a slice, runs the
//! fp32 Adam update (decoupled weight decay), writes the parameter and quantizes the moments
//! back to the nearest code value. Tensors under 4096 elements keep fp32 moments, as
//! bitsandbytes' `min_8bit_size`.
//!
//! Optimizer memory: 2 bytes per parameter plus 8 bytes per block of 256 (AdamW: 8, or 6 with
//! a bf16 first moment).

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::adamw::{AdamWConfig, MasterParam, SLICE_ELEMENTS};
use super::optim_state::{check_grad_count, restore_slot, OptimizerError};
use super::split;

/// Elements per quantization block (bitsandbytes' optimizer block size).
pub const BLOCK: i64 = 256;
/// Tensors with fewer elements keep fp32 moments (bitsandbytes' `min_8bit_size` default).
pub const MIN_8BIT_SIZE: i64 = 4096;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted
/// values in [-1, 1] (or [0, 1]), dense near zero. Built with libtorch's own `linspace` and
/// fp32 arithmetic, so it equals the Python map bit for bit.
pub fn dynamic_map(signed: bool) -> Tensor {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = if signed { (1i64 << i) + 1 } else { (1i64 << (i + 1)) + 1 };
        let bounds = Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu));
        let means = (bounds.narrow(0, 0, items - 1) + bounds.narrow(0, 1, items - 1)) / 2.0;
        let scale = 10f64.powi(i - 6);
        let push = |t: Tensor, data: &mut Vec<f32>| {
            data.extend(Vec::<f32>::try_from(&t).unwrap_or_default());
        };
        push(&means * scale, &mut data);
        if signed {
            push(&means * -scale, &mut data);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    Tensor::from_slice(&data)
}

/// One code on one device: the values, and the midpoints that `bucketize` rounds to nearest by.
struct Code {
    values: Tensor,
    bounds: Tensor,
}

impl Code {
    fn new(signed: bool, device: Device) -> Self {
        let values = dynamic_map(signed).to_device(device);
        let bounds = (values.narrow(0, 0, 255) + values.narrow(0, 1, 255)) / 2.0;
        Self { values, bounds }
    }

    /// fp32 values of `q` (uint8, a whole number of blocks except maybe the last) times each
    /// block's `absmax`.
    fn dequantize(&self, q: &Tensor, absmax: &Tensor) -> Tensor {
        let n = q.numel() as i64;
        let per = absmax.repeat_interleave_self_int(BLOCK, 0, None).narrow(0, 0, n);
        self.values.index_select(0, &q.to_kind(Kind::Int64)) * per
    }

    /// Writes `x` (fp32) into `q` and `absmax` as the nearest code value of `x / absmax`.
    fn quantize_into(&self, x: &Tensor, q: &Tensor, absmax: &Tensor) {
        let n = x.numel() as i64;
        let full = n / BLOCK * BLOCK;
        let mut maxes = Vec::new();
        if full > 0 {
            maxes.push(x.narrow(0, 0, full).view([-1, BLOCK]).abs().amax([1].as_slice(), false));
        }
        if full < n {
            maxes.push(x.narrow(0, full, n - full).abs().amax([0].as_slice(), true));
        }
        let am = Tensor::cat(&maxes, 0);
        let per = am
            .clamp_min(1e-38)
            .repeat_interleave_self_int(BLOCK, 0, None)
            .narrow(0, 0, n);
        let scaled = (x / per).clamp(-1.0, 1.0);
        let idx = Tensor::bucketize(&scaled, &self.bounds, true, false);
        q.shallow_clone().copy_(&idx);
        absmax.shallow_clone().copy_(&am);
    }
}

/// One parameter's moments.
enum Moments {
    /// Quantized: codes and per-block absolute maxima of the first and second moment.
    Q8 {
        m: Tensor,
        m_max: Tensor,
        v: Tensor,
        v_max: Tensor,
    },
    /// Small tensors: plain fp32.
    F32 { m: Tensor, v: Tensor },
}

pub struct AdamW8bit {
    pub config: AdamWConfig,
    /// Completed optimizer steps.
    pub steps: u64,
    moments: BTreeMap<String, Moments>,
    /// (signed, unsigned) codes per device.
    codes: Vec<(Device, Code, Code)>,
}

/// A flat view of a contiguous tensor's slice.
fn flat(t: &Tensor, off: i64, len: i64) -> Tensor {
    t.detach().reshape([-1]).narrow(0, off, len)
}

impl AdamW8bit {
    /// Fresh (zero) state for the named parameters, on each one's device.
    pub fn new(config: AdamWConfig, params: &[MasterParam]) -> Self {
        let mut codes: Vec<(Device, Code, Code)> = Vec::new();
        let moments = params
            .iter()
            .map(|p| {
                let (n, device) = (p.value.numel() as i64, p.value.device());
                if !codes.iter().any(|(d, _, _)| *d == device) {
                    codes.push((device, Code::new(true, device), Code::new(false, device)));
                }
                let m = if n >= MIN_8BIT_SIZE {
                    let blocks = (n + BLOCK - 1) / BLOCK;
                    let zeros = |len: i64, kind: Kind| Tensor::zeros([len], (kind, device));
                    // Index of 0.0 in either code: a zero moment dequantizes to 0 whatever its
                    // absmax, and absmax starts at 0 anyway.
                    Moments::Q8 {
                        m: zeros(n, Kind::Uint8),
                        m_max: zeros(blocks, Kind::Float),
                        v: zeros(n, Kind::Uint8),
                        v_max: zeros(blocks, Kind::Float),
                    }
                } else {
                    let zeros = || Tensor::zeros([n], (Kind::Float, device));
                    Moments::F32 { m: zeros(), v: zeros() }
                };
                (p.name.clone(), m)
            })
            .collect();
        Self {
            config,
            steps: 0,
            moments,
            codes,
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
        tch::no_grad(|| {
            for (p, g) in params.iter().zip(grads).filter(|(_, g)| g.defined()) {
                let Some(moments) = self.moments.get(&p.name) else {
                    continue;
                };
                let Some((_, signed, unsigned)) = self.codes.iter().find(|(d, _, _)| *d == p.value.device()) else {
                    return Err(OptimizerError::NoCode(p.name.clone()));
                };
                let n = p.value.numel() as i64;
                let mut off = 0;
                while off < n {
                    let len = (n - off).min(SLICE_ELEMENTS);
                    let slice = Slice { p, grad: g, off, len };
                    slice.update(moments, (signed, unsigned), self.config, self.steps, lr, grad_scale);
                    off += len;
                }
            }
            Ok(())
        })
    }

    /// The moments as named tensors for a checkpoint: `state1.NAME`/`absmax1.NAME` and
    /// `state2.NAME`/`absmax2.NAME` (bitsandbytes' names) for quantized ones, `exp_avg.NAME`
    /// and `exp_avg_sq.NAME` for fp32 ones.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(Device::Cpu).copy();
        let mut out = Vec::new();
        for (name, m) in &self.moments {
            match m {
                Moments::Q8 { m, m_max, v, v_max } => {
                    out.push((format!("state1.{name}"), cpu(m)));
                    out.push((format!("absmax1.{name}"), cpu(m_max)));
                    out.push((format!("state2.{name}"), cpu(v)));
                    out.push((format!("absmax2.{name}"), cpu(v_max)));
                }
                Moments::F32 { m, v } => {
                    out.push((format!("exp_avg.{name}"), cpu(m)));
                    out.push((format!("exp_avg_sq.{name}"), cpu(v)));
                }
            }
        }
        out
    }

    /// Restores state written by [`AdamW8bit::state_tensors`]; every parameter must be present.
    pub fn load_state_tensors(&mut self, tensors: Vec<(String, Tensor)>, steps: u64) -> Result<(), OptimizerError> {
        let mut by_name: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        let mut take = |key: String, slot: &Tensor| restore_slot(&mut by_name, key, slot, "8-bit AdamW", true);
        for (name, m) in &self.moments {
            match m {
                Moments::Q8 { m, m_max, v, v_max } => {
                    take(format!("state1.{name}"), m)?;
                    take(format!("absmax1.{name}"), m_max)?;
                    take(format!("state2.{name}"), v)?;
                    take(format!("absmax2.{name}"), v_max)?;
                }
                Moments::F32 { m, v } => {
                    take(format!("exp_avg.{name}"), m)?;
                    take(format!("exp_avg_sq.{name}"), v)?;
                }
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// `len` elements of one parameter from `off` (a multiple of [`BLOCK`]).
struct Slice<'a> {
    p: &'a MasterParam,
    grad: &'a Tensor,
    off: i64,
    len: i64,
}

impl Slice<'_> {
    fn update(&self, moments: &Moments, codes: (&Code, &Code), c: AdamWConfig, step: u64, lr: f64, scale: f64) {
        let (off, len) = (self.off, self.len);
        let g = flat(self.grad, off, len).to_kind(Kind::Float) * scale;
        let hi = flat(&self.p.value, off, len);
        let low = self.p.low.as_ref().map(|l| flat(l, off, len));
        let mut p = match &low {
            Some(lo) => split::join(&hi, lo),
            None => hi.shallow_clone(),
        };
        let blocks = |t: &Tensor| t.narrow(0, off / BLOCK, (len + BLOCK - 1) / BLOCK);
        let (mut m, mut v) = match moments {
            Moments::Q8 { m, m_max, v, v_max } => (
                codes.0.dequantize(&m.narrow(0, off, len), &blocks(m_max)),
                codes.1.dequantize(&v.narrow(0, off, len), &blocks(v_max)),
            ),
            Moments::F32 { m, v } => (m.narrow(0, off, len), v.narrow(0, off, len)),
        };
        let _ = m.g_mul_scalar_(c.beta1);
        let _ = m.g_add_(&(&g * (1.0 - c.beta1)));
        let _ = v.g_mul_scalar_(c.beta2);
        let _ = v.g_add_(&(&g * &g * (1.0 - c.beta2)));
        let correction1 = 1.0 - c.beta1.powi(step as i32);
        let correction2 = (1.0 - c.beta2.powi(step as i32)).sqrt();
        let denom = v.sqrt() / correction2 + c.eps;
        if c.weight_decay > 0.0 {
            let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
        }
        let _ = p.g_add_(&(&m / &denom * (-lr / correction1)));
        if let Some(lo) = &low {
            split::split_into(&p, &hi, lo);
        }
        if let Moments::Q8 {
            m: mq,
            m_max,
            v: vq,
            v_max,
        } = moments
        {
            codes.0.quantize_into(&m, &mq.narrow(0, off, len), &blocks(m_max));
            codes.1.quantize_into(&v, &vq.narrow(0, off, len), &blocks(v_max));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_are_sorted_and_span_the_range() {
        for signed in [true, false] {
            let v: Vec<f32> = Vec::try_from(&dynamic_map(signed)).expect("values");
            assert_eq!(v.len(), 256);
            assert!(v.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(v[255], 1.0);
            if signed {
                assert!(v[0] < -0.99 && v[0] > -1.0, "{}", v[0]);
            } else {
                assert_eq!(v[0], 0.0);
            }
            assert!(v.contains(&0.0));
        }
    }

    #[test]
    fn quantizing_keeps_each_block_within_its_resolution() {
        tch::manual_seed(1);
        let x = Tensor::randn([1000], (Kind::Float, Device::Cpu)) * 0.01;
        let code = Code::new(true, Device::Cpu);
        let q = Tensor::zeros([1000], (Kind::Uint8, Device::Cpu));
        let am = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        code.quantize_into(&x, &q, &am);
        let back = code.dequantize(&q, &am);
        let rel = ((&back - &x).abs().max() / x.abs().max()).double_value(&[]);
        assert!(rel < 0.02, "worst error {rel} of the block maximum");
        // Each block's maximum comes back exactly (code value 1.0 or -0.99..).
        assert!(
            (am.narrow(0, 3, 1) - x.narrow(0, 768, 232).abs().max())
                .abs()
                .double_value(&[0])
                == 0.0
        );
    }
}
