//! The worker's control connection to its supervisor, as one task.
//!
//! Messages to the supervisor go into `to_sup`; messages from it come out of
//! `ctl_in`, and `None` there means the supervisor is gone for good.
//!
//! With `LAZARUS_REJOIN_FILE` (an agent of an HA cluster sets it), a running
//! primary or a following standby survives the loss of its supervisor: the
//! link keeps the process going and waits (bounded: `LAZARUS_REJOIN_TIMEOUT_MS`,
//! default 30 s) for the agent to write a [`RejoinTicket`] from the new leader
//! into that file, connects there, and says hello again with what it is doing
//! ([`Rejoin`]). Messages for the supervisor while no connection exists are
//! dropped (heartbeats, acks of checkpoints the new leader abandons anyway).
//! A ticket that arrives while the connection is still open means the
//! supervisor on it hangs (a SIGSTOP, a VM paused) and lost the lead: the
//! link leaves it for the new leader the same way. A ticket naming the
//! supervisor the link is (or was last) connected to is a duplicate, never
//! a new leader: each run of a job listens on a fresh port, and a leader
//! hands a second ticket when the agent registers twice during its
//! adoption (the first one used makes the others void).
//!
//! A [`ToWorker::Adopt`] (active-active takeover) does not go to the worker's
//! loops: it comes out of `adopt` as an [`Adoption`], naming the supervisor
//! this link talks to now, and the process starts that worker beside its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazarus_storage::{CheckpointId, WorkerId};
use tokio::sync::mpsc;

use crate::protocol::{self, Rejoin, RejoinTicket, ToSupervisor, ToWorker};
use crate::worker::{connect_supervisor, CtlRead, CtlWrite, WorkerEnv};

/// What the worker is doing, for a rejoin hello.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// A rejoin makes sense now (running primary, or following standby).
    rejoinable: bool,
    info: Rejoin,
}

/// Shared between the worker's loops and its link.
#[derive(Debug, Clone, Default)]
pub(crate) struct LinkState(Arc<Mutex<Progress>>);

