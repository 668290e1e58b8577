//! Flags of `grpo-node --role learner`. Names and meanings follow the Atropos example trainer
//! (`--model-name`, `--batch-size` is the micro-batch, ...), so its users feel at home.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use crate::grpo::{ClipMode, LossAgg};
use crate::train::{LayerSet, Precision, ScheduleKind};

use super::{ConfigError, DeviceSpec};

pub use crate::train::OptimizerKind;

/// How new weights reach the inference engines (the seeds' names in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BridgeMode {
    /// Stream every version to each sidecar over gRPC (NCCL comes with the GPU build).
    Broadcast,
    /// One copy of the weights: the embedded engine in this process computes on the learner's
    /// tensors (--colocate-engine), or the learner trains a vLLM sidecar's own parameters on the
    /// same GPU (one --sidecar with --vllm-weight-transfer shared) [shared_vllm].
    #[value(alias = "shared_vllm")]
    #[serde(alias = "shared_vllm")]
    Shared,
    /// Save an HF checkpoint; sidecars reload from it every --vllm-restart-interval steps [none].
    #[value(alias = "none")]
    #[serde(alias = "none")]
    Checkpoint,
    /// Train a LoRA adapter (the base frozen); every --sync-every steps only the adapter moves,
    /// and sidecars hot-swap it (vLLM: /v1/load_lora_adapter under a new name) [lora_only].
    #[value(alias = "lora_only")]
    #[serde(alias = "lora_only")]
    Lora,
    /// Train a LoRA adapter; every --vllm-restart-interval steps sidecars restart vLLM with the
    /// newest adapter (`--lora-modules`) [lora_restart].
    #[value(name = "lora-restart", alias = "lora_restart")]
    #[serde(rename = "lora-restart", alias = "lora_restart")]
    LoraRestart,
}

impl BridgeMode {
    /// Whether the mode trains a LoRA adapter.
    pub fn is_lora(self) -> bool {
        matches!(self, Self::Lora | Self::LoraRestart)
    }
}

