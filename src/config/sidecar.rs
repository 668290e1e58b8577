//! Flags of `grpo-node --role inference-sidecar` (the shared ones — model, device, gRPC
//! address, token — are the learner's flags of the same name).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::{ConfigError, DeviceSpec, LearnerArgs};
use crate::engine::http::HttpPolicy;
use crate::engine::protocol::{GenerateLimits, MAX_N};
use crate::engine::vllm::WeightTransfer;
use crate::engine::vllm_api::PauseMode;

/// The inference engine a sidecar drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The built-in tch engine, in process.
    Embedded,
    /// A vLLM server that the sidecar launches and supervises (`--vllm-*` flags).
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
    /// Checkpoint mode: the directory the learner's checkpoints are under (its --save-path);
    /// a reload from anywhere else is refused [default: none, so checkpoint reloads are refused].
    #[arg(long, env = "GRPO_CHECKPOINT_ROOT")]
    pub checkpoint_root: Option<PathBuf>,
    /// vLLM: program and leading arguments, split on whitespace [default: env
    /// VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 $GRPO_VLLM_PYTHON (or python3) -m
    /// vllm.entrypoints.openai.api_server]. Whatever the command, the sidecar sets both variables. The sidecar adds --model,
    /// --served-model-name, --host 127.0.0.1, --port, --logprobs-mode processed_logprobs.
    #[arg(long, env = "GRPO_VLLM_COMMAND")]
    pub vllm_command: Option<String>,
    /// vLLM: extra arguments, split on whitespace, e.g. "--dtype float32 --enforce-eager".
    #[arg(long, env = "GRPO_VLLM_ARGS", allow_hyphen_values = true)]
    pub vllm_args: Option<String>,
    /// vLLM: loopback port it listens on [default: a free one].
    #[arg(long, env = "GRPO_VLLM_PORT")]
    pub vllm_port: Option<u16>,
    /// vLLM: file its output is appended to [default: vllm.log].
    #[arg(long, env = "GRPO_VLLM_LOG")]
    pub vllm_log: Option<PathBuf>,
    /// vLLM: where received versions are written for reload_weights [default:
    /// /dev/shm/grpo-sidecar-<pid>, a tmpfs].
    #[arg(long, env = "GRPO_VLLM_WEIGHTS_DIR")]
    pub vllm_weights_dir: Option<PathBuf>,
    /// vLLM: seconds a launch may take to become ready [default: 600].
    #[arg(long, env = "GRPO_VLLM_READY_TIMEOUT_S")]
    pub vllm_ready_timeout_s: Option<u64>,
    /// vLLM: seconds between liveness probes (a one-token generation) [default: 10].
    #[arg(long, env = "GRPO_VLLM_PROBE_INTERVAL_S")]
    pub vllm_probe_interval_s: Option<u64>,
    /// vLLM: deadline of one liveness probe; two misses in a row restart vLLM [default: 60].
    #[arg(long, env = "GRPO_VLLM_PROBE_TIMEOUT_S")]
    pub vllm_probe_timeout_s: Option<u64>,
    /// vLLM: failed launches in a row before the sidecar gives up [default: 5].
    #[arg(long, env = "GRPO_VLLM_MAX_RESTARTS")]
    pub vllm_max_restarts: Option<u32>,
    /// vLLM: run a version outside the tested range (0.26.x).
    #[arg(long, env = "GRPO_ALLOW_UNTESTED_VLLM")]
    pub allow_untested_vllm: bool,
    /// vLLM: how a weight update pauses it: wait (running requests finish on the old weights)
    /// or keep (they are frozen and continue on the new ones) [default: wait].
    #[arg(long, env = "GRPO_VLLM_PAUSE_MODE", value_enum)]
    pub vllm_pause_mode: Option<PauseMode>,
    /// vLLM: how full weights get into vLLM: reload (the sidecar writes safetensors on tmpfs and
    /// vLLM reloads them), ipc (a learner on vLLM's GPU hands over CUDA IPC handles of its
    /// weights and vLLM's workers copy them GPU to GPU; vLLM then also runs with
    /// `VLLM_ALLOW_INSECURE_SERIALIZATION=1`, which lets it unpickle the handles), or nccl (a
    /// learner on another GPU broadcasts into vLLM's workers, the learner rank 0), or shared
    /// (nothing moves: a learner on vLLM's GPU with --weight-bridge-mode shared maps vLLM's own
    /// parameters through CUDA IPC and trains them in place, pausing vLLM around each optimizer
    /// write). All but reload load our small vLLM plugin [default: reload].
    #[arg(long, env = "GRPO_VLLM_WEIGHT_TRANSFER", value_enum)]
    pub vllm_weight_transfer: Option<WeightTransfer>,
    /// vLLM: serve LoRA adapters up to this rank (the learner's lora and lora-restart modes):
    /// vLLM runs with --enable-lora --max-lora-rank N and runtime adapter loading. One of vLLM's
    /// ranks: 8, 16, 32, 64, 128, 256, 320, 512. vLLM 0.26's reload_weights fails while
    /// --enable-lora is on, so full-weight versions then restart vLLM instead [default: off].
    #[arg(long, env = "GRPO_VLLM_LORA_RANK")]
    pub vllm_lora_rank: Option<u32>,
    /// vLLM: adapters held at once (the newest and those still finishing requests) [default: 2].
    #[arg(long, env = "GRPO_VLLM_MAX_LORAS")]
    pub vllm_max_loras: Option<u32>,
    /// vLLM: tokens of the logprob canary checked after every weight update (0: off) [default: 16].
    #[arg(long, env = "GRPO_CANARY_TOKENS")]
    pub canary_tokens: Option<usize>,
    /// Largest max_tokens one /generate request may ask for [default: 8192].
    #[arg(long, env = "GRPO_GENERATE_MAX_TOKENS")]
    pub generate_max_tokens: Option<usize>,
    /// Longest /generate prompt in tokens [default: the model's context window].
    #[arg(long, env = "GRPO_GENERATE_MAX_PROMPT_TOKENS")]
    pub generate_max_prompt_tokens: Option<usize>,
    /// Largest n (completions) one /generate request may ask for [default: 256].
    #[arg(long, env = "GRPO_GENERATE_MAX_N")]
    pub generate_max_n: Option<usize>,
    /// /generate requires `authorization: Bearer <token>` (the --auth-token-file token).
    #[arg(long, env = "GRPO_GENERATE_REQUIRES_TOKEN")]
    pub generate_requires_token: bool,
}

