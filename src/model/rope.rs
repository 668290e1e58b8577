//! Rotary position embeddings with the scaling variants of HF `modeling_rope_utils`
//! (checked against transformers 4.57).

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use super::config::{RopeScaling, RopeSpec};

/// Inverse frequencies `[head_dim / 2]` (fp32) and the factor applied to cos/sin, for a
/// sequence of `seq_len` positions.
pub fn inv_freq(spec: &RopeSpec, head_dim: i64, seq_len: i64, device: Device) -> (Tensor, f64) {
    let dim = head_dim as f64;
    let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim;
    let base_freq = |base: f64| (Tensor::from(base as f32).to_device(device).pow(&exponents)).reciprocal();
    match &spec.scaling {
        RopeScaling::None => (base_freq(spec.theta), 1.0),
        RopeScaling::Linear { factor } => (base_freq(spec.theta) / *factor, 1.0),
        RopeScaling::Dynamic { factor } => {
            let max_pos = spec.max_position_embeddings as f64;
            let seq = (seq_len as f64).max(max_pos);
            let base = spec.theta * ((factor * seq / max_pos) - (factor - 1.0)).powf(dim / (dim - 2.0));
            (base_freq(base), 1.0)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let inv = base_freq(spec.theta);
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * PI);
            let scaled = (&inv / *factor).where_self(&wavelen.gt(low_freq_wavelen), &inv);
            let smooth = (wavelen.reciprocal() * *old_ctx - *low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / *factor + &smooth * &scaled;
            let is_medium = wavelen
                .lt(high_freq_wavelen)
                .logical_not()
                .logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
            (smoothed.where_self(&is_medium, &scaled), 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: orig,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attn = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => get_mscale(*factor, *m) / get_mscale(*factor, *a),
                _ => get_mscale(*factor, 1.0),
            });
            let correction_dim =
                |rotations: f64| (dim * (orig / (rotations * 2.0 * PI)).ln()) / (2.0 * spec.theta.ln());
            let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let mut high = high.min(dim - 1.0);
            if low == high {
                high += 0.001;
            }
            let pos_freqs = Tensor::from(spec.theta as f32).to_device(device).pow(&exponents);
            let extrapolation = pos_freqs.reciprocal();
            let interpolation = (&pos_freqs * *factor).reciprocal();
            let ramp = ((Tensor::arange(head_dim / 2, (Kind::Float, device)) - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_factor = ramp.ones_like() - ramp;
            let inv = &interpolation * (extrapolation_factor.ones_like() - &extrapolation_factor)
                + &extrapolation * &extrapolation_factor;
            (inv, attn)
        }
    }
}

/// `cos` and `sin` tables `[seq_len, head_dim]` in fp32, HF layout (the half-rotation style).
pub fn cos_sin(spec: &RopeSpec, head_dim: i64, seq_len: i64, device: Device) -> (Tensor, Tensor) {
    let (inv, scale) = inv_freq(spec, head_dim, seq_len, device);
    let positions = Tensor::arange(seq_len, (Kind::Float, device));
    let freqs = positions.unsqueeze(1).matmul(&inv.unsqueeze(0));
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos() * scale, emb.sin() * scale)
}

/// Applies the rotation to `x` `[B, H, T, D]` with tables `[T, D]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-&x2), &x1], 3);
    x * cos.to_kind(x.kind()) + rotated * sin.to_kind(x.kind())
}
