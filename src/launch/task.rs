//! `grpo-node launch-task`: inside a cluster job, runs one group's processes on this node.
//!
//! Every group of a run has one task, each on its own node. The tasks meet through the run
//! directory ([`super::rendezvous`]): each publishes its node's address (Slurm's own view, the
//! node's NodeAddr), the ports its processes own, and each process once it is ready. A process
//! starts only after every process before it in the manifest is ready, whatever its node. Every
//! wait has a deadline, far below NCCL's 30 minutes. The first task to see the run end (its
//! main process exited, or one of its processes died) records it, and exits with a failing code
//! when the run failed, which ends the whole job (`srun --kill-on-bad-exit`); the other tasks
//! stop their processes when they see the end.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::manifest::{references, Manifest, Placeholders, Process, Reference};
use super::rendezvous::{End, Rendezvous, RendezvousError};
use super::runner::{io, placeholders, ready, record_pids_in, run_step, spawn, teardown, LaunchError, Running};
use crate::config::addr::{interface_of, MULTI_NODE_ENV};

/// The longest wait for another group's host, port or readiness beyond that process's own
/// `ready_timeout_s`.
const RENDEZVOUS_SLACK: Duration = Duration::from_secs(120);

/// What a task runs.
#[derive(Debug, Clone)]
pub struct Task {
    /// The manifest (the copy in the run directory).
    pub manifest: PathBuf,
    /// The run directory every node shares.
    pub run: PathBuf,
    /// The repository the manifest came from (`{repo}`).
    pub repo: PathBuf,
    /// This task's group.
    pub group: String,
    /// This node's address; none = ask Slurm (NodeAddr of `$SLURMD_NODENAME`).
    pub address: Option<IpAddr>,
    /// Ports fixed in advance (Kubernetes: its Services and probes name them); the others
    /// are picked free by their owners.
    pub ports: BTreeMap<String, u16>,
}

/// Parses `name=port,name=port` (the `--ports` flag).
pub fn parse_ports(s: &str) -> Result<BTreeMap<String, u16>, LaunchError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').ok_or_else(|| LaunchError::PortsEntry(p.to_owned()))?;
            let port = v.parse().map_err(|_| LaunchError::PortsValue(v.to_owned()))?;
            Ok((n.to_string(), port))
        })
        .collect()
}

impl From<RendezvousError> for LaunchError {
    fn from(e: RendezvousError) -> Self {
        match e {
            RendezvousError::Ended { end, .. } => LaunchError::Ended(end),
            e => LaunchError::Rendezvous(e.to_string()),
        }
    }
}

/// Runs the task's group until the run ends; returns the exit code the task should have.
pub async fn run_task(task: &Task, shutdown: impl std::future::Future<Output = ()>) -> Result<i32, LaunchError> {
    let m = Manifest::read(&task.manifest)?;
    let groups = m.group_names();
    if !groups.contains(&task.group) {
        return Err(LaunchError::UnknownGroup {
            group: task.group.clone(),
            manifest: task.manifest.clone(),
            groups,
        });
    }
    let addr = match task.address {
        Some(a) => a,
        None => slurm_node_address().await?,
    };
    // Slurm's launcher made it; on Kubernetes the first task to start does.
    let logs = task.run.join("logs");
    std::fs::create_dir_all(&logs).map_err(io(format!("creating {}", logs.display())))?;
    let rz = Rendezvous::of(&task.run);
    rz.put(&format!("hosts/{}", task.group), &addr.to_string())?;
    tracing::info!(group = %task.group, address = %addr, "task started");
    let mut p = placeholders(&task.run, task.repo.clone(), addr);
    p.ports.extend(task.ports.clone());
    let env = node_env(addr, groups.len() > 1);
    let mut running: Vec<Running> = Vec::new();
    tokio::pin!(shutdown);
    p.hosts.insert(task.group.clone(), addr.to_string());
    let result = tokio::select! {
        r = run_group(&m, task, &rz, &mut p, &env, &mut running, &groups[0]) => r,
        _ = &mut shutdown => {
            let _ = rz.put_end(&End { code: 130, reason: format!("group {} was interrupted", task.group) });
            Ok(130)
        }
    };
    // The run ended elsewhere while this group waited for something: not this group's failure.
    let result = match result {
        Err(LaunchError::Ended(end)) => Ok(ended(task, &end)),
        Err(e) => {
            let _ = rz.put_end(&End {
                code: 1,
                reason: format!("group {}: {e}", task.group),
            });
            Err(e)
        }
        ok => ok,
    };
    teardown(&mut running).await;
    result
}

