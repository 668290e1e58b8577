//! Forward and backward of one micro-batch, in three stages so that neither the layers'
//! activations nor the full-vocabulary logits have to live at once:
//!
//! 1. the decoder layers, either with a full autograd graph or (activation checkpointing) the
//!    first [`StepPlan::recompute_layers`] of them under `no_grad`, keeping only their inputs,
//!    and the rest each with a graph of its own;
//! 2. the head (final norm, LM head, fp32 logprobs and the loss) on chunks of at most
//!    `chunk_tokens` positions, each chunk backpropagated on its own into the final hidden
//!    states;
//! 3. the layers' backward: the graph of stage 1, or each layer recomputed from its saved input
//!    and backpropagated with the gradient of its output, last layer first.
//!
//! The result equals one backward of the whole micro-batch's loss, up to summation order.

use tch::Tensor;

use crate::grpo::loss::{
    logprob_loss, token_chunk_loss, HeadLogprobs, LossStats, MicroTensors, PendingStats, StepNorm, TokenInputs,
};
use crate::grpo::LossConfig;
use crate::model::attention::{PackedAttention, Segments};
use crate::model::Transformer;
use crate::torch_ext::ShimError;

/// How a micro-batch is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// How many decoder layers, from the first, are recomputed during the backward instead of
    /// storing their activations (activation checkpointing); the others keep theirs. 0: none.
    pub recompute_layers: usize,
    /// Positions per chunk of the head (each chunk holds `chunk_tokens x vocab` fp32 logits).
    pub chunk_tokens: i64,
    /// Synchronize the device after each stage and log the stage times (`GRPO_PROFILE_STEP=1`);
    /// slows the step down.
    pub profile: bool,
    /// The head's logprob gradient by hand ([`HeadLogprobs`]) rather than through autograd's
    /// fp32 chain (`GRPO_HEAD=autograd` turns it off, for comparison).
    pub manual_head: bool,
    /// Seed of the LoRA dropout masks: layer `i` draws from `seed + i`, in the forward and again
    /// in its recomputation, so both see the same masks (and a resumed run the same as an
    /// uninterrupted one). `None`: no dropout to draw.
    pub dropout_seed: Option<i64>,
}

impl StepPlan {
    fn seed_layer(&self, i: usize) {
        if let Some(seed) = self.dropout_seed {
            tch::manual_seed(seed.wrapping_add(i as i64));
        }
    }
}

/// What stage 1 keeps of a decoder layer for its backward.
enum Saved {
    /// The layer's input only: the layer is recomputed in the backward.
    Input(Tensor),
    /// The layer's input (a leaf) and its output, with the graph between them.
    Graph(Tensor, Tensor),
}

/// Stage timer for [`StepPlan::profile`].
struct StageClock {
    on: bool,
    device: tch::Device,
    last: std::time::Instant,
}

impl StageClock {
    fn lap(&mut self) -> f64 {
        if !self.on {
            return 0.0;
        }
        if let tch::Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        let now = std::time::Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        dt
    }
}

/// Backpropagates `grad` (the gradient of some loss with respect to `y`) through `y`'s graph.
fn backward_with(y: &Tensor, grad: &Tensor) -> Result<(), ShimError> {
    crate::torch_ext::backward(y, &grad.to_kind(y.kind()))
}

/// Backpropagates the first layer's input gradient into the embedding (a frozen one, with LoRA,
/// takes none).
fn backward_embedding(model: &Transformer, ids: &Tensor, grad: &Tensor) -> Result<(), ShimError> {
    let embedded = model.embed(ids);
    if embedded.requires_grad() {
        backward_with(&embedded, grad)?;
    }
    Ok(())
}

/// Runs forward and backward of one micro-batch; gradients accumulate into the parameters.
pub fn forward_backward(
    model: &Transformer,
    mt: &MicroTensors,
    loss: &LossConfig,
    norm: StepNorm,
    plan: StepPlan,
) -> Result<LossStats, ShimError> {
    forward_backward_reporting(model, mt, loss, norm, plan, None)
}

