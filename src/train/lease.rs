//! A lease on the learner's live weights. A sync that sends straight from the buffer the
//! optimizer updates (no packing copy) takes a lease; the next optimizer step ends it before
//! writing: it waits until the sync gave the lease back, but never longer than the lease's
//! limit (a wedged sync costs that limit once, not a hang). After the end the lent version is
//! gone, and a sync that still wants it must refuse to send.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Lent: the weights are this version and must not change.
    Out,
    /// Given back by the sync.
    Returned,
    /// Ended by the writer without being given back (the limit passed).
    Expired,
}

/// How a lease ended for the writer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LeaseEnd {
    /// The sync gave it back; the writer waited this long.
    GivenBack(Duration),
    /// The limit passed first; the writer goes on anyway.
    TimedOut(Duration),
}

impl LeaseEnd {
    /// How long the writer waited.
    pub fn waited(&self) -> Duration {
        match self {
            Self::GivenBack(d) | Self::TimedOut(d) => *d,
        }
    }
}

/// One lease on one version of the live weights.
#[derive(Debug)]
pub struct Lease {
    state: Mutex<State>,
    changed: Condvar,
    limit: Duration,
}

impl Lease {
    /// A lease the writer waits on for at most `limit`.
    pub fn new(limit: Duration) -> Self {
        Self {
            state: Mutex::new(State::Out),
            changed: Condvar::new(),
            limit,
        }
    }

    /// The sync is done with the weights. Idempotent.
    pub fn give_back(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *s == State::Out {
            *s = State::Returned;
        }
        self.changed.notify_all();
    }

    /// Whether the weights are still the lent version (neither given back nor expired).
    pub fn is_out(&self) -> bool {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) == State::Out
    }

    /// Called by the writer before it changes the weights: waits until the lease is given
    /// back, at most its limit. Afterwards the lease is over either way.
    pub fn end(&self) -> LeaseEnd {
        let started = Instant::now();
        let until = started + self.limit;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *s != State::Out {
                return LeaseEnd::GivenBack(started.elapsed());
            }
            let now = Instant::now();
            if now >= until {
                *s = State::Expired;
                return LeaseEnd::TimedOut(started.elapsed());
            }
            s = self
                .changed
                .wait_timeout(s, until - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_writer_waits_for_the_give_back() {
        let lease = Arc::new(Lease::new(Duration::from_secs(60)));
        let sync = lease.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            tx.send(()).expect("send");
            sync.end()
        });
        rx.recv().expect("writer started");
        assert!(lease.is_out());
        lease.give_back();
        let end = writer.join().expect("writer");
        assert!(matches!(end, LeaseEnd::GivenBack(_)), "{end:?}");
        assert!(!lease.is_out());
        // Ending again (a second writer) does not wait.
        assert!(matches!(lease.end(), LeaseEnd::GivenBack(d) if d < Duration::from_secs(1)));
    }

    #[test]
    fn a_lease_never_given_back_expires_at_its_limit() {
        let lease = Lease::new(Duration::from_millis(30));
        let end = lease.end();
        assert!(
            matches!(end, LeaseEnd::TimedOut(d) if d >= Duration::from_millis(30)),
            "{end:?}"
        );
        assert!(!lease.is_out(), "the lent version is gone");
        lease.give_back(); // a late give-back changes nothing
        assert!(!lease.is_out());
    }
}
