//! The optimizer a trainer runs: AdamW, 8-bit AdamW or Adafactor, behind one step/state
//! interface.

use tch::{Kind, Tensor};

use super::adafactor::{Adafactor, AdafactorConfig};
use super::adamw::{AdamW, AdamWConfig, MasterParam};
use super::adamw8bit::AdamW8bit;
pub use super::optim_state::OptimizerError;

/// `--optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// torch.optim.AdamW semantics over fp32 master weights.
    #[default]
    Adamw,
    /// bitsandbytes' AdamW8bit: blockwise 8-bit moments (2 bytes per parameter instead of 8),
    /// the same update in fp32.
    #[value(name = "adamw_8bit", alias = "adamw-8bit")]
    #[serde(rename = "adamw_8bit", alias = "adamw-8bit")]
    Adamw8bit,
    /// transformers' Adafactor (factored second moment, no first moment, update clipping) with
    /// the run's learning rate; a fraction of AdamW's optimizer memory.
    Adafactor,
}

pub enum Optimizer {
    AdamW(AdamW),
    AdamW8bit(AdamW8bit),
    Adafactor(Adafactor),
}

impl Optimizer {
    /// Fresh state of `kind` for `params`; `adamw` also gives Adafactor its weight decay.
    pub fn new(
        kind: OptimizerKind,
        adamw: AdamWConfig,
        params: &[MasterParam],
        exp_avg_kind: Kind,
        fused: bool,
    ) -> Self {
        match kind {
            OptimizerKind::Adamw => {
                let mut o = AdamW::new(adamw, params, exp_avg_kind);
                o.fused = fused;
                Optimizer::AdamW(o)
            }
            OptimizerKind::Adamw8bit => Optimizer::AdamW8bit(AdamW8bit::new(adamw, params)),
            OptimizerKind::Adafactor => {
                let config = AdafactorConfig {
                    weight_decay: adamw.weight_decay,
                    ..AdafactorConfig::default()
                };
                Optimizer::Adafactor(Adafactor::new(config, params))
            }
        }
    }

    pub fn step(
        &mut self,
        params: &[MasterParam],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), OptimizerError> {
        match self {
            Optimizer::AdamW(o) => o.step(params, grads, lr, grad_scale),
            Optimizer::AdamW8bit(o) => o.step(params, grads, lr, grad_scale),
            Optimizer::Adafactor(o) => o.step(params, grads, lr, grad_scale),
        }
    }

    /// Completed steps.
    pub fn steps(&self) -> u64 {
        match self {
            Optimizer::AdamW(o) => o.steps,
            Optimizer::AdamW8bit(o) => o.steps,
            Optimizer::Adafactor(o) => o.steps,
        }
    }

    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            Optimizer::AdamW(o) => o.state_tensors(),
            Optimizer::AdamW8bit(o) => o.state_tensors(),
            Optimizer::Adafactor(o) => o.state_tensors(),
        }
    }

    pub fn load_state_tensors(&mut self, tensors: Vec<(String, Tensor)>, steps: u64) -> Result<(), OptimizerError> {
        match self {
            Optimizer::AdamW(o) => o.load_state_tensors(tensors, steps),
            Optimizer::AdamW8bit(o) => o.load_state_tensors(tensors, steps),
            Optimizer::Adafactor(o) => o.load_state_tensors(tensors, steps),
        }
    }
}
