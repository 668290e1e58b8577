//! Named parameters in HF naming (`model.layers.0.self_attn.q_proj.weight`, ...), owned as
//! fp32 master tensors.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::config::ModelSpec;

/// Every parameter of a model by HF name, with the shapes the config implies.
pub struct ParamStore {
    tensors: BTreeMap<String, Tensor>,
}

/// The HF names and shapes of a model's parameters, in a stable order.
pub fn expected_shapes(spec: &ModelSpec) -> Vec<(String, Vec<i64>)> {
    let (h, d, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let (q_out, kv_out) = (spec.num_heads * d, spec.num_kv_heads * d);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![spec.vocab_size, h])];
    for layer in 0..spec.num_layers {
        let p = format!("model.layers.{layer}");
        let mut push = |name: &str, shape: Vec<i64>| out.push((format!("{p}.{name}"), shape));
        push("input_layernorm.weight", vec![h]);
        push("self_attn.q_proj.weight", vec![q_out, h]);
        push("self_attn.k_proj.weight", vec![kv_out, h]);
        push("self_attn.v_proj.weight", vec![kv_out, h]);
        if spec.qkv_bias {
            push("self_attn.q_proj.bias", vec![q_out]);
            push("self_attn.k_proj.bias", vec![kv_out]);
            push("self_attn.v_proj.bias", vec![kv_out]);
        }
        push("self_attn.o_proj.weight", vec![h, q_out]);
        if spec.o_bias {
            push("self_attn.o_proj.bias", vec![h]);
        }
        if spec.qk_norm {
            push("self_attn.q_norm.weight", vec![d]);
            push("self_attn.k_norm.weight", vec![d]);
        }
        push("post_attention_layernorm.weight", vec![h]);
        push("mlp.gate_proj.weight", vec![i, h]);
        push("mlp.up_proj.weight", vec![i, h]);
        push("mlp.down_proj.weight", vec![h, i]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![spec.vocab_size, h]));
    }
    out
}

/// The decoder layer index of a parameter name, if it belongs to one.
pub fn layer_of(name: &str) -> Option<i64> {
    let rest = name.split(".layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

impl ParamStore {
    /// Wraps already-shaped tensors; used by the loader and by tests.
    pub fn from_tensors(tensors: BTreeMap<String, Tensor>) -> Self {
        Self { tensors }
    }

    /// A random init (normal, std 0.02; norms at 1) of the given model, seeded.
    pub fn random(spec: &ModelSpec, seed: i64, device: Device) -> Self {
        tch::manual_seed(seed);
        let tensors = expected_shapes(spec)
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with("norm.weight") {
                    Tensor::ones(shape.as_slice(), (Kind::Float, device))
                } else if name.ends_with(".bias") {
                    Tensor::zeros(shape.as_slice(), (Kind::Float, device))
                } else {
                    Tensor::randn(shape.as_slice(), (Kind::Float, device)) * 0.02
                };
                (name, t)
            })
            .collect();
        Self { tensors }
    }

    /// A shallow handle on a parameter (shares storage and autograd identity).
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).map(Tensor::shallow_clone)
    }

    /// Parameters by name, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// Number of scalar parameters.
    pub fn numel(&self) -> i64 {
        self.tensors.values().map(|t| t.numel() as i64).sum()
    }

    /// Deep copies on the CPU, detached (for checkpoints and weight publication).
    pub fn snapshot(&self) -> Vec<(String, Tensor)> {
        tch::no_grad(|| {
            self.tensors
                .iter()
                .map(|(name, t)| (name.clone(), t.detach().to_device(Device::Cpu).copy()))
                .collect()
        })
    }

    /// Marks the parameters selected by `trainable` as requiring gradients, the rest frozen.
    /// Returns the trainable names.
    pub fn set_trainable(&mut self, trainable: impl Fn(&str) -> bool) -> Vec<String> {
        let mut names = Vec::new();
        for (name, tensor) in self.tensors.iter_mut() {
            let on = trainable(name);
            *tensor = tensor.detach().set_requires_grad(on);
            if on {
                names.push(name.clone());
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_of_names() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_of("lm_head.weight"), None);
    }
}