/// Learner flags. Every field is optional here so the TOML file can fill what the command line
/// and environment leave out; [`LearnerArgs::resolve`] applies defaults and validates.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LearnerArgs {
    /// TOML file with any of these settings (kebab-case keys, e.g. `training-steps = 20`).
    #[arg(long, env = "GRPO_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Local HF model directory (config.json + *.safetensors [+ tokenizer files]).
    #[arg(long, env = "GRPO_MODEL_NAME")]
    pub model_name: Option<PathBuf>,
    /// Atropos API base URL [default: http://localhost:8000].
    #[arg(long, env = "GRPO_ATROPOS_URL")]
    pub atropos_url: Option<String>,
    /// Peak learning rate [default: 1e-5].
    #[arg(long, env = "GRPO_LR")]
    pub lr: Option<f64>,
    /// Optimizer steps to train; each Atropos batch is one step [default: 10].
    #[arg(long, env = "GRPO_TRAINING_STEPS")]
    pub training_steps: Option<u64>,
    /// Micro-batch size in sequences [default: 2].
    #[arg(long, env = "GRPO_BATCH_SIZE")]
    pub batch_size: Option<u64>,
    /// Token-budget packing: lay sequences end to end into micro-batches of at most this many
    /// tokens, with no padding (attention and positions restart at every sequence); a sequence
    /// longer than the budget gets a micro-batch of its own. Off: --batch-size padded rows.
    #[arg(long, env = "GRPO_MICRO_BATCH_TOKENS")]
    pub micro_batch_tokens: Option<u64>,
    /// With --micro-batch-tokens: compute each group's shared prompt once; its completions
    /// attend to its keys and values and their gradients flow back into it (exact) [default: off].
    #[arg(long, env = "GRPO_SHARED_PROMPT", value_enum)]
    pub shared_prompt: Option<crate::grpo::pack::SharedPrompt>,
    /// Micro-batches per step; the API batch is batch-size x this sequences [default: 32].
    #[arg(long, env = "GRPO_GRADIENT_ACCUMULATION_STEPS")]
    pub gradient_accumulation_steps: Option<u64>,
    /// Longest sequence in tokens; also registered as max_token_len [default: 2048].
    #[arg(long, env = "GRPO_SEQ_LEN")]
    pub seq_len: Option<u64>,
    /// Linear warmup steps [default: 0].
    #[arg(long, env = "GRPO_WARMUP_STEPS")]
    pub warmup_steps: Option<u64>,
    /// Schedule after warmup [default: constant].
    #[arg(long, env = "GRPO_LR_SCHEDULE", value_enum)]
    pub lr_schedule: Option<ScheduleKind>,
    /// PPO clip epsilon (lower side, and upper unless --clip-eps-high) [default: 0.2].
    #[arg(long, env = "GRPO_CLIP_EPS")]
    pub clip_eps: Option<f64>,
    /// Upper clip epsilon (DAPO clip-higher) [default: --clip-eps].
    #[arg(long, env = "GRPO_CLIP_EPS_HIGH")]
    pub clip_eps_high: Option<f64>,
    /// standard PPO clipping, or atropos for the example trainer's sign-flipped variant [default: standard].
    #[arg(long, env = "GRPO_CLIP_MODE", value_enum)]
    pub clip_mode: Option<ClipMode>,
    /// Truncated importance sampling: cap the ratio at this value [default: off].
    #[arg(long, env = "GRPO_IS_CAP")]
    pub is_cap: Option<f64>,
    /// Weight of the k3 KL estimate against the rollout logprobs [default: 0].
    #[arg(long, env = "GRPO_KL_COEF")]
    pub kl_coef: Option<f64>,
    /// Loss aggregation [default: seq-mean-token-mean].
    #[arg(long, env = "GRPO_LOSS_AGG", value_enum)]
    pub loss_agg: Option<LossAgg>,
    /// Gradient L2-norm clip [default: 1.0].
    #[arg(long, env = "GRPO_MAX_GRAD_NORM")]
    pub max_grad_norm: Option<f64>,
    /// AdamW decoupled weight decay [default: 0.01].
    #[arg(long, env = "GRPO_WEIGHT_DECAY")]
    pub weight_decay: Option<f64>,
    /// Optimizer: adamw; adamw_8bit (bitsandbytes' AdamW8bit: blockwise 8-bit moments, 2 bytes
    /// of state per parameter); or adafactor (transformers' Adafactor with this run's learning
    /// rate: factored second moment, no first moment). --weight-decay applies to all three
    /// [default: adamw].
    #[arg(long, env = "GRPO_OPTIMIZER", value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Train only these decoder layers, e.g. "20-31" or "0-3,28-31"; all else is frozen.
    #[arg(long, env = "GRPO_TRAIN_LAYER_INDICES")]
    pub train_layer_indices: Option<String>,
    /// LoRA rank (lora and lora-restart modes) [default: 16].
    #[arg(long, env = "GRPO_LORA_R")]
    pub lora_r: Option<i64>,
    /// LoRA alpha; the update is scaled by alpha / r [default: 32].
    #[arg(long, env = "GRPO_LORA_ALPHA")]
    pub lora_alpha: Option<f64>,
    /// Dropout on each adapted module's input while training [default: 0.05].
    #[arg(long, env = "GRPO_LORA_DROPOUT")]
    pub lora_dropout: Option<f64>,
    /// Modules that get adapters, any of q_proj k_proj v_proj o_proj gate_proj up_proj
    /// down_proj [default: q_proj v_proj].
    #[arg(long, env = "GRPO_LORA_TARGET_MODULES", value_enum, num_args = 1.., value_delimiter = ',')]
    pub lora_target_modules: Option<Vec<crate::model::lora::LoraTarget>>,
    /// Decoder layers that get adapters, e.g. "0-3,28-31" (PEFT's layers_to_transform) [default: all].
    #[arg(long, env = "GRPO_LORA_LAYER_INDICES")]
    pub lora_layer_indices: Option<String>,
    /// With LoRA, also write the merged model (base + adapter) as an HF checkpoint
    /// (`step_N/`, `final_model/`) beside each adapter checkpoint.
    #[arg(long, env = "GRPO_MERGE_LORA_ON_SAVE", num_args = 0..=1, default_missing_value = "true")]
    pub merge_lora_on_save: Option<bool>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "GRPO_DEVICE")]
    pub device: Option<String>,
    /// Compute dtype of matmuls and attention; master weights, AdamW's second moment, logprobs
    /// and ratios stay fp32 [default: bf16 on CUDA, fp32 on CPU].
    #[arg(long, env = "GRPO_PRECISION", value_enum)]
    pub precision: Option<Precision>,
    /// dtype of AdamW's first moment (exp_avg). bf16 saves 2 bytes per parameter; with
    /// beta1 = 0.9 each update moves it by 10%, far above bf16's resolution. The second moment
    /// stays fp32 [default: bf16 with --precision bf16, else fp32].
    #[arg(long, env = "GRPO_EXP_AVG_DTYPE", value_enum)]
    pub exp_avg_dtype: Option<Precision>,
    /// Recompute each layer in the backward instead of storing its activations
    /// [default: on for models of 100M parameters or more].
    #[arg(long, env = "GRPO_GRADIENT_CHECKPOINTING", num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// With gradient checkpointing, the last N decoder layers keep their activations instead of
    /// being recomputed: faster backward, more memory (all of them: as fast as no
    /// checkpointing) [default: 0].
    #[arg(long, env = "GRPO_CHECKPOINT_KEEP_LAYERS")]
    pub checkpoint_keep_layers: Option<usize>,
    /// Positions per chunk of the LM head and logprobs (each chunk holds tokens x vocab fp32
    /// logits) [default: 1024].
    #[arg(long, env = "GRPO_LOGPROB_CHUNK_TOKENS")]
    pub logprob_chunk_tokens: Option<i64>,
    /// libtorch's fused AdamW kernel; false runs the per-tensor loop [default: true].
    #[arg(long, env = "GRPO_FUSED_ADAMW", num_args = 0..=1, default_missing_value = "true")]
    pub fused_adamw: Option<bool>,
    /// Output directory: checkpoints, metrics.jsonl, the batch spool [default: trained_model_checkpoints].
    #[arg(long, env = "GRPO_SAVE_PATH")]
    pub save_path: Option<PathBuf>,
    /// Save a checkpoint every N steps; 0 = only at the end [default: 3].
    #[arg(long, env = "GRPO_CHECKPOINT_INTERVAL")]
    pub checkpoint_interval: Option<u64>,
    /// Keep only the newest K step_N checkpoints [default: all].
    #[arg(long, env = "GRPO_KEEP_CHECKPOINTS")]
    pub keep_checkpoints: Option<usize>,
    /// Largest safetensors shard in MiB when saving [default: 2048].
    #[arg(long, env = "GRPO_MAX_SHARD_MB")]
    pub max_shard_mb: Option<u64>,
    /// Continue from the newest checkpoint in --save-path (weights, optimizer, step, spooled batches).
    #[arg(long, env = "GRPO_RESUME", num_args = 0..=1, default_missing_value = "true")]
    pub resume: Option<bool>,
    /// If the API did not take our registration (the wedge), call /reset_data and register again.
    #[arg(long, env = "GRPO_RESET_API", num_args = 0..=1, default_missing_value = "true")]
    pub reset_api: Option<bool>,
    /// Truncate sequences longer than --seq-len instead of rejecting their group.
    #[arg(long, env = "GRPO_TRUNCATE_LONG", num_args = 0..=1, default_missing_value = "true")]
    pub truncate_long: Option<bool>,
    /// Train groups without inference_logprobs on-policy (ratio 1) instead of rejecting them.
    #[arg(long, env = "GRPO_ALLOW_MISSING_LOGPROBS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_missing_logprobs: Option<bool>,
    /// Seed for anything random [default: 0].
    #[arg(long, env = "GRPO_SEED")]
    pub seed: Option<u64>,
    /// wandb group sent at registration [default: ""].
    #[arg(long, env = "GRPO_WANDB_GROUP")]
    pub wandb_group: Option<String>,
    /// wandb project sent at registration [default: ""].
    #[arg(long, env = "GRPO_WANDB_PROJECT")]
    pub wandb_project: Option<String>,
    /// Longest wait between /batch polls when no data is ready, in ms [default: 2000].
    #[arg(long, env = "GRPO_POLL_MAX_MS")]
    pub poll_max_ms: Option<u64>,
    /// Per-request timeout against the Atropos API, in seconds [default: 30].
    #[arg(long, env = "GRPO_API_TIMEOUT_S")]
    pub api_timeout_s: Option<u64>,
    /// Batches fetched ahead of training [default: 2].
    #[arg(long, env = "GRPO_PREFETCH")]
    pub prefetch: Option<usize>,
    /// Serve grpc.v1.Learner (status; sidecar registration) on this address.
    #[arg(long, env = "GRPO_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// gRPC address of an inference sidecar to keep in sync, e.g. http://127.0.0.1:50051 (repeatable).
    #[arg(long = "sidecar", env = "GRPO_SIDECARS", value_delimiter = ',')]
    pub sidecar: Option<Vec<String>>,
    /// broadcast, shared, checkpoint, lora or lora-restart [default: broadcast].
    #[arg(long, env = "GRPO_WEIGHT_BRIDGE_MODE", value_enum)]
    pub weight_bridge_mode: Option<BridgeMode>,
    /// Publish weights every N optimizer steps (broadcast mode) [default: 1].
    #[arg(long, env = "GRPO_SYNC_EVERY")]
    pub sync_every: Option<u64>,
    /// Checkpoint mode: reload the sidecars' engines from a fresh checkpoint every N steps [default: 3].
    #[arg(long, env = "GRPO_VLLM_RESTART_INTERVAL")]
    pub vllm_restart_interval: Option<u64>,
    /// Bucket size of a weight sync, MiB: the gRPC stream's message size (capped at 128) and
    /// NCCL's group of whole tensors [default: 16 for the gRPC stream, 512 for NCCL].
    #[arg(long, env = "GRPO_SYNC_BUCKET_MB")]
    pub sync_bucket_mb: Option<u64>,
    /// How full weights reach sidecars: nccl (GPU to GPU; needs --device cuda and a `cuda`
    /// build), grpc (the byte stream), auto (nccl when possible; a sidecar without NCCL gets
    /// the gRPC stream either way), or ipc (as auto, and a vLLM sidecar on this GPU started
    /// with --vllm-weight-transfer ipc copies each version straight out of the learner's
    /// memory; the learner sends its logprob canary along) [default: auto].
    #[arg(long, env = "GRPO_SYNC_TRANSPORT", value_enum)]
    pub sync_transport: Option<SyncTransport>,
    /// Per-RPC allowance of a weight sync, seconds; streams add bytes at 20 MB/s [default: 10].
    #[arg(long, env = "GRPO_SYNC_DEADLINE_S")]
    pub sync_deadline_s: Option<u64>,
    /// Shared token required on every gRPC call (learner and sidecars). Prefer
    /// --auth-token-file: a token on the command line shows in `ps`.
    #[arg(long, env = "GRPO_AUTH_TOKEN")]
    pub auth_token: Option<String>,
    /// File holding the shared token (its first line); the way to pass the token.
    #[arg(long, env = "GRPO_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM certificate (chain) this node's gRPC listener serves TLS with (with --tls-key).
    #[arg(long, env = "GRPO_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "GRPO_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate that https:// peers' certificates are verified against.
    #[arg(long, env = "GRPO_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Shared mode: run the embedded engine inside the learner process, on the same tensors.
    #[arg(long, env = "GRPO_COLOCATE_ENGINE", num_args = 0..=1, default_missing_value = "true")]
    pub colocate_engine: Option<bool>,
    /// HTTP address of the colocated engine [default: 127.0.0.1:9001].
    #[arg(long, env = "GRPO_ENGINE_LISTEN")]
    pub engine_listen: Option<SocketAddr>,
    /// HTTP address of the learner's Prometheus /metrics; off loopback it needs the token,
    /// and scrapers must present it [default: 127.0.0.1:9400].
    #[arg(long, env = "GRPO_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Hosts (IP addresses) allowed to RegisterSidecar, besides loopback and the hosts of
    /// --sidecar (repeatable, comma-separated) [default: none more].
    #[arg(long, env = "GRPO_SIDECAR_ALLOW", value_delimiter = ',')]
    pub sidecar_allow: Option<Vec<std::net::IpAddr>>,
    /// A registered sidecar that stays unreachable this many seconds is forgotten (it may
    /// register again) [default: 600].
    #[arg(long, env = "GRPO_SIDECAR_FORGET_AFTER_S")]
    pub sidecar_forget_after_s: Option<u64>,
    /// Data parallel: learner processes of the run, each with a full model copy; gradients are
    /// all-reduced (gloo on the CPU, NCCL on CUDA) and every batch is one step [default: 1].
    #[arg(long, env = "GRPO_LEARNER_RANKS")]
    pub learner_ranks: Option<u64>,
    /// This process's rank: 0 talks to the Atropos API, checkpoints and publishes weights; the
    /// others train their share of each batch [default: 0].
    #[arg(long, env = "GRPO_LEARNER_RANK")]
    pub learner_rank: Option<u64>,
    /// HOST:PORT of the ranks' rendezvous (a c10d TCPStore that rank 0 serves); needed with
    /// --learner-ranks > 1.
    #[arg(long, env = "GRPO_LEARNER_RENDEZVOUS")]
    pub learner_rendezvous: Option<String>,
    /// The address this rank's collectives bind to and are reached at (not loopback when the
    /// run spans nodes) [default: 127.0.0.1].
    #[arg(long, env = "GRPO_LEARNER_BIND")]
    pub learner_bind: Option<std::net::IpAddr>,
    /// Deadline in seconds of every wait between learner ranks: the rendezvous, each
    /// collective, and an idle rank 0's keep-alive [default: 300].
    #[arg(long, env = "GRPO_DP_TIMEOUT_S")]
    pub dp_timeout_s: Option<u64>,
    /// Gradient all-reduce bucket size in MiB (whole layers per bucket) [default: 25].
    #[arg(long, env = "GRPO_DP_BUCKET_MB")]
    pub dp_bucket_mb: Option<u64>,
}

