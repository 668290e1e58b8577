//! Target `plan`: a sidecar's `BeginUpdate`. The request is decoded from protobuf (as tonic
//! does), then checked as the WeightReceiver checks it: for the gRPC stream
//! [`check_plan`] then [`check_against`] the served model's manifest, and once every bucket is
//! in, [`unpack`]; for NCCL [`check_against`] then [`plan_layout`]. A plan that passes must
//! unpack into the announced tensors with the stream's exact bytes.
//!
//! [`unpack`] also runs alone on every fuzzed plan with the (small) fuzzed stream, to show it
//! cannot panic or over-read whatever it is given. Streams that a valid plan makes larger than
//! [`MAX_UNPACK_BYTES`] are not unpacked (the fixed manifest keeps valid plans at 100 bytes).

use arbitrary::{Result as ArbResult, Unstructured};
use prost::Message;

use crate::rpc::pb;
use crate::sync::nccl_sync::plan_layout;
use crate::sync::plan::{check_against, check_plan, digest_bytes, numel_of, unpack, PlanError, WeightSet};

use super::hostile::{int, mutate, rare, string};
use super::{ensure, FuzzTarget, Verdict, Violation};

/// Largest stream this target allocates and unpacks.
pub const MAX_UNPACK_BYTES: u64 = 1 << 20;

/// The `plan` target.
pub struct PlanTarget;

/// The served model of every case: small, with a scalar and an empty tensor.
pub fn manifest() -> Vec<(String, Vec<i64>)> {
    [
        ("embed", vec![4, 3]),
        ("layers.0.w", vec![3, 3]),
        ("norm", vec![3]),
        ("scale", vec![]),
        ("empty", vec![2, 0]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect()
}

/// What reaches the sidecar: a request, or bytes that may or may not decode to one.
#[derive(Debug, Clone)]
pub enum PlanInput {
    Request(pb::BeginUpdateRequest),
    Wire(Vec<u8>),
}

/// One case: the request and the stream bytes that follow it.
#[derive(Debug, Clone)]
pub struct PlanCase {
    pub input: PlanInput,
    pub stream: Vec<u8>,
}

/// Why a `BeginUpdate` is refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanRefusal {
    #[error("not a BeginUpdateRequest: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("missing plan")]
    MissingPlan,
    #[error("unknown transport {0}")]
    Transport(i32),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Layout(crate::sync::plan::PlanError),
}

/// What an accepted plan became.
#[derive(Debug)]
pub enum Accepted {
    /// gRPC stream: the tensors unpacked from the staged bytes, and those bytes.
    Stream {
        tensors: Vec<(String, tch::Tensor)>,
        staged: Vec<u8>,
    },
    /// gRPC stream too large to stage here (see [`MAX_UNPACK_BYTES`]).
    TooLarge,
    /// NCCL: the layout was derived.
    Nccl,
}

/// The receiver's path for one case.
pub fn receiver_path(
    case: &PlanCase,
    served: &[(String, Vec<i64>)],
) -> Result<(pb::BucketPlan, Accepted), PlanRefusal> {
    let req = match &case.input {
        PlanInput::Request(r) => r.clone(),
        PlanInput::Wire(bytes) => pb::BeginUpdateRequest::decode(bytes.as_slice())?,
    };
    let plan = req.plan.ok_or(PlanRefusal::MissingPlan)?;
    if req.transport == pb::Transport::Nccl as i32 {
        check_against(&plan, served)?;
        plan_layout(&plan).map_err(PlanRefusal::Layout)?;
        return Ok((plan, Accepted::Nccl));
    }
    if req.transport != pb::Transport::GrpcStream as i32 {
        return Err(PlanRefusal::Transport(req.transport));
    }
    check_plan(&plan)?;
    check_against(&plan, served)?;
    if plan.total_bytes > MAX_UNPACK_BYTES {
        return Ok((plan, Accepted::TooLarge));
    }
    let staged = stage(&plan, &case.stream);
    let tensors = unpack(&plan, &staged)?;
    Ok((plan, Accepted::Stream { tensors, staged }))
}

/// The staging buffer once every bucket arrived, cut as the receiver cuts it; bucket bytes
/// are taken from `stream` in turn (wrapping round).
fn stage(plan: &pb::BucketPlan, stream: &[u8]) -> Vec<u8> {
    let total = plan.total_bytes as usize;
    let mut staged = vec![0u8; total];
    if stream.is_empty() {
        return staged;
    }
    let mut from = 0usize;
    for i in 0..plan.bucket_count as usize {
        let start = i * plan.bucket_bytes as usize;
        let end = (start + plan.bucket_bytes as usize).min(total);
        for b in &mut staged[start..end] {
            *b = stream[from % stream.len()];
            from += 1;
        }
    }
    staged
}

impl FuzzTarget for PlanTarget {
    fn name(&self) -> &'static str {
        "plan"
    }

    fn case(&mut self, data: &[u8]) -> Result<Verdict, Violation> {
        let Ok(case) = build(&mut Unstructured::new(data)) else {
            return Ok(Verdict::Rejected("no input"));
        };
        if let PlanInput::Request(r) = &case.input {
            if let Some(plan) = &r.plan {
                unpack_alone(plan, &case.stream)?;
            }
        }
        match receiver_path(&case, &manifest()) {
            Err(e) => Ok(Verdict::Rejected(refusal_label(&e))),
            Ok((plan, accepted)) => check_accepted(&plan, &accepted).map(|()| Verdict::Accepted),
        }
    }

    fn render(&self, data: &[u8]) -> String {
        match build(&mut Unstructured::new(data)) {
            Ok(PlanCase { input, stream }) => format!("{input:?}, stream of {} bytes {:02x?}", stream.len(), stream),
            Err(e) => format!("(no input: {e})"),
        }
    }
}

