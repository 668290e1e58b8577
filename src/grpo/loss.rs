//! The GRPO objective on one micro-batch: temperature-scaled log-probabilities in fp32, the
//! clipped importance ratio against rollout logprobs, optional truncated-IS cap and k3 KL,
//! and step-level aggregation (so the sum over micro-batches is the step's loss).

use tch::{Device, Kind, Tensor};

use super::pack::MicroBatch;
use super::validate::IGNORE;

/// How negative advantages are clipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClipMode {
    /// PPO-clip: `-min(r*A, clip(r)*A)` for every sign of A.
    Standard,
    /// The Atropos example trainer's variant: `-max(r*A, clip(r)*A)` when A < 0.
    Atropos,
}

/// How per-token losses become the step's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAgg {
    /// Mean over each sequence's scored tokens, then mean over sequences (Atropos default).
    SeqMeanTokenMean,
    /// Mean over every scored token of the step (DAPO).
    TokenMean,
}

/// Loss hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub clip_mode: ClipMode,
    pub clip_eps_low: f64,
    pub clip_eps_high: f64,
    /// Truncated importance sampling: the ratio is capped at this value (no gradient above it).
    pub is_cap: Option<f64>,
    /// Weight of the k3 KL estimate against the rollout policy.
    pub kl_coef: f64,
    pub agg: LossAgg,
}

/// Step-level normalisers, known before the first micro-batch runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepNorm {
    pub sequences: f64,
    pub scored_tokens: f64,
}

/// Sums over the scored tokens of one micro-batch (combined into step metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    pub loss: f64,
    pub tokens: f64,
    pub ratio_sum: f64,
    pub clipped: f64,
    /// Tokens with rollout logprobs (off-policy rows only), for the logprob diff statistics.
    pub diff_tokens: f64,
    pub diff_sum: f64,
    pub diff_abs_sum: f64,
    pub diff_max: f64,
    pub kl_sum: f64,
    pub pos_logp_sum: f64,
    pub pos_tokens: f64,
    pub neg_logp_sum: f64,
    pub neg_tokens: f64,
}

impl LossStats {
    /// Adds another micro-batch's sums.
    pub fn merge(&mut self, o: &LossStats) {
        self.loss += o.loss;
        self.tokens += o.tokens;
        self.ratio_sum += o.ratio_sum;
        self.clipped += o.clipped;
        self.diff_tokens += o.diff_tokens;
        self.diff_sum += o.diff_sum;
        self.diff_abs_sum += o.diff_abs_sum;
        self.diff_max = self.diff_max.max(o.diff_max);
        self.kl_sum += o.kl_sum;
        self.pos_logp_sum += o.pos_logp_sum;
        self.pos_tokens += o.pos_tokens;
        self.neg_logp_sum += o.neg_logp_sum;
        self.neg_tokens += o.neg_tokens;
    }
}

/// A chunk's [`LossStats`] still on the device (`[STAT_SUMS]` fp64, in the fields' order), so
/// that a micro-batch's chunks cost one device-to-host copy together instead of one each.
pub struct PendingStats(Tensor);

/// The number of [`LossStats`] fields.
const STAT_SUMS: usize = 13;

impl PendingStats {
    /// Copies every chunk's sums to the host at once and merges them in order.
    pub fn read_all(chunks: &[PendingStats]) -> LossStats {
        let mut out = LossStats::default();
        if chunks.is_empty() {
            return out;
        }
        let all =
            Tensor::stack(&chunks.iter().map(|c| c.0.shallow_clone()).collect::<Vec<_>>(), 0).to_device(Device::Cpu);
        let v = Vec::<f64>::try_from(&all.reshape([-1])).unwrap_or_default();
        for i in 0..chunks.len() {
            let at = |k: usize| v.get(i * STAT_SUMS + k).copied().unwrap_or(f64::NAN);
            out.merge(&LossStats {
                loss: at(0),
                tokens: at(1),
                ratio_sum: at(2),
                clipped: at(3),
                diff_tokens: at(4),
                diff_sum: at(5),
                diff_abs_sum: at(6),
                diff_max: at(7),
                kl_sum: at(8),
                pos_logp_sum: at(9),
                pos_tokens: at(10),
                neg_logp_sum: at(11),
                neg_tokens: at(12),
            });
        }
        out
    }
}

