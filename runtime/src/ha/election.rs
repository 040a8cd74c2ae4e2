//! One supervisor's campaign for leadership in etcd.
//!
//! The rules:
//! 1. Every supervisor holds an etcd lease of `lease` length and keeps it
//!    alive itself; its member key is bound to it.
//! 2. The leader key is written only when absent (a transaction on its
//!    create revision being 0), bound to the writer's lease. The revision
//!    of that write is the leader's **term**: it only grows.
//! 3. A leader leads while it can prove it: its lease was renewed by a
//!    keep-alive *sent* less than `lease - margin` ago (counted from the
//!    request, by its own clock). etcd expires the lease no earlier than
//!    `lease` after it *received* the last keep-alive, so a leader always
//!    stops acting before another can be elected.
//! 4. A follower watches the leader key and campaigns the moment it is
//!    deleted (resignation or lease expiry).
//! 5. A broken keep-alive stream or watch (a member restarting, a reset
//!    connection) is opened again at the next renewal tick; leadership ends
//!    only when its proof runs out (rule 3), etcd says the lease expired, or
//!    the leader key is gone or changed. Then the session ends: a leader
//!    steps down (role becomes `Follower`), and a new session with a new
//!    lease starts after a backoff.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{connect, leader_key, member_key, HaError, HaOptions, Member};
use crate::clock::tokio_now;

/// What this supervisor is right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not leading; `leader` is the current leader if one is known.
    Follower {
        /// The leader, if any.
        leader: Option<Member>,
        /// Why this supervisor is not campaigning right now (etcd down).
        error: Option<String>,
    },
    /// Leading under `term`.
    Leader {
        /// The leader key's create revision.
        term: i64,
    },
}

impl Role {
    /// The term, if leading.
    pub fn term(&self) -> Option<i64> {
        match self {
            Role::Leader { term } => Some(*term),
            Role::Follower { .. } => None,
        }
    }
}

/// The campaign: a task that publishes this supervisor's [`Role`].
pub struct Elector {
    role: watch::Receiver<Role>,
}

impl Elector {
    /// Starts campaigning (on `tracker`, until `cancel`). On cancel the
    /// leader key is deleted if it is ours and the lease revoked, so a
    /// follower takes over at once instead of after a lease.
    pub fn start(
        opts: HaOptions,
        tracker: &tokio_util::task::TaskTracker,
        cancel: CancellationToken,
    ) -> Elector {
        let (tx, role) = watch::channel(Role::Follower {
            leader: None,
            error: None,
        });
        tracker.spawn(campaign(opts, tx, cancel));
        Elector { role }
    }

    /// The role, as it changes.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }
}

