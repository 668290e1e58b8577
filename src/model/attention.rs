//! How a decoder layer's attention sees the positions of its input: causal over each row, a
//! given mask (generation with a KV cache), or sequences packed end to end in one row
//! (token-budget packing), causal within each sequence only. Packed rows go through flash
//! attention's varlen kernel on CUDA in bf16/fp16, and through a block-causal mask otherwise.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Kind, Tensor};

/// The attention pattern of one layer call.
#[derive(Clone, Copy)]
pub enum Attend<'a> {
    /// Causal over each row.
    Causal,
    /// Where this boolean mask `[B, 1, T, S]` is true.
    Mask(&'a Tensor),
    /// Sequences packed end to end in one row.
    Packed(&'a PackedAttention),
}

/// Where the sequences of a packed row lie, for attention.
pub struct PackedAttention {
    segments: Tensor,
    cu_seqlens: Tensor,
    max_len: i64,
    use_flash: bool,
    mask: OnceCell<Tensor>,
}

/// Logged once: the varlen kernel failed and packed rows use the mask instead.
static FLASH_FAILED: AtomicBool = AtomicBool::new(false);

impl PackedAttention {
    /// `segments` `[T]` (int64): each position's sequence; `cu_seqlens` `[n + 1]` (int32): the
    /// sequences' starts and the end; `compute`: the dtype attention runs in. The varlen kernel
    /// is used on CUDA in bf16/fp16 unless `GRPO_PACKED_ATTENTION=mask`.
    pub fn new(segments: &Tensor, cu_seqlens: &Tensor, max_len: i64, compute: Kind) -> Self {
        let forced_mask = std::env::var("GRPO_PACKED_ATTENTION").is_ok_and(|v| v == "mask");
        let use_flash = segments.device().is_cuda() && matches!(compute, Kind::BFloat16 | Kind::Half) && !forced_mask;
        Self {
            segments: segments.shallow_clone(),
            cu_seqlens: cu_seqlens.shallow_clone(),
            max_len,
            use_flash,
            mask: OnceCell::new(),
        }
    }

    /// Whether packed rows go through flash attention's varlen kernel.
    pub fn uses_flash(&self) -> bool {
        self.use_flash && !FLASH_FAILED.load(Ordering::Relaxed)
    }

    /// The block-causal mask `[1, 1, T, T]`: each position sees the earlier positions of its
    /// own sequence (made once per micro-batch, on first use).
    pub fn mask(&self) -> &Tensor {
        self.mask.get_or_init(|| {
            let t = self.segments.size()[0];
            let same = self.segments.unsqueeze(1).eq_tensor(&self.segments.unsqueeze(0));
            let causal = Tensor::ones([t, t], (Kind::Bool, self.segments.device())).tril(0);
            same.logical_and(&causal).view([1, 1, t, t])
        })
    }

    /// Attention of `q` `[1, heads, T, d]` over `k`/`v` `[1, kv_heads, T, d]` through the varlen
    /// kernel, as `[T, heads, d]`; `None` when the kernel is not used here (or failed once: the
    /// mask path then takes over, with a warning).
    pub fn flash(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Tensor> {
        if !self.uses_flash() {
            return None;
        }
        let tokens_first = |x: &Tensor| x.squeeze_dim(0).transpose(0, 1).contiguous();
        match crate::torch_ext::flash_varlen(
            &tokens_first(q),
            &tokens_first(k),
            &tokens_first(v),
            &self.cu_seqlens,
            self.max_len,
        ) {
            Ok(out) => Some(out),
            Err(e) => {
                if !FLASH_FAILED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "flash attention's varlen kernel failed; packed rows use a block-causal mask");
                }
                None
            }
        }
    }
}