/// [`forward_backward`], calling `layer_done(i)` as soon as the backward through decoder layer
/// `i` is finished (last layer first), so that a data-parallel step can start reducing that
/// layer's gradients while the backward goes on. With a reporter, or with some layers
/// recomputed, the layers' backward runs one layer at a time.
pub fn forward_backward_reporting(
    model: &Transformer,
    mt: &MicroTensors,
    loss: &LossConfig,
    norm: StepNorm,
    plan: StepPlan,
    layer_done: Option<&mut dyn FnMut(usize)>,
) -> Result<LossStats, ShimError> {
    let ids = &mt.input_ids;
    let (b, t) = (ids.size()[0], ids.size()[1]);
    let mut clock = StageClock {
        on: plan.profile,
        device: ids.device(),
        last: std::time::Instant::now(),
    };
    let _ = clock.lap();
    let layers = Layers::new(model, mt, plan);
    // One graph for the whole micro-batch, or one per layer (recomputed or kept).
    let whole_graph = plan.recompute_layers == 0 && layer_done.is_none();
    let (last, saved) = layers.forward(ids, whole_graph);
    let layers_s = clock.lap();
    let (grad, pending) = head(model, mt, &last, loss, norm, plan)?;
    let head_s = clock.lap();
    if whole_graph {
        backward_with(&last, &grad)?;
    } else {
        // Its graph, if any, lives on in `saved`.
        drop(last);
        layers.backward(ids, saved, grad, layer_done)?;
    }
    // The chunks' sums reach the host together once the whole micro-batch is queued, so the
    // head's chunks and the backward never wait on a host read.
    let stats = PendingStats::read_all(&pending);
    if plan.profile {
        let backward_s = clock.lap();
        tracing::info!(
            rows = b,
            positions = t,
            layers_s,
            head_s,
            backward_s,
            "micro-batch stages"
        );
    }
    Ok(stats)
}

/// The decoder layers of one micro-batch: its RoPE tables and, packed, its attention segments.
struct Layers<'a> {
    model: &'a Transformer,
    plan: StepPlan,
    cos: Tensor,
    sin: Tensor,
    packed: Option<PackedAttention>,
}

impl<'a> Layers<'a> {
    fn new(model: &'a Transformer, mt: &MicroTensors, plan: StepPlan) -> Self {
        let (ids, t) = (&mt.input_ids, mt.input_ids.size()[1]);
        let Some(p) = mt.packed.as_ref() else {
            let (cos, sin) = model.rope_tables(t, ids.device());
            return Self {
                model,
                plan,
                cos,
                sin,
                packed: None,
            };
        };
        // Packed rows: RoPE restarts at every sequence, attention stays within each.
        let seg = Segments {
            segments: &p.segments,
            parents: &p.parents,
            cu_q: &p.cu_seqlens,
            cu_k: &p.cu_seqlens_k,
            key_index: p.key_index.as_ref(),
            max_q: p.max_len,
            max_k: p.max_len_k,
        };
        let (cos, sin) = model.rope_tables(p.span, ids.device());
        let pick = |table: &Tensor| table.index_select(0, &p.positions).view([1, 1, t, -1]);
        Self {
            model,
            plan,
            cos: pick(&cos),
            sin: pick(&sin),
            packed: Some(PackedAttention::new(&seg, model.compute_kind())),
        }
    }

    fn run(&self, i: usize, x: &Tensor) -> Tensor {
        self.plan.seed_layer(i);
        match &self.packed {
            Some(attn) => self.model.packed_layer(i, x, &self.cos, &self.sin, attn),
            None => self.model.layer(i, x, &self.cos, &self.sin),
        }
    }

