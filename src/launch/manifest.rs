//! Cluster manifests (`cluster/<name>.toml`): the processes of a run, how to tell each is ready,
//! and placeholders filled in at launch.
//!
//! Placeholders in any string: `{run}` (the run directory), `{python}` (`$GRPO_PYTHON`, else
//! `python3`), `{grpo_node}` (this binary), `{repo}` (the manifest's parent's parent), and
//! `{port:NAME}` (a free loopback port, the same for every use of NAME).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A whole manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Shown in logs; names the run directory.
    pub name: String,
    /// Parent of the run directory [default: runs].
    #[serde(default = "default_runs")]
    pub runs_dir: String,
    /// Commands run to completion, in order, before any process starts.
    #[serde(default)]
    pub setup: Vec<Step>,
    /// Long-running processes, started in order.
    pub process: Vec<Process>,
    /// Commands run after the main process ended successfully (reports, plots).
    #[serde(default)]
    pub finally: Vec<Step>,
    /// Where the learner writes `metrics.jsonl`, for the progress bar and summary.
    pub metrics: Option<String>,
    /// Steps the run trains, for the progress bar.
    pub steps: Option<u64>,
}

fn default_runs() -> String {
    "runs".into()
}

/// A one-shot command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    pub command: Vec<String>,
}

/// How to know a process is ready.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Ready {
    /// An HTTP GET that answers 2xx.
    Http(String),
    /// A line of the process's log containing this text.
    Log(String),
}

/// A process of the run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub name: String,
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// GPUs to expose (`CUDA_VISIBLE_DEVICES`); empty = none set.
    #[serde(default)]
    pub gpus: Vec<u32>,
    pub ready: Option<Ready>,
    /// Seconds to wait for readiness [default: 120].
    #[serde(default = "default_ready_s")]
    pub ready_timeout_s: u64,
    /// The run ends when this process exits; its exit code is the run's.
    #[serde(default)]
    pub main: bool,
}

/// Longest `ready_timeout_s` (a year; the runner adds it to `Instant::now()`).
pub const MAX_READY_TIMEOUT_S: u64 = 365 * 86_400;

fn default_ready_s() -> u64 {
    120
}

/// Errors reading a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl Manifest {
    /// Reads and checks a manifest file.
    pub fn read(path: &Path) -> Result<Self, ManifestError> {
        let invalid = |reason: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and checks a manifest's TOML text; `path` only names it in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let invalid = |reason: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let m: Manifest = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if m.process.iter().filter(|p| p.main).count() != 1 {
            return Err(invalid("exactly one process must have main = true".into()));
        }
        if let Some(p) = m.process.iter().find(|p| p.command.is_empty()) {
            return Err(invalid(format!("process {} has an empty command", p.name)));
        }
        if let Some(s) = m.setup.iter().chain(&m.finally).find(|s| s.command.is_empty()) {
            return Err(invalid(format!("step {} has an empty command", s.name)));
        }
        if let Some(p) = m.process.iter().find(|p| p.ready_timeout_s > MAX_READY_TIMEOUT_S) {
            return Err(invalid(format!(
                "process {}: ready_timeout_s must be at most {MAX_READY_TIMEOUT_S} (got {})",
                p.name, p.ready_timeout_s
            )));
        }
        let mut names: Vec<&str> = m.process.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("process names must be unique".into()));
        }
        Ok(m)
    }
}

/// Fills placeholders; ports are allocated on first use of each name.
pub struct Placeholders {
    pub run: PathBuf,
    pub python: String,
    pub grpo_node: String,
    pub repo: PathBuf,
    pub ports: BTreeMap<String, u16>,
}

impl Placeholders {
    /// Substitutes every placeholder in `s`.
    pub fn fill(&mut self, s: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed placeholder in {s:?}"))?
                + open;
            let key = &rest[open + 1..close];
            let value = match key {
                "run" => self.run.display().to_string(),
                "python" => self.python.clone(),
                "grpo_node" => self.grpo_node.clone(),
                "repo" => self.repo.display().to_string(),
                _ => match key.strip_prefix("port:") {
                    Some(name) => self.port(name)?.to_string(),
                    None => return Err(format!("unknown placeholder {{{key}}} in {s:?}")),
                },
            };
            out.push_str(&value);
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn port(&mut self, name: &str) -> Result<u16, String> {
        if let Some(p) = self.ports.get(name) {
            return Ok(*p);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port: {e}"))?;
        self.ports.insert(name.to_string(), port);
        Ok(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_and_ports_are_stable() {
        let mut p = Placeholders {
            run: PathBuf::from("/r"),
            python: "py".into(),
            grpo_node: "g".into(),
            repo: PathBuf::from("/repo"),
            ports: BTreeMap::new(),
        };
        let a = p.fill("{python} {run}/x --port {port:api}").expect("fill");
        let b = p.fill("{port:api}").expect("fill");
        assert!(a.starts_with("py /r/x --port "));
        assert!(a.ends_with(&b));
        assert!(p.fill("{nope}").is_err());
    }
}
