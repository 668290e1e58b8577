//! Weight sync over NCCL, both ends, in the packed layout of [`super::packing`]: the learner
//! sends fixed-size buckets of one flat buffer on its GPU, either its live bf16 weights, which
//! already are that layout (lent, no copy), or a buffer it packs, recording an event as each
//! bucket is complete and sending bucket k once its event has passed, so packing the later
//! buckets overlaps sending the earlier ones (see [`super::nccl_publish`]). The sidecar
//! receives every bucket into one flat buffer on its GPU, whose views become the new weights.
//! Both ends digest each bucket on the GPU while later buckets are on the wire, and the sidecar
//! checks the learner's digest at commit.

use tch::Kind;

use crate::rpc::pb;

use super::packing::{dtype_kind, dtype_name, PackLayout, BUCKET_ALIGN};
use super::plan::PlanError;

/// The plan announcing tensors `(name, shape)` in the wire dtype `wire`, cut as `layout`.
pub fn device_plan(tensors: &[(String, Vec<i64>)], wire: Kind, layout: &PackLayout) -> pb::BucketPlan {
    let elt = wire.elt_size_in_bytes() as u64;
    let name = dtype_name(wire).unwrap_or("f32");
    pb::BucketPlan {
        tensors: tensors
            .iter()
            .map(|(n, shape)| pb::TensorSpec {
                name: n.clone(),
                dtype: name.into(),
                shape: shape.clone(),
            })
            .collect(),
        bucket_bytes: layout.bucket_elems as u64 * elt,
        total_bytes: layout.total as u64 * elt,
        bucket_count: layout.bucket_count() as u32,
    }
}

/// Checks a plan the learner announced and derives its layout and wire dtype.
pub fn plan_layout(plan: &pb::BucketPlan) -> Result<(PackLayout, Kind), PlanError> {
    let first = plan.tensors.first().map_or("f32", |t| t.dtype.as_str());
    let wire = dtype_kind(first).ok_or_else(|| PlanError::Dtype {
        name: plan.tensors.first().map_or_else(String::new, |t| t.name.clone()),
        dtype: first.to_owned(),
    })?;
    let mut numels = Vec::with_capacity(plan.tensors.len());
    for t in &plan.tensors {
        if t.dtype != first {
            return Err(PlanError::MixedDtype {
                name: t.name.clone(),
                dtype: t.dtype.clone(),
                first: first.to_owned(),
            });
        }
        if t.shape.iter().any(|&d| d < 0) {
            return Err(PlanError::Shape {
                name: t.name.clone(),
                shape: t.shape.clone(),
            });
        }
        numels.push(t.shape.iter().product::<i64>());
    }
    let elt = wire.elt_size_in_bytes() as u64;
    if plan.bucket_bytes == 0 || !plan.bucket_bytes.is_multiple_of(BUCKET_ALIGN) {
        return Err(PlanError::BucketSize {
            bytes: plan.bucket_bytes,
            align: BUCKET_ALIGN,
        });
    }
    let layout = PackLayout::new(&numels, elt, plan.bucket_bytes);
    if layout.total as u64 * elt != plan.total_bytes {
        return Err(PlanError::TotalBytes {
            need: layout.total as u64 * elt,
            said: plan.total_bytes,
        });
    }
    if layout.bucket_count() != plan.bucket_count as usize {
        return Err(PlanError::BucketCount);
    }
    Ok((layout, wire))
}

#[cfg(feature = "cuda")]
mod transfer {
    use std::time::Duration;

    use tch::{Device, Tensor};

    use super::plan_layout;
    use crate::comm::nccl::Communicator;
    use crate::comm::CommError;
    use crate::rpc::pb;
    use crate::sync::gpu_digest::GpuDigest;

    /// Sidecar: receives a plan's buckets into one new flat buffer on `device`; returns views of
    /// it as the named tensors, and their digest.
    pub fn receive(
        comm: &mut Communicator,
        plan: &pb::BucketPlan,
        device: Device,
        deadline: Duration,
    ) -> Result<(Vec<(String, Tensor)>, String), CommError> {
        let (layout, wire) = plan_layout(plan).map_err(|e| CommError::Nccl {
            call: "plan",
            message: e.to_string(),
        })?;
        let flat = Tensor::empty([layout.total], (wire, device));
        let buckets: Vec<Vec<Tensor>> = layout.bucket_views(&flat).into_iter().map(|b| vec![b]).collect();
        let mut digest = GpuDigest::default();
        let mut add = |_: usize, b: &[Tensor]| {
            for t in b {
                digest.add(t);
            }
        };
        if super::fault::kill_due() && buckets.len() > 1 {
            comm.broadcast_buckets(&buckets[..1], 0, deadline, &mut add)?;
            super::fault::kill_now("after the first bucket of an NCCL receive");
        }
        comm.broadcast_buckets(&buckets, 0, deadline, add)?;
        let shapes: Vec<Vec<i64>> = plan.tensors.iter().map(|t| t.shape.clone()).collect();
        let views = layout.tensor_views(&flat, &shapes);
        let named = plan.tensors.iter().map(|t| t.name.clone()).zip(views).collect();
        Ok((named, digest.finish_hex(device)))
    }
}

#[cfg(feature = "cuda")]
pub use transfer::receive;

/// Fault injection for the GPU drills, never set in production: with
/// `GRPO_FAULT_KILL_IN_RECEIVE=N` the sidecar SIGKILLs itself during its N-th NCCL receive
/// (counting from 1), once the first bucket has landed and before it posts the others, so the
/// learner's broadcast is cut in the middle. It stands for a sidecar killed mid-broadcast, which
/// an outside `kill -9` cannot hit reliably when a transfer lasts milliseconds.
#[cfg(feature = "cuda")]
mod fault {
    use std::sync::atomic::{AtomicU64, Ordering};

    static RECEIVES: AtomicU64 = AtomicU64::new(0);

    /// Whether this receive is the one to die in (counts receives).
    pub fn kill_due() -> bool {
        let n = RECEIVES.fetch_add(1, Ordering::SeqCst) + 1;
        std::env::var("GRPO_FAULT_KILL_IN_RECEIVE")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|due| due == n)
    }

    /// SIGKILLs this process.
    pub fn kill_now(when: &str) {
        eprintln!("GRPO_FAULT_KILL_IN_RECEIVE: SIGKILL {when}");
        // SAFETY: sends a signal to this very process; it does not return.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_round_trip_and_bad_plans_are_refused() {
        let tensors = vec![("a".to_string(), vec![3, 5]), ("b".to_string(), vec![1000])];
        let layout = PackLayout::new(&[15, 1000], 2, 1000);
        let plan = device_plan(&tensors, Kind::BFloat16, &layout);
        assert_eq!(plan.bucket_bytes, 768);
        assert_eq!(plan.total_bytes, 2030);
        let (back, wire) = plan_layout(&plan).expect("valid plan");
        assert_eq!(back, layout);
        assert_eq!(wire, Kind::BFloat16);
        let mut bad = plan.clone();
        bad.total_bytes += 2;
        assert!(plan_layout(&bad).is_err());
        let mut bad = plan.clone();
        bad.tensors[1].dtype = "f32".into();
        assert!(plan_layout(&bad).is_err());
        let mut bad = plan.clone();
        bad.bucket_bytes = 700;
        assert!(plan_layout(&bad).is_err());
        let mut bad = plan;
        bad.tensors[0].dtype = "f8".into();
        assert!(plan_layout(&bad).is_err());
    }
}
