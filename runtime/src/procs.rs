//! The process table of one job on one host: it starts worker processes, reports a worker's
//! exit the moment it happens (child exit, not a timeout), kills workers on
//! request, and owns the host's local cache directory, which outlives worker
//! processes so a restart on the same host restores from local disk.
//!
//! Each child is owned by one task that waits for it; a kill request reaches
//! that task over a channel. Dropping the agent kills every child.
//!
//! A worker has at most two processes here: its primary and, on another
//! host than the primary, a hot standby ([`Slot`]). A promoted standby keeps
//! its process and becomes the primary slot. Worker processes run without
//! CAP_NET_ADMIN and CAP_NET_RAW: only the agent moves the VIP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use lazarus_storage::WorkerId;
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// The environment's `GLIBC_TUNABLES` for SDK worker processes (not for
/// programs a `process` operator runs), unless the supervisor's or agent's
/// own environment or the spec's `env` sets it. A worker moves records in
/// batches of up to 1024: each batch allocates and frees that many small
/// buffers of one size, far more than glibc's per-thread cache holds (7
/// per size by default), so most went through the arena's bins and their
/// consolidation; malloc and free were about a third of a wordcount run's
/// CPU. With 4096 per size the cache serves them: the long-tail wordcount
/// used 25 % less CPU (docs/performance.md).
pub const WORKER_GLIBC_TUNABLES: &str = "glibc.malloc.tcache_count=4096";

/// The `GLIBC_TUNABLES` a worker process starts with when the spec's env
/// does not set it: [`WORKER_GLIBC_TUNABLES`] for an SDK worker; nothing
/// for a `process` operator's worker (the process worker and the program
/// it runs, which is not ours to tune, keep this process's environment),
/// nor when this process's own environment sets the variable (the
/// operator's, passed on as it is).
fn default_tunables(program_worker: bool, inherited: bool) -> Option<&'static str> {
    (!program_worker && !inherited).then_some(WORKER_GLIBC_TUNABLES)
}

/// Where a table reports its processes' exits (a channel send, called from
/// the task that waited for the child).
pub type ExitReporter = Box<dyn Fn(WorkerExited) + Send + Sync>;

/// How a worker process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// Exit code 0.
    Success,
    /// Non-zero exit code.
    Code(i32),
    /// Killed by a signal (SIGKILL from chaos or a kill request is 9).
    Signal(i32),
    /// The binary could not be started.
    SpawnFailed(String),
    /// Its host was declared lost (missed heartbeats).
    HostLost(String),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Success => f.write_str("exited cleanly"),
            ExitKind::Code(c) => write!(f, "exited with code {c}"),
            ExitKind::Signal(s) => write!(f, "killed by signal {s}"),
            ExitKind::SpawnFailed(e) => write!(f, "could not be started: {e}"),
            ExitKind::HostLost(h) => write!(f, "was lost with its host {h}"),
        }
    }
}

/// What the agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerExited {
    /// The worker.
    pub worker: WorkerId,
    /// The attempt it was started for.
    pub attempt: u64,
    /// Whether it was a standby process.
    pub standby: bool,
    /// The host (agent name) it ran on.
    pub host: String,
    /// How it ended.
    pub exit: ExitKind,
    /// The telling line of its log (its panic or error), if any.
    pub detail: Option<String>,
}

/// Which process of a worker: its primary or its hot standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    /// The process doing the work.
    Primary,
    /// A hot standby following commits.
    Standby,
}

/// What an exit is reported as; a promotion changes it under the waiting task.
type Tag = std::sync::Arc<std::sync::Mutex<(u64, Slot)>>;

struct Child {
    tag: Tag,
    pid: Option<u32>,
    kill: Option<oneshot::Sender<()>>,
    /// Where a new leader's rejoin ticket goes (HA clusters).
    ticket: Option<PathBuf>,
}