/// Data-parallel settings of one learner rank.
#[derive(Debug, Clone, PartialEq)]
pub struct DataParallelConfig {
    pub ranks: usize,
    pub rank: usize,
    /// The TCPStore rank 0 serves.
    pub host: String,
    pub port: u16,
    /// This rank's address for the collectives.
    pub bind: std::net::IpAddr,
    pub timeout: std::time::Duration,
    pub bucket_bytes: usize,
}

/// A validated learner configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnerConfig {
    pub model_name: PathBuf,
    pub atropos_url: String,
    pub lr: f64,
    pub training_steps: u64,
    pub batch_size: u64,
    /// Token-budget packing, when set.
    pub micro_batch_tokens: Option<usize>,
    /// With token-budget packing: each group's prompt once.
    pub shared_prompt: bool,
    pub gradient_accumulation_steps: u64,
    pub seq_len: u64,
    pub warmup_steps: u64,
    pub lr_schedule: ScheduleKind,
    pub clip_eps: f64,
    pub clip_eps_high: f64,
    pub clip_mode: ClipMode,
    pub is_cap: Option<f64>,
    pub kl_coef: f64,
    pub loss_agg: LossAgg,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub optimizer: OptimizerKind,
    pub train_layer_indices: Option<LayerSet>,
    /// LoRA training (the lora and lora-restart modes): what is adapted.
    pub lora: Option<crate::model::lora::LoraSpec>,
    pub merge_lora_on_save: bool,
    pub device: DeviceSpec,
    pub precision: Option<Precision>,
    pub exp_avg_dtype: Option<Precision>,
    pub gradient_checkpointing: Option<bool>,
    pub checkpoint_keep_layers: usize,
    pub logprob_chunk_tokens: i64,
    pub fused_adamw: bool,
    pub save_path: PathBuf,
    pub checkpoint_interval: u64,
    pub keep_checkpoints: Option<usize>,
    pub max_shard_bytes: u64,
    pub resume: bool,
    pub reset_api: bool,
    pub truncate_long: bool,
    pub allow_missing_logprobs: bool,
    pub seed: u64,
    pub wandb_group: String,
    pub wandb_project: String,
    pub poll_max_ms: u64,
    pub api_timeout_s: u64,
    pub prefetch: usize,
    pub grpc_listen: Option<SocketAddr>,
    /// Where /metrics is served.
    pub metrics_listen: SocketAddr,
    pub sync: SyncConfig,
    /// More than one learner rank: who this one is and where the ranks meet.
    pub data_parallel: Option<DataParallelConfig>,
}

