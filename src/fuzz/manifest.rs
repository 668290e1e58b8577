//! Target `manifest`: a cluster manifest of `grpo-node launch`, read by
//! [`Manifest::from_toml_str`] (what `Manifest::read` does with the file's text). A manifest
//! that passes must suit the runner: every command filled with [`Placeholders::fill`] (as the
//! runner fills it) has a program to start (`argv[0]`), and every readiness deadline can be
//! added to `Instant::now()`. `{port:NAME}` placeholders are given fixed ports before each fill,
//! so filling never binds a socket.
//!
//! Inputs: byte-mutated copies of the real `cluster/*.toml`, and structure-aware manifests
//! with hostile values (empty commands, duplicate names, bad placeholders, edge numbers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arbitrary::{Result as ArbResult, Unstructured};

use crate::launch::manifest::{ManifestError, Placeholders, Ready};
use crate::launch::Manifest;

use super::hostile::{int, int_text, mutate, rare, string, toml_str, toml_value, TOML_DICTIONARY};
use super::{ensure, FuzzTarget, Verdict, Violation};

/// The `manifest` target.
pub struct ManifestTarget;

/// The real manifests.
pub const SEEDS: &[&str] = &[
    include_str!("../../cluster/local.toml"),
    include_str!("../../cluster/local-dp.toml"),
    include_str!("../../cluster/local-vllm.toml"),
    include_str!("../../cluster/local-gpu.toml"),
    include_str!("../../cluster/local-gpu-vllm.toml"),
    include_str!("../../cluster/local-2gpu.toml"),
    include_str!("../../cluster/two-node.toml"),
];

/// Reads a manifest's text as `grpo-node launch` does.
pub fn read(text: &str) -> Result<Manifest, ManifestError> {
    Manifest::from_toml_str(text, Path::new("fuzz.toml"))
}

/// Placeholders as the runner makes them (no ports yet: see [`fill`]).
fn placeholders() -> Placeholders {
    Placeholders {
        run: PathBuf::from("/runs/fuzz-1"),
        python: "python3".into(),
        grpo_node: "grpo-node".into(),
        repo: PathBuf::from("/repo"),
        ports: BTreeMap::new(),
        hosts: BTreeMap::new(),
        bind: std::net::Ipv4Addr::LOCALHOST.into(),
    }
}

/// [`Placeholders::fill`], after giving each `{port:NAME}` of `s` a fixed port.
fn fill(p: &mut Placeholders, s: &str) -> Result<String, crate::launch::manifest::PlaceholderError> {
    for piece in s.split("{port:").skip(1) {
        if let Some(name) = piece.split('}').next() {
            let next = 20_000 + (p.ports.len() % 1000) as u16;
            p.ports.entry(name.to_string()).or_insert(next);
        }
    }
    p.fill(s)
}

impl FuzzTarget for ManifestTarget {
    fn name(&self) -> &'static str {
        "manifest"
    }

    fn case(&mut self, data: &[u8]) -> Result<Verdict, Violation> {
        let Ok(text) = build(&mut Unstructured::new(data)) else {
            return Ok(Verdict::Rejected("no input"));
        };
        match read(&text) {
            Err(_) => Ok(Verdict::Rejected("manifest")),
            Ok(m) => check_runnable(&m, &mut placeholders()).map(|()| Verdict::Accepted),
        }
    }

    fn render(&self, data: &[u8]) -> String {
        match build(&mut Unstructured::new(data)) {
            Ok(text) => text,
            Err(e) => format!("(no input: {e})"),
        }
    }
}

/// What the runner relies on in a manifest that was read without error.
fn check_runnable(m: &Manifest, p: &mut Placeholders) -> Result<(), Violation> {
    let steps = m.setup.iter().chain(&m.finally).map(|s| (&s.name, &s.command));
    let procs = m.process.iter().map(|s| (&s.name, &s.command));
    for (name, command) in steps.chain(procs) {
        let argv: Result<Vec<String>, _> = command.iter().map(|a| fill(p, a)).collect();
        if let Ok(argv) = argv {
            ensure(
                !argv.is_empty(),
                "every command has a program (the runner starts argv[0])",
                || format!("{name:?} has an empty command"),
            )?;
        }
    }
    for proc in &m.process {
        for v in proc.env.values() {
            let _ = fill(p, v);
        }
        if let Some(Ready::Http(s) | Ready::Log(s)) = &proc.ready {
            let _ = fill(p, s);
        }
        let deadline = Instant::now().checked_add(Duration::from_secs(proc.ready_timeout_s));
        ensure(
            deadline.is_some(),
            "ready_timeout_s can be added to Instant::now()",
            || format!("{:?}: ready_timeout_s = {}", proc.name, proc.ready_timeout_s),
        )?;
    }
    if let Some(metrics) = &m.metrics {
        let _ = fill(p, metrics);
    }
    Ok(())
}

/// A manifest's text from bytes.
pub fn build(u: &mut Unstructured) -> ArbResult<String> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 | 1 => {
            let seed = *u.choose(SEEDS)?;
            String::from_utf8_lossy(&mutate(u, seed.as_bytes(), TOML_DICTIONARY)?).into_owned()
        }
        2 => {
            let seed = manifest(u, false)?;
            String::from_utf8_lossy(&mutate(u, seed.as_bytes(), TOML_DICTIONARY)?).into_owned()
        }
        _ => manifest(u, true)?,
    })
}

