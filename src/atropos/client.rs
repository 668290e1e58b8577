//! HTTP client for the Atropos API: registration with the wedge check, and `/batch` polling.

use std::time::Duration;

use reqwest::header::{ACCEPT_ENCODING, CONTENT_TYPE};
use serde_json::Value;

use super::types::{Info, Registration, TrainerUuid};

/// Errors talking to the API. `Unreachable` and `Timeout` are transient; the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum AtroposError {
    #[error("Atropos API at {url} is unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Atropos API {endpoint} answered HTTP {status}: {body}")]
    Http {
        endpoint: &'static str,
        status: u16,
        body: String,
    },
    #[error("Atropos API {endpoint} sent an unexpected body: {reason}")]
    Protocol { endpoint: &'static str, reason: String },
    #[error(
        "the Atropos API at {url} did not take our registration: /info reports batch_size={got_batch}, \
         max_token_len={got_len}, expected {want_batch} and {want_len}. This is the API's wedge: an \
         environment posted /scored_data before any trainer registered, so /register was ignored \
         (or another trainer registered other values). Restart run-api, or rerun with --reset-api to \
         call /reset_data and register again (that drops queued data; environments must re-register)."
    )]
    Wedged {
        url: String,
        got_batch: i64,
        got_len: i64,
        want_batch: u64,
        want_len: u64,
    },
}

impl AtroposError {
    /// Whether waiting and retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. }) || matches!(self, Self::Http { status, .. } if *status >= 500)
    }
}

/// One answer of `GET /batch`.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchPoll {
    /// A batch: the raw group objects, parsed one by one later so one bad group cannot sink the rest.
    Batch(Vec<Value>),
    /// Nothing ready yet.
    Empty,
    /// The API has no registration (it restarted, or was reset).
    NotRegistered,
}

/// A client bound to one API base URL.
#[derive(Debug, Clone)]
pub struct AtroposClient {
    http: reqwest::Client,
    base: String,
}

