//! Model shapes for benchmarks: HF `config.json` values of public models, used with random
//! weights (no download).

use crate::model::ModelSpec;

/// A named shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// Qwen/Qwen2.5-0.5B.
    #[value(name = "qwen2.5-0.5b")]
    Qwen25_05b,
    /// Qwen/Qwen2.5-1.5B.
    #[value(name = "qwen2.5-1.5b")]
    Qwen25_15b,
    /// Qwen/Qwen2.5-7B.
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
    /// Two small layers, for smoke tests on the CPU.
    Tiny,
}

impl Shape {
    /// The shape's `config.json`; `vocab` replaces the vocabulary size of `tiny` only.
    pub fn config_json(self, vocab: i64) -> String {
        let (hidden, inter, layers, heads, kv, vocab, tied) = match self {
            Shape::Qwen25_05b => (896, 4864, 24, 14, 2, 151_936, true),
            Shape::Qwen25_15b => (1536, 8960, 28, 12, 2, 151_936, true),
            Shape::Qwen25_7b => (3584, 18944, 28, 28, 4, 152_064, false),
            Shape::Tiny => (64, 128, 2, 4, 2, vocab, false),
        };
        format!(
            r#"{{"model_type":"qwen2","architectures":["Qwen2ForCausalLM"],"hidden_size":{hidden},
            "intermediate_size":{inter},"num_hidden_layers":{layers},"num_attention_heads":{heads},
            "num_key_value_heads":{kv},"vocab_size":{vocab},"rope_theta":1000000.0,"rms_norm_eps":1e-6,
            "max_position_embeddings":32768,"tie_word_embeddings":{tied},"torch_dtype":"bfloat16"}}"#
        )
    }

    /// The parsed spec.
    pub fn spec(self, vocab: i64) -> Result<ModelSpec, crate::model::config::SpecError> {
        ModelSpec::from_json(&self.config_json(vocab))
    }

    /// The name used in results.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Qwen25_05b => "qwen2.5-0.5b",
            Shape::Qwen25_15b => "qwen2.5-1.5b",
            Shape::Qwen25_7b => "qwen2.5-7b",
            Shape::Tiny => "tiny",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter counts of the public models (tied embeddings counted once).
    #[test]
    fn shapes_have_the_public_parameter_counts() {
        let count = |s: Shape| {
            crate::model::params::expected_shapes(&s.spec(0).expect("spec"))
                .iter()
                .map(|(_, shape)| shape.iter().product::<i64>())
                .sum::<i64>()
        };
        assert_eq!(count(Shape::Qwen25_05b), 494_032_768);
        assert_eq!(count(Shape::Qwen25_15b), 1_543_714_304);
        assert_eq!(count(Shape::Qwen25_7b), 7_615_616_512);
    }
}
