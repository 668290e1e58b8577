//! Target `config`: the learner's `--config FILE`, read as `LearnerArgs::resolve` reads it:
//! [`LearnerArgs::from_toml_str`] (what `from_file` does with the file's text), `merged_with`
//! under the flags, then `resolve` (defaults and every value check). A configuration that
//! resolves must also suit what the learner then does with it (sizes that do not overflow,
//! durations its clients can add and multiply, a semaphore tokio can make).
//!
//! Two things resolution touches are outside the text, and are pinned so no case reads the
//! machine's files: the model directory (a `--model-name` flag naming a directory with a
//! `config.json`, made by the target, overrides the file's in 7 cases of 8; in the rest the
//! file's path is only looked at), and `auth-token-file` (any path the file names is replaced
//! by one of the target's: a token, an empty file, or a missing one). A
//! `train-layer-indices` range over a million layers is not resolved (the known problem
//! reported with this harness: `LayerSet` expands every range into a set).
//!
//! Inputs: byte-mutated real configurations, and structure-aware tables of the learner's keys
//! (plus unknown, dotted and duplicate keys, and sections) with hostile values.

use std::path::PathBuf;
use std::time::Duration;

use arbitrary::{Result as ArbResult, Unstructured};

use crate::config::{ConfigError, LearnerArgs, LearnerConfig};

use super::hostile::{int_text, mutate, rare, string, toml_float, toml_str, toml_value, TOML_DICTIONARY};
use super::{ensure, FuzzTarget, Verdict, Violation};

/// The `config` target and the files it pins.
pub struct ConfigTarget {
    root: PathBuf,
}

/// Which file stands for a configuration's `auth-token-file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFile {
    Token,
    Empty,
    Missing,
}

/// One case: the file's text and how the outside world is pinned.
#[derive(Debug, Clone)]
pub struct ConfigCase {
    pub text: String,
    /// Whether `--model-name` names the target's model directory (else the file's is used).
    pub model_flag: bool,
    pub token_file: TokenFile,
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigRefusal {
    #[error("config file: {0}")]
    Toml(#[from] toml::de::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl ConfigTarget {
    /// Makes the model directory and token files under the system's temporary directory.
    pub fn new() -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("grpo-fuzz-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(root.join("model"))?;
        std::fs::write(root.join("model").join("config.json"), "{}")?;
        std::fs::write(root.join("token"), "s3cret\n")?;
        std::fs::write(root.join("empty-token"), "\n")?;
        Ok(Self { root })
    }

    /// The model directory `--model-name` names.
    pub fn model_dir(&self) -> PathBuf {
        self.root.join("model")
    }

    /// The file standing for `auth-token-file`.
    pub fn token_path(&self, which: TokenFile) -> PathBuf {
        self.root.join(match which {
            TokenFile::Token => "token",
            TokenFile::Empty => "empty-token",
            TokenFile::Missing => "missing-token",
        })
    }

    /// The learner's path for one case.
    pub fn learner_path(&self, case: &ConfigCase) -> Result<LearnerConfig, ConfigRefusal> {
        let file = LearnerArgs::from_toml_str(&case.text)?;
        Ok(self.resolve_file(file, case)?)
    }

    /// `merged_with` under the flags, then `resolve`, with the outside world pinned.
    fn resolve_file(&self, file: LearnerArgs, case: &ConfigCase) -> Result<LearnerConfig, ConfigError> {
        let file = LearnerArgs {
            auth_token_file: file.auth_token_file.as_ref().map(|_| self.token_path(case.token_file)),
            ..file
        };
        let flags = LearnerArgs {
            model_name: case.model_flag.then(|| self.model_dir()),
            ..Default::default()
        };
        flags.merged_with(file).resolve()
    }
}

impl Drop for ConfigTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Whether a `train-layer-indices` value holds a range of more than a million layers.
fn huge_layer_range(s: &str) -> bool {
    s.split(',').any(|part| {
        let parse = |x: &str| x.trim().parse::<i64>().ok();
        part.trim()
            .split_once('-')
            .and_then(|(a, b)| Some(parse(b)?.saturating_sub(parse(a)?)))
            .is_some_and(|span| span > 1_000_000)
    })
}

impl FuzzTarget for ConfigTarget {
    fn name(&self) -> &'static str {
        "config"
    }

    fn case(&mut self, data: &[u8]) -> Result<Verdict, Violation> {
        let Ok(case) = build(&mut Unstructured::new(data)) else {
            return Ok(Verdict::Rejected("no input"));
        };
        let Ok(file) = LearnerArgs::from_toml_str(&case.text) else {
            return Ok(Verdict::Rejected("toml"));
        };
        if file.train_layer_indices.as_deref().is_some_and(huge_layer_range) {
            return Ok(Verdict::Skipped("train-layer-indices over a million layers"));
        }
        let shard_mb = file.max_shard_mb;
        match self.resolve_file(file, &case) {
            Err(e) => Ok(Verdict::Rejected(flag_of(&e))),
            Ok(cfg) => check_resolved(&cfg, shard_mb).map(|()| Verdict::Accepted),
        }
    }

    fn render(&self, data: &[u8]) -> String {
        match build(&mut Unstructured::new(data)) {
            Ok(c) => format!(
                "model flag {}, token file {:?}, text:\n{}",
                c.model_flag, c.token_file, c.text
            ),
            Err(e) => format!("(no input: {e})"),
        }
    }
}

fn flag_of(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::Invalid { flag, .. } | ConfigError::Missing { flag } => flag,
        ConfigError::File { .. } => "file",
        ConfigError::LocalOnly(e) => e.flag,
    }
}

