//! Cluster manifests (`cluster/<name>.toml`): the processes of a run, how to tell each is ready,
//! and placeholders filled in at launch.
//!
//! Placeholders in any string: `{run}` (the run directory), `{python}` (`$GRPO_PYTHON`, else
//! `python3`), `{grpo_node}` (this binary), `{repo}` (the manifest's parent's parent),
//! `{port:NAME}` (a free port, the same for every use of NAME), and `{host:GROUP}` (the address
//! of the node that runs GROUP's processes: 127.0.0.1 on one machine, the node's own address
//! under Slurm).
//!
//! Schema 1. Processes may name a `group`; a group's processes share a node, and on Slurm each
//! group is one component of a heterogeneous job (`[[group]]` gives its CPUs and GPUs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A whole manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The manifest schema's version [default: 1, the only one].
    #[serde(default = "default_schema")]
    pub schema: u32,
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
    /// Placement groups; with none, every process is in one group, [`DEFAULT_GROUP`].
    #[serde(default)]
    pub group: Vec<Group>,
    /// Secrets by reference: NAME = "generate" (32 random bytes, hex), "file:PATH" or
    /// "env:VAR". Each is written to `{run}/secrets/NAME` (mode 0600) at launch, and
    /// `{secret:NAME}` is that file's path (a value never appears on a command line).
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// What `--backend kubernetes` needs besides the processes.
    pub kubernetes: Option<KubeSpec>,
}

/// The `[kubernetes]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeSpec {
    /// The container image: grpo-node, this repository at `repo`, and its Python environment.
    pub image: String,
    /// A ReadWriteMany PersistentVolumeClaim every pod mounts at `mount`: the run directories.
    pub claim: String,
    /// Where the repository is in the image (`{repo}`) [default: /opt/grpo-node].
    #[serde(default = "default_kube_repo")]
    pub repo: String,
    /// Where the claim is mounted [default: /runs].
    #[serde(default = "default_kube_mount")]
    pub mount: String,
    /// `{python}` in the image [default: python3].
    #[serde(default = "default_kube_python")]
    pub python: String,
    /// Ports are fixed on Kubernetes (Services and probes name them): the k-th port name, in
    /// sorted order, gets port_base + k [default: 8000].
    #[serde(default = "default_port_base")]
    pub port_base: u16,
    /// The namespace of every object [default: none, kubectl's].
    pub namespace: Option<String>,
}

fn default_kube_repo() -> String {
    "/opt/grpo-node".into()
}
fn default_kube_mount() -> String {
    "/runs".into()
}
fn default_kube_python() -> String {
    "python3".into()
}
fn default_port_base() -> u16 {
    8000
}

fn default_runs() -> String {
    "runs".into()
}

fn default_schema() -> u32 {
    1
}

/// The group of every process in a manifest that declares none.
pub const DEFAULT_GROUP: &str = "all";

/// Processes that share a node (a heterogeneous job's component on Slurm).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Lower-case letters, digits and `-`; processes name it in `group`, strings in `{host:NAME}`.
    pub name: String,
    /// CPUs the group's node gives it [default: 1].
    #[serde(default = "one")]
    pub cpus: u32,
    /// GPUs the group's node gives it [default: 0].
    #[serde(default)]
    pub gpus: u32,
}

fn one() -> u32 {
    1
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
    /// This process may finish before the main one (a learner rank above 0, which rank 0 stops
    /// at the end): exit 0 is then no failure. Any other exit still fails the run.
    #[serde(default)]
    pub may_finish: bool,
    /// The `[[group]]` whose node runs this process (required when groups are declared).
    pub group: Option<String>,
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

impl ManifestError {
    /// The manifest at `path` is refused for `reason`.
    fn invalid(path: &Path, reason: String) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            reason,
        }
    }
}

impl Manifest {
    /// Reads and checks a manifest file.
    pub fn read(path: &Path) -> Result<Self, ManifestError> {
        let invalid = |reason: String| ManifestError::invalid(path, reason);
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and checks a manifest's TOML text; `path` only names it in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let invalid = |reason: String| ManifestError::invalid(path, reason);
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
        if m.schema != 1 {
            return Err(invalid(format!(
                "schema {} is not known (this grpo-node reads schema 1)",
                m.schema
            )));
        }
        m.check_groups(path)?;
        m.check_secrets(path)?;
        Ok(m)
    }

    fn check_secrets(&self, path: &Path) -> Result<(), ManifestError> {
        let invalid = |reason: String| ManifestError::invalid(path, reason);
        for (name, source) in &self.secrets {
            let ok_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok_name {
                return Err(invalid(format!("secret name {name:?}: letters, digits, _ and - only")));
            }
            if !(source == "generate" || source.starts_with("file:") || source.starts_with("env:")) {
                return Err(invalid(format!(
                    "secret {name}: \"generate\", \"file:PATH\" or \"env:VAR\" (got {source:?})"
                )));
            }
        }
        let strings = self.process.iter().flat_map(Process::strings);
        for s in strings {
            for r in references(s) {
                if let Reference::Secret(n) = r {
                    if !self.secrets.contains_key(&n) {
                        return Err(invalid(format!("{{secret:{n}}} is used but not declared in [secrets]")));
                    }
                }
            }
        }
        Ok(())
    }

