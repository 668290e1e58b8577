//! How the groups of one run, each on its own node, learn what the others decided: small files
//! under `{run}/launch/` on the run directory every node shares (a cluster's shared
//! filesystem). Each is written once, atomically (a temporary name, then a rename), and read
//! by waiting for it with a deadline.
//!
//! - `hosts/GROUP`: the address of GROUP's node;
//! - `ports/NAME`: the port its owner picked for `{port:NAME}`;
//! - `ready/PROCESS`: PROCESS passed its readiness check;
//! - `setup`: the setup steps ran;
//! - `end`: how the run ended ([`End`]), written by the group that saw it end first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors of the rendezvous.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waited {seconds} s for {what} ({path}); the group that provides it did not get there")]
    Timeout { what: String, path: PathBuf, seconds: u64 },
    #[error("the run ended while waiting for {what}: {end}")]
    Ended { what: String, end: End },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// The main process's exit code, or non-zero when another process failed.
    pub code: i32,
    /// Who ended it and why, for the operator.
    pub reason: String,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (exit {})", self.reason, self.code)
    }
}

/// One run's rendezvous directory.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    dir: PathBuf,
}

impl Rendezvous {
    /// The rendezvous of the run in `run`.
    pub fn of(run: &Path) -> Self {
        Self {
            dir: run.join("launch"),
        }
    }

    /// Writes `key` (e.g. `hosts/head`) atomically; an existing value is kept (first wins).
    pub fn put(&self, key: &str, value: &str) -> Result<bool, RendezvousError> {
        let path = self.dir.join(key);
        let err = |source| RendezvousError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        // Unique across nodes (pids repeat there): the host's name, the pid, the time.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let tmp = path.with_extension(format!("tmp.{}.{}.{nanos}", host.trim(), std::process::id()));
        std::fs::write(&tmp, value).map_err(err)?;
        // A hard link fails if the name exists: the first writer wins, atomically.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// `key`'s value, if written.
    pub fn get(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(key)).ok()
    }

    /// Waits for `key` until `limit` has passed or the run ended.
    pub async fn wait(&self, key: &str, what: &str, limit: Duration) -> Result<String, RendezvousError> {
        let deadline = Instant::now() + limit;
        let mut delay = Duration::from_millis(20);
        loop {
            if let Some(v) = self.get(key) {
                return Ok(v);
            }
            if let Some(end) = self.end() {
                return Err(RendezvousError::Ended {
                    what: what.to_string(),
                    end,
                });
            }
            if Instant::now() > deadline {
                return Err(RendezvousError::Timeout {
                    what: what.to_string(),
                    path: self.dir.join(key),
                    seconds: limit.as_secs(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// Records how the run ended; returns false when another group recorded it first.
    pub fn put_end(&self, end: &End) -> Result<bool, RendezvousError> {
        let text = serde_json::to_string(end).unwrap_or_else(|_| format!("{{\"code\":{},\"reason\":\"\"}}", end.code));
        self.put("end", &text)
    }

    /// How the run ended, once it has.
    pub fn end(&self) -> Option<End> {
        self.get("end").and_then(|t| serde_json::from_str(&t).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_writer_wins_and_waits_see_values_and_the_end() {
        let dir = tempfile::tempdir().expect("dir");
        let rz = Rendezvous::of(dir.path());
        assert!(rz.put("ports/api", "8000").expect("put"));
        assert!(!rz.put("ports/api", "9000").expect("second put"));
        assert_eq!(rz.get("ports/api").as_deref(), Some("8000"));
        let got = rz.wait("ports/api", "api", Duration::from_secs(1)).await.expect("wait");
        assert_eq!(got, "8000");
        let late = rz.wait("hosts/x", "x", Duration::from_millis(100)).await;
        assert!(matches!(late, Err(RendezvousError::Timeout { .. })), "{late:?}");
        let end = End {
            code: 3,
            reason: "sidecar exited".into(),
        };
        assert!(rz.put_end(&end).expect("end"));
        assert_eq!(rz.end(), Some(end));
        let ended = rz.wait("hosts/x", "x", Duration::from_secs(30)).await;
        assert!(matches!(ended, Err(RendezvousError::Ended { .. })), "{ended:?}");
    }
}
