//! The seeded driver: SplitMix64 case bytes, `catch_unwind` per case, panic capture, the hang
//! watchdog and the report.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use super::{FuzzTarget, Verdict, Violation};
use crate::engine::core::panic_text;
use crate::engine::sampler::Rng;

/// Longest case buffer, in bytes.
const MAX_CASE_BYTES: usize = 8192;

/// The bytes of case `case` of a run seeded with `seed`: a length (mostly 64 bytes to 8 KiB,
/// one case in eight shorter, so the ends of the buffer are reached too), then that many bytes.
pub fn case_bytes(seed: u64, case: u64) -> Vec<u8> {
    let mut rng = Rng::from_state(Rng::from_state(seed).next_u64() ^ case.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let r = rng.next_u64() as usize;
    let len = if r.is_multiple_of(8) {
        (r >> 3) % 64
    } else {
        64 + (r >> 3) % (MAX_CASE_BYTES - 64)
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// How a kept failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The code under test panicked.
    Panic,
    /// An accepted input broke an invariant of the next stage.
    Violation,
}

/// One failing case, enough to replay it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub target: &'static str,
    pub seed: u64,
    pub case: u64,
    /// The panic message, or the violation.
    pub message: String,
    /// `file:line:column` of a panic.
    pub location: Option<String>,
    /// The input, printable (clipped).
    pub input: String,
}

/// Failures of one kind at one place (a panic site, or one violated check).
#[derive(Debug, Clone)]
pub struct Site {
    pub count: u64,
    pub first: Failure,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = &self.first;
        let kind = match first.kind {
            FailureKind::Panic => "panic",
            FailureKind::Violation => "violation",
        };
        writeln!(
            f,
            "{kind} x{} in {}: {}{}",
            self.count,
            first.target,
            first.message,
            first
                .location
                .as_deref()
                .map(|l| format!(" (at {l})"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  first: case {} (replay: grpo-node bench fuzz --target {} --seed {} --case {})",
            first.case, first.target, first.seed, first.case
        )?;
        write!(f, "  input: {}", first.input)
    }
}

/// What a run of one target found.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub seed: u64,
    pub cases: u64,
    pub seconds: f64,
    pub panics: u64,
    pub violations: u64,
    /// Cases per verdict label (`accepted`, `skipped:...`, or the rejecting check).
    pub outcomes: BTreeMap<String, u64>,
    /// Panics and violations by site, each with its first case.
    pub sites: BTreeMap<String, Site>,
}

impl Report {
    /// Cases per second.
    pub fn rate(&self) -> f64 {
        self.cases as f64 / self.seconds.max(1e-9)
    }

    /// The verdicts, most frequent first.
    pub fn breakdown(&self) -> String {
        let mut rows: Vec<(&String, &u64)> = self.outcomes.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = rows.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!("{}: {}", self.target, parts.join(", "))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let accepted = self.outcomes.get("accepted").copied().unwrap_or(0);
        write!(
            f,
            "fuzz {:<8} seed {} cases {} seconds {:.1} cases/s {:.0} panics {} violations {} accepted {:.1}%",
            self.target,
            self.seed,
            self.cases,
            self.seconds,
            self.rate(),
            self.panics,
            self.violations,
            100.0 * accepted as f64 / self.cases.max(1) as f64
        )
    }
}

thread_local! {
    /// Set while this thread runs a case: its panics are captured, not printed.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The last captured panic: message and location.
    static CAPTURED: RefCell<Option<Panicked>> = const { RefCell::new(None) };
}

/// Installs (once per process) a panic hook that captures the panics of threads running a case
/// and hands every other panic to the hook that was there before.
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CAPTURING.with(Cell::get) {
                previous(info);
                return;
            }
            let message = panic_text(info.payload());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            CAPTURED.with(|c| *c.borrow_mut() = Some(Panicked { message, location }));
        }));
    });
}

/// `s`, cut to at most `max` characters.
pub(crate) fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}... ({} bytes in all)", &s[..at], s.len()),
        None => s.to_string(),
    }
}

/// A case that panicked: the panic's message, and where it was raised when the hook saw it.
struct Panicked {
    message: String,
    location: Option<String>,
}

/// Runs `f` with this thread's panics captured; a panic comes back as its message and location.
fn captured<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    CAPTURING.with(|c| c.set(true));
    let out = catch_unwind(AssertUnwindSafe(f));
    CAPTURING.with(|c| c.set(false));
    out.map_err(|payload| {
        CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_else(|| Panicked {
            message: panic_text(payload.as_ref()),
            location: None,
        })
    })
}

/// Watches the running case; one that runs past `limit` is reported and ends the process
/// (a stuck thread cannot be stopped from outside).
struct Watchdog {
    /// Milliseconds since `base` when the running case started, plus one; 0 = between cases.
    started: Arc<AtomicU64>,
    case: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    base: Instant,
}