fn refusal_label(e: &PlanRefusal) -> &'static str {
    match e {
        PlanRefusal::Decode(_) => "protobuf",
        PlanRefusal::MissingPlan => "missing plan",
        PlanRefusal::Transport(_) => "transport",
        PlanRefusal::Layout(_) => "nccl layout",
        PlanRefusal::Plan(p) => match p {
            PlanError::Dtype { .. } => "dtype",
            PlanError::Shape { .. } => "shape",
            PlanError::Overflow => "overflow",
            PlanError::TotalBytes { .. } => "total bytes",
            PlanError::BucketCount => "bucket count",
            PlanError::Unknown(_) => "unknown tensor",
            PlanError::Mismatch { .. } => "shape mismatch",
            PlanError::Twice(_) => "tensor twice",
            PlanError::Missing(_) => "tensor missing",
            PlanError::Short(_) => "stream short",
            PlanError::MixedDtype { .. } => "mixed dtypes",
            PlanError::BucketSize { .. } => "bucket size",
            PlanError::Tensor { .. } => "tensor",
        },
    }
}

/// `unpack` on any plan and a small stream: an error or tensors that fit, never a panic.
fn unpack_alone(plan: &pb::BucketPlan, stream: &[u8]) -> Result<(), Violation> {
    if let Ok(tensors) = unpack(plan, stream) {
        let used: u64 = plan
            .tensors
            .iter()
            .map(|t| numel_of(&t.shape).unwrap_or(u64::MAX).saturating_mul(4))
            .fold(0, u64::saturating_add);
        ensure(
            tensors.len() == plan.tensors.len() && used <= stream.len() as u64,
            "unpack alone reads only the stream it has",
            || {
                format!(
                    "{} tensors of {} bytes from {} bytes",
                    tensors.len(),
                    used,
                    stream.len()
                )
            },
        )?;
    }
    Ok(())
}

/// What an accepted gRPC plan must give: the announced tensors with the staged bytes.
fn check_accepted(plan: &pb::BucketPlan, accepted: &Accepted) -> Result<(), Violation> {
    let Accepted::Stream { tensors, staged } = accepted else {
        return Ok(());
    };
    let same = tensors.len() == plan.tensors.len()
        && tensors
            .iter()
            .zip(&plan.tensors)
            .all(|((n, t), spec)| *n == spec.name && t.size() == spec.shape);
    ensure(same, "unpacked tensors are the announced ones", || {
        format!("{:?}", tensors.iter().map(|(n, t)| (n, t.size())).collect::<Vec<_>>())
    })?;
    let repacked = WeightSet::pack(tensors).map(|w| w.digest());
    ensure(
        repacked.as_ref().is_ok_and(|d| *d == digest_bytes(staged)),
        "packing the unpacked tensors gives the stream back",
        || format!("{repacked:?}"),
    )
}

