//! Progress and summary from `metrics.jsonl`.

use std::io::{IsTerminal, Write};
use std::path::Path;

use serde_json::Value;

/// Reads every record of a metrics file (missing file = none yet).
pub fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn num(r: &Value, key: &str) -> f64 {
    r.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Prints a progress bar (a rewritten line on a terminal, a line per step otherwise).
pub struct Progress {
    shown: usize,
    total: Option<u64>,
    tty: bool,
}

impl Progress {
    pub fn new(total: Option<u64>) -> Self {
        Self {
            shown: 0,
            total,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Shows records not shown yet.
    pub fn update(&mut self, records: &[Value]) {
        if records.len() <= self.shown {
            return;
        }
        let mut err = std::io::stderr().lock();
        let from = if self.tty { records.len() - 1 } else { self.shown };
        for r in &records[from..] {
            let step = r.get("step").and_then(Value::as_u64).unwrap_or(0);
            let bar = match self.total {
                Some(t) if t > 0 => {
                    let done = ((step as f64 / t as f64) * 30.0).round() as usize;
                    format!(
                        "[{}{}] {step}/{t}",
                        "#".repeat(done.min(30)),
                        ".".repeat(30 - done.min(30))
                    )
                }
                _ => format!("step {step}"),
            };
            let sync = r
                .get("sync_time_s")
                .and_then(Value::as_f64)
                .map_or("-".into(), |s| format!("{s:.2}s"));
            let line = format!(
                "{bar} | reward {:.3} | loss {:+.4} | sync {sync} | {:.1}s/step",
                num(r, "reward_mean"),
                num(r, "loss"),
                num(r, "step_time_s")
            );
            if self.tty {
                let _ = write!(err, "\r\x1b[2K{line}");
            } else {
                let _ = writeln!(err, "{line}");
            }
        }
        let _ = err.flush();
        self.shown = records.len();
    }

    /// Ends the progress line.
    pub fn finish(&self) {
        if self.tty && self.shown > 0 {
            eprintln!();
        }
    }
}

/// Mean of `key` over the first and last `n` records.
fn window_means(records: &[Value], key: &str, n: usize) -> (f64, f64) {
    let mean = |rs: &[Value]| rs.iter().map(|r| num(r, key)).sum::<f64>() / rs.len().max(1) as f64;
    let n = n.min(records.len()).max(1);
    (
        mean(&records[..n.min(records.len())]),
        mean(&records[records.len().saturating_sub(n)..]),
    )
}

/// The end-of-run table.
pub fn summary(records: &[Value], wall_s: f64) -> String {
    if records.is_empty() {
        return "no steps were trained".into();
    }
    let n = (records.len() / 10).max(1);
    let (r0, r1) = window_means(records, "reward_mean", n);
    let (l0, l1) = window_means(records, "loss", n);
    let syncs: Vec<f64> = records
        .iter()
        .filter_map(|r| r.get("sync_time_s").and_then(Value::as_f64))
        .collect();
    let sync_mean = if syncs.is_empty() {
        f64::NAN
    } else {
        syncs.iter().sum::<f64>() / syncs.len() as f64
    };
    let step_total: f64 = records
        .iter()
        .map(|r| num(r, "step_time_s"))
        .filter(|x| x.is_finite())
        .sum();
    let rejected: f64 = records
        .iter()
        .map(|r| num(r, "rejected_groups"))
        .filter(|x| x.is_finite())
        .sum();
    let rows = [
        ("steps", format!("{}", records.len())),
        ("wall time", format!("{wall_s:.0} s")),
        (
            &*format!("reward (first {n} -> last {n} steps)"),
            format!("{r0:.3} -> {r1:.3}"),
        ),
        ("loss (same windows)", format!("{l0:+.4} -> {l1:+.4}")),
        ("mean step time", format!("{:.2} s", step_total / records.len() as f64)),
        (
            "mean sync time",
            if sync_mean.is_finite() {
                format!("{sync_mean:.3} s")
            } else {
                "-".into()
            },
        ),
        ("rejected groups", format!("{rejected:.0}")),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("  {k:<width$}  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}