/// A micro-batch as tensors on the training device.
pub struct MicroTensors {
    pub input_ids: Tensor,
    pub labels: Tensor,
    pub ref_logprobs: Tensor,
    pub on_policy: Tensor,
    pub advantages: Tensor,
    /// Per row, or per sequence when packed.
    pub temperatures: Tensor,
    /// Flat indices of the scored positions (`labels != IGNORE`) `[S]` (int64), found on the
    /// host so the step never waits on the device to learn how many there are.
    pub scored: Tensor,
    /// Every row's (or sequence's) temperature counts as 1 ([`unit_temperatures`]).
    pub unit_temperature: bool,
    /// Token-budget packing: where the sequences lie in the one row.
    pub packed: Option<Packed>,
}

impl MicroTensors {
    /// Moves a packed micro-batch onto `device`.
    pub fn new(mb: &MicroBatch, device: Device) -> Self {
        let shape = [mb.rows as i64, mb.seq_len as i64];
        let on_policy: Vec<u8> = mb.on_policy.iter().map(|&b| u8::from(b)).collect();
        let packed = mb.is_packed().then(|| Packed::new(mb, device));
        let scored: Vec<i64> = (0..)
            .zip(&mb.labels)
            .filter_map(|(i, &l)| (l != IGNORE).then_some(i))
            .collect();
        Self {
            input_ids: Tensor::from_slice(&mb.input_ids).view(shape).to_device(device),
            labels: Tensor::from_slice(&mb.labels).view(shape).to_device(device),
            ref_logprobs: Tensor::from_slice(&mb.ref_logprobs).view(shape).to_device(device),
            on_policy: Tensor::from_slice(&on_policy)
                .to_kind(Kind::Bool)
                .view([-1, 1])
                .to_device(device),
            advantages: Tensor::from_slice(&mb.advantages).view(shape).to_device(device),
            temperatures: Tensor::from_slice(&mb.temperatures).to_device(device),
            scored: Tensor::from_slice(&scored).to_device(device),
            unit_temperature: unit_temperatures(&mb.temperatures),
            packed,
        }
    }
}

/// Where the segments of a packed micro-batch lie in its one row.
pub struct Packed {
    /// Segment index of every position `[T]` (int64).
    pub segments: Tensor,
    /// Each segment's shared-prompt segment, or -1 `[n]` (int64).
    pub parents: Tensor,
    /// RoPE position of every token within its own sequence `[T]` (int64): positions restart
    /// per sequence, and a continuation goes on from its prompt's length.
    pub positions: Tensor,
    /// Segment starts and the end `[n + 1]` (int32, flash attention's `cu_seqlens`).
    pub cu_seqlens: Tensor,
    /// Key segments (a continuation's keys: its prompt's positions, then its own) `[n + 1]`.
    pub cu_seqlens_k: Tensor,
    /// The key segments' positions back to back, when some segment has a prompt.
    pub key_index: Option<Tensor>,
    pub max_len: i64,
    pub max_len_k: i64,
    /// Largest RoPE position + 1.
    pub span: i64,
    pub sequences: i64,
}

