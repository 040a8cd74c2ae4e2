//! The job controller: every decision about one job, with no I/O. The shell
//! ([`super`]) turns sockets, child exits, storage results, stop requests and
//! the passing of time into [`Fact`]s, calls [`JobController::handle`] with
//! the time, and carries out the [`Action`]s it returns. Nothing in here
//! reads a clock, opens a socket, touches a file or spawns a task, so the
//! simulation (`super::sim`) drives it through thousands of fault schedules
//! on a manual clock.
//!
//! # Phases
//!
//! ```text
//!            all running                 final checkpoint committed
//! Starting ─────────────► Running ───────────────────────────► Finishing ──► Finished
//!    │ ▲                    │  failure (exit, disconnect, missed     │ all exited
//!    │ │ epoch claimed      │  heartbeats, host lost, timeout)       │
//!    │ └── Claiming ◄── Recovering ◄──────────────────────────────────┘ (a sink died)
//!    └─────────────────────►  │ backoff, budget spent ─► Failed
//!           stop / fatal error / fenced ─────────────────────────► Stopped / Failed
//!
//! Adopting ──► Running      (a new HA leader: every primary rejoined)
//!     └──────► Recovering   (one did not, within the adoption timeout)
//! ```
//!
//! A new leader of an HA cluster builds the controller from the job's
//! record ([`Adoption`]: attempt, processes, placement, VIPs) with
//! [`JobController::adopt`]: the processes keep running, get rejoin
//! tickets through their agents, and reconnect; checkpoint ids resume above
//! every id any of them saw.
//!
//! # Rules (exactly-once and failover rest on them)
//!
//! 1. A manifest is committed only after every worker of the attempt acked
//!    (the [`CheckpointCoordinator`]); `Committed(n)` is announced only after
//!    the store reported the commit durable ([`Fact::CommitDone`]).
//! 2. A recovery claims a new epoch and restores the newest committed
//!    checkpoint the store reports with the claim (its own, or a newer one),
//!    so nothing committed is lost and a commit of the old attempt is fenced.
//!    It does not wait for a commit in flight: the store decides each of
//!    them against the claim (visible before it, or fenced). A checkpoint
//!    visible but not yet durable may be restored; its sinks then recover
//!    it only on `Committed(n)`, sent when the commit is durable (rule 1),
//!    so no output is published from a checkpoint a power loss could undo.
//! 3. At most one primary process per worker: a failed attempt's primaries
//!    are killed and their exits awaited (bounded) before the next attempt
//!    places any; a standby is promoted only after its primary is gone.
//! 4. A VIP is assigned only to the host of the worker's primary of the
//!    current attempt, and never to a host known to be lost.
//! 5. Nothing is sent to, spawned on or killed on a host known to be lost.
//! 6. A job ends only by its stop, its final checkpoint, a fatal worker
//!    error, fencing, or its restart budget.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use lazarus_sdk::protocol::{Rejoin, ToSupervisor, ToWorker};
use lazarus_storage::{CheckpointId, Epoch, JobId, Manifest, WorkerId};
use serde::{Deserialize, Serialize};

use crate::cluster::wire::{JobStatus, WorkerStatus};
use crate::coordinator::{CheckpointCoordinator, CoordinatorConfig, Decision};
use crate::placement::{self, Placed};
use crate::procs::{ExitKind, Slot, WorkerExited};
use crate::spec::{PlannedWorker, RestartSection, StandbyKind};

/// A control connection, numbered by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Random worker kills, to watch recovery live (`lazarus run --chaos-…`).
#[derive(Debug, Clone, Copy)]
pub struct Chaos {
    /// Mean time between kills; each gap is drawn from 0.5 to 1.5 times it.
    pub every: Duration,
    /// Seed of the choice of victims and gaps.
    pub seed: u64,
    /// Stop killing after this many kills (so a run is sure to finish).
    pub max_kills: Option<u32>,
    /// A kill falls due only once a checkpoint has committed since the
    /// last recovery (or the start): every recovery then rolls back to a
    /// checkpoint of its attempt's progress, and a job whose checkpoints
    /// are slower than the kills still progresses.
    pub after_commit: bool,
}

/// The controller's settings (from the job spec and the run's options).
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The job.
    pub job: JobId,
    /// Its workers, in plan order.
    pub plan: Vec<PlannedWorker>,
    /// Checkpoint interval, timeout, concurrency.
    pub checkpoint: CoordinatorConfig,
    /// Committed checkpoints retention keeps.
    pub retention_keep: usize,
    /// At most one retention pass per this interval (a pass lists and reads
    /// every manifest; at a 20 ms checkpoint interval it must not run per
    /// commit).
    pub retention_every: Duration,
    /// A primary silent this long is failed.
    pub heartbeat_timeout: Duration,
    /// Every worker must be running this long after an attempt starts.
    pub startup_timeout: Duration,
    /// The restart strategy.
    pub restart: RestartSection,
    /// On a stop request, take a final checkpoint first.
    pub final_checkpoint_on_stop: bool,
    /// Random kills.
    pub chaos: Option<Chaos>,
    /// The fleet holds VIPs (a cluster; `lazarus run` does not).
    pub vips: bool,
    /// A failure that names no worker (a lost connection) waits this long
    /// for the crashed process's exit to name it.
    pub root_cause_wait: Duration,
    /// How long a recovery waits for the failed attempt's primaries to exit.
    pub drain_timeout: Duration,
    /// How long a new HA leader waits for an adopted job's processes to
    /// rejoin before it recovers the job instead.
    pub adopt_timeout: Duration,
    /// A recovery of a running job keeps the processes that did not fail:
    /// they are halted and rolled back in place (a new assignment on their
    /// connection), and only the failed workers' processes are replaced.
    pub rollback_in_place: bool,
    /// Periodic checkpoints are announced to every worker, which then
    /// finds the barriers by reading its inputs ahead (`read_ahead` in the
    /// spec's `[checkpoint]`).
    pub read_ahead: bool,
}

impl ControllerConfig {
    /// Settings from a job spec (run options stay at their defaults).
    pub fn from_spec(spec: &crate::spec::JobSpec) -> Self {
        let mut cfg = ControllerConfig::new(
            spec.job_id(),
            spec.plan(),
            CoordinatorConfig {
                interval: spec.checkpoint.interval,
                timeout: spec.checkpoint.timeout,
                max_concurrent: spec.checkpoint.max_concurrent as usize,
            },
        );
        cfg.retention_keep = spec.checkpoint.retention;
        cfg.retention_every = spec.checkpoint.retention_interval;
        cfg.heartbeat_timeout = spec.job.heartbeat_timeout;
        cfg.restart = spec.restart.clone();
        cfg.rollback_in_place = spec.restart.keep_processes;
        cfg.read_ahead = spec.checkpoint.read_ahead;
        cfg
    }

    /// Settings with the runtime's fixed defaults for `plan`.
    pub fn new(job: JobId, plan: Vec<PlannedWorker>, checkpoint: CoordinatorConfig) -> Self {
        ControllerConfig {
            job,
            plan,
            checkpoint,
            retention_keep: 3,
            retention_every: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(60),
            restart: RestartSection::default(),
            final_checkpoint_on_stop: false,
            chaos: None,
            vips: false,
            root_cause_wait: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(10),
            adopt_timeout: Duration::from_secs(10),
            rollback_in_place: true,
            read_ahead: true,
        }
    }
}

/// Something the shell observed.
#[derive(Debug, Clone)]
pub enum Fact {
    /// Time passed.
    Tick,
    /// A control connection introduced itself.
    Hello {
        /// The connection.
        conn: ConnId,
        /// Who it says it is.
        worker: WorkerId,
        /// The attempt it was started for.
        attempt: u64,
        /// Started as a hot standby.
        standby: bool,
        /// A running process reconnecting to a new leader.
        rejoin: Option<Rejoin>,
    },
    /// A message on an accepted connection.
    Message {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: ToSupervisor,
    },
    /// A connection closed (or sent garbage).
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// A worker process ended.
    Exited(WorkerExited),
    /// A host was declared lost: every process on it is gone.
    HostLost(String),
    /// A host (re)joined.
    HostJoined(String),
    /// Manifest `checkpoint` of `epoch` is durable.
    CommitDone {
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// The epoch it was committed under.
        epoch: Epoch,
        /// Its stored size.
        stored_bytes: u64,
    },
    /// Writing manifest `checkpoint` failed; it may be retried later.
    CommitFailed {
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// The epoch it was attempted under.
        epoch: Epoch,
        /// Why.
        error: String,
    },
    /// Manifest `checkpoint` was refused: a newer epoch owns the job.
    CommitFenced {
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// The epoch it was attempted under.
        epoch: Epoch,
        /// The store's message.
        error: String,
    },
    /// The epoch asked for is claimed; `latest` is the newest committed
    /// checkpoint in the store after the claim.
    EpochClaimed {
        /// The epoch.
        epoch: Epoch,
        /// The newest committed checkpoint.
        latest: Option<CheckpointId>,
    },
    /// The claim was refused: a newer epoch owns the job.
    EpochFenced {
        /// The store's message.
        error: String,
    },
    /// Claiming the epoch or reading the store failed (retryable).
    StorageFailed {
        /// Why.
        error: String,
    },
    /// A retention pass ended (successfully or not).
    RetentionDone {
        /// The newest retained checkpoint and the chunk keys retained
        /// manifests refer to; `None` if the pass failed.
        retained: Option<(
            CheckpointId,
            std::sync::Arc<std::collections::HashSet<String>>,
        )>,
    },
    /// A host refused to run the job's binary or hold its VIP (the agent's
    /// allow-lists): the job cannot run as specified.
    Refused {
        /// The host.
        host: String,
        /// Why, naming the path or address.
        reason: String,
    },
    /// Someone asked to move `worker`'s primary to `host` (`lazarus move`):
    /// it restarts there from the last committed checkpoint, with its region.
    MoveRequested {
        /// The worker.
        worker: WorkerId,
        /// The host.
        host: String,
    },
    /// Someone asked the job to stop; with `final_checkpoint`, after one
    /// more checkpoint (stop with savepoint).
    StopRequested {
        /// Take a final checkpoint first.
        final_checkpoint: bool,
    },
    /// A hot standby's health check changed (its agent counts `fall`
    /// failures and `rise` successes; a primary that goes down is killed by
    /// its agent and arrives as an exit).
    StandbyHealth {
        /// The worker.
        worker: WorkerId,
        /// The standby's host.
        host: String,
        /// Up (promotable) or down (never promoted).
        up: bool,
    },
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start `worker`'s process in `slot` on `host` for `attempt`.
    Spawn {
        /// The host.
        host: String,
        /// The worker.
        worker: WorkerId,
        /// The attempt.
        attempt: u64,
        /// Primary or hot standby.
        slot: Slot,
    },
    /// Hand `worker`'s running process in `slot` on `host` (of `attempt`)
    /// a rejoin ticket: a new leader adopts it.
    Rejoin {
        /// The host.
        host: String,
        /// The worker.
        worker: WorkerId,
        /// The attempt the process belongs to.
        attempt: u64,
        /// Its slot.
        slot: Slot,
    },
    /// Start `worker` for `attempt` inside `into`'s running process on
    /// `host` (active-active takeover), by a message on `into`'s control
    /// connection `conn`.
    Adopt {
        /// `into`'s connection.
        conn: ConnId,
        /// The host.
        host: String,
        /// The worker taken over.
        worker: WorkerId,
        /// Its attempt.
        attempt: u64,
        /// The surviving worker whose process takes it.
        into: WorkerId,
    },
    /// Make `worker`'s standby process on `host` its primary for `attempt`.
    Promote {
        /// The host.
        host: String,
        /// The worker.
        worker: WorkerId,
        /// The attempt.
        attempt: u64,
    },
    /// `worker`'s primary process on `host` was rolled back in place: its
    /// agent reports it under `attempt` from now on.
    Retag {
        /// The host.
        host: String,
        /// The worker.
        worker: WorkerId,
        /// The attempt.
        attempt: u64,
    },
    /// SIGKILL one process.
    Kill {
        /// The host.
        host: String,
        /// The worker.
        worker: WorkerId,
        /// Which process.
        slot: Slot,
    },
    /// SIGKILL every primary of the job (and every standby if set).
    KillAll {
        /// Standbys too.
        standbys: bool,
    },
    /// `vip` belongs on `host` now (under a lease).
    AssignVip {
        /// The VIP.
        vip: String,
        /// The host.
        host: String,
    },
    /// Nobody holds `vip` any more.
    UnassignVip {
        /// The VIP.
        vip: String,
    },
    /// Give connection `conn` its assignment (a primary's, or a standby's
    /// to follow from `restore`).
    Assign {
        /// The connection.
        conn: ConnId,
        /// The worker.
        worker: WorkerId,
        /// Its host (for the local cache directory).
        host: String,
        /// The epoch it works under.
        epoch: Epoch,
        /// The checkpoint it restores.
        restore: Option<CheckpointId>,
        /// `restore` is visible but its commit is not durable yet: a sink
        /// recovers it only on `Committed` (rule 2).
        restore_pending: bool,
        /// Follow as a standby instead of running.
        standby: bool,
        /// A source rolled back after a failure: the records it emitted
        /// after the restored checkpoint before the failure.
        replay: Option<u64>,
    },
    /// Send a control message.
    Send {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: ToWorker,
    },
    /// Close a connection (refused, or its attempt is over).
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Write this manifest (create-if-absent, fenced by its epoch); the
    /// result comes back as a commit fact.
    Commit(Box<Manifest>),
    /// Claim `epoch` in the store, then report the newest committed
    /// checkpoint ([`Fact::EpochClaimed`]).
    ClaimEpoch(Epoch),
    /// Run retention keeping `keep` committed checkpoints; the result comes
    /// back as [`Fact::RetentionDone`].
    Retention {
        /// Checkpoints to keep.
        keep: usize,
    },
    /// Prune the hosts' local caches to what retention kept.
    PruneCaches {
        /// The newest retained checkpoint.
        newest: CheckpointId,
        /// Chunk keys retained manifests refer to.
        referenced: std::sync::Arc<std::collections::HashSet<String>>,
    },
    /// A failure is being recovered from (for status lines).
    Recovering {
        /// Why.
        why: String,
        /// The wait before the restart.
        backoff: Duration,
    },
}

