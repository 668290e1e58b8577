//! The async runtime every role runs on, and how the process leaves it.
//!
//! A thread blocked inside NCCL or the CUDA driver may never return: NCCL's sends poll their
//! deadlines and abort, but a call that blocks inside the library cannot be polled. The
//! learner abandons such a thread after a watchdog and trains on, but two things at exit would
//! still wait for it: dropping a tokio runtime waits for every `spawn_blocking` task, and the C
//! exit handlers could tear CUDA down under a kernel that still waits on a dead peer.
//! [`block_on`] therefore waits a bounded grace for blocking work, and [`exit`] skips the exit
//! handlers while any [`DriverCall`] is still in flight. Files the node wrote (checkpoints,
//! `metrics.jsonl`) are already in the kernel by then; only the C exit handlers are skipped.

use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long leaving the runtime waits for blocking tasks still running.
pub const EXIT_GRACE: Duration = Duration::from_secs(10);

static DRIVER_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Marks a blocking call into NCCL or the CUDA driver that may never return; held by the
/// thread for the length of the call.
#[must_use = "the call counts as in flight only while the guard lives"]
pub struct DriverCall(());

impl DriverCall {
    /// Counts the calling thread as inside NCCL or the driver until the guard drops.
    pub fn enter() -> Self {
        DRIVER_CALLS.fetch_add(1, Ordering::SeqCst);
        Self(())
    }
}

impl Drop for DriverCall {
    fn drop(&mut self) {
        DRIVER_CALLS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Threads currently inside a [`DriverCall`].
pub fn driver_calls_in_flight() -> usize {
    DRIVER_CALLS.load(Ordering::SeqCst)
}

/// Runs `fut` on a new multi-threaded runtime, then leaves it without waiting more than
/// [`EXIT_GRACE`] for blocking tasks (an abandoned NCCL thread among them).
pub fn block_on<F: Future>(fut: F) -> std::io::Result<F::Output> {
    block_on_then_leave(fut, EXIT_GRACE)
}

fn block_on_then_leave<F: Future>(fut: F, grace: Duration) -> std::io::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let out = rt.block_on(fut);
    rt.shutdown_timeout(grace);
    Ok(out)
}

/// Ends the process with `code`. While a thread is still inside NCCL or the driver, the C exit
/// handlers are skipped (`_exit`), since CUDA's teardown could wait on that thread's kernel.
pub fn exit(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    let stuck = driver_calls_in_flight();
    if stuck > 0 {
        tracing::warn!(
            threads = stuck,
            "threads are still inside NCCL or the CUDA driver; exiting without exit handlers"
        );
        let _ = std::io::stderr().flush();
        // SAFETY: `_exit` ends the process at once; nothing after it runs.
        unsafe { libc::_exit(i32::from(code)) }
    }
    std::process::exit(i32::from(code))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_wedged_blocking_thread_does_not_hold_the_runtime_open() {
        // Test double of a thread stuck inside NCCL: a blocking task that waits for a message
        // that comes only after the runtime was left.
        let (release, wedged) = std::sync::mpsc::channel::<()>();
        let grace = Duration::from_millis(300);
        let started = Instant::now();
        let out = block_on_then_leave(
            async move {
                let (entered, inside) = tokio::sync::oneshot::channel();
                let _detached = tokio::task::spawn_blocking(move || {
                    let _call = DriverCall::enter();
                    let _ = entered.send(());
                    let _ = wedged.recv();
                });
                inside.await.unwrap();
                7
            },
            grace,
        )
        .unwrap();
        let took = started.elapsed();
        assert_eq!(out, 7);
        assert!(
            took >= grace,
            "the runtime waited its grace for blocking work ({took:?})"
        );
        assert!(
            took < grace + Duration::from_secs(5),
            "leaving the runtime took {took:?}"
        );
        assert!(driver_calls_in_flight() >= 1, "the wedged call still counts");
        release.send(()).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while driver_calls_in_flight() > 0 && Instant::now() < until {
            std::thread::yield_now();
        }
        assert_eq!(driver_calls_in_flight(), 0, "the guard's drop uncounts the call");
    }
}
