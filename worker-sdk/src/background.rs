//! Snapshot serialization on low-priority threads.
//!
//! Serializing a frozen part is bulk work that may take a core for tens of
//! milliseconds; the processing thread must never wait for it. So it runs
//! on threads of their own at the lowest CPU priority (nice 19): when the
//! processing thread wants a core, the scheduler gives it one at once, and
//! serialization takes whatever is left. Two threads, created on first use
//! and kept for the life of the process.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// Threads serializing at once.
const THREADS: usize = 2;

/// The queue of the serialization threads; `None` when none could start.
fn queue() -> Option<&'static Mutex<mpsc::Sender<Job>>> {
    static QUEUE: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let rx = std::sync::Arc::new(Mutex::new(rx));
            let mut started = 0;
            for i in 0..THREADS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("lazarus-serialize-{i}"))
                    .spawn(move || {
                        lower_priority(19);
                        loop {
                            // The lock is held only to take one job.
                            let job = match rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => return,
                            };
                            match job {
                                // A panicking job drops its answer (the
                                // caller sees it); the thread lives on.
                                Ok(job) => {
                                    let _ =
                                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                                }
                                Err(_) => return,
                            }
                        }
                    });
                match spawned {
                    Ok(_) => started += 1,
                    Err(e) => tracing::warn!(error = %e, "cannot start a serialization thread"),
                }
            }
            (started > 0).then(|| Mutex::new(tx))
        })
        .as_ref()
}

/// This thread at nice `nice` (Linux: nice is per thread). A failure only
/// costs the processing thread some CPU, so it is logged, not fatal.
pub(crate) fn lower_priority(nice: libc::c_int) {
    // SAFETY: gettid has no preconditions; setpriority on this thread's id.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot lower the serialization threads' priority");
    }
}

/// Runs `f` on a low-priority serialization thread and returns its result
/// (on tokio's blocking pool if no such thread could start).
pub(crate) async fn run<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let Some(queue) = queue() else {
        return tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| format!("serialization task: {e}"));
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    queue
        .lock()
        .map_err(|_| "serialization queue poisoned".to_string())?
        .send(job)
        .map_err(|_| "the serialization threads are gone".to_string())?;
    rx.await
        .map_err(|_| "a serialization job ended without an answer (it panicked)".to_string())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn test_runs_on_a_nice_19_thread() {
        let (name, nice) = super::run(|| {
            // SAFETY: getpriority of this thread.
            let nice = unsafe {
                libc::getpriority(
                    libc::PRIO_PROCESS,
                    libc::syscall(libc::SYS_gettid) as libc::id_t,
                )
            };
            (std::thread::current().name().map(str::to_string), nice)
        })
        .await
        .expect("ran");
        assert!(name.is_some_and(|n| n.starts_with("lazarus-serialize-")));
        assert_eq!(nice, 19);
    }
}
