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

/// What the calling thread has used so far: CPU time, page faults and
/// context switches. The difference of two readings around a step tells
/// where its wall time went: work, page faults (the kernel's, on the
/// thread's CPU time), waiting for a core (involuntary switches), waiting
/// on a lock or the disk (voluntary ones); wall time with none of these is
/// time the machine did not run the thread at all (a virtual CPU the host
/// had descheduled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ThreadUsage {
    pub(crate) cpu: Duration,
    pub(crate) page_faults: u64,
    pub(crate) voluntary_switches: u64,
    pub(crate) involuntary_switches: u64,
}

impl ThreadUsage {
    /// The calling thread's usage now (zeros where the kernel refuses).
    pub(crate) fn now() -> ThreadUsage {
        // SAFETY: all zeros is a valid rusage (integers and timevals).
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        #[cfg(target_os = "linux")]
        let who = libc::RUSAGE_THREAD;
        #[cfg(not(target_os = "linux"))]
        let who = libc::RUSAGE_SELF;
        // SAFETY: getrusage(2) writes one rusage it is given.
        if unsafe { libc::getrusage(who, &mut r) } != 0 {
            return ThreadUsage::default();
        }
        ThreadUsage {
            cpu: thread_cpu(),
            page_faults: (r.ru_minflt + r.ru_majflt) as u64,
            voluntary_switches: r.ru_nvcsw as u64,
            involuntary_switches: r.ru_nivcsw as u64,
        }
    }

    /// What was used between `earlier` and this reading.
    pub(crate) fn since(&self, earlier: &ThreadUsage) -> ThreadUsage {
        ThreadUsage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            page_faults: self.page_faults.saturating_sub(earlier.page_faults),
            voluntary_switches: self
                .voluntary_switches
                .saturating_sub(earlier.voluntary_switches),
            involuntary_switches: self
                .involuntary_switches
                .saturating_sub(earlier.involuntary_switches),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_thread_usage_counts_this_threads_work_and_faults() {
        let before = ThreadUsage::now();
        // Work: a loop the optimizer cannot drop.
        let mut x = 1u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        // Faults: fresh pages, each touched once.
        let mut pages = vec![0u8; 64 << 20];
        for p in pages.iter_mut().step_by(4096) {
            *p = 1;
        }
        std::hint::black_box(&pages);
        let used = ThreadUsage::now().since(&before);
        assert!(used.cpu > Duration::from_micros(500), "{used:?}");
        assert!(used.page_faults >= 1, "{used:?}");
        assert_eq!(
            ThreadUsage::now().since(&ThreadUsage::now()),
            ThreadUsage::default(),
            "an earlier reading less a later one saturates at zero"
        );
    }
}