    fn check_groups(&self, path: &Path) -> Result<(), ManifestError> {
        let invalid = |reason: String| ManifestError::invalid(path, reason);
        let valid = |n: &str| {
            !n.is_empty()
                && n.len() <= 40
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if let Some(g) = self.group.iter().find(|g| !valid(&g.name)) {
            return Err(invalid(format!(
                "group name {:?}: lower-case letters, digits and -, at most 40",
                g.name
            )));
        }
        let mut names: Vec<&str> = self.group.iter().map(|g| g.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("group names must be unique".to_string()));
        }
        for p in &self.process {
            match (&p.group, self.group.is_empty()) {
                (Some(g), true) => {
                    return Err(invalid(format!(
                        "process {} names group {g}, but no [[group]] is declared",
                        p.name
                    )))
                }
                (None, false) => {
                    return Err(invalid(format!(
                        "process {}: with [[group]]s declared, each process names one",
                        p.name
                    )))
                }
                (Some(g), false) if !names.contains(&g.as_str()) => {
                    return Err(invalid(format!(
                        "process {} names group {g}, which is not declared",
                        p.name
                    )))
                }
                _ => {}
            }
        }
        if let Some(g) = self
            .group
            .iter()
            .find(|g| !self.process.iter().any(|p| p.group.as_deref() == Some(&g.name)))
        {
            return Err(invalid(format!("group {} has no process", g.name)));
        }
        let steps = self
            .setup
            .iter()
            .chain(&self.finally)
            .flat_map(|s| s.command.iter().map(String::as_str));
        let groups = self.group_names();
        for s in self.process.iter().flat_map(Process::strings).chain(steps) {
            for r in references(s) {
                if let Reference::Host(g) = r {
                    if !groups.contains(&g) {
                        return Err(invalid(format!(
                            "{{host:{g}}} names no group (groups: {})",
                            groups.join(", ")
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The groups in order of their first process (the default group alone when none is
    /// declared).
    pub fn group_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.process {
            let g = self.group_of(p).to_string();
            if !out.contains(&g) {
                out.push(g);
            }
        }
        out
    }

    /// The group whose node runs `p`.
    pub fn group_of<'a>(&self, p: &'a Process) -> &'a str {
        p.group.as_deref().unwrap_or(DEFAULT_GROUP)
    }

    /// A declared group's resources (the defaults for the default group).
    pub fn group_spec(&self, name: &str) -> Group {
        self.group.iter().find(|g| g.name == name).cloned().unwrap_or(Group {
            name: name.to_string(),
            cpus: 1,
            gpus: 0,
        })
    }

    /// Each `{port:NAME}` and the process that owns it: the first, in order, that uses it (its
    /// node picks the port; the later users learn it).
    pub fn port_owners(&self) -> BTreeMap<String, String> {
        let mut owners = BTreeMap::new();
        for p in &self.process {
            for s in p.strings() {
                for r in references(s) {
                    if let Reference::Port(name) = r {
                        owners.entry(name).or_insert_with(|| p.name.clone());
                    }
                }
            }
        }
        owners
    }
}

impl Process {
    /// Every string of the process that placeholders may appear in.
    pub fn strings(&self) -> impl Iterator<Item = &str> {
        let ready = match &self.ready {
            Some(Ready::Http(s) | Ready::Log(s)) => Some(s.as_str()),
            None => None,
        };
        self.command
            .iter()
            .map(String::as_str)
            .chain(self.env.values().map(String::as_str))
            .chain(ready)
    }
}

/// A `{port:NAME}` or `{host:GROUP}` a string refers to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reference {
    Port(String),
    Host(String),
    Secret(String),
}

/// The ports and hosts `s` refers to.
pub fn references(s: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else { break };
        let key = &rest[open + 1..open + close];
        if let Some(n) = key.strip_prefix("port:") {
            out.push(Reference::Port(n.to_string()));
        } else if let Some(g) = key.strip_prefix("host:") {
            out.push(Reference::Host(g.to_string()));
        } else if let Some(n) = key.strip_prefix("secret:") {
            out.push(Reference::Secret(n.to_string()));
        }
        rest = &rest[open + close + 1..];
    }
    out
}

/// Fills placeholders; ports are allocated on first use of each name.
pub struct Placeholders {
    pub run: PathBuf,
    pub python: String,
    pub grpo_node: String,
    pub repo: PathBuf,
    pub ports: BTreeMap<String, u16>,
    /// `{host:GROUP}` values known so far.
    pub hosts: BTreeMap<String, String>,
    /// Where a port allocated here must be free (this node's address).
    pub bind: std::net::IpAddr,
}

/// A placeholder that cannot be filled.
#[derive(Debug, thiserror::Error)]
pub enum PlaceholderError {
    #[error("unclosed placeholder in {0:?}")]
    Unclosed(String),
    #[error("{{host:{group}}} in {text:?}: no such group")]
    NoGroup { group: String, text: String },
    #[error("unknown placeholder {{{key}}} in {text:?}")]
    Unknown { key: String, text: String },
    #[error("no free port: {0}")]
    NoPort(#[source] std::io::Error),
}

impl Placeholders {
    /// Substitutes every placeholder in `s`.
    pub fn fill(&mut self, s: &str) -> Result<String, PlaceholderError> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| PlaceholderError::Unclosed(s.to_owned()))?
                + open;
            let key = &rest[open + 1..close];
            let value = match key {
                "run" => self.run.display().to_string(),
                "python" => self.python.clone(),
                "grpo_node" => self.grpo_node.clone(),
                "repo" => self.repo.display().to_string(),
                _ => match (key.strip_prefix("port:"), key.strip_prefix("host:")) {
                    (Some(name), _) => self.port(name)?.to_string(),
                    _ if key.starts_with("secret:") => self.run.join("secrets").join(&key[7..]).display().to_string(),
                    (_, Some(group)) => self
                        .hosts
                        .get(group)
                        .cloned()
                        .ok_or_else(|| PlaceholderError::NoGroup {
                            group: group.to_owned(),
                            text: s.to_owned(),
                        })?,
                    _ => {
                        return Err(PlaceholderError::Unknown {
                            key: key.to_owned(),
                            text: s.to_owned(),
                        })
                    }
                },
            };
            out.push_str(&value);
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// `{port:NAME}`: the port known for NAME, or a free one picked on `bind` now.
    pub fn port(&mut self, name: &str) -> Result<u16, PlaceholderError> {
        if let Some(p) = self.ports.get(name) {
            return Ok(*p);
        }
        let port = std::net::TcpListener::bind((self.bind, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(PlaceholderError::NoPort)?;
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
            hosts: BTreeMap::from([("head".to_string(), "10.0.0.1".to_string())]),
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        assert_eq!(p.fill("http://{host:head}:8").expect("host"), "http://10.0.0.1:8");
        assert!(p.fill("{host:other}").is_err());
        let a = p.fill("{python} {run}/x --port {port:api}").expect("fill");
        let b = p.fill("{port:api}").expect("fill");
        assert!(a.starts_with("py /r/x --port "));
        assert!(a.ends_with(&b));
        assert!(p.fill("{nope}").is_err());
    }

    #[test]
    fn groups_and_secrets_are_checked() {
        let base = r#"
[[process]]
name = "a"
main = true
command = ["x", "{host:head}", "{secret:tok}"]
"#;
        let read = |extra: &str, group: &str| {
            let text = format!(
                "name = \"t\"\n{extra}\n{}",
                base.replace("main = true", &format!("main = true\n{group}"))
            );
            Manifest::from_toml_str(&text, Path::new("t.toml"))
                .map(|m| m.group_names())
                .map_err(|e| e.to_string())
        };
        let ok = "[secrets]\ntok = \"generate\"\n[[group]]\nname = \"head\"";
        assert_eq!(read(ok, "group = \"head\"").expect("valid"), vec!["head".to_string()]);
        assert!(read(ok, "").unwrap_err().contains("each process names one"));
        assert!(read(ok, "group = \"gpu\"").unwrap_err().contains("not declared"));
        assert!(read("[secrets]\ntok = \"generate\"", "group = \"head\"")
            .unwrap_err()
            .contains("no [[group]]"));
        assert!(read("[[group]]\nname = \"head\"", "group = \"head\"")
            .unwrap_err()
            .contains("{secret:tok}"));
        assert!(read(
            "[secrets]\ntok = \"plain\"\n[[group]]\nname = \"head\"",
            "group = \"head\""
        )
        .unwrap_err()
        .contains("generate"));
        assert!(read("schema = 2", "").unwrap_err().contains("schema 2"));
        let owners = Manifest::from_toml_str(
            "name = \"t\"\n[[process]]\nname = \"a\"\ncommand = [\"{port:x}\"]\n[[process]]\nname = \"b\"\nmain = true\ncommand = [\"{port:x}\", \"{port:y}\"]\n",
            Path::new("t.toml"),
        )
        .expect("ports")
        .port_owners();
        assert_eq!(owners.get("x").map(String::as_str), Some("a"));
        assert_eq!(owners.get("y").map(String::as_str), Some("b"));
    }
}
