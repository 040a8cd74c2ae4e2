//! The agent: one per host. It starts worker processes, reports a worker's
//! exit the moment it happens (child exit, not a timeout), kills workers on
//! request, and owns the host's local cache directory, which outlives worker
//! processes so a restart on the same host restores from local disk.
//!
//! Each child is owned by one task that waits for it; a kill request reaches
//! that task over a channel. Dropping the agent kills every child.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use lazarus_storage::WorkerId;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

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
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Success => f.write_str("exited cleanly"),
            ExitKind::Code(c) => write!(f, "exited with code {c}"),
            ExitKind::Signal(s) => write!(f, "killed by signal {s}"),
            ExitKind::SpawnFailed(e) => write!(f, "could not be started: {e}"),
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
    /// How it ended.
    pub exit: ExitKind,
}

struct Child {
    attempt: u64,
    pid: Option<u32>,
    kill: Option<oneshot::Sender<()>>,
}

/// Starts, watches and kills the worker processes of one host.
pub struct Agent {
    name: String,
    binary: PathBuf,
    log_dir: PathBuf,
    cache_dir: PathBuf,
    extra_env: Vec<(String, String)>,
    children: BTreeMap<WorkerId, Child>,
    exits: mpsc::UnboundedSender<WorkerExited>,
}

impl Agent {
    /// An agent named `name` running `binary`, with worker logs in
    /// `state_dir/logs` and the local cache in `state_dir/cache`. Exits are
    /// reported on the returned channel.
    pub fn new(
        name: &str,
        binary: PathBuf,
        state_dir: &Path,
    ) -> std::io::Result<(Agent, mpsc::UnboundedReceiver<WorkerExited>)> {
        let log_dir = state_dir.join("logs");
        let cache_dir = state_dir.join("cache");
        std::fs::create_dir_all(&log_dir)?;
        std::fs::create_dir_all(&cache_dir)?;
        let (exits, rx) = mpsc::unbounded_channel();
        Ok((
            Agent {
                name: name.to_string(),
                binary,
                log_dir,
                cache_dir,
                extra_env: Vec::new(),
                children: BTreeMap::new(),
                exits,
            },
            rx,
        ))
    }

    /// The agent's name (its host).
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

    /// Adds an environment variable for every worker started later.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.extra_env.push((key.to_string(), value.to_string()));
    }

    /// Starts `worker` for `attempt`, told to report to `supervisor`.
    /// A failure to start is reported as an exit, like any other.
    pub fn spawn(&mut self, worker: &WorkerId, attempt: u64, supervisor: SocketAddr) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(worker));
        let mut cmd = Command::new(&self.binary);
        cmd.env("LAZARUS_SUPERVISOR", supervisor.to_string())
            .env("LAZARUS_WORKER", worker.as_str())
            .env("LAZARUS_ATTEMPT", attempt.to_string())
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        // Own process group: a Ctrl-C at the terminal reaches the supervisor,
        // which stops the job in order, not every worker at once.
        #[cfg(unix)]
        cmd.process_group(0);
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
        match cmd.spawn() {
            Ok(mut child) => {
                let pid = child.id();
                tracing::debug!(worker = %w, attempt, ?pid, "worker started");
                tokio::spawn(async move {
                    let status = tokio::select! {
                        status = child.wait() => status,
                        _ = kill_rx => {
                            let _ = child.start_kill();
                            child.wait().await
                        }
                    };
                    let exit = match status {
                        Ok(s) => classify(s),
                        Err(e) => ExitKind::SpawnFailed(e.to_string()),
                    };
                    let _ = exits.send(WorkerExited {
                        worker: w,
                        attempt,
                        exit,
                    });
                });
                self.children.insert(
                    worker.clone(),
                    Child {
                        attempt,
                        pid,
                        kill: Some(kill_tx),
                    },
                );
            }
            Err(e) => {
                let _ = exits.send(WorkerExited {
                    worker: w,
                    attempt,
                    exit: ExitKind::SpawnFailed(format!("{}: {e}", self.binary.display())),
                });
            }
        }
    }

    /// Sends SIGKILL to `worker` (if it runs); its exit is reported as usual.
    pub fn kill(&mut self, worker: &WorkerId) {
        if let Some(child) = self.children.get_mut(worker) {
            if let Some(kill) = child.kill.take() {
                let _ = kill.send(());
            }
        }
    }

    /// Kills every worker.
    pub fn kill_all(&mut self) {
        let ids: Vec<WorkerId> = self.children.keys().cloned().collect();
        for w in ids {
            self.kill(&w);
        }
    }

    /// Forgets a worker whose exit was reported.
    pub fn reap(&mut self, worker: &WorkerId, attempt: u64) {
        if self
            .children
            .get(worker)
            .is_some_and(|c| c.attempt == attempt)
        {
            self.children.remove(worker);
        }
    }

    /// Workers believed running, with their pids.
    pub fn running(&self) -> Vec<(WorkerId, Option<u32>)> {
        self.children
            .iter()
            .map(|(w, c)| (w.clone(), c.pid))
            .collect()
    }
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
