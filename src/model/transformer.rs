//! The forward pass: embeddings, pre-norm decoder layers (GQA attention through libtorch's
//! fused scaled-dot-product attention, SwiGLU MLP), final norm and LM head.
//!
//! The parameters stay in their own dtype (fp32 masters when training); with a bf16 compute
//! kind every weight is cast on use, so matmuls and attention run in bf16 while gradients
//! flow back through the cast into the fp32 masters.

use tch::{Kind, Tensor};

pub use super::attention::{Attend, PackedAttention};
use super::config::ModelSpec;
use super::lora::{LoraSpec, LoraTarget};
use super::params::ParamStore;
use super::{rope, ModelError};

/// A LoRA update on a linear module: `scaling * B @ A`, applied as `B(A(dropout(x)))`.
struct LoraDelta {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f64,
}

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraDelta>,
}

impl Linear {
    /// `x W^T + b`, plus the LoRA update if there is one (its dropout only when `train`).
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        let bias = self.bias.as_ref().map(|b| b.to_kind(kind));
        let y = x.linear(&self.weight.to_kind(kind), bias.as_ref());
        match &self.lora {
            None => y,
            Some(d) => {
                let h = if train && d.dropout > 0.0 {
                    x.dropout(d.dropout, true)
                } else {
                    x.shallow_clone()
                };
                let low = h
                    .linear(&d.a.to_kind(kind), None::<Tensor>)
                    .linear(&d.b.to_kind(kind), None::<Tensor>);
                y + low * d.scaling
            }
        }
    }
}

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Keys and values of every layer, `[B, kv_heads, T, head_dim]`, grown by each cached forward.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Appends a chunk to layer `i` and returns the full keys and values.
    fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        if self.layers.len() <= i {
            self.layers.resize_with(i + 1, || None);
        }
        let merged = match self.layers[i].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
            None => (k, v),
        };
        self.layers[i] = Some((merged.0.shallow_clone(), merged.1.shallow_clone()));
        merged
    }

    /// Cached positions.
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.size()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A decoder-only transformer bound to the tensors of a [`ParamStore`]. Rebuild it after the
/// store's tensors are replaced (for example by [`ParamStore::set_trainable`]).
pub struct Transformer {
    spec: ModelSpec,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    compute: Kind,
    /// LoRA dropout is active (training).
    train: bool,
}

/// HF's RMSNorm (normalise in fp32, scale by the weight), as libtorch's `rms_norm`: one fused
/// kernel on CUDA that computes in fp32 internally whatever the input dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let h = x.size().last().copied().unwrap_or(0);
    x.rms_norm([h].as_slice(), Some(weight.to_kind(x.kind())), eps)
}

impl Transformer {
    /// Binds the model to `params`, checking that every weight the config implies is there.
    pub fn new(spec: &ModelSpec, params: &ParamStore) -> Result<Self, ModelError> {
        let get = |name: &str| {
            params.get(name).ok_or_else(|| ModelError::MissingWeight {
                name: name.to_string(),
                shape: Vec::new(),
            })
        };
        let linear = |name: &str, bias: bool| -> Result<Linear, ModelError> {
            Ok(Linear {
                weight: get(&format!("{name}.weight"))?,
                bias: if bias {
                    Some(get(&format!("{name}.bias"))?)
                } else {
                    None
                },
                lora: None,
            })
        };
        let mut layers = Vec::with_capacity(spec.num_layers as usize);
        for i in 0..spec.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                q: linear(&format!("{p}.self_attn.q_proj"), spec.qkv_bias)?,
                k: linear(&format!("{p}.self_attn.k_proj"), spec.qkv_bias)?,
                v: linear(&format!("{p}.self_attn.v_proj"), spec.qkv_bias)?,
                o: linear(&format!("{p}.self_attn.o_proj"), spec.o_bias)?,
                q_norm: if spec.qk_norm {
                    Some(get(&format!("{p}.self_attn.q_norm.weight"))?)
                } else {
                    None
                },
                k_norm: if spec.qk_norm {
                    Some(get(&format!("{p}.self_attn.k_norm.weight"))?)
                } else {
                    None
                },
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(&format!("{p}.mlp.gate_proj"), false)?,
                up: linear(&format!("{p}.mlp.up_proj"), false)?,
                down: linear(&format!("{p}.mlp.down_proj"), false)?,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if spec.tie_word_embeddings {
            embed.shallow_clone()
        } else {
            get("lm_head.weight")?
        };
        Ok(Self {
            spec: spec.clone(),
            compute: embed.kind(),
            embed,
            layers,
            norm: get("model.norm.weight")?,
            lm_head,
            train: false,
        })
    }