/// The environment every process of this node gets: the multi-node flag, and NCCL's and
/// gloo's interface hints from the address the node was given.
fn node_env(addr: IpAddr, multi: bool) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if multi {
        env.insert(MULTI_NODE_ENV.to_string(), "1".to_string());
    }
    if let Some(ifname) = interface_of(addr) {
        env.insert("NCCL_SOCKET_IFNAME".into(), ifname.clone());
        env.insert("GLOO_SOCKET_IFNAME".into(), ifname);
    }
    env
}

async fn run_group(
    m: &Manifest,
    task: &Task,
    rz: &Rendezvous,
    p: &mut Placeholders,
    env: &BTreeMap<String, String>,
    running: &mut Vec<Running>,
    first_group: &str,
) -> Result<i32, LaunchError> {
    if task.group == first_group {
        for step in &m.setup {
            run_step(step, &task.run, p).await?;
        }
        rz.put("setup", "ok")?;
    } else {
        rz.wait("setup", "the setup steps", setup_wait(m)).await?;
    }
    let owners = m.port_owners();
    for (i, proc) in m.process.iter().enumerate() {
        if m.group_of(proc) != task.group {
            continue;
        }
        for earlier in m.process[..i].iter().filter(|e| m.group_of(e) != task.group) {
            let what = format!("{} (group {}) to be ready", earlier.name, m.group_of(earlier));
            let limit = Duration::from_secs(earlier.ready_timeout_s) + RENDEZVOUS_SLACK;
            rz.wait(&format!("ready/{}", earlier.name), &what, limit).await?;
        }
        resolve(proc, &owners, rz, p).await?;
        running.push(spawn(proc, &task.run, p, env)?);
        record_pids_in(&task.run.join(format!("processes-{}.json", task.group)), running);
        if let Some(last) = running.last_mut() {
            tokio::select! {
                r = ready(proc, last, p) => r?,
                end = end_within(rz, Duration::MAX) => {
                    if let Some(end) = end {
                        return Err(LaunchError::Ended(end));
                    }
                }
            }
        }
        rz.put(&format!("ready/{}", proc.name), "ok")?;
    }
    watch(m, task, rz, p, running).await
}

/// The setup steps' allowance: generous (they may build a model), still bounded.
fn setup_wait(m: &Manifest) -> Duration {
    let ready: u64 = m.process.iter().map(|p| p.ready_timeout_s).max().unwrap_or(120);
    Duration::from_secs(ready.max(600))
}

