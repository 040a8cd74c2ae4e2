//! The `process` operator: an unmodified program run as a Lazarus worker.
//!
//! The agent starts `lazarus process-worker` (this binary, in worker mode)
//! for each process of a `kind = "process"` operator. It is an ordinary SDK
//! worker to the supervisor (control link, checkpoints, promotion) and the
//! parent of the program:
//! - the program starts at once on a hot standby too (an early source), so
//!   a failover only moves the VIP, as with keepalived in front of HAProxy;
//!   with a `state_dir` it starts after the directory is restored;
//! - its stdout and stderr go to this worker's log on the agent;
//! - it runs without CAP_NET_ADMIN and CAP_NET_RAW (inherited from this
//!   worker), in this worker's process group, and gets SIGKILL if this
//!   worker dies (`PR_SET_PDEATHSIG`);
//! - when it exits, this worker exits at once with a line that says how,
//!   so its agent reports the failure without a timeout;
//! - a stop sends `stop_signal`, then SIGKILL after `stop_timeout`;
//! - its environment is the agent's without Lazarus' credentials, plus the
//!   spec's `env`, `LAZARUS_JOB`, `LAZARUS_WORKER`, and `LAZARUS_PORT`,
//!   `LAZARUS_VIP`, `LAZARUS_VIP6` when the operator has them.

use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Stopwatch;

use lazarus_sdk::{
    BoxError, Context, Emitter, Fatal, Registry, Restored, Snapshot, Source, SourcePoll,
};

use crate::service::spec::{parse_signal, ProcessSpec, PROCESS_KIND};
use crate::service::state_dir;
use crate::spec::PROCESS_PARAM;

/// The argument that starts `lazarus` as a process worker.
pub const PROCESS_WORKER_ARG: &str = "process-worker";

/// `lazarus process-worker`: the worker main of `process` operators.
pub fn run_process_worker() -> ExitCode {
    lazarus_sdk::run_worker(Registry::new().early_source(PROCESS_KIND, ProcessOperator::new))
}

/// The state part a `state_dir` is stored under.
const DIR_PART: &str = "state_dir";

/// See the module documentation.
pub struct ProcessOperator {
    spec: ProcessSpec,
    worker: String,
    env: Vec<(String, String)>,
    child: Option<Running>,
    /// The archive of the last snapshot (unchanged directories are not
    /// uploaded again).
    last_archive: Option<u32>,
}

struct Running {
    pid: u32,
    stopping: Arc<AtomicBool>,
    status: Arc<Mutex<Option<ExitStatus>>>,
}

impl ProcessOperator {
    /// Reads the program from the worker's parameters; a stateless program
    /// starts now (also on a hot standby), one with a `state_dir` at the
    /// first poll, after its restore.
    pub fn new(ctx: &Context) -> Result<ProcessOperator, BoxError> {
        let text = ctx.param(PROCESS_PARAM)?;
        let spec: ProcessSpec =
            serde_json::from_str(text).map_err(|e| Fatal::new(format!("{PROCESS_PARAM}: {e}")))?;
        spec.validate()
            .map_err(|(f, m)| Fatal::new(format!("process.{f}: {m}")))?;
        let mut env = vec![
            ("LAZARUS_JOB".to_string(), ctx.job.to_string()),
            ("LAZARUS_WORKER".to_string(), ctx.worker.to_string()),
        ];
        for (param, var) in [
            ("lazarus.port", "LAZARUS_PORT"),
            ("lazarus.vip", "LAZARUS_VIP"),
            ("lazarus.vip6", "LAZARUS_VIP6"),
        ] {
            if let Some(v) = ctx.params.get(param) {
                env.push((var.to_string(), v.clone()));
            }
        }
        let mut op = ProcessOperator {
            spec,
            worker: ctx.worker.to_string(),
            env,
            child: None,
            last_archive: None,
        };
        match &op.spec.state_dir {
            None => op.start()?,
            // A first start finds it empty (a restore replaces it).
            Some(dir) => std::fs::create_dir_all(dir)
                .map_err(|e| format!("state_dir {}: {e}", dir.display()))?,
        }
        Ok(op)
    }

