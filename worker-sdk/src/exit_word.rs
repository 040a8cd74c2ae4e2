//! The worker's side of its exit word ([`crate::protocol::EXIT_WORD_ENV`]):
//! a parked thread whose end the kernel announces in memory the agent
//! shares, the moment the process starts to die.
//!
//! A process killed with 1 GiB of state takes the kernel about 100 ms to
//! tear down before its exit can be waited for or its sockets close; the
//! kernel clears a thread's registered tid word (and wakes its futex) as
//! the thread leaves the address space, before the last thread out frees
//! it. The agent waits on the word and reports the exit then.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::protocol::{EXIT_WORD_ENV, EXIT_WORD_NAME};

/// Threads registered to clear the word. The kernel clears a thread's word
/// only while another thread still uses the address space (the last one
/// out frees it, and only then the process can be waited for), and which
/// thread of a dying process is last is up to the scheduler: measured here,
/// one registered thread among three to seven was last in 2 to 8 kills of
/// 10. Of two, at most one is last: the other clears the word first.
const REGISTERED_THREADS: usize = 2;

/// Arms the exit word the agent passed (if it passed one): maps it, closes
/// the descriptor (nothing this process starts inherits it) and parks
/// threads registered to clear it. Anything amiss is logged and skipped:
/// the agent then sees the exit when the process has ended, as without it.
pub(crate) fn arm() {
    let Ok(value) = std::env::var(EXIT_WORD_ENV) else {
        return;
    };
    match map(&value) {
        Ok(word) => {
            for i in 0..REGISTERED_THREADS {
                let parked = std::thread::Builder::new()
                    .name(format!("lazarus-exit-{i}"))
                    .stack_size(64 << 10)
                    .spawn(move || park_registered(word));
                if let Err(e) = parked {
                    tracing::warn!(error = %e, "cannot start an exit-word thread; the agent may see this process's exit only when it has ended");
                }
            }
        }
        Err(why) => {
            tracing::warn!(%why, "exit word not armed; the agent sees this process's exit when it has ended");
        }
    }
}

/// Maps the shared word behind descriptor `value` and closes the
/// descriptor.
fn map(value: &str) -> Result<&'static AtomicU32, String> {
    let fd: libc::c_int = value
        .parse()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| format!("{EXIT_WORD_ENV}={value:?} is not a file descriptor number"))?;
    // Only the agent's memfd: an inherited number could name anything.
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("{EXIT_WORD_ENV}={fd}: {e}"))?;
    if !link
        .to_string_lossy()
        .starts_with(&format!("/memfd:{EXIT_WORD_NAME} "))
    {
        return Err(format!(
            "{EXIT_WORD_ENV}={fd} names {}, not the agent's exit word",
            link.display()
        ));
    }
    // SAFETY: maps 4 bytes (one page) of the memfd shared and writable;
    // the mapping is never unmapped, so the `'static` reference below
    // stays valid for the life of the process. The descriptor is not
    // used again after it is closed.
    let ptr = unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            std::mem::size_of::<AtomicU32>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        libc::close(fd);
        ptr
    };
    if ptr == libc::MAP_FAILED {
        return Err(format!(
            "{EXIT_WORD_ENV}={fd}: mmap: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: page-aligned, mapped for the process's life (above), and
    // only ever accessed atomically, here and by the kernel.
    Ok(unsafe { &*(ptr as *const AtomicU32) })
}

/// Registers `word` to be cleared when this thread leaves the address
/// space, publishes the thread id there, and parks for good.
fn park_registered(word: &'static AtomicU32) -> ! {
    // SAFETY: set_tid_address only records where the kernel writes 0 and
    // wakes a futex when this thread exits; the word stays mapped for the
    // process's life. This thread is never joined, so the pthread join
    // word the kernel no longer clears is never waited on.
    let tid = unsafe { libc::syscall(libc::SYS_set_tid_address, word.as_ptr()) } as u32;
    word.store(tid, Ordering::Release);
    // SAFETY: wakes waiters on the shared word (the agent's watcher).
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn test_only_the_agents_memfd_is_armed() {
        for bad in ["", "x", "-1", "3.5"] {
            let e = map(bad).expect_err(bad);
            assert!(e.contains("is not a file descriptor number"), "{bad}: {e}");
        }
        // Some other descriptor this process holds: named, not mapped.
        let other = std::fs::File::open("/dev/null").expect("/dev/null");
        let e = map(&other.as_raw_fd().to_string()).expect_err("/dev/null");
        assert!(
            e.contains("/dev/null") && e.contains("not the agent's exit word"),
            "{e}"
        );
        // The agent's word: mapped (and its descriptor closed).
        let name = std::ffi::CString::new(EXIT_WORD_NAME).expect("name");
        // SAFETY: a NUL-terminated name; the descriptor is handed to `map`,
        // which closes it.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: sizes the memfd just created.
        assert_eq!(unsafe { libc::ftruncate(fd, 4) }, 0, "ftruncate");
        let word = map(&fd.to_string()).expect("the agent's word");
        word.store(7, Ordering::Relaxed);
        assert_eq!(word.load(Ordering::Relaxed), 7);
        assert!(
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map_or(true, |l| !l.to_string_lossy().contains(EXIT_WORD_NAME)),
            "the descriptor is closed after mapping"
        );
    }
}