impl Watchdog {
    fn start(target: &'static str, seed: u64, limit: Duration) -> Self {
        let dog = Self {
            started: Arc::new(AtomicU64::new(0)),
            case: Arc::new(AtomicU64::new(0)),
            done: Arc::new(AtomicBool::new(false)),
            base: Instant::now(),
        };
        let (started, case, done, base) = (dog.started.clone(), dog.case.clone(), dog.done.clone(), dog.base);
        let limit_ms = limit.as_millis() as u64;
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let at = started.load(Ordering::Relaxed);
                let now = base.elapsed().as_millis() as u64 + 1;
                if at != 0 && now.saturating_sub(at) > limit_ms && !done.load(Ordering::Relaxed) {
                    let k = case.load(Ordering::Relaxed);
                    eprintln!(
                        "hang in {target}: case {k} ran past {} s (replay: grpo-node bench fuzz --target {target} --seed {seed} --case {k})",
                        limit.as_secs()
                    );
                    std::process::exit(3);
                }
            }
        });
        dog
    }

    fn enter(&self, case: u64) {
        self.case.store(case, Ordering::Relaxed);
        self.started
            .store(self.base.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    fn leave(&self) {
        self.started.store(0, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Runs cases `0..cases` of `seed` on `target`; `hang` arms the watchdog.
pub fn run_target(target: &mut dyn FuzzTarget, seed: u64, cases: u64, hang: Option<Duration>) -> Report {
    run_range(target, seed, 0..cases, hang)
}

/// Runs the cases `range` of `seed` on `target`; `hang` arms the watchdog.
pub fn run_range(target: &mut dyn FuzzTarget, seed: u64, range: Range<u64>, hang: Option<Duration>) -> Report {
    install_hook();
    let mut report = Report {
        target: target.name(),
        seed,
        cases: 0,
        seconds: 0.0,
        panics: 0,
        violations: 0,
        outcomes: BTreeMap::new(),
        sites: BTreeMap::new(),
    };
    let dog = hang.map(|limit| Watchdog::start(target.name(), seed, limit));
    let started = Instant::now();
    for case in range {
        let data = case_bytes(seed, case);
        if let Some(d) = &dog {
            d.enter(case);
        }
        let outcome = captured(|| target.case(&data));
        if let Some(d) = &dog {
            d.leave();
        }
        report.cases += 1;
        record(&mut report, target, case, &data, outcome);
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// Books one case's outcome into the report.
fn record(
    report: &mut Report,
    target: &dyn FuzzTarget,
    case: u64,
    data: &[u8],
    outcome: Result<Result<Verdict, Violation>, Panicked>,
) {
    let (label, failure) = match outcome {
        Ok(Ok(Verdict::Accepted)) => ("accepted".to_string(), None),
        Ok(Ok(Verdict::Rejected(why))) => (format!("rejected:{why}"), None),
        Ok(Ok(Verdict::Skipped(why))) => (format!("skipped:{why}"), None),
        Ok(Err(v)) => {
            report.violations += 1;
            let key = format!("violation {}", v.check);
            (key.clone(), Some((key, FailureKind::Violation, v.to_string(), None)))
        }
        Err(Panicked { message, location }) => {
            report.panics += 1;
            let key = format!("panic {}", location.as_deref().unwrap_or("?"));
            (key.clone(), Some((key, FailureKind::Panic, message, location)))
        }
    };
    *report.outcomes.entry(label).or_default() += 1;
    let Some((key, kind, message, location)) = failure else {
        return;
    };
    if let Some(site) = report.sites.get_mut(&key) {
        site.count += 1;
        return;
    }
    let input = captured(|| target.render(data)).unwrap_or_else(|p| format!("(rendering panicked: {})", p.message));
    let first = Failure {
        kind,
        target: report.target,
        seed: report.seed,
        case,
        message,
        location,
        input: clip(&input, 4000),
    };
    report.sites.insert(key, Site { count: 1, first });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_bytes_are_deterministic_and_vary() {
        assert_eq!(case_bytes(7, 3), case_bytes(7, 3));
        assert_ne!(case_bytes(7, 3), case_bytes(7, 4));
        assert_ne!(case_bytes(7, 3), case_bytes(8, 3));
        assert!((0..200).all(|k| case_bytes(1, k).len() <= MAX_CASE_BYTES));
        assert!((0..200).any(|k| case_bytes(1, k).len() < 64));
    }

    struct Panicky;

    impl FuzzTarget for Panicky {
        fn name(&self) -> &'static str {
            "panicky"
        }
        fn case(&mut self, data: &[u8]) -> Result<Verdict, Violation> {
            match data.first().map(|b| b % 4) {
                Some(0) => panic!("boom {}", data.len()),
                Some(1) => Err(Violation {
                    check: "odd",
                    detail: "one".into(),
                }),
                Some(2) => Ok(Verdict::Rejected("two")),
                _ => Ok(Verdict::Accepted),
            }
        }
        fn render(&self, data: &[u8]) -> String {
            format!("{} bytes", data.len())
        }
    }

    #[test]
    fn panics_and_violations_are_counted_and_kept_once_per_site() {
        let report = run_target(&mut Panicky, 1, 400, None);
        assert_eq!(report.cases, 400);
        assert!(report.panics > 0 && report.violations > 0, "{report}");
        assert_eq!(report.sites.len(), 2, "{:?}", report.sites.keys());
        let panic = report
            .sites
            .values()
            .find(|s| s.first.kind == FailureKind::Panic)
            .map(|s| &s.first);
        let panic = panic.map(|p| (p.message.starts_with("boom"), p.location.is_some()));
        assert_eq!(panic, Some((true, true)));
        let sum: u64 = report.outcomes.values().sum();
        assert_eq!(sum, 400);
    }
}
