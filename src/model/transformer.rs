//! The forward pass: embeddings, pre-norm decoder layers (GQA attention through libtorch's
//! fused scaled-dot-product attention, SwiGLU MLP), final norm and LM head.

use tch::{Kind, Tensor};

use super::config::ModelSpec;
use super::params::ParamStore;
use super::{rope, ModelError};

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
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

/// A decoder-only transformer bound to the tensors of a [`ParamStore`]. Rebuild it after the
/// store's tensors are replaced (for example by [`ParamStore::set_trainable`]).
pub struct Transformer {
    spec: ModelSpec,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
}

/// HF's RMSNorm: normalise in fp32, then scale by the weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let variance = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = (xf * (variance + eps).rsqrt()).to_kind(x.kind());
    weight * normed
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
            embed,
            layers,
            norm: get("model.norm.weight")?,
            lm_head,
        })
    }

    /// The model's shape.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Final hidden states `[B, T, hidden]` for token ids `[B, T]` (causal, no padding mask:
    /// right padding never influences earlier positions).
    pub fn hidden_states(&self, ids: &Tensor) -> Tensor {
        let spec = &self.spec;
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let (cos, sin) = rope::cos_sin(&spec.rope, spec.head_dim, t, ids.device());
        let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);
        let groups = spec.num_heads / spec.num_kv_heads;
        for layer in &self.layers {
            let h = rms_norm(&x, &layer.input_norm, spec.rms_norm_eps);
            let heads = |y: Tensor, n: i64| y.view([b, t, n, spec.head_dim]);
            let mut q = heads(layer.q.forward(&h), spec.num_heads);
            let mut k = heads(layer.k.forward(&h), spec.num_kv_heads);
            let v = heads(layer.v.forward(&h), spec.num_kv_heads).transpose(1, 2);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(&q, qn, spec.rms_norm_eps);
                k = rms_norm(&k, kn, spec.rms_norm_eps);
            }
            let q = rope::apply(&q.transpose(1, 2), &cos, &sin);
            let k = rope::apply(&k.transpose(1, 2), &cos, &sin);
            let (k, v) = if groups > 1 {
                (
                    k.repeat_interleave_self_int(groups, 1, None),
                    v.repeat_interleave_self_int(groups, 1, None),
                )
            } else {
                (k, v)
            };
            let attn = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false);
            let attn = attn.transpose(1, 2).reshape([b, t, spec.num_heads * spec.head_dim]);
            x = &x + layer.o.forward(&attn);
            let h = rms_norm(&x, &layer.post_norm, spec.rms_norm_eps);
            let mlp = layer
                .down
                .forward(&(layer.gate.forward(&h).silu() * layer.up.forward(&h)));
            x = &x + mlp;
        }
        rms_norm(&x, &self.norm, spec.rms_norm_eps)
    }

    /// Logits `[B, T, vocab]` in the parameters' dtype.
    pub fn logits_of_hidden(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(&self.lm_head, None::<Tensor>)
    }

    /// Logits `[B, T, vocab]` for token ids `[B, T]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.logits_of_hidden(&self.hidden_states(ids))
    }
}