impl Packed {
    pub fn new(mb: &MicroBatch, device: Device) -> Self {
        let lens: Vec<i64> = mb.seq_lens.iter().map(|&n| n as i64).collect();
        let n = lens.len();
        let parents: Vec<Option<usize>> = if mb.seq_parents.len() == n {
            mb.seq_parents.clone()
        } else {
            vec![None; n]
        };
        let offsets: Vec<i64> = if mb.seq_offsets.len() == n {
            mb.seq_offsets.iter().map(|&o| o as i64).collect()
        } else {
            vec![0; n]
        };
        let mut starts = Vec::with_capacity(n);
        let (mut segments, mut positions) = (Vec::new(), Vec::new());
        let mut at = 0i64;
        for (k, &len) in lens.iter().enumerate() {
            starts.push(at);
            segments.extend(std::iter::repeat_n(k as i64, len as usize));
            positions.extend(offsets[k]..offsets[k] + len);
            at += len;
        }
        let i32_of = |x: i64| i32::try_from(x).unwrap_or(i32::MAX);
        let (mut cu, mut cu_k, mut keys) = (vec![0i32], vec![0i32], Vec::new());
        let (mut total_k, mut max_k) = (0i64, 0i64);
        for k in 0..n {
            cu.push(i32_of(starts[k] + lens[k]));
            let mut len_k = lens[k];
            if let Some(p) = parents[k] {
                keys.extend(starts[p]..starts[p] + lens[p]);
                len_k += lens[p];
            }
            keys.extend(starts[k]..starts[k] + lens[k]);
            total_k += len_k;
            max_k = max_k.max(len_k);
            cu_k.push(i32_of(total_k));
        }
        let shared = parents.iter().any(Option::is_some);
        let parent_ids: Vec<i64> = parents.iter().map(|p| p.map_or(-1, |p| p as i64)).collect();
        Self {
            segments: Tensor::from_slice(&segments).to_device(device),
            parents: Tensor::from_slice(&parent_ids).to_device(device),
            span: positions.iter().copied().max().map_or(1, |m| m + 1),
            positions: Tensor::from_slice(&positions).to_device(device),
            cu_seqlens: Tensor::from_slice(&cu).to_device(device),
            cu_seqlens_k: Tensor::from_slice(&cu_k).to_device(device),
            key_index: shared.then(|| Tensor::from_slice(&keys).to_device(device)),
            max_len: lens.iter().copied().max().unwrap_or(0),
            max_len_k: max_k,
            sequences: n as i64,
        }
    }
}

/// Log-probabilities `[B, T]` (fp32) of `labels` under `logits / temperature`; 0 at ignored
/// positions. Uses gather + logsumexp so only the logits themselves are full-vocabulary.
pub fn token_logprobs(logits: &Tensor, labels: &Tensor, temperatures: &Tensor) -> Tensor {
    let (b, t, v) = (logits.size()[0], logits.size()[1], logits.size()[2]);
    let temps = temperatures
        .to_kind(Kind::Float)
        .view([-1, 1])
        .expand([b, t], false)
        .reshape([-1]);
    flat_logprobs(&logits.reshape([-1, v]), &labels.reshape([-1]), &temps).view([b, t])
}

/// Per-token inputs of the loss, flattened to `[N]` (N = rows x positions of a micro-batch, or a
/// chunk of them).
pub struct TokenInputs {
    pub labels: Tensor,
    pub ref_logprobs: Tensor,
    pub on_policy: Tensor,
    pub advantages: Tensor,
    pub temperatures: Tensor,
    /// Each token's share of the step loss: `mask / scored(row) / sequences` for
    /// seq-mean-token-mean, `mask / scored(step)` for token-mean; 0 where unscored.
    pub weights: Tensor,
}

impl TokenInputs {
    /// Flattens a micro-batch and computes each token's loss weight.
    pub fn of_micro_batch(mt: &MicroTensors, cfg: &LossConfig, norm: StepNorm) -> Self {
        if let Some(packed) = &mt.packed {
            return Self::of_packed(mt, packed, cfg, norm);
        }
        let (b, t) = (mt.labels.size()[0], mt.labels.size()[1]);
        let mask = mt.labels.ne(IGNORE).to_kind(Kind::Float);
        let weights = match cfg.agg {
            LossAgg::SeqMeanTokenMean => {
                let per_row = mask.sum_dim_intlist([-1].as_slice(), true, Kind::Float).clamp_min(1e-8);
                &mask / per_row / norm.sequences
            }
            LossAgg::TokenMean => &mask / norm.scored_tokens.max(1.0),
        };
        let per_row = |x: &Tensor| x.view([b, 1]).expand([b, t], false).reshape([-1]);
        Self {
            labels: mt.labels.reshape([-1]),
            ref_logprobs: mt.ref_logprobs.reshape([-1]),
            on_policy: per_row(&mt.on_policy),
            advantages: mt.advantages.reshape([-1]),
            temperatures: per_row(&mt.temperatures.to_kind(Kind::Float)),
            weights: weights.reshape([-1]),
        }
    }

