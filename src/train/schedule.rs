//! Learning-rate schedule: linear warmup, then constant or cosine decay to zero.

/// Shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Constant after warmup (the Atropos trainer's schedule).
    Constant,
    /// Cosine from `lr` to 0 over the steps after warmup.
    Cosine,
}

/// The learning rate of each 0-based step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub kind: ScheduleKind,
}

impl LrSchedule {
    /// Learning rate of 0-based step `step`: `lr * (step + 1) / warmup` during warmup.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_constant_or_cosine() {
        let s = LrSchedule {
            lr: 1.0,
            warmup_steps: 4,
            total_steps: 8,
            kind: ScheduleKind::Constant,
        };
        assert_eq!(
            (0..6).map(|i| s.lr_at(i)).collect::<Vec<_>>(),
            vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
        );
        let c = LrSchedule {
            kind: ScheduleKind::Cosine,
            ..s
        };
        assert_eq!(c.lr_at(4), 1.0);
        assert!((c.lr_at(6) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(8).abs() < 1e-12);
    }
}
