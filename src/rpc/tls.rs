//! Optional TLS on every gRPC service and client (rustls with ring). A node with
//! `--tls-cert`/`--tls-key` serves TLS; a client verifies `https://` peers against `--tls-ca`
//! (the server certificate must name the host dialled). `http://` stays plaintext.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// PEM material of a node: its own identity (to serve) and the CA its peers chain to (to dial).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// Certificate chain and private key, PEM.
    pub identity: Option<(String, String)>,
    /// Trusted CA certificate(s), PEM.
    pub ca: Option<String>,
}

impl std::fmt::Debug for Tls {
    // The private key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("serves_tls", &self.identity.is_some())
            .field("has_ca", &self.ca.is_some())
            .finish()
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{url}: an https:// peer needs --tls-ca to verify its certificate")]
    NoCa { url: String },
    #[error("{url}: {source}")]
    Endpoint {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("TLS server configuration: {0}")]
    Server(tonic::transport::Error),
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl Tls {
    /// Reads the PEM files (any of them may be absent).
    pub fn load(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) -> Result<Self, TlsError> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let ca = ca.map(read).transpose()?;
        Ok(Self { identity, ca })
    }

    /// A server builder, serving TLS when this node has an identity.
    pub fn server(&self) -> Result<Server, TlsError> {
        let builder = Server::builder();
        match &self.identity {
            Some((cert, key)) => builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
                .map_err(TlsError::Server),
            None => Ok(builder),
        }
    }

    /// An endpoint for `url`: verified TLS for `https://` (against the CA), plaintext for
    /// `http://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let endpoint_err = |source| TlsError::Endpoint {
            url: url.into(),
            source,
        };
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(endpoint_err)?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        let ca = self.ca.as_ref().ok_or_else(|| TlsError::NoCa { url: url.into() })?;
        endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .map_err(endpoint_err)
    }
}