/// Weight-sync settings of a learner.
/// `--sync-transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncTransport {
    Auto,
    Grpc,
    Nccl,
    Ipc,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    pub mode: BridgeMode,
    pub sidecars: Vec<String>,
    pub every: u64,
    pub restart_interval: u64,
    /// gRPC stream bucket size.
    pub bucket_bytes: u64,
    /// NCCL bucket size (groups of whole tensors).
    pub nccl_bucket_bytes: u64,
    pub transport: SyncTransport,
    pub deadline_s: u64,
    pub auth_token: Option<String>,
    /// Shared mode: where the colocated engine serves HTTP.
    pub engine_listen: Option<SocketAddr>,
    /// Who may RegisterSidecar: loopback, the --sidecar hosts, and these.
    pub sidecar_allow: Vec<std::net::IpAddr>,
    /// A sidecar unreachable this long is forgotten.
    pub forget_after: std::time::Duration,
    /// TLS of the learner's gRPC listener and of its `https://` sidecars.
    pub tls: crate::rpc::tls::Tls,
}

impl SyncConfig {
    /// Whether anything needs weights published.
    pub fn enabled(&self) -> bool {
        self.mode == BridgeMode::Shared || !self.sidecars.is_empty()
    }
}

/// Longest `--sync-deadline-s` (a year): the sync client multiplies it by up to 12 and adds
/// to it, which must not overflow a `Duration`.
pub const MAX_DEADLINE_S: u64 = 365 * 86_400;

macro_rules! merge_fields {
    ($a:ident, $b:ident, $($f:ident),* $(,)?) => {
        LearnerArgs { config: $a.config.or($b.config), $($f: $a.$f.or($b.$f)),* }
    };
}

fn check(ok: bool, flag: &'static str, reason: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { flag, reason: reason() })
    }
}

impl LearnerArgs {
    /// Fills fields left unset (by flags and env) from `file`.
    pub fn merged_with(self, file: LearnerArgs) -> LearnerArgs {
        merge_fields!(
            self,
            file,
            model_name,
            atropos_url,
            lr,
            training_steps,
            batch_size,
            micro_batch_tokens,
            shared_prompt,
            gradient_accumulation_steps,
            seq_len,
            warmup_steps,
            lr_schedule,
            clip_eps,
            clip_eps_high,
            clip_mode,
            is_cap,
            kl_coef,
            loss_agg,
            max_grad_norm,
            weight_decay,
            optimizer,
            train_layer_indices,
            lora_r,
            lora_alpha,
            lora_dropout,
            lora_target_modules,
            lora_layer_indices,
            merge_lora_on_save,
            device,
            precision,
            exp_avg_dtype,
            gradient_checkpointing,
            checkpoint_keep_layers,
            logprob_chunk_tokens,
            fused_adamw,
            save_path,
            checkpoint_interval,
            keep_checkpoints,
            max_shard_mb,
            resume,
            reset_api,
            truncate_long,
            allow_missing_logprobs,
            seed,
            wandb_group,
            wandb_project,
            poll_max_ms,
            api_timeout_s,
            prefetch,
            grpc_listen,
            sidecar,
            weight_bridge_mode,
            sync_every,
            vllm_restart_interval,
            sync_bucket_mb,
            sync_transport,
            sync_deadline_s,
            auth_token,
            auth_token_file,
            tls_cert,
            tls_key,
            tls_ca,
            colocate_engine,
            engine_listen,
            metrics_listen,
            sidecar_allow,
            sidecar_forget_after_s,
            learner_ranks,
            learner_rank,
            learner_rendezvous,
            learner_bind,
            dp_timeout_s,
            dp_bucket_mb,
        )
    }

