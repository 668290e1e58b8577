//! A version's weights as one byte stream: tensors in name order, fp32 little-endian,
//! concatenated and cut into fixed-size buckets; with an xxh3-128 digest of the stream.

use tch::{Device, Kind, Tensor};

use crate::rpc::pb;

pub use crate::version::{digest_bytes, numel_of, Digest};

/// Named fp32 tensors flattened into one buffer, with their manifest.
pub struct WeightSet {
    pub specs: Vec<pb::TensorSpec>,
    pub bytes: Vec<u8>,
}

/// Why a plan, a stream or a packing is refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{name}: dtype {dtype} unsupported")]
    Dtype { name: String, dtype: String },
    #[error("{name}: shape {shape:?} is negative or too large")]
    Shape { name: String, shape: Vec<i64> },
    #[error("the tensors' sizes overflow")]
    Overflow,
    #[error("tensors need {need} bytes, the plan says {said}")]
    TotalBytes { need: u64, said: u64 },
    #[error("bucket count does not match the sizes")]
    BucketCount,
    #[error("{0}: not a tensor of the served model")]
    Unknown(String),
    #[error("{name}: shape {sent:?}, the served model has {served:?}")]
    Mismatch {
        name: String,
        sent: Vec<i64>,
        served: Vec<i64>,
    },
    #[error("{0}: sent twice")]
    Twice(String),
    #[error("{0}: missing from the update")]
    Missing(String),
    #[error("{0}: stream too short")]
    Short(String),
    #[error("{name}: dtype {dtype}, the plan's other tensors are {first}")]
    MixedDtype { name: String, dtype: String, first: String },
    #[error("bucket size {bytes} is not a multiple of {align}")]
    BucketSize { bytes: u64, align: u64 },
    #[error("{name}: {source}")]
    Tensor { name: String, source: tch::TchError },
}

impl WeightSet {
    /// Packs tensors (any float kind; sent as f32) in the given order. A tensor whose bytes
    /// cannot be read fails the packing: nothing is published rather than zeros the digest
    /// would then bless.
    pub fn pack(tensors: &[(String, Tensor)]) -> Result<Self, PlanError> {
        let total: usize = tensors.iter().map(|(_, t)| t.numel() * 4).sum();
        let mut bytes = Vec::with_capacity(total);
        let mut specs = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let tensor_err = |source| PlanError::Tensor {
                name: name.clone(),
                source,
            };
            let t = t
                .f_detach()
                .and_then(|t| t.f_to_device(Device::Cpu))
                .and_then(|t| t.f_to_kind(Kind::Float))
                .and_then(|t| t.f_contiguous())
                .map_err(tensor_err)?;
            let n = t.numel();
            let start = bytes.len();
            bytes.resize(start + n * 4, 0);
            t.f_copy_data_u8(&mut bytes[start..], n).map_err(tensor_err)?;
            specs.push(pb::TensorSpec {
                name: name.clone(),
                dtype: "f32".into(),
                shape: t.size(),
            });
        }
        Ok(Self { specs, bytes })
    }

    /// Digest of the byte stream.
    pub fn digest(&self) -> Digest {
        digest_bytes(&self.bytes)
    }

    /// The plan for buckets of `bucket_bytes`.
    pub fn plan(&self, bucket_bytes: u64) -> pb::BucketPlan {
        let bucket_bytes = bucket_bytes.max(1);
        let total = self.bytes.len() as u64;
        pb::BucketPlan {
            tensors: self.specs.clone(),
            bucket_bytes,
            total_bytes: total,
            bucket_count: total.div_ceil(bucket_bytes) as u32,
        }
    }

    /// Bucket `i` of a plan.
    pub fn bucket(&self, plan: &pb::BucketPlan, i: u32) -> &[u8] {
        let start = (u64::from(i) * plan.bucket_bytes) as usize;
        let end = (start + plan.bucket_bytes as usize).min(self.bytes.len());
        &self.bytes[start.min(end)..end]
    }
}

/// Checks a plan's internal consistency (sizes add up without overflow, dtypes known) before
/// anything is allocated for it.
pub fn check_plan(plan: &pb::BucketPlan) -> Result<(), PlanError> {
    let mut total = 0u64;
    for t in &plan.tensors {
        if t.dtype != "f32" {
            return Err(PlanError::Dtype {
                name: t.name.clone(),
                dtype: t.dtype.clone(),
            });
        }
        let bytes = numel_of(&t.shape)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| shape_err(t))?;
        total = total.checked_add(bytes).ok_or(PlanError::Overflow)?;
    }
    if total != plan.total_bytes {
        return Err(PlanError::TotalBytes {
            need: total,
            said: plan.total_bytes,
        });
    }
    if plan.bucket_bytes == 0 || u64::from(plan.bucket_count) != total.div_ceil(plan.bucket_bytes) {
        return Err(PlanError::BucketCount);
    }
    Ok(())
}

fn shape_err(t: &pb::TensorSpec) -> PlanError {
    PlanError::Shape {
        name: t.name.clone(),
        shape: t.shape.clone(),
    }
}