impl AtroposClient {
    /// A client with a per-request timeout.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, AtroposError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|source| AtroposError::Unreachable {
                url: base.to_string(),
                source,
            })?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    /// The API base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get_json(&self, endpoint: &'static str) -> Result<Value, AtroposError> {
        let url = format!("{}{endpoint}", self.base);
        let resp = self
            .http
            .get(&url)
            .header(ACCEPT_ENCODING, "gzip")
            .send()
            .await
            .map_err(|source| AtroposError::Unreachable {
                url: url.clone(),
                source,
            })?;
        Self::read_json(endpoint, &url, resp).await
    }

    async fn read_json(endpoint: &'static str, url: &str, resp: reqwest::Response) -> Result<Value, AtroposError> {
        let status = resp.status();
        let body = resp.bytes().await.map_err(|source| AtroposError::Unreachable {
            url: url.to_string(),
            source,
        })?;
        if !status.is_success() {
            return Err(AtroposError::Http {
                endpoint,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(500).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| AtroposError::Protocol {
            endpoint,
            reason: e.to_string(),
        })
    }

    /// `GET /info`.
    pub async fn info(&self) -> Result<Info, AtroposError> {
        let v = self.get_json("/info").await?;
        serde_json::from_value(v).map_err(|e| AtroposError::Protocol {
            endpoint: "/info",
            reason: e.to_string(),
        })
    }

    /// `POST /register`; returns the trainer uuid (a u128).
    pub async fn register(&self, reg: &Registration) -> Result<TrainerUuid, AtroposError> {
        let url = format!("{}/register", self.base);
        let body = serde_json::to_vec(reg).map_err(|e| AtroposError::Protocol {
            endpoint: "/register",
            reason: e.to_string(),
        })?;
        let resp = self
            .http
            .post(&url)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|source| AtroposError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|source| AtroposError::Unreachable {
            url: url.clone(),
            source,
        })?;
        if !status.is_success() {
            return Err(AtroposError::Http {
                endpoint: "/register",
                status: status.as_u16(),
                body: text,
            });
        }
        parse_uuid(&text).ok_or_else(|| AtroposError::Protocol {
            endpoint: "/register",
            reason: format!("no integer uuid in {text}"),
        })
    }

    /// `GET /reset_data`: drops all queued data and registrations on the server.
    pub async fn reset_data(&self) -> Result<(), AtroposError> {
        let url = format!("{}/reset_data", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| AtroposError::Unreachable {
                url: url.clone(),
                source,
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(AtroposError::Http {
                endpoint: "/reset_data",
                status: resp.status().as_u16(),
                body: String::new(),
            })
        }
    }

    /// Registers and checks with `/info` that the server took it. On a mismatch (the wedge),
    /// `reset` decides between an error that explains the fix and `/reset_data` + a second try.
    pub async fn register_checked(&self, reg: &Registration, reset: bool) -> Result<TrainerUuid, AtroposError> {
        let uuid = self.register(reg).await?;
        let info = self.info().await?;
        if matches_registration(&info, reg) {
            return Ok(uuid);
        }
        if reset {
            tracing::warn!(url = %self.base, batch_size = info.batch_size, max_token_len = info.max_token_len,
                "API did not take the registration; --reset-api: calling /reset_data and registering again");
            self.reset_data().await?;
            let uuid = self.register(reg).await?;
            let info = self.info().await?;
            if matches_registration(&info, reg) {
                return Ok(uuid);
            }
            return Err(self.wedged(&info, reg));
        }
        Err(self.wedged(&info, reg))
    }

    /// Waits for the API and registers, retrying transient failures with capped backoff. The
    /// API may die between `/register` and the `/info` check (a restart): that is retried too,
    /// so only an answer that cannot change by waiting (the wedge, a malformed reply) is an error.
    pub async fn register_when_up(&self, reg: &Registration, reset: bool) -> Result<TrainerUuid, AtroposError> {
        let mut delay = Duration::from_millis(100);
        let mut tries = 0u64;
        loop {
            match self.register_checked(reg, reset).await {
                Ok(uuid) => return Ok(uuid),
                Err(e) if e.is_transient() => {
                    tries += 1;
                    if tries == 1 || tries.is_multiple_of(10) {
                        tracing::info!(url = %self.base, tries, error = %e, "waiting for the Atropos API");
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    fn wedged(&self, info: &Info, reg: &Registration) -> AtroposError {
        AtroposError::Wedged {
            url: self.base.clone(),
            got_batch: info.batch_size,
            got_len: info.max_token_len,
            want_batch: reg.batch_size,
            want_len: reg.max_token_len,
        }
    }

    /// `GET /batch`, mapping the three answer shapes.
    pub async fn poll_batch(&self) -> Result<BatchPoll, AtroposError> {
        batch_reply(self.get_json("/batch").await?)
    }
}

/// What a `GET /batch` reply means: a batch, none yet, or the API having lost our registration.
pub fn batch_reply(v: Value) -> Result<BatchPoll, AtroposError> {
    if v.get("status").and_then(Value::as_str) == Some("error") {
        let msg = v.get("message").and_then(Value::as_str).unwrap_or_default();
        if msg.contains("not registered") {
            return Ok(BatchPoll::NotRegistered);
        }
        return Err(AtroposError::Protocol {
            endpoint: "/batch",
            reason: format!("error: {msg}"),
        });
    }
    match v.get("batch") {
        Some(Value::Null) => Ok(BatchPoll::Empty),
        Some(Value::Array(groups)) => Ok(BatchPoll::Batch(groups.clone())),
        _ => Err(AtroposError::Protocol {
            endpoint: "/batch",
            reason: format!("no batch field in {v}"),
        }),
    }
}

fn matches_registration(info: &Info, reg: &Registration) -> bool {
    info.batch_size == reg.batch_size as i64 && info.max_token_len == reg.max_token_len as i64
}

/// The uuid as the server sends it: a JSON integer of up to 128 bits, read from the raw text
/// because serde_json would round it through f64.
fn parse_uuid(body: &str) -> Option<TrainerUuid> {
    let v: Value = serde_json::from_str(body).ok()?;
    v.get("uuid").filter(|n| n.is_number())?;
    let after = &body[body.find("\"uuid\"")? + 6..];
    let digits: String = after
        .trim_start_matches(|c: char| c.is_whitespace() || c == ':')
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok().map(TrainerUuid)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Test double for an API that dies between `/register` and `/info` (a fault the real
    /// run-api shows only by timing): it drops the first `/info` connection unanswered, then
    /// answers like a registered run-api.
    async fn api_dying_after_register(listener: tokio::net::TcpListener, registers: Arc<AtomicUsize>) {
        let mut infos = 0;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = if head.starts_with("POST /register") {
                registers.fetch_add(1, Ordering::SeqCst);
                r#"{"uuid": 7}"#.to_string()
            } else if head.starts_with("GET /info") {
                infos += 1;
                if infos == 1 {
                    continue; // dropped: the connection closes with no answer
                }
                r#"{"batch_size": 4, "max_token_len": 64}"#.to_string()
            } else {
                continue;
            };
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
        }
    }

    #[tokio::test]
    async fn registration_survives_an_api_that_dies_before_the_check() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let registers = Arc::new(AtomicUsize::new(0));
        tokio::spawn(api_dying_after_register(listener, registers.clone()));
        let client = AtroposClient::new(&url, Duration::from_secs(5)).expect("client");
        let reg = Registration {
            wandb_group: String::new(),
            wandb_project: String::new(),
            batch_size: 4,
            max_token_len: 64,
            checkpoint_dir: String::new(),
            save_checkpoint_interval: 1,
            starting_step: 0,
            num_steps: 1,
        };
        // One failed check is an error for the single attempt ...
        assert!(client
            .register_checked(&reg, false)
            .await
            .is_err_and(|e| e.is_transient()));
        // ... and the retrying registration goes on to register again and succeed.
        let uuid = client.register_when_up(&reg, false).await.expect("registered");
        assert_eq!(uuid, TrainerUuid(7));
        assert_eq!(registers.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn uuid_wider_than_u64() {
        let body = r#"{"uuid":319427335939400804771900779272917772034}"#;
        assert_eq!(
            parse_uuid(body),
            Some(TrainerUuid(319427335939400804771900779272917772034))
        );
        assert_eq!(parse_uuid(r#"{"uuid": 12}"#), Some(TrainerUuid(12)));
        assert_eq!(parse_uuid(r#"{"uuid":"12"}"#), None);
    }
}
