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