impl LinkState {
    fn with<T>(&self, f: impl FnOnce(&mut Progress) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A primary is processing.
    pub(crate) fn running(&self) {
        self.with(|p| {
            p.rejoinable = true;
            p.info.running = true;
        });
    }

    /// A standby follows (or was just promoted: not rejoinable until it
    /// runs again).
    pub(crate) fn following(&self, yes: bool) {
        self.with(|p| p.rejoinable = yes);
    }

    /// A standby followed `n`.
    pub(crate) fn followed(&self, n: CheckpointId) {
        self.with(|p| p.info.followed = Some(p.info.followed.map_or(n, |f| f.max(n))));
    }

    /// A new assignment in the same process (rolled back in place): what
    /// was said of the last one no longer holds.
    pub(crate) fn reset(&self) {
        self.with(|p| *p = Progress::default());
    }

    /// A source ran out of input.
    pub(crate) fn exhausted(&self) {
        self.with(|p| p.info.exhausted = true);
    }

    /// Checkpoint `n` was snapshotted here.
    pub(crate) fn snapshotted(&self, n: CheckpointId) {
        self.with(|p| p.info.checkpoint = Some(p.info.checkpoint.map_or(n, |c| c.max(n))));
    }

    fn rejoin(&self) -> Option<Rejoin> {
        self.with(|p| p.rejoinable.then(|| p.info.clone()))
    }
}

/// Another worker to run in this process (a [`ToWorker::Adopt`]).
#[derive(Debug, Clone)]
pub(crate) struct Adoption {
    /// The worker.
    pub(crate) worker: WorkerId,
    /// Its attempt.
    pub(crate) attempt: u64,
    /// Its credential.
    pub(crate) token: String,
    /// Where to say hello: the supervisor that sent the adoption.
    pub(crate) supervisor: SocketAddr,
}

/// Bound on waiting for a new leader.
fn rejoin_timeout() -> Duration {
    std::env::var("LAZARUS_REJOIN_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis)
}

/// Runs the link until the worker drops `to_sup` (then the queued messages
/// are written, bounded by the caller) or the supervisor is gone for good.
pub(crate) async fn run(
    env: Arc<WorkerEnv>,
    mut read: CtlRead,
    mut write: CtlWrite,
    mut to_sup: mpsc::UnboundedReceiver<ToSupervisor>,
    ctl_tx: mpsc::UnboundedSender<Option<ToWorker>>,
    adopt: mpsc::UnboundedSender<Adoption>,
    state: LinkState,
) {
    let mut last_token = env.token.clone();
    let mut supervisor = env.supervisor;
    loop {
        let superseded = superseded(
            env.rejoin_file.as_ref(),
            last_token.as_deref(),
            supervisor,
            &state,
        );
        match pump(
            &mut read,
            &mut write,
            &mut to_sup,
            &ctl_tx,
            &adopt,
            supervisor,
            superseded,
        )
        .await
        {
            Pumped::WorkerDone => return,
            Pumped::Lost => {}
            Pumped::Superseded => tracing::warn!(
                %supervisor,
                "a new leader adopted this worker while the old one is silent (hung, not gone)"
            ),
        }
        let (Some(file), Some(info)) = (env.rejoin_file.clone(), state.rejoin()) else {
            let _ = ctl_tx.send(None);
            return;
        };
        tracing::warn!("supervisor connection lost; waiting for the new leader");
        match wait_for_leader(&env, &file, last_token.as_deref(), supervisor, &mut to_sup).await {
            Some((ticket, r, w)) => {
                tracing::info!(supervisor = %ticket.supervisor, "rejoining the new leader");
                read = r;
                write = w;
                supervisor = ticket.supervisor;
                last_token = Some(ticket.token.clone());
                let hello = ToSupervisor::Hello {
                    worker: env.worker.clone(),
                    attempt: ticket.attempt,
                    standby: ticket.standby,
                    token: Some(ticket.token),
                    rejoin: Some(info),
                };
                if protocol::write_control(&mut write, &hello).await.is_err() {
                    let _ = ctl_tx.send(None);
                    return;
                }
            }
            None => {
                let _ = ctl_tx.send(None);
                return;
            }
        }
    }
}

enum Pumped {
    /// The worker is done: every queued message was written.
    WorkerDone,
    /// The connection broke.
    Lost,
    /// A new leader's ticket arrived while the connection stays open: the
    /// supervisor on it hangs (it lost the lead without knowing it).
    Superseded,
}

/// How often a worker with a live connection looks for a new leader's
/// ticket (one failed `open` when there is none).
const TICKET_POLL: Duration = Duration::from_millis(50);

/// Resolves when a ticket from a leader other than `connected` is in `file`
/// and a rejoin makes sense: a new leader adopted this process. Pending
/// without a rejoin file (not an HA cluster). The agent removes the file
/// before it starts the process, so any ticket there names this process.
async fn superseded(
    file: Option<&PathBuf>,
    last_token: Option<&str>,
    connected: SocketAddr,
    state: &LinkState,
) {
    let Some(file) = file else {
        return std::future::pending().await;
    };
    let mut poll = tokio::time::interval(TICKET_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        // An unreadable ticket is reported by `wait_for_leader`, not here
        // every 50 ms.
        let fresh = new_ticket(file, last_token, connected).is_ok_and(|t| t.is_some());
        if fresh && state.rejoin().is_some() {
            return;
        }
    }
}

/// The ticket in `file` if there is one from a new leader: not the last
/// one used (`last_token`), and naming a supervisor other than `last` (the
/// one this process is or was last connected to; a second ticket from it
/// is a duplicate whose credential it already voided).
fn new_ticket(
    file: &PathBuf,
    last_token: Option<&str>,
    last: SocketAddr,
) -> Result<Option<RejoinTicket>, serde_json::Error> {
    let Ok(text) = std::fs::read(file) else {
        return Ok(None);
    };
    let ticket: RejoinTicket = serde_json::from_slice(&text)?;
    let new = Some(ticket.token.as_str()) != last_token && ticket.supervisor != last;
    Ok(new.then_some(ticket))
}

/// Relays both ways until one side ends. The reader is a task of its own
/// (a frame read is not cancel-safe), ended with the connection.
async fn pump(
    read: &mut CtlRead,
    write: &mut CtlWrite,
    to_sup: &mut mpsc::UnboundedReceiver<ToSupervisor>,
    ctl_tx: &mpsc::UnboundedSender<Option<ToWorker>>,
    adopt: &mpsc::UnboundedSender<Adoption>,
    supervisor: SocketAddr,
    superseded: impl std::future::Future<Output = ()>,
) -> Pumped {
    let reader = async {
        loop {
            match protocol::read_control::<_, ToWorker>(read).await {
                Ok(Some(ToWorker::Adopt {
                    worker,
                    attempt,
                    token,
                })) => {
                    let _ = adopt.send(Adoption {
                        worker,
                        attempt,
                        token,
                        supervisor,
                    });
                }
                Ok(Some(msg)) => {
                    if ctl_tx.send(Some(msg)).is_err() {
                        // The worker stopped listening; keep the connection
                        // until it drops `to_sup`.
                        std::future::pending::<()>().await;
                    }
                }
                _ => return,
            }
        }
    };
    let writer = async {
        while let Some(msg) = to_sup.recv().await {
            if protocol::write_control(write, &msg).await.is_err() {
                return false;
            }
        }
        true
    };
    tokio::select! {
        _ = reader => Pumped::Lost,
        done = writer => if done { Pumped::WorkerDone } else { Pumped::Lost },
        () = superseded => Pumped::Superseded,
    }
}

/// Waits for a ticket from a new leader (see [`new_ticket`]), then
/// connects with it.
/// Messages for the supervisor meanwhile are dropped. `None`: timed out, or
/// the worker ended.
async fn wait_for_leader(
    env: &WorkerEnv,
    file: &PathBuf,
    last_token: Option<&str>,
    last: SocketAddr,
    to_sup: &mut mpsc::UnboundedReceiver<ToSupervisor>,
) -> Option<(RejoinTicket, CtlRead, CtlWrite)> {
    let deadline = tokio::time::sleep(rejoin_timeout());
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = &mut deadline => {
                tracing::error!(timeout = ?rejoin_timeout(), "no new leader in time; exiting");
                return None;
            }
            msg = to_sup.recv() => { msg.as_ref()?; }
            _ = poll.tick() => {
                let ticket = match new_ticket(file, last_token, last) {
                    Ok(Some(t)) => t,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "unreadable rejoin ticket");
                        continue;
                    }
                };
                match connect_supervisor(env, ticket.supervisor).await {
                    Ok((r, w)) => return Some((ticket, r, w)),
                    Err(e) => tracing::warn!(error = %e, "cannot reach the new leader yet"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_ticket(file: &PathBuf, supervisor: SocketAddr, token: &str) {
        let t = RejoinTicket {
            supervisor,
            token: token.into(),
            attempt: 0,
            standby: false,
        };
        std::fs::write(file, serde_json::to_vec(&t).expect("ticket json")).expect("write ticket");
    }

    #[test]
    fn test_only_a_ticket_from_another_leader_is_new() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rejoin");
        let leader: SocketAddr = "127.0.0.1:4100".parse().expect("addr");
        let next: SocketAddr = "127.0.0.1:4200".parse().expect("addr");
        assert!(new_ticket(&file, Some("t1"), leader)
            .expect("no file")
            .is_none());
        write_ticket(&file, leader, "t1");
        assert!(new_ticket(&file, Some("t1"), next).expect("used").is_none());
        // A second ticket from the leader this process is connected to: a
        // duplicate (its agent registered twice), not a new leader.
        write_ticket(&file, leader, "t2");
        assert!(new_ticket(&file, Some("t1"), leader)
            .expect("dup")
            .is_none());
        write_ticket(&file, next, "t3");
        let t = new_ticket(&file, Some("t1"), leader)
            .expect("readable")
            .expect("a new leader's ticket");
        assert_eq!((t.supervisor, t.token.as_str()), (next, "t3"));
        std::fs::write(&file, b"{not json").expect("write");
        assert!(new_ticket(&file, Some("t1"), leader).is_err());
    }

    #[tokio::test]
    async fn test_a_duplicate_ticket_does_not_drop_a_live_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rejoin");
        let leader: SocketAddr = "127.0.0.1:4100".parse().expect("addr");
        let state = LinkState::default();
        state.running();
        write_ticket(&file, leader, "t2");
        // Six polls and more: a duplicate never supersedes.
        let dup = tokio::time::timeout(
            TICKET_POLL * 6,
            superseded(Some(&file), Some("t1"), leader, &state),
        )
        .await;
        assert!(dup.is_err(), "a duplicate ticket superseded the connection");
        write_ticket(&file, "127.0.0.1:4200".parse().expect("addr"), "t3");
        tokio::time::timeout(
            Duration::from_secs(5),
            superseded(Some(&file), Some("t1"), leader, &state),
        )
        .await
        .expect("a new leader's ticket supersedes the connection");
    }
}
