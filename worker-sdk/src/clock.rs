//! Time, in one place: the only module of the SDK that reads the clock
//! (clippy's `disallowed-methods` in `worker-sdk/clippy.toml` enforces
//! it). The SDK only measures how long its own steps take (a snapshot's
//! pause, an upload, a standby's restore); it decides nothing by the time.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

/// Measures how long something takes, from `start` on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stopwatch(Instant);

impl Stopwatch {
    /// Starts now.
    pub(crate) fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }

    /// Time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

/// CPU time the calling thread has used: how much of a step's wall time
/// was work and how much waiting for a core.
pub(crate) fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec it is given.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}
