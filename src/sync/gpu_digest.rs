//! A digest of tensors computed where they live (on the GPU for NCCL transfers), exact and
//! identical on any device: wrapping integer sums over the raw 32-bit (or 16-bit) words, one
//! plain and one weighted by a repeating position pattern, so swapped or shifted data changes
//! it. Two or three kernels per tensor and no copy to the host until the end.

use tch::{Kind, Tensor};

/// Accumulates the digest of a sequence of tensors (order matters).
#[derive(Default)]
pub struct GpuDigest {
    parts: Vec<Tensor>,
}

/// Words per row of the position pattern.
const PATTERN: i64 = 64;

impl GpuDigest {
    /// Adds one tensor (any dtype; its bytes are what counts).
    pub fn add(&mut self, t: &Tensor) {
        let bytes = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let flat = t.reshape([-1]);
        let words = if bytes % 4 == 0 && t.kind().elt_size_in_bytes() <= 4 {
            flat.view_dtype(Kind::Uint8).view_dtype(Kind::Int)
        } else if bytes % 2 == 0 {
            flat.view_dtype(Kind::Uint8).view_dtype(Kind::Int16)
        } else {
            flat.view_dtype(Kind::Uint8)
        };
        let n = words.size()[0];
        let plain = words.sum(Kind::Int64);
        let weighted = if n % PATTERN == 0 && n > 0 {
            let pattern = Tensor::arange_start(1, PATTERN + 1, (words.kind(), words.device()));
            (words.view([-1, PATTERN]) * pattern).sum(Kind::Int64)
        } else {
            let pattern = Tensor::arange_start(1, n + 1, (Kind::Int64, words.device()));
            (words.to_kind(Kind::Int64) * pattern).sum(Kind::Int64)
        };
        self.parts.push(Tensor::stack(&[plain, weighted], 0));
    }

    /// The digest as `[2]` int64 on the tensors' device (zeros for no tensors).
    pub fn finish_tensor(&self, device: tch::Device) -> Tensor {
        if self.parts.is_empty() {
            return Tensor::zeros([2], (Kind::Int64, device));
        }
        // Position of each tensor in the sequence matters too.
        let stacked = Tensor::stack(&self.parts, 0);
        let order = Tensor::arange_start(1, self.parts.len() as i64 + 1, (Kind::Int64, stacked.device())).unsqueeze(1);
        (stacked * order).sum_dim_intlist([0].as_slice(), false, Kind::Int64)
    }

    /// The digest as 32 hex digits (copies 16 bytes to the host).
    pub fn finish_hex(&self, device: tch::Device) -> String {
        hex_of(&self.finish_tensor(device))
    }
}

/// Hex of a `[2]` int64 digest tensor.
pub fn hex_of(digest: &Tensor) -> String {
    let v = Vec::<i64>::try_from(&digest.to_device(tch::Device::Cpu)).unwrap_or_default();
    v.iter().map(|x| format!("{:016x}", *x as u64)).collect()
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn digest(ts: &[Tensor]) -> String {
        let mut d = GpuDigest::default();
        for t in ts {
            d.add(t);
        }
        d.finish_hex(Device::Cpu)
    }

    #[test]
    fn digest_sees_content_order_and_dtype_bytes() {
        let a = Tensor::randn([128, 3], (Kind::BFloat16, Device::Cpu));
        let b = Tensor::randn([7], (Kind::Float, Device::Cpu));
        let base = digest(&[a.copy(), b.copy()]);
        assert_eq!(base.len(), 32);
        assert_eq!(base, digest(&[a.copy(), b.copy()]), "deterministic");
        assert_ne!(base, digest(&[b.copy(), a.copy()]), "tensor order");
        let swapped = a.copy();
        swapped.get(0).copy_(&a.get(1));
        swapped.get(1).copy_(&a.get(0));
        assert_ne!(base, digest(&[swapped, b.copy()]), "positions inside a tensor");
        let bumped = b.copy();
        let _ = bumped.get(3).fill_(123.0);
        assert_ne!(base, digest(&[a.copy(), bumped]), "one element");
        let odd = Tensor::randn([5], (Kind::BFloat16, Device::Cpu));
        assert_eq!(digest(&[odd.copy()]), digest(&[odd]), "odd sizes work");
    }
}
