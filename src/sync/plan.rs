//! A version's weights as one byte stream: tensors in name order, fp32 little-endian,
//! concatenated and cut into fixed-size buckets; with an xxh3-128 digest of the stream.

use tch::{Device, Kind, Tensor};

use crate::rpc::pb;

pub use crate::version::{digest_bytes, Digest};

/// Named fp32 tensors flattened into one buffer, with their manifest.
pub struct WeightSet {
    pub specs: Vec<pb::TensorSpec>,
    pub bytes: Vec<u8>,
}

impl WeightSet {
    /// Packs tensors (any float kind; sent as f32) in the given order.
    pub fn pack(tensors: &[(String, Tensor)]) -> Self {
        let total: usize = tensors.iter().map(|(_, t)| t.numel() * 4).sum();
        let mut bytes = Vec::with_capacity(total);
        let mut specs = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let n = t.numel();
            let start = bytes.len();
            bytes.resize(start + n * 4, 0);
            // A contiguous CPU f32 tensor always copies out; a failure leaves zeros and the
            // digest then fails loudly on the receiver.
            if let Err(e) = t.f_copy_data_u8(&mut bytes[start..], n) {
                tracing::error!(tensor = %name, error = %e, "cannot read tensor bytes");
            }
            specs.push(pb::TensorSpec {
                name: name.clone(),
                dtype: "f32".into(),
                shape: t.size(),
            });
        }
        Self { specs, bytes }
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

/// Checks a plan's internal consistency (sizes add up, dtypes known).
pub fn check_plan(plan: &pb::BucketPlan) -> Result<(), String> {
    let mut total = 0u64;
    for t in &plan.tensors {
        if t.dtype != "f32" {
            return Err(format!("{}: dtype {} unsupported", t.name, t.dtype));
        }
        if t.shape.iter().any(|&d| d < 0) {
            return Err(format!("{}: negative dimension", t.name));
        }
        total += t.shape.iter().product::<i64>().max(0) as u64 * 4;
    }
    if total != plan.total_bytes {
        return Err(format!(
            "tensors need {total} bytes, the plan says {}",
            plan.total_bytes
        ));
    }
    if plan.bucket_bytes == 0 || u64::from(plan.bucket_count) != total.div_ceil(plan.bucket_bytes) {
        return Err("bucket count does not match the sizes".into());
    }
    Ok(())
}

/// Splits a received stream back into named tensors.
pub fn unpack(plan: &pb::BucketPlan, bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let mut out = Vec::with_capacity(plan.tensors.len());
    let mut at = 0usize;
    for t in &plan.tensors {
        let n = t.shape.iter().product::<i64>().max(0) as usize * 4;
        let chunk = bytes
            .get(at..at + n)
            .ok_or_else(|| format!("{}: stream too short", t.name))?;
        let tensor = Tensor::f_from_data_size(chunk, &t.shape, Kind::Float).map_err(|e| e.to_string())?;
        out.push((t.name.clone(), tensor));
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_plan_unpack_round_trip() {
        let tensors: Vec<(String, Tensor)> = vec![
            ("a".into(), Tensor::randn([3, 5], (Kind::Float, Device::Cpu))),
            ("b".into(), Tensor::randn([7], (Kind::Float, Device::Cpu))),
        ];
        let set = WeightSet::pack(&tensors);
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
}