/// Starts, watches and kills the worker processes of one job on one host
/// (in `lazarus run`, the only host; on a cluster, one per job in the
/// `lazarus agent` daemon).
pub struct ProcessTable {
    name: String,
    binary: PathBuf,
    log_dir: PathBuf,
    cache_dir: PathBuf,
    extra_env: Vec<(String, String)>,
    /// Rejoin tickets go here (set on HA clusters: workers survive a
    /// supervisor failover).
    rejoin_dir: Option<PathBuf>,
    children: BTreeMap<(WorkerId, Slot), Child>,
    /// Workers of `process` operators: started as `lazarus process-worker`.
    program_workers: std::collections::BTreeSet<WorkerId>,
    exits: std::sync::Arc<ExitReporter>,
    /// The tasks that wait for children: each ends with its child.
    tasks: TaskTracker,
}

impl Drop for ProcessTable {
    fn drop(&mut self) {
        // No worker outlives its table: kill_on_drop covers the rest.
        self.kill_all();
    }
}

impl ProcessTable {
    /// A table for host `name` running `binary`, with worker logs in
    /// `state_dir/logs` and the local cache in `state_dir/cache`. Exits are
    /// reported to `exits`.
    pub fn new(
        name: &str,
        binary: PathBuf,
        state_dir: &Path,
        exits: ExitReporter,
    ) -> std::io::Result<ProcessTable> {
        let log_dir = state_dir.join("logs");
        let cache_dir = state_dir.join("cache");
        std::fs::create_dir_all(&log_dir)?;
        std::fs::create_dir_all(&cache_dir)?;
        Ok(ProcessTable {
            name: name.to_string(),
            binary,
            log_dir,
            cache_dir,
            extra_env: Vec::new(),
            rejoin_dir: None,
            children: BTreeMap::new(),
            program_workers: Default::default(),
            exits: std::sync::Arc::new(exits),
            tasks: TaskTracker::new(),
        })
    }

    /// The host's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The local cache directory workers on this host restore through.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Where worker `w`'s stderr goes.
    pub fn log_path(&self, w: &WorkerId) -> PathBuf {
        self.log_dir.join(format!("{w}.log"))
    }

    /// `worker` belongs to a `process` operator: its processes are this
    /// binary in worker mode (`lazarus process-worker`), which runs the
    /// operator's program.
    pub fn set_program_worker(&mut self, worker: &WorkerId) {
        self.program_workers.insert(worker.clone());
    }

