//! The agent's side of a worker's exit word
//! ([`lazarus_sdk::protocol::EXIT_WORD_ENV`]): learning that a worker
//! process is dying when the kernel starts to end it, not when it has
//! freed the process's memory.
//!
//! A SIGKILLed worker holding 1.3 GB is torn down for about 120 ms here
//! before `waitpid` returns or its sockets close; the word is cleared
//! within a millisecond of the kill. The exit status is already known to
//! the kernel then (`/proc/<pid>/task/<tid>/stat`, of a thread that is
//! exiting), so the exit is reported at once, with its real status. A
//! process that never armed its word (not a worker-SDK binary, an older
//! SDK) is reported when it has ended, as before.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lazarus_sdk::protocol::{EXIT_WORD_ENV, EXIT_WORD_NAME};
use tokio::sync::oneshot;

/// How long the watcher sleeps on the word between checks that it is
/// still wanted.
const RECHECK: Duration = Duration::from_secs(1);

/// How long after the word cleared the watcher looks for the exit status,
/// and how often. The thread that cleared it may be gone by the first
/// look, and on a busy machine the others may not have run yet (each sets
/// the status on its way out); a clean exit never sets one.
const STATUS_WAIT: Duration = Duration::from_millis(50);
const STATUS_POLL: Duration = Duration::from_micros(200);

/// `PF_EXITING` in a task's flags (`/proc/.../stat`, field 9): the task is
/// in `do_exit`, and its `exit_code` (field 52) is final once nonzero.
const PF_EXITING: u64 = 0x4;

/// One page of shared memory holding one word, mapped here.
struct Mapping(*mut libc::c_void);

// SAFETY: the mapping is only accessed through atomics, from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn word(&self) -> &AtomicU32 {
        // SAFETY: page-aligned and mapped for as long as `self` lives.
        unsafe { &*(self.0 as *const AtomicU32) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `ExitWord::new`; no reference
        // into it outlives `self`.
        unsafe { libc::munmap(self.0, std::mem::size_of::<AtomicU32>()) };
    }
}

/// A fresh exit word for a process about to be started: its memfd (to be
/// inherited) and the agent's mapping of it.
pub struct ExitWord {
    fd: OwnedFd,
    map: Arc<Mapping>,
}

impl ExitWord {
    /// A zeroed word in a new memfd, closed on exec unless the child
    /// clears that ([`ExitWord::inherit`]).
    pub fn new() -> std::io::Result<ExitWord> {
        let name = std::ffi::CString::new(EXIT_WORD_NAME).expect("no NUL in the name");
        // SAFETY: memfd_create takes a NUL-terminated name; the returned
        // descriptor is owned from here on.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = std::mem::size_of::<AtomicU32>();
        // SAFETY: plain syscalls on the owned descriptor.
        let ptr = unsafe {
            if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ExitWord {
            fd,
            map: Arc::new(Mapping(ptr)),
        })
    }

    /// The environment variable and value that tell the child its word.
    pub fn env(&self) -> (&'static str, String) {
        (EXIT_WORD_ENV, self.fd.as_raw_fd().to_string())
    }

    /// The descriptor the child must inherit: pass it to
    /// [`inherit`] between fork and exec.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Closes the agent's descriptor (the child has its own by now) and
    /// watches the word of process `pid` from a thread of its own.
    pub fn watch(self, pid: u32) -> Watch {
        drop(self.fd);
        let (tx, rx) = oneshot::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let map = self.map.clone();
        let thread_stop = stop.clone();
        let started = std::thread::Builder::new()
            .name(format!("exit-word-{pid}"))
            .stack_size(64 << 10)
            .spawn(move || {
                if let Some(tid) = watch(&map, &thread_stop) {
                    match wait_status(pid, tid, &thread_stop) {
                        Some(raw) => {
                            let _ = tx.send(raw);
                        }
                        None => tracing::debug!(
                            pid,
                            "exit word cleared, no exit status set: the exit is waited for"
                        ),
                    }
                }
            });
        if let Err(e) = started {
            tracing::warn!(pid, error = %e, "cannot watch the exit word; the exit is seen when the process has ended");
        }
        Watch {
            map: self.map,
            stop,
            rx: Some(rx),
        }
    }
}