/// A validated vLLM launch and driver configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VllmConfig {
    pub command: Vec<String>,
    pub extra_args: Vec<String>,
    /// 0: pick a free loopback port at start.
    pub port: u16,
    pub log: PathBuf,
    pub weights_dir: PathBuf,
    pub ready_timeout_s: u64,
    pub probe_interval_s: u64,
    pub probe_timeout_s: u64,
    pub max_restarts: u32,
    pub allow_untested: bool,
    pub canary_tokens: usize,
    pub pause_mode: PauseMode,
    pub weight_transfer: WeightTransfer,
    /// LoRA serving: (max rank, max adapters held at once).
    pub lora: Option<(u32, u32)>,
}

/// The ranks vLLM accepts for --max-lora-rank.
pub const VLLM_LORA_RANKS: [u32; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn default_weights_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    let root = if shm.is_dir() { shm } else { std::env::temp_dir() };
    root.join(format!("grpo-sidecar-{}", std::process::id()))
}

impl SidecarArgs {
    fn vllm(&self) -> Result<VllmConfig, ConfigError> {
        let command = match &self.vllm_command {
            Some(c) => words(c),
            None => {
                let python = std::env::var("GRPO_VLLM_PYTHON").unwrap_or_else(|_| "python3".into());
                // Usage stats off in the command itself, besides the supervisor's environment.
                [
                    "env",
                    "VLLM_NO_USAGE_STATS=1",
                    "DO_NOT_TRACK=1",
                    &python,
                    "-m",
                    "vllm.entrypoints.openai.api_server",
                ]
                .map(String::from)
                .to_vec()
            }
        };
        if command.is_empty() {
            return Err(ConfigError::Invalid {
                flag: "vllm-command",
                reason: "is empty".into(),
            });
        }
        let positive = |flag: &'static str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
            0 => Err(ConfigError::Invalid {
                flag,
                reason: "must be at least 1".into(),
            }),
            n => Ok(n),
        };
        let canary_tokens = self.canary_tokens.unwrap_or(16);
        if canary_tokens == 1 {
            return Err(ConfigError::Invalid {
                flag: "canary-tokens",
                reason: "needs at least 2 tokens (or 0 for off)".into(),
            });
        }
        let lora = match self.vllm_lora_rank {
            None => None,
            Some(r) if VLLM_LORA_RANKS.contains(&r) => {
                let loras = self.vllm_max_loras.unwrap_or(2);
                if loras == 0 {
                    return Err(ConfigError::Invalid {
                        flag: "vllm-max-loras",
                        reason: "must be at least 1".into(),
                    });
                }
                Some((r, loras))
            }
            Some(r) => {
                return Err(ConfigError::Invalid {
                    flag: "vllm-lora-rank",
                    reason: format!("{r} is not one of vLLM's ranks {VLLM_LORA_RANKS:?}"),
                })
            }
        };
        if lora.is_none() && self.vllm_max_loras.is_some() {
            return Err(ConfigError::Invalid {
                flag: "vllm-max-loras",
                reason: "needs --vllm-lora-rank".into(),
            });
        }
        Ok(VllmConfig {
            lora,
            command,
            extra_args: self.vllm_args.as_deref().map(words).unwrap_or_default(),
            port: self.vllm_port.unwrap_or(0),
            log: self.vllm_log.clone().unwrap_or_else(|| PathBuf::from("vllm.log")),
            weights_dir: self.vllm_weights_dir.clone().unwrap_or_else(default_weights_dir),
            ready_timeout_s: positive("vllm-ready-timeout-s", self.vllm_ready_timeout_s, 600)?,
            probe_interval_s: positive("vllm-probe-interval-s", self.vllm_probe_interval_s, 10)?,
            probe_timeout_s: positive("vllm-probe-timeout-s", self.vllm_probe_timeout_s, 60)?,
            max_restarts: self.vllm_max_restarts.unwrap_or(5),
            allow_untested: self.allow_untested_vllm,
            canary_tokens,
            pause_mode: self.vllm_pause_mode.unwrap_or(PauseMode::Wait),
            weight_transfer: self.vllm_weight_transfer.unwrap_or(WeightTransfer::Reload),
        })
    }
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
    /// Set with `--engine vllm`.
    pub vllm: Option<VllmConfig>,
    /// Where checkpoint reloads may come from.
    pub checkpoint_root: Option<PathBuf>,
    /// What /generate allows.
    pub http: HttpPolicy,
    /// TLS of the gRPC listener, and of an https:// learner.
    pub tls: crate::rpc::tls::Tls,
}

