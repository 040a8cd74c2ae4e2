//! The checkpoint coordinator: pure decisions, no I/O and no clock. The
//! supervisor feeds it observed facts (time passes, a worker acked, a commit
//! succeeded, a source ran dry, a worker failed) and carries out the
//! [`Decision`]s it returns. Time is a `Duration` since an arbitrary origin,
//! passed in by the caller, so tests drive it by hand.
//!
//! Rules (asynchronous barrier snapshotting, DESIGN.md):
//! - trigger a checkpoint every `interval` while fewer than `max_concurrent`
//!   are in flight; ids only go up, also across aborts and restarts;
//! - a checkpoint is complete when every worker acked it; the supervisor then
//!   commits its manifest and reports back;
//! - a checkpoint not committed within `timeout` is aborted; acks that arrive
//!   for an aborted (or unknown) checkpoint are ignored;
//! - committing `n` subsumes every pending checkpoint older than `n`, and
//!   a checkpoint completing while a newer one is already committing is
//!   subsumed too, so manifests reach the store in id order;
//! - when every source has run dry, one final checkpoint is triggered; when it
//!   commits the job is finished;
//! - a worker failure aborts everything in flight (the job rolls back).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lazarus_storage::{CheckpointId, Epoch, JobId, Manifest, WorkerId, WorkerSnapshot};

/// Coordinator settings (from the job spec's `[checkpoint]`).
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Time between triggers; `None` takes only the final checkpoint.
    pub interval: Option<Duration>,
    /// Abort a checkpoint not committed this long after its trigger.
    pub timeout: Duration,
    /// Checkpoints in flight at once.
    pub max_concurrent: usize,
}

/// Why a checkpoint was abandoned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortReason {
    /// Not complete within the timeout.
    Timeout,
    /// A newer checkpoint committed first.
    Subsumed,
    /// A worker failed; the job rolls back.
    WorkerFailed,
    /// Writing the manifest failed.
    CommitFailed(String),
}

/// What the supervisor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Tell these sources to take checkpoint `checkpoint`.
    Trigger {
        /// The new checkpoint.
        checkpoint: CheckpointId,
        /// The source workers.
        sources: Vec<WorkerId>,
    },
    /// Every worker acked: write this manifest, then report
    /// [`CheckpointCoordinator::on_committed`] or `on_commit_failed`.
    Commit(Box<Manifest>),
    /// Tell workers the checkpoint is abandoned.
    Abort {
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// Why.
        reason: AbortReason,
    },
    /// The final checkpoint committed: shut the job down.
    Finish,
}

#[derive(Debug)]
struct Pending {
    triggered_at: Duration,
    acks: BTreeMap<WorkerId, WorkerSnapshot>,
    committing: bool,
    is_final: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct CheckpointCoordinator {
    config: CoordinatorConfig,
    job: JobId,
    epoch: Epoch,
    workers: BTreeSet<WorkerId>,
    sources: BTreeSet<WorkerId>,
    next_id: CheckpointId,
    pending: BTreeMap<CheckpointId, Pending>,
    last_trigger: Option<Duration>,
    exhausted: BTreeSet<WorkerId>,
    final_wanted: bool,
    final_triggered: Option<CheckpointId>,
    latest_committed: Option<CheckpointId>,
}

impl CheckpointCoordinator {
    /// A coordinator for one run of the job. `next_id` is above every id
    /// used before (committed or not), so ids never repeat.
    pub fn new(
        config: CoordinatorConfig,
        job: JobId,
        epoch: Epoch,
        workers: impl IntoIterator<Item = WorkerId>,
        sources: impl IntoIterator<Item = WorkerId>,
        next_id: CheckpointId,
    ) -> CheckpointCoordinator {
        CheckpointCoordinator {
            config,
            job,
            epoch,
            workers: workers.into_iter().collect(),
            sources: sources.into_iter().collect(),
            next_id,
            pending: BTreeMap::new(),
            last_trigger: None,
            exhausted: BTreeSet::new(),
            final_wanted: false,
            final_triggered: None,
            latest_committed: None,
        }
    }

    /// The next id this coordinator would use.
    pub fn next_id(&self) -> CheckpointId {
        self.next_id
    }

    /// The newest checkpoint committed in this run.
    pub fn latest_committed(&self) -> Option<CheckpointId> {
        self.latest_committed
    }

    /// Checkpoints in flight.
    pub fn in_flight(&self) -> Vec<CheckpointId> {
        self.pending.keys().copied().collect()
    }