/// What a job's state is called in status and summaries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStateKind {
    /// Workers starting and connecting.
    #[default]
    Starting,
    /// Processing, taking checkpoints.
    Running,
    /// Rolling back after a failure.
    Recovering,
    /// The final checkpoint committed; workers exiting.
    Finishing,
    /// The final checkpoint committed and every worker exited.
    Finished,
    /// Stopped on request.
    Stopped,
    /// Gave up, was fenced, or hit a fatal error.
    Failed,
}

impl JobStateKind {
    /// Whether the job is over.
    pub fn ended(self) -> bool {
        match self {
            JobStateKind::Finished | JobStateKind::Stopped | JobStateKind::Failed => true,
            JobStateKind::Starting
            | JobStateKind::Running
            | JobStateKind::Recovering
            | JobStateKind::Finishing => false,
        }
    }
}

impl std::fmt::Display for JobStateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            JobStateKind::Starting => "starting",
            JobStateKind::Running => "running",
            JobStateKind::Recovering => "recovering",
            JobStateKind::Finishing => "finishing",
            JobStateKind::Finished => "finished",
            JobStateKind::Stopped => "stopped",
            JobStateKind::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// Where the job is, with the reason when it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Workers starting and connecting.
    Starting,
    /// Processing, taking checkpoints.
    Running,
    /// Rolling back after a failure.
    Recovering,
    /// The final checkpoint committed; workers exiting.
    Finishing,
    /// The final checkpoint committed and every worker exited.
    Finished,
    /// Stopped on request.
    Stopped,
    /// Gave up.
    Failed(String),
}

impl JobState {
    /// The state's name.
    pub fn kind(&self) -> JobStateKind {
        match self {
            JobState::Starting => JobStateKind::Starting,
            JobState::Running => JobStateKind::Running,
            JobState::Recovering => JobStateKind::Recovering,
            JobState::Finishing => JobStateKind::Finishing,
            JobState::Finished => JobStateKind::Finished,
            JobState::Stopped => JobStateKind::Stopped,
            JobState::Failed(_) => JobStateKind::Failed,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The job.
    pub job: JobId,
    /// The epoch it ended in.
    pub epoch: Epoch,
    /// How it ended.
    pub state: JobState,
    /// Checkpoints committed in this run.
    pub committed: u64,
    /// The newest committed checkpoint.
    pub last_checkpoint: Option<CheckpointId>,
    /// Restarts after failures.
    pub restarts: u32,
    /// Workers killed by chaos.
    pub chaos_kills: u32,
    /// Chaos kills that hit while a checkpoint was in flight.
    pub kills_during_checkpoint: u32,
    /// Records produced by sources, summed over attempts (replays included).
    pub source_records: u64,
    /// Wall time (set by the shell).
    pub elapsed: Duration,
    /// Trigger-to-commit latency of each committed checkpoint.
    pub checkpoint_latencies: Vec<Duration>,
    /// Every ack's pause, with the checkpoint it acked: the longest stall
    /// of processing that checkpointing caused since the worker's previous
    /// snapshot (its synchronous part, or a write on state a pending
    /// snapshot still held). So an ack of checkpoint n also carries the
    /// stalls of checkpoint n - 1's serialization.
    pub pauses: Vec<(CheckpointId, Duration)>,
    /// State size of the newest checkpoint (stored bytes).
    pub last_checkpoint_bytes: u64,
    /// Why the last restart happened, if any.
    pub last_failure: Option<String>,
    /// Checkpoints aborted.
    pub aborted: u64,
    /// Worker restores from a checkpoint (primaries that started from one).
    pub restores: u64,
    /// Bytes those restores downloaded.
    pub restored_bytes: u64,
    /// Recoveries that restarted only the failed workers' regions (the
    /// other workers kept their processes and state).
    pub region_failovers: u32,
    /// Planned moves (fail-backs and `lazarus move`); not counted in
    /// `restarts` nor against the restart budget.
    pub moves: u32,
    /// Failed active-active instances taken over by a surviving instance's
    /// process (no process started for them).
    pub takeovers: u32,
    /// Processes that did not fail and were rolled back in place by a
    /// recovery (restored from the checkpoint without a restart).
    pub kept_processes: u32,
    /// Committed checkpoints that hold records in flight (read ahead of a
    /// barrier, see `lazarus_sdk`'s `in_flight`), and their bytes.
    pub in_flight_checkpoints: u64,
    /// The bytes of records in flight over those checkpoints.
    pub in_flight_bytes: u64,
    /// Records in flight that restores processed again before new input.
    pub in_flight_restored: u64,
    /// Each recovery of this run that got every worker running again.
    pub recoveries: Vec<RecoveryTime>,
}

/// A running job as its record in etcd describes it: what a new leader
/// adopts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// The attempt running.
    pub attempt: u64,
    /// The attempt had every worker running (otherwise a new leader starts
    /// a new attempt instead of adopting).
    pub running: bool,
    /// Its processes.
    pub procs: Vec<AdoptedProc>,
    /// Where each worker's primary and standby go.
    pub placement: BTreeMap<WorkerId, Placed>,
    /// Where each VIP is assigned.
    pub vips: BTreeMap<String, String>,
}

/// One process of an [`Adoption`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedProc {
    /// The worker.
    pub worker: WorkerId,
    /// A hot standby.
    pub standby: bool,
    /// Its host.
    pub host: String,
    /// The attempt it belongs to.
    pub attempt: u64,
    /// A promoted standby: the attempt it was started for.
    pub promoted_from: Option<u64>,
}

/// A new leader waiting for adopted processes to rejoin.
#[derive(Debug, Default)]
struct AdoptState {
    /// Processes that have not rejoined yet.
    pending: BTreeSet<(WorkerId, Slot)>,
    /// Hosts whose agents registered since the adoption began.
    joined: BTreeSet<String>,
    /// The newest checkpoint any rejoined worker snapshotted.
    newest_seen: Option<CheckpointId>,
    /// Sources that already ran out of input.
    exhausted: BTreeSet<WorkerId>,
    /// Until when processes may rejoin.
    deadline: Duration,
    /// The recorded attempt was not running: start a new one once these
    /// hosts registered (or at the deadline), instead of adopting.
    start_fresh: Option<BTreeSet<String>>,
}

/// The connected parts of the job graph (inputs and outputs are edges):
/// worker → region number.
fn regions_of(plan: &[PlannedWorker]) -> BTreeMap<WorkerId, usize> {
    let mut region: BTreeMap<WorkerId, usize> = BTreeMap::new();
    let mut next = 0;
    for start in plan {
        if region.contains_key(&start.id) {
            continue;
        }
        let mut stack = vec![start.id.clone()];
        while let Some(w) = stack.pop() {
            if region.insert(w.clone(), next).is_some() {
                continue;
            }
            let Some(pw) = plan.iter().find(|p| p.id == w) else {
                continue;
            };
            let outs = pw.outputs.iter().flat_map(|e| e.targets.iter());
            for n in pw.inputs.iter().chain(outs) {
                if !region.contains_key(n) {
                    stack.push(n.clone());
                }
            }
        }
        next += 1;
    }
    region
}

/// How long one recovery took, from the failure being detected to every
/// worker running again, and its parts (they add up to the total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryTime {
    /// Failure detected → every worker running again, ms.
    pub total_ms: u64,
    /// Naming the cause, the failed processes gone, backoff and the new
    /// epoch claimed, ms.
    pub drain_ms: u64,
    /// Placement → every restarted worker restored and listening (standby
    /// promoted or process started, state restored), ms.
    pub restore_ms: u64,
    /// Listening → every worker running (channels connected), ms.
    pub connect_ms: u64,
    /// Only the failed regions restarted.
    pub region_failover: bool,
    /// Every worker running → every source emitted again what it had
    /// emitted after the restored checkpoint before the failure (the job
    /// back where it was), ms; not part of `total_ms`. `None` while that
    /// is not known yet, or when no source's count at the checkpoint was
    /// known (a failure in another attempt than the checkpoint's).
    #[serde(default)]
    pub replay_ms: Option<u64>,
    /// The first sign of the failure → the failure detected, ms; not part
    /// of `total_ms`. The first sign is what the supervisor heard first:
    /// the process's exit or its connection closing (then this is the wait
    /// for the other of the two, which names the cause), an error the
    /// worker reported (0), or, for a worker that went silent, its last
    /// heartbeat (then this is the heartbeat timeout). `None` where no
    /// sign came before the decision: a host declared lost by the fleet,
    /// a stop or a planned move.
    #[serde(default)]
    pub detect_ms: Option<u64>,
}

/// The moments of a recovery in progress.
#[derive(Debug, Clone)]
struct RecoveryClock {
    /// The first sign of the failure, when one came before `detected`.
    sign: Option<Duration>,
    detected: Duration,
    placed: Option<Duration>,
    listening: Option<Duration>,
    /// The checkpoint to restore when the failure was detected, and per
    /// source the records it had emitted after that checkpoint.
    replay: Option<(CheckpointId, BTreeMap<WorkerId, u64>)>,
    /// Sources of the attempt that reported their replay done before every
    /// worker was running (a source emits from its own start; the last
    /// worker to report running may come later).
    replayed: BTreeSet<WorkerId>,
}

impl RecoveryClock {
    /// The sources' replay targets, if they were taken at the checkpoint
    /// the recovery restores.
    fn replay_targets(&self, restored: Option<CheckpointId>) -> Option<&BTreeMap<WorkerId, u64>> {
        self.replay
            .as_ref()
            .filter(|(at, _)| Some(*at) == restored)
            .map(|(_, targets)| targets)
    }
}

/// Whom a control connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConnRole {
    Primary { worker: WorkerId, attempt: u64 },
    Standby { worker: WorkerId },
}

/// A connected hot standby.
#[derive(Debug, Clone)]
struct StandbyConn {
    conn: ConnId,
    followed: Option<CheckpointId>,
}

/// A process the controller started and has not seen end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Proc {
    host: String,
    attempt: u64,
    /// The slot and attempt its agent may still report it under, until
    /// the change reaches the agent: a primary promoted from a standby
    /// (the standby's attempt), or a process rolled back in place (its
    /// attempt before).
    formerly: Option<(Slot, u64)>,
    /// Taken over into another worker's running process (active-active):
    /// that worker and its attempt. No agent knows it as a process: it
    /// ends when its connection closes or its host process ends.
    guest_of: Option<(WorkerId, u64)>,
}

impl Proc {
    /// A process started on `host` for `attempt`.
    fn new(host: &str, attempt: u64) -> Proc {
        Proc {
            host: host.to_string(),
            attempt,
            formerly: None,
            guest_of: None,
        }
    }
}

/// The lifecycle. Each phase carries what only it needs.
#[derive(Debug)]
enum Phase {
    /// Workers spawned; handshake until every one runs by `deadline`.
    Starting { deadline: Duration },
    /// Processing and checkpointing.
    Running,
    /// The final checkpoint committed; waiting for every worker to exit
    /// by `deadline`.
    Finishing {
        exited: BTreeSet<WorkerId>,
        deadline: Duration,
    },
    /// A failure: primaries killed, waiting for their exits and the
    /// backoff before the next attempt claims its epoch.
    Recovering(Recovery),
    /// Waiting for the store to grant the next attempt's epoch.
    Claiming,
    /// A new HA leader waiting for the running processes to rejoin.
    Adopting,
    /// Over.
    Ended(JobState),
}

#[derive(Debug)]
struct Recovery {
    /// The failure hit a running job with several regions: the failed
    /// workers' regions may recover alone (decided once the cause is named).
    partial_ok: bool,
    /// Why, as known so far.
    cause: String,
    /// A worker is named as the cause (no need to wait for an exit).
    named: bool,
    /// Until when an exit may still name the cause.
    name_until: Duration,
    /// Until when the failed primaries' exits are awaited.
    drain_until: Duration,
    /// Set once the cause is final: the restart may not start before.
    backoff_until: Option<Duration>,
    /// The failed primaries were told to go.
    torn_down: bool,
    /// A planned move (fail-back, `lazarus move`), not a failure: it is not
    /// reported as the last failure.
    planned: bool,
    /// The failure hit a running job: processes that did not fail may be
    /// rolled back in place.
    rollback_ok: bool,
}