    /// Adds an environment variable for every worker started later.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.extra_env.push((key.to_string(), value.to_string()));
    }

    /// From now on, each process started gets a rejoin ticket file
    /// (`LAZARUS_REJOIN_FILE`) under `state_dir/rejoin`: on an HA cluster a
    /// worker survives its supervisor's failover and reconnects to the new
    /// leader named there.
    pub fn enable_rejoin(&mut self) -> std::io::Result<()> {
        let dir = self
            .log_dir
            .parent()
            .unwrap_or(&self.log_dir)
            .join("rejoin");
        std::fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        self.rejoin_dir = Some(dir);
        Ok(())
    }

    /// Hands `worker`'s process in `slot` (which must belong to `attempt`)
    /// a new leader's ticket. False if no such process runs here.
    pub fn rejoin(
        &self,
        worker: &WorkerId,
        slot: Slot,
        attempt: u64,
        ticket: &lazarus_sdk::protocol::RejoinTicket,
    ) -> bool {
        let Some(child) = self.children.get(&(worker.clone(), slot)) else {
            return false;
        };
        if child.tag.lock().unwrap_or_else(|p| p.into_inner()).0 != attempt {
            return false;
        }
        let Some(path) = &child.ticket else {
            return false;
        };
        // Written whole, then renamed: the worker never reads half a ticket.
        // Owner-only: the ticket is a credential.
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(ticket)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                use std::io::Write as _;
                let mut o = std::fs::OpenOptions::new();
                o.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
                o.open(&tmp)?.write_all(&bytes)
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        match written {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(%worker, path = %path.display(), error = %e, "cannot write the rejoin ticket");
                false
            }
        }
    }

    /// Every process with its slot and the attempt it now belongs to.
    pub fn processes(&self) -> Vec<(WorkerId, Slot, u64)> {
        self.children
            .iter()
            .map(|((w, s), c)| {
                (
                    w.clone(),
                    *s,
                    c.tag.lock().unwrap_or_else(|p| p.into_inner()).0,
                )
            })
            .collect()
    }

    /// Starts `worker` for `attempt` in `slot`, told to report to
    /// `supervisor`. A failure to start is reported as an exit, like any
    /// other.
    pub fn spawn(
        &mut self,
        worker: &WorkerId,
        attempt: u64,
        slot: Slot,
        supervisor: SocketAddr,
        token: &str,
    ) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(worker));
        let binary = if self.program_workers.contains(worker) {
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
        } else {
            self.binary.clone()
        };
        let mut cmd = Command::new(&binary);
        if self.program_workers.contains(worker) {
            cmd.arg(crate::service::process::PROCESS_WORKER_ARG);
        }
        cmd.env("LAZARUS_SUPERVISOR", supervisor.to_string())
            .env("LAZARUS_WORKER", worker.as_str())
            .env("LAZARUS_ATTEMPT", attempt.to_string())
            .env(
                "LAZARUS_STANDBY",
                if slot == Slot::Standby { "1" } else { "0" },
            )
            .env("LAZARUS_TOKEN", token);
        if let Some(tunables) = default_tunables(
            self.program_workers.contains(worker),
            std::env::var_os("GLIBC_TUNABLES").is_some(),
        ) {
            // Set before the spec's env, which may set its own.
            cmd.env("GLIBC_TUNABLES", tunables);
        }
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        // Own process group: a Ctrl-C at the terminal reaches the supervisor,
        // which stops the job in order, not every worker at once.
        #[cfg(unix)]
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(drop_network_capabilities);
        }
        // A worker-SDK process gets an exit word: its exit is reported as
        // it starts to die, not once the kernel has freed its memory.
        let word = if self.program_workers.contains(worker) {
            None
        } else {
            crate::exit_word::ExitWord::new()
                .inspect_err(|e| tracing::warn!(%worker, error = %e, "no exit word; the exit is seen when the process has ended"))
                .ok()
        };
        if let Some(word) = &word {
            let (key, value) = word.env();
            cmd.env(key, value);
            let fd = word.raw_fd();
            // SAFETY: runs in the child between fork and exec; one fcntl.
            unsafe {
                cmd.pre_exec(move || crate::exit_word::inherit(fd));
            }
        }
        match log {
            Ok(f) => {
                cmd.stderr(Stdio::from(f));
            }
            Err(_) => {
                cmd.stderr(Stdio::null());
            }
        }
        let exits = self.exits.clone();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let w = worker.clone();
        let tag: Tag = std::sync::Arc::new(std::sync::Mutex::new((attempt, slot)));
        let log_path = self.log_path(worker);
        let host = self.name.clone();
        let ticket = self.rejoin_dir.as_ref().map(|d| {
            let slot_name = if slot == Slot::Standby {
                "standby"
            } else {
                "primary"
            };
            d.join(format!("{worker}.{attempt}.{slot_name}.json"))
        });
        if let Some(t) = &ticket {
            let _ = std::fs::remove_file(t);
            cmd.env("LAZARUS_REJOIN_FILE", t);
        }
        match cmd.spawn() {
            Ok(mut child) => {
                let pid = child.id();
                tracing::debug!(worker = %w, attempt, ?slot, ?pid, "worker started");
                let task_tag = tag.clone();
                let mut watch = word.zip(pid).map(|(word, pid)| word.watch(pid));
                self.tasks.spawn(async move {
                    let (status, early) = tokio::select! {
                        ended = ended(&mut child, watch.as_mut()) => ended,
                        _ = kill_rx => {
                            // The whole process group: a `process`
                            // worker's program (and what it started) too.
                            #[cfg(unix)]
                            if let Some(pid) = pid {
                                // SAFETY: signals the group this table
                                // created for the child (it is not reaped
                                // yet, so the id is still ours).
                                unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
                            }
                            let _ = child.start_kill();
                            ended(&mut child, watch.as_mut()).await
                        }
                    };
                    let exit = match status {
                        Ok(s) => classify(s),
                        Err(e) => ExitKind::SpawnFailed(e.to_string()),
                    };
                    let detail = if exit == ExitKind::Success {
                        None
                    } else {
                        last_log_line(&log_path)
                    };
                    let (attempt, slot) = *task_tag.lock().unwrap_or_else(|p| p.into_inner());
                    let said = early.map(|seen| (seen, exit.clone()));
                    exits(WorkerExited {
                        worker: w.clone(),
                        attempt,
                        standby: slot == Slot::Standby,
                        host,
                        exit,
                        detail,
                    });
                    if let Some((seen, exit)) = said {
                        // Reaped here, once the kernel is done with it.
                        let end = child.wait().await.map(classify);
                        let pid = pid.unwrap_or_default();
                        let us = seen.elapsed().as_micros();
                        tracing::info!(worker = %w, ?end, "pid {pid} {exit}, reported from its exit word {us} µs before the kernel finished ending it");
                    }
                    drop(watch);
                });
                self.children.insert(
                    (worker.clone(), slot),
                    Child {
                        tag,
                        pid,
                        kill: Some(kill_tx),
                        ticket,
                    },
                );
            }
            Err(e) => {
                exits(WorkerExited {
                    worker: w,
                    attempt,
                    standby: slot == Slot::Standby,
                    host: self.name.clone(),
                    exit: ExitKind::SpawnFailed(format!("{}: {e}", binary.display())),
                    detail: None,
                });
            }
        }
    }

    /// `worker`'s primary process was rolled back in place: it belongs to
    /// `attempt` now. Returns false if there is no primary process.
    pub fn retag(&mut self, worker: &WorkerId, attempt: u64) -> bool {
        let Some(child) = self.children.get(&(worker.clone(), Slot::Primary)) else {
            return false;
        };
        child.tag.lock().unwrap_or_else(|p| p.into_inner()).0 = attempt;
        true
    }

    /// Makes `worker`'s standby process its primary for `attempt`: it keeps
    /// running, and its exit is reported as the primary's from now on.
    /// Returns false if there is no standby process.
    pub fn promote(&mut self, worker: &WorkerId, attempt: u64) -> bool {
        let Some(child) = self.children.remove(&(worker.clone(), Slot::Standby)) else {
            return false;
        };
        *child.tag.lock().unwrap_or_else(|p| p.into_inner()) = (attempt, Slot::Primary);
        if let Some(old) = self.children.insert((worker.clone(), Slot::Primary), child) {
            // A primary still registered here is being replaced: end it.
            if let Some(kill) = old.kill {
                let _ = kill.send(());
            }
        }
        true
    }

    /// Sends SIGKILL to `worker`'s process in `slot` (if it runs); its exit
    /// is reported as usual.
    pub fn kill(&mut self, worker: &WorkerId, slot: Slot) {
        if let Some(child) = self.children.get_mut(&(worker.clone(), slot)) {
            if let Some(kill) = child.kill.take() {
                let _ = kill.send(());
            }
        }
    }

    /// Kills every primary; standbys keep following.
    pub fn kill_primaries(&mut self) {
        let ids: Vec<WorkerId> = self
            .children
            .keys()
            .filter(|(_, s)| *s == Slot::Primary)
            .map(|(w, _)| w.clone())
            .collect();
        for w in ids {
            self.kill(&w, Slot::Primary);
        }
    }

    /// Kills every process, standbys included.
    pub fn kill_all(&mut self) {
        let ids: Vec<(WorkerId, Slot)> = self.children.keys().cloned().collect();
        for (w, s) in ids {
            self.kill(&w, s);
        }
    }

    /// Forgets a process whose exit was reported.
    pub fn reap(&mut self, exit: &WorkerExited) {
        let slot = if exit.standby {
            Slot::Standby
        } else {
            Slot::Primary
        };
        let key = (exit.worker.clone(), slot);
        if self
            .children
            .get(&key)
            .is_some_and(|c| c.tag.lock().unwrap_or_else(|p| p.into_inner()).0 == exit.attempt)
        {
            if let Some(t) = self.children.remove(&key).and_then(|c| c.ticket) {
                let _ = std::fs::remove_file(t);
            }
        }
    }

    /// Processes believed running, with their slots and pids.
    pub fn running(&self) -> Vec<(WorkerId, Slot, Option<u32>)> {
        self.children
            .iter()
            .map(|((w, s), c)| (w.clone(), *s, c.pid))
            .collect()
    }

    /// Whether `worker` has a process in `slot`.
    pub fn has(&self, worker: &WorkerId, slot: Slot) -> bool {
        self.children.contains_key(&(worker.clone(), slot))
    }
}