/// What the learner does with a resolved configuration must not overflow or panic.
fn check_resolved(cfg: &LearnerConfig, shard_mb: Option<u64>) -> Result<(), Violation> {
    let per_step = cfg.batch_size.checked_mul(cfg.gradient_accumulation_steps);
    ensure(
        per_step.is_some_and(|n| i64::try_from(n).is_ok()),
        "batch-size x gradient-accumulation-steps fits the API's i64",
        || format!("{} x {}", cfg.batch_size, cfg.gradient_accumulation_steps),
    )?;
    ensure(
        i64::try_from(cfg.seq_len).is_ok(),
        "seq-len fits the API's i64 max_token_len",
        || format!("seq-len {}", cfg.seq_len),
    )?;
    let shard = shard_mb.unwrap_or(2048).checked_mul(1 << 20);
    ensure(
        shard == Some(cfg.max_shard_bytes),
        "max-shard-mb in bytes fits u64",
        || format!("{shard_mb:?} MiB became {} bytes", cfg.max_shard_bytes),
    )?;
    ensure(
        cfg.prefetch <= tokio::sync::Semaphore::MAX_PERMITS,
        "prefetch is a semaphore tokio can make",
        || format!("prefetch {}", cfg.prefetch),
    )?;
    let longest_rpc = Duration::from_secs(cfg.sync.deadline_s)
        .checked_mul(12)
        .and_then(|d| d.checked_add(Duration::from_secs(120)));
    ensure(
        longest_rpc.is_some(),
        "sync-deadline-s x 12 + 120 s (the sync client's longest deadline) fits a Duration",
        || format!("sync-deadline-s {}", cfg.sync.deadline_s),
    )
}

/// Real configurations: the flags of cluster/local.toml's learner, and one with most keys.
const SEEDS: &[&str] = &[
    "batch-size = 32\ngradient-accumulation-steps = 4\nseq-len = 64\nlr = 1e-3\nwarmup-steps = 2\n\
     training-steps = 200\ncheckpoint-interval = 50\natropos-url = \"http://127.0.0.1:8000\"\n\
     sidecar = [\"http://127.0.0.1:50051\"]\nsave-path = \"runs/checkpoints\"\n",
    "lr = 0.5\ntraining-steps = 7\nclip-mode = \"atropos\"\nclip-eps = 0.2\nclip-eps-high = 0.28\n\
     is-cap = 2.0\nkl-coef = 0.01\nloss-agg = \"token-mean\"\nmax-grad-norm = 1.0\nweight-decay = 0.01\n\
     optimizer = \"adamw\"\ntrain-layer-indices = \"0-3,28-31\"\ndevice = \"cpu\"\nprecision = \"fp32\"\n\
     exp-avg-dtype = \"fp32\"\ngradient-checkpointing = true\nlogprob-chunk-tokens = 1024\n\
     fused-adamw = false\nkeep-checkpoints = 2\nmax-shard-mb = 2048\nresume = false\nreset-api = true\n\
     truncate-long = true\nallow-missing-logprobs = true\nseed = 3\nwandb-group = \"g\"\n\
     wandb-project = \"p\"\npoll-max-ms = 500\napi-timeout-s = 30\nprefetch = 2\n\
     grpc-listen = \"127.0.0.1:50052\"\nweight-bridge-mode = \"broadcast\"\nsync-every = 1\n\
     vllm-restart-interval = 3\nsync-bucket-mb = 16\nsync-transport = \"grpc\"\nsync-deadline-s = 10\n\
     auth-token-file = \"token\"\nlr-schedule = \"cosine\"\n",
    "weight-bridge-mode = \"shared\"\ncolocate-engine = true\nengine-listen = \"0.0.0.0:9001\"\nauth-token = \"t\"\n",
];