    /// A packed micro-batch: per-sequence values spread over each sequence's tokens, and each
    /// sequence's token mean taken over its own segment of the row.
    fn of_packed(mt: &MicroTensors, packed: &Packed, cfg: &LossConfig, norm: StepNorm) -> Self {
        let labels = mt.labels.reshape([-1]);
        let mask = labels.ne(IGNORE).to_kind(Kind::Float);
        let weights = match cfg.agg {
            LossAgg::SeqMeanTokenMean => {
                let counts = Tensor::zeros([packed.sequences], (Kind::Float, mask.device())).index_add(
                    0,
                    &packed.segments,
                    &mask,
                );
                &mask / counts.clamp_min(1e-8).index_select(0, &packed.segments) / norm.sequences
            }
            LossAgg::TokenMean => &mask / norm.scored_tokens.max(1.0),
        };
        let spread = |x: &Tensor| x.reshape([-1]).index_select(0, &packed.segments);
        Self {
            labels,
            ref_logprobs: mt.ref_logprobs.reshape([-1]),
            on_policy: spread(&mt.on_policy),
            advantages: mt.advantages.reshape([-1]),
            temperatures: spread(&mt.temperatures.to_kind(Kind::Float)),
            weights,
        }
    }

    /// The tokens at `index` (int64 positions), in that order.
    pub fn select(&self, index: &Tensor) -> Self {
        let pick = |x: &Tensor| x.index_select(0, index);
        Self {
            labels: pick(&self.labels),
            ref_logprobs: pick(&self.ref_logprobs),
            on_policy: pick(&self.on_policy),
            advantages: pick(&self.advantages),
            temperatures: pick(&self.temperatures),
            weights: pick(&self.weights),
        }
    }

