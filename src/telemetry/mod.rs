//! Logging setup and the metrics sinks: `metrics.jsonl`, one human line on stderr per step,
//! and Prometheus `/metrics`.

pub mod metrics;
pub mod prom;

use tracing_subscriber::EnvFilter;

/// Installs the stderr logger; `RUST_LOG` overrides the default `info` level.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