/// What a key's value is.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Float,
    Count,
    Bool,
    Text,
    Url,
    Urls,
    Addr,
    Choice(&'static [&'static str]),
}

const KEYS: &[(&str, Kind)] = &[
    ("model-name", Kind::Text),
    ("atropos-url", Kind::Url),
    ("lr", Kind::Float),
    ("training-steps", Kind::Count),
    ("batch-size", Kind::Count),
    ("gradient-accumulation-steps", Kind::Count),
    ("seq-len", Kind::Count),
    ("warmup-steps", Kind::Count),
    ("lr-schedule", Kind::Choice(&["constant", "cosine", "linear"])),
    ("clip-eps", Kind::Float),
    ("clip-eps-high", Kind::Float),
    ("clip-mode", Kind::Choice(&["standard", "atropos", "Standard"])),
    ("is-cap", Kind::Float),
    ("kl-coef", Kind::Float),
    ("loss-agg", Kind::Choice(&["seq-mean-token-mean", "token-mean", "sum"])),
    ("max-grad-norm", Kind::Float),
    ("weight-decay", Kind::Float),
    ("optimizer", Kind::Choice(&["adamw", "adamw_8bit", "adafactor"])),
    (
        "train-layer-indices",
        Kind::Choice(&["0-3,28-31", "3-1", "0-999999", "-1", "1,,2", "0-9223372036854775807"]),
    ),
    (
        "device",
        Kind::Choice(&["cpu", "cuda", "cuda:0", "cuda:7", "tpu", "cuda:-1"]),
    ),
    ("precision", Kind::Choice(&["bf16", "fp32", "fp16"])),
    ("exp-avg-dtype", Kind::Choice(&["bf16", "fp32"])),
    ("gradient-checkpointing", Kind::Bool),
    ("logprob-chunk-tokens", Kind::Count),
    ("fused-adamw", Kind::Bool),
    ("save-path", Kind::Text),
    ("checkpoint-interval", Kind::Count),
    ("keep-checkpoints", Kind::Count),
    ("max-shard-mb", Kind::Count),
    ("resume", Kind::Bool),
    ("reset-api", Kind::Bool),
    ("truncate-long", Kind::Bool),
    ("allow-missing-logprobs", Kind::Bool),
    ("seed", Kind::Count),
    ("wandb-group", Kind::Text),
    ("wandb-project", Kind::Text),
    ("poll-max-ms", Kind::Count),
    ("api-timeout-s", Kind::Count),
    ("prefetch", Kind::Count),
    ("grpc-listen", Kind::Addr),
    ("sidecar", Kind::Urls),
    (
        "weight-bridge-mode",
        Kind::Choice(&[
            "broadcast",
            "shared",
            "checkpoint",
            "shared_vllm",
            "none",
            "nccl",
            "lora",
            "lora_only",
            "lora-restart",
            "lora_restart",
        ]),
    ),
    ("lora-r", Kind::Count),
    ("lora-alpha", Kind::Float),
    ("lora-dropout", Kind::Float),
    ("lora-layer-indices", Kind::Choice(&["0-1", "5", "1-0", "-1"])),
    ("merge-lora-on-save", Kind::Bool),
    ("sync-every", Kind::Count),
    ("vllm-restart-interval", Kind::Count),
    ("sync-bucket-mb", Kind::Count),
    ("sync-transport", Kind::Choice(&["auto", "grpc", "nccl"])),
    ("sync-deadline-s", Kind::Count),
    ("auth-token", Kind::Text),
    ("auth-token-file", Kind::Text),
    ("colocate-engine", Kind::Bool),
    ("engine-listen", Kind::Addr),
];