impl SidecarArgs {
    /// Validates, taking the shared flags from `common`.
    pub fn resolve(self, common: LearnerArgs) -> Result<SidecarConfig, ConfigError> {
        let common = match common.config.clone() {
            Some(path) => common.merged_with(LearnerArgs::from_file(&path)?),
            None => common,
        };
        let vllm = match self.engine {
            Some(EngineKind::Vllm) => Some(self.vllm()?),
            _ => None,
        };
        let model_name = common.model_name.ok_or(ConfigError::Missing { flag: "model-name" })?;
        if !model_name.join("config.json").is_file() || !model_name.join("tokenizer.json").is_file() {
            return Err(ConfigError::Invalid {
                flag: "model-name",
                reason: format!("{} needs config.json and tokenizer.json", model_name.display()),
            });
        }
        let device = DeviceSpec::resolve(common.device.as_deref())?;
        let tls = super::auth::tls(
            common.tls_cert.as_deref(),
            common.tls_key.as_deref(),
            common.tls_ca.as_deref(),
        )?;
        if let Some(u) = &self.learner_url {
            super::auth::peer_url(u, &tls, "learner-url")?;
        }
        if let Some(u) = &self.advertise_url {
            // The learner dials it: its own --tls-ca verifies it.
            let dialled_back = u.starts_with("http://") || u.starts_with("https://");
            if !dialled_back {
                return Err(ConfigError::Invalid {
                    flag: "advertise-url",
                    reason: format!("{u:?} must be an http:// or https:// URL"),
                });
            }
        }
        let max_batch_rows = self.max_batch_rows.unwrap_or(128);
        if max_batch_rows == 0 {
            return Err(ConfigError::Invalid {
                flag: "max-batch-rows",
                reason: "must be at least 1".into(),
            });
        }
        let auth_token = super::auth::token(common.auth_token, common.auth_token_file)?;
        let grpc_listen = common
            .grpc_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
        super::auth::loopback_or_token(grpc_listen, &auth_token, "grpc-listen")?;
        let http_listen = self.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9001)));
        super::auth::loopback_or_token(http_listen, &auth_token, "listen")?;
        if super::addr::multi_node() {
            super::addr::check_listen("grpc-listen", grpc_listen)?;
            super::addr::check_listen("listen", http_listen)?;
        }
        let http = self.http_policy(&auth_token)?;
        Ok(SidecarConfig {
            model_name,
            device,
            http_listen,
            grpc_listen,
            learner_url: self.learner_url,
            advertise_url: self.advertise_url,
            auth_token,
            max_batch_rows,
            vllm,
            checkpoint_root: self.checkpoint_root,
            http,
            tls,
        })
    }

    /// The limits and token of /generate.
    fn http_policy(&self, auth_token: &Option<String>) -> Result<HttpPolicy, ConfigError> {
        let defaults = GenerateLimits::default();
        let limits = GenerateLimits {
            max_tokens: self.generate_max_tokens.unwrap_or(defaults.max_tokens),
            max_prompt_tokens: self.generate_max_prompt_tokens,
            max_n: self.generate_max_n.unwrap_or(defaults.max_n),
        };
        for (flag, value, most) in [
            ("generate-max-tokens", limits.max_tokens, usize::MAX),
            (
                "generate-max-prompt-tokens",
                limits.max_prompt_tokens.unwrap_or(1),
                usize::MAX,
            ),
            ("generate-max-n", limits.max_n, MAX_N),
        ] {
            if value == 0 || value > most {
                return Err(ConfigError::Invalid {
                    flag,
                    reason: format!("must be in 1..={most}"),
                });
            }
        }
        if self.generate_requires_token && auth_token.is_none() {
            return Err(ConfigError::Invalid {
                flag: "generate-requires-token",
                reason: "needs the token: pass --auth-token-file".into(),
            });
        }
        let off_loopback = self.listen.is_some_and(|a| !a.ip().is_loopback());
        Ok(HttpPolicy {
            limits,
            token: auth_token.clone().filter(|_| self.generate_requires_token),
            metrics_token: auth_token.clone().filter(|_| off_loopback),
        })
    }
}