    /// When `checkpoint` was triggered, if it is in flight.
    pub fn triggered_at(&self, checkpoint: CheckpointId) -> Option<Duration> {
        self.pending.get(&checkpoint).map(|p| p.triggered_at)
    }

    /// Whether `checkpoint` is the final one (nothing commits after it).
    pub fn is_final(&self, checkpoint: CheckpointId) -> bool {
        self.pending.get(&checkpoint).is_some_and(|p| p.is_final)
    }

    fn trigger(&mut self, now: Duration, is_final: bool) -> Decision {
        let checkpoint = self.next_id;
        self.next_id = self.next_id.next();
        self.last_trigger = Some(now);
        self.pending.insert(
            checkpoint,
            Pending {
                triggered_at: now,
                acks: BTreeMap::new(),
                committing: false,
                is_final,
            },
        );
        if is_final {
            self.final_triggered = Some(checkpoint);
        }
        Decision::Trigger {
            checkpoint,
            sources: self.sources.iter().cloned().collect(),
        }
    }

    /// Time passed: abort what timed out, trigger what is due.
    pub fn tick(&mut self, now: Duration) -> Vec<Decision> {
        let mut out = Vec::new();
        let timed_out: Vec<CheckpointId> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                !p.committing && now.saturating_sub(p.triggered_at) >= self.config.timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for id in timed_out {
            let p = self.pending.remove(&id).expect("listed above");
            if p.is_final {
                // The final checkpoint must happen: ask for it again.
                self.final_triggered = None;
            }
            out.push(Decision::Abort {
                checkpoint: id,
                reason: AbortReason::Timeout,
            });
        }
        let has_room = self.pending.len() < self.config.max_concurrent;
        if self.final_wanted && self.final_triggered.is_none() {
            if has_room {
                out.push(self.trigger(now, true));
            }
        } else if self.final_triggered.is_none() && has_room {
            if let Some(interval) = self.config.interval {
                let due = self
                    .last_trigger
                    .is_none_or(|t| now.saturating_sub(t) >= interval);
                if due {
                    out.push(self.trigger(now, false));
                }
            }
        }
        out
    }

    /// `worker` acked `checkpoint` with what it wrote.
    pub fn on_ack(
        &mut self,
        worker: &WorkerId,
        checkpoint: CheckpointId,
        snapshot: WorkerSnapshot,
    ) -> Vec<Decision> {
        if !self.workers.contains(worker) {
            return Vec::new();
        }
        let Some(p) = self.pending.get_mut(&checkpoint) else {
            // Late ack of an aborted or subsumed checkpoint: its objects are garbage.
            return Vec::new();
        };
        p.acks.insert(worker.clone(), snapshot);
        if p.committing || p.acks.len() < self.workers.len() {
            return Vec::new();
        }
        // Commits go to the store in the order they are decided. A newer
        // checkpoint already committing subsumes this one: committing it
        // after would put an older manifest behind a newer one.
        if self
            .pending
            .range(checkpoint.next()..)
            .any(|(_, q)| q.committing)
        {
            self.pending.remove(&checkpoint);
            return vec![Decision::Abort {
                checkpoint,
                reason: AbortReason::Subsumed,
            }];
        }
        let Some(p) = self.pending.get_mut(&checkpoint) else {
            return Vec::new();
        };
        p.committing = true;
        let mut manifest = Manifest::new(self.job.clone(), checkpoint, self.epoch);
        manifest.workers = p.acks.clone();
        vec![Decision::Commit(Box::new(manifest))]
    }

    /// The manifest of `checkpoint` is committed.
    pub fn on_committed(&mut self, checkpoint: CheckpointId) -> Vec<Decision> {
        let mut out = Vec::new();
        let Some(p) = self.pending.remove(&checkpoint) else {
            return out;
        };
        self.latest_committed = Some(
            self.latest_committed
                .map_or(checkpoint, |l| l.max(checkpoint)),
        );
        let older: Vec<CheckpointId> = self
            .pending
            .range(..checkpoint)
            .map(|(id, _)| *id)
            .collect();
        for id in older {
            self.pending.remove(&id);
            out.push(Decision::Abort {
                checkpoint: id,
                reason: AbortReason::Subsumed,
            });
        }
        if p.is_final {
            out.push(Decision::Finish);
        }
        out
    }

    /// Writing the manifest of `checkpoint` failed.
    pub fn on_commit_failed(&mut self, checkpoint: CheckpointId, reason: String) -> Vec<Decision> {
        match self.pending.remove(&checkpoint) {
            Some(p) => {
                if p.is_final {
                    self.final_triggered = None;
                }
                vec![Decision::Abort {
                    checkpoint,
                    reason: AbortReason::CommitFailed(reason),
                }]
            }
            None => Vec::new(),
        }
    }

