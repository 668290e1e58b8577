//! The packed layout of NCCL weight sync: every tensor of the plan, in order, back to back in
//! one flat buffer of the wire dtype, cut into fixed-size buckets (the last one shorter). A
//! tensor may straddle buckets. Both ends derive the same layout from the plan, so the learner
//! packs into it, the sidecar receives into it, and both digest the same bucket bytes.

use tch::{Device, Kind, Tensor};

/// Bucket sizes are rounded down to a multiple of this many bytes (so that every bucket
/// but the last is a whole number of 32-bit digest words and NCCL sees aligned buffers).
pub const BUCKET_ALIGN: u64 = 256;

/// Where each tensor sits in the flat buffer, and how the buffer is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackLayout {
    /// Start element of each tensor.
    pub offsets: Vec<i64>,
    /// Elements of each tensor.
    pub numels: Vec<i64>,
    pub total: i64,
    /// Elements per bucket (all but the last are full).
    pub bucket_elems: i64,
}

/// A wire dtype's name in the plan.
pub fn dtype_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Float => Some("f32"),
        Kind::BFloat16 => Some("bf16"),
        _ => None,
    }
}

/// The wire dtype a plan names.
pub fn dtype_kind(name: &str) -> Option<Kind> {
    match name {
        "f32" => Some(Kind::Float),
        "bf16" => Some(Kind::BFloat16),
        _ => None,
    }
}

impl PackLayout {
    /// The layout of tensors of `numels` elements of `elt_bytes` bytes each, in buckets of
    /// about `bucket_bytes` (rounded down to [`BUCKET_ALIGN`], at least one alignment unit).
    pub fn new(numels: &[i64], elt_bytes: u64, bucket_bytes: u64) -> Self {
        let bucket_bytes = (bucket_bytes / BUCKET_ALIGN * BUCKET_ALIGN).max(BUCKET_ALIGN);
        let numels: Vec<i64> = numels.iter().map(|n| (*n).max(0)).collect();
        let mut offsets = Vec::with_capacity(numels.len());
        let mut total = 0i64;
        for &n in &numels {
            offsets.push(total);
            total += n;
        }
        Self {
            offsets,
            numels,
            total,
            bucket_elems: (bucket_bytes / elt_bytes.max(1)) as i64,
        }
    }

    /// Number of buckets.
    pub fn bucket_count(&self) -> usize {
        (self.total as u64).div_ceil(self.bucket_elems as u64) as usize
    }

    /// `(start, length)` in elements of bucket `k`.
    pub fn bucket(&self, k: usize) -> (i64, i64) {
        let start = k as i64 * self.bucket_elems;
        (start, self.bucket_elems.min(self.total - start).max(0))
    }

    /// The buckets complete once tensors `0..=i` are packed (those ending at or before the end
    /// of tensor `i`, and not complete before it).
    pub fn completed_by(&self, i: usize) -> std::ops::Range<usize> {
        let full = |end: i64| -> usize {
            if end >= self.total {
                self.bucket_count()
            } else {
                (end / self.bucket_elems) as usize
            }
        };
        let before = if i == 0 { 0 } else { full(self.offsets[i]) };
        before..full(self.offsets[i] + self.numels[i])
    }

    /// Views of bucket slices of `flat`.
    pub fn bucket_views(&self, flat: &Tensor) -> Vec<Tensor> {
        (0..self.bucket_count())
            .map(|k| {
                let (start, len) = self.bucket(k);
                flat.narrow(0, start, len)
            })
            .collect()
    }

    /// Views of `flat` shaped like the tensors.
    pub fn tensor_views(&self, flat: &Tensor, shapes: &[Vec<i64>]) -> Vec<Tensor> {
        self.offsets
            .iter()
            .zip(&self.numels)
            .zip(shapes)
            .map(|((&off, &n), shape)| flat.narrow(0, off, n).view(shape.as_slice()))
            .collect()
    }
}

/// A new flat buffer for `layout` in the `wire` dtype on `device`.
pub fn flat_buffer(layout: &PackLayout, wire: Kind, device: Device) -> Tensor {
    Tensor::empty([layout.total], (wire, device))
}

/// Packs `tensors` (any float dtype, on `flat`'s device) into `flat` (see [`flat_buffer`]),
/// calling `bucket_done(k)` right after queueing the copy that completes bucket k.
pub fn pack_into(tensors: &[Tensor], layout: &PackLayout, flat: &Tensor, mut bucket_done: impl FnMut(usize)) {
    tch::no_grad(|| {
        for (i, t) in tensors.iter().enumerate() {
            let mut dst = flat.narrow(0, layout.offsets[i], layout.numels[i]);
            dst.copy_(&t.detach().reshape([-1]));
            for k in layout.completed_by(i) {
                bucket_done(k);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cut_the_stream_and_tensors_complete_them_in_order() {
        // 4-byte elements, 256-byte buckets = 64 elements.
        let layout = PackLayout::new(&[10, 100, 0, 30, 200], 4, 300);
        assert_eq!(layout.bucket_elems, 64);
        assert_eq!(layout.total, 340);
        assert_eq!(layout.bucket_count(), 6);
        assert_eq!(layout.bucket(5), (320, 20));
        let done: Vec<usize> = (0..5).flat_map(|i| layout.completed_by(i)).collect();
        assert_eq!(
            done,
            vec![0, 1, 2, 3, 4, 5],
            "every bucket completed exactly once, in order"
        );
        assert_eq!(layout.completed_by(0), 0..0);
        assert_eq!(layout.completed_by(1), 0..1, "tensor 1 ends at 110, inside bucket 1");
        assert_eq!(layout.completed_by(4), 2..6);
    }

    #[test]
    fn pack_then_views_give_back_every_tensor() {
        let a = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([70], (Kind::Float, Device::Cpu));
        let c = Tensor::randn([2, 2, 2], (Kind::Float, Device::Cpu));
        let layout = PackLayout::new(&[15, 70, 8], 2, 64);
        let mut done = Vec::new();
        let flat = flat_buffer(&layout, Kind::BFloat16, Device::Cpu);
        pack_into(&[a.copy(), b.copy(), c.copy()], &layout, &flat, |k| done.push(k));
        assert_eq!(done, (0..layout.bucket_count()).collect::<Vec<_>>());
        let views = layout.tensor_views(&flat, &[vec![3, 5], vec![70], vec![2, 2, 2]]);
        for (orig, back) in [a, b, c].iter().zip(&views) {
            assert_eq!(back.size(), orig.size());
            let want = orig.to_kind(Kind::BFloat16);
            assert!(back.equal(&want), "packed values are the tensor cast to the wire dtype");
        }
        let joined: i64 = layout.bucket_views(&flat).iter().map(|v| v.numel() as i64).sum();
        assert_eq!(joined, 93);
    }
}
