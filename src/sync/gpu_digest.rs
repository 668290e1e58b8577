//! A digest of tensors computed where they live (on the GPU for NCCL transfers), exact and
//! identical on any device. Each tensor's raw 32-bit words are summed (wrapping int64) per
//! position modulo 64: one reduction kernel per tensor, no copy to the host until the end. The
//! 64 partial sums of every tensor are then combined with weights that depend on the tensor's
//! place in the sequence and on the residue, so a changed word, a shift inside a tensor or a
//! reordering of tensors changes the digest (barring cancellations inside one residue class).
//! It guards a transfer's integrity; it is not a cryptographic hash.

use tch::{Kind, Tensor};

/// Accumulates the digest of a sequence of tensors (order matters).
#[derive(Default)]
pub struct GpuDigest {
    parts: Vec<Tensor>,
}

/// Residue classes.
const LANES: i64 = 64;

impl GpuDigest {
    /// Adds one tensor (any dtype; its bytes are what counts).
    pub fn add(&mut self, t: &Tensor) {
        self.add_words(words_of(t));
    }

    /// Adds several tensors as one: their words concatenated, so one copy and one reduction
    /// kernel cover them all (what matters on a host where each kernel launch is expensive).
    /// Equal to adding their concatenation, not to adding them one by one.
    pub fn add_many(&mut self, ts: &[Tensor]) {
        match ts {
            [] => {}
            [one] => self.add(one),
            _ => {
                let words: Vec<Tensor> = ts.iter().map(words_of).collect();
                self.add_words(Tensor::cat(&words, 0));
            }
        }
    }

    /// Adds one bucket of tensors the cheaper way: concatenated (one copy, one reduction) when
    /// the bucket holds many small tensors, one reduction per tensor when it holds few large
    /// ones. The copy costs memory bandwidth that a transfer in flight also needs; a kernel
    /// launch costs 5 to 50 microseconds of host time. Both ends of a transfer see the same
    /// bucket sizes and so take the same way, which keeps their digests comparable.
    pub fn add_bucket(&mut self, ts: &[Tensor]) {
        /// Concatenate while the bucket averages less than this many bytes per tensor.
        const CONCAT_BELOW: i64 = 32 << 20;
        let bytes: i64 = ts
            .iter()
            .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum();
        if bytes < CONCAT_BELOW * ts.len() as i64 {
            self.add_many(ts);
        } else {
            for t in ts {
                self.add(t);
            }
        }
    }

    fn add_words(&mut self, words: Tensor) {
        let n = words.size()[0];
        let words = if n % LANES == 0 {
            words
        } else {
            words.constant_pad_nd([0, LANES - n % LANES])
        };
        self.parts.push(
            words
                .view([-1, LANES])
                .sum_dim_intlist([0].as_slice(), false, Kind::Int64),
        );
    }

    /// The digest as `[2]` int64 (plain and weighted totals) on `device` (zeros for none).
    pub fn finish_tensor(&self, device: tch::Device) -> Tensor {
        if self.parts.is_empty() {
            return Tensor::zeros([2], (Kind::Int64, device));
        }
        let stacked = Tensor::stack(&self.parts, 0);
        let count = self.parts.len() as i64;
        let weights = Tensor::arange_start(1, count * LANES + 1, (Kind::Int64, stacked.device())).view([count, LANES]);
        Tensor::stack(&[stacked.sum(Kind::Int64), (&stacked * weights).sum(Kind::Int64)], 0)
    }

    /// The digest as 32 hex digits (copies 16 bytes to the host).
    pub fn finish_hex(&self, device: tch::Device) -> String {
        hex_of(&self.finish_tensor(device))
    }
}

/// A tensor's bytes as 32-bit words (one int32 per byte when the size is not a multiple of 4).
fn words_of(t: &Tensor) -> Tensor {
    let bytes = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
    let raw = t.reshape([-1]).view_dtype(Kind::Uint8);
    if bytes % 4 == 0 {
        raw.view_dtype(Kind::Int)
    } else {
        raw.to_kind(Kind::Int)
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
        // Several tensors at once equal their concatenation, and see a change in any of them.
        let many = |ts: &[Tensor]| {
            let mut d = GpuDigest::default();
            d.add_many(ts);
            d.finish_hex(Device::Cpu)
        };
        let (x, y) = (
            Tensor::randn([64], (Kind::Float, Device::Cpu)),
            Tensor::randn([3, 64], (Kind::Float, Device::Cpu)),
        );
        let joined = Tensor::cat(&[x.reshape([-1]), y.reshape([-1])], 0);
        assert_eq!(many(&[x.copy(), y.copy()]), digest(&[joined]));
        let y2 = y.copy();
        let _ = y2.get(2).get(5).fill_(0.5);
        assert_ne!(many(&[x.copy(), y.copy()]), many(&[x, y2]));
    }
}
