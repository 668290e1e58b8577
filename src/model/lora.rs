//! LoRA adapters in PEFT's format: which linear modules carry a low-rank update `B @ A`
//! (scaled by `alpha / r`), their initialisation, `adapter_config.json` +
//! `adapter_model.safetensors` on disk, and merging an adapter into the base weights.
//!
//! Tensor names are PEFT's saved keys, `base_model.model.<module>.lora_A.weight` (`[r, in]`)
//! and `...lora_B.weight` (`[out, r]`), so what we write `peft.PeftModel.from_pretrained` and
//! vLLM's `/v1/load_lora_adapter` read as is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::config::ModelSpec;
use super::safetensors_io::{read_file, write_file};

/// PEFT's adapter file names.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A linear module LoRA can target, by its HF name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize)]
pub enum LoraTarget {
    #[value(name = "q_proj")]
    #[serde(rename = "q_proj")]
    Q,
    #[value(name = "k_proj")]
    #[serde(rename = "k_proj")]
    K,
    #[value(name = "v_proj")]
    #[serde(rename = "v_proj")]
    V,
    #[value(name = "o_proj")]
    #[serde(rename = "o_proj")]
    O,
    #[value(name = "gate_proj")]
    #[serde(rename = "gate_proj")]
    Gate,
    #[value(name = "up_proj")]
    #[serde(rename = "up_proj")]
    Up,
    #[value(name = "down_proj")]
    #[serde(rename = "down_proj")]
    Down,
}

