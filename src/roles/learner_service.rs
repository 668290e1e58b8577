//! `grpo.v1.Learner`: the run's status for operators, and registration of sidecars that dial
//! in (`grpo-node --role inference-sidecar --learner-url ...`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use ractor::ActorRef;
use tonic::{Request, Response, Status};

use crate::actors::learner::LearnerStatus;
use crate::actors::weight_broadcaster::BroadcasterMsg;
use crate::rpc::auth::{CheckToken, Token};
use crate::rpc::tls::Tls;

use crate::rpc::pb::learner_server::{Learner, LearnerServer};
use crate::rpc::pb::{
    PolicyVersion, RegisterSidecarRequest, RegisterSidecarResponse, StatusRequest, StatusResponse, StepMetrics,
};

/// Serves one learner.
pub struct LearnerService {
    pub status: Arc<Mutex<LearnerStatus>>,
    pub training_steps: u64,
    /// Absent when the run has no weight sync.
    pub broadcaster: Option<ActorRef<BroadcasterMsg>>,
    /// Who may register a sidecar.
    pub allow: SidecarAllow,
}

/// The hosts allowed to `RegisterSidecar` (`--sidecar-allow`): loopback, the hosts of
/// `--sidecar`, and the listed ones. Both the caller and the address it asks the learner to
/// dial must be allowed, so a caller cannot point the learner at a third machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarAllow {
    pub hosts: BTreeSet<IpAddr>,
}

impl SidecarAllow {
    /// Loopback, the IP hosts of `sidecars`' URLs, and `extra`.
    pub fn new(sidecars: &[String], extra: &[IpAddr]) -> Self {
        let mut hosts = BTreeSet::new();
        for url in sidecars {
            match url_host(url).map(|h| h.parse::<IpAddr>()) {
                Some(Ok(ip)) => {
                    hosts.insert(ip.to_canonical());
                }
                _ => {
                    tracing::warn!(sidecar = %url, "not an IP address: it may not register itself unless --sidecar-allow names its IP")
                }
            }
        }
        hosts.extend(extra.iter().map(|ip| ip.to_canonical()));
        Self { hosts }
    }

    fn permits(&self, ip: IpAddr) -> bool {
        // A dual-stack listener sees IPv4 callers as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        ip.is_loopback() || self.hosts.contains(&ip)
    }

    /// Whether a caller at `peer` may register `url`.
    pub fn check(&self, peer: Option<IpAddr>, url: &str) -> Result<(), Status> {
        let Some(peer) = peer.filter(|ip| self.permits(*ip)) else {
            return Err(Status::permission_denied(format!(
                "{} may not register sidecars (allow it with --sidecar-allow on the learner)",
                peer.map_or("an unknown caller".to_string(), |p| p.to_string())
            )));
        };
        let host = url_host(url).ok_or_else(|| Status::invalid_argument(format!("no host in {url:?}")))?;
        let dialed: Option<IpAddr> = match host {
            "localhost" => Some(IpAddr::from([127, 0, 0, 1])),
            other => other.parse().ok(),
        };
        match dialed {
            Some(ip) if self.permits(ip) => Ok(()),
            Some(ip) => Err(Status::permission_denied(format!(
                "{peer} asked the learner to dial {ip}, which is not allowed (--sidecar-allow)"
            ))),
            None => Err(Status::invalid_argument(format!(
                "{url:?}: register with an IP address (a name could point anywhere)"
            ))),
        }
    }
}

/// The host of an `http(s)://host[:port][/...]` URL (brackets of an IPv6 host removed).
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then_some(host)
}

#[tonic::async_trait]
impl Learner for LearnerService {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = self
            .status
            .lock()
            .map_err(|_| Status::internal("status lock poisoned"))?
            .clone();
        Ok(Response::new(StatusResponse {
            version: Some(PolicyVersion { step: s.step }),
            training_steps: self.training_steps,
            rejected_groups: s.rejected_groups,
            last_step: s.last.map(|r| StepMetrics {
                step: r.train.step,
                loss: r.train.loss,
                grad_norm: r.train.grad_norm,
                lr: r.train.lr,
                tokens: r.train.tokens,
                sequences: r.train.sequences,
                rejected_groups: r.rejected_groups,
            }),
        }))
    }

    async fn register_sidecar(
        &self,
        req: Request<RegisterSidecarRequest>,
    ) -> Result<Response<RegisterSidecarResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let addr = req.into_inner().address;
        if !(addr.starts_with("http://") || addr.starts_with("https://")) {
            return Err(Status::invalid_argument(format!(
                "address {addr:?} must be an http:// URL"
            )));
        }
        self.allow.check(peer, &addr)?;
        let Some(b) = &self.broadcaster else {
            return Err(Status::failed_precondition("this learner runs without weight sync"));
        };
        let version = ractor::call!(b, |r| BroadcasterMsg::AddSidecar(addr, Some(r)))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RegisterSidecarResponse {
            version: Some(PolicyVersion { step: version }),
        }))
    }
}

/// Binds `addr` (port 0 picks a free port) and serves; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    service: LearnerService,
    token: Token,
    tls: &Tls,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut server = tls.server().map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let svc = tonic::service::interceptor::InterceptedService::new(LearnerServer::new(service), CheckToken(token));
    let task = tokio::spawn(async move {
        if let Err(e) = server.add_service(svc).serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "learner gRPC server stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_callers_register_only_allowed_addresses() {
        let allow = SidecarAllow::new(&["http://10.0.0.5:50051".into()], &["10.0.0.7".parse().expect("ip")]);
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        assert!(allow.check(ip("127.0.0.1"), "http://127.0.0.1:50051").is_ok());
        assert!(allow.check(ip("127.0.0.1"), "http://localhost:50051").is_ok());
        assert!(
            allow.check(ip("10.0.0.5"), "http://10.0.0.5:9").is_ok(),
            "a --sidecar host"
        );
        assert!(
            allow.check(ip("10.0.0.7"), "http://10.0.0.7:9").is_ok(),
            "a --sidecar-allow host"
        );
        assert!(allow.check(ip("::1"), "http://[::1]:9").is_ok());
        assert!(
            allow.check(ip("::ffff:127.0.0.1"), "http://127.0.0.1:9").is_ok(),
            "dual-stack loopback"
        );
        assert!(
            allow.check(ip("::ffff:10.0.0.5"), "http://10.0.0.5:9").is_ok(),
            "dual-stack"
        );
        let denied = |peer, url| allow.check(peer, url).map_err(|s| s.code());
        assert_eq!(
            denied(ip("10.0.0.9"), "http://10.0.0.9:9"),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(denied(None, "http://127.0.0.1:9"), Err(tonic::Code::PermissionDenied));
        assert_eq!(
            denied(ip("10.0.0.5"), "http://10.0.0.9:9"),
            Err(tonic::Code::PermissionDenied),
            "an allowed caller cannot point the learner elsewhere"
        );
        assert_eq!(
            denied(ip("10.0.0.5"), "http://evil.example:9"),
            Err(tonic::Code::InvalidArgument)
        );
        assert_eq!(url_host("http://[fe80::1]:5/x"), Some("fe80::1"));
        assert_eq!(url_host("ftp://x"), None);
    }
}