    fn start(&mut self) -> Result<(), BoxError> {
        let spec = &self.spec;
        let mut cmd = Command::new(&spec.command);
        cmd.args(&spec.args).stdin(Stdio::null());
        // Lazarus' own variables (the control address, this worker's
        // credential, its rejoin ticket) are not the program's business.
        // (A test bed's tag stays: it finds every process it started.)
        for (k, _) in std::env::vars_os() {
            let k_text = k.to_string_lossy();
            if k_text.starts_with("LAZARUS_") && k_text != "LAZARUS_TEST_TAG" {
                cmd.env_remove(&k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(&spec.env);
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        // Its output goes where this worker's goes: the agent's log for it.
        let err = std::io::stderr();
        let out = {
            use std::os::fd::AsFd as _;
            err.as_fd().try_clone_to_owned()?
        };
        let err2 = {
            use std::os::fd::AsFd as _;
            err.as_fd().try_clone_to_owned()?
        };
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err2));
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt as _;
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: runs between fork and exec; prctl and getppid are
            // async-signal-safe, and nothing is allocated.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // This worker died before the prctl took effect.
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
        }
        // The program is started by, and waited for on, a thread of its
        // own that lives as long as it does: PR_SET_PDEATHSIG fires when the
        // *thread* that forked it ends, so no pool thread may be its parent.
        let stopping = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(None));
        let (started_tx, started_rx) = std::sync::mpsc::channel::<std::io::Result<u32>>();
        {
            let (stopping, status) = (stopping.clone(), status.clone());
            let (worker, command) = (self.worker.clone(), spec.command.display().to_string());
            std::thread::Builder::new()
                .name("program".into())
                .spawn(move || {
                    let mut child = match cmd.spawn() {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                            return;
                        }
                    };
                    let pid = child.id();
                    let _ = started_tx.send(Ok(pid));
                    let s = child.wait();
                    if let Ok(s) = &s {
                        *status.lock().unwrap_or_else(|p| p.into_inner()) = Some(*s);
                    }
                    if !stopping.load(Ordering::SeqCst) {
                        // The agent reports this worker's exit at once; this
                        // line is its detail.
                        let how = match s {
                            Ok(s) => describe(s),
                            Err(e) => format!("could not be waited for: {e}"),
                        };
                        eprintln!("lazarus process {worker}: program {command} (pid {pid}) {how}");
                        std::process::exit(1);
                    }
                })?;
        }
        let pid = started_rx
            .recv()
            .map_err(|_| "the program's thread ended before starting it".to_string())?
            .map_err(|e| {
                format!(
                    "process {}: cannot start {}: {e}",
                    self.worker,
                    spec.command.display()
                )
            })?;
        tracing::info!(worker = %self.worker, pid, command = %spec.command.display(), "program started");
        self.child = Some(Running {
            pid,
            stopping,
            status,
        });
        Ok(())
    }

    /// Asks the program to stop, then kills it after `stop_timeout`.
    fn stop(&mut self) {
        let Some(r) = self.child.take() else { return };
        r.stopping.store(true, Ordering::SeqCst);
        let sig = parse_signal(&self.spec.stop_signal).unwrap_or(libc::SIGTERM);
        let exited = || r.status.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        // SAFETY: signals a child this worker started and still waits for.
        unsafe { libc::kill(r.pid as libc::pid_t, sig) };
        let watch = Stopwatch::start();
        while !exited() && watch.elapsed() < self.spec.stop_timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !exited() {
            tracing::warn!(worker = %self.worker, pid = r.pid, "program did not stop in time: SIGKILL");
            // SAFETY: as above.
            unsafe { libc::kill(r.pid as libc::pid_t, libc::SIGKILL) };
            let watch = Stopwatch::start();
            while !exited() && watch.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Runs a quiesce or resume hook, bounded in time.
    fn hook(&self, which: &str, argv: &[String]) -> Result<(), String> {
        let Some((cmd, args)) = argv.split_first() else {
            return Ok(());
        };
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("{which} {cmd}: {e}"))?;
        let watch = Stopwatch::start();
        loop {
            match child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => return Err(format!("{which} {cmd} {}", describe(s))),
                Ok(None) if watch.elapsed() >= self.spec.hook_timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{which} {cmd} did not finish within {:?}",
                        self.spec.hook_timeout
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(format!("{which} {cmd}: {e}")),
            }
        }
    }
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (s.code(), s.signal()) {
        (Some(0), _) => "exited with code 0".into(),
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({s})"),
    }
}

impl Drop for ProcessOperator {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Source for ProcessOperator {
    fn poll(&mut self, _out: &mut Emitter, _max: usize) -> Result<SourcePoll, BoxError> {
        if self.child.is_none() {
            self.start()?;
        }
        Ok(SourcePoll::Idle)
    }

    /// Without a `state_dir` there is nothing to keep. With one: quiesce,
    /// copy the directory, resume (always); a directory unchanged since the
    /// last checkpoint is not written again.
    fn snapshot(&mut self) -> Snapshot {
        let Some(dir) = self.spec.state_dir.clone() else {
            return Snapshot::default();
        };
        let quiesced = self.hook("quiesce", &self.spec.quiesce);
        let archive = quiesced.clone().and_then(|()| {
            state_dir::archive(&dir).map_err(|e| format!("state_dir {}: {e}", dir.display()))
        });
        if quiesced.is_ok() {
            if let Err(e) = self.hook("resume", &self.spec.resume) {
                tracing::error!(worker = %self.worker, error = %e, "resume failed");
            }
        }
        let mut snap = Snapshot::default();
        match archive {
            Ok(bytes) => {
                let crc = crc32fast::hash(&bytes);
                if self.last_archive == Some(crc) {
                    snap.add_unchanged(DIR_PART);
                } else {
                    self.last_archive = Some(crc);
                    snap.add_fresh(DIR_PART, move || Ok::<_, BoxError>(bytes));
                }
            }
            Err(e) => {
                // A checkpoint without the directory would restore an empty
                // one: end this worker instead (the job recovers from the
                // last good checkpoint).
                eprintln!(
                    "lazarus process {}: cannot snapshot its state: {e}",
                    self.worker
                );
                std::process::exit(1);
            }
        }
        snap
    }

    fn restore(&mut self, state: &Restored) -> Result<(), BoxError> {
        let Some(dir) = self.spec.state_dir.clone() else {
            return Ok(());
        };
        if let Some(bytes) = state.part(DIR_PART) {
            state_dir::restore(&dir, bytes).map_err(|e| {
                format!(
                    "process {}: restoring state_dir {} from checkpoint {:?}: {e}",
                    self.worker,
                    dir.display(),
                    state.checkpoint()
                )
            })?;
            self.last_archive = Some(crc32fast::hash(bytes));
            tracing::info!(worker = %self.worker, dir = %dir.display(), bytes = bytes.len(), "state_dir restored");
        }
        Ok(())
    }
}