impl LoraTarget {
    /// Every target, in layer order.
    pub const ALL: [LoraTarget; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The HF module name (`q_proj`).
    pub fn hf(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`).
    pub fn in_layer(self) -> String {
        let block = match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        };
        format!("{block}.{}", self.hf())
    }

    /// (in features, out features) of this module in `spec`.
    pub fn dims(self, spec: &ModelSpec) -> (i64, i64) {
        let (h, i) = (spec.hidden_size, spec.intermediate_size);
        let (q, kv) = (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim);
        match self {
            Self::Q => (h, q),
            Self::K | Self::V => (h, kv),
            Self::O => (q, h),
            Self::Gate | Self::Up => (h, i),
            Self::Down => (i, h),
        }
    }

    fn of_hf(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.hf() == name)
    }
}

/// Errors of the adapter format.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA: {0}")]
    Invalid(String),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error(transparent)]
    Model(#[from] super::ModelError),
}

/// What is adapted and how: rank, scale, dropout, target modules and layers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: i64,
    pub alpha: f64,
    /// Dropout on each adapted module's input, in training only.
    pub dropout: f64,
    pub targets: BTreeSet<LoraTarget>,
    /// Decoder layers that get adapters (PEFT's `layers_to_transform`); `None`: all.
    pub layers: Option<BTreeSet<i64>>,
}

/// One adapted module: where it is, and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptedModule {
    /// HF module path, `model.layers.3.self_attn.q_proj`.
    pub path: String,
    pub target: LoraTarget,
    pub in_features: i64,
    pub out_features: i64,
}

impl AdaptedModule {
    /// The saved key of the A (`[r, in]`) matrix.
    pub fn a_key(&self) -> String {
        format!("base_model.model.{}.lora_A.weight", self.path)
    }

    /// The saved key of the B (`[out, r]`) matrix.
    pub fn b_key(&self) -> String {
        format!("base_model.model.{}.lora_B.weight", self.path)
    }
}

impl LoraSpec {
    /// `alpha / r`, what `B @ A` is multiplied by.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Checks the spec against a model: rank, dropout, targets and layers in range.
    pub fn check(&self, spec: &ModelSpec) -> Result<(), LoraError> {
        if self.r < 1 {
            return Err(LoraError::Invalid(format!("rank {} must be at least 1", self.r)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Invalid(format!(
                "dropout {} must be in [0, 1)",
                self.dropout
            )));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(LoraError::Invalid(format!("alpha {} must be positive", self.alpha)));
        }
        if self.targets.is_empty() {
            return Err(LoraError::Invalid("no target modules".into()));
        }
        if let Some(bad) = self.layers.iter().flatten().find(|&&l| l >= spec.num_layers) {
            return Err(LoraError::Invalid(format!(
                "layer {bad} is out of range: the model has {} layers",
                spec.num_layers
            )));
        }
        if self.layers.as_ref().is_some_and(BTreeSet::is_empty) {
            return Err(LoraError::Invalid("no layer is adapted".into()));
        }
        Ok(())
    }

    /// The adapted modules of `spec`, layer by layer.
    pub fn modules(&self, spec: &ModelSpec) -> Vec<AdaptedModule> {
        let mut out = Vec::new();
        for layer in 0..spec.num_layers {
            if self.layers.as_ref().is_some_and(|set| !set.contains(&layer)) {
                continue;
            }
            for &target in &self.targets {
                let (in_features, out_features) = target.dims(spec);
                out.push(AdaptedModule {
                    path: format!("model.layers.{layer}.{}", target.in_layer()),
                    target,
                    in_features,
                    out_features,
                });
            }
        }
        out
    }

    /// Every adapter tensor's key and shape.
    pub fn shapes(&self, spec: &ModelSpec) -> Vec<(String, Vec<i64>)> {
        self.modules(spec)
            .into_iter()
            .flat_map(|m| {
                [
                    (m.a_key(), vec![self.r, m.in_features]),
                    (m.b_key(), vec![m.out_features, self.r]),
                ]
            })
            .collect()
    }

    /// PEFT's initialisation (fp32): A as `kaiming_uniform_(a=sqrt(5))`, i.e. uniform in
    /// `±1/sqrt(in)`, and B zero, so the adapted model starts as the base model.
    pub fn init(&self, spec: &ModelSpec, seed: i64, device: Device) -> Vec<(String, Tensor)> {
        tch::manual_seed(seed);
        let mut out = Vec::new();
        for m in self.modules(spec) {
            let bound = 1.0 / (m.in_features as f64).sqrt();
            let a = Tensor::rand([self.r, m.in_features], (Kind::Float, device)) * (2.0 * bound) - bound;
            out.push((m.a_key(), a));
            out.push((
                m.b_key(),
                Tensor::zeros([m.out_features, self.r], (Kind::Float, device)),
            ));
        }
        out
    }

    /// PEFT's `adapter_config.json` for this spec.
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        let targets: Vec<&str> = self.targets.iter().map(|t| t.hf()).collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "layers_to_transform": self.layers.as_ref().map(|l| l.iter().copied().collect::<Vec<_>>()),
            "layers_pattern": self.layers.as_ref().map(|_| "layers"),
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "init_lora_weights": true,
            "inference_mode": true,
        })
    }

    /// The spec an `adapter_config.json` describes; refuses what we do not implement (DoRA,
    /// rsLoRA, biases, saved modules, targets other than the seven linear modules).
    pub fn from_peft_config(config: &serde_json::Value) -> Result<Self, LoraError> {
        let raw: PeftConfig = serde_json::from_value(config.clone())
            .map_err(|e| LoraError::Invalid(format!("adapter_config.json: {e}")))?;
        raw.into_spec()
    }
}

/// The fields of `adapter_config.json` we read.
#[derive(Deserialize)]
struct PeftConfig {
    peft_type: String,
    r: i64,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: TargetModules,
    #[serde(default)]
    layers_to_transform: Option<LayersToTransform>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    fan_in_fan_out: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LayersToTransform {
    One(i64),
    Many(Vec<i64>),
}

impl PeftConfig {
    fn into_spec(self) -> Result<LoraSpec, LoraError> {
        let refuse = |what: &str| {
            Err(LoraError::Invalid(format!(
                "adapter_config.json: {what} is not supported"
            )))
        };
        if self.peft_type != "LORA" {
            return refuse(&format!("peft_type {:?}", self.peft_type));
        }
        if self.use_dora {
            return refuse("use_dora");
        }
        if self.use_rslora {
            return refuse("use_rslora");
        }
        if self.fan_in_fan_out {
            return refuse("fan_in_fan_out");
        }
        if self.bias.as_deref().is_some_and(|b| b != "none") {
            return refuse("a LoRA bias");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("modules_to_save");
        }
        let names = match self.target_modules {
            TargetModules::List(l) => l,
            TargetModules::Pattern(p) => return refuse(&format!("a target_modules pattern ({p:?})")),
        };
        let targets = names
            .iter()
            .map(|n| LoraTarget::of_hf(n).ok_or_else(|| LoraError::Invalid(format!("unknown target module {n:?}"))))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let layers = self.layers_to_transform.map(|l| match l {
            LayersToTransform::One(i) => BTreeSet::from([i]),
            LayersToTransform::Many(v) => v.into_iter().collect(),
        });
        Ok(LoraSpec {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            layers,
        })
    }
}

/// Checks adapter tensors against the spec's keys and shapes (all present, nothing extra,
/// finite).
pub fn check_tensors(lora: &LoraSpec, spec: &ModelSpec, tensors: &[(String, Tensor)]) -> Result<(), LoraError> {
    let expected: BTreeMap<String, Vec<i64>> = lora.shapes(spec).into_iter().collect();
    let mut seen = BTreeSet::new();
    for (name, t) in tensors {
        let Some(shape) = expected.get(name) else {
            return Err(LoraError::Invalid(format!("unexpected adapter tensor {name}")));
        };
        if &t.size() != shape {
            return Err(LoraError::Invalid(format!(
                "{name}: shape {:?}, expected {shape:?}",
                t.size()
            )));
        }
        let finite = t.isfinite().all().int64_value(&[]) == 1;
        if !finite {
            return Err(LoraError::Invalid(format!("{name} holds non-finite values")));
        }
        seen.insert(name.clone());
    }
    if let Some(missing) = expected.keys().find(|k| !seen.contains(*k)) {
        return Err(LoraError::Invalid(format!("adapter lacks {missing}")));
    }
    Ok(())
}

/// Writes a PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors`
/// (fp32, on the CPU).
pub fn save_adapter(
    dir: &Path,
    lora: &LoraSpec,
    tensors: &[(String, Tensor)],
    base_model: &str,
) -> Result<(), LoraError> {
    let file_err = |path: &Path, e: &dyn std::fmt::Display| LoraError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, &e))?;
    let config = serde_json::to_string_pretty(&lora.peft_config(base_model)).map_err(|e| file_err(dir, &e))?;
    std::fs::write(dir.join(CONFIG_FILE), config).map_err(|e| file_err(&dir.join(CONFIG_FILE), &e))?;
    let cpu: Vec<(String, Tensor)> = tch::no_grad(|| {
        tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).to_kind(Kind::Float)))
            .collect()
    });
    write_file(&dir.join(WEIGHTS_FILE), &cpu)?;
    Ok(())
}