/// Arguments, mostly placeholders and flags.
fn arg(u: &mut Unstructured, hostile: bool) -> ArbResult<String> {
    const ARGS: &[&str] = &[
        "{python}",
        "{grpo_node}",
        "{repo}/python/envs/copy_env.py",
        "{run}/model",
        "--port",
        "{port:api}",
        "127.0.0.1:{port:engine}",
        "--role",
        "learner",
    ];
    const BAD: &[&str] = &["{", "}", "{nope}", "{port:}", "{port:a", "{{run}}", "{run", ""];
    if hostile && rare(u, 6)? {
        if u.arbitrary()? {
            return Ok((*u.choose(BAD)?).to_string());
        }
        return string(u);
    }
    Ok((*u.choose(ARGS)?).to_string())
}

fn command(u: &mut Unstructured, out: &mut String, hostile: bool) -> ArbResult<()> {
    let low = if hostile && rare(u, 8)? { 0 } else { 1 };
    out.push_str("command = [");
    for i in 0..u.int_in_range(low..=5u8)? {
        if i > 0 {
            out.push_str(", ");
        }
        toml_str(out, &arg(u, hostile)?);
    }
    out.push_str("]\n");
    Ok(())
}

fn name(u: &mut Unstructured, out: &mut String, hostile: bool) -> ArbResult<()> {
    out.push_str("name = ");
    if hostile && rare(u, 6)? {
        toml_str(out, &string(u)?);
    } else {
        toml_str(
            out,
            u.choose(&["run-api", "sidecar", "learner", "env", "make-model", "plot"])?,
        );
    }
    out.push('\n');
    Ok(())
}

fn steps(u: &mut Unstructured, out: &mut String, table: &str, hostile: bool) -> ArbResult<()> {
    for _ in 0..u.int_in_range(0..=2u8)? {
        out.push_str(&format!("\n[[{table}]]\n"));
        name(u, out, hostile)?;
        command(u, out, hostile)?;
    }
    Ok(())
}

fn process(u: &mut Unstructured, out: &mut String, main: bool, hostile: bool) -> ArbResult<()> {
    out.push_str("\n[[process]]\n");
    name(u, out, hostile)?;
    command(u, out, hostile)?;
    if main {
        out.push_str("main = true\n");
    }
    if rare(u, 2)? {
        let kind = if hostile && rare(u, 10)? {
            "exec"
        } else {
            *u.choose(&["http", "log"])?
        };
        out.push_str(&format!("ready = {{ {kind} = "));
        toml_str(out, &arg(u, hostile)?);
        out.push_str(" }\n");
    }
    if rare(u, 3)? {
        out.push_str("ready_timeout_s = ");
        let t = if hostile {
            int_text(u)?
        } else {
            u.int_in_range(1..=600u16)?.to_string()
        };
        out.push_str(&format!("{t}\n"));
    }
    if rare(u, 4)? {
        out.push_str("gpus = [");
        for i in 0..u.int_in_range(0..=3u8)? {
            out.push_str(if i > 0 { ", " } else { "" });
            out.push_str(
                &if hostile {
                    int(u)?
                } else {
                    i64::from(u.int_in_range(0..=7u8)?)
                }
                .to_string(),
            );
        }
        out.push_str("]\n");
    }
    if rare(u, 4)? {
        out.push_str("env = { GRPO_X = ");
        toml_str(out, &arg(u, hostile)?);
        out.push_str(" }\n");
    }
    if hostile && rare(u, 12)? {
        out.push_str(u.choose(&["retries = 3\n", "main = false\n", "env = 1\n", "ready = \"http\"\n"])?);
        if rare(u, 3)? {
            out.push_str("extra = ");
            toml_value(u, out, 2)?;
            out.push('\n');
        }
    }
    Ok(())
}

/// A manifest: top-level keys, setup steps, processes (one main, mostly), finally steps.
fn manifest(u: &mut Unstructured, hostile: bool) -> ArbResult<String> {
    let mut out = String::new();
    if !hostile || !rare(u, 20)? {
        name(u, &mut out, hostile)?;
    }
    if rare(u, 3)? {
        out.push_str("metrics = \"{run}/checkpoints/metrics.jsonl\"\n");
    }
    if rare(u, 3)? {
        let steps = if hostile {
            int_text(u)?
        } else {
            u.int_in_range(1..=200u8)?.to_string()
        };
        out.push_str(&format!("steps = {steps}\n"));
    }
    if hostile && rare(u, 10)? {
        out.push_str("runs_dir = ");
        toml_str(&mut out, &string(u)?);
        out.push('\n');
    }
    steps(u, &mut out, "setup", hostile)?;
    let n = u.int_in_range(if hostile { 0 } else { 1 }..=4usize)?;
    let main = u.int_in_range(0..=n.max(1) - 1)?;
    for i in 0..n {
        let is_main = if hostile && rare(u, 10)? {
            u.arbitrary()?
        } else {
            i == main
        };
        process(u, &mut out, is_main, hostile)?;
    }
    steps(u, &mut out, "finally", hostile)?;
    Ok(out)
}