    /// Tokens `start..start + len`.
    pub fn narrow(&self, start: i64, len: i64) -> Self {
        let n = |x: &Tensor| x.narrow(0, start, len);
        Self {
            labels: n(&self.labels),
            ref_logprobs: n(&self.ref_logprobs),
            on_policy: n(&self.on_policy),
            advantages: n(&self.advantages),
            temperatures: n(&self.temperatures),
            weights: n(&self.weights),
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Largest |log-ratio| the loss exponentiates: `exp(20)` is about 4.9e8, far past any clip
/// range and finite in fp32.
pub const LOG_RATIO_LIMIT: f64 = 20.0;

/// The temperatures the logits are divided by: an unset or greedy one (<= 0, or NaN) counts as 1.
fn sampling_temperatures(temperatures: &Tensor) -> Tensor {
    temperatures.where_scalarother(&temperatures.gt(0.0), 1.0)
}

/// Whether every temperature counts as 1 (the rule of [`sampling_temperatures`], on the host), so
/// the logits need no scaling.
pub fn unit_temperatures(temperatures: &[f32]) -> bool {
    temperatures.iter().all(|&t| t.is_nan() || t <= 0.0 || t == 1.0)
}

/// Log-probabilities `[N]` (fp32) of `labels` under `logits [N, V] / temperature`; 0 at ignored
/// positions.
fn flat_logprobs(logits: &Tensor, labels: &Tensor, temperatures: &Tensor) -> Tensor {
    let t = sampling_temperatures(temperatures).unsqueeze(-1);
    let scaled = logits.to_kind(Kind::Float) / t;
    let mask = labels.ne(IGNORE);
    let safe = labels.where_scalarother(&mask, 0);
    let picked = scaled.gather(-1, &safe.unsqueeze(-1), false).squeeze_dim(-1);
    let lse = scaled.logsumexp([-1].as_slice(), false);
    (picked - lse) * mask.to_kind(Kind::Float)
}

/// Logprobs of a chunk's labels computed outside autograd, with what their gradient needs: the
/// head's elementwise work in three passes over `[N, V]` (the log-softmax, an exp, and a product
/// written in the logits' dtype) instead of autograd's chain of fp32 copies (cast, scale,
/// gather, logsumexp, and their backwards).
pub struct HeadLogprobs {
    /// `[N]` fp32: log softmax(logits / t) at the labels; 0 at ignored positions.
    pub logp: Tensor,
    /// `[N, V]` fp32 log-softmax, consumed by [`HeadLogprobs::logits_grad`].
    log_softmax: Tensor,
    /// Labels with ignored positions pointed at 0, `[N, 1]`.
    safe: Tensor,
    /// `mask / t` per token, `[N]`.
    scale: Tensor,
}

impl HeadLogprobs {
    /// `unit_temperature`: every token's temperature is 1 (or unset), which skips the scaling.
    pub fn new(logits: &Tensor, labels: &Tensor, temperatures: &Tensor, unit_temperature: bool) -> Self {
        tch::no_grad(|| {
            let t = sampling_temperatures(temperatures);
            let scored = labels.ne(IGNORE);
            let safe = labels.where_scalarother(&scored, 0).unsqueeze(-1);
            let mask = scored.to_kind(Kind::Float);
            let log_softmax = if unit_temperature {
                logits.log_softmax(-1, Kind::Float)
            } else {
                // bf16 logits over fp32 temperatures promote to fp32 in the one division.
                (logits / t.unsqueeze(-1)).log_softmax(-1, Kind::Float)
            };
            let logp = log_softmax.gather(-1, &safe, false).squeeze_dim(-1) * &mask;
            Self {
                logp,
                log_softmax,
                safe,
                scale: mask / t,
            }
        })
    }

    /// d loss / d logits (`[N, V]`, in `kind`) from d loss / d logp (`grad`, `[N]`): each row is
    /// `(onehot(label) - softmax) * grad / t`.
    pub fn logits_grad(self, grad: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| {
            let c = (grad.to_kind(Kind::Float) * &self.scale).unsqueeze(-1);
            let mut p = self.log_softmax;
            let _ = p.exp_();
            // softmax - onehot(label) in place, then times -c, rounded to `kind` as it is
            // written: two passes over [N, V] after the exp, not three and a cast.
            let _ = p.scatter_add_(-1, &self.safe, &Tensor::full_like(&c, -1.0));
            let out = Tensor::empty(p.size(), (kind, p.device()));
            p.mul_out(&out, &c.neg())
        })
    }
}

/// The loss of a chunk of tokens (a scalar to backpropagate; the chunks of a step sum to the
/// step loss) and its sums. `logits` is `[N, V]` in any dtype; everything after it is fp32.
pub fn token_chunk_loss(logits: &Tensor, tok: &TokenInputs, cfg: &LossConfig) -> (Tensor, PendingStats) {
    logprob_loss(&flat_logprobs(logits, &tok.labels, &tok.temperatures), tok, cfg)
}

/// [`token_chunk_loss`] from the tokens' logprobs `[N]` (fp32) instead of their logits.
pub fn logprob_loss(logp: &Tensor, tok: &TokenInputs, cfg: &LossConfig) -> (Tensor, PendingStats) {
    let mask = tok.labels.ne(IGNORE).to_kind(Kind::Float);
    // On-policy rows compare against the current policy itself: ratio 1, gradient of A*logp.
    let ref_lp = logp.detach().where_self(&tok.on_policy, &tok.ref_logprobs);
    // Clamped before `exp`: an extreme rollout logprob (finite in the batch, or -inf once cast
    // to fp32) gives a large but finite ratio instead of inf and a NaN gradient.
    let log_ratio = (logp - &ref_lp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT);
    let ratio = log_ratio.exp();
    let r = match cfg.is_cap {
        Some(cap) => ratio.clamp_max(cap),
        None => ratio.shallow_clone(),
    };
    let (lo, hi) = (1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high);
    let clipped = r.clamp(lo, hi);
    let a = &tok.advantages;
    let unclipped_obj = &r * a;
    let clipped_obj = &clipped * a;
    let surrogate = match cfg.clip_mode {
        ClipMode::Standard => unclipped_obj.minimum(&clipped_obj),
        ClipMode::Atropos => unclipped_obj
            .minimum(&clipped_obj)
            .where_self(&a.ge(0.0), &unclipped_obj.maximum(&clipped_obj)),
    };
    let mut per_tok = -surrogate;
    let d = -&log_ratio;
    let kl = d.exp() - &d - 1.0;
    if cfg.kl_coef > 0.0 {
        per_tok = &per_tok + &kl * cfg.kl_coef;
    }
    let loss = (&per_tok * &tok.weights).sum(Kind::Float);
    let stats = tch::no_grad(|| {
        let r = r.detach();
        let clipped_now = match cfg.clip_mode {
            // The objective is clipped where the clipped term is the one selected and differs.
            ClipMode::Standard => a
                .gt(0.0)
                .logical_and(&r.gt(hi))
                .logical_or(&a.lt(0.0).logical_and(&r.lt(lo))),
            ClipMode::Atropos => a
                .ge(0.0)
                .logical_and(&r.gt(hi))
                .logical_or(&a.lt(0.0).logical_and(&r.gt(hi))),
        };
        let diff_mask = &mask * tok.on_policy.logical_not().to_kind(Kind::Float);
        let diff = log_ratio.detach() * &diff_mask;
        let logp = logp.detach();
        let pos = a.gt(0.0).to_kind(Kind::Float) * &mask;
        let neg = a.lt(0.0).to_kind(Kind::Float) * &mask;
        // Left on the device: the step reads every chunk's sums at once.
        PendingStats(
            Tensor::stack(
                &[
                    loss.detach(),
                    mask.sum(Kind::Float),
                    (&r * &mask).sum(Kind::Float),
                    (clipped_now.to_kind(Kind::Float) * &mask).sum(Kind::Float),
                    diff_mask.sum(Kind::Float),
                    diff.sum(Kind::Float),
                    diff.abs().sum(Kind::Float),
                    diff.abs().max(),
                    (kl.detach() * &mask).sum(Kind::Float),
                    (&logp * &pos).sum(Kind::Float),
                    pos.sum(Kind::Float),
                    (&logp * &neg).sum(Kind::Float),
                    neg.sum(Kind::Float),
                ],
                0,
            )
            .to_kind(Kind::Double),
        )
    });
    (loss, stats)
}

/// The micro-batch's contribution to the step loss (a scalar to backpropagate) and its sums,
/// from full logits `[B, T, V]` (one chunk; the trainer chunks instead).
pub fn micro_batch_loss(logits: &Tensor, mt: &MicroTensors, cfg: &LossConfig, norm: StepNorm) -> (Tensor, LossStats) {
    let tok = TokenInputs::of_micro_batch(mt, cfg, norm);
    let v = logits.size()[2];
    let (loss, stats) = token_chunk_loss(&logits.reshape([-1, v]), &tok, cfg);
    (loss, PendingStats::read_all(&[stats]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: ClipMode) -> LossConfig {
        LossConfig {
            clip_mode: mode,
            clip_eps_low: 0.2,
            clip_eps_high: 0.2,
            is_cap: None,
            kl_coef: 0.0,
            agg: LossAgg::TokenMean,
        }
    }

    /// One scored token whose logits make the policy logprob exactly ln(0.5) (two-token vocab,
    /// equal logits); the rollout logprob sets the ratio.
    fn one_token(ratio: f64, adv: f32) -> MicroTensors {
        let ref_lp = (0.5f64.ln() - ratio.ln()) as f32;
        MicroTensors::new(
            &MicroBatch {
                rows: 1,
                seq_len: 1,
                input_ids: vec![0],
                labels: vec![1],
                ref_logprobs: vec![ref_lp],
                on_policy: vec![false],
                advantages: vec![adv],
                temperatures: vec![1.0],
                seq_lens: Vec::new(),
                seq_parents: Vec::new(),
                seq_offsets: Vec::new(),
            },
            Device::Cpu,
        )
    }

    /// A rollout logprob of -1e30 (finite, valid for the validator) with a negative advantage
    /// made the ratio inf, the loss inf and the gradient NaN; the clamped log-ratio keeps all
    /// three finite, with the KL term on.
    #[test]
    fn extreme_rollout_logprob_gives_a_finite_loss_and_gradient() {
        let logits = Tensor::zeros([1, 1, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut mt = one_token(1.0, -1.0);
        mt.ref_logprobs = Tensor::from_slice(&[-1e30f32]).view([1, 1]);
        let norm = StepNorm {
            sequences: 1.0,
            scored_tokens: 1.0,
        };
        for mode in [ClipMode::Standard, ClipMode::Atropos] {
            let mut c = cfg(mode);
            c.kl_coef = 0.1;
            let (loss, stats) = micro_batch_loss(&logits, &mt, &c, norm);
            assert!(stats.loss.is_finite(), "{mode:?}: loss {}", stats.loss);
            assert!(stats.kl_sum.is_finite(), "{mode:?}: kl {}", stats.kl_sum);
            let grad = Tensor::run_backward(&[loss], &[&logits], false, false);
            let g = grad[0].abs().max().double_value(&[]);
            assert!(g.is_finite(), "{mode:?}: gradient {g}");
        }
    }

    /// The contract's numerical check: eps 0.2, A = -1.
    #[test]
    fn clip_modes_differ_for_negative_advantages() {
        let logits = Tensor::zeros([1, 1, 2], (Kind::Float, Device::Cpu));
        let norm = StepNorm {
            sequences: 1.0,
            scored_tokens: 1.0,
        };
        let loss = |mode, r| micro_batch_loss(&logits, &one_token(r, -1.0), &cfg(mode), norm).1;
        assert!((loss(ClipMode::Atropos, 0.5).loss - 0.5).abs() < 1e-6);
        assert!((loss(ClipMode::Standard, 0.5).loss - 0.8).abs() < 1e-6);
        assert!((loss(ClipMode::Atropos, 1.5).loss - 1.2).abs() < 1e-6);
        assert!((loss(ClipMode::Standard, 1.5).loss - 1.5).abs() < 1e-6);
        assert_eq!(loss(ClipMode::Standard, 0.5).clipped, 1.0);
        assert_eq!(loss(ClipMode::Standard, 1.5).clipped, 0.0);
        assert_eq!(loss(ClipMode::Atropos, 1.5).clipped, 1.0);
    }

    /// The head's hand-computed gradient equals autograd's through `token_chunk_loss`: the same
    /// loss, the same d loss / d logits (fp32, within 1e-6), with ignored positions, mixed
    /// temperatures (greedy 0 counts as 1), off-policy rows, and the unit-temperature shortcut.
    #[test]
    fn hand_computed_head_gradient_matches_autograd() {
        tch::manual_seed(7);
        let (n, v) = (9, 13);
        let dev = Device::Cpu;
        let labels = Tensor::from_slice(&[3i64, 0, IGNORE, 12, 5, 5, IGNORE, 1, 7]);
        let tok = |temps: &[f32]| TokenInputs {
            labels: labels.shallow_clone(),
            // Replaced below by rollout logprobs near the policy's, as in training.
            ref_logprobs: Tensor::zeros([n], (Kind::Float, dev)),
            on_policy: Tensor::from_slice(&[true, false, false, false, true, false, false, false, false]),
            advantages: Tensor::randn([n], (Kind::Float, dev)),
            temperatures: Tensor::from_slice(temps),
            weights: Tensor::rand([n], (Kind::Float, dev)),
        };
        let mixed = tok(&[1.0, 0.7, 0.7, 1.3, 0.0, 1.0, 1.0, 0.5, 2.0]);
        let unit = tok(&[1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        for (t, unit_temperature) in [(&mixed, false), (&unit, true), (&unit, false)] {
            let cfg = LossConfig {
                kl_coef: 0.05,
                ..cfg(ClipMode::Standard)
            };
            let logits = (Tensor::randn([n, v], (Kind::Float, dev)) * 3.0).set_requires_grad(true);
            let policy = flat_logprobs(&logits.detach(), &t.labels, &t.temperatures);
            let t = &TokenInputs {
                ref_logprobs: policy + Tensor::randn([n], (Kind::Float, dev)) * 0.3,
                ..t.select(&Tensor::arange(n, (Kind::Int64, dev)))
            };
            let (want_loss, _) = token_chunk_loss(&logits, t, &cfg);
            want_loss.backward();
            let want = logits.grad().copy();

            let x = logits.detach();
            let head = HeadLogprobs::new(&x, &t.labels, &t.temperatures, unit_temperature);
            let logp = head.logp.shallow_clone().set_requires_grad(true);
            let (loss, _) = logprob_loss(&logp, t, &cfg);
            loss.backward();
            let got = head.logits_grad(&logp.grad(), Kind::Float);
            let d_loss = (f64::try_from(&loss).expect("loss") - f64::try_from(&want_loss).expect("loss")).abs();
            let d_grad = f64::try_from((&got - &want).abs().max()).expect("max");
            assert!(d_loss < 1e-6 && d_grad < 1e-6, "loss diff {d_loss}, grad diff {d_grad}");
            assert!(
                f64::try_from(want.abs().sum(Kind::Float)).expect("sum") > 1e-3,
                "a gradient to compare"
            );
        }
    }

    /// Chunks' sums read together equal the whole's: every sum adds up, the max is the
    /// largest chunk's, and no chunk is dropped or read twice.
    #[test]
    fn chunks_read_together_equal_the_whole() {
        tch::manual_seed(3);
        let (n, v) = (11, 7);
        let dev = Device::Cpu;
        let labels = Tensor::from_slice(&[3i64, 0, IGNORE, 6, 5, 5, IGNORE, 1, 2, 4, 0]);
        let logits = Tensor::randn([n, v], (Kind::Float, dev));
        let policy = flat_logprobs(&logits, &labels, &Tensor::ones([n], (Kind::Float, dev)));
        let tok = TokenInputs {
            labels,
            ref_logprobs: policy + Tensor::randn([n], (Kind::Float, dev)) * 0.5,
            on_policy: Tensor::from_slice(&[
                false, false, true, false, false, false, false, true, false, false, false,
            ]),
            advantages: Tensor::randn([n], (Kind::Float, dev)),
            temperatures: Tensor::ones([n], (Kind::Float, dev)),
            weights: Tensor::rand([n], (Kind::Float, dev)),
        };
        let cfg = LossConfig {
            kl_coef: 0.1,
            ..cfg(ClipMode::Standard)
        };
        let whole = PendingStats::read_all(&[token_chunk_loss(&logits, &tok, &cfg).1]);
        let chunks: Vec<PendingStats> = [(0, 4), (4, 4), (8, 3)]
            .iter()
            .map(|&(start, len)| token_chunk_loss(&logits.narrow(0, start, len), &tok.narrow(start, len), &cfg).1)
            .collect();
        let parts = PendingStats::read_all(&chunks);
        assert_eq!(whole.tokens, 9.0);
        assert_eq!(parts.tokens, whole.tokens);
        assert_eq!(parts.diff_tokens, 8.0);
        assert!(
            whole.diff_max > 0.0 && parts.diff_max == whole.diff_max,
            "{parts:?} vs {whole:?}"
        );
        for (a, b) in [
            (parts.loss, whole.loss),
            (parts.ratio_sum, whole.ratio_sum),
            (parts.diff_abs_sum, whole.diff_abs_sum),
            (parts.kl_sum, whole.kl_sum),
            (
                parts.pos_logp_sum + parts.neg_logp_sum,
                whole.pos_logp_sum + whole.neg_logp_sum,
            ),
        ] {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        assert_eq!(PendingStats::read_all(&[]), LossStats::default());
    }

    /// The host's rule agrees with the device's: a temperature counts as 1 when it is 1 or <= 0.
    #[test]
    fn unit_temperatures_follow_the_sampling_rule() {
        for temps in [vec![1.0f32, 0.0, -1.0, 1.0], vec![1.0, 0.7], vec![f32::NAN], vec![]] {
            let device = sampling_temperatures(&Tensor::from_slice(&temps));
            let all_one = device.eq(1.0).all().int64_value(&[]) == 1;
            assert_eq!(unit_temperatures(&temps), all_one, "{temps:?}");
        }
    }

    /// The gradient written straight in bf16 is the fp32 gradient rounded once: within bf16's
    /// rounding error (2^-8 relative) everywhere.
    #[test]
    fn head_gradient_in_bf16_is_the_fp32_one_rounded() {
        tch::manual_seed(11);
        let (n, v) = (6, 50);
        let dev = Device::Cpu;
        let labels = Tensor::from_slice(&[3i64, IGNORE, 49, 0, 7, 7]);
        let temps = Tensor::from_slice(&[1.0f32, 1.0, 0.6, 1.0, 2.0, 0.0]);
        let logits = (Tensor::randn([n, v], (Kind::Float, dev)) * 4.0).to_kind(Kind::BFloat16);
        let grad = Tensor::randn([n], (Kind::Float, dev));
        let head = || HeadLogprobs::new(&logits, &labels, &temps, false);
        let exact = head().logits_grad(&grad, Kind::Float);
        let rounded = head().logits_grad(&grad, Kind::BFloat16);
        assert_eq!(rounded.kind(), Kind::BFloat16);
        let err = (rounded.to_kind(Kind::Float) - &exact).abs();
        let bound = exact.abs() * 2f64.powi(-8) + 1e-30;
        assert!(err.le_tensor(&bound).all().int64_value(&[]) == 1, "{err} vs {bound}");
        assert_eq!(
            exact.get(1).abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "an ignored row"
        );
        // Each row's gradient sums to 0 (softmax minus a one-hot, scaled).
        let sums = exact.sum_dim_intlist([-1].as_slice(), false, Kind::Float).abs().max();
        assert!(sums.double_value(&[]) < 1e-6);
    }
}