/// Reads a PEFT adapter directory and checks it against `spec`.
pub fn load_adapter(dir: &Path, spec: &ModelSpec) -> Result<(LoraSpec, Vec<(String, Tensor)>), LoraError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| LoraError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoraError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let lora = LoraSpec::from_peft_config(&config)?;
    lora.check(spec)?;
    let tensors: Vec<(String, Tensor)> = read_file(&dir.join(WEIGHTS_FILE))?
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(Kind::Float)))
        .collect();
    check_tensors(&lora, spec, &tensors)?;
    Ok((lora, tensors))
}

/// The base weights with every adapted module's weight replaced by `W + scaling * B @ A`
/// (fp32; names as the base's).
pub fn merge(
    base: &[(String, Tensor)],
    lora: &LoraSpec,
    spec: &ModelSpec,
    tensors: &[(String, Tensor)],
) -> Vec<(String, Tensor)> {
    let by_key: BTreeMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let deltas: BTreeMap<String, (String, String)> = lora
        .modules(spec)
        .into_iter()
        .map(|m| (format!("{}.weight", m.path), (m.a_key(), m.b_key())))
        .collect();
    tch::no_grad(|| {
        base.iter()
            .map(|(name, w)| {
                let w32 = w.detach().to_kind(Kind::Float);
                let merged = match deltas
                    .get(name)
                    .and_then(|(a, b)| Some((by_key.get(a.as_str())?, by_key.get(b.as_str())?)))
                {
                    Some((a, b)) => {
                        let (a, b) = (
                            a.to_device(w.device()).to_kind(Kind::Float),
                            b.to_device(w.device()).to_kind(Kind::Float),
                        );
                        w32 + b.matmul(&a) * lora.scaling()
                    }
                    None => w32,
                };
                (name.clone(), merged)
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        let cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
        });
        ModelSpec::from_json(&cfg.to_string()).expect("spec")
    }

    fn lora(targets: &[LoraTarget], layers: Option<&[i64]>) -> LoraSpec {
        LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: targets.iter().copied().collect(),
            layers: layers.map(|l| l.iter().copied().collect()),
        }
    }

    #[test]
    fn modules_follow_targets_and_layers() {
        let s = spec();
        let l = lora(&[LoraTarget::Q, LoraTarget::Down], Some(&[0, 2]));
        let paths: Vec<String> = l.modules(&s).into_iter().map(|m| m.path).collect();
        assert_eq!(
            paths,
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.mlp.down_proj",
                "model.layers.2.self_attn.q_proj",
                "model.layers.2.mlp.down_proj"
            ]
        );
        let shapes = l.shapes(&s);
        assert_eq!(
            shapes[0],
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                vec![4, 32]
            )
        );
        assert_eq!(
            shapes[3],
            (
                "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight".into(),
                vec![32, 4]
            )
        );
        assert!(lora(&[LoraTarget::Q], Some(&[3])).check(&s).is_err());
        assert!(lora(&[], None).check(&s).is_err());
    }

    #[test]
    fn the_peft_config_round_trips_and_refuses_what_we_lack() {
        let l = lora(&LoraTarget::ALL, Some(&[1]));
        let config = l.peft_config("base");
        assert_eq!(LoraSpec::from_peft_config(&config).expect("parse"), l);
        let mut dora = config.clone();
        dora["use_dora"] = serde_json::json!(true);
        assert!(LoraSpec::from_peft_config(&dora).is_err());
        let mut pattern = config.clone();
        pattern["target_modules"] = serde_json::json!("all-linear");
        assert!(LoraSpec::from_peft_config(&pattern).is_err());
        let mut unknown = config;
        unknown["target_modules"] = serde_json::json!(["lm_head"]);
        assert!(LoraSpec::from_peft_config(&unknown).is_err());
    }

    #[test]
    fn a_fresh_adapter_merges_to_the_base_and_a_trained_one_adds_b_a() {
        let s = spec();
        let l = lora(&[LoraTarget::V], None);
        let mut tensors = l.init(&s, 1, Device::Cpu);
        let base = vec![(
            "model.layers.1.self_attn.v_proj.weight".to_string(),
            Tensor::randn([16, 32], (Kind::Float, Device::Cpu)),
        )];
        assert!(merge(&base, &l, &s, &tensors)[0].1.equal(&base[0].1));
        let b_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
        let a_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";
        for (n, t) in tensors.iter_mut() {
            if n == b_key {
                *t = Tensor::ones([16, 4], (Kind::Float, Device::Cpu));
            }
        }
        let a = tensors
            .iter()
            .find(|(n, _)| n == a_key)
            .map(|(_, t)| t.shallow_clone())
            .expect("a");
        let expect = &base[0].1 + Tensor::ones([16, 4], (Kind::Float, Device::Cpu)).matmul(&a) * 2.0;
        let merged = &merge(&base, &l, &s, &tensors)[0].1;
        assert!((merged - expect).abs().max().double_value(&[]) < 1e-6);
        check_tensors(&l, &s, &tensors).expect("valid");
        assert!(check_tensors(&l, &s, &tensors[1..]).is_err());
    }
}
