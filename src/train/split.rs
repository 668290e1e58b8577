//! fp32 master weights held as two 16-bit halves: a bf16 high half, which is the tensor the
//! model computes with, and an int16 low half. Together they hold the fp32 value exactly, so
//! bf16 training keeps fp32 masters for 4 bytes per parameter instead of 6 (an fp32 master plus
//! a bf16 copy).
//!
//! With `x` the fp32 bit pattern read as an int32, the high half is `(x + 0x8000) >> 16` (the
//! bf16 nearest to the master, ties away from zero) and the low half is `x`'s low 16 bits read
//! as a signed int16, which equals `x - (high << 16)`. Joining computes `(high << 16) + low`.
//! Every step is exact integer arithmetic, on any device.

use tch::{Kind, Tensor};

/// Writes the halves of `master` (fp32) into `hi` (bf16) and `lo` (int16), all of one shape.
pub fn split_into(master: &Tensor, hi: &Tensor, lo: &Tensor) {
    let bits = master.view_dtype(Kind::Int);
    let mut high = &bits + 0x8000i64;
    let _ = high.bitwise_right_shift_tensor_scalar_(16);
    let mut hi16 = hi.view_dtype(Kind::Int16);
    hi16.copy_(&high);
    let mut lo = lo.shallow_clone();
    // int32 -> int16 keeps the low 16 bits.
    lo.copy_(&bits);
}

/// The halves of `master` (fp32): a new bf16 tensor and a new int16 tensor.
pub fn split(master: &Tensor) -> (Tensor, Tensor) {
    let hi = Tensor::empty(master.size(), (Kind::BFloat16, master.device()));
    let lo = Tensor::empty(master.size(), (Kind::Int16, master.device()));
    split_into(master, &hi, &lo);
    (hi, lo)
}

/// The fp32 master that `hi` (bf16) and `lo` (int16) hold, as a new tensor.
pub fn join(hi: &Tensor, lo: &Tensor) -> Tensor {
    let mut bits = hi.view_dtype(Kind::Int16).to_kind(Kind::Int);
    let _ = bits.bitwise_left_shift_tensor_scalar_(16);
    let _ = bits.g_add_(&lo.to_kind(Kind::Int));
    bits.view_dtype(Kind::Float)
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn bits(t: &Tensor) -> Vec<i32> {
        Vec::<i32>::try_from(&t.view_dtype(Kind::Int).reshape([-1])).expect("int32 values")
    }

    /// Every fp32 value comes back bit for bit: random magnitudes over 70 binades, both signs,
    /// zeros, subnormals and the low halves at both ends of the int16 range.
    #[test]
    fn join_inverts_split_exactly() {
        tch::manual_seed(3);
        let mags = (Tensor::rand([4096], (Kind::Float, Device::Cpu)) * 70.0 - 40.0).exp2();
        let signs = Tensor::randint(2, [4096], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let special: Vec<i32> = vec![
            0,
            i32::MIN, // -0.0
            1,        // smallest subnormal
            0x3f80_7fff,
            0x3f80_8000,
            -0x4080_0000 + 0x7fff, // negative, low half 0x7fff
            -0x4080_0000 + 0x8000, // negative, low half 0x8000
            0x7f7f_7fff,           // large finite, low half below the rounding point
        ];
        let special = Tensor::from_slice(&special).view_dtype(Kind::Float);
        let x = Tensor::cat(&[mags * signs, special], 0);
        let (hi, lo) = split(&x);
        assert_eq!(hi.kind(), Kind::BFloat16);
        assert_eq!(lo.kind(), Kind::Int16);
        assert_eq!(bits(&join(&hi, &lo)), bits(&x));
        // The high half is the bf16 nearest to the master (to within one bf16 ulp of torch's
        // round-to-nearest-even, which differs only on exact ties).
        let nearest = x.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let ours = hi.to_kind(Kind::Float);
        let finite = x.abs().lt(1e38);
        let rel = ((&ours - &nearest).abs() / nearest.abs().clamp_min(1e-38)).masked_select(&finite);
        assert!(
            rel.max().double_value(&[]) <= 2f64.powi(-7),
            "high half is not the nearest bf16"
        );
    }

    /// Writing into slices of larger tensors (what the optimizer does) leaves the rest alone.
    #[test]
    fn split_into_writes_only_the_slice() {
        let x = Tensor::randn([10], (Kind::Float, Device::Cpu));
        let hi = Tensor::zeros([20], (Kind::BFloat16, Device::Cpu));
        let lo = Tensor::zeros([20], (Kind::Int16, Device::Cpu));
        split_into(&x, &hi.narrow(0, 5, 10), &lo.narrow(0, 5, 10));
        assert_eq!(bits(&join(&hi.narrow(0, 5, 10), &lo.narrow(0, 5, 10))), bits(&x));
        assert_eq!(hi.narrow(0, 0, 5).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(lo.narrow(0, 15, 5).abs().sum(Kind::Int64).int64_value(&[]), 0);
    }
}