    /// Reads a TOML file of learner settings.
    pub fn from_file(path: &Path) -> Result<LearnerArgs, ConfigError> {
        let file_err = |reason: String| ConfigError::File {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        Self::from_toml_str(&text).map_err(|e| file_err(e.to_string()))
    }

    /// Parses learner settings from TOML text (what [`LearnerArgs::from_file`] reads); the
    /// values are checked later, by [`LearnerArgs::resolve`].
    pub fn from_toml_str(text: &str) -> Result<LearnerArgs, toml::de::Error> {
        toml::from_str(text)
    }

    /// Merges the `--config` file (if any), applies defaults and validates every value.
    pub fn resolve(self) -> Result<LearnerConfig, ConfigError> {
        let args = match self.config.clone() {
            Some(path) => {
                let file = Self::from_file(&path)?;
                self.merged_with(file)
            }
            None => self,
        };
        // (Broadcast stands for every mode that trains full weights.)
        let lora = resolve_lora(&args, args.weight_bridge_mode.unwrap_or(BridgeMode::Broadcast))?;
        let data_parallel = resolve_data_parallel(&args)?;
        let model_name = args
            .model_name
            .clone()
            .ok_or(ConfigError::Missing { flag: "model-name" })?;
        check(model_name.join("config.json").is_file(), "model-name", || {
            format!(
                "{} has no config.json (a local HF model directory is expected)",
                model_name.display()
            )
        })?;
        let atropos_url = args
            .atropos_url
            .clone()
            .unwrap_or_else(|| "http://localhost:8000".into());
        check(atropos_url.starts_with("http://"), "atropos-url", || {
            format!("{atropos_url:?} must be an http:// URL")
        })?;
        let step = resolve_step_size(&args)?;
        let loss = resolve_loss(&args)?;
        let train_layer_indices = args
            .train_layer_indices
            .as_deref()
            .map(|s| s.parse::<LayerSet>())
            .transpose()
            .map_err(|e| ConfigError::Invalid {
                flag: "train-layer-indices",
                reason: e.to_string(),
            })?;
        let device = DeviceSpec::resolve(args.device.as_deref())?;
        let logprob_chunk_tokens = args.logprob_chunk_tokens.unwrap_or(1024);
        check(logprob_chunk_tokens > 0, "logprob-chunk-tokens", || {
            format!("must be positive (got {logprob_chunk_tokens})")
        })?;
        check(
            args.gradient_checkpointing != Some(false) || args.checkpoint_keep_layers.unwrap_or(0) == 0,
            "checkpoint-keep-layers",
            || "keeps layers out of gradient checkpointing, which --gradient-checkpointing false turns off".into(),
        )?;
        let io = resolve_io(&args)?;
        check(
            lora.is_none() || train_layer_indices.is_none(),
            "train-layer-indices",
            || "LoRA freezes the base: limit the adapted layers with --lora-layer-indices".into(),
        )?;
        let (sync, metrics_listen) = resolve_sync(&args, device, data_parallel.is_some())?;
        if super::addr::multi_node() {
            super::addr::check_url("atropos-url", &atropos_url)?;
            for url in &sync.sidecars {
                super::addr::check_url("sidecar", url)?;
            }
            if let Some(addr) = args.grpc_listen {
                super::addr::check_listen("grpc-listen", addr)?;
            }
        }
        Ok(LearnerConfig {
            sync,
            model_name,
            atropos_url: atropos_url.trim_end_matches('/').to_string(),
            lr: step.lr,
            training_steps: step.training_steps,
            batch_size: step.batch_size,
            micro_batch_tokens: step.micro_batch_tokens,
            shared_prompt: step.shared_prompt,
            gradient_accumulation_steps: step.gradient_accumulation_steps,
            seq_len: step.seq_len,
            warmup_steps: args.warmup_steps.unwrap_or(0),
            lr_schedule: args.lr_schedule.unwrap_or(ScheduleKind::Constant),
            clip_eps: loss.clip_eps,
            clip_eps_high: loss.clip_eps_high,
            clip_mode: args.clip_mode.unwrap_or(ClipMode::Standard),
            is_cap: args.is_cap,
            kl_coef: loss.kl_coef,
            loss_agg: args.loss_agg.unwrap_or(LossAgg::SeqMeanTokenMean),
            max_grad_norm: loss.max_grad_norm,
            weight_decay: loss.weight_decay,
            optimizer: args.optimizer.unwrap_or(OptimizerKind::Adamw),
            train_layer_indices,
            lora,
            merge_lora_on_save: args.merge_lora_on_save.unwrap_or(false),
            device,
            precision: args.precision,
            exp_avg_dtype: args.exp_avg_dtype,
            gradient_checkpointing: args.gradient_checkpointing,
            checkpoint_keep_layers: args.checkpoint_keep_layers.unwrap_or(0),
            logprob_chunk_tokens,
            fused_adamw: args.fused_adamw.unwrap_or(true),
            save_path: args
                .save_path
                .unwrap_or_else(|| PathBuf::from("trained_model_checkpoints")),
            checkpoint_interval: args.checkpoint_interval.unwrap_or(3),
            keep_checkpoints: io.keep_checkpoints,
            max_shard_bytes: io.max_shard_mb * 1024 * 1024,
            resume: args.resume.unwrap_or(false),
            reset_api: args.reset_api.unwrap_or(false),
            truncate_long: args.truncate_long.unwrap_or(false),
            allow_missing_logprobs: args.allow_missing_logprobs.unwrap_or(false),
            seed: args.seed.unwrap_or(0),
            wandb_group: args.wandb_group.unwrap_or_default(),
            wandb_project: args.wandb_project.unwrap_or_default(),
            poll_max_ms: args.poll_max_ms.unwrap_or(2000).max(10),
            api_timeout_s: io.api_timeout_s,
            prefetch: io.prefetch,
            grpc_listen: args.grpc_listen,
            metrics_listen,
            data_parallel,
        })
    }
}

/// The run's size: learning rate, steps, batches, packing and sequence length.
struct StepSize {
    lr: f64,
    training_steps: u64,
    batch_size: u64,
    micro_batch_tokens: Option<usize>,
    shared_prompt: bool,
    gradient_accumulation_steps: u64,
    seq_len: u64,
}

/// The loss's clipping and KL, and the optimizer's gradient clip and decay.
struct LossNumbers {
    clip_eps: f64,
    clip_eps_high: f64,
    kl_coef: f64,
    max_grad_norm: f64,
    weight_decay: f64,
}

/// Checkpoint retention and sharding, and the batch fetch's depth and timeout.
struct Io {
    keep_checkpoints: Option<usize>,
    max_shard_mb: u64,
    prefetch: usize,
    api_timeout_s: u64,
}

/// `--lr`, `--training-steps`, `--batch-size`, packing and `--seq-len`, checked.
fn resolve_step_size(args: &LearnerArgs) -> Result<StepSize, ConfigError> {
    let lr = args.lr.unwrap_or(1e-5);
    check(lr.is_finite() && lr > 0.0, "lr", || {
        format!("must be a positive number (got {lr})")
    })?;
    let training_steps = args.training_steps.unwrap_or(10);
    check(training_steps > 0, "training-steps", || "must be at least 1".into())?;
    let batch_size = args.batch_size.unwrap_or(2);
    check(batch_size > 0, "batch-size", || "must be at least 1".into())?;
    let micro_batch_tokens = args.micro_batch_tokens.map(|n| n as usize);
    check(micro_batch_tokens.is_none_or(|n| n >= 1), "micro-batch-tokens", || {
        "must be at least 1".into()
    })?;
    let shared_prompt = args.shared_prompt == Some(crate::grpo::pack::SharedPrompt::On);
    check(!shared_prompt || micro_batch_tokens.is_some(), "shared-prompt", || {
        "needs --micro-batch-tokens (shared prompts are laid out in packed rows)".into()
    })?;
    let gradient_accumulation_steps = args.gradient_accumulation_steps.unwrap_or(32);
    check(gradient_accumulation_steps > 0, "gradient-accumulation-steps", || {
        "must be at least 1".into()
    })?;
    let per_step = batch_size.checked_mul(gradient_accumulation_steps);
    check(per_step.is_some_and(|n| i64::try_from(n).is_ok()), "batch-size", || {
        format!("{batch_size} x --gradient-accumulation-steps {gradient_accumulation_steps} (the API's batch size) overflows an i64")
    })?;
    let seq_len = args.seq_len.unwrap_or(2048);
    check(seq_len >= 2, "seq-len", || {
        format!("must be at least 2 (got {seq_len})")
    })?;
    check(i64::try_from(seq_len).is_ok(), "seq-len", || {
        format!("is registered as max_token_len, an i64 (got {seq_len})")
    })?;
    Ok(StepSize {
        lr,
        training_steps,
        batch_size,
        micro_batch_tokens,
        shared_prompt,
        gradient_accumulation_steps,
        seq_len,
    })
}

/// The clip range, importance-sampling cap, KL, grad-norm clip and weight decay, checked.
fn resolve_loss(args: &LearnerArgs) -> Result<LossNumbers, ConfigError> {
    let clip_eps = args.clip_eps.unwrap_or(0.2);
    check(clip_eps > 0.0 && clip_eps < 1.0, "clip-eps", || {
        format!("must be in (0, 1) (got {clip_eps})")
    })?;
    let clip_eps_high = args.clip_eps_high.unwrap_or(clip_eps);
    check(
        clip_eps_high > 0.0 && clip_eps_high.is_finite(),
        "clip-eps-high",
        || format!("must be positive (got {clip_eps_high})"),
    )?;
    if let Some(cap) = args.is_cap {
        check(cap > 1.0 + clip_eps_high && cap.is_finite(), "is-cap", || {
            format!("must exceed 1 + clip-eps-high = {} (got {cap})", 1.0 + clip_eps_high)
        })?;
    }
    let kl_coef = args.kl_coef.unwrap_or(0.0);
    check(kl_coef >= 0.0 && kl_coef.is_finite(), "kl-coef", || {
        format!("must be >= 0 (got {kl_coef})")
    })?;
    let max_grad_norm = args.max_grad_norm.unwrap_or(1.0);
    check(max_grad_norm > 0.0, "max-grad-norm", || {
        format!("must be positive (got {max_grad_norm})")
    })?;
    let weight_decay = args.weight_decay.unwrap_or(0.01);
    check((0.0..1.0).contains(&weight_decay), "weight-decay", || {
        format!("must be in [0, 1) (got {weight_decay})")
    })?;
    Ok(LossNumbers {
        clip_eps,
        clip_eps_high,
        kl_coef,
        max_grad_norm,
        weight_decay,
    })
}

/// Checkpoint retention and shard size, prefetch depth and the API's timeout, checked.
fn resolve_io(args: &LearnerArgs) -> Result<Io, ConfigError> {
    let keep_checkpoints = args.keep_checkpoints;
    check(keep_checkpoints != Some(0), "keep-checkpoints", || {
        "must be at least 1".into()
    })?;
    let max_shard_mb = args.max_shard_mb.unwrap_or(2048);
    check(max_shard_mb > 0, "max-shard-mb", || "must be at least 1".into())?;
    check(max_shard_mb <= u64::MAX >> 20, "max-shard-mb", || {
        format!("must be at most {} (got {max_shard_mb})", u64::MAX >> 20)
    })?;
    let prefetch = args.prefetch.unwrap_or(2);
    check(prefetch > 0, "prefetch", || "must be at least 1".into())?;
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    check(prefetch <= most, "prefetch", || {
        format!("must be at most {most} (got {prefetch})")
    })?;
    let api_timeout_s = args.api_timeout_s.unwrap_or(30);
    check(api_timeout_s > 0, "api-timeout-s", || "must be at least 1".into())?;
    Ok(Io {
        keep_checkpoints,
        max_shard_mb,
        prefetch,
        api_timeout_s,
    })
}

/// The weight bridge and its transport, peers, listeners and tokens; and `--metrics-listen`,
/// which the same token guards off loopback.
fn resolve_sync(
    args: &LearnerArgs,
    device: DeviceSpec,
    data_parallel: bool,
) -> Result<(SyncConfig, SocketAddr), ConfigError> {
    let mode = args
        .weight_bridge_mode
        .unwrap_or(if args.colocate_engine == Some(true) {
            BridgeMode::Shared
        } else {
            BridgeMode::Broadcast
        });
    let colocate = args.colocate_engine.unwrap_or(false);
    let shared_sidecars = args.sidecar.as_ref().map_or(0, Vec::len);
    check(!colocate || mode == BridgeMode::Shared, "colocate-engine", || {
        "--colocate-engine and --weight-bridge-mode shared go together".into()
    })?;
    check(
        mode != BridgeMode::Shared || colocate != (shared_sidecars == 1),
        "weight-bridge-mode",
        || {
            "shared needs either --colocate-engine (the embedded engine in this process) or exactly one \
             --sidecar (a vLLM sidecar with --vllm-weight-transfer shared on this GPU)"
                .into()
        },
    )?;
    if mode == BridgeMode::Shared && !colocate {
        check(
            cfg!(feature = "cuda") && matches!(device, DeviceSpec::Cuda(_)),
            "weight-bridge-mode",
            || {
                "shared with a vLLM sidecar maps vLLM's GPU memory: it needs --device cuda:N and a build with --features cuda".into()
            },
        )?;
        check(!data_parallel, "learner-ranks", || {
            "shared mode with a vLLM sidecar trains on one learner rank".into()
        })?;
        check(args.precision != Some(Precision::Fp32), "precision", || {
            "shared mode with a vLLM sidecar computes in vLLM's bf16 weights: --precision bf16".into()
        })?;
    }
    let tls = super::auth::tls(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_ca.as_deref(),
    )?;
    let sidecars = args.sidecar.clone().unwrap_or_default();
    for s in &sidecars {
        super::auth::peer_url(s, &tls, "sidecar")?;
    }
    let sync_every = args.sync_every.unwrap_or(1);
    check(sync_every > 0, "sync-every", || "must be at least 1".into())?;
    let restart_interval = args.vllm_restart_interval.unwrap_or(3);
    check(restart_interval > 0, "vllm-restart-interval", || {
        "must be at least 1".into()
    })?;
    if let Some(mb) = args.sync_bucket_mb {
        check((1..=4096).contains(&mb), "sync-bucket-mb", || {
            format!("must be in 1..=4096 (got {mb})")
        })?;
    }
    let bucket_mb = args.sync_bucket_mb.map_or(16, |mb| mb.min(128));
    let nccl_bucket_mb = args.sync_bucket_mb.unwrap_or(512);
    let transport = args.sync_transport.unwrap_or(SyncTransport::Auto);
    check(
        !matches!(transport, SyncTransport::Nccl | SyncTransport::Ipc)
            || (cfg!(feature = "cuda") && matches!(device, DeviceSpec::Cuda(_))),
        "sync-transport",
        || format!("{transport:?} needs --device cuda:N and a build with --features cuda").to_lowercase(),
    )?;
    let deadline_s = args.sync_deadline_s.unwrap_or(10);
    check((1..=MAX_DEADLINE_S).contains(&deadline_s), "sync-deadline-s", || {
        format!("must be in 1..={MAX_DEADLINE_S} (got {deadline_s})")
    })?;
    let auth_token = super::auth::token(args.auth_token.clone(), args.auth_token_file.clone())?;
    let engine_listen = colocate.then(|| {
        args.engine_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9001)))
    });
    if let Some(addr) = args.grpc_listen {
        super::auth::loopback_or_token(addr, &auth_token, "grpc-listen")?;
    }
    if let Some(addr) = engine_listen {
        super::auth::loopback_or_token(addr, &auth_token, "engine-listen")?;
    }
    let metrics_listen = args
        .metrics_listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9400)));
    super::auth::loopback_or_token(metrics_listen, &auth_token, "metrics-listen")?;
    let forget_after_s = args.sidecar_forget_after_s.unwrap_or(600);
    check(forget_after_s > 0, "sidecar-forget-after-s", || {
        "must be at least 1".into()
    })?;
    let sync = SyncConfig {
        mode,
        sidecars,
        every: sync_every,
        restart_interval,
        bucket_bytes: bucket_mb << 20,
        nccl_bucket_bytes: nccl_bucket_mb << 20,
        transport,
        deadline_s,
        auth_token,
        engine_listen,
        sidecar_allow: args.sidecar_allow.clone().unwrap_or_default(),
        tls,
        forget_after: std::time::Duration::from_secs(forget_after_s),
    };
    Ok((sync, metrics_listen))
}