/// The current attempt's handshake and progress.
#[derive(Debug, Default)]
struct AttemptState {
    /// Accepted primary connections.
    senders: BTreeMap<WorkerId, ConnId>,
    listening: BTreeMap<WorkerId, SocketAddr>,
    running: BTreeSet<WorkerId>,
    last_seen: BTreeMap<WorkerId, Duration>,
    records: BTreeMap<WorkerId, u64>,
    /// Per worker, its record count at each checkpoint it acked (the
    /// latest few).
    snap_records: BTreeMap<WorkerId, BTreeMap<CheckpointId, u64>>,
    /// Primaries that exited abnormally while their connection was still
    /// open: the failure (and until when to wait) is decided when the
    /// connection closes, after the worker's last message (a stream keeps
    /// order: a fatal error it sent comes before the close).
    exits: BTreeMap<WorkerId, (String, Duration)>,
    /// A checkpoint committed in this attempt (chaos `after_commit`).
    committed: bool,
    /// The epoch each primary was last assigned under: a process rolled
    /// back in place keeps its connection, and what it said of an attempt
    /// it was halted in is dropped ([`ToSupervisor::epoch`]).
    epochs: BTreeMap<WorkerId, Epoch>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct JobController {
    cfg: ControllerConfig,
    phase: Phase,
    /// The epoch of the current attempt (commits carry it).
    epoch: Epoch,
    attempt: u64,
    /// Above every checkpoint id used so far.
    next_id: CheckpointId,
    /// The newest checkpoint known to be committed: recoveries restore it.
    newest_committed: Option<CheckpointId>,
    /// A checkpoint a claim found in the store while its commit was still in
    /// flight, which `newest_committed` took, and the value it had before:
    /// if that commit fails, the store has withdrawn the manifest, and
    /// `newest_committed` goes back.
    unconfirmed: Option<(CheckpointId, Option<CheckpointId>)>,
    /// The latest checkpoints above `newest_committed` whose commit failed
    /// (at most 16). A claim that read the store just before the store
    /// withdrew one of them (its sync failed) names it; the recovery then
    /// claims again.
    failed_commits: BTreeSet<CheckpointId>,
    /// The checkpoint the current attempt restored.
    restored: Option<CheckpointId>,
    coordinator: CheckpointCoordinator,
    /// Commits under way, with the bytes of records in flight each holds.
    commits_in_flight: BTreeMap<CheckpointId, u64>,
    /// A retention pass is running; when the last one started.
    retention_running: bool,
    retention_last: Option<Duration>,
    /// The final checkpoint committed while a pass ran: its own pass
    /// starts when that one ends.
    retention_final: bool,
    /// Live hosts.
    hosts: BTreeSet<String>,
    /// Where each worker's primary and standby go.
    placement: BTreeMap<WorkerId, Placed>,
    /// Workers whose primary failed: they move at the next placement.
    failed: BTreeSet<WorkerId>,
    /// Halted processes of a recovery, kept to be rolled back in place:
    /// their control connections.
    kept: BTreeMap<WorkerId, ConnId>,
    /// Workers that reported a failure without exiting: their regions
    /// recover, their processes are rolled back in place.
    reported: BTreeSet<WorkerId>,
    /// Processes believed running.
    procs: BTreeMap<(WorkerId, Slot), Proc>,
    conns: BTreeMap<ConnId, ConnRole>,
    standbys: BTreeMap<WorkerId, StandbyConn>,
    /// Failed hot standbys: failures in a row and when the next may start.
    standby_retry: BTreeMap<WorkerId, (u32, Duration)>,
    /// No standby starts before this: a recovery's replacements wait until
    /// every worker runs again (`Duration::MAX` until then), plus the
    /// restart section's `standby_delay`.
    standbys_after: Option<Duration>,
    /// Hot standbys whose health check says down: never promoted.
    standby_down: BTreeSet<WorkerId>,
    /// Where each VIP is assigned now.
    vips: BTreeMap<String, String>,
    att: AttemptState,
    /// The attempt each worker's current primary belongs to (a region
    /// failover restarts some workers and leaves the others on theirs).
    att_of: BTreeMap<WorkerId, u64>,
    /// Each worker's region: the connected part of the job graph it is in.
    /// Regions exchange no records, so one can roll back alone.
    regions: BTreeMap<WorkerId, usize>,
    /// The regions being recovered while the others keep running (a region
    /// failover in progress), from the tear-down until all run again.
    partial: Option<BTreeSet<WorkerId>>,
    /// The host each worker first ran on (where a fail-back returns it).
    home: BTreeMap<WorkerId, String>,
    /// Since when each live host has been up (a fail-back waits a hold-down).
    host_since: BTreeMap<String, Duration>,
    /// Workers asked to move, and where (a fail-back or `lazarus move`).
    prefer: BTreeMap<WorkerId, String>,
    /// The recovery in progress, timed.
    clock: Option<RecoveryClock>,
    /// The first sign of a primary's failure not yet acted on (its exit,
    /// its connection closing, its last heartbeat): where a recovery's
    /// detection time starts.
    first_sign: Option<Duration>,
    /// A recovery whose sources are replaying: its index in
    /// `summary.recoveries`, when every worker ran, and the sources not
    /// done yet.
    replaying: Option<(usize, Duration, BTreeSet<WorkerId>)>,
    /// An adoption in progress (a new HA leader).
    adopting: Option<AdoptState>,
    /// Bytes each worker's last restore downloaded.
    fetched: BTreeMap<WorkerId, u64>,
    consecutive_failures: u32,
    /// A stop was asked for: a failure from now on ends the job instead of
    /// restarting it.
    stop_requested: bool,
    /// Source records of finished attempts.
    records_before: u64,
    rng: u64,
    chaos_at: Duration,
    summary: RunSummary,
    out: Vec<Action>,
}

impl JobController {
    /// A controller for a job whose store is claimed at `epoch`, with ids
    /// from `next_id` on and `latest` the newest committed checkpoint, on
    /// `hosts`. Call [`JobController::start`] next.
    pub fn new(
        cfg: ControllerConfig,
        epoch: Epoch,
        next_id: CheckpointId,
        latest: Option<CheckpointId>,
        hosts: BTreeSet<String>,
    ) -> JobController {
        let coordinator = Self::coordinator_for(&cfg, epoch, next_id);
        let rng = cfg.chaos.map(|c| c.seed).unwrap_or(1) | 1;
        let summary = RunSummary {
            job: cfg.job.clone(),
            epoch,
            state: JobState::Starting,
            committed: 0,
            last_checkpoint: None,
            restarts: 0,
            chaos_kills: 0,
            kills_during_checkpoint: 0,
            source_records: 0,
            elapsed: Duration::ZERO,
            checkpoint_latencies: Vec::new(),
            pauses: Vec::new(),
            last_checkpoint_bytes: 0,
            last_failure: None,
            aborted: 0,
            restores: 0,
            restored_bytes: 0,
            region_failovers: 0,
            moves: 0,
            takeovers: 0,
            kept_processes: 0,
            in_flight_checkpoints: 0,
            in_flight_bytes: 0,
            in_flight_restored: 0,
            recoveries: Vec::new(),
        };
        JobController {
            phase: Phase::Claiming,
            epoch,
            attempt: 0,
            next_id,
            newest_committed: latest,
            unconfirmed: None,
            failed_commits: BTreeSet::new(),
            restored: None,
            coordinator,
            commits_in_flight: BTreeMap::new(),
            retention_running: false,
            retention_last: None,
            retention_final: false,
            hosts,
            placement: BTreeMap::new(),
            failed: BTreeSet::new(),
            kept: BTreeMap::new(),
            reported: BTreeSet::new(),
            procs: BTreeMap::new(),
            conns: BTreeMap::new(),
            standbys: BTreeMap::new(),
            standby_retry: BTreeMap::new(),
            standbys_after: None,
            standby_down: BTreeSet::new(),
            vips: BTreeMap::new(),
            att: AttemptState::default(),
            att_of: BTreeMap::new(),
            regions: regions_of(&cfg.plan),
            partial: None,
            home: BTreeMap::new(),
            host_since: BTreeMap::new(),
            prefer: BTreeMap::new(),
            clock: None,
            first_sign: None,
            replaying: None,
            adopting: None,
            fetched: BTreeMap::new(),
            consecutive_failures: 0,
            stop_requested: false,
            records_before: 0,
            rng,
            chaos_at: Duration::MAX,
            summary,
            out: Vec::new(),
            cfg,
        }
    }

    fn coordinator_for(
        cfg: &ControllerConfig,
        epoch: Epoch,
        next_id: CheckpointId,
    ) -> CheckpointCoordinator {
        CheckpointCoordinator::new(
            cfg.checkpoint.clone(),
            cfg.job.clone(),
            epoch,
            cfg.plan.iter().map(|w| w.id.clone()),
            cfg.plan
                .iter()
                .filter(|w| w.is_source)
                .map(|w| w.id.clone()),
            next_id,
        )
    }

    /// Starts the first attempt at `now`.
    pub fn start(&mut self, now: Duration) -> Vec<Action> {
        for h in &self.hosts {
            self.host_since.insert(h.clone(), now);
        }
        if let Some(c) = self.cfg.chaos {
            self.chaos_at = now + c.every;
        }
        self.begin_attempt(now);
        std::mem::take(&mut self.out)
    }

    /// Adopts the running job `a` at `now` (instead of [`JobController::start`]):
    /// its processes keep running and are asked to rejoin through their
    /// agents. If the recorded attempt was not running yet, a new attempt
    /// starts instead.
    pub fn adopt(&mut self, now: Duration, a: Adoption) -> Vec<Action> {
        // Hosts whose agents registered already (the rest join later).
        let registered: Vec<String> = self.hosts.iter().cloned().collect();
        let mut st = AdoptState {
            deadline: now + self.cfg.adopt_timeout,
            ..AdoptState::default()
        };
        let mut proc_hosts = BTreeSet::new();
        // Each primary's own attempt (after a region failover they differ).
        self.att_of = a
            .procs
            .iter()
            .filter(|p| !p.standby)
            .map(|p| (p.worker.clone(), p.attempt))
            .collect();
        for p in a.procs {
            let slot = if p.standby {
                Slot::Standby
            } else {
                Slot::Primary
            };
            proc_hosts.insert(p.host.clone());
            st.pending.insert((p.worker.clone(), slot));
            self.procs.insert(
                (p.worker, slot),
                Proc {
                    formerly: p.promoted_from.map(|a| (Slot::Standby, a)),
                    ..Proc::new(&p.host, p.attempt)
                },
            );
        }
        if a.running {
            // Presumed alive until the adoption says otherwise.
            self.hosts.extend(proc_hosts);
            tracing::info!(
                attempt = a.attempt,
                processes = self.procs.len(),
                "adopting the running job"
            );
        } else {
            // Its processes are stopped once the hosts they ran on are back
            // (or at the deadline), then a new attempt starts, as after a
            // failure (rule 3: their exits are awaited first).
            tracing::info!(
                attempt = a.attempt,
                "the recorded attempt was not running; it is restarted once its hosts registered"
            );
            proc_hosts.extend(a.placement.values().map(|p| p.primary.clone()));
            st.pending.clear();
            st.start_fresh = Some(proc_hosts);
        }
        self.attempt = a.attempt;
        self.placement = a.placement;
        // Held by their agents meanwhile: known, so that a stop lets them go
        // and a new attempt moves them.
        if self.cfg.vips {
            self.vips = a.vips;
        }
        self.adopting = Some(st);
        self.phase = Phase::Adopting;
        for h in registered {
            self.host_joined_adopting(now, &h);
        }
        std::mem::take(&mut self.out)
    }

    /// What a new leader would adopt now (written to etcd before any change
    /// of placement takes effect).
    pub fn adoption(&self) -> Adoption {
        Adoption {
            attempt: self.attempt,
            running: matches!(self.phase, Phase::Running | Phase::Adopting),
            procs: self
                .procs
                .iter()
                .map(|((w, slot), p)| AdoptedProc {
                    worker: w.clone(),
                    standby: *slot == Slot::Standby,
                    host: p.host.clone(),
                    attempt: p.attempt,
                    promoted_from: p
                        .formerly
                        .filter(|(slot, _)| *slot == Slot::Standby)
                        .map(|(_, a)| a),
                })
                .collect(),
            placement: self.placement.clone(),
            vips: self.vips.clone(),
        }
    }

    /// A host's agent registered during an adoption: its processes get
    /// their tickets.
    fn host_joined_adopting(&mut self, now: Duration, host: &str) {
        let Some(st) = self.adopting.as_mut() else {
            return;
        };
        // Joined already, with no loss between: the agent registered while
        // this leader started (it was among the hosts at `adopt`, and its
        // join event came after). No second tickets: the first one used
        // voids the others, and a process must not take a second ticket
        // on a live connection for a sign of yet another leader.
        if !st.joined.insert(host.to_string()) {
            return;
        }
        if let Some(hosts) = &st.start_fresh {
            if hosts.is_subset(&st.joined) {
                self.start_fresh(now);
            }
            return;
        }
        for (w, slot) in st.pending.iter() {
            if let Some(p) = self
                .procs
                .get(&(w.clone(), *slot))
                .filter(|p| p.host == host)
            {
                self.out.push(Action::Rejoin {
                    host: host.to_string(),
                    worker: w.clone(),
                    attempt: p.attempt,
                    slot: *slot,
                });
            }
        }
    }

    /// A process reconnected to this (new) leader.
    fn on_rejoin(
        &mut self,
        now: Duration,
        conn: ConnId,
        worker: WorkerId,
        attempt: u64,
        standby: bool,
        r: Rejoin,
    ) {
        let slot = if standby {
            Slot::Standby
        } else {
            Slot::Primary
        };
        let key = (worker.clone(), slot);
        // Standbys may rejoin after the primaries (the job runs again).
        let expected = self.is_active()
            && self
                .adopting
                .as_ref()
                .is_some_and(|a| a.pending.contains(&key))
            && self.procs.get(&key).is_some_and(|p| p.attempt == attempt)
            && (standby || r.running);
        let Some(st) = self.adopting.as_mut().filter(|_| expected) else {
            tracing::debug!(%worker, attempt, standby, "refusing a rejoin nobody waits for");
            self.out.push(Action::Close { conn });
            return;
        };
        st.pending.remove(&key);
        if let Some(n) = r.checkpoint {
            st.newest_seen = Some(st.newest_seen.map_or(n, |m| m.max(n)));
        }
        if standby {
            self.conns.insert(
                conn,
                ConnRole::Standby {
                    worker: worker.clone(),
                },
            );
            self.standbys.insert(
                worker.clone(),
                StandbyConn {
                    conn,
                    followed: r.followed,
                },
            );
        } else {
            if r.exhausted {
                st.exhausted.insert(worker.clone());
            }
            self.conns.insert(
                conn,
                ConnRole::Primary {
                    worker: worker.clone(),
                    attempt,
                },
            );
            self.att.senders.insert(worker.clone(), conn);
            self.att.running.insert(worker.clone());
            self.att.last_seen.insert(worker.clone(), now);
            // Its VIPs are confirmed to its host (which holds them under
            // its own lease meanwhile) once the primary is known alive.
            let host = self.procs.get(&key).map(|p| p.host.clone());
            let vips = self
                .worker(&worker)
                .map(|w| w.vips.clone())
                .unwrap_or_default();
            for (vip, host) in vips.into_iter().zip(std::iter::repeat(host)) {
                if let Some(h) = host.filter(|h| self.vips.get(&vip) == Some(h)) {
                    self.out.push(Action::AssignVip { vip, host: h });
                }
            }
        }
        tracing::info!(%worker, attempt, standby, "rejoined");
        self.maybe_adopted(now);
    }

    /// Every primary rejoined: running again, checkpoint ids above every
    /// id any of them saw.
    fn maybe_adopted(&mut self, now: Duration) {
        if !matches!(self.phase, Phase::Adopting) {
            if self.adopting.as_ref().is_some_and(|a| a.pending.is_empty()) {
                self.adopting = None;
            }
            return;
        }
        let Some(st) = self.adopting.as_ref() else {
            return;
        };
        if st.pending.iter().any(|(_, s)| *s == Slot::Primary) {
            return;
        }
        if let Some(n) = st.newest_seen {
            self.next_id = self.next_id.max(n.next());
        }
        let exhausted: Vec<WorkerId> = st.exhausted.iter().cloned().collect();
        if st.pending.is_empty() {
            self.adopting = None;
        }
        self.coordinator = Self::coordinator_for(&self.cfg, self.epoch, self.next_id);
        self.phase = Phase::Running;
        tracing::info!(attempt = self.attempt, next = %self.next_id, "adopted: every primary rejoined");
        for w in exhausted {
            let d = self.coordinator.on_source_exhausted(now, &w);
            self.carry_out(now, d);
        }
    }

