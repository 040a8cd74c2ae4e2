//! Process tuning a worker applies at start, before its runtime runs any
//! operator: what the kernel and the allocator should know about a
//! process that holds large state and must not stall while it
//! checkpoints.

/// The glibc allocator's threshold above which an allocation gets its own
/// mapping, returned to the kernel when freed.
const MMAP_THRESHOLD: libc::c_int = 128 << 10;

/// Free memory at the top of a glibc heap kept for reuse rather than
/// returned to the kernel.
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Fixes glibc's mmap threshold at its default (128 KiB), which turns off
/// its dynamic raise. The raise (up to 32 MiB, after the first large free)
/// moves large values, such as a service's 1 MiB entries rewritten under
/// copy-on-write, into the heap, where the freed ones fragment it and are
/// never returned: measured here with 1 GiB of 1 MiB values, a primary's
/// peak RSS was 1.87x its state (1.66x after the load) with the raise and
/// 1.26x (1.01x) without. A threshold the operator set
/// (`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...` or
/// `MALLOC_MMAP_THRESHOLD_`) is kept.
///
/// Fixing it also fixes the trim threshold, at 128 KiB unless set: every
/// free that leaves that much at the top of a heap gives it back, and the
/// next copy-on-write copies fault fresh pages in, which the kernel zeroes
/// on the processing thread. The trim threshold is set to 64 MiB (what the
/// dynamic raise reaches), unless the operator set one.
pub(crate) fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").ok();
        let settings = [
            (
                "MALLOC_MMAP_THRESHOLD_",
                "mmap_threshold",
                libc::M_MMAP_THRESHOLD,
                MMAP_THRESHOLD,
            ),
            (
                "MALLOC_TRIM_THRESHOLD_",
                "trim_threshold",
                libc::M_TRIM_THRESHOLD,
                TRIM_THRESHOLD,
            ),
        ];
        for (env, tunable, param, value) in settings {
            let by_operator = std::env::var_os(env).is_some();
            if !set_by_operator(by_operator, tunables.as_deref(), tunable) {
                // SAFETY: mallopt only sets an allocator parameter; it is
                // called before the runtime starts any other thread.
                unsafe { libc::mallopt(param, value) };
            }
        }
    }
}

/// Whether the operator set an allocator parameter: by its environment
/// variable (`env_set`), or as `tunable` (`mmap_threshold`) in
/// `GLIBC_TUNABLES`.
fn set_by_operator(env_set: bool, tunables: Option<&str>, tunable: &str) -> bool {
    env_set || tunables.is_some_and(|t| t.contains(tunable))
}

/// Asks the kernel for short time slices on the calling thread (EEVDF's
/// custom slice, Linux 6.12 and later): when it wakes, it then preempts a
/// thread running a default slice instead of waiting for that slice to
/// end. Its share of the CPU is unchanged. Threads and processes the
/// thread starts inherit the slice (see [`latency_critical_alone`]). The
/// SDK calls it on the thread that runs the operator, so a waking
/// processing thread does not wait for a serialization or upload thread.
/// Only a thread at the default policy is changed, and its nice value is
/// kept; an older kernel ignores the slice.
///
/// ```
/// // A thread of your own that waits for events and must answer at once:
/// let answers = std::thread::spawn(|| {
///     lazarus_sdk::latency_critical();
///     // ... wait for an event, answer it ...
/// });
/// answers.join().unwrap();
/// ```
pub fn latency_critical() {
    short_slice(false);
}

/// [`latency_critical`] for the calling thread alone: threads and
/// processes it starts get the kernel's default slice back
/// (`SCHED_RESET_ON_FORK`). Lazarus's supervisor and agents call it on
/// their runtime threads, which wait for events and must answer at once,
/// while the workers and programs they start are scheduled as if started
/// from a shell.
///
/// ```
/// // An event thread whose helpers and children keep the default slice:
/// let events = std::thread::spawn(|| {
///     lazarus_sdk::latency_critical_alone();
///     std::thread::spawn(|| { /* a helper: default slice */ }).join().unwrap();
/// });
/// events.join().unwrap();
/// ```
pub fn latency_critical_alone() {
    short_slice(true);
}

fn short_slice(reset_on_fork: bool) {
    // SAFETY: plain syscalls on the calling thread; no memory is passed.
    let (policy, nice) = unsafe {
        (
            libc::sched_getscheduler(0),
            libc::getpriority(libc::PRIO_PROCESS, 0),
        )
    };
    if policy != libc::SCHED_OTHER {
        return;
    }
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        // SCHED_FLAG_RESET_ON_FORK
        flags: u64::from(reset_on_fork),
        nice,
        priority: 0,
        // 100 µs, the shortest slice the kernel accepts.
        runtime: 100_000,
        deadline: 0,
        period: 0,
    };
    // SAFETY: sched_setattr(2) on the calling thread with a fully
    // initialised attribute of the size it states.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no short time slice");
    }
}

/// How long background work (serialization) runs before it offers its
/// core to a runnable thread: well under the processing thread's pause
/// goal of 1 ms.
const BACKGROUND_RUN: std::time::Duration = std::time::Duration::from_micros(200);

/// Called between steps of background work: when the work has run
/// [`BACKGROUND_RUN`] since the last offer, it offers its core
/// (`sched_yield`) and restarts `ran`. The kernel (built without
/// preemption here, 250 Hz) otherwise lets a serialization thread run to
/// the end of its slice while a runnable processing thread waits for that
/// core (3.6 ms measured with `perf sched`). When nothing else is runnable
/// the offer costs one system call.
pub(crate) fn yield_after(ran: &mut crate::clock::Stopwatch) {
    if ran.elapsed() >= BACKGROUND_RUN {
        std::thread::yield_now();
        *ran = crate::clock::Stopwatch::start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_an_allocator_setting_of_the_operator_is_kept() {
        let tunables = Some("glibc.malloc.trim_threshold=1048576:glibc.malloc.arena_max=2");
        assert!(set_by_operator(true, None, "mmap_threshold"));
        assert!(set_by_operator(false, tunables, "trim_threshold"));
        assert!(!set_by_operator(false, tunables, "mmap_threshold"));
        assert!(!set_by_operator(false, None, "trim_threshold"));
    }
}
