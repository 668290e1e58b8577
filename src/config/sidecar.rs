//! Flags of `grpo-node --role inference-sidecar` (the shared ones — model, device, gRPC
//! address, token — are the learner's flags of the same name).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::{ConfigError, DeviceSpec, LearnerArgs};

/// The inference engine a sidecar drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The built-in tch engine, in process.
    Embedded,
    /// An external vLLM server (not built yet).
    Vllm,
}

/// Sidecar-only flags.
#[derive(Debug, Clone, Default, Args)]
pub struct SidecarArgs {
    /// Inference engine [default: embedded].
    #[arg(long, env = "GRPO_ENGINE", value_enum)]
    pub engine: Option<EngineKind>,
    /// HTTP address of /generate and /health [default: 127.0.0.1:9001].
    #[arg(long, env = "GRPO_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Learner gRPC URL to register with, e.g. http://127.0.0.1:50050.
    #[arg(long, env = "GRPO_LEARNER_URL")]
    pub learner_url: Option<String>,
    /// gRPC URL the learner should dial back [default: http://<bound --grpc-listen>].
    #[arg(long, env = "GRPO_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Most sequences generated together in one batch [default: 128].
    #[arg(long, env = "GRPO_MAX_BATCH_ROWS")]
    pub max_batch_rows: Option<usize>,
}

/// A validated sidecar configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarConfig {
    pub model_name: PathBuf,
    pub device: DeviceSpec,
    pub http_listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub learner_url: Option<String>,
    pub advertise_url: Option<String>,
    pub auth_token: Option<String>,
    pub max_batch_rows: usize,
}

impl SidecarArgs {
    /// Validates, taking the shared flags from `common`.
    pub fn resolve(self, common: LearnerArgs) -> Result<SidecarConfig, ConfigError> {
        let common = match common.config.clone() {
            Some(path) => common.merged_with(LearnerArgs::from_file(&path)?),
            None => common,
        };
        if self.engine == Some(EngineKind::Vllm) {
            return Err(ConfigError::Invalid {
                flag: "engine",
                reason: "the vLLM driver is not built yet; use --engine embedded".into(),
            });
        }
        let model_name = common.model_name.ok_or(ConfigError::Missing { flag: "model-name" })?;
        if !model_name.join("config.json").is_file() || !model_name.join("tokenizer.json").is_file() {
            return Err(ConfigError::Invalid {
                flag: "model-name",
                reason: format!("{} needs config.json and tokenizer.json", model_name.display()),
            });
        }
        let device = DeviceSpec::resolve(common.device.as_deref())?;
        for (flag, url) in [
            ("learner-url", &self.learner_url),
            ("advertise-url", &self.advertise_url),
        ] {
            if let Some(u) = url {
                if !u.starts_with("http://") {
                    return Err(ConfigError::Invalid {
                        flag,
                        reason: format!("{u:?} must be an http:// URL"),
                    });
                }
            }
        }
        let max_batch_rows = self.max_batch_rows.unwrap_or(128);
        if max_batch_rows == 0 {
            return Err(ConfigError::Invalid {
                flag: "max-batch-rows",
                reason: "must be at least 1".into(),
            });
        }
        Ok(SidecarConfig {
            model_name,
            device,
            http_listen: self.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9001))),
            grpc_listen: common
                .grpc_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
            learner_url: self.learner_url,
            advertise_url: self.advertise_url,
            auth_token: common.auth_token.filter(|t| !t.is_empty()),
            max_batch_rows,
        })
    }
}