/// Makes every `{host:G}` and `{port:N}` of `proc` known: ports it owns are picked free on this
/// node and published, the others are read from their owners' nodes.
async fn resolve(
    proc: &Process,
    owners: &BTreeMap<String, String>,
    rz: &Rendezvous,
    p: &mut Placeholders,
) -> Result<(), LaunchError> {
    let limit = Duration::from_secs(proc.ready_timeout_s) + RENDEZVOUS_SLACK;
    let refs: Vec<Reference> = proc.strings().flat_map(references).collect();
    for r in refs {
        match r {
            Reference::Host(g) if !p.hosts.contains_key(&g) => {
                let v = rz
                    .wait(&format!("hosts/{g}"), &format!("group {g}'s address"), limit)
                    .await?;
                p.hosts.insert(g, v.trim().to_string());
            }
            Reference::Port(n) if !p.ports.contains_key(&n) => {
                if owners.get(&n) == Some(&proc.name) {
                    let port = p.port(&n).map_err(LaunchError::Placeholder)?;
                    rz.put(&format!("ports/{n}"), &port.to_string())?;
                } else {
                    let v = rz.wait(&format!("ports/{n}"), &format!("port {n}"), limit).await?;
                    let port = v
                        .trim()
                        .parse()
                        .map_err(|_| LaunchError::Rendezvous(format!("port {n}: {v:?} is not a port")))?;
                    p.ports.insert(n, port);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Watches this group's processes and the run's end; returns the task's exit code.
async fn watch(
    m: &Manifest,
    task: &Task,
    rz: &Rendezvous,
    p: &mut Placeholders,
    running: &mut [Running],
) -> Result<i32, LaunchError> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        // The end first: once the main ended, processes elsewhere may stop on their own.
        if let Some(end) = rz.end() {
            return Ok(ended(task, &end));
        }
        for r in running.iter_mut() {
            let Ok(Some(status)) = r.child.try_wait() else { continue };
            let code = exit_code(status);
            if r.finished_its_part(code) {
                continue;
            }
            if r.main {
                let reason = format!("{} (group {}) exited with {code}", r.name, task.group);
                rz.put_end(&End { code, reason })?;
                if code == 0 {
                    for step in &m.finally {
                        if let Err(e) = run_step(step, &task.run, p).await {
                            tracing::warn!(error = %e, "report step failed");
                        }
                    }
                }
                return Ok(code);
            }
            // A process that stopped because the run ended (seen late on a shared filesystem)
            // is no failure: give the end a moment to appear.
            if let Some(end) = end_within(rz, END_GRACE).await {
                return Ok(ended(task, &end));
            }
            let died = LaunchError::Died {
                name: format!("{} (group {})", r.name, task.group),
                code,
                log: r.log.display().to_string(),
            };
            rz.put_end(&End {
                code: 1,
                reason: died.to_string(),
            })?;
            return Err(died);
        }
    }
}

/// How long a task waits for the run's end to show before it counts a stopped process as dead.
const END_GRACE: Duration = Duration::from_secs(3);

/// The run's end, if it appears within `limit`.
async fn end_within(rz: &Rendezvous, limit: Duration) -> Option<End> {
    // No deadline when it would overflow (a wait for as long as another future runs).
    let deadline = std::time::Instant::now().checked_add(limit);
    loop {
        if let Some(end) = rz.end() {
            return Some(end);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This task's exit code once the run ended elsewhere: 0 for a run that succeeded.
fn ended(task: &Task, end: &End) -> i32 {
    tracing::info!(group = %task.group, end = %end, "the run ended; stopping this group");
    if end.code == 0 {
        0
    } else {
        1
    }
}

/// A child's exit code, 128 + the signal when a signal ended it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1)
}

/// This node's address as Slurm knows it: NodeAddr of `$SLURMD_NODENAME` (`scontrol show
/// node`), resolved if it is a name. Never the output of `hostname`.
async fn slurm_node_address() -> Result<IpAddr, LaunchError> {
    let node = std::env::var("SLURMD_NODENAME").map_err(|_| LaunchError::NotInSlurm)?;
    let out = tokio::process::Command::new("scontrol")
        .args(["show", "node", &node])
        .output()
        .await
        .map_err(io("running scontrol show node"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = node_addr_of(&text).ok_or_else(|| LaunchError::NoNodeAddr {
        node: node.clone(),
        text: text.to_string(),
    })?;
    resolve_host(&addr).await
}

/// The `NodeAddr=` field of `scontrol show node` output.
pub fn node_addr_of(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|f| f.strip_prefix("NodeAddr="))
        .map(str::to_string)
}

async fn resolve_host(host: &str) -> Result<IpAddr, LaunchError> {
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    let mut addrs = tokio::net::lookup_host((host, 0))
        .await
        .map_err(io(format!("resolving NodeAddr {host}")))?;
    addrs
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| LaunchError::Unresolved(host.to_owned()))
}

/// Where a task's run directory and manifest copy are, given the run.
pub fn manifest_copy(run: &Path) -> PathBuf {
    run.join("manifest.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addr_is_read_from_scontrol() {
        let text = "NodeName=n2 Arch=x86_64 CoresPerSocket=1\n   NodeAddr=10.77.0.12 NodeHostName=n2 Version=22.05.8\n";
        assert_eq!(node_addr_of(text).as_deref(), Some("10.77.0.12"));
        assert_eq!(node_addr_of("NodeName=n2"), None);
    }

    #[test]
    fn fixed_ports_parse() {
        let p = parse_ports("api=8000,engine=8001").expect("ports");
        assert_eq!(p.get("engine"), Some(&8001));
        assert!(parse_ports("api").is_err());
        assert!(parse_ports("api=99999").is_err());
        assert!(parse_ports("").expect("none").is_empty());
    }
}