/// Waits for `child` to end: its exit status as soon as its exit word
/// (`watch`) tells the process is dying and the kernel has set the status,
/// with a stopwatch started then (the process is reaped later); otherwise
/// when it has exited, and no stopwatch.
async fn ended(
    child: &mut tokio::process::Child,
    watch: Option<&mut crate::exit_word::Watch>,
) -> (
    std::io::Result<std::process::ExitStatus>,
    Option<crate::clock::Stopwatch>,
) {
    let Some(watch) = watch else {
        return (child.wait().await, None);
    };
    tokio::select! {
        status = child.wait() => (status, None),
        status = watch.dying() => (Ok(status), Some(crate::clock::Stopwatch::start())),
    }
}

/// Keeps CAP_NET_ADMIN and CAP_NET_RAW from what the agent execs next
/// (workers, exec health checks, notify hooks): clears the ambient set (an
/// agent running as a dedicated user holds the two as ambient
/// capabilities, which an exec would pass on) and drops them from the
/// bounding set (an agent running as root). Call between fork and exec.
#[cfg(target_os = "linux")]
pub(crate) fn drop_network_capabilities() -> std::io::Result<()> {
    const CAP_NET_ADMIN: libc::c_ulong = 12;
    const CAP_NET_RAW: libc::c_ulong = 13;
    // SAFETY: prctl with PR_CAP_AMBIENT takes plain integers; clearing
    // needs no privilege. EINVAL: a kernel without ambient capabilities.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(std::io::Error::last_os_error());
    }
    // And the inheritable set, so that not even a program with file
    // capabilities gets them back (lowering it needs no privilege).
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget/capset with a version-3 header and two data words,
    // as the kernel expects; no allocation.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for d in &mut data {
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for cap in [CAP_NET_ADMIN, CAP_NET_RAW] {
        // SAFETY: prctl with PR_CAPBSET_DROP takes plain integers.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        // EPERM: the agent lacks CAP_SETPCAP (it is not root): with the
        // ambient set cleared, an exec gives the worker no capability.
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The telling line of a worker's log for failure messages: the last panic
/// or error line, else the last line. Worker logs are appended across
/// attempts, so only the tail is read.
pub fn last_log_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let tail: Vec<&str> = text
        .lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .take(200)
        .collect();
    let pick = tail
        .iter()
        .find(|l| l.contains("panicked at"))
        .or_else(|| tail.iter().find(|l| l.starts_with("lazarus worker")))
        .or(tail.first())?;
    let line: String = pick.chars().take(300).collect();
    // A panic's message is on the line after "panicked at".
    if line.contains("panicked at") {
        if let Some(pos) = tail.iter().position(|l| *l == *pick) {
            if pos > 0 {
                return Some(format!(
                    "{line} {}",
                    tail[pos - 1].chars().take(200).collect::<String>()
                ));
            }
        }
    }
    Some(line)
}

