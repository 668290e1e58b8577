//! How a decoder layer's attention sees the positions of its input: causal over each row, a
//! given mask (generation with a KV cache), or sequences packed end to end in one row
//! (token-budget packing), causal within each sequence only; with shared prompts a
//! continuation segment also sees all of its prompt segment. Packed rows go through flash
//! attention's varlen kernel on CUDA in bf16/fp16 (a continuation's keys are its prompt's
//! followed by its own), and through a block mask otherwise.

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

/// Where the segments of a packed row lie (all int64 on the row's device unless said).
pub struct Segments<'a> {
    /// Each position's segment `[T]`.
    pub segments: &'a Tensor,
    /// Each segment's prompt segment, or -1 `[n]`.
    pub parents: &'a Tensor,
    /// Query segments' starts and the end `[n + 1]` (int32).
    pub cu_q: &'a Tensor,
    /// Key segments' starts and the end `[n + 1]` (int32): a segment's keys are its prompt's
    /// positions, then its own.
    pub cu_k: &'a Tensor,
    /// The positions of the key segments back to back `[Tk]`; `None` when every segment's keys
    /// are its own positions (no shared prompts).
    pub key_index: Option<&'a Tensor>,
    pub max_q: i64,
    pub max_k: i64,
}

/// A packed row's segments, for attention.
pub struct PackedAttention {
    segments: Tensor,
    parents: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    key_index: Option<Tensor>,
    max_q: i64,
    max_k: i64,
    use_flash: bool,
    mask: OnceCell<Tensor>,
}

/// Logged once: the varlen kernel failed and packed rows use the mask instead.
static FLASH_FAILED: AtomicBool = AtomicBool::new(false);

impl PackedAttention {
    /// `compute`: the dtype attention runs in. The varlen kernel is used on CUDA in bf16/fp16
    /// unless `GRPO_PACKED_ATTENTION=mask`.
    pub fn new(seg: &Segments<'_>, compute: Kind) -> Self {
        let forced_mask = std::env::var("GRPO_PACKED_ATTENTION").is_ok_and(|v| v == "mask");
        let use_flash =
            seg.segments.device().is_cuda() && matches!(compute, Kind::BFloat16 | Kind::Half) && !forced_mask;
        Self {
            segments: seg.segments.shallow_clone(),
            parents: seg.parents.shallow_clone(),
            cu_q: seg.cu_q.shallow_clone(),
            cu_k: seg.cu_k.shallow_clone(),
            key_index: seg.key_index.map(Tensor::shallow_clone),
            max_q: seg.max_q,
            max_k: seg.max_k,
            use_flash,
            mask: OnceCell::new(),
        }
    }

    /// Whether packed rows go through flash attention's varlen kernel.
    pub fn uses_flash(&self) -> bool {
        self.use_flash && !FLASH_FAILED.load(Ordering::Relaxed)
    }

    /// The attention mask `[1, 1, T, T]`: each position sees the earlier positions of its own
    /// segment, and every position of its segment's prompt (made once per micro-batch, on
    /// first use).
    pub fn mask(&self) -> &Tensor {
        self.mask.get_or_init(|| {
            let t = self.segments.size()[0];
            let (rows, cols) = (self.segments.unsqueeze(1), self.segments.unsqueeze(0));
            let same = rows.eq_tensor(&cols);
            let causal = Tensor::ones([t, t], (Kind::Bool, self.segments.device())).tril(0);
            let prompt_of_row = self.parents.index_select(0, &self.segments).unsqueeze(1);
            let in_prompt = cols.eq_tensor(&prompt_of_row);
            same.logical_and(&causal).logical_or(&in_prompt).view([1, 1, t, t])
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
        let keys = |x: &Tensor| match &self.key_index {
            Some(index) => tokens_first(x).index_select(0, index),
            None => tokens_first(x),
        };
        let seg = crate::torch_ext::VarlenSegments {
            cu_q: &self.cu_q,
            cu_k: &self.cu_k,
            max_q: self.max_q,
            max_k: self.max_k,
        };
        match crate::torch_ext::flash_varlen(&tokens_first(q), &keys(k), &keys(v), &seg) {
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