/// Checks a plan's tensors against the engine's own manifest: the same names, each once, with
/// the same shapes. An update for another model is refused before anything is allocated.
pub fn check_against(plan: &pb::BucketPlan, manifest: &[(String, Vec<i64>)]) -> Result<(), PlanError> {
    let expected: std::collections::BTreeMap<&str, &[i64]> =
        manifest.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let mut seen = std::collections::BTreeSet::new();
    for t in &plan.tensors {
        let Some(shape) = expected.get(t.name.as_str()) else {
            return Err(PlanError::Unknown(t.name.clone()));
        };
        if *shape != t.shape.as_slice() {
            return Err(PlanError::Mismatch {
                name: t.name.clone(),
                sent: t.shape.clone(),
                served: shape.to_vec(),
            });
        }
        if !seen.insert(t.name.as_str()) {
            return Err(PlanError::Twice(t.name.clone()));
        }
    }
    if let Some((missing, _)) = expected.iter().find(|(n, _)| !seen.contains(*n)) {
        return Err(PlanError::Missing(missing.to_string()));
    }
    Ok(())
}

/// Splits a received stream back into named tensors.
pub fn unpack(plan: &pb::BucketPlan, bytes: &[u8]) -> Result<Vec<(String, Tensor)>, PlanError> {
    let mut out = Vec::with_capacity(plan.tensors.len());
    let mut at = 0usize;
    for t in &plan.tensors {
        let n = numel_of(&t.shape)
            .and_then(|n| usize::try_from(n).ok()?.checked_mul(4))
            .ok_or_else(|| shape_err(t))?;
        let chunk = bytes
            .get(at..at.saturating_add(n))
            .ok_or_else(|| PlanError::Short(t.name.clone()))?;
        let tensor = Tensor::f_from_data_size(chunk, &t.shape, Kind::Float).map_err(|source| PlanError::Tensor {
            name: t.name.clone(),
            source,
        })?;
        out.push((t.name.clone(), tensor));
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor whose bytes cannot be read fails the packing (it used to leave zeros that the
    /// digest then blessed).
    #[test]
    fn a_tensor_that_cannot_be_read_fails_the_packing() {
        let tensors: Vec<(String, Tensor)> = vec![
            ("a".into(), Tensor::randn([3], (Kind::Float, Device::Cpu))),
            ("broken".into(), Tensor::new()),
        ];
        match WeightSet::pack(&tensors) {
            Err(PlanError::Tensor { name, .. }) => assert_eq!(name, "broken"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("an unreadable tensor was packed"),
        }
    }

    #[test]
    fn pack_plan_unpack_round_trip() {
        let tensors: Vec<(String, Tensor)> = vec![
            ("a".into(), Tensor::randn([3, 5], (Kind::Float, Device::Cpu))),
            ("b".into(), Tensor::randn([7], (Kind::Float, Device::Cpu))),
        ];
        let set = WeightSet::pack(&tensors).expect("pack");
        let plan = set.plan(16);
        check_plan(&plan).expect("consistent");
        assert_eq!((plan.total_bytes, plan.bucket_count), (88, 6));
        let joined: Vec<u8> = (0..plan.bucket_count)
            .flat_map(|i| set.bucket(&plan, i).to_vec())
            .collect();
        assert_eq!(digest_bytes(&joined), set.digest());
        let back = unpack(&plan, &joined).expect("unpack");
        for ((n1, t1), (n2, t2)) in tensors.iter().zip(&back) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2));
        }
        let mut corrupt = joined.clone();
        corrupt[5] ^= 1;
        assert_ne!(digest_bytes(&corrupt), set.digest());
    }

    #[test]
    fn plans_that_overflow_or_do_not_fit_the_model_are_refused() {
        let spec = |name: &str, shape: Vec<i64>| pb::TensorSpec {
            name: name.into(),
            dtype: "f32".into(),
            shape,
        };
        let huge = pb::BucketPlan {
            tensors: vec![spec("a", vec![i64::MAX, 4])],
            bucket_bytes: 16,
            total_bytes: 16,
            bucket_count: 1,
        };
        assert!(check_plan(&huge).is_err_and(|e| e.to_string().contains("too large")));
        let negative = pb::BucketPlan {
            tensors: vec![spec("a", vec![-1, 4])],
            ..huge.clone()
        };
        assert!(check_plan(&negative).is_err());
        let manifest = vec![("a".to_string(), vec![2, 3]), ("b".to_string(), vec![4])];
        let plan = |tensors| pb::BucketPlan {
            tensors,
            bucket_bytes: 4,
            total_bytes: 40,
            bucket_count: 10,
        };
        check_against(&plan(vec![spec("b", vec![4]), spec("a", vec![2, 3])]), &manifest).expect("same set");
        for (bad, why) in [
            (vec![spec("a", vec![3, 2]), spec("b", vec![4])], "shape"),
            (vec![spec("a", vec![2, 3])], "missing"),
            (
                vec![spec("a", vec![2, 3]), spec("b", vec![4]), spec("c", vec![1])],
                "not a tensor",
            ),
            (
                vec![spec("a", vec![2, 3]), spec("a", vec![2, 3]), spec("b", vec![4])],
                "twice",
            ),
        ] {
            let err = check_against(&plan(bad), &manifest).expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
    }
}