/// Clears close-on-exec on `fd` in the child, between fork and exec.
///
/// # Safety
/// Call only between fork and exec (it is async-signal-safe: one fcntl).
pub unsafe fn inherit(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor of this (child) process.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A watched exit word. Dropping it stops the watcher.
pub struct Watch {
    map: Arc<Mapping>,
    stop: Arc<AtomicBool>,
    rx: Option<oneshot::Receiver<i32>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        futex_wake(self.map.word());
    }
}

impl Watch {
    /// Resolves with the process's exit status once its word was cleared
    /// and the kernel has set the status; pending for good otherwise (a
    /// word never armed, a status not readable: the caller's wait for
    /// the exit decides then).
    pub async fn dying(&mut self) -> ExitStatus {
        if let Some(rx) = self.rx.as_mut() {
            let raw = rx.await;
            self.rx = None;
            if let Ok(raw) = raw {
                return std::os::unix::process::ExitStatusExt::from_raw(raw);
            }
        }
        std::future::pending().await
    }
}

/// Waits on the word until the child armed it (a thread id) and then
/// cleared it (it is dying); returns the last thread id it held, or `None`
/// once `stop` is set.
fn watch(map: &Mapping, stop: &AtomicBool) -> Option<u32> {
    let word = map.word();
    let mut armed = 0;
    while !stop.load(Ordering::Acquire) {
        let now = word.load(Ordering::Acquire);
        if now == 0 && armed != 0 {
            return Some(armed);
        }
        if now != 0 {
            armed = now;
        }
        futex_wait(word, now, RECHECK);
    }
    None
}

/// The dying process's exit status, looked for every [`STATUS_POLL`] for at
/// most [`STATUS_WAIT`], until `stop` is set (its exit was waited for).
fn wait_status(pid: u32, tid: u32, stop: &AtomicBool) -> Option<i32> {
    let polls = STATUS_WAIT.as_micros() / STATUS_POLL.as_micros();
    for _ in 0..polls {
        if stop.load(Ordering::Acquire) {
            return None;
        }
        if let Some(raw) = dying_status(pid, tid) {
            return Some(raw);
        }
        std::thread::sleep(STATUS_POLL);
    }
    None
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a shared (not private) futex wait on a mapped word, bounded
    // by `ts`; the kernel only reads the word and the timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: wakes waiters on a mapped word.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// The wait status of dying process `pid` as the kernel set it for its
/// exiting threads: first the thread `tid` that cleared the word, then
/// any other thread in `do_exit`. `None` while none has it set (or for a
/// clean exit, status 0: then the exit itself is waited for).
fn dying_status(pid: u32, tid: u32) -> Option<i32> {
    let first = std::iter::once(format!("/proc/{pid}/task/{tid}/stat"));
    let rest = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("stat").to_string_lossy().into_owned());
    first
        .chain(rest)
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|s| exiting_code(&s))
}

/// A task's exit code from its `stat` line, if the task is exiting and
/// the code is set (nonzero).
fn exiting_code(stat: &str) -> Option<i32> {
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its closing one. Field 3 is the first after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let flags: u64 = fields.get(9 - 3)?.parse().ok()?;
    let code: i32 = fields.get(52 - 3)?.parse().ok()?;
    (flags & PF_EXITING != 0 && code != 0).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(comm: &str, flags: u64, code: i32) -> String {
        let mut f: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        f[0] = "R".into();
        f[9 - 3] = flags.to_string();
        f[52 - 3] = code.to_string();
        format!("4242 ({comm}) {}\n", f.join(" "))
    }

    #[test]
    fn test_exit_code_is_read_only_from_an_exiting_task() {
        assert_eq!(exiting_code(&stat("kv", PF_EXITING | 0x40, 9)), Some(9));
        assert_eq!(exiting_code(&stat("a) (b", PF_EXITING, 768)), Some(768));
        // Not exiting: a ptrace or job-control stop code is not an exit.
        assert_eq!(exiting_code(&stat("kv", 0x40, 19)), None);
        // Exiting, code not set yet (or a clean exit): wait for the exit.
        assert_eq!(exiting_code(&stat("kv", PF_EXITING, 0)), None);
        assert_eq!(exiting_code("4242 (kv) R 1 2"), None);
        assert_eq!(exiting_code("garbage"), None);
    }
}