    /// The recorded attempt was not running and its hosts are back (or the
    /// wait is over): a new attempt on the hosts registered.
    fn start_fresh(&mut self, now: Duration) {
        let Some(st) = self.adopting.take() else {
            return;
        };
        self.hosts = st.joined;
        // Standbys of the unfinished attempt go too: nothing of it is
        // connected here.
        self.out.push(Action::KillAll { standbys: true });
        self.fail(
            now,
            "a new leader found the attempt still starting".into(),
            true,
        );
    }

    /// The adoption's deadline passed: primaries that did not rejoin fail
    /// the attempt (hosts that never registered count as lost); standbys
    /// that did not are replaced.
    fn adoption_overdue(&mut self, now: Duration) {
        if self
            .adopting
            .as_ref()
            .is_some_and(|a| a.start_fresh.is_some())
        {
            self.start_fresh(now);
            return;
        }
        let Some(st) = self.adopting.take() else {
            return;
        };
        for h in self.hosts.clone() {
            if !st.joined.contains(&h) {
                self.hosts.remove(&h);
            }
        }
        let mut missing = Vec::new();
        for (w, slot) in &st.pending {
            if *slot == Slot::Standby {
                if let Some(p) = self.procs.remove(&(w.clone(), *slot)) {
                    self.out.push(Action::Kill {
                        host: p.host,
                        worker: w.clone(),
                        slot: *slot,
                    });
                }
                self.standby_gone(w);
            } else {
                missing.push(w.to_string());
            }
        }
        if missing.is_empty() {
            self.ensure_standbys(now);
        } else {
            let why = format!(
                "adoption: {} did not rejoin the new leader within {:?}",
                missing.join(", "),
                self.cfg.adopt_timeout
            );
            self.fail(now, why, false);
        }
    }

    /// Takes in one fact observed at `now`; returns what to do.
    pub fn handle(&mut self, now: Duration, fact: Fact) -> Vec<Action> {
        match fact {
            Fact::Tick => self.on_tick(now),
            Fact::Hello {
                conn,
                worker,
                attempt,
                standby,
                rejoin: Some(r),
            } => self.on_rejoin(now, conn, worker, attempt, standby, r),
            Fact::Hello {
                conn,
                worker,
                attempt,
                standby,
                rejoin: None,
            } => self.on_hello(now, conn, worker, attempt, standby),
            Fact::Message { conn, msg } => self.on_message(now, conn, msg),
            Fact::Closed { conn } => self.on_closed(now, conn),
            Fact::Exited(e) => self.on_exited(now, e),
            Fact::HostLost(h) => self.on_host_lost(now, &h),
            Fact::HostJoined(h) => {
                if self.hosts.insert(h.clone()) {
                    self.host_since.insert(h.clone(), now);
                }
                if matches!(self.phase, Phase::Adopting) || self.adopting.is_some() {
                    self.host_joined_adopting(now, &h);
                } else if self.is_active() {
                    self.ensure_standbys(now);
                }
            }
            Fact::CommitDone {
                checkpoint,
                epoch,
                stored_bytes,
            } => self.on_commit_done(now, checkpoint, epoch, stored_bytes),
            Fact::CommitFailed {
                checkpoint,
                epoch,
                error,
            } => {
                let restored = self.restore_pending() == Some(checkpoint);
                self.commits_in_flight.remove(&checkpoint);
                tracing::warn!(%checkpoint, %error, "commit failed");
                // Commits run one after another, so only the latest few can
                // race a claim's reading.
                self.failed_commits.insert(checkpoint);
                while self.failed_commits.len() > 16 {
                    self.failed_commits.pop_first();
                }
                if let Some((_, before)) = self.unconfirmed.filter(|(u, _)| *u == checkpoint) {
                    // Withdrawn by the store: no recovery restores it again.
                    self.unconfirmed = None;
                    if self.newest_committed == Some(checkpoint) {
                        self.newest_committed = before;
                    }
                }
                if restored {
                    // Restored while visible, and now not known durable:
                    // its sinks must not recover it. Again from the store.
                    if matches!(self.phase, Phase::Starting { .. } | Phase::Running) {
                        self.fail(
                            now,
                            format!("the commit of checkpoint {checkpoint}, which this attempt restored, failed: {error}"),
                            false,
                        );
                    }
                } else if epoch == self.epoch && self.is_active() {
                    let d = self.coordinator.on_commit_failed(checkpoint, error);
                    self.carry_out(now, d);
                }
            }
            Fact::CommitFenced {
                checkpoint,
                epoch,
                error,
            } => {
                self.commits_in_flight.remove(&checkpoint);
                if matches!(self.phase, Phase::Claiming) {
                    // Our own claim fenced the failed attempt's commit.
                    tracing::debug!(%checkpoint, %epoch, "commit fenced by this recovery's claim");
                } else if epoch == self.epoch && !self.is_ended() {
                    self.broadcast(ToWorker::Shutdown);
                    self.end(JobState::Failed(format!("fenced: {error}")));
                }
            }
            Fact::EpochClaimed { epoch, latest } => {
                if matches!(self.phase, Phase::Claiming) {
                    self.epoch = epoch;
                    self.summary.epoch = epoch;
                    if let Some(l) = latest.filter(|l| self.failed_commits.contains(l)) {
                        self.fail(
                            now,
                            format!("the store named checkpoint {l}, whose commit has failed since (its manifest is withdrawn): claiming again"),
                            true,
                        );
                    } else {
                        if let Some(l) = latest {
                            if self.commits_in_flight.contains_key(&l)
                                && self.newest_committed.is_none_or(|n| n < l)
                            {
                                self.unconfirmed = Some((l, self.newest_committed));
                            }
                            self.newest_committed =
                                Some(self.newest_committed.map_or(l, |n| n.max(l)));
                            self.next_id = self.next_id.max(l.next());
                        }
                        self.begin_attempt(now);
                        if let Some(n) = self.restore_pending() {
                            tracing::info!(checkpoint = %n, "restoring a checkpoint whose commit is not yet durable: sinks wait for it");
                        }
                    }
                }
            }
            Fact::EpochFenced { error } => {
                if !self.is_ended() {
                    self.end(JobState::Failed(format!("fenced: {error}")));
                }
            }
            Fact::StorageFailed { error } => {
                if matches!(self.phase, Phase::Claiming) {
                    self.fail(
                        now,
                        format!("claiming the next epoch failed: {error}"),
                        true,
                    );
                }
            }
            Fact::RetentionDone { retained } => {
                self.retention_running = false;
                if let Some((newest, referenced)) = retained {
                    self.out.push(Action::PruneCaches { newest, referenced });
                }
                if std::mem::take(&mut self.retention_final) {
                    self.maybe_retention(now, true);
                }
            }
            Fact::StopRequested { final_checkpoint } => self.on_stop(now, final_checkpoint),
            Fact::MoveRequested { worker, host } => {
                let why = format!("{worker} moves to {host} on request");
                if self.move_to(now, &worker, &host, why) {
                    // An operator's choice: fail-back returns it here now.
                    self.home.insert(worker, host);
                }
            }
            Fact::StandbyHealth { worker, host, up } => {
                let here = self
                    .procs
                    .get(&(worker.clone(), Slot::Standby))
                    .is_some_and(|p| p.host == host);
                if here && !up {
                    tracing::warn!(%worker, %host, "hot standby failed its health check: it is not promoted until it passes again");
                    self.standby_down.insert(worker);
                } else if here {
                    tracing::info!(%worker, %host, "hot standby passes its health check again");
                    self.standby_down.remove(&worker);
                }
            }
            Fact::Refused { host, reason } => {
                if !self.is_ended() {
                    self.broadcast(ToWorker::Shutdown);
                    let why = format!("host {host} refused: {reason}");
                    self.summary.last_failure = Some(why.clone());
                    self.end(JobState::Failed(why));
                }
            }
        }
        if matches!(self.phase, Phase::Recovering(_)) {
            self.progress_recovery(now);
        }
        std::mem::take(&mut self.out)
    }

    /// The next moment after `now` at which a [`Fact::Tick`] may change
    /// something that no other fact will (recovery timers, chaos): the shell
    /// wakes then. Never `now` or earlier, so the shell never spins; what
    /// waits for an exit or a commit's answer is woken by that fact.
    pub fn wake_at(&self, now: Duration) -> Option<Duration> {
        let mut at = match &self.phase {
            Phase::Recovering(r) => match r.backoff_until {
                None if !r.named => Some(r.name_until),
                None => None,
                Some(b) if b > now => Some(b),
                // Waiting for the failed primaries' exits: at the latest
                // until the drain timeout.
                Some(_) if self.live_primaries() > 0 => Some(r.drain_until),
                Some(_) => None,
            },
            Phase::Starting { .. } | Phase::Running => {
                self.att.exits.values().map(|(_, until)| *until).min()
            }
            _ => None,
        };
        if let Some(st) = &self.adopting {
            at = Some(at.map_or(st.deadline, |a| a.min(st.deadline)));
        }
        if let Some(s) = self
            .standbys_after
            .filter(|_| matches!(self.phase, Phase::Running))
        {
            at = Some(at.map_or(s, |a| a.min(s)));
        }
        if self.chaos_armed() && matches!(self.phase, Phase::Running) && self.chaos_may_fire() {
            at = Some(at.map_or(self.chaos_at, |a| a.min(self.chaos_at)));
        }
        at.filter(|t| *t > now)
    }

