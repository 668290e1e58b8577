//! The shared token's configuration: from `--auth-token` or (preferred) `--auth-token-file`,
//! and the rule that a gRPC service off loopback never runs without one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::ConfigError;
use crate::rpc::tls::Tls;

/// The token from the flag or the file (its first line, trimmed); both at once is an error,
/// and so is an empty or unreadable file.
pub fn token(flag: Option<String>, file: Option<PathBuf>) -> Result<Option<String>, ConfigError> {
    let flag = flag.filter(|t| !t.is_empty());
    match (flag, file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid {
            flag: "auth-token-file",
            reason: "give the token once: --auth-token or --auth-token-file, not both".into(),
        }),
        (Some(t), None) => Ok(Some(t)),
        (None, None) => Ok(None),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
                flag: "auth-token-file",
                reason: format!("cannot read {}: {e}", path.display()),
            })?;
            match text.lines().next().map(str::trim).filter(|t| !t.is_empty()) {
                Some(t) => Ok(Some(t.to_string())),
                None => Err(ConfigError::Invalid {
                    flag: "auth-token-file",
                    reason: format!("{} holds no token", path.display()),
                }),
            }
        }
    }
}

/// TLS material from `--tls-cert`, `--tls-key` and `--tls-ca` (cert and key together).
pub fn tls(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) -> Result<Tls, ConfigError> {
    if cert.is_some() != key.is_some() {
        return Err(ConfigError::Invalid {
            flag: "tls-key",
            reason: "--tls-cert and --tls-key go together".into(),
        });
    }
    Tls::load(cert, key, ca).map_err(|e| ConfigError::Invalid {
        flag: "tls-cert",
        reason: e.to_string(),
    })
}

/// A peer URL: `http://`, or `https://` when a CA can verify it.
pub fn peer_url(url: &str, tls: &Tls, flag: &'static str) -> Result<(), ConfigError> {
    let ok = url.starts_with("http://") || (url.starts_with("https://") && tls.ca.is_some());
    if ok {
        return Ok(());
    }
    let reason = if url.starts_with("https://") {
        format!("{url:?} is https://: pass --tls-ca to verify its certificate")
    } else {
        format!("{url:?} must be an http:// or https:// gRPC address")
    };
    Err(ConfigError::Invalid { flag, reason })
}

/// A gRPC service bound off loopback must require the token.
pub fn loopback_or_token(addr: SocketAddr, token: &Option<String>, flag: &'static str) -> Result<(), ConfigError> {
    if addr.ip().is_loopback() || token.is_some() {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        flag,
        reason: format!(
            "{addr} is reachable from other machines, and without a token anyone there could push \
             weights or read this node's state: pass --auth-token-file (or bind 127.0.0.1)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_one_place_and_a_public_listener_needs_it() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").expect("write");
        assert_eq!(token(None, Some(file.clone())).expect("file"), Some("s3cret".into()));
        assert_eq!(token(Some("t".into()), None).expect("flag"), Some("t".into()));
        assert!(token(Some("t".into()), Some(file)).is_err(), "both");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        assert!(token(None, Some(empty)).is_err(), "empty file");
        assert!(token(None, Some(dir.path().join("absent"))).is_err(), "missing file");

        let public: SocketAddr = "0.0.0.0:50051".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:50051".parse().expect("addr");
        let err = loopback_or_token(public, &None, "grpc-listen").expect_err("refused");
        assert!(err.to_string().contains("--auth-token-file"), "{err}");
        loopback_or_token(public, &Some("t".into()), "grpc-listen").expect("with a token");
        loopback_or_token(local, &None, "grpc-listen").expect("loopback");
        loopback_or_token("[::1]:1".parse().expect("v6"), &None, "grpc-listen").expect("v6 loopback");
    }
}