    /// Source `worker` has no more input. When all have, the final
    /// checkpoint is triggered (now, or when there is room).
    pub fn on_source_exhausted(&mut self, now: Duration, worker: &WorkerId) -> Vec<Decision> {
        if self.sources.contains(worker) {
            self.exhausted.insert(worker.clone());
        }
        if self.exhausted.len() == self.sources.len() {
            self.final_wanted = true;
            return self.tick(now);
        }
        Vec::new()
    }

    /// Sources that said they ran dry.
    pub fn exhausted(&self) -> &BTreeSet<WorkerId> {
        &self.exhausted
    }

    /// Marks source `worker` as dry without triggering anything (a region
    /// failover carries what survivors said over to the next coordinator).
    pub fn mark_exhausted(&mut self, worker: &WorkerId) {
        if self.sources.contains(worker) {
            self.exhausted.insert(worker.clone());
        }
    }

    /// Stop on request: take one more checkpoint, then finish.
    pub fn request_final(&mut self, now: Duration) -> Vec<Decision> {
        self.final_wanted = true;
        self.tick(now)
    }

    /// A worker failed: everything in flight is abandoned.
    pub fn on_failure(&mut self) -> Vec<Decision> {
        let ids: Vec<CheckpointId> = self.pending.keys().copied().collect();
        self.pending.clear();
        self.final_triggered = None;
        ids.into_iter()
            .map(|checkpoint| Decision::Abort {
                checkpoint,
                reason: AbortReason::WorkerFailed,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str) -> WorkerId {
        WorkerId::new(name).expect("worker")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn coordinator(max_concurrent: usize) -> CheckpointCoordinator {
        CheckpointCoordinator::new(
            CoordinatorConfig {
                interval: Some(ms(100)),
                timeout: ms(1000),
                max_concurrent,
            },
            JobId::new("j").expect("job"),
            Epoch(3),
            [w("src-0"), w("op-0"), w("op-1")],
            [w("src-0")],
            CheckpointId(5),
        )
    }

    fn ack_all(c: &mut CheckpointCoordinator, id: u64) -> Vec<Decision> {
        let mut out = Vec::new();
        for name in ["src-0", "op-0", "op-1"] {
            out.extend(c.on_ack(&w(name), CheckpointId(id), WorkerSnapshot::default()));
        }
        out
    }

    #[test]
    fn test_triggers_on_interval_within_concurrency() {
        let mut c = coordinator(1);
        let d = c.tick(ms(0));
        assert_eq!(
            d,
            vec![Decision::Trigger {
                checkpoint: CheckpointId(5),
                sources: vec![w("src-0")]
            }]
        );
        // One in flight already: no second trigger even when due.
        assert!(c.tick(ms(500)).is_empty());
        let mut c2 = coordinator(2);
        c2.tick(ms(0));
        assert!(c2.tick(ms(50)).is_empty(), "not due yet");
        assert!(matches!(
            c2.tick(ms(100))[..],
            [Decision::Trigger {
                checkpoint: CheckpointId(6),
                ..
            }]
        ));
    }

    #[test]
    fn test_commit_only_when_every_worker_acked() {
        let mut c = coordinator(1);
        c.tick(ms(0));
        assert!(c
            .on_ack(&w("src-0"), CheckpointId(5), WorkerSnapshot::default())
            .is_empty());
        assert!(c
            .on_ack(&w("op-0"), CheckpointId(5), WorkerSnapshot::default())
            .is_empty());
        // A duplicate ack does not complete it.
        assert!(c
            .on_ack(&w("op-0"), CheckpointId(5), WorkerSnapshot::default())
            .is_empty());
        // Unknown workers are ignored.
        assert!(c
            .on_ack(&w("stranger-0"), CheckpointId(5), WorkerSnapshot::default())
            .is_empty());
        let d = c.on_ack(
            &w("op-1"),
            CheckpointId(5),
            WorkerSnapshot {
                chunks: vec![],
                metadata: b"m".to_vec(),
            },
        );
        let [Decision::Commit(m)] = &d[..] else {
            panic!("{d:?}")
        };
        assert_eq!(
            (m.checkpoint, m.epoch, m.workers.len()),
            (CheckpointId(5), Epoch(3), 3)
        );
        assert_eq!(m.workers[&w("op-1")].metadata, b"m");
        // While committing, the timeout does not abort it.
        assert!(c
            .tick(ms(5000))
            .iter()
            .all(|d| !matches!(d, Decision::Abort { .. })));
        assert!(c.on_committed(CheckpointId(5)).is_empty());
        assert_eq!(c.latest_committed(), Some(CheckpointId(5)));
    }

    #[test]
    fn test_timeout_aborts_and_late_acks_are_ignored() {
        let mut c = coordinator(1);
        c.tick(ms(0));
        c.on_ack(&w("src-0"), CheckpointId(5), WorkerSnapshot::default());
        let d = c.tick(ms(1000));
        assert_eq!(
            d[0],
            Decision::Abort {
                checkpoint: CheckpointId(5),
                reason: AbortReason::Timeout
            }
        );
        // Room again: the next checkpoint is triggered with a new id.
        assert!(matches!(
            d[1],
            Decision::Trigger {
                checkpoint: CheckpointId(6),
                ..
            }
        ));
        // Late acks of 5 change nothing, and 5 never commits.
        assert!(ack_all(&mut c, 5).is_empty());
        assert!(matches!(ack_all(&mut c, 6)[..], [Decision::Commit(_)]));
    }

    #[test]
    fn test_newer_commit_subsumes_older_pending() {
        let mut c = coordinator(2);
        c.tick(ms(0));
        c.tick(ms(100));
        assert_eq!(c.in_flight(), vec![CheckpointId(5), CheckpointId(6)]);
        assert!(matches!(ack_all(&mut c, 6)[..], [Decision::Commit(_)]));
        assert_eq!(
            c.on_committed(CheckpointId(6)),
            vec![Decision::Abort {
                checkpoint: CheckpointId(5),
                reason: AbortReason::Subsumed
            }]
        );
        assert!(c.in_flight().is_empty());
    }

    #[test]
    fn test_failure_mid_checkpoint_aborts_and_ids_keep_rising() {
        let mut c = coordinator(1);
        c.tick(ms(0));
        c.on_ack(&w("src-0"), CheckpointId(5), WorkerSnapshot::default());
        assert_eq!(
            c.on_failure(),
            vec![Decision::Abort {
                checkpoint: CheckpointId(5),
                reason: AbortReason::WorkerFailed
            }]
        );
        // The restarted run continues above every id used so far.
        let next = c.next_id();
        assert_eq!(next, CheckpointId(6));
        let mut restarted = CheckpointCoordinator::new(
            CoordinatorConfig {
                interval: Some(ms(100)),
                timeout: ms(1000),
                max_concurrent: 1,
            },
            JobId::new("j").expect("job"),
            Epoch(3),
            [w("src-0")],
            [w("src-0")],
            next,
        );
        assert!(matches!(
            restarted.tick(ms(0))[..],
            [Decision::Trigger {
                checkpoint: CheckpointId(6),
                ..
            }]
        ));
    }

    #[test]
    fn test_final_checkpoint_after_sources_run_dry() {
        let mut c = coordinator(1);
        c.tick(ms(0)); // 5 in flight
        assert!(
            c.on_source_exhausted(ms(10), &w("src-0")).is_empty(),
            "waits for room"
        );
        assert!(matches!(ack_all(&mut c, 5)[..], [Decision::Commit(_)]));
        assert!(
            c.on_committed(CheckpointId(5)).is_empty(),
            "5 was triggered before the sources ran dry"
        );
        let d = c.tick(ms(20));
        assert!(matches!(
            d[..],
            [Decision::Trigger {
                checkpoint: CheckpointId(6),
                ..
            }]
        ));
        // No periodic checkpoints after the final one was triggered.
        assert!(c.tick(ms(900)).is_empty());
        assert!(matches!(ack_all(&mut c, 6)[..], [Decision::Commit(_)]));
        assert_eq!(c.on_committed(CheckpointId(6)), vec![Decision::Finish]);
    }

    #[test]
    fn test_final_checkpoint_retried_after_commit_failure() {
        let mut c = coordinator(1);
        let d = c.request_final(ms(0));
        assert!(matches!(
            d[..],
            [Decision::Trigger {
                checkpoint: CheckpointId(5),
                ..
            }]
        ));
        ack_all(&mut c, 5);
        let d = c.on_commit_failed(CheckpointId(5), "store down".into());
        assert!(matches!(
            &d[..],
            [Decision::Abort {
                reason: AbortReason::CommitFailed(_),
                ..
            }]
        ));
        assert!(matches!(
            c.tick(ms(1))[..],
            [Decision::Trigger {
                checkpoint: CheckpointId(6),
                ..
            }]
        ));
    }
}