    /// Whether the job is over.
    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended(_))
    }

    /// Processes believed running (the shell drains them at the end).
    pub fn live_processes(&self) -> usize {
        self.procs.len()
    }

    /// Primary processes believed running.
    pub fn live_primaries(&self) -> usize {
        self.procs
            .keys()
            .filter(|(_, s)| *s == Slot::Primary)
            .count()
    }

    /// Commits handed out and not answered.
    pub fn commits_in_flight(&self) -> usize {
        self.commits_in_flight.len()
    }

    /// A retention pass is running or the final one waits for it.
    pub fn retention_in_flight(&self) -> bool {
        self.retention_running || self.retention_final
    }

    /// The state now.
    pub fn state(&self) -> JobState {
        match &self.phase {
            Phase::Starting { .. } | Phase::Claiming if self.attempt == 0 => JobState::Starting,
            Phase::Starting { .. } | Phase::Claiming | Phase::Recovering(_) => JobState::Recovering,
            Phase::Running | Phase::Adopting => JobState::Running,
            Phase::Finishing { .. } => JobState::Finishing,
            Phase::Ended(s) => s.clone(),
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The current attempt (0: the first start).
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// The newest committed checkpoint known.
    pub fn newest_committed(&self) -> Option<CheckpointId> {
        self.newest_committed
    }

    /// The checkpoint the current attempt restored.
    pub fn restored(&self) -> Option<CheckpointId> {
        self.restored
    }

    /// Where each worker runs now.
    pub fn placement(&self) -> &BTreeMap<WorkerId, Placed> {
        &self.placement
    }

    /// Live hosts as the controller knows them.
    pub fn hosts(&self) -> &BTreeSet<String> {
        &self.hosts
    }

    /// Where each VIP is assigned.
    pub fn vip_hosts(&self) -> &BTreeMap<String, String> {
        &self.vips
    }

    /// Workers whose primary runs (the handshake completed) in this attempt.
    pub fn running_workers(&self) -> &BTreeSet<WorkerId> {
        &self.att.running
    }

    /// The host of `worker`'s process in `slot`, if one runs.
    pub fn process_host(&self, worker: &WorkerId, slot: Slot) -> Option<&str> {
        self.procs
            .get(&(worker.clone(), slot))
            .map(|p| p.host.as_str())
    }

    /// Source records so far (replays included) and the run's figures.
    pub fn summary(&self) -> RunSummary {
        let mut s = self.summary.clone();
        s.state = self.state();
        s.source_records = self.records_before + self.source_records_now();
        s
    }

    /// The counters of the summary, without copying it (metrics read
    /// them after every fact).
    pub fn counters(&self) -> &RunSummary {
        &self.summary
    }

    /// The job for `lazarus status`.
    pub fn status(&self) -> JobStatus {
        let state = self.state();
        JobStatus {
            job: self.cfg.job.to_string(),
            state: state.kind(),
            failure: match state {
                JobState::Failed(why) => Some(why),
                _ => None,
            },
            epoch: self.epoch.0,
            attempt: self.attempt,
            restarts: self.summary.restarts,
            region_failovers: self.summary.region_failovers,
            moves: self.summary.moves,
            takeovers: self.summary.takeovers,
            last_recovery: self.summary.recoveries.last().copied(),
            committed: self.summary.committed,
            last_checkpoint: self.summary.last_checkpoint.map(|c| c.0),
            last_failure: self.summary.last_failure.clone(),
            workers: self
                .cfg
                .plan
                .iter()
                .filter_map(|w| {
                    let placed = self.placement.get(&w.id)?.clone();
                    Some(WorkerStatus {
                        worker: w.id.clone(),
                        standby_kind: w.standby,
                        placed,
                        running: self.att.running.contains(&w.id)
                            && !matches!(self.phase, Phase::Recovering(_) | Phase::Ended(_)),
                        restore_fetched_bytes: self.fetched.get(&w.id).copied().unwrap_or(0),
                        standby_checkpoint: self
                            .standbys
                            .get(&w.id)
                            .and_then(|s| s.followed)
                            .map(|c| c.0),
                        taken_over_by: self
                            .procs
                            .get(&(w.id.clone(), Slot::Primary))
                            .and_then(|p| p.guest_of.as_ref())
                            .map(|(into, _)| into.clone()),
                    })
                })
                .collect(),
        }
    }

    fn source_records_now(&self) -> u64 {
        self.cfg
            .plan
            .iter()
            .filter(|w| w.is_source)
            .filter_map(|w| self.att.records.get(&w.id))
            .sum()
    }

    /// Starting, running or finishing: an attempt whose workers may talk.
    /// Whether `attempt` is that of `worker`'s current primary.
    fn is_current(&self, worker: &WorkerId, attempt: u64) -> bool {
        self.att_of.get(worker).copied().unwrap_or(self.attempt) == attempt
    }

    /// The attempt of `worker`'s current primary (after a region failover,
    /// workers of untouched regions keep an older one).
    pub fn attempt_of(&self, worker: &WorkerId) -> u64 {
        self.att_of.get(worker).copied().unwrap_or(self.attempt)
    }

    /// The checkpoint the attempt restored while its commit (of the failed
    /// attempt, which the claim found visible) is still in flight: not yet
    /// durable, so sinks wait before they recover it (rule 2).
    fn restore_pending(&self) -> Option<CheckpointId> {
        self.restored
            .filter(|r| self.commits_in_flight.contains_key(r))
    }

    fn is_active(&self) -> bool {
        matches!(
            self.phase,
            Phase::Starting { .. } | Phase::Running | Phase::Finishing { .. } | Phase::Adopting
        )
    }

    fn worker(&self, id: &WorkerId) -> Option<&PlannedWorker> {
        self.cfg.plan.iter().find(|w| w.id == *id)
    }

    /// At a failure: the checkpoint a recovery restores now, and per source
    /// of the current attempt how many records it emitted after that
    /// checkpoint (its last heartbeat's count minus its count in the ack of
    /// the checkpoint). A source this attempt started from that very
    /// checkpoint counts from it: it acked nothing of it, and its count is
    /// the target (a failure before the attempt's first commit). Sources
    /// without both counts are left out.
    fn replay_targets(&self) -> Option<(CheckpointId, BTreeMap<WorkerId, u64>)> {
        let at = self.newest_committed?;
        let targets: BTreeMap<WorkerId, u64> = self
            .cfg
            .plan
            .iter()
            .filter(|w| w.inputs.is_empty())
            .filter_map(|w| {
                let now = *self.att.records.get(&w.id)?;
                let then = match self.att.snap_records.get(&w.id).and_then(|s| s.get(&at)) {
                    Some(then) => *then,
                    None if Some(at) == self.restored
                        && self.att_of.get(&w.id) == Some(&self.attempt) =>
                    {
                        0
                    }
                    None => return None,
                };
                Some((w.id.clone(), now.saturating_sub(then)))
            })
            .collect();
        (!targets.is_empty()).then_some((at, targets))
    }

    fn is_sink(&self, id: &WorkerId) -> bool {
        self.worker(id).is_some_and(|w| w.outputs.is_empty())
    }

    fn kinds(&self) -> Vec<placement::Want> {
        self.cfg
            .plan
            .iter()
            .map(|w| placement::Want {
                id: w.id.clone(),
                standby: w.standby,
                hosts: w.hosts.clone(),
                prefer: self.prefer.get(&w.id).cloned(),
            })
            .collect()
    }

    fn broadcast(&mut self, msg: ToWorker) {
        for conn in self.att.senders.values() {
            self.out.push(Action::Send {
                conn: *conn,
                msg: msg.clone(),
            });
        }
    }

    /// Places and starts every worker of the attempt `self.attempt`.
    fn begin_attempt(&mut self, now: Duration) {
        let attempt = self.attempt;
        self.restored = self.newest_committed;
        self.placement =
            match placement::place(&self.kinds(), &self.hosts, &self.placement, &self.failed) {
                Ok(p) => p,
                Err(e) => {
                    self.phase = Phase::Starting {
                        deadline: now + self.cfg.startup_timeout,
                    };
                    self.fail(now, e.to_string(), true);
                    return;
                }
            };
        self.failed.clear();
        self.reported.clear();
        self.prefer.clear();
        if let Some(c) = self.clock.as_mut() {
            c.placed = Some(now);
            c.listening = None;
            c.replayed.clear();
        }
        for (w, p) in &self.placement {
            self.home
                .entry(w.clone())
                .or_insert_with(|| p.primary.clone());
        }
        // A region failover restarts only the failed regions: the other
        // workers keep their processes, connections and VIPs (and a source
        // of theirs that ran dry stays so).
        let region = self.partial.clone();
        let dry: Vec<WorkerId> = match &region {
            Some(r) => self
                .coordinator
                .exhausted()
                .iter()
                .filter(|w| !r.contains(*w))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        self.coordinator = Self::coordinator_for(&self.cfg, self.epoch, self.next_id);
        for w in &dry {
            self.coordinator.mark_exhausted(w);
        }
        match &region {
            None => self.att = AttemptState::default(),
            Some(r) => {
                // The survivors were silent to us meanwhile (messages are
                // not read while recovering): their heartbeat clocks restart.
                for t in self.att.last_seen.values_mut() {
                    *t = now;
                }
                self.att.committed = false;
                // The region's new processes count their records afresh.
                for w in r {
                    self.att.records.remove(w);
                    self.att.snap_records.remove(w);
                }
            }
        }
        let plan = self.cfg.plan.clone();
        for w in &plan {
            if region.as_ref().is_some_and(|r| !r.contains(&w.id)) {
                continue;
            }
            self.att_of.insert(w.id.clone(), attempt);
            let host = self.placement[&w.id].primary.clone();
            if self.roll_back_in_place(now, &w.id, &host, attempt) {
                continue;
            }
            let standby_here = self
                .procs
                .get(&(w.id.clone(), Slot::Standby))
                .is_some_and(|p| p.host == host);
            if standby_here && self.standby_down.contains(&w.id) {
                // A standby that fails its health check is never promoted:
                // it makes way for a fresh primary on its host.
                tracing::warn!(worker = %w.id, %host, "hot standby is down by its health check: not promoted, replaced by a new primary");
                self.out.push(Action::Kill {
                    host: host.clone(),
                    worker: w.id.clone(),
                    slot: Slot::Standby,
                });
                self.procs.remove(&(w.id.clone(), Slot::Standby));
                self.standby_gone(&w.id);
            }
            match self.standbys.get(&w.id).filter(|_| standby_here).cloned() {
                Some(s) => {
                    // Rule 3: the failed primary is gone (drained, or its
                    // host lost); its standby process becomes the primary.
                    self.standbys.remove(&w.id);
                    let standby = self.procs.remove(&(w.id.clone(), Slot::Standby));
                    self.procs.insert(
                        (w.id.clone(), Slot::Primary),
                        Proc {
                            formerly: standby.map(|p| (Slot::Standby, p.attempt)),
                            ..Proc::new(&host, attempt)
                        },
                    );
                    self.out.push(Action::Promote {
                        host: host.clone(),
                        worker: w.id.clone(),
                        attempt,
                    });
                    self.assign_primary(now, s.conn, &w.id, &host, attempt);
                    tracing::info!(worker = %w.id, %host, followed = ?s.followed, "hot standby promoted");
                }
                None => match self.takeover_by(w, &host) {
                    Some((into, conn)) => {
                        // Active-active: a surviving instance on that host
                        // takes the share over in its own running process.
                        tracing::info!(worker = %w.id, %host, attempt, %into, "share taken over by a surviving instance");
                        self.summary.takeovers += 1;
                        let into_attempt = self.att_of.get(&into).copied().unwrap_or(attempt);
                        self.procs.insert(
                            (w.id.clone(), Slot::Primary),
                            Proc {
                                guest_of: Some((into.clone(), into_attempt)),
                                ..Proc::new(&host, attempt)
                            },
                        );
                        self.out.push(Action::Adopt {
                            conn,
                            host: host.clone(),
                            worker: w.id.clone(),
                            attempt,
                            into,
                        });
                    }
                    None => {
                        tracing::info!(worker = %w.id, %host, attempt, "starting primary");
                        self.procs
                            .insert((w.id.clone(), Slot::Primary), Proc::new(&host, attempt));
                        self.out.push(Action::Spawn {
                            host: host.clone(),
                            worker: w.id.clone(),
                            attempt,
                            slot: Slot::Primary,
                        });
                    }
                },
            }
            if self.cfg.vips {
                for v in &w.vips {
                    // Rule 4: the VIP follows the primary of this attempt.
                    self.vips.insert(v.clone(), host.clone());
                    self.out.push(Action::AssignVip {
                        vip: v.clone(),
                        host: host.clone(),
                    });
                }
            }
        }
        self.phase = Phase::Starting {
            deadline: now + self.cfg.startup_timeout,
        };
        if self.clock.is_some() {
            // A recovery: the promoted standbys' replacements start once
            // every worker runs again.
            self.standbys_after = Some(Duration::MAX);
        }
        self.ensure_standbys(now);
    }

    /// Gives a kept process (halted by the recovery) the new attempt's
    /// assignment on its connection; false if `worker` was not kept or its
    /// process is gone (it is started anew).
    fn roll_back_in_place(
        &mut self,
        now: Duration,
        worker: &WorkerId,
        host: &str,
        attempt: u64,
    ) -> bool {
        let Some(conn) = self.kept.remove(worker) else {
            return false;
        };
        let key = (worker.clone(), Slot::Primary);
        let Some(p) = self.procs.get_mut(&key).filter(|p| p.host == host) else {
            self.conns.remove(&conn);
            self.out.push(Action::Close { conn });
            return false;
        };
        // Its agent knows it by its last attempt until the retag arrives.
        p.formerly = Some((Slot::Primary, p.attempt));
        p.attempt = attempt;
        self.out.push(Action::Retag {
            host: host.to_string(),
            worker: worker.clone(),
            attempt,
        });
        tracing::info!(%worker, %host, attempt, "rolled back in place: the process stays");
        self.summary.kept_processes += 1;
        self.assign_primary(now, conn, worker, host, attempt);
        true
    }

    fn on_tick(&mut self, now: Duration) {
        if self.adopting.as_ref().is_some_and(|a| now > a.deadline) {
            self.adoption_overdue(now);
        }
        match &self.phase {
            // An exit whose connection never closed: decide without its
            // last words.
            Phase::Starting { .. } | Phase::Running
                if self.att.exits.values().any(|(_, until)| now >= *until) =>
            {
                let due = self
                    .att
                    .exits
                    .iter()
                    .find(|(_, (_, until))| now >= *until)
                    .map(|(w, _)| w.clone());
                if let Some((why, _)) = due.and_then(|w| self.att.exits.remove(&w)) {
                    self.fail(now, why, true);
                }
            }
            Phase::Starting { deadline } => {
                if now > *deadline {
                    let why = format!(
                        "workers did not start within {:?} ({} of {} running)",
                        self.cfg.startup_timeout,
                        self.att.running.len(),
                        self.cfg.plan.len()
                    );
                    self.fail_every_process(now, why);
                }
            }
            Phase::Finishing { deadline, .. } if now > *deadline => {
                let why = format!(
                    "workers did not exit within {:?} after the final checkpoint",
                    self.cfg.startup_timeout
                );
                self.fail(now, why, false);
            }
            Phase::Running | Phase::Finishing { .. } => {
                if matches!(self.phase, Phase::Running) && self.missed_heartbeats(now) {
                    return;
                }
                if matches!(self.phase, Phase::Running) && self.maybe_fail_back(now) {
                    return;
                }
                let d = self.coordinator.tick(now);
                self.carry_out(now, d);
                if matches!(self.phase, Phase::Running) {
                    self.chaos(now);
                    let held_until = self.standbys_after.filter(|at| *at <= now);
                    if held_until.is_some() {
                        self.standbys_after = None;
                    }
                    if held_until.is_some() || self.standby_retry.values().any(|(_, at)| *at <= now)
                    {
                        self.ensure_standbys(now);
                    }
                }
            }
            // Rejoined primaries must keep their heartbeats.
            Phase::Adopting => {
                self.missed_heartbeats(now);
            }
            Phase::Recovering(_) | Phase::Claiming | Phase::Ended(_) => {}
        }
    }

    /// A primary silent for the heartbeat timeout fails the attempt;
    /// returns whether one did.
    fn missed_heartbeats(&mut self, now: Duration) -> bool {
        let timeout = self.cfg.heartbeat_timeout;
        let silent = self
            .att
            .last_seen
            .iter()
            .find(|(_, t)| now.saturating_sub(**t) > timeout)
            .map(|(w, t)| (w.clone(), *t));
        let Some((w, last)) = silent else {
            return false;
        };
        self.sign(last);
        self.failed.insert(w.clone());
        self.fail(
            now,
            format!("worker {w} missed heartbeats for {timeout:?}"),
            true,
        );
        true
    }

    fn chaos(&mut self, now: Duration) {
        // A kill due before its attempt commits (`after_commit`) fires at
        // the first tick after.
        if !self.chaos_armed() || now < self.chaos_at || !self.chaos_may_fire() {
            return;
        }
        self.schedule_chaos(now);
        let pick = (self.next_random() % self.cfg.plan.len().max(1) as u64) as usize;
        let Some(victim) = self.cfg.plan.get(pick).map(|w| w.id.clone()) else {
            return;
        };
        let Some(host) = self
            .procs
            .get(&(victim.clone(), Slot::Primary))
            .filter(|p| p.guest_of.is_none())
            .map(|p| p.host.clone())
        else {
            // Not running, or taken over into another process (no process
            // of its own to kill).
            return;
        };
        tracing::info!(%victim, "chaos: SIGKILL");
        self.summary.chaos_kills += 1;
        if !self.coordinator.in_flight().is_empty() {
            self.summary.kills_during_checkpoint += 1;
        }
        self.out.push(Action::Kill {
            host,
            worker: victim,
            slot: Slot::Primary,
        });
    }

    /// Recovery `i` has every source back where it was, `ms` after every
    /// worker ran again.
    fn replay_done(&mut self, i: usize, ms: u64) {
        if let Some(r) = self.summary.recoveries.get_mut(i) {
            r.replay_ms = Some(ms);
            tracing::info!(
                replay_ms = ms,
                "replayed: every source is back where it was"
            );
        }
    }

    /// Whether a due kill may fire now (see [`Chaos::after_commit`]).
    fn chaos_may_fire(&self) -> bool {
        self.cfg.chaos.is_some_and(|c| !c.after_commit) || self.att.committed
    }

    fn chaos_armed(&self) -> bool {
        self.cfg
            .chaos
            .is_some_and(|c| c.max_kills.is_none_or(|m| self.summary.chaos_kills < m))
    }

    /// The next chaos kill 0.5 to 1.5 mean gaps from now.
    fn schedule_chaos(&mut self, now: Duration) {
        if let Some(c) = self.cfg.chaos {
            let factor = 0.5 + (self.next_random() % 1000) as f64 / 1000.0;
            self.chaos_at = now + c.every.mul_f64(factor);
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn on_hello(
        &mut self,
        now: Duration,
        conn: ConnId,
        worker: WorkerId,
        attempt: u64,
        standby: bool,
    ) {
        if standby {
            let host = self
                .process_host(&worker, Slot::Standby)
                .map(str::to_string);
            let ok = host.is_some()
                && self.worker(&worker).is_some()
                && !self.standbys.contains_key(&worker)
                && !self.is_ended();
            let Some(host) = host.filter(|_| ok) else {
                tracing::debug!(%worker, "refusing a standby that is not placed");
                self.out.push(Action::Close { conn });
                return;
            };
            self.out.push(Action::Assign {
                conn,
                worker: worker.clone(),
                host: host.clone(),
                epoch: self.epoch,
                restore: self.newest_committed,
                restore_pending: false,
                standby: true,
                replay: None,
            });
            self.conns.insert(
                conn,
                ConnRole::Standby {
                    worker: worker.clone(),
                },
            );
            tracing::info!(%worker, %host, "hot standby connected");
            self.standbys.insert(
                worker,
                StandbyConn {
                    conn,
                    followed: None,
                },
            );
            return;
        }
        let current = self.is_current(&worker, attempt)
            && self.is_active()
            && self.worker(&worker).is_some()
            && !self.att.senders.contains_key(&worker);
        let host = self
            .procs
            .get(&(worker.clone(), Slot::Primary))
            .filter(|p| p.attempt == attempt)
            .map(|p| p.host.clone());
        let Some(host) = host.filter(|_| current) else {
            tracing::debug!(%worker, attempt, "refusing stale or unknown worker");
            self.out.push(Action::Close { conn });
            return;
        };
        self.assign_primary(now, conn, &worker, &host, attempt);
    }

    /// Connection `conn` is `worker`'s primary of `attempt` on `host` from
    /// now on: it gets the attempt's assignment (restore the newest
    /// committed checkpoint) and its heartbeat clock starts.
    fn assign_primary(
        &mut self,
        now: Duration,
        conn: ConnId,
        worker: &WorkerId,
        host: &str,
        attempt: u64,
    ) {
        self.conns.insert(
            conn,
            ConnRole::Primary {
                worker: worker.clone(),
                attempt,
            },
        );
        self.out.push(Action::Assign {
            conn,
            worker: worker.clone(),
            host: host.to_string(),
            epoch: self.epoch,
            restore: self.restored,
            restore_pending: self.restore_pending().is_some(),
            standby: false,
            replay: self
                .clock
                .as_ref()
                .and_then(|c| c.replay_targets(self.restored)?.get(worker).copied()),
        });
        self.att.senders.insert(worker.clone(), conn);
        self.att.epochs.insert(worker.clone(), self.epoch);
        self.att.last_seen.insert(worker.clone(), now);
    }

    fn on_message(&mut self, now: Duration, conn: ConnId, msg: ToSupervisor) {
        let worker = match self.conns.get(&conn).cloned() {
            Some(ConnRole::Primary { worker, attempt })
                if self.is_current(&worker, attempt) && self.is_active() =>
            {
                worker
            }
            Some(ConnRole::Standby { worker }) => {
                self.on_standby_message(now, conn, &worker, msg);
                return;
            }
            _ => return,
        };
        if let (Some(said), Some(assigned)) = (msg.epoch(), self.att.epochs.get(&worker)) {
            if said != *assigned {
                // Sent before it read its halt: of an attempt that is over.
                tracing::debug!(%worker, %said, %assigned, "dropped: from an attempt it was halted in");
                return;
            }
        }
        self.att.last_seen.insert(worker.clone(), now);
        match msg {
            ToSupervisor::Listening {
                addr,
                fetched_bytes,
                in_flight_records,
                ..
            } => {
                self.fetched.insert(worker.clone(), fetched_bytes);
                if self.restored.is_some() {
                    self.summary.restores += 1;
                    self.summary.restored_bytes += fetched_bytes;
                    self.summary.in_flight_restored += in_flight_records;
                }
                self.att.listening.insert(worker, addr);
                if self.att.listening.len() == self.cfg.plan.len() {
                    if let Some(c) = self.clock.as_mut() {
                        c.listening.get_or_insert(now);
                    }
                    let addrs = self.att.listening.clone();
                    match self.partial.clone() {
                        // Only the restarted regions start; the others run.
                        Some(region) => {
                            for w in region {
                                if let Some(conn) = self.att.senders.get(&w) {
                                    self.out.push(Action::Send {
                                        conn: *conn,
                                        msg: ToWorker::Start {
                                            addrs: addrs.clone(),
                                        },
                                    });
                                }
                            }
                        }
                        None => self.broadcast(ToWorker::Start { addrs }),
                    }
                }
            }
            ToSupervisor::Running { .. } => {
                self.att.running.insert(worker);
                if self.att.running.len() == self.cfg.plan.len()
                    && matches!(self.phase, Phase::Starting { .. })
                {
                    self.phase = Phase::Running;
                    if self.standbys_after.is_some() {
                        // The recovery is over: its standbys start soon.
                        let delay = self.cfg.restart.standby_delay;
                        self.standbys_after = Some(now + delay).filter(|_| !delay.is_zero());
                        if delay.is_zero() {
                            self.ensure_standbys(now);
                        }
                    }
                    let region_failover = self.partial.is_some();
                    if let Some(c) = self.clock.take() {
                        // Whole milliseconds of each moment, so the parts
                        // add up to the total exactly.
                        let ms = |d: Duration| d.as_millis() as u64;
                        let detected = ms(c.detected);
                        let placed = ms(c.placed.unwrap_or(now)).max(detected);
                        let listening = ms(c.listening.unwrap_or(now)).max(placed);
                        let running = ms(now).max(listening);
                        let t = RecoveryTime {
                            total_ms: running - detected,
                            drain_ms: placed - detected,
                            restore_ms: listening - placed,
                            connect_ms: running - listening,
                            region_failover,
                            replay_ms: None,
                            detect_ms: c.sign.map(|s| ms(c.detected.saturating_sub(s))),
                        };
                        tracing::info!(?t, "recovered: every worker running again");
                        self.summary.recoveries.push(t);
                        // The sources given a replay target report when
                        // they reach it.
                        let waiting: BTreeSet<WorkerId> = c
                            .replay_targets(self.restored)
                            .into_iter()
                            .flat_map(BTreeMap::keys)
                            .filter(|w| self.partial.as_ref().is_none_or(|r| r.contains(*w)))
                            .cloned()
                            .collect();
                        let still: BTreeSet<WorkerId> =
                            waiting.difference(&c.replayed).cloned().collect();
                        if !still.is_empty() {
                            self.replaying = Some((self.summary.recoveries.len() - 1, now, still));
                        } else if !waiting.is_empty() {
                            // Every source was back before the last worker ran.
                            self.replay_done(self.summary.recoveries.len() - 1, 0);
                        }
                    }
                    if let Some(region) = self.partial.take() {
                        tracing::info!(region = ?region, "region failover done: the other workers kept running");
                        self.summary.region_failovers += 1;
                        for t in self.att.last_seen.values_mut() {
                            *t = now;
                        }
                    }
                    // A kill that fell due while nothing ran is not fired
                    // in a burst.
                    if self.chaos_at <= now {
                        self.schedule_chaos(now);
                    }
                    tracing::info!(attempt = self.attempt, "all workers running");
                }
            }
            ToSupervisor::Ack {
                checkpoint,
                snapshot,
                pause_us,
                records,
            } => {
                self.summary
                    .pauses
                    .push((checkpoint, Duration::from_micros(pause_us)));
                let acked = self.att.snap_records.entry(worker.clone()).or_default();
                acked.insert(checkpoint, records);
                while acked.len() > 64 {
                    acked.pop_first();
                }
                if let Some(at) = self.coordinator.triggered_at(checkpoint) {
                    tracing::debug!(%worker, %checkpoint, after_ms = now.saturating_sub(at).as_millis() as u64, "acked");
                }
                let d = self.coordinator.on_ack(&worker, checkpoint, snapshot);
                self.carry_out(now, d);
            }
            ToSupervisor::SourceExhausted => {
                let d = self.coordinator.on_source_exhausted(now, &worker);
                self.carry_out(now, d);
            }
            ToSupervisor::Heartbeat { records_in } => {
                self.att.records.insert(worker, records_in);
            }
            ToSupervisor::Replayed => {
                if let Some((i, running_at, waiting)) = self.replaying.as_mut() {
                    waiting.remove(&worker);
                    if waiting.is_empty() {
                        let ms = (now.saturating_sub(*running_at)).as_millis() as u64;
                        let i = *i;
                        self.replaying = None;
                        self.replay_done(i, ms);
                    }
                } else if let Some(c) = self.clock.as_mut() {
                    c.replayed.insert(worker);
                }
            }
            ToSupervisor::Failed { error, fatal, .. } => {
                if matches!(self.phase, Phase::Finishing { .. }) && !self.is_sink(&worker) {
                    tracing::debug!(%worker, %error, "ignored while finishing");
                    return;
                }
                if fatal {
                    // Rule 6: a fatal error ends the job; restarting cannot
                    // fix a bad configuration or an input that never parses.
                    self.broadcast(ToWorker::Shutdown);
                    self.summary.last_failure = Some(format!("worker {worker} failed: {error}"));
                    self.end(JobState::Failed(format!(
                        "worker {worker} failed: {error} (a fatal error: the job is not restarted)"
                    )));
                    return;
                }
                // It said why and stays to be rolled back in place: the
                // cause is named, and its region is the one to recover
                // (its process is not replaced: it did not exit).
                self.reported.insert(worker.clone());
                self.sign(now);
                self.fail(now, format!("worker {worker} failed: {error}"), true);
            }
            ToSupervisor::Hello { .. } | ToSupervisor::Followed { .. } => {}
        }
    }

    fn on_standby_message(
        &mut self,
        now: Duration,
        conn: ConnId,
        worker: &WorkerId,
        msg: ToSupervisor,
    ) {
        match msg {
            ToSupervisor::Followed {
                checkpoint,
                fetched_bytes,
            } => {
                tracing::debug!(%worker, %checkpoint, fetched_bytes, "standby followed");
                if let Some(s) = self.standbys.get_mut(worker).filter(|s| s.conn == conn) {
                    s.followed = Some(checkpoint);
                    self.standby_retry.remove(worker);
                }
            }
            ToSupervisor::Failed { error, .. } => {
                tracing::warn!(%worker, %error, "hot standby failed; it is replaced");
                if let Some(host) = self.process_host(worker, Slot::Standby).map(str::to_string) {
                    self.out.push(Action::Kill {
                        host,
                        worker: worker.clone(),
                        slot: Slot::Standby,
                    });
                }
                self.standby_gone(worker);
                self.standby_failed(now, worker, None);
            }
            _ => {}
        }
    }

    fn on_closed(&mut self, now: Duration, conn: ConnId) {
        match self.conns.remove(&conn) {
            Some(ConnRole::Standby { worker })
                if self.standbys.get(&worker).is_some_and(|s| s.conn == conn) =>
            {
                self.standbys.remove(&worker);
            }
            Some(ConnRole::Standby { .. }) => {}
            Some(ConnRole::Primary { worker, .. }) if self.kept.get(&worker) == Some(&conn) => {
                // A kept process lost its connection: it cannot be rolled
                // back in place; it goes, and is started anew.
                self.kept.remove(&worker);
                if let Some(p) = self.procs.get(&(worker.clone(), Slot::Primary)) {
                    self.out.push(Action::Kill {
                        host: p.host.clone(),
                        worker,
                        slot: Slot::Primary,
                    });
                }
            }
            Some(ConnRole::Primary { worker, attempt }) => {
                // A taken-over worker has no process an agent could report:
                // its connection closing is its end.
                let key = (worker.clone(), Slot::Primary);
                let guest = self
                    .procs
                    .get(&key)
                    .filter(|p| p.guest_of.is_some() && p.attempt == attempt)
                    .map(|p| p.host.clone());
                let was_guest = guest.is_some();
                if let Some(host) = guest {
                    self.procs.remove(&key);
                    if matches!(self.phase, Phase::Finishing { .. }) {
                        // Told to shut down after the final checkpoint.
                        let ended = WorkerExited {
                            worker,
                            attempt,
                            standby: false,
                            host,
                            exit: ExitKind::Success,
                            detail: None,
                        };
                        self.on_exited(now, ended);
                        return;
                    }
                }
                if was_guest
                    && self.is_current(&worker, attempt)
                    && matches!(self.phase, Phase::Recovering(_))
                {
                    // Its end heard while the recovery of its host
                    // process is under way (that connection closed
                    // first, so the exit that would name it finds no
                    // guest): the recovery names it too.
                    self.failed.insert(worker.clone());
                }
                if !self.is_current(&worker, attempt)
                    || !self.is_active()
                    || matches!(self.phase, Phase::Finishing { .. })
                {
                    return;
                }
                self.sign(now);
                match self.att.exits.remove(&worker) {
                    // It exited, and everything it said has been heard.
                    Some((why, _)) => self.fail(now, why, true),
                    // No exit will name a taken-over worker's end: this does.
                    None if was_guest => {
                        self.failed.insert(worker.clone());
                        let why = format!(
                            "worker {worker} (taken over into another instance's process) ended"
                        );
                        self.fail(now, why, true);
                    }
                    None => self.fail(now, format!("worker {worker} disconnected"), false),
                }
            }
            None => {}
        }
    }

    /// Notes a sign of a primary's failure at `at` (the earliest counts).
    fn sign(&mut self, at: Duration) {
        self.first_sign = Some(self.first_sign.map_or(at, |s| s.min(at)));
    }

    fn on_exited(&mut self, now: Duration, mut e: WorkerExited) {
        // Reported under the primary's former name (a standby that died
        // just as it was promoted, a process rolled back in place before
        // its retag arrived): the exit is the primary's of this attempt.
        let reported = (
            if e.standby {
                Slot::Standby
            } else {
                Slot::Primary
            },
            e.attempt,
        );
        let renamed = self
            .procs
            .get(&(e.worker.clone(), Slot::Primary))
            .filter(|p| p.host == e.host && p.formerly == Some(reported))
            .map(|p| p.attempt);
        if let Some(attempt) = renamed {
            e.standby = false;
            e.attempt = attempt;
        }
        // A kept process that died is started anew.
        if !e.standby
            && self
                .procs
                .get(&(e.worker.clone(), Slot::Primary))
                .is_some_and(|p| p.host == e.host && p.attempt == e.attempt)
        {
            if let Some(conn) = self.kept.remove(&e.worker) {
                self.conns.remove(&conn);
            }
        }
        let slot = if e.standby {
            Slot::Standby
        } else {
            Slot::Primary
        };
        // The workers taken over into this process ended with it (first:
        // the failure then names them too, and restarts them together).
        let host_of = Some((e.worker.clone(), e.attempt));
        let guests: Vec<(WorkerId, u64)> = self
            .procs
            .iter()
            .filter(|(_, p)| !e.standby && p.guest_of == host_of && p.host == e.host)
            .map(|((w, _), p)| (w.clone(), p.attempt))
            .collect();
        for (w, attempt) in guests {
            let ended = WorkerExited {
                worker: w,
                attempt,
                standby: false,
                host: e.host.clone(),
                exit: e.exit.clone(),
                detail: Some(format!("its host process ({}) ended", e.worker)),
            };
            self.on_exited(now, ended);
        }
        let key = (e.worker.clone(), slot);
        if self
            .procs
            .get(&key)
            .is_some_and(|p| p.host == e.host && p.attempt == e.attempt)
        {
            self.procs.remove(&key);
        }
        if e.standby {
            tracing::warn!(worker = %e.worker, exit = %e.exit, "hot standby exited; it is replaced after a backoff");
            self.standby_gone(&e.worker);
            if e.exit != ExitKind::Success {
                self.standby_failed(now, &e.worker, Some(&e.host));
            }
            return;
        }
        let detail = e
            .detail
            .as_ref()
            .map(|l| format!(": {l}"))
            .unwrap_or_default();
        let current = self.is_current(&e.worker, e.attempt);
        let survivor = self
            .partial
            .as_ref()
            .is_some_and(|r| !r.contains(&e.worker));
        if survivor
            && current
            && e.exit != ExitKind::Success
            && matches!(self.phase, Phase::Recovering(_) | Phase::Claiming)
        {
            self.failed.insert(e.worker.clone());
            let why = format!("worker {} {}{detail}", e.worker, e.exit);
            self.escalate(now, why);
            return;
        }
        match &mut self.phase {
            // The first abnormal exit of the failed attempt names the cause
            // of a failure that named no worker.
            Phase::Recovering(r) if !r.named && current && e.exit != ExitKind::Success => {
                let first = format!("worker {} {}{detail}", e.worker, e.exit);
                r.cause = if r.cause.starts_with(&format!("worker {} ", e.worker)) {
                    first
                } else {
                    format!("{first} (then: {})", r.cause)
                };
                r.named = true;
                self.failed.insert(e.worker.clone());
            }
            Phase::Finishing { exited, .. } if current => {
                // After the final commit only a sink matters: one that dies
                // abnormally may not have published, so the job recovers
                // (its restart publishes). Anything else in flight after the
                // final checkpoint is uncommitted and is dropped.
                let is_sink = self
                    .cfg
                    .plan
                    .iter()
                    .any(|w| w.id == e.worker && w.outputs.is_empty());
                if e.exit == ExitKind::Success || !is_sink {
                    exited.insert(e.worker.clone());
                    if exited.len() == self.cfg.plan.len() {
                        self.end(JobState::Finished);
                    }
                    return;
                }
                self.failed.insert(e.worker.clone());
                self.sign(now);
                self.fail(now, format!("worker {} {}{detail}", e.worker, e.exit), true);
            }
            Phase::Starting { .. } | Phase::Running | Phase::Adopting if current => {
                let why = format!("worker {} {}{detail}", e.worker, e.exit);
                self.failed.insert(e.worker.clone());
                self.sign(now);
                // A process ended by a signal said all it would before the
                // signal. Its connection closes only once the kernel has
                // freed its memory (about 100 ms per GiB), long after an
                // exit reported from its exit word: not waited for.
                let said_all = matches!(e.exit, ExitKind::Signal(_));
                if self.att.senders.contains_key(&e.worker) && !said_all {
                    // Hear the worker's last words first (its connection
                    // closes right after them); bounded by the root-cause wait.
                    let until = now + self.cfg.root_cause_wait;
                    self.att.exits.insert(e.worker.clone(), (why, until));
                } else {
                    self.fail(now, why, true);
                }
            }
            _ => {}
        }
    }

    fn on_host_lost(&mut self, now: Duration, host: &str) {
        self.hosts.remove(host);
        self.host_since.remove(host);
        if let Some(st) = self.adopting.as_mut() {
            st.joined.remove(host);
        }
        let gone: Vec<(WorkerId, Slot)> = self
            .procs
            .iter()
            .filter(|(_, p)| p.host == host)
            .map(|(k, _)| k.clone())
            .collect();
        for (w, slot) in &gone {
            self.procs.remove(&(w.clone(), *slot));
            if *slot == Slot::Standby {
                self.standby_gone(w);
            }
        }
        let lost: Vec<WorkerId> = self
            .placement
            .iter()
            .filter(|(_, p)| p.primary == host)
            .map(|(w, _)| w.clone())
            .collect();
        self.failed.extend(lost.iter().cloned());
        let survivors_lost: Vec<String> = match &self.partial {
            Some(region) => lost
                .iter()
                .filter(|w| !region.contains(*w))
                .map(|w| w.to_string())
                .collect(),
            None => Vec::new(),
        };
        if !survivors_lost.is_empty()
            && matches!(self.phase, Phase::Recovering(_) | Phase::Claiming)
        {
            let why = format!(
                "host {host} lost (missed heartbeats) with {}",
                survivors_lost.join(", ")
            );
            self.escalate(now, why);
            return;
        }
        let pending: Vec<String> = match &self.phase {
            Phase::Starting { .. } | Phase::Running | Phase::Adopting => {
                lost.iter().map(|w| w.to_string()).collect()
            }
            Phase::Finishing { exited, .. } => lost
                .iter()
                .filter(|w| !exited.contains(*w))
                .map(|w| w.to_string())
                .collect(),
            _ => Vec::new(),
        };
        if !pending.is_empty() {
            self.fail(
                now,
                format!(
                    "host {host} lost (missed heartbeats) with {}",
                    pending.join(", ")
                ),
                true,
            );
        } else if self.is_active() {
            self.ensure_standbys(now);
        }
    }

    fn on_stop(&mut self, now: Duration, final_checkpoint: bool) {
        let again = std::mem::replace(&mut self.stop_requested, true);
        match self.phase {
            Phase::Ended(_) => {}
            // Asked once already: the final checkpoint is under way.
            Phase::Running if (self.cfg.final_checkpoint_on_stop || final_checkpoint) && !again => {
                tracing::info!("stop requested: taking a final checkpoint");
                let d = self.coordinator.request_final(now);
                self.carry_out(now, d);
            }
            _ => {
                self.broadcast(ToWorker::Shutdown);
                self.end(JobState::Stopped);
            }
        }
    }

    fn on_commit_done(
        &mut self,
        now: Duration,
        checkpoint: CheckpointId,
        epoch: Epoch,
        bytes: u64,
    ) {
        let restored = self.restore_pending() == Some(checkpoint);
        if self.unconfirmed.is_some_and(|(u, _)| u <= checkpoint) {
            self.unconfirmed = None;
        }
        if let Some(in_flight) = self
            .commits_in_flight
            .remove(&checkpoint)
            .filter(|b| *b > 0)
        {
            self.summary.in_flight_checkpoints += 1;
            self.summary.in_flight_bytes += in_flight;
        }
        self.newest_committed = Some(
            self.newest_committed
                .map_or(checkpoint, |n| n.max(checkpoint)),
        );
        self.summary.committed += 1;
        self.summary.last_checkpoint = self.newest_committed;
        self.failed_commits.retain(|f| *f > checkpoint);
        if restored {
            // The attempt's restored checkpoint is durable now: its sinks
            // recover it (rule 2).
            if matches!(self.phase, Phase::Starting { .. } | Phase::Running) {
                self.broadcast(ToWorker::Committed { checkpoint });
            }
        }
        self.summary.last_checkpoint_bytes = bytes;
        self.consecutive_failures = 0;
        let standby_conns: Vec<ConnId> = self.standbys.values().map(|s| s.conn).collect();
        for conn in standby_conns {
            self.out.push(Action::Send {
                conn,
                msg: ToWorker::Follow { checkpoint },
            });
        }
        if epoch == self.epoch && self.is_active() {
            self.att.committed = true;
            if let Some(t) = self.coordinator.triggered_at(checkpoint) {
                self.summary
                    .checkpoint_latencies
                    .push(now.saturating_sub(t));
            }
            self.broadcast(ToWorker::Committed { checkpoint });
            let d = self.coordinator.on_committed(checkpoint);
            let finishing = d.contains(&Decision::Finish);
            self.carry_out(now, d);
            self.maybe_retention(now, finishing);
        }
    }

    /// At most one retention pass per `retention_every`, none while one
    /// runs; the final checkpoint's pass always runs, after the one
    /// running if there is one (which listed the checkpoints before the
    /// final one committed).
    fn maybe_retention(&mut self, now: Duration, force: bool) {
        if self.retention_running {
            self.retention_final |= force;
            return;
        }
        let due = self
            .retention_last
            .is_none_or(|t| now.saturating_sub(t) >= self.cfg.retention_every);
        if due || force {
            self.retention_running = true;
            self.retention_last = Some(now);
            self.out.push(Action::Retention {
                keep: self.cfg.retention_keep,
            });
        }
    }

    fn carry_out(&mut self, now: Duration, decisions: Vec<Decision>) {
        for d in decisions {
            match d {
                Decision::Trigger {
                    checkpoint,
                    sources,
                } => {
                    tracing::debug!(%checkpoint, "trigger");
                    // The sources put the barrier in; every other worker
                    // learns it is coming and reads its inputs ahead to
                    // meet it (a worker from before that ignores it). Not
                    // for the final checkpoint: records in flight at it
                    // would reach no sink's commit, so it aligns in order.
                    let announce = self.cfg.read_ahead && !self.coordinator.is_final(checkpoint);
                    let others = self
                        .att
                        .senders
                        .keys()
                        .filter(|w| announce && !sources.contains(w));
                    let to: Vec<WorkerId> = sources.iter().chain(others).cloned().collect();
                    for w in to {
                        if let Some(conn) = self.att.senders.get(&w) {
                            self.out.push(Action::Send {
                                conn: *conn,
                                msg: ToWorker::Trigger { checkpoint },
                            });
                        }
                    }
                }
                Decision::Commit(manifest) => {
                    let in_flight = manifest
                        .chunks()
                        .filter(|c| c.name() == lazarus_sdk::protocol::IN_FLIGHT_PART)
                        .map(|c| c.raw_len)
                        .sum();
                    self.commits_in_flight
                        .insert(manifest.checkpoint, in_flight);
                    self.out.push(Action::Commit(manifest));
                }
                Decision::Abort { checkpoint, reason } => {
                    self.summary.aborted += 1;
                    tracing::info!(%checkpoint, ?reason, "checkpoint aborted");
                    self.broadcast(ToWorker::Abort { checkpoint });
                }
                Decision::Finish => {
                    tracing::info!("final checkpoint committed; shutting down");
                    self.phase = Phase::Finishing {
                        exited: BTreeSet::new(),
                        deadline: now + self.cfg.startup_timeout,
                    };
                    self.broadcast(ToWorker::Shutdown);
                }
            }
        }
        self.next_id = self.coordinator.next_id();
    }

    /// The attempt failed: start recovering. Its primaries are killed once
    /// the cause is known: a failure that names no worker (a lost
    /// connection) first waits briefly for the crashed process's exit, and
    /// our own kills must not be mistaken for it.
    fn fail(&mut self, now: Duration, why: String, named: bool) {
        self.recover(now, why, named, false, true);
    }

    /// As [`JobController::fail`], replacing every process of the attempt:
    /// the safety net for an attempt that did not start in time, whatever
    /// held it (a process that cannot be halted is not kept again).
    fn fail_every_process(&mut self, now: Duration, why: String) {
        self.recover(now, why, false, false, false);
    }

    /// Starts a recovery; a `planned` one (a fail-back, `lazarus move`) is
    /// not a failure: not counted in restarts nor against the restart
    /// budget, nor reported as the last failure.
    fn recover(&mut self, now: Duration, why: String, named: bool, planned: bool, in_place: bool) {
        // Only a failure of a running job with several regions may leave
        // the other regions running; anything else (a failure while
        // starting, finishing, adopting, or of a region failover in
        // progress) restarts every worker.
        let partial_ok = matches!(self.phase, Phase::Running)
            && self.adopting.is_none()
            && self.partial.is_none()
            && self.regions.values().collect::<BTreeSet<_>>().len() > 1;
        // Rolling back in place also while an attempt starts: a kept
        // process whose death is heard only once the next attempt began
        // (a peer reported its closed channel first) is then the only one
        // replaced. What the others said of the halted attempt is dropped
        // by its epoch.
        let rollback_ok = in_place
            && self.cfg.rollback_in_place
            && matches!(self.phase, Phase::Running | Phase::Starting { .. })
            && self.adopting.is_none()
            && self.partial.is_none()
            && self.kept.is_empty();
        // An adoption in progress is over: the recovery places everything.
        self.adopting = None;
        // A failure during a recovery extends it: timed from the first.
        let sign = self.first_sign.take();
        if self.clock.is_none() {
            let replay = self.replay_targets();
            self.clock = Some(RecoveryClock {
                sign: sign.filter(|_| !planned).map(|s| s.min(now)),
                detected: now,
                placed: None,
                listening: None,
                replay,
                replayed: BTreeSet::new(),
            });
        }
        // A recovery still replaying is cut short: its replay stays unknown.
        self.replaying = None;
        let _ = self.coordinator.on_failure();
        self.next_id = self.next_id.max(self.coordinator.next_id());
        self.partial = None;
        if !planned {
            self.summary.restarts += 1;
            self.consecutive_failures += 1;
        }
        tracing::info!(%why, restarts = self.summary.restarts, planned, "rolling back to the last committed checkpoint");
        let named = named || !self.failed.is_empty();
        if self.stop_requested {
            // Asked to stop: no restart. What is committed stays.
            self.end(JobState::Stopped);
            return;
        }
        self.phase = Phase::Recovering(Recovery {
            partial_ok,
            cause: why,
            named,
            name_until: now + self.cfg.root_cause_wait,
            drain_until: now + self.cfg.root_cause_wait + self.cfg.drain_timeout,
            backoff_until: None,
            torn_down: named,
            planned,
            rollback_ok,
        });
        if named {
            self.tear_down(partial_ok, rollback_ok);
        }
    }

    /// A worker with `failback` whose first host has been up for the
    /// hold-down moves back there; returns whether one did.
    fn maybe_fail_back(&mut self, now: Duration) -> bool {
        let due = self.cfg.plan.iter().find_map(|w| {
            let hold = w.failback?;
            let home = self.home.get(&w.id)?;
            let here = &self.placement.get(&w.id)?.primary;
            let up = *self.host_since.get(home)?;
            (home != here && self.hosts.contains(home) && now.saturating_sub(up) >= hold)
                .then(|| (w.id.clone(), home.clone(), hold))
        });
        let Some((w, home, hold)) = due else {
            return false;
        };
        let why = format!("{w} fails back to {home} (up for the {hold:?} hold-down)");
        self.move_to(now, &w, &home, why)
    }

    /// Restarts `worker`'s primary (and its region) on `host`, from the last
    /// committed checkpoint. Only while running, and only to a live host it
    /// may run on that it is not on already; returns whether it moves.
    fn move_to(&mut self, now: Duration, worker: &WorkerId, host: &str, why: String) -> bool {
        let allowed = self
            .worker(worker)
            .is_some_and(|w| w.hosts.is_empty() || w.hosts.iter().any(|h| h == host));
        let here = self.placement.get(worker).map(|p| p.primary.as_str());
        if !matches!(self.phase, Phase::Running)
            || !allowed
            || !self.hosts.contains(host)
            || here == Some(host)
        {
            tracing::info!(%worker, host, "move not possible now (not running, host not live or not allowed, or already there)");
            return false;
        }
        tracing::info!(%worker, host, %why, "moving a worker");
        self.summary.moves += 1;
        self.failed.insert(worker.clone());
        self.prefer.insert(worker.clone(), host.to_string());
        self.recover(now, why, true, true, true);
        true
    }

    /// Active-active takeover: the surviving instance (and its connection)
    /// whose running process on `host` takes `w`'s share over, if any. Only
    /// in a region failover, for an instance of an operator with one VIP
    /// per instance and no standby that is a region of its own, built by
    /// the worker SDK (not a `process` operator) without a health check
    /// (the agent checks processes); and only into a running primary that
    /// is not itself taken over.
    fn takeover_by(&self, w: &PlannedWorker, host: &str) -> Option<(WorkerId, ConnId)> {
        let region = self.partial.as_ref()?;
        if w.peer_vips.is_empty()
            || w.standby != StandbyKind::None
            || w.process.is_some()
            || w.health.is_some()
            || !w.takeover
        {
            return None;
        }
        let own = self.regions.get(&w.id)?;
        if self.regions.iter().any(|(o, r)| r == own && *o != w.id) {
            return None;
        }
        self.cfg.plan.iter().find_map(|s| {
            if s.operator != w.operator || region.contains(&s.id) {
                return None;
            }
            let p = self.procs.get(&(s.id.clone(), Slot::Primary))?;
            let ok = p.host == host && p.guest_of.is_none() && self.att.running.contains(&s.id);
            let conn = *self.att.senders.get(&s.id).filter(|_| ok)?;
            Some((s.id.clone(), conn))
        })
    }

    /// The failed workers' regions, if that is not every worker.
    fn failed_regions(&self) -> Option<BTreeSet<WorkerId>> {
        // A worker taken over into a failed worker's process goes with it.
        let guests = self.procs.iter().filter_map(|((w, _), p)| {
            let (into, _) = p.guest_of.as_ref()?;
            self.failed.contains(into).then_some(w)
        });
        let hit: BTreeSet<usize> = self
            .failed
            .iter()
            .chain(&self.reported)
            .chain(guests)
            .filter_map(|w| self.regions.get(w).copied())
            .collect();
        if hit.is_empty() {
            return None;
        }
        let region: BTreeSet<WorkerId> = self
            .regions
            .iter()
            .filter(|(_, r)| hit.contains(r))
            .map(|(w, _)| w.clone())
            .collect();
        (region.len() < self.regions.len()).then_some(region)
    }

    /// The failed attempt's primaries go: with `partial_ok` and the failed
    /// workers known, only those of their regions (a region failover: the
    /// other regions keep their processes, state and VIPs); otherwise all.
    /// Hot standbys keep following.
    fn tear_down(&mut self, partial_ok: bool, rollback_ok: bool) {
        let region = if partial_ok {
            self.failed_regions()
        } else {
            None
        };
        let partial = region.is_some();
        let region = match region {
            Some(region) => {
                tracing::info!(region = ?region, "region failover: only the failed workers' regions restart");
                region
            }
            None if rollback_ok => self.cfg.plan.iter().map(|w| w.id.clone()).collect(),
            None => {
                self.tear_down_attempt();
                return;
            }
        };
        for w in &region {
            let key = (w.clone(), Slot::Primary);
            match self.procs.get(&key) {
                // Rolled back in place: halted now (its channels, in-flight
                // checkpoints and state dropped), assigned again with the
                // next attempt on the same connection.
                Some(_) if rollback_ok && self.keep(w) => {
                    if let Some(conn) = self.att.senders.remove(w) {
                        self.out.push(Action::Send {
                            conn,
                            msg: ToWorker::Halt,
                        });
                        self.kept.insert(w.clone(), conn);
                    }
                }
                // A taken-over worker has no process of its own: closing
                // its connection (below) ends it, and no exit will come.
                Some(p) if p.guest_of.is_some() => {
                    self.procs.remove(&key);
                }
                Some(p) => self.out.push(Action::Kill {
                    host: p.host.clone(),
                    worker: w.clone(),
                    slot: Slot::Primary,
                }),
                None => {}
            }
            if let Some(conn) = self.att.senders.remove(w) {
                self.conns.remove(&conn);
                self.out.push(Action::Close { conn });
            }
            self.records_before += self.att.records.remove(w).unwrap_or(0);
            self.att.listening.remove(w);
            self.att.running.remove(w);
            self.att.last_seen.remove(w);
            self.att.exits.remove(w);
        }
        self.partial = partial.then_some(region);
    }

    /// Whether `w`'s process may be rolled back in place: it did not fail
    /// (did not exit, stall or lose its host), it is connected, it is a
    /// process of its own, and a worker-SDK process (a `process` operator's
    /// wrapper is replaced).
    fn keep(&self, w: &WorkerId) -> bool {
        !self.failed.contains(w)
            && !self.att.exits.contains_key(w)
            && self.att.senders.contains_key(w)
            && self
                .procs
                .get(&(w.clone(), Slot::Primary))
                .is_some_and(|p| p.guest_of.is_none())
            && self.worker(w).is_some_and(|p| p.process.is_none())
    }

    /// Every primary of the failed attempt goes; hot standbys keep
    /// following.
    fn tear_down_attempt(&mut self) {
        self.partial = None;
        // Kept processes go too (KillAll below).
        for (_, conn) in std::mem::take(&mut self.kept) {
            self.conns.remove(&conn);
            self.out.push(Action::Close { conn });
        }
        self.records_before += self.att.records.values().sum::<u64>();
        self.att.records.clear();
        self.att.running.clear();
        self.out.push(Action::KillAll { standbys: false });
        // Taken-over workers end with their host processes or connections;
        // no exit comes for them.
        self.procs.retain(|_, p| p.guest_of.is_none());
        let conns: Vec<ConnId> = self.att.senders.values().copied().collect();
        for conn in conns {
            self.conns.remove(&conn);
            self.out.push(Action::Close { conn });
        }
        self.att.senders.clear();
    }

    /// A worker outside the regions being recovered failed meanwhile: the
    /// region failover becomes a full one.
    fn escalate(&mut self, now: Duration, why: String) {
        tracing::info!(%why, "a surviving region failed during a region failover: every worker restarts");
        self.tear_down_attempt();
        match &mut self.phase {
            Phase::Recovering(r) => {
                r.partial_ok = false;
                r.cause = format!("{} (then: {why})", r.cause);
            }
            // Claiming (its answer is ignored now): recover anew, every
            // worker (a failure outside Running is never partial).
            _ => self.fail(now, why, true),
        }
    }

    fn backoff(&self) -> Duration {
        let r = &self.cfg.restart;
        let factor = 1u32 << self.consecutive_failures.saturating_sub(1).min(16);
        (r.backoff * factor).min(r.max_backoff)
    }

    /// Moves a recovery on: cause final → budget checked → primaries gone,
    /// commits answered, backoff over → claim the next epoch.
    fn progress_recovery(&mut self, now: Duration) {
        let Phase::Recovering(r) = &self.phase else {
            return;
        };
        if r.backoff_until.is_none() {
            if !r.named && now < r.name_until {
                return;
            }
            let (why, partial_ok, torn_down, planned, rollback_ok) = (
                r.cause.clone(),
                r.partial_ok,
                r.torn_down,
                r.planned,
                r.rollback_ok,
            );
            if !torn_down {
                self.tear_down(partial_ok, rollback_ok);
            } else if self.partial.is_none() && !self.att.senders.is_empty() {
                self.tear_down_attempt();
            }
            if let Phase::Recovering(r) = &mut self.phase {
                r.torn_down = true;
            }
            if !planned {
                self.summary.last_failure = Some(why.clone());
            }
            let max = self.cfg.restart.max_attempts;
            if self.summary.restarts > max {
                let newest = self
                    .newest_committed
                    .map_or("none".to_string(), |c| c.to_string());
                self.end(JobState::Failed(format!(
                    "{why}; the restart strategy gave up after {max} restarts (committed checkpoints are kept; newest: {newest})"
                )));
                return;
            }
            let backoff = self.backoff();
            if let Phase::Recovering(r) = &mut self.phase {
                r.backoff_until = Some(now + backoff);
            }
            self.out.push(Action::Recovering { why, backoff });
        }
        let Phase::Recovering(r) = &self.phase else {
            return;
        };
        // Kept processes are not waited for: they stay.
        let live = self
            .procs
            .keys()
            .filter(|(w, s)| {
                *s == Slot::Primary
                    && !self.kept.contains_key(w)
                    && self.partial.as_ref().is_none_or(|r| r.contains(w))
            })
            .count();
        let drained = live == 0 || now >= r.drain_until;
        if !drained || r.backoff_until.is_some_and(|b| now < b) {
            return;
        }
        // Rule 2: the next attempt's epoch fences anything the old one
        // still tries to commit; the store reports the newest checkpoint,
        // with a commit in flight decided (visible, or fenced).
        self.attempt += 1;
        self.phase = Phase::Claiming;
        self.out.push(Action::ClaimEpoch(Epoch(self.epoch.0 + 1)));
    }

    fn end(&mut self, state: JobState) {
        tracing::info!(?state, "job ended");
        self.adopting = None;
        self.kept.clear();
        self.summary.state = state.clone();
        self.phase = Phase::Ended(state);
        self.att.running.clear();
        self.out.push(Action::KillAll { standbys: true });
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.out.push(Action::Close { conn });
        }
        self.conns.clear();
        self.standbys.clear();
        for vip in std::mem::take(&mut self.vips).into_keys() {
            self.out.push(Action::UnassignVip { vip });
        }
    }

    fn standby_gone(&mut self, worker: &WorkerId) {
        self.standby_down.remove(worker);
        if let Some(s) = self.standbys.remove(worker) {
            self.conns.remove(&s.conn);
        }
    }

    /// A hot standby failed on `host` (None: where it is placed now). A
    /// standby deliberately moved away from another host does not count.
    fn standby_failed(&mut self, now: Duration, worker: &WorkerId, host: Option<&str>) {
        let placed = self
            .placement
            .get(worker)
            .and_then(|p| p.standby.as_deref());
        if host.is_some() && host != placed {
            return;
        }
        let n = self.standby_retry.get(worker).map_or(0, |(n, _)| *n) + 1;
        let wait = (Duration::from_millis(100) * (1u32 << n.min(7))).min(Duration::from_secs(10));
        tracing::warn!(%worker, failures = n, ?wait, "hot standby failed; restarting it after a backoff");
        self.standby_retry.insert(worker.clone(), (n, now + wait));
    }

    /// Places missing standbys (a host joined or came back) without moving
    /// any primary, then starts or moves hot standby processes.
    fn ensure_standbys(&mut self, now: Duration) {
        if let Ok(next) = placement::place(
            &self.kinds(),
            &self.hosts,
            &self.placement,
            &BTreeSet::new(),
        ) {
            for (w, p) in next {
                if let Some(cur) = self.placement.get_mut(&w) {
                    if cur.primary == p.primary && cur.standby != p.standby {
                        tracing::info!(worker = %w, standby = ?p.standby, "standby placed");
                        cur.standby = p.standby;
                    }
                }
            }
        }
        let hot: Vec<WorkerId> = self
            .cfg
            .plan
            .iter()
            .filter(|w| w.standby == StandbyKind::Hot)
            .map(|w| w.id.clone())
            .collect();
        for w in hot {
            let want = self
                .placement
                .get(&w)
                .and_then(|p| p.standby.clone())
                .filter(|h| self.hosts.contains(h));
            let have = self.process_host(&w, Slot::Standby).map(str::to_string);
            if have == want {
                continue;
            }
            if let Some(h) = have {
                self.out.push(Action::Kill {
                    host: h,
                    worker: w.clone(),
                    slot: Slot::Standby,
                });
                self.procs.remove(&(w.clone(), Slot::Standby));
                self.standby_gone(&w);
            }
            let waiting = self.standby_retry.get(&w).is_some_and(|(_, at)| now < *at)
                || self.standbys_after.is_some_and(|at| now < at);
            if let Some(h) = want.filter(|_| !waiting) {
                tracing::info!(worker = %w, host = %h, "starting hot standby");
                self.procs
                    .insert((w.clone(), Slot::Standby), Proc::new(&h, self.attempt));
                self.out.push(Action::Spawn {
                    host: h,
                    worker: w,
                    attempt: self.attempt,
                    slot: Slot::Standby,
                });
            }
        }
    }
}
