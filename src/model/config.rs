//! The HF `config.json` of a decoder-only model, and the validated [`ModelSpec`] built from it.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// The model families the transformer implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM` (also SmolLM2, Mistral-like configs without sliding window).
    Llama,
    /// `Qwen2ForCausalLM`: biases on q/k/v.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on q and k per head.
    Qwen3,
}

/// How rotary frequencies are scaled (`rope_scaling` / `rope_parameters` in HF configs).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: frequencies divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows once a sequence exceeds `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN: ramp between interpolation and extrapolation plus an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

/// Rotary embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: RopeScaling,
    pub max_position_embeddings: i64,
}

/// Everything the transformer needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub family: Family,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope: RopeSpec,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// RMSNorm on q and k per head (Qwen3).
    pub qk_norm: bool,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
}

impl ModelSpec {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text).map_err(|source| ModelError::Config { path, source })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        let raw: RawConfig = serde_json::from_str(text)?;
        let family = family_of(&raw)?;
        if let Some(act) = raw.hidden_act.as_ref().filter(|a| *a != "silu") {
            return Err(SpecError::Activation(act.clone()));
        }
        if raw.mlp_bias == Some(true) {
            return Err(SpecError::Unsupported("mlp_bias=true"));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(SpecError::Unsupported("use_sliding_window=true"));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads <= 0 || num_kv_heads <= 0 || raw.num_attention_heads % num_kv_heads != 0 {
            return Err(SpecError::Heads {
                heads: raw.num_attention_heads,
                kv_heads: num_kv_heads,
            });
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(SpecError::HeadDim(head_dim));
        }
        let default_theta = match family {
            Family::Llama => 10_000.0,
            Family::Qwen2 | Family::Qwen3 => 1_000_000.0,
        };
        // transformers 5 moves rope_theta and the scaling dict into `rope_parameters`.
        let rope_dict = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let theta = rope_dict
            .and_then(|d| d.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(raw.rope_theta)
            .unwrap_or(default_theta);
        let max_pos = raw.max_position_embeddings.unwrap_or(2048);
        let scaling = rope_scaling_of(rope_dict, max_pos)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, qk_norm) = match family {
            Family::Llama => (attention_bias, attention_bias, false),
            Family::Qwen2 => (true, false, false),
            Family::Qwen3 => (attention_bias, attention_bias, true),
        };
        Ok(Self {
            family,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope: RopeSpec {
                theta,
                scaling,
                max_position_embeddings: max_pos,
            },
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm,
        })
    }
}

/// A `config.json` this crate cannot build a model from.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("unsupported model (model_type {model_type:?}, architecture {arch:?}); supported: llama, qwen2, qwen3")]
    Family {
        model_type: Option<String>,
        arch: Option<String>,
    },
    #[error("hidden_act {0:?} is not supported (only silu)")]
    Activation(String),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}")]
    Heads { heads: i64, kv_heads: i64 },
    #[error("head_dim {0} must be positive and even")]
    HeadDim(i64),
    #[error("rope scaling {0:?} needs a factor")]
    RopeFactor(String),
    #[error("rope scaling type {0:?} is not supported")]
    RopeType(String),
}

fn family_of(raw: &RawConfig) -> Result<Family, SpecError> {
    let arch = raw.architectures.as_ref().and_then(|a| a.first()).map(String::as_str);
    match (raw.model_type.as_deref(), arch) {
        (Some("llama"), _) | (_, Some("LlamaForCausalLM")) => Ok(Family::Llama),
        (Some("qwen2"), _) | (_, Some("Qwen2ForCausalLM")) => Ok(Family::Qwen2),
        (Some("qwen3"), _) | (_, Some("Qwen3ForCausalLM")) => Ok(Family::Qwen3),
        (model_type, arch) => Err(SpecError::Family {
            model_type: model_type.map(str::to_owned),
            arch: arch.map(str::to_owned),
        }),
    }
}

fn rope_scaling_of(dict: Option<&Value>, max_pos: i64) -> Result<RopeScaling, SpecError> {
    let Some(dict) = dict.filter(|d| !d.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = dict
        .get("rope_type")
        .or_else(|| dict.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| dict.get(key).and_then(Value::as_f64);
    let factor = || num("factor").ok_or_else(|| SpecError::RopeFactor(kind.to_owned()));
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "dynamic" => Ok(RopeScaling::Dynamic { factor: factor()? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: num("original_max_position_embeddings").unwrap_or(max_pos as f64),
        }),
        "yarn" => Ok(RopeScaling::Yarn {
            factor: factor()?,
            original_max_position_embeddings: num("original_max_position_embeddings").unwrap_or(max_pos as f64),
            beta_fast: num("beta_fast").unwrap_or(32.0),
            beta_slow: num("beta_slow").unwrap_or(1.0),
            attention_factor: num("attention_factor"),
            mscale: num("mscale"),
            mscale_all_dim: num("mscale_all_dim"),
            truncate: dict.get("truncate").and_then(Value::as_bool).unwrap_or(true),
        }),
        other => Err(SpecError::RopeType(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qwen3_with_yarn() {
        let spec = ModelSpec::from_json(
            r#"{"model_type":"qwen3","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,
                "rope_theta":1000.0,"rope_scaling":{"rope_type":"yarn","factor":4.0}}"#,
        )
        .expect("valid config");
        assert_eq!(spec.family, Family::Qwen3);
        assert!(spec.qk_norm && !spec.qkv_bias);
        assert_eq!(spec.rope.theta, 1000.0);
        assert!(matches!(spec.rope.scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));
    }

    #[test]
    fn rejects_unknown_family_and_bad_heads() {
        let err = ModelSpec::from_json(
            r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .expect_err("gpt2 is unsupported");
        assert!(matches!(err, SpecError::Family { .. }), "{err}");
        let err = ModelSpec::from_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .expect_err("3 heads over 2 kv heads");
        assert!(matches!(err, SpecError::Heads { heads: 3, kv_heads: 2 }), "{err}");
    }
}