/// Longest `--dp-timeout-s`: far below NCCL's own 30 minutes.
pub const MAX_DP_TIMEOUT_S: u64 = 1200;

/// The data-parallel settings, when there is more than one learner rank.
fn resolve_data_parallel(args: &LearnerArgs) -> Result<Option<DataParallelConfig>, ConfigError> {
    let ranks = args.learner_ranks.unwrap_or(1);
    let rank = args.learner_rank.unwrap_or(0);
    check((1..=1024).contains(&ranks), "learner-ranks", || {
        format!("must be in 1..=1024 (got {ranks})")
    })?;
    check(rank < ranks, "learner-rank", || {
        format!("must be below --learner-ranks {ranks} (got {rank})")
    })?;
    if ranks == 1 {
        return Ok(None);
    }
    let rendezvous = args.learner_rendezvous.as_deref().ok_or(ConfigError::Missing {
        flag: "learner-rendezvous",
    })?;
    let (host, port) = rendezvous
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .filter(|(h, p)| !h.is_empty() && *p != 0)
        .ok_or_else(|| ConfigError::Invalid {
            flag: "learner-rendezvous",
            reason: format!("{rendezvous:?} is not HOST:PORT with a port above 0"),
        })?;
    let bind = args.learner_bind.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    if super::addr::multi_node() {
        super::addr::check_listen("learner-bind", SocketAddr::new(bind, port))?;
        super::addr::check_url("learner-rendezvous", &format!("http://{rendezvous}"))?;
    }
    let timeout_s = args.dp_timeout_s.unwrap_or(300);
    check((1..=MAX_DP_TIMEOUT_S).contains(&timeout_s), "dp-timeout-s", || {
        format!("must be in 1..={MAX_DP_TIMEOUT_S} (got {timeout_s})")
    })?;
    let bucket_mb = args.dp_bucket_mb.unwrap_or(25);
    check((1..=4096).contains(&bucket_mb), "dp-bucket-mb", || {
        format!("must be in 1..=4096 (got {bucket_mb})")
    })?;
    Ok(Some(DataParallelConfig {
        ranks: ranks as usize,
        rank: rank as usize,
        host: host.to_owned(),
        port,
        bind,
        timeout: std::time::Duration::from_secs(timeout_s),
        bucket_bytes: (bucket_mb as usize) << 20,
    }))
}