async fn campaign(opts: HaOptions, tx: watch::Sender<Role>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut session = Session {
            opts: &opts,
            tx: &tx,
            lease: None,
            client: None,
        };
        let ended = tokio::select! {
            r = session.run() => r,
            _ = cancel.cancelled() => Ok(()),
        };
        let was_leader = tx.borrow().term();
        // Resign (bounded): delete the leader key if it is still ours, and
        // revoke the lease, which also removes our member key.
        session.resign(was_leader).await;
        if cancel.is_cancelled() {
            tx.send_replace(Role::Follower {
                leader: None,
                error: Some("stopped".into()),
            });
            return;
        }
        let error = match ended {
            Ok(()) => "session ended".to_string(),
            Err(e) => e.to_string(),
        };
        if let Some(term) = was_leader {
            tracing::warn!(term, error = %error, "leadership lost; stepping down");
        } else {
            tracing::warn!(error = %error, "etcd session ended; campaigning again");
        }
        tx.send_replace(Role::Follower {
            leader: None,
            error: Some(error),
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

struct Session<'a> {
    opts: &'a HaOptions,
    tx: &'a watch::Sender<Role>,
    lease: Option<i64>,
    client: Option<etcd_client::Client>,
}

/// Proof of leadership ends this long before the lease would, for clock
/// rate differences between this host and etcd's.
fn margin(lease: Duration) -> Duration {
    (lease / 10).max(Duration::from_millis(100))
}

impl Session<'_> {
    async fn run(&mut self) -> Result<(), HaError> {
        let opts = self.opts;
        let mut client = connect(&opts.endpoints).await?;
        self.client = Some(client.clone());
        // Whole seconds, at least 2 (HaOptions::validate): the proof below
        // counts with exactly what etcd is asked for.
        let ttl = opts.lease.as_secs() as i64;
        let sent = tokio_now();
        let lease = client.lease_grant(ttl, None).await?.id();
        self.lease = Some(lease);
        let mut proven_until = sent + opts.lease - margin(opts.lease);
        let (mut keeper, mut alive) = client.lease_keep_alive(lease).await?;
        let me = serde_json::to_vec(&Member {
            name: opts.name.clone(),
            addr: opts.advertise,
        })
        .map_err(|e| HaError::Malformed {
            key: member_key(&opts.prefix, &opts.name),
            reason: e.to_string(),
        })?;
        client
            .put(
                member_key(&opts.prefix, &opts.name),
                me.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        let key = leader_key(&opts.prefix);
        let mut renew = tokio::time::interval(opts.lease / 4);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outstanding: VecDeque<tokio::time::Instant> = VecDeque::new();
        loop {
            // Rule 2: the leader key only when absent.
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    me.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = client.txn(txn).await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            let mut watch_from = revision + 1;
            if resp.succeeded() {
                tracing::info!(term = revision, name = %opts.name, "elected leader");
                self.tx.send_replace(Role::Leader { term: revision });
            } else {
                let mut leader = None;
                for op in resp.op_responses() {
                    if let TxnOpResponse::Get(g) = op {
                        if let Some(kv) = g.kvs().first() {
                            leader = serde_json::from_slice::<Member>(kv.value()).ok();
                            watch_from = kv.mod_revision() + 1;
                        }
                    }
                }
                if leader.is_none() {
                    // Deleted between the compare and the get: try again.
                    continue;
                }
                self.tx.send_replace(Role::Follower {
                    leader,
                    error: None,
                });
            }
            // Watch the leader key: a follower campaigns when it goes, a
            // leader steps down if it goes (deleted by hand, or expired).
            let term = self.tx.borrow().term();
            let mut watch = client
                .watch(
                    key.clone(),
                    Some(WatchOptions::new().with_start_revision(watch_from)),
                )
                .await?;
            // A broken stream (an etcd member restarting, a connection
            // reset) is not a lost lease: it is opened again on the next
            // renewal tick, and only the proof's deadline ends leadership.
            let mut alive_ok = true;
            let mut watch_ok = true;
            loop {
                let leading = term.is_some();
                tokio::select! {
                    _ = renew.tick() => {
                        if !alive_ok {
                            let sent = tokio_now();
                            match tokio::time::timeout(Duration::from_secs(2), client.lease_keep_alive(lease)).await {
                                Ok(Ok((k, a))) => {
                                    keeper = k;
                                    alive = a;
                                    alive_ok = true;
                                    outstanding.clear();
                                    // Its first answer renewed the lease.
                                    proven_until = proven_until.max(sent + opts.lease - margin(opts.lease));
                                }
                                Ok(Err(e)) if e.to_string().contains("lease not found") => {
                                    return Err(HaError::Malformed { key: key.clone(), reason: format!("lease {lease:x} expired") });
                                }
                                Ok(Err(e)) => tracing::warn!(error = %e, "reopening the lease keep-alive"),
                                Err(_) => tracing::warn!("reopening the lease keep-alive timed out"),
                            }
                        } else if keeper.keep_alive().await.is_ok() {
                            outstanding.push_back(tokio_now());
                        } else {
                            alive_ok = false;
                        }
                        if !watch_ok {
                            match tokio::time::timeout(Duration::from_secs(2), client.get(key.clone(), None)).await {
                                Ok(Ok(g)) => {
                                    let kv = g.kvs().first();
                                    let still = kv.map(|kv| kv.create_revision());
                                    match (term, still) {
                                        (Some(t), s) if s != Some(t) => {
                                            return Err(HaError::Malformed { key: key.clone(), reason: "the leader key changed while unwatched".into() });
                                        }
                                        (None, None) => break,
                                        _ => {}
                                    }
                                    let from = g.header().map_or(0, |h| h.revision()) + 1;
                                    match client.watch(key.clone(), Some(WatchOptions::new().with_start_revision(from))).await {
                                        Ok(w) => {
                                            watch = w;
                                            watch_ok = true;
                                        }
                                        Err(e) => tracing::warn!(error = %e, "watching the leader key again"),
                                    }
                                }
                                Ok(Err(e)) => tracing::warn!(error = %e, "reading the leader key"),
                                Err(_) => tracing::warn!("reading the leader key timed out"),
                            }
                        }
                    }
                    msg = alive.message(), if alive_ok => match msg {
                        Ok(Some(r)) => {
                            let sent = outstanding.pop_front().unwrap_or(proven_until);
                            if r.ttl() <= 0 {
                                return Err(HaError::Malformed { key: key.clone(), reason: format!("lease {lease:x} expired") });
                            }
                            proven_until = proven_until.max(sent + opts.lease - margin(opts.lease));
                        }
                        other => {
                            tracing::warn!(error = ?other.err(), "lease keep-alive stream broke; reopening");
                            alive_ok = false;
                            outstanding.clear();
                        }
                    },
                    // Rule 3: no proof, no leadership (followers start over
                    // with a new lease too: their member key is gone).
                    _ = tokio::time::sleep_until(proven_until) => {
                        return Err(HaError::Timeout(opts.lease));
                    }
                    w = watch.message(), if watch_ok => {
                        let w = match w {
                            Ok(Some(w)) if !w.canceled() => w,
                            other => {
                                tracing::warn!(error = ?other.err(), "leader key watch broke; watching again");
                                watch_ok = false;
                                continue;
                            }
                        };
                        let gone = w.events().iter().any(|e| e.event_type() == EventType::Delete);
                        if gone && leading {
                            return Err(HaError::Malformed { key: key.clone(), reason: "the leader key was deleted".into() });
                        }
                        if gone {
                            break;
                        }
                        if let Some(m) = w.events().iter().filter_map(|e| e.kv()).filter_map(|kv| serde_json::from_slice::<Member>(kv.value()).ok()).next_back() {
                            if !leading {
                                self.tx.send_replace(Role::Follower { leader: Some(m), error: None });
                            }
                        }
                    }
                }
            }
        }
    }

    /// Deletes the leader key if `term` is ours and revokes the lease
    /// (bounded: 1 s).
    async fn resign(&mut self, term: Option<i64>) {
        let (Some(mut client), Some(lease)) = (self.client.take(), self.lease.take()) else {
            return;
        };
        let key = leader_key(&self.opts.prefix);
        let work = async {
            if let Some(term) = term {
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        term,
                    )])
                    .and_then([TxnOp::delete(key.clone(), None)]);
                let _ = client.txn(txn).await;
            }
            let _ = client.lease_revoke(lease).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), work).await;
    }
}
