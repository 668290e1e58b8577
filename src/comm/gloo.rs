//! libtorch's own c10d on the CPU, through `csrc/dist.cpp`: a `TCPStore` for the rendezvous and
//! a `ProcessGroupGloo` for collectives, the engine `torch.distributed` runs with
//! `backend="gloo"`. Every wait has a deadline; a peer that dies fails the collective (gloo sees
//! its sockets close), a peer that hangs fails it at the deadline.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;

use tch::Tensor;

extern "C" {
    fn grpo_dist_store(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        world: c_int,
        timeout_ms: i64,
        bound_port: *mut u16,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn grpo_dist_store_free(store: *mut c_void);
    fn grpo_dist_group(
        store: *mut c_void,
        rank: c_int,
        world: c_int,
        bind_host: *const c_char,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn grpo_dist_group_free(group: *mut c_void);
    fn grpo_dist_allreduce(
        group: *mut c_void,
        tensor: *mut c_void,
        op: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn grpo_dist_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn grpo_dist_wait(work: *mut c_void, timeout_ms: i64, err: *mut c_char, err_len: usize) -> c_int;
    fn grpo_dist_work_free(work: *mut c_void);
}

/// Errors of the gloo process group.
#[derive(Debug, thiserror::Error)]
pub enum GlooError {
    #[error("TCPStore at {addr}: {message}")]
    Store { addr: String, message: String },
    #[error("joining the gloo group as rank {rank} of {world}: {message}")]
    Join { rank: usize, world: usize, message: String },
    #[error("{what}: {message}")]
    Collective { what: &'static str, message: String },
    #[error("{what} needs a dense CPU tensor")]
    NotCpu { what: &'static str },
    #[error("a host name with a NUL byte: {0:?}")]
    BadHost(String),
}

/// How a sum-or-max all-reduce combines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

fn message(err: &[c_char]) -> String {
    // SAFETY: the shim writes a NUL-terminated string into the buffer (zeroed beforehand).
    unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn c_host(host: &str) -> Result<CString, GlooError> {
    CString::new(host).map_err(|_| GlooError::BadHost(host.to_owned()))
}

/// Where the ranks meet, and how long every wait may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// The TCPStore's host (rank 0 serves it).
    pub host: String,
    /// Its port; 0 on rank 0 binds any free port (see [`Store::port`]).
    pub port: u16,
    /// The address this rank's gloo connections bind to and are reached at.
    pub bind: String,
    pub rank: usize,
    pub world: usize,
    /// Deadline of the store's connection, the group's set-up and every collective.
    pub timeout: Duration,
}

/// A TCPStore handle (the server on rank 0).
pub struct Store {
    raw: *mut c_void,
    port: u16,
}

// SAFETY: c10d's TCPStore is thread-safe; the handle is only freed in Drop.
unsafe impl Send for Store {}

impl Store {
    /// Connects to (rank 0: serves) the store of `rv`.
    pub fn open(rv: &Rendezvous) -> Result<Self, GlooError> {
        let host = c_host(&rv.host)?;
        let mut err = vec![0 as c_char; 1024];
        let mut port = 0u16;
        let world = c_int::try_from(rv.world).unwrap_or(c_int::MAX);
        // SAFETY: valid C strings and out-pointers for the duration of the call.
        let raw = unsafe {
            grpo_dist_store(
                host.as_ptr(),
                rv.port,
                c_int::from(rv.rank == 0),
                world,
                millis(rv.timeout),
                &mut port,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if raw.is_null() {
            return Err(GlooError::Store {
                addr: format!("{}:{}", rv.host, rv.port),
                message: message(&err),
            });
        }
        Ok(Self { raw, port })
    }

    /// The store's port (the one bound, when rank 0 asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: a handle from grpo_dist_store, freed once.
        unsafe { grpo_dist_store_free(self.raw) }
    }
}

/// One rank's membership of a gloo process group.
pub struct Group {
    raw: *mut c_void,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The store outlives the group that met through it.
    _store: Store,
}

// SAFETY: ProcessGroupGloo enqueues work from any thread; all our calls come from the one
// thread that owns the group, and the handle is only freed in Drop.
unsafe impl Send for Group {}

/// A started collective; [`Work::wait`] ends it.
#[must_use = "a collective must be waited for"]
pub struct Work {
    raw: *mut c_void,
    what: &'static str,
    timeout: Duration,
    /// The tensor the collective writes into stays alive until it is done.
    _tensor: Tensor,
}

impl Work {
    /// Waits until the collective completed (its tensor then holds the result), at most the
    /// group's deadline.
    pub fn wait(self) -> Result<(), GlooError> {
        let mut err = vec![0 as c_char; 1024];
        // SAFETY: a live work handle; `err` is writable for its length.
        let rc = unsafe { grpo_dist_wait(self.raw, millis(self.timeout), err.as_mut_ptr(), err.len()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(GlooError::Collective {
                what: self.what,
                message: message(&err),
            })
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: a handle from the shim, freed once. A collective still running keeps its own
        // references to the tensor and the group inside c10d.
        unsafe { grpo_dist_work_free(self.raw) }
    }
}

impl Group {
    /// Joins the group `rv` describes: waits (at most `rv.timeout`) until every rank arrived.
    pub fn join(store: Store, rv: &Rendezvous) -> Result<Self, GlooError> {
        let bind = c_host(&rv.bind)?;
        let mut err = vec![0 as c_char; 1024];
        let (rank, world) = (
            c_int::try_from(rv.rank).unwrap_or(c_int::MAX),
            c_int::try_from(rv.world).unwrap_or(c_int::MAX),
        );
        // SAFETY: a live store handle, a valid C string, a writable error buffer.
        let raw = unsafe {
            grpo_dist_group(
                store.raw,
                rank,
                world,
                bind.as_ptr(),
                millis(rv.timeout),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if raw.is_null() {
            return Err(GlooError::Join {
                rank: rv.rank,
                world: rv.world,
                message: message(&err),
            });
        }
        Ok(Self {
            raw,
            rank: rv.rank,
            world: rv.world,
            timeout: rv.timeout,
            _store: store,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn check_cpu(t: &Tensor, what: &'static str) -> Result<(), GlooError> {
        if t.device() != tch::Device::Cpu || !t.is_contiguous() {
            return Err(GlooError::NotCpu { what });
        }
        Ok(())
    }

    fn started(&self, raw: *mut c_void, what: &'static str, t: &Tensor, err: &[c_char]) -> Result<Work, GlooError> {
        if raw.is_null() {
            return Err(GlooError::Collective {
                what,
                message: message(err),
            });
        }
        Ok(Work {
            raw,
            what,
            timeout: self.timeout,
            _tensor: t.shallow_clone(),
        })
    }

    /// Starts an in-place all-reduce of `t` (dense, on the CPU) across the group.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Work, GlooError> {
        Self::check_cpu(t, "all-reduce")?;
        let mut err = vec![0 as c_char; 1024];
        let op = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
        };
        // SAFETY: live group and tensor handles for the call; c10d keeps its own references.
        let raw = unsafe { grpo_dist_allreduce(self.raw, t.as_ptr() as *mut c_void, op, err.as_mut_ptr(), err.len()) };
        self.started(raw, "all-reduce", t, &err)
    }

    /// Starts a broadcast of `t` (dense, on the CPU, the same shape on every rank) from `root`.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Work, GlooError> {
        Self::check_cpu(t, "broadcast")?;
        let mut err = vec![0 as c_char; 1024];
        let root = c_int::try_from(root).unwrap_or(c_int::MAX);
        // SAFETY: as in all_reduce.
        let raw =
            unsafe { grpo_dist_broadcast(self.raw, t.as_ptr() as *mut c_void, root, err.as_mut_ptr(), err.len()) };
        self.started(raw, "broadcast", t, &err)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: a handle from grpo_dist_group, freed once.
        unsafe { grpo_dist_group_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn rendezvous(port: u16, rank: usize, world: usize) -> Rendezvous {
        Rendezvous {
            host: "127.0.0.1".into(),
            port,
            bind: "127.0.0.1".into(),
            rank,
            world,
            timeout: Duration::from_secs(20),
        }
    }

    /// Three ranks on threads of one process: sums, maxima and a broadcast are right on every
    /// rank.
    #[test]
    fn three_ranks_reduce_and_broadcast() {
        let store = Store::open(&rendezvous(0, 0, 3)).unwrap();
        let port = store.port();
        assert_ne!(port, 0);
        let run = move |rank: usize, store: Option<Store>| {
            let rv = rendezvous(port, rank, 3);
            let store = store.unwrap_or_else(|| Store::open(&rv).unwrap());
            let g = Group::join(store, &rv).unwrap();
            let x = Tensor::from_slice(&[rank as f32 + 1.0, 10.0 * rank as f32]);
            g.all_reduce(&x, ReduceOp::Sum).unwrap().wait().unwrap();
            let m = Tensor::from_slice(&[rank as f64]);
            g.all_reduce(&m, ReduceOp::Max).unwrap().wait().unwrap();
            let b = if rank == 1 {
                Tensor::from_slice(&[7i64, 8, 9])
            } else {
                Tensor::zeros([3], (Kind::Int64, tch::Device::Cpu))
            };
            g.broadcast(&b, 1).unwrap().wait().unwrap();
            (
                Vec::<f32>::try_from(&x).unwrap(),
                m.double_value(&[0]),
                Vec::<i64>::try_from(&b).unwrap(),
            )
        };
        let others: Vec<_> = (1..3).map(|r| std::thread::spawn(move || run(r, None))).collect();
        let mut results = vec![run(0, Some(store))];
        results.extend(others.into_iter().map(|h| h.join().unwrap()));
        for (sum, max, b) in results {
            assert_eq!(sum, vec![6.0, 30.0]);
            assert_eq!(max, 2.0);
            assert_eq!(b, vec![7, 8, 9]);
        }
    }

    /// A rank whose peer never joins fails at the deadline instead of waiting for good.
    #[test]
    fn a_missing_peer_costs_the_deadline() {
        let mut rv = rendezvous(0, 0, 2);
        rv.timeout = Duration::from_secs(2);
        let store = Store::open(&rv).unwrap();
        let started = std::time::Instant::now();
        let Err(err) = Group::join(store, &rv) else {
            panic!("no peer: the join must fail");
        };
        assert!(matches!(err, GlooError::Join { rank: 0, world: 2, .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    }
}