/// The LoRA spec of the lora and lora-restart modes (the Atropos trainer's defaults: r 16,
/// alpha 32, dropout 0.05, q_proj and v_proj); LoRA flags with another mode are an error.
fn resolve_lora(args: &LearnerArgs, mode: BridgeMode) -> Result<Option<crate::model::lora::LoraSpec>, ConfigError> {
    let given = args.lora_r.is_some()
        || args.lora_alpha.is_some()
        || args.lora_dropout.is_some()
        || args.lora_target_modules.is_some()
        || args.lora_layer_indices.is_some()
        || args.merge_lora_on_save.is_some();
    if !mode.is_lora() {
        check(!given, "lora-r", || {
            "the --lora-* flags train an adapter: use --weight-bridge-mode lora or lora-restart".into()
        })?;
        return Ok(None);
    }
    let r = args.lora_r.unwrap_or(16);
    check((1..=1024).contains(&r), "lora-r", || {
        format!("must be in 1..=1024 (got {r})")
    })?;
    let alpha = args.lora_alpha.unwrap_or(32.0);
    check(alpha.is_finite() && alpha > 0.0, "lora-alpha", || {
        format!("must be positive (got {alpha})")
    })?;
    let dropout = args.lora_dropout.unwrap_or(0.05);
    check((0.0..1.0).contains(&dropout), "lora-dropout", || {
        format!("must be in [0, 1) (got {dropout})")
    })?;
    use crate::model::lora::LoraTarget;
    let targets = args
        .lora_target_modules
        .clone()
        .unwrap_or_else(|| vec![LoraTarget::Q, LoraTarget::V]);
    let layers = args
        .lora_layer_indices
        .as_deref()
        .map(|s| s.parse::<LayerSet>())
        .transpose()
        .map_err(|e| ConfigError::Invalid {
            flag: "lora-layer-indices",
            reason: e.to_string(),
        })?;
    Ok(Some(crate::model::lora::LoraSpec {
        r,
        alpha,
        dropout,
        targets: targets.into_iter().collect(),
        layers: layers.map(|l| l.0),
    }))
}