/// A case from bytes: mostly a structured request, sometimes protobuf bytes (mutated or raw).
pub fn build(u: &mut Unstructured) -> ArbResult<PlanCase> {
    let transport = *u.choose(&[1i32, 1, 1, 2, 2, 0, 3, -1])?;
    let plan = if rare(u, 30)? {
        None
    } else {
        Some(plan(u, transport == 2)?)
    };
    let request = pb::BeginUpdateRequest {
        version: Some(pb::PolicyVersion { step: u.arbitrary()? }),
        plan,
        transport,
    };
    let stream_len = u.int_in_range(0..=u.len().min(4096))?;
    let stream = u.bytes(stream_len)?.to_vec();
    let input = match u.int_in_range(0..=9u8)? {
        0 | 1 => PlanInput::Wire(mutate(u, &request.encode_to_vec(), &[])?),
        2 => PlanInput::Wire(u.bytes(u.len().min(256))?.to_vec()),
        _ => PlanInput::Request(request),
    };
    Ok(PlanCase { input, stream })
}

/// A plan: near the served manifest (valid, or one thing off) or anything.
fn plan(u: &mut Unstructured, nccl: bool) -> ArbResult<pb::BucketPlan> {
    let hostile = rare(u, 3)?;
    let dtype = if nccl && u.arbitrary()? { "bf16" } else { "f32" };
    let mut tensors: Vec<pb::TensorSpec> = if hostile && rare(u, 2)? {
        (0..u.int_in_range(0..=6usize)?)
            .map(|_| spec(u, dtype))
            .collect::<ArbResult<_>>()?
    } else {
        manifest()
            .into_iter()
            .map(|(name, shape)| pb::TensorSpec {
                name,
                dtype: dtype.into(),
                shape,
            })
            .collect()
    };
    if hostile {
        perturb(u, &mut tensors, dtype)?;
    }
    let elt = if dtype == "bf16" { 2 } else { 4 };
    let bucket_bytes = if hostile && rare(u, 4)? {
        *u.choose(&[0u64, 3, u64::MAX, 1 << 63, u64::from(u32::MAX) + 1])?
    } else {
        *u.choose(&[1u64, 4, 16, 64, 100, 256, 512, 1 << 20])?
    };
    let need = tensors
        .iter()
        .try_fold(0u64, |acc, t| acc.checked_add(numel_of(&t.shape)?.checked_mul(elt)?));
    let total_bytes = match need {
        Some(n) if !(hostile && rare(u, 3)?) => n,
        _ => *u.choose(&[0u64, 4, 100, 101, u64::MAX, 1 << 40])?,
    };
    let bucket_count = match total_bytes.checked_div(bucket_bytes) {
        Some(_) if !(hostile && rare(u, 3)?) => total_bytes.div_ceil(bucket_bytes) as u32,
        _ => u.arbitrary()?,
    };
    Ok(pb::BucketPlan {
        tensors,
        bucket_bytes,
        total_bytes,
        bucket_count,
    })
}

/// A tensor spec with any name, dtype and shape.
fn spec(u: &mut Unstructured, dtype: &str) -> ArbResult<pb::TensorSpec> {
    let names: Vec<String> = manifest().into_iter().map(|(n, _)| n).collect();
    let name = if u.ratio(3, 4)? {
        u.choose(&names)?.clone()
    } else {
        string(u)?
    };
    let dtype = if rare(u, 8)? {
        (*u.choose(&["f16", "bf16", "", "F32", "f32 ", "f64"])?).to_string()
    } else {
        dtype.to_string()
    };
    let dims = u.int_in_range(0..=5usize)?;
    let shape = (0..dims).map(|_| dim(u)).collect::<ArbResult<_>>()?;
    Ok(pb::TensorSpec { name, dtype, shape })
}

fn dim(u: &mut Unstructured) -> ArbResult<i64> {
    match u.int_in_range(0..=5u8)? {
        0..=2 => u.int_in_range(0..=5i64),
        3 => int(u),
        _ => Ok(*u.choose(&[0i64, 1, -1, i64::MAX, i64::MIN, 1 << 31, 1 << 32, 1 << 62, 1 << 20])?),
    }
}

/// One thing off: a tensor dropped, doubled, renamed, reshaped, or of another dtype.
fn perturb(u: &mut Unstructured, tensors: &mut Vec<pb::TensorSpec>, dtype: &str) -> ArbResult<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    let i = u.choose_index(tensors.len())?;
    match u.int_in_range(0..=6u8)? {
        0 => {
            tensors.remove(i);
        }
        1 => {
            let t = tensors[i].clone();
            tensors.push(t);
        }
        2 => tensors[i].name = string(u)?,
        3 => {
            tensors[i].shape = (0..u.int_in_range(0..=4usize)?)
                .map(|_| dim(u))
                .collect::<ArbResult<_>>()?
        }
        4 => tensors[i].dtype = if dtype == "f32" { "bf16".into() } else { "f32".into() },
        5 => tensors.swap(0, i),
        _ => tensors.push(spec(u, dtype)?),
    }
    Ok(())
}
