//! Time, in one place. Decisions (checkpoint coordinator, job controller,
//! leases, the VIP holder, host timeouts) never read a clock: their shells
//! pass the time in as a `Duration` since an arbitrary origin, read from a
//! [`Clock`]. Tests use a [`ManualClock`] and move it by hand, so timeouts
//! and leases are tested without sleeping.
//!
//! This is the only module allowed to call `Instant::now()` (clippy's
//! `disallowed-methods` in `runtime/clippy.toml` enforces it).
#![allow(clippy::disallowed_methods)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time for decisions, injected.
pub trait Clock: std::fmt::Debug + Send + Sync {
    /// Time since an arbitrary origin (monotonic).
    fn now(&self) -> Duration;
}

/// The real clock (monotonic, from the moment it was made).
#[derive(Debug, Clone, Copy)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl SystemClock {
    /// The tokio instant of `at` on this clock, for timers.
    pub fn deadline(&self, at: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + at)
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::SeqCst))
    }
}

/// Measures elapsed wall time (benchmarks, status lines, summaries).
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    /// Starts now.
    pub fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Now, as a tokio instant: for shells that arm timers relative to now.
pub fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}