impl LearnerConfig {
    /// Sequences per optimizer step, as registered with the API.
    pub fn api_batch_size(&self) -> u64 {
        self.batch_size * self.gradient_accumulation_steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.json"), "{}").expect("write");
        dir
    }

    /// One rank is no data parallelism; more need a rendezvous, a rank below the count, and a
    /// deadline below NCCL's 30 minutes.
    #[test]
    fn data_parallel_flags_are_checked() {
        let dir = model_dir();
        let base = || LearnerArgs {
            model_name: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        assert_eq!(base().resolve().expect("default").data_parallel, None);
        let dp = LearnerArgs {
            learner_ranks: Some(4),
            learner_rank: Some(3),
            learner_rendezvous: Some("10.0.0.7:29500".into()),
            learner_bind: Some("10.0.0.9".parse().expect("ip")),
            ..base()
        }
        .resolve()
        .expect("valid")
        .data_parallel
        .expect("data parallel");
        assert_eq!(
            (dp.ranks, dp.rank, dp.host.as_str(), dp.port),
            (4, 3, "10.0.0.7", 29500)
        );
        assert_eq!(dp.timeout, std::time::Duration::from_secs(300));
        assert_eq!(dp.bucket_bytes, 25 << 20);
        let refused = |args: LearnerArgs, flag: &str| {
            let err = args.resolve().expect_err("must be refused");
            assert!(err.to_string().contains(flag), "{flag}: {err}");
        };
        let two = || LearnerArgs {
            learner_ranks: Some(2),
            learner_rendezvous: Some("127.0.0.1:29500".into()),
            ..base()
        };
        refused(
            LearnerArgs {
                learner_rank: Some(2),
                ..two()
            },
            "learner-rank",
        );
        refused(
            LearnerArgs {
                learner_rendezvous: None,
                ..two()
            },
            "learner-rendezvous",
        );
        refused(
            LearnerArgs {
                learner_rendezvous: Some("127.0.0.1".into()),
                ..two()
            },
            "learner-rendezvous",
        );
        refused(
            LearnerArgs {
                learner_rendezvous: Some("h:0".into()),
                ..two()
            },
            "learner-rendezvous",
        );
        refused(
            LearnerArgs {
                dp_timeout_s: Some(1801),
                ..two()
            },
            "dp-timeout-s",
        );
        refused(
            LearnerArgs {
                learner_ranks: Some(0),
                ..base()
            },
            "learner-ranks",
        );
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = model_dir();
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "lr = 0.5\ntraining-steps = 7\nclip-mode = \"atropos\"\n").expect("write");
        let args = LearnerArgs {
            config: Some(file),
            model_name: Some(dir.path().to_path_buf()),
            lr: Some(0.25),
            ..Default::default()
        };
        let cfg = args.resolve().expect("valid");
        assert_eq!(cfg.lr, 0.25, "flag wins over file");
        assert_eq!(cfg.training_steps, 7, "file wins over default");
        assert_eq!(cfg.clip_mode, ClipMode::Atropos);
        assert_eq!(cfg.batch_size, 2, "default");
    }

    #[test]
    fn lora_modes_take_the_atropos_defaults_and_other_modes_refuse_lora_flags() {
        let dir = model_dir();
        let base = || LearnerArgs {
            model_name: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let cfg = LearnerArgs {
            weight_bridge_mode: Some(BridgeMode::Lora),
            ..base()
        }
        .resolve()
        .expect("lora");
        let lora = cfg.lora.expect("a LoRA spec");
        assert_eq!((lora.r, lora.alpha, lora.dropout), (16, 32.0, 0.05));
        assert_eq!(lora.targets.len(), 2, "q_proj and v_proj");
        assert!(lora.layers.is_none());
        let err = LearnerArgs {
            lora_r: Some(8),
            ..base()
        }
        .resolve()
        .expect_err("broadcast with --lora-r");
        assert!(err.to_string().contains("lora-r"), "{err}");
        let err = LearnerArgs {
            weight_bridge_mode: Some(BridgeMode::LoraRestart),
            train_layer_indices: Some("0-1".into()),
            ..base()
        }
        .resolve()
        .expect_err("LoRA with --train-layer-indices");
        assert!(err.to_string().contains("train-layer-indices"), "{err}");
        let err = LearnerArgs {
            weight_bridge_mode: Some(BridgeMode::Lora),
            lora_dropout: Some(1.0),
            ..base()
        }
        .resolve()
        .expect_err("dropout 1");
        assert!(err.to_string().contains("lora-dropout"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_flag() {
        let dir = model_dir();
        let base = || LearnerArgs {
            model_name: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let cases: Vec<(LearnerArgs, &str)> = vec![
            (
                LearnerArgs {
                    lr: Some(-1.0),
                    ..base()
                },
                "--lr",
            ),
            (
                LearnerArgs {
                    batch_size: Some(0),
                    ..base()
                },
                "--batch-size",
            ),
            (
                LearnerArgs {
                    clip_eps: Some(1.5),
                    ..base()
                },
                "--clip-eps",
            ),
            (
                LearnerArgs {
                    train_layer_indices: Some("3-1".into()),
                    ..base()
                },
                "--train-layer-indices",
            ),
            (
                LearnerArgs {
                    device: Some("tpu".into()),
                    ..base()
                },
                "--device",
            ),
            (
                LearnerArgs {
                    model_name: Some(PathBuf::from("/nonexistent")),
                    ..base()
                },
                "--model-name",
            ),
            (
                LearnerArgs {
                    atropos_url: Some("localhost:8000".into()),
                    ..base()
                },
                "--atropos-url",
            ),
            (
                LearnerArgs {
                    is_cap: Some(1.1),
                    ..base()
                },
                "--is-cap",
            ),
            (
                LearnerArgs {
                    gradient_checkpointing: Some(false),
                    checkpoint_keep_layers: Some(4),
                    ..base()
                },
                "--checkpoint-keep-layers",
            ),
        ];
        for (args, flag) in cases {
            let err = args.resolve().expect_err(flag).to_string();
            assert!(err.starts_with(flag), "{err:?} should name {flag}");
        }
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = model_dir();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "learning-rate = 1.0\n").expect("write");
        let args = LearnerArgs {
            config: Some(file),
            model_name: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let err = args.resolve().expect_err("unknown key").to_string();
        assert!(err.contains("learning-rate"), "{err}");
    }
}
