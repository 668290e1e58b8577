//! Weight sync over NCCL, both ends. The learner (rank 0) broadcasts its fp32 weights in place
//! from its GPU; the sidecar receives into tensors it allocated from the plan on its GPU. Both
//! group the plan's tensors into the same buckets (whole tensors, at most `bucket_bytes` each
//! unless one tensor is larger), digest each bucket on the GPU while the next is in flight,
//! and the sidecar checks the learner's digest at commit.

use tch::Tensor;

use crate::rpc::pb;

/// Groups tensor sizes, in order, into buckets of at most `bucket_bytes` (a larger tensor is a
/// bucket of its own).
pub fn group_tensors(sizes: &[u64], bucket_bytes: u64) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut filled = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        match out.last_mut() {
            Some(last) if filled + size <= bucket_bytes => {
                last.push(i);
                filled += size;
            }
            _ => {
                out.push(vec![i]);
                filled = size;
            }
        }
    }
    out
}

/// The plan announcing fp32 `tensors` (the learner's weights, in order).
pub fn device_plan(tensors: &[(String, Tensor)], bucket_bytes: u64) -> pb::BucketPlan {
    let bucket_bytes = bucket_bytes.max(1);
    let specs: Vec<pb::TensorSpec> = tensors
        .iter()
        .map(|(n, t)| pb::TensorSpec {
            name: n.clone(),
            dtype: "f32".into(),
            shape: t.size(),
        })
        .collect();
    let total: u64 = tensors.iter().map(|(_, t)| t.numel() as u64 * 4).sum();
    pb::BucketPlan {
        tensors: specs,
        bucket_bytes,
        total_bytes: total,
        bucket_count: total.div_ceil(bucket_bytes) as u32,
    }
}

/// Sizes in bytes of a plan's tensors.
pub fn plan_sizes(plan: &pb::BucketPlan) -> Vec<u64> {
    plan.tensors
        .iter()
        .map(|t| t.shape.iter().product::<i64>().max(0) as u64 * 4)
        .collect()
}

#[cfg(feature = "cuda")]
mod transfer {
    use std::time::Duration;

    use tch::{Device, Kind, Tensor};

    use super::{group_tensors, plan_sizes};
    use crate::comm::nccl::Communicator;
    use crate::comm::CommError;
    use crate::rpc::pb;
    use crate::sync::gpu_digest::GpuDigest;

    fn buckets_of(tensors: &[Tensor], sizes: &[u64], bucket_bytes: u64) -> Vec<Vec<Tensor>> {
        group_tensors(sizes, bucket_bytes)
            .into_iter()
            .map(|idx| idx.into_iter().map(|i| tensors[i].shallow_clone()).collect())
            .collect()
    }

    fn run(
        comm: &mut Communicator,
        tensors: &[Tensor],
        sizes: &[u64],
        bucket_bytes: u64,
        deadline: Duration,
    ) -> Result<String, CommError> {
        let device = tensors.first().map_or(Device::Cpu, Tensor::device);
        let buckets = buckets_of(tensors, sizes, bucket_bytes);
        let mut digest = GpuDigest::default();
        comm.broadcast_buckets(&buckets, 0, deadline, |_, bucket| digest.add_bucket(bucket))?;
        Ok(digest.finish_hex(device))
    }

    /// Learner: broadcasts `tensors` (contiguous fp32 on the learner's GPU, plan order) and
    /// returns their digest.
    pub fn send(
        comm: &mut Communicator,
        tensors: &[Tensor],
        bucket_bytes: u64,
        deadline: Duration,
    ) -> Result<String, CommError> {
        let sizes: Vec<u64> = tensors.iter().map(|t| t.numel() as u64 * 4).collect();
        run(comm, tensors, &sizes, bucket_bytes, deadline)
    }

    /// Sidecar: allocates the plan's tensors on `device`, receives them and returns them with
    /// their digest.
    pub fn receive(
        comm: &mut Communicator,
        plan: &pb::BucketPlan,
        device: Device,
        deadline: Duration,
    ) -> Result<(Vec<(String, Tensor)>, String), CommError> {
        let tensors: Vec<Tensor> = plan
            .tensors
            .iter()
            .map(|t| Tensor::empty(t.shape.as_slice(), (Kind::Float, device)))
            .collect();
        let digest = run(comm, &tensors, &plan_sizes(plan), plan.bucket_bytes, deadline)?;
        let named = plan.tensors.iter().map(|t| t.name.clone()).zip(tensors).collect();
        Ok((named, digest))
    }
}

#[cfg(feature = "cuda")]
pub use transfer::{receive, send};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_group_into_buckets_in_order() {
        assert_eq!(
            group_tensors(&[4, 4, 4, 10, 1, 1], 8),
            vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]
        );
        assert_eq!(group_tensors(&[], 8), Vec::<Vec<usize>>::new());
        assert_eq!(group_tensors(&[3, 3, 3], 100), vec![vec![0, 1, 2]]);
    }
}