    /// Stage 1: the last layer's output, and what each layer keeps for its backward (nothing
    /// with `whole_graph`: one autograd graph from the embedding on).
    fn forward(&self, ids: &Tensor, whole_graph: bool) -> (Tensor, Vec<Saved>) {
        let mut saved = Vec::new();
        if whole_graph {
            let mut x = self.model.embed(ids);
            for i in 0..self.model.num_layers() {
                x = self.run(i, &x);
            }
            return (x, saved);
        }
        // A recomputed layer keeps only its input; a kept one makes its input a leaf of its own
        // graph, and its output keeps that graph. The embedding is recomputed for its own
        // backward at the end.
        let mut x = tch::no_grad(|| self.model.embed(ids));
        for i in 0..self.model.num_layers() {
            if i < self.plan.recompute_layers {
                let next = tch::no_grad(|| self.run(i, &x));
                saved.push(Saved::Input(x));
                x = next;
            } else {
                let input = x.detach().set_requires_grad(true);
                let next = self.run(i, &input);
                saved.push(Saved::Graph(input, next.shallow_clone()));
                x = next;
            }
        }
        (x, saved)
    }

    /// Stage 3: the layers' backward from the last one's output gradient, last layer first,
    /// then the embedding's.
    fn backward(
        &self,
        ids: &Tensor,
        saved: Vec<Saved>,
        mut grad: Tensor,
        mut layer_done: Option<&mut dyn FnMut(usize)>,
    ) -> Result<(), ShimError> {
        for (i, layer_saved) in saved.into_iter().enumerate().rev() {
            let input = match layer_saved {
                Saved::Input(x) => {
                    let x = x.set_requires_grad(true);
                    backward_with(&self.run(i, &x), &grad)?;
                    x
                }
                Saved::Graph(input, y) => {
                    backward_with(&y, &grad)?;
                    input
                }
            };
            grad = input.grad();
            if let Some(done) = layer_done.as_mut() {
                done(i);
            }
        }
        backward_embedding(self.model, ids, &grad)
    }
}

/// Stage 2: the head, chunk by chunk, from the last layer's output `[B, T, H]`; returns the
/// gradient of the loss with respect to that output and the chunks' sums (still on the device).
/// Only scored positions reach the head: the others (prompt, padding) weigh nothing in the loss,
/// so their logits are never computed and their gradient is zero.
fn head(
    model: &Transformer,
    mt: &MicroTensors,
    last: &Tensor,
    loss: &LossConfig,
    norm: StepNorm,
    plan: StepPlan,
) -> Result<(Tensor, Vec<PendingStats>), ShimError> {
    let keep = &mt.scored;
    let tokens = TokenInputs::of_micro_batch(mt, loss, norm).select(keep);
    let size = last.size();
    let flat = last.detach().reshape([size[0] * size[1], -1]);
    let scored = flat.index_select(0, keep).set_requires_grad(true);
    let n = keep.size()[0];
    let chunk = plan.chunk_tokens.max(1);
    let mut pending = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = model.logits_of_hidden(&model.final_norm(&scored.narrow(0, start, len)));
        let chunk_tokens = tokens.narrow(start, len);
        pending.push(if plan.manual_head {
            // All temperatures 1 (or unset), known from the host's batch, skip the scaling.
            head_chunk(&logits, &chunk_tokens, loss, mt.unit_temperature)?
        } else {
            let (chunk_loss, s) = token_chunk_loss(&logits, &chunk_tokens, loss);
            chunk_loss.backward();
            s
        });
        start += len;
    }
    let grad_scored = if n > 0 { scored.grad() } else { scored.zeros_like() };
    let grad = flat
        .zeros_like()
        .index_copy(0, keep, &grad_scored)
        .view(size.as_slice());
    Ok((grad, pending))
}

/// One chunk of the head with the logprob gradient by hand: the loss's backward runs on the
/// chunk's `[N]` logprobs only, and the logits get their gradient from [`HeadLogprobs`]; the
/// LM head and final norm backward stay autograd's.
fn head_chunk(
    logits: &Tensor,
    tokens: &TokenInputs,
    loss: &LossConfig,
    unit_temperature: bool,
) -> Result<PendingStats, ShimError> {
    let head = HeadLogprobs::new(logits, &tokens.labels, &tokens.temperatures, unit_temperature);
    let logp = head.logp.shallow_clone().set_requires_grad(true);
    let (chunk_loss, stats) = logprob_loss(&logp, tokens, loss);
    chunk_loss.backward();
    let grad = head.logits_grad(&logp.grad(), logits.kind());
    backward_with(logits, &grad)?;
    Ok(stats)
}