/// A case from bytes.
pub fn build(u: &mut Unstructured) -> ArbResult<ConfigCase> {
    let model_flag = !rare(u, 8)?;
    let token_file = *u.choose(&[TokenFile::Token, TokenFile::Token, TokenFile::Empty, TokenFile::Missing])?;
    let text = match u.int_in_range(0..=5u8)? {
        0 => {
            let seed = *u.choose(SEEDS)?;
            String::from_utf8_lossy(&mutate(u, seed.as_bytes(), TOML_DICTIONARY)?).into_owned()
        }
        1 => {
            let seed = table(u, false)?;
            String::from_utf8_lossy(&mutate(u, seed.as_bytes(), TOML_DICTIONARY)?).into_owned()
        }
        _ => table(u, true)?,
    };
    Ok(ConfigCase {
        text,
        model_flag,
        token_file,
    })
}

/// `key = value` lines of the learner's keys; `hostile` adds wrong types, edge values,
/// unknown and duplicate keys, sections.
fn table(u: &mut Unstructured, hostile: bool) -> ArbResult<String> {
    let mut out = String::new();
    let mut used = std::collections::BTreeSet::new();
    for _ in 0..u.int_in_range(0..=14u8)? {
        let &(key, kind) = u.choose(KEYS)?;
        // A repeated key is a TOML error: only a hostile table repeats one, and seldom.
        if !(used.insert(key) || hostile && rare(u, 20)?) {
            continue;
        }
        if hostile && rare(u, 30)? {
            let odd = *u.choose(&["learning-rate", "batch_size", "config", "[learner]", "lr.x", "\"lr\""])?;
            out.push_str(odd);
        } else {
            out.push_str(key);
        }
        out.push_str(" = ");
        if hostile && rare(u, 25)? {
            toml_value(u, &mut out, 2)?;
        } else {
            value(u, &mut out, kind, hostile)?;
        }
        out.push('\n');
    }
    if hostile && rare(u, 12)? {
        out.push_str(u.choose(&["[section]\na = 1\n", "lr = 1\nlr = 2\n", "= 1\n", "x\n", "# comment\n"])?);
    }
    Ok(out)
}

fn value(u: &mut Unstructured, out: &mut String, kind: Kind, hostile: bool) -> ArbResult<()> {
    let edge = hostile && rare(u, 3)?;
    match kind {
        Kind::Float if edge => toml_float(u, out)?,
        Kind::Float => out.push_str(&format!("{:e}", f64::from(u.int_in_range(1..=2000u16)?) / 1000.0)),
        Kind::Count if edge => out.push_str(&int_text(u)?),
        Kind::Count => out.push_str(&u.int_in_range(0..=300u16)?.to_string()),
        Kind::Bool => out.push_str(if u.arbitrary()? { "true" } else { "false" }),
        Kind::Text if edge => toml_str(out, &string(u)?),
        Kind::Text => toml_str(out, u.choose(&["runs/x", "token", "", "/tmp/m"])?),
        Kind::Url if edge => toml_str(out, &string(u)?),
        Kind::Url => toml_str(
            out,
            u.choose(&["http://127.0.0.1:8000", "http://h:1/", "https://h", "h:1"])?,
        ),
        Kind::Urls => {
            out.push('[');
            for i in 0..u.int_in_range(0..=3u8)? {
                if i > 0 {
                    out.push_str(", ");
                }
                value(u, out, Kind::Url, hostile)?;
            }
            out.push(']');
        }
        Kind::Addr => {
            let picks = [
                "127.0.0.1:50051",
                "0.0.0.0:50051",
                "[::1]:1",
                "[::]:9001",
                "localhost:1",
                "1.2.3.4:70000",
            ];
            toml_str(out, u.choose(&picks)?);
        }
        Kind::Choice(_) if edge => toml_str(out, &string(u)?),
        Kind::Choice(values) => toml_str(out, u.choose(values)?),
    }
    Ok(())
}

/// Resolves `text` as a configuration file with the target's model directory and token
/// (for tests that write their own cases).
pub fn resolve_text(target: &ConfigTarget, text: &str) -> Result<LearnerConfig, ConfigRefusal> {
    target.learner_path(&ConfigCase {
        text: text.to_string(),
        model_flag: true,
        token_file: TokenFile::Token,
    })
}