#[cfg(unix)]
fn classify(s: std::process::ExitStatus) -> ExitKind {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(0), _) => ExitKind::Success,
        (Some(c), _) => ExitKind::Code(c),
        (None, Some(sig)) => ExitKind::Signal(sig),
        (None, None) => ExitKind::Code(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rejoin ticket reaches only the process it names, whole, and only
    /// its owner can read it.
    #[tokio::test]
    async fn test_rejoin_ticket_is_written_owner_only_for_the_named_process() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("dir");
        let mut t = ProcessTable::new(
            "h",
            PathBuf::from("/usr/bin/yes"),
            dir.path(),
            Box::new(|_| {}),
        )
        .expect("table");
        t.enable_rejoin().expect("rejoin dir");
        let w = WorkerId::new("w-0").expect("id");
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        t.spawn(&w, 3, Slot::Primary, addr, "first");
        let ticket = lazarus_sdk::protocol::RejoinTicket {
            supervisor: "127.0.0.1:2".parse().expect("addr"),
            token: "second".into(),
            attempt: 3,
            standby: false,
        };
        assert!(!t.rejoin(&w, Slot::Primary, 2, &ticket), "another attempt");
        assert!(!t.rejoin(&w, Slot::Standby, 3, &ticket), "another slot");
        assert!(t.rejoin(&w, Slot::Primary, 3, &ticket));
        let rejoin = dir.path().join("rejoin");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&rejoin), 0o700);
        let file = rejoin.join("w-0.3.primary.json");
        assert_eq!(mode(&file), 0o600);
        let read: lazarus_sdk::protocol::RejoinTicket =
            serde_json::from_slice(&std::fs::read(&file).expect("ticket")).expect("parses");
        assert_eq!(read, ticket);
        t.kill_all();
    }

    #[test]
    fn test_only_sdk_workers_get_default_tunables_and_never_over_the_operators() {
        assert_eq!(default_tunables(false, false), Some(WORKER_GLIBC_TUNABLES));
        assert_eq!(
            default_tunables(true, false),
            None,
            "a process operator's program"
        );
        assert_eq!(
            default_tunables(false, true),
            None,
            "the operator's own setting"
        );
        assert_eq!(default_tunables(true, true), None);
    }

    /// An SDK worker starts with the larger malloc cache, unless the spec's
    /// env sets GLIBC_TUNABLES itself.
    #[tokio::test]
    async fn test_workers_get_the_malloc_tunables_unless_the_spec_sets_them() {
        use std::os::unix::fs::PermissionsExt as _;
        assert!(
            std::env::var_os("GLIBC_TUNABLES").is_none(),
            "run without GLIBC_TUNABLES in the environment"
        );
        let dir = tempfile::tempdir().expect("dir");
        let script = dir.path().join("worker.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\nf=\"$0.$LAZARUS_WORKER.env\"\nprintf '%s' \"$GLIBC_TUNABLES\" > \"$f.tmp\" && mv \"$f.tmp\" \"$f\"\nexec sleep 30\n",
        )
        .expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut t =
            ProcessTable::new("h", script.clone(), dir.path(), Box::new(|_| {})).expect("table");
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let seen = |w: &str| {
            let file = dir.path().join(format!("worker.sh.{w}.env"));
            // Up to 10 s, in 10 ms steps.
            for _ in 0..1000 {
                if file.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(file.exists(), "{w} started");
            std::fs::read_to_string(&file).expect("env")
        };
        t.spawn(
            &WorkerId::new("a-0").expect("id"),
            0,
            Slot::Primary,
            addr,
            "x",
        );
        assert_eq!(seen("a-0"), WORKER_GLIBC_TUNABLES);
        t.set_env("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0");
        t.spawn(
            &WorkerId::new("b-0").expect("id"),
            0,
            Slot::Primary,
            addr,
            "x",
        );
        assert_eq!(seen("b-0"), "glibc.malloc.tcache_count=0");
        t.kill_all();
    }
}
