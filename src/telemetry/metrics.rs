//! `metrics.jsonl`: one JSON object per optimizer step.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::train::StepMetrics;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    #[serde(flatten)]
    pub train: StepMetrics,
    /// Groups rejected since the previous step (this batch and any fully rejected ones before it).
    pub rejected_groups: u64,
    /// Rejections of this batch by reason.
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    /// Seconds from the previous step's end to this step's end.
    pub step_time_s: f64,
    /// Seconds the learner waited for this batch.
    pub wait_time_s: f64,
    /// The API batch this step trained on.
    pub batch_seq: u64,
    /// Mean score of the sequences trained on (the environments' reward).
    pub reward_mean: f64,
    /// Newest policy version every healthy sidecar holds (null without weight sync).
    pub engine_version: Option<u64>,
    /// Duration and size of the newest completed weight publication.
    pub sync_time_s: Option<f64>,
    pub sync_bytes: Option<u64>,
    /// Sidecars holding a published version, and sidecars marked stale (null without weight
    /// sync).
    pub sidecars_synced: Option<u64>,
    pub sidecars_stale: Option<u64>,
    /// The newest publication's logprob canary: largest |engine - reference| logprob on the
    /// sidecar's fixed tokens (null where no engine checks one).
    pub sync_canary_max_abs_diff: Option<f64>,
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsFile {
    path: PathBuf,
}

impl MetricsFile {
    /// Opens `dir/metrics.jsonl`, dropping lines of steps after `resumed_step` (those steps are
    /// trained again after a resume).
    pub fn open(dir: &Path, resumed_step: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("metrics.jsonl");
        if path.exists() {
            let text = std::fs::read_to_string(&path)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                        .is_some_and(|s| s <= resumed_step)
                })
                .collect();
            let mut body = kept.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            std::fs::write(&path, body)?;
        }
        Ok(Self { path })
    }

    /// Appends one record.
    pub fn append(&self, record: &StepRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(line.as_bytes())
    }
}

/// The concise per-step line printed on stderr.
pub fn human_line(r: &StepRecord, total_steps: u64) -> String {
    format!(
        "step {}/{} | reward {:.3} | loss {:+.4} | grad {:.3} | lr {:.2e} | logp+ {:.3} logp- {:.3} | ratio {:.3} | clip {:.1}% | |dlogp| {:.4} | {} tok | rejected {} | {:.2}s (wait {:.2}s){}",
        r.train.step,
        total_steps,
        r.reward_mean,
        r.train.loss,
        r.train.grad_norm,
        r.train.lr,
        r.train.pos_logp_mean,
        r.train.neg_logp_mean,
        r.train.mean_ratio,
        100.0 * r.train.clipped_fraction,
        r.train.logprob_diff_abs_mean,
        r.train.tokens,
        r.rejected_groups,
        r.step_time_s,
        r.wait_time_s,
        match (r.engine_version, r.sync_time_s) {
            (Some(v), Some(t)) => format!(" | engine v{v} sync {t:.2}s"),
            _ => String::new(),
        },
    )
}
