//! Notify hooks (keepalived's `notify_master`, `notify_backup`,
//! `notify_fault`, `notify_stop`): commands an agent runs when a process of
//! a job on its host changes role.
//!
//! The agent hands each event to a [`Notifier`] and goes on: hooks run in
//! one task, one at a time, in the order of the events (so a host's hooks
//! never see `primary` after a later `fault`), each killed after its
//! `timeout`. A failed or slow hook is logged; it never holds up a failover.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::service::spec::NotifySpec;

/// The role a process took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyState {
    /// It became the primary.
    Primary,
    /// It started as a hot standby.
    Standby,
    /// It failed.
    Fault,
    /// It was stopped on request.
    Stopped,
}

impl NotifyState {
    /// `primary`, `standby`, `fault` or `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyState::Primary => "primary",
            NotifyState::Standby => "standby",
            NotifyState::Fault => "fault",
            NotifyState::Stopped => "stopped",
        }
    }
}

/// One event for the hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyEvent {
    /// The new role.
    pub state: NotifyState,
    /// The job.
    pub job: String,
    /// The worker.
    pub worker: String,
    /// The agent (host) running the hook.
    pub host: String,
    /// The operator's VIPs (`addr/prefix`, comma-separated in the hook's
    /// environment).
    pub vips: Vec<String>,
    /// Why, in words.
    pub reason: String,
}

/// Where events go; cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::UnboundedSender<(Vec<NotifySpec>, NotifyEvent)>,
}

impl Notifier {
    /// Starts the hook runner on `tasks`; it ends when every clone of the
    /// notifier is dropped.
    pub fn start(tasks: &tokio_util::task::TaskTracker) -> Notifier {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<NotifySpec>, NotifyEvent)>();
        tasks.spawn(async move {
            while let Some((hooks, event)) = rx.recv().await {
                for spec in &hooks {
                    run_hook(spec, &event).await;
                }
            }
        });
        Notifier { tx }
    }

    /// Queues `event` for every set of `hooks` that has a command for it
    /// (the job's, then the agent's).
    pub fn fire(&self, hooks: Vec<NotifySpec>, event: NotifyEvent) {
        let any = hooks.iter().any(|h| !argv(h, event.state).is_empty());
        if any {
            let _ = self.tx.send((hooks, event));
        }
    }
}

fn argv(spec: &NotifySpec, state: NotifyState) -> &[String] {
    match state {
        NotifyState::Primary => &spec.primary,
        NotifyState::Standby => &spec.standby,
        NotifyState::Fault => &spec.fault,
        NotifyState::Stopped => &spec.stopped,
    }
}

/// Runs one hook for `event`, bounded by the spec's timeout; returns
/// whether it exited 0 (logged either way).
pub async fn run_hook(spec: &NotifySpec, event: &NotifyEvent) -> bool {
    let Some((cmd, args)) = argv(spec, event.state).split_first() else {
        return true;
    };
    let mut c = tokio::process::Command::new(cmd);
    c.args(args)
        .env("LAZARUS_NOTIFY_STATE", event.state.as_str())
        .env("LAZARUS_NOTIFY_JOB", &event.job)
        .env("LAZARUS_NOTIFY_WORKER", &event.worker)
        .env("LAZARUS_NOTIFY_HOST", &event.host)
        .env("LAZARUS_NOTIFY_VIP", event.vips.join(","))
        .env("LAZARUS_NOTIFY_REASON", &event.reason)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: runs between fork and exec; only prctl calls.
    unsafe {
        c.pre_exec(crate::procs::drop_network_capabilities);
    }
    let started = crate::clock::Stopwatch::start();
    let result = match c.spawn() {
        Ok(mut child) => match tokio::time::timeout(spec.timeout, child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(format!("{s}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => {
                // The hook's whole group: a shell script's children too.
                if let Some(pid) = child.id() {
                    // SAFETY: signals the group created for this hook,
                    // whose leader is not reaped yet.
                    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
                }
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
                Err(format!("killed after its timeout of {:?}", spec.timeout))
            }
        },
        Err(e) => Err(format!("cannot start: {e}")),
    };
    let state = event.state.as_str();
    metrics::counter!(crate::metrics::NOTIFY_HOOKS, "state" => state, "result" => if result.is_ok() { "ok" } else { "failed" }).increment(1);
    match result {
        Ok(()) => {
            tracing::info!(hook = %cmd, state, job = %event.job, worker = %event.worker, took = ?started.elapsed(), "notify hook ran");
            true
        }
        Err(error) => {
            tracing::warn!(hook = %cmd, state, job = %event.job, worker = %event.worker, %error, "notify hook failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(state: NotifyState) -> NotifyEvent {
        NotifyEvent {
            state,
            job: "lb".into(),
            worker: "lb-0".into(),
            host: "lb1".into(),
            vips: vec!["198.18.0.100/24".into(), "2001:2::100/64".into()],
            reason: "promoted".into(),
        }
    }

    #[tokio::test]
    async fn test_hooks_run_in_order_with_their_environment_and_are_bounded() {
        let t = tempfile::tempdir().expect("tmp");
        let log = t.path().join("log");
        let script = format!(
            "echo \"$LAZARUS_NOTIFY_HOST $LAZARUS_NOTIFY_STATE $LAZARUS_NOTIFY_JOB $LAZARUS_NOTIFY_WORKER $LAZARUS_NOTIFY_VIP $LAZARUS_NOTIFY_REASON\" >> {}",
            log.display()
        );
        let sh = |s: &str| vec!["/bin/sh".to_string(), "-c".to_string(), s.to_string()];
        let spec = NotifySpec {
            primary: sh(&script),
            standby: sh(&script),
            fault: sh("sleep 10"),
            stopped: sh(&script),
            timeout: Duration::from_millis(200),
        };
        let tasks = tokio_util::task::TaskTracker::new();
        let n = Notifier::start(&tasks);
        let started = crate::clock::Stopwatch::start();
        for s in [
            NotifyState::Standby,
            NotifyState::Primary,
            NotifyState::Fault,
            NotifyState::Stopped,
        ] {
            n.fire(vec![spec.clone()], event(s));
        }
        drop(n);
        tasks.close();
        tokio::time::timeout(Duration::from_secs(10), tasks.wait())
            .await
            .expect("hooks finish");
        // The slow fault hook was killed at its timeout, not waited for.
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = std::fs::read_to_string(&log).expect("log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "lb1 standby lb lb-0 198.18.0.100/24,2001:2::100/64 promoted",
                "lb1 primary lb lb-0 198.18.0.100/24,2001:2::100/64 promoted",
                "lb1 stopped lb lb-0 198.18.0.100/24,2001:2::100/64 promoted",
            ]
        );
        assert!(!run_hook(&spec, &event(NotifyState::Fault)).await);
        let missing = NotifySpec {
            primary: vec!["/nonexistent/hook".into()],
            ..NotifySpec::default()
        };
        assert!(!run_hook(&missing, &event(NotifyState::Primary)).await);
    }
}
