//! libtorch operations that tch 0.24 does not bind, reached through the C++ shim in `csrc/`
//! (compiled by `build.rs` against the same libtorch).

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::Tensor;

extern "C" {
    fn grpo_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Hyper-parameters of one fused AdamW call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedAdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One group of tensors for [`fused_adamw`]: parameters, gradients, moments and step counters
/// (float32 scalars on the parameters' device, already incremented), all of equal length.
pub struct AdamWGroup<'a> {
    pub params: &'a [Tensor],
    pub grads: &'a [Tensor],
    pub exp_avgs: &'a [Tensor],
    pub exp_avg_sqs: &'a [Tensor],
    pub steps: &'a [Tensor],
}

fn raw(ts: &[Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// `torch._fused_adamw_`: the whole update of every tensor in a few kernel launches.
pub fn fused_adamw(group: &AdamWGroup<'_>, hp: FusedAdamW) -> Result<(), ShimError> {
    let n = group.params.len();
    let lens = [
        group.grads.len(),
        group.exp_avgs.len(),
        group.exp_avg_sqs.len(),
        group.steps.len(),
    ];
    if lens.iter().any(|&l| l != n) {
        return Err(ShimError {
            op: "fused AdamW",
            message: format!("{n} parameters but lists of {lens:?}"),
        });
    }
    let (p, g, m, v, s) = (
        raw(group.params),
        raw(group.grads),
        raw(group.exp_avgs),
        raw(group.exp_avg_sqs),
        raw(group.steps),
    );
    // SAFETY: every pointer is a live `at::Tensor*` owned by the slices above, which outlive
    // the call; the shim catches C++ exceptions and reports them through `err`.
    shim_call("fused AdamW", |err, err_len| unsafe {
        grpo_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.weight_decay,
            hp.eps,
            err,
            err_len,
        )
    })
}

extern "C" {
    fn grpo_flash_varlen(
        q: *mut c_void,
        k: *mut c_void,
        v: *mut c_void,
        cu_q: *mut c_void,
        cu_k: *mut c_void,
        max_q: i64,
        max_k: i64,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// A libtorch call through the shim failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {message}")]
pub struct ShimError {
    pub op: &'static str,
    pub message: String,
}

/// Segments of [`flash_varlen`]: query segment i is rows `cu_q[i]..cu_q[i+1]`, its keys rows
/// `cu_k[i]..cu_k[i+1]` (int32 `[n + 1]` each); the longest of each.
pub struct VarlenSegments<'a> {
    pub cu_q: &'a Tensor,
    pub cu_k: &'a Tensor,
    pub max_q: i64,
    pub max_k: i64,
}

/// Flash attention's varlen kernel (`torch.ops.aten._flash_attention_forward` with
/// `cu_seqlens`): `q` `[Tq, heads, d]`, `k`/`v` `[Tk, kv_heads, d]` (fp16/bf16, CUDA), causal
/// within each segment, aligned to the segments' ends; differentiable.
pub fn flash_varlen(q: &Tensor, k: &Tensor, v: &Tensor, seg: &VarlenSegments<'_>) -> Result<Tensor, ShimError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: live `at::Tensor*` handles for the call; on success the shim hands over a new
    // heap tensor, which `from_ptr` owns from here on.
    shim_call("flash attention (varlen)", |err, err_len| unsafe {
        grpo_flash_varlen(
            q.as_ptr() as *mut c_void,
            k.as_ptr() as *mut c_void,
            v.as_ptr() as *mut c_void,
            seg.cu_q.as_ptr() as *mut c_void,
            seg.cu_k.as_ptr() as *mut c_void,
            seg.max_q,
            seg.max_k,
            &mut out,
            err,
            err_len,
        )
    })?;
    if out.is_null() {
        return Err(ShimError {
            op: "flash attention (varlen)",
            message: "no output tensor".into(),
        });
    }
    // SAFETY: `out` is a tensor the shim allocated for us (a C_tensor).
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// Runs a shim function that returns 0 on success, or nonzero with a message written into the
/// error buffer it is given.
fn shim_call(op: &'static str, call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), ShimError> {
    let mut err = vec![0 as c_char; 1024];
    if call(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim wrote a NUL-terminated string into `err` (zeroed beforehand, and its
    // writer truncates to the buffer's length).
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
    Err(ShimError {
        op,
        message: msg.to_string_lossy().into_owned(),
    })
}

extern "C" {
    fn grpo_backward(tensor: *mut c_void, grad: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
}

/// `y.backward(grad)`: backpropagates `grad` (shaped and typed as `y`) through `y`'s graph
/// without materializing `(y * grad).sum()`.
pub fn backward(y: &Tensor, grad: &Tensor) -> Result<(), ShimError> {
    // SAFETY: live `at::Tensor*` handles for the call; the shim catches C++ exceptions.
    shim_call("backward", |err, err_len| unsafe {
        grpo_backward(y.as_ptr() as *mut c_void, grad.as_ptr() as *mut c_void, err, err_len)
    })
}

extern "C" {
    fn grpo_cuda_peak_allocated(device: c_int) -> i64;
    fn grpo_cuda_reset_peak(device: c_int) -> c_int;
    fn grpo_cuda_release_cached(device: c_int) -> i64;
    fn grpo_cuda_memory(device: c_int, allocated: *mut i64, reserved: *mut i64) -> c_int;
}

/// The CUDA caching allocator's current bytes on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    /// Bytes in live tensors (`torch.cuda.memory_allocated`).
    pub allocated: u64,
    /// Bytes the allocator holds from the driver, free blocks included (`memory_reserved`).
    pub reserved: u64,
}

/// The allocator's current bytes on `device`, if there is a CUDA allocator to ask.
pub fn cuda_memory(device: usize) -> Option<CudaMemory> {
    let (mut allocated, mut reserved) = (0i64, 0i64);
    // SAFETY: the shim writes two integers through pointers to our locals and catches C++
    // exceptions.
    let rc = unsafe { grpo_cuda_memory(device as c_int, &mut allocated, &mut reserved) };
    if rc != 0 {
        return None;
    }
    Some(CudaMemory {
        allocated: u64::try_from(allocated).ok()?,
        reserved: u64::try_from(reserved).ok()?,
    })
}

/// `torch.cuda.max_memory_allocated(device)`, if there is a CUDA allocator to ask.
pub fn cuda_peak_allocated(device: usize) -> Option<u64> {
    // SAFETY: plain integer call; the shim catches C++ exceptions.
    let v = unsafe { grpo_cuda_peak_allocated(device as c_int) };
    u64::try_from(v).ok()
}

/// `torch.cuda.reset_peak_memory_stats(device)`; false when there is no CUDA allocator.
pub fn cuda_reset_peak(device: usize) -> bool {
    // SAFETY: as above.
    unsafe { grpo_cuda_reset_peak(device as c_int) == 0 }
}

/// `torch.cuda.empty_cache()`: the bytes the caching allocator gave back to the driver, or None
/// when there is no CUDA allocator.
pub fn cuda_release_cached(device: usize) -> Option<u64> {
    // SAFETY: as above.
    let v = unsafe { grpo_cuda_release_cached(device as c_int) };
    u64::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    /// `backward(y, g)` leaves the same gradient as `(y * g).sum().backward()`, and a gradient
    /// of the wrong shape is an error, not a crash.
    #[test]
    fn backward_with_a_gradient_matches_the_product_trick() {
        let mut x = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let g = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let y = x.sin() * 2.0;
        super::backward(&y, &g).expect("backward");
        let ours = x.grad().copy();
        x.zero_grad();
        ((x.sin() * 2.0) * &g).sum(Kind::Float).backward();
        let diff = f64::try_from((ours - x.grad()).abs().max()).expect("scalar");
        assert!(diff < 1e-6, "max diff {diff}");
        let bad = Tensor::ones([2], (Kind::Float, tch::Device::Cpu));
        let y = x.sin();
        assert!(super::backward(&y, &bad).is_err());
    }

    /// A CPU-only process has no CUDA allocator: the shim says so instead of throwing.
    #[test]
    fn cuda_stats_without_cuda_are_absent() {
        if !tch::Cuda::is_available() {
            assert_eq!(super::cuda_peak_allocated(0), None);
            assert!(!super::cuda_reset_peak(0));
            assert_eq!(super::cuda_release_cached(0), None);
            assert_eq!(super::cuda_memory(0), None);
        }
    }
}