    /// Adds the LoRA adapter `tensors` (PEFT keys, shallow handles: gradients reach them) to
    /// the modules `lora` adapts.
    pub fn with_lora(mut self, lora: &LoraSpec, tensors: &[(String, Tensor)]) -> Result<Self, ModelError> {
        let find = |key: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == key)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| ModelError::MissingWeight {
                    name: key.to_string(),
                    shape: Vec::new(),
                })
        };
        for m in lora.modules(&self.spec) {
            let layer_index = crate::model::params::layer_of(&m.path).unwrap_or(-1);
            let Some(layer) = usize::try_from(layer_index).ok().and_then(|i| self.layers.get_mut(i)) else {
                continue;
            };
            let linear = match m.target {
                LoraTarget::Q => &mut layer.q,
                LoraTarget::K => &mut layer.k,
                LoraTarget::V => &mut layer.v,
                LoraTarget::O => &mut layer.o,
                LoraTarget::Gate => &mut layer.gate,
                LoraTarget::Up => &mut layer.up,
                LoraTarget::Down => &mut layer.down,
            };
            linear.lora = Some(LoraDelta {
                a: find(&m.a_key())?,
                b: find(&m.b_key())?,
                scaling: lora.scaling(),
                dropout: lora.dropout,
            });
        }
        Ok(self)
    }

    /// Turns LoRA dropout on (training) or off (evaluation, serving).
    pub fn with_training(mut self, train: bool) -> Self {
        self.train = train;
        self
    }

    /// A second binding of the same tensors with dropout off (evaluation, canaries).
    pub fn eval_copy(&self) -> Self {
        let linear = |l: &Linear| Linear {
            weight: l.weight.shallow_clone(),
            bias: l.bias.as_ref().map(Tensor::shallow_clone),
            lora: l.lora.as_ref().map(|d| LoraDelta {
                a: d.a.shallow_clone(),
                b: d.b.shallow_clone(),
                scaling: d.scaling,
                dropout: d.dropout,
            }),
        };
        let layers = self
            .layers
            .iter()
            .map(|l| Layer {
                input_norm: l.input_norm.shallow_clone(),
                q: linear(&l.q),
                k: linear(&l.k),
                v: linear(&l.v),
                o: linear(&l.o),
                q_norm: l.q_norm.as_ref().map(Tensor::shallow_clone),
                k_norm: l.k_norm.as_ref().map(Tensor::shallow_clone),
                post_norm: l.post_norm.shallow_clone(),
                gate: linear(&l.gate),
                up: linear(&l.up),
                down: linear(&l.down),
            })
            .collect();
        Self {
            spec: self.spec.clone(),
            embed: self.embed.shallow_clone(),
            layers,
            norm: self.norm.shallow_clone(),
            lm_head: self.lm_head.shallow_clone(),
            compute: self.compute,
            train: false,
        }
    }

    /// Whether any module carries a LoRA update with dropout (training then draws masks).
    pub fn has_lora_dropout(&self) -> bool {
        self.train
            && self.layers.iter().any(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .any(|m| m.lora.as_ref().is_some_and(|d| d.dropout > 0.0))
            })
    }

    /// Runs matmuls and attention in `kind` (for example bf16 over fp32 parameters).
    pub fn with_compute(mut self, kind: Kind) -> Self {
        self.compute = kind;
        self
    }

    /// The dtype activations are computed in.
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// RoPE tables for positions `0..t`, in the compute dtype.
    pub fn rope_tables(&self, t: i64, device: tch::Device) -> (Tensor, Tensor) {
        let (cos, sin) = rope::cos_sin(&self.spec.rope, self.spec.head_dim, t, device);
        (cos.to_kind(self.compute), sin.to_kind(self.compute))
    }

    /// Token embeddings `[B, T, hidden]` in the compute dtype.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed, ids, -1, false, false).to_kind(self.compute)
    }

    /// One decoder layer over `x` `[B, T, hidden]` (causal, full sequence).
    pub fn layer(&self, i: usize, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        self.layer_step(i, x, cos, sin, Attend::Causal, None)
    }

    /// One decoder layer over sequences packed end to end in `x` `[1, T, hidden]`; `cos`/`sin`
    /// are `[1, 1, T, head_dim]`, picked at each token's position within its own sequence.
    pub fn packed_layer(&self, i: usize, x: &Tensor, cos: &Tensor, sin: &Tensor, attn: &PackedAttention) -> Tensor {
        self.layer_step(i, x, cos, sin, Attend::Packed(attn), None)
    }

    /// The final norm of hidden states.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        rms_norm(x, &self.norm, self.spec.rms_norm_eps)
    }

    /// The model's shape.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Final hidden states `[B, T, hidden]` for token ids `[B, T]` (causal, no padding mask:
    /// right padding never influences earlier positions).
    pub fn hidden_states(&self, ids: &Tensor) -> Tensor {
        let (cos, sin) = self.rope_tables(ids.size()[1], ids.device());
        self.run(ids, &cos, &sin, Attend::Causal, None)
    }

    /// Incremental forward for generation: `ids` `[B, T]` at `positions` `[B, T]`, attending to
    /// the cached keys/values plus themselves where `mask` `[B, 1, T, T_cache + T]` is true.
    /// Appends this chunk's keys/values to `cache`.
    pub fn forward_cached(&self, ids: &Tensor, positions: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Tensor {
        let span = positions.max().int64_value(&[]) + 1;
        let (cos, sin) = rope::cos_sin(&self.spec.rope, self.spec.head_dim, span, ids.device());
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let pick = |table: &Tensor| {
            table
                .index_select(0, &positions.reshape([-1]))
                .view([b, 1, t, self.spec.head_dim])
        };
        let (cos, sin) = (cos.to_kind(self.compute), sin.to_kind(self.compute));
        let hidden = self.run(ids, &pick(&cos), &pick(&sin), Attend::Mask(mask), Some(cache));
        self.logits_of_hidden(&hidden)
    }

    fn run(
        &self,
        ids: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: Attend<'_>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut x = self.embed(ids);
        for i in 0..self.layers.len() {
            x = self.layer_step(i, &x, cos, sin, attend, cache.as_deref_mut());
        }
        self.final_norm(&x)
    }

    fn layer_step(
        &self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: Attend<'_>,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let spec = &self.spec;
        let layer = &self.layers[i];
        let (b, t) = (x.size()[0], x.size()[1]);
        let groups = spec.num_heads / spec.num_kv_heads;
        let h = rms_norm(x, &layer.input_norm, spec.rms_norm_eps);
        let heads = |y: Tensor, n: i64| y.view([b, t, n, spec.head_dim]);
        let train = self.train;
        let mut q = heads(layer.q.forward(&h, train), spec.num_heads);
        let mut k = heads(layer.k.forward(&h, train), spec.num_kv_heads);
        let mut v = heads(layer.v.forward(&h, train), spec.num_kv_heads).transpose(1, 2);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = rms_norm(&q, qn, spec.rms_norm_eps);
            k = rms_norm(&k, kn, spec.rms_norm_eps);
        }
        let q = rope::apply(&q.transpose(1, 2), cos, sin);
        let mut k = rope::apply(&k.transpose(1, 2), cos, sin);
        if let Some(cache) = cache {
            (k, v) = cache.append(i, k, v);
        }
        if let Attend::Packed(p) = attend {
            if let Some(attn) = p.flash(&q, &k, &v) {
                let attn = attn.reshape([b, t, spec.num_heads * spec.head_dim]);
                return self.finish_layer(layer, x, &attn);
            }
        }
        let (k, v) = if groups > 1 {
            (
                k.repeat_interleave_self_int(groups, 1, None),
                v.repeat_interleave_self_int(groups, 1, None),
            )
        } else {
            (k, v)
        };
        let attn = match attend {
            Attend::Mask(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, false),
            Attend::Packed(p) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(p.mask()), 0.0, false, None, false)
            }
            Attend::Causal => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false),
        };
        let attn = attn.transpose(1, 2).reshape([b, t, spec.num_heads * spec.head_dim]);
        self.finish_layer(layer, x, &attn)
    }

    /// The rest of a layer after attention: output projection, residual, MLP, residual.
    fn finish_layer(&self, layer: &Layer, x: &Tensor, attn: &Tensor) -> Tensor {
        let spec = &self.spec;
        let train = self.train;
        let x = x + layer.o.forward(attn, train);
        let h = rms_norm(&x, &layer.post_norm, spec.rms_norm_eps);
        let mlp = layer.down.forward(
            &(layer.gate.forward(&h, train).silu() * layer.up.forward(&h, train)),
            train,
        );
        x + mlp
    }

    /// Logits `[..., vocab]` in the compute dtype.
    pub fn logits_of_hidden(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(&self.lm_head.to_kind(hidden.kind()), None::<Tensor>)
    }

    /// Logits `[B, T, vocab]` for token ids `[B, T]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.logits_of_hidden(&self.hidden_states(ids))
    }
}
