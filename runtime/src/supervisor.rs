//! The supervisor: runs a job. In local mode (`lazarus run`) it shares the
//! process with one [`Agent`]; on a cluster (`lazarus supervisor`) its
//! workers run on agents of other hosts. Either way it drives a [`Fleet`].
//!
//! Placement (see [`crate::placement`]) decides at each attempt where each
//! worker's primary runs and where its standby waits. A hot standby is a
//! process that follows every commit into its host's local cache; when its
//! primary fails, the standby process itself is promoted (no download), a
//! new standby is placed, and the worker's VIPs move to the new primary's
//! host under a lease. Each recovery claims a new epoch, so a commit from a
//! demoted attempt is fenced in storage.
//!
//! Lifecycle (a typed state machine, [`JobState`]): `Starting` (workers
//! spawned, handshake: hello → assignment → listening → start → running),
//! `Running` (checkpoints per the [`CheckpointCoordinator`]), `Recovering`
//! (a worker failed: kill every worker, back off, restart all of them from
//! the last committed checkpoint), and then `Finished` (the final checkpoint
//! committed and every worker exited cleanly), `Stopped` (asked to stop) or
//! `Failed` (the restart strategy gave up, or this supervisor was fenced).
//!
//! Exactly-once rests on three rules carried out here: a manifest is
//! committed only after every worker acked; `Committed(n)` is announced only
//! after the commit is durable; and recovery always restores the newest
//! committed checkpoint with every worker restarted, so no record is counted
//! twice and none is lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lazarus_sdk::protocol::{self, Assignment, ToSupervisor, ToWorker};
use lazarus_storage::{CheckpointId, CheckpointStore, Epoch, ErrorKind, JobId, JobStore, WorkerId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::agent::{Agent, ExitKind, Slot, WorkerExited};
use crate::cluster::wire::{job_status_cell, JobStatusCell, WorkerStatus};
use crate::coordinator::{CheckpointCoordinator, CoordinatorConfig, Decision};
use crate::fleet::{Fleet, FleetEvent};
use crate::placement::{self, Placed};
use crate::spec::{JobSpec, PlannedWorker, StandbyKind};
use crate::units::format_bytes;

/// Random worker kills, to watch recovery live.
#[derive(Debug, Clone, Copy)]
pub struct Chaos {
    /// Mean time between kills; each gap is drawn from 0.5 to 1.5 times it.
    pub every: Duration,
    /// Seed of the choice of victims and gaps.
    pub seed: u64,
    /// Stop killing after this many kills (so a run is sure to finish).
    pub max_kills: Option<u32>,
}

/// A local run's settings.
#[derive(Debug, Clone)]
pub struct LocalRun {
    /// The job.
    pub spec: JobSpec,
    /// Where checkpoints go.
    pub store_url: String,
    /// The worker binary.
    pub worker_binary: PathBuf,
    /// Logs and the local cache.
    pub state_dir: PathBuf,
    /// Random SIGKILLs, if any.
    pub chaos: Option<Chaos>,
    /// Print a status line this often.
    pub status_every: Option<Duration>,
    /// On a stop request, take a final checkpoint before shutting down.
    pub final_checkpoint_on_stop: bool,
}

/// Where the job is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Workers starting and connecting.
    Starting,
    /// Processing, taking checkpoints.
    Running,
    /// Rolling back after a failure.
    Recovering,
    /// The final checkpoint committed and every worker exited.
    Finished,
    /// Stopped on request.
    Stopped,
    /// Gave up.
    Failed(String),
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The job.
    pub job: JobId,
    /// This supervisor's epoch.
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
    /// Wall time.
    pub elapsed: Duration,
    /// Trigger-to-commit latency of each committed checkpoint.
    pub checkpoint_latencies: Vec<Duration>,
    /// Synchronous snapshot pause of every ack.
    pub pauses: Vec<Duration>,
    /// State size of the newest checkpoint (stored bytes).
    pub last_checkpoint_bytes: u64,
    /// Why the last restart happened, if any.
    pub last_failure: Option<String>,
}

enum Event {
    Hello {
        conn: u64,
        worker: WorkerId,
        attempt: u64,
        standby: bool,
        read: tokio::net::tcp::OwnedReadHalf,
        write: tokio::net::tcp::OwnedWriteHalf,
    },
    Message {
        conn: u64,
        msg: Option<ToSupervisor>,
    },
}

/// Whom a control connection belongs to.
#[derive(Debug, Clone)]
enum ConnRole {
    Primary { worker: WorkerId, attempt: u64 },
    Standby { worker: WorkerId },
}

/// A connected hot standby.
struct StandbyConn {
    conn: u64,
    tx: mpsc::UnboundedSender<ToWorker>,
    followed: Option<CheckpointId>,
}

enum Outcome {
    Finished,
    Stopped,
    Failed(String),
    Fenced(String),
}

/// Runs `run` until it finishes, is stopped (`stop` turns true), or fails.
pub async fn run_local(run: LocalRun, stop: watch::Receiver<bool>) -> anyhow::Result<RunSummary> {
    let (agent, exits) = Agent::new("local", run.worker_binary.clone(), &run.state_dir)
        .with_context(|| format!("preparing state directory {}", run.state_dir.display()))?;
    let (fleet, events) = Fleet::local(agent, exits);
    let status = job_status_cell(&run.spec.job_id(), Epoch(0));
    run_job(
        run,
        fleet,
        events,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        status,
        stop,
    )
    .await
}

/// Runs `run` on `fleet` (whose events arrive on `events`), with the job's
/// control port on `control_ip` and its state published to `status`.
pub async fn run_job(
    run: LocalRun,
    fleet: Fleet,
    events: mpsc::UnboundedReceiver<FleetEvent>,
    control_ip: IpAddr,
    status: JobStatusCell,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<RunSummary> {
    let job = run.spec.job_id();
    let span = tracing::info_span!("job", %job);
    let result = async {
        Supervisor::start(run, fleet, events, control_ip, status.clone(), stop)
            .await?
            .run()
            .await
    }
    .instrument(span)
    .await;
    if let Err(e) = &result {
        status.lock().unwrap_or_else(|p| p.into_inner()).state = format!("failed: {e:#}");
    }
    result
}

struct Supervisor {
    run: LocalRun,
    job: JobId,
    js: JobStore,
    epoch: Epoch,
    plan: Vec<PlannedWorker>,
    fleet: Fleet,
    fleet_events: mpsc::UnboundedReceiver<FleetEvent>,
    addr: SocketAddr,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    accept_task: tokio::task::JoinHandle<()>,
    stop: watch::Receiver<bool>,
    started: Instant,
    next_id: CheckpointId,
    summary: RunSummary,
    rng: u64,
    consecutive_failures: u32,
    /// Source records of finished attempts.
    records_before: u64,
    /// When the next chaos kill is due. One schedule for the whole run, not
    /// per attempt, so an attempt's lifetime varies like a real failure's.
    chaos_at: tokio::time::Instant,
    /// Where each worker runs now.
    placement: BTreeMap<WorkerId, Placed>,
    /// Workers whose primary failed: they move at the next placement.
    failed: BTreeSet<WorkerId>,
    /// Connected hot standbys.
    standbys: BTreeMap<WorkerId, StandbyConn>,
    /// Control connections by id.
    conns: HashMap<u64, ConnRole>,
    /// The checkpoint a restore starts from now.
    restore_point: Option<CheckpointId>,
    /// The current attempt.
    attempt: u64,
    /// Primaries running in the current attempt.
    running_now: BTreeSet<WorkerId>,
    /// Hot standbys that failed: how often in a row, and when the next
    /// may start (exponential backoff, so a standby that cannot run does
    /// not respawn at every commit).
    standby_retry: BTreeMap<WorkerId, (u32, Instant)>,
    /// Bytes each worker's last restore downloaded.
    fetched: BTreeMap<WorkerId, u64>,
    status: JobStatusCell,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.fleet.kill_all(true);
        for w in &self.plan {
            for v in &w.vips {
                self.fleet.unassign_vip(v);
            }
        }
    }
}

impl Supervisor {
    async fn start(
        run: LocalRun,
        fleet: Fleet,
        fleet_events: mpsc::UnboundedReceiver<FleetEvent>,
        control_ip: IpAddr,
        status: JobStatusCell,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Supervisor> {
        let job = run.spec.job_id();
        let store =
            CheckpointStore::open(&run.store_url).context("opening the checkpoint store")?;
        let js = store.job(job.clone());
        // A new supervisor takes a new epoch: commits of any older one are fenced.
        let epoch = Epoch(
            js.current_epoch()
                .await
                .context("reading the job's epoch")?
                .0
                + 1,
        );
        js.claim_epoch(epoch)
            .await
            .context("claiming the job's epoch")?;
        let next_id = match js.latest().await {
            Ok(m) => m.checkpoint.next(),
            Err(e) if e.kind() == ErrorKind::NotFound => CheckpointId(1),
            Err(e) => return Err(e).context("reading the latest checkpoint"),
        };
        let listener = TcpListener::bind(SocketAddr::new(control_ip, 0))
            .await
            .context("binding the control port")?;
        let addr = listener.local_addr()?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let accept_task = tokio::spawn(accept_loop(listener, events_tx.clone()));
        tracing::info!(%epoch, %addr, next = %next_id, "supervisor started");
        let plan = run.spec.plan();
        let rng = run.chaos.map(|c| c.seed).unwrap_or(1) | 1;
        let chaos_at = tokio::time::Instant::now()
            + run
                .chaos
                .map(|c| c.every)
                .unwrap_or(Duration::from_secs(3600));
        Ok(Supervisor {
            summary: RunSummary {
                job: job.clone(),
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
            },
            run,
            job,
            js,
            epoch,
            plan,
            fleet,
            fleet_events,
            addr,
            events_tx,
            events,
            accept_task,
            stop,
            started: Instant::now(),
            next_id,
            rng,
            consecutive_failures: 0,
            records_before: 0,
            chaos_at,
            placement: BTreeMap::new(),
            failed: BTreeSet::new(),
            standbys: BTreeMap::new(),
            conns: HashMap::new(),
            restore_point: None,
            attempt: 0,
            running_now: BTreeSet::new(),
            fetched: BTreeMap::new(),
            standby_retry: BTreeMap::new(),
            status,
        })
    }

    async fn run(mut self) -> anyhow::Result<RunSummary> {
        let mut attempt = 0u64;
        loop {
            if *self.stop.borrow() {
                self.summary.state = JobState::Stopped;
                break;
            }
            let restore = match self.js.latest().await {
                Ok(m) => Some(m.checkpoint),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e).context("reading the latest checkpoint"),
            };
            self.restore_point = restore;
            if attempt > 0 {
                // A new term per recovery: anything the previous attempt
                // still tries to commit is fenced in storage.
                let next = Epoch(self.epoch.0 + 1);
                match self.js.claim_epoch(next).await {
                    Ok(()) => {
                        self.epoch = next;
                        self.summary.epoch = self.epoch;
                    }
                    Err(e) if e.kind() == ErrorKind::Fenced => {
                        self.summary.state = JobState::Failed(format!("fenced: {e}"));
                        break;
                    }
                    Err(e) => return Err(e).context("claiming the next epoch"),
                }
            }
            self.summary.state = if attempt == 0 {
                JobState::Starting
            } else {
                JobState::Recovering
            };
            self.attempt = attempt;
            tracing::info!(attempt, ?restore, epoch = %self.epoch, "starting workers");
            // One span per attempt: a recovery's placement, promotions, VIP
            // moves and restores are all inside it.
            let span = tracing::info_span!("attempt", attempt, epoch = %self.epoch, recovering = attempt > 0);
            let mut outcome = self.attempt(attempt, restore).instrument(span).await;
            if let Outcome::Failed(why) = &outcome {
                // One crash makes its peers lose their connections too; when
                // the failure named no worker yet (a lost connection), give
                // the crashed process's exit a moment to arrive and name it.
                let named = !self.failed.is_empty();
                let cause = if named {
                    None
                } else {
                    self.root_cause(attempt).await
                };
                if let Some(cause) = cause {
                    let detail = cause
                        .detail
                        .as_ref()
                        .map(|l| format!(": {l}"))
                        .unwrap_or_default();
                    let first = format!("worker {} {}{detail}", cause.worker, cause.exit);
                    outcome =
                        Outcome::Failed(if why.starts_with(&format!("worker {} ", cause.worker)) {
                            first
                        } else {
                            format!("{first} (then: {why})")
                        });
                }
            }
            self.records_before = self.summary.source_records;
            self.running_now.clear();
            // Whatever happened, no primary of this attempt survives it.
            // Hot standbys keep following.
            self.fleet.kill_all(false);
            self.drain_exits().await;
            match outcome {
                Outcome::Finished => {
                    self.summary.state = JobState::Finished;
                    break;
                }
                Outcome::Stopped => {
                    self.summary.state = JobState::Stopped;
                    break;
                }
                Outcome::Fenced(why) => {
                    self.summary.state = JobState::Failed(format!("fenced: {why}"));
                    break;
                }
                Outcome::Failed(why) => {
                    self.summary.restarts += 1;
                    self.consecutive_failures += 1;
                    self.summary.last_failure = Some(why.clone());
                    let max = self.run.spec.restart.max_attempts;
                    if self.summary.restarts > max {
                        let newest = match self.js.latest().await {
                            Ok(m) => m.checkpoint.to_string(),
                            Err(_) => "none".into(),
                        };
                        self.summary.state = JobState::Failed(format!(
                            "{why}; the restart strategy gave up after {max} restarts (committed checkpoints are kept; newest: {newest})"
                        ));
                        break;
                    }
                    let backoff = self.backoff();
                    self.summary.state = JobState::Recovering;
                    self.publish();
                    tracing::info!(%why, restarts = self.summary.restarts, ?backoff, "worker failure; rolling back to the last committed checkpoint");
                    if self.run.status_every.is_some() {
                        eprintln!("[lazarus] failure: {why}; restarting from the last committed checkpoint in {backoff:?}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.changed() => {}
                    }
                    attempt += 1;
                }
            }
        }
        // Every process and VIP of the job is released when the supervisor
        // is dropped, right after this (also on an early error).
        self.summary.elapsed = self.started.elapsed();
        self.publish();
        Ok(self.summary.clone())
    }

    /// Publishes the job's state for `lazarus status`.
    fn publish(&self) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.state = match &self.summary.state {
            JobState::Failed(why) => format!("failed: {why}"),
            other => format!("{other:?}").to_lowercase(),
        };
        st.epoch = self.epoch.0;
        st.attempt = self.attempt;
        st.restarts = self.summary.restarts;
        st.committed = self.summary.committed;
        st.last_checkpoint = self.summary.last_checkpoint.map(|c| c.0);
        st.last_failure = self.summary.last_failure.clone();
        st.workers = self
            .plan
            .iter()
            .filter_map(|w| {
                let placed = self.placement.get(&w.id)?.clone();
                Some(WorkerStatus {
                    worker: w.id.clone(),
                    standby_kind: w.standby,
                    placed,
                    running: self.running_now.contains(&w.id),
                    restore_fetched_bytes: self.fetched.get(&w.id).copied().unwrap_or(0),
                    standby_checkpoint: self
                        .standbys
                        .get(&w.id)
                        .and_then(|s| s.followed)
                        .map(|c| c.0),
                })
            })
            .collect();
    }

    /// Retention in the store, then in the hosts' local caches. Failures
    /// are logged and retried after the next commit: they cost space, not
    /// data.
    async fn retention(&self, keep: usize) {
        let report = match self.js.gc(keep).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "retention pass failed; will retry after the next commit");
                return;
            }
        };
        let Some(newest) = report.retained.last().copied() else {
            return;
        };
        let referenced = report.referenced;
        let Fleet::Local(agent) = &self.fleet else {
            self.fleet.prune_remote(&referenced, newest);
            return;
        };
        let cache = match lazarus_storage::LocalCache::new(agent.cache_dir()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "opening the local cache failed");
                return;
            }
        };
        let job = self.job.clone();
        match tokio::task::spawn_blocking(move || cache.prune(&job, &referenced, newest)).await {
            Ok(Ok(n)) => tracing::debug!(deleted = n, "local cache pruned"),
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning the local cache failed"),
            Err(e) => tracing::warn!(error = %e, "cache pruning task failed"),
        }
    }

    /// The first abnormal exit of `attempt` reported within 100 ms. Lost
    /// hosts and standby events seen meanwhile are handled.
    async fn root_cause(&mut self, attempt: u64) -> Option<WorkerExited> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.fleet_events.recv()).await {
            match ev {
                FleetEvent::Exited(e) => {
                    self.fleet.reap(&e);
                    if e.standby {
                        self.standby_gone(&e.worker);
                    } else if e.attempt == attempt && e.exit != ExitKind::Success {
                        self.failed.insert(e.worker.clone());
                        return Some(e);
                    }
                }
                FleetEvent::HostLost(h) => self.host_lost(&h),
            }
        }
        None
    }

    /// Forgets everything on a lost host; its primaries move at the next
    /// placement.
    fn host_lost(&mut self, host: &str) {
        for (w, slot) in self.fleet.host_lost(host) {
            if slot == Slot::Standby {
                self.standby_gone(&w);
            }
        }
        for (w, p) in &self.placement {
            if p.primary == host {
                self.failed.insert(w.clone());
            }
        }
    }

    /// A hot standby failed on `host` (None: where it is placed now). A
    /// standby deliberately moved away from another host does not count.
    fn standby_failed(&mut self, worker: &WorkerId, host: Option<&str>) {
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
        self.standby_retry
            .insert(worker.clone(), (n, Instant::now() + wait));
    }

    fn standby_gone(&mut self, worker: &WorkerId) {
        if let Some(s) = self.standbys.remove(worker) {
            self.conns.remove(&s.conn);
        }
    }

    fn backoff(&self) -> Duration {
        let r = &self.run.spec.restart;
        let factor = 1u32 << self.consecutive_failures.saturating_sub(1).min(16);
        (r.backoff * factor).min(r.max_backoff)
    }

    /// Waits (bounded: 10 s) until every primary the fleet started has
    /// exited, handling standby traffic meanwhile.
    async fn drain_exits(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.fleet.running_primaries() > 0 {
            match tokio::time::timeout_at(deadline, self.fleet_events.recv()).await {
                Ok(Some(FleetEvent::Exited(e))) => {
                    self.fleet.reap(&e);
                    if e.standby {
                        self.standby_gone(&e.worker);
                    }
                }
                Ok(Some(FleetEvent::HostLost(h))) => self.host_lost(&h),
                _ => break,
            }
        }
        self.pump_events();
    }

    /// Handles queued control traffic between attempts: standbys are kept
    /// (hellos answered, progress noted); the dead attempt's is dropped.
    fn pump_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                Event::Hello {
                    conn,
                    worker,
                    standby: true,
                    read,
                    write,
                    ..
                } => self.on_standby_hello(conn, worker, read, write),
                Event::Message { conn, msg } => {
                    if let Some(ConnRole::Standby { worker }) = self.conns.get(&conn).cloned() {
                        self.on_standby_message(conn, &worker, msg);
                    }
                }
                Event::Hello { .. } => {}
            }
        }
    }

    /// The assignment of `w` restoring `restore`, on `host`.
    fn assignment(
        &self,
        w: &PlannedWorker,
        restore: Option<CheckpointId>,
        host: &str,
    ) -> Assignment {
        let spec = &self.run.spec;
        let mut params = spec.params();
        params.extend(w.own_params());
        Assignment {
            job: self.job.clone(),
            worker: w.id.clone(),
            operator: w.operator.clone(),
            kind: w.kind.clone(),
            index: w.index,
            parallelism: w.parallelism,
            key_groups: spec.job.key_groups,
            params,
            store: self.run.store_url.clone(),
            epoch: self.epoch,
            restore,
            inputs: w.inputs.clone(),
            outputs: w.outputs.clone(),
            cache_dir: self.fleet.cache_dir(host),
            heartbeat_ms: spec.job.heartbeat_interval.as_millis() as u64,
            codec: spec.checkpoint.codec,
        }
    }

    /// A standby process connected: it follows from the restore point on.
    fn on_standby_hello(
        &mut self,
        conn: u64,
        worker: WorkerId,
        read: tokio::net::tcp::OwnedReadHalf,
        write: tokio::net::tcp::OwnedWriteHalf,
    ) {
        let Some(host) = self.fleet.host_of(&worker, Slot::Standby) else {
            tracing::debug!(%worker, "refusing a standby that is not placed");
            return;
        };
        let Some(w) = self.plan.iter().find(|w| w.id == worker).cloned() else {
            return;
        };
        if self.standbys.contains_key(&worker) {
            return;
        }
        let tx = spawn_connection(conn, read, write, self.events_tx.clone());
        let a = self.assignment(&w, self.restore_point, &host);
        let _ = tx.send(ToWorker::Standby(Box::new(a)));
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
                tx,
                followed: None,
            },
        );
    }

    fn on_standby_message(&mut self, conn: u64, worker: &WorkerId, msg: Option<ToSupervisor>) {
        match msg {
            Some(ToSupervisor::Followed {
                checkpoint,
                fetched_bytes,
            }) => {
                tracing::debug!(%worker, %checkpoint, fetched_bytes, "standby followed");
                if let Some(s) = self.standbys.get_mut(worker).filter(|s| s.conn == conn) {
                    s.followed = Some(checkpoint);
                    self.standby_retry.remove(worker);
                }
            }
            Some(ToSupervisor::Failed { error }) => {
                tracing::warn!(%worker, %error, "hot standby failed; it is replaced");
                self.fleet.kill(worker, Slot::Standby);
                self.standby_gone(worker);
                self.standby_failed(worker, None);
            }
            None => {
                if self.standbys.get(worker).is_some_and(|s| s.conn == conn) {
                    self.standby_gone(worker);
                }
                self.conns.remove(&conn);
            }
            Some(_) => {}
        }
    }

    /// Each worker with its standby kind, in plan order (placement's input).
    fn standby_kinds(&self) -> Vec<(WorkerId, StandbyKind)> {
        self.plan
            .iter()
            .map(|w| (w.id.clone(), w.standby))
            .collect()
    }

    /// Places missing standbys (a host joined or came back) without moving
    /// any primary, then starts or moves hot standby processes to their
    /// hosts.
    fn ensure_standbys(&mut self, attempt: u64) {
        let kinds = self.standby_kinds();
        if let Ok(next) = placement::place(
            &kinds,
            &self.fleet.hosts(),
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
        let plan = self.plan.clone();
        for w in plan.iter().filter(|w| w.standby == StandbyKind::Hot) {
            let want = self.placement.get(&w.id).and_then(|p| p.standby.clone());
            let have = self.fleet.host_of(&w.id, Slot::Standby);
            if have == want {
                continue;
            }
            if have.is_some() {
                self.fleet.kill(&w.id, Slot::Standby);
                self.standby_gone(&w.id);
            }
            let waiting = self
                .standby_retry
                .get(&w.id)
                .is_some_and(|(_, at)| Instant::now() < *at);
            if let Some(h) = want.filter(|_| !waiting) {
                tracing::info!(worker = %w.id, host = %h, "starting hot standby");
                self.fleet
                    .spawn(&h, &w.id, attempt, Slot::Standby, self.addr);
            }
        }
    }

    /// Schedules the next chaos kill 0.5 to 1.5 mean gaps from now.
    fn schedule_chaos(&mut self) {
        if let Some(c) = self.run.chaos {
            let factor = 0.5 + (self.next_random() % 1000) as f64 / 1000.0;
            self.chaos_at = tokio::time::Instant::now() + c.every.mul_f64(factor);
        }
    }

    fn chaos_armed(&self) -> bool {
        self.run
            .chaos
            .is_some_and(|c| c.max_kills.is_none_or(|m| self.summary.chaos_kills < m))
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    async fn attempt(&mut self, attempt: u64, restore: Option<CheckpointId>) -> Outcome {
        let spec = self.run.spec.clone();
        self.pump_events();
        let kinds = self.standby_kinds();
        let alive = self.fleet.hosts();
        self.placement = match placement::place(&kinds, &alive, &self.placement, &self.failed) {
            Ok(p) => p,
            Err(e) => {
                // No host right now: wait a little for one to (re)join.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Outcome::Failed(e.to_string());
            }
        };
        self.failed.clear();
        let mut senders: BTreeMap<WorkerId, mpsc::UnboundedSender<ToWorker>> = BTreeMap::new();
        let plan = self.plan.clone();
        for w in &plan {
            let host = self.placement[&w.id].primary.clone();
            let promotable = self.standbys.contains_key(&w.id)
                && self.fleet.host_of(&w.id, Slot::Standby).as_deref() == Some(host.as_str());
            if promotable {
                let s = self.standbys.remove(&w.id).expect("checked");
                self.fleet.promote(&w.id, attempt);
                self.conns.insert(
                    s.conn,
                    ConnRole::Primary {
                        worker: w.id.clone(),
                        attempt,
                    },
                );
                let a = self.assignment(w, restore, &host);
                let _ = s.tx.send(ToWorker::Assign(Box::new(a)));
                tracing::info!(worker = %w.id, %host, followed = ?s.followed, "hot standby promoted");
                senders.insert(w.id.clone(), s.tx);
            } else {
                tracing::info!(worker = %w.id, %host, "starting primary");
                self.fleet
                    .spawn(&host, &w.id, attempt, Slot::Primary, self.addr);
            }
            if self.fleet.has_vips() {
                for v in &w.vips {
                    self.fleet.assign_vip(v, &host);
                }
            }
        }
        self.ensure_standbys(attempt);
        self.publish();
        let by_id: BTreeMap<WorkerId, PlannedWorker> = self
            .plan
            .iter()
            .map(|w| (w.id.clone(), w.clone()))
            .collect();
        let sources: Vec<WorkerId> = self
            .plan
            .iter()
            .filter(|w| w.is_source)
            .map(|w| w.id.clone())
            .collect();
        let mut listening: BTreeMap<WorkerId, SocketAddr> = BTreeMap::new();
        let mut running: BTreeSet<WorkerId> = BTreeSet::new();
        let mut exited_clean: BTreeSet<WorkerId> = BTreeSet::new();
        let mut last_seen: BTreeMap<WorkerId, Instant> = BTreeMap::new();
        let mut records: BTreeMap<WorkerId, u64> = BTreeMap::new();
        let mut coordinator = CheckpointCoordinator::new(
            CoordinatorConfig {
                interval: spec.checkpoint.interval,
                timeout: spec.checkpoint.timeout,
                max_concurrent: spec.checkpoint.max_concurrent as usize,
            },
            self.job.clone(),
            self.epoch,
            self.plan.iter().map(|w| w.id.clone()),
            sources.iter().cloned(),
            self.next_id,
        );
        let origin = Instant::now();
        let startup_deadline = origin + Duration::from_secs(60);
        let mut finishing = false;
        let mut is_running = false;
        let tick_every = spec
            .checkpoint
            .interval
            .map_or(Duration::from_millis(50), |i| {
                (i / 4).clamp(Duration::from_millis(5), Duration::from_millis(100))
            });
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let status_every = self.run.status_every.unwrap_or(Duration::from_secs(3600));
        let mut status =
            tokio::time::interval_at(tokio::time::Instant::now() + status_every, status_every);
        let mut last_status = (Instant::now(), 0u64);

        macro_rules! broadcast {
            ($msg:expr) => {
                for tx in senders.values() {
                    let _ = tx.send($msg.clone());
                }
            };
        }

        loop {
            let mut decisions: Vec<Decision> = Vec::new();
            tokio::select! {
                Some(ev) = self.fleet_events.recv() => {
                    let exit = match ev {
                        FleetEvent::Exited(exit) => exit,
                        FleetEvent::HostLost(host) => {
                            self.host_lost(&host);
                            let lost: Vec<String> = self
                                .placement
                                .iter()
                                .filter(|(_, p)| p.primary == host)
                                .map(|(w, _)| w.to_string())
                                .collect();
                            if lost.is_empty() || finishing {
                                self.ensure_standbys(attempt);
                                continue;
                            }
                            let _ = coordinator.on_failure();
                            self.next_id = coordinator.next_id();
                            return Outcome::Failed(format!(
                                "host {host} lost (missed heartbeats) with {}",
                                lost.join(", ")
                            ));
                        }
                    };
                    self.fleet.reap(&exit);
                    if exit.standby {
                        tracing::warn!(worker = %exit.worker, exit = %exit.exit, "hot standby exited; it is replaced after the next commit");
                        self.standby_gone(&exit.worker);
                        if exit.exit != ExitKind::Success {
                            self.standby_failed(&exit.worker, Some(&exit.host));
                        }
                        continue;
                    }
                    if exit.attempt != attempt {
                        continue;
                    }
                    // After the final commit only a sink matters: one that dies
                    // abnormally may not have published, so the job recovers
                    // (its restart publishes). Anything else in flight after
                    // the final checkpoint is uncommitted and is dropped.
                    let is_sink = by_id.get(&exit.worker).is_some_and(|w| w.outputs.is_empty());
                    if finishing && (exit.exit == ExitKind::Success || !is_sink) {
                        exited_clean.insert(exit.worker.clone());
                        if exited_clean.len() == self.plan.len() {
                            return Outcome::Finished;
                        }
                        continue;
                    }
                    let detail = exit.detail.as_ref().map(|l| format!(": {l}")).unwrap_or_default();
                    let _ = coordinator.on_failure();
                    self.next_id = coordinator.next_id();
                    self.failed.insert(exit.worker.clone());
                    return Outcome::Failed(format!("worker {} {}{detail}", exit.worker, exit.exit));
                }
                Some(event) = self.events.recv() => match event {
                    Event::Hello { conn, worker, standby: true, read, write, .. } => {
                        self.on_standby_hello(conn, worker, read, write);
                        self.publish();
                    }
                    Event::Hello { conn, worker, attempt: a, read, write, .. } => {
                        if a != attempt || !by_id.contains_key(&worker) || senders.contains_key(&worker) {
                            tracing::debug!(%worker, a, "refusing stale or unknown worker");
                            continue;
                        }
                        let w = &by_id[&worker];
                        let tx = spawn_connection(conn, read, write, self.events_tx.clone());
                        self.conns.insert(conn, ConnRole::Primary { worker: worker.clone(), attempt });
                        let host = self.placement[&worker].primary.clone();
                        let assignment = self.assignment(w, restore, &host);
                        let _ = tx.send(ToWorker::Assign(Box::new(assignment)));
                        senders.insert(worker.clone(), tx);
                        last_seen.insert(worker, Instant::now());
                    }
                    Event::Message { conn, msg } => {
                        let worker = match self.conns.get(&conn).cloned() {
                            Some(ConnRole::Primary { worker, attempt: a }) if a == attempt => worker,
                            Some(ConnRole::Standby { worker }) => {
                                self.on_standby_message(conn, &worker, msg);
                                continue;
                            }
                            _ => continue,
                        };
                        last_seen.insert(worker.clone(), Instant::now());
                        match msg {
                            None => {
                                if finishing {
                                    continue;
                                }
                                let _ = coordinator.on_failure();
                                self.next_id = coordinator.next_id();
                                return Outcome::Failed(format!("worker {worker} disconnected"));
                            }
                            Some(ToSupervisor::Listening { addr, fetched_bytes }) => {
                                self.fetched.insert(worker.clone(), fetched_bytes);
                                listening.insert(worker, addr);
                                if listening.len() == self.plan.len() {
                                    broadcast!(ToWorker::Start { addrs: listening.clone() });
                                }
                            }
                            Some(ToSupervisor::Running) => {
                                running.insert(worker);
                                if running.len() == self.plan.len() {
                                    is_running = true;
                                    self.running_now = running.clone();
                                    // A kill that fell due while nothing ran is not fired in a burst.
                                    if self.chaos_at <= tokio::time::Instant::now() {
                                        self.schedule_chaos();
                                    }
                                    self.summary.state = JobState::Running;
                                    self.publish();
                                    tracing::info!(attempt, "all workers running");
                                }
                            }
                            Some(ToSupervisor::Ack { checkpoint, snapshot, pause_us }) => {
                                self.summary.pauses.push(Duration::from_micros(pause_us));
                                decisions.extend(coordinator.on_ack(&worker, checkpoint, snapshot));
                            }
                            Some(ToSupervisor::SourceExhausted) => {
                                decisions.extend(coordinator.on_source_exhausted(origin.elapsed(), &worker));
                            }
                            Some(ToSupervisor::Heartbeat { records_in }) => {
                                records.insert(worker, records_in);
                            }
                            Some(ToSupervisor::Failed { error }) => {
                                if finishing && by_id.get(&worker).is_some_and(|w| !w.outputs.is_empty()) {
                                    tracing::debug!(%worker, %error, "ignored while finishing");
                                    continue;
                                }
                                let _ = coordinator.on_failure();
                                self.next_id = coordinator.next_id();
                                return Outcome::Failed(format!("worker {worker} failed: {error}"));
                            }
                            Some(ToSupervisor::Hello { .. }) | Some(ToSupervisor::Followed { .. }) => {}
                        }
                    }
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    if !is_running {
                        if now > startup_deadline {
                            return Outcome::Failed(format!(
                                "workers did not start within 60 s ({} of {} running)",
                                running.len(),
                                self.plan.len()
                            ));
                        }
                        continue;
                    }
                    if !finishing {
                        if let Some((w, _)) = last_seen.iter().find(|(_, t)| now.duration_since(**t) > spec.job.heartbeat_timeout) {
                            let _ = coordinator.on_failure();
                            self.next_id = coordinator.next_id();
                            self.failed.insert(w.clone());
                            return Outcome::Failed(format!("worker {w} missed heartbeats for {:?}", spec.job.heartbeat_timeout));
                        }
                    }
                    decisions.extend(coordinator.tick(origin.elapsed()));
                }
                _ = tokio::time::sleep_until(self.chaos_at), if self.chaos_armed() && is_running && !finishing => {
                    self.schedule_chaos();
                    let pick = (self.next_random() % self.plan.len() as u64) as usize;
                    let victim = self.plan[pick].id.clone();
                    tracing::info!(%victim, "chaos: SIGKILL");
                    self.summary.chaos_kills += 1;
                    if !coordinator.in_flight().is_empty() {
                        self.summary.kills_during_checkpoint += 1;
                    }
                    self.fleet.kill(&victim, Slot::Primary);
                }
                _ = status.tick(), if self.run.status_every.is_some() => {
                    let total: u64 = sources.iter().filter_map(|s| records.get(s)).sum();
                    let (t0, r0) = last_status;
                    let rate = total.saturating_sub(r0) as f64 / t0.elapsed().as_secs_f64().max(1e-3);
                    last_status = (Instant::now(), total);
                    eprintln!(
                        "[lazarus {:>6.1}s] {:<10} {:>10.0} records/s | checkpoint {} ({} ms, {}) | restarts {}",
                        self.started.elapsed().as_secs_f64(),
                        format!("{:?}", self.summary.state).to_lowercase(),
                        rate,
                        self.summary.last_checkpoint.map_or("-".into(), |c| c.to_string()),
                        self.summary.checkpoint_latencies.last().map_or(0, |d| d.as_millis()),
                        format_bytes(self.summary.last_checkpoint_bytes),
                        self.summary.restarts,
                    );
                }
                changed = self.stop.changed() => {
                    if changed.is_err() || *self.stop.borrow() {
                        if self.run.final_checkpoint_on_stop && is_running && !finishing {
                            tracing::info!("stop requested: taking a final checkpoint");
                            decisions.extend(coordinator.request_final(origin.elapsed()));
                        } else {
                            broadcast!(ToWorker::Shutdown);
                            return Outcome::Stopped;
                        }
                    }
                }
            }
            self.summary.source_records =
                self.records_before + sources.iter().filter_map(|s| records.get(s)).sum::<u64>();

            // Carry out decisions; a commit may produce more of them.
            let mut queue: std::collections::VecDeque<Decision> = decisions.into();
            while let Some(d) = queue.pop_front() {
                match d {
                    Decision::Trigger {
                        checkpoint,
                        sources,
                    } => {
                        tracing::debug!(%checkpoint, "trigger");
                        for s in sources {
                            if let Some(tx) = senders.get(&s) {
                                let _ = tx.send(ToWorker::Trigger { checkpoint });
                            }
                        }
                    }
                    Decision::Commit(manifest) => {
                        let checkpoint = manifest.checkpoint;
                        let span =
                            tracing::info_span!("checkpoint", %checkpoint, epoch = %self.epoch);
                        match self.js.commit(&manifest).instrument(span).await {
                            Ok(()) => {
                                if let Some(t) = coordinator.triggered_at(checkpoint) {
                                    self.summary
                                        .checkpoint_latencies
                                        .push(origin.elapsed().saturating_sub(t));
                                }
                                self.summary.committed += 1;
                                self.summary.last_checkpoint = Some(checkpoint);
                                self.summary.last_checkpoint_bytes = manifest.stored_bytes();
                                self.consecutive_failures = 0;
                                broadcast!(ToWorker::Committed { checkpoint });
                                self.restore_point = Some(checkpoint);
                                for s in self.standbys.values() {
                                    let _ = s.tx.send(ToWorker::Follow { checkpoint });
                                }
                                queue.extend(coordinator.on_committed(checkpoint));
                                self.retention(spec.checkpoint.retention).await;
                                self.ensure_standbys(attempt);
                                self.publish();
                            }
                            Err(e) if e.kind() == ErrorKind::Fenced => {
                                broadcast!(ToWorker::Shutdown);
                                return Outcome::Fenced(e.to_string());
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, %checkpoint, "commit failed");
                                queue.extend(
                                    coordinator.on_commit_failed(checkpoint, e.to_string()),
                                );
                            }
                        }
                    }
                    Decision::Abort { checkpoint, reason } => {
                        tracing::info!(%checkpoint, ?reason, "checkpoint aborted");
                        broadcast!(ToWorker::Abort { checkpoint });
                    }
                    Decision::Finish => {
                        tracing::info!("final checkpoint committed; shutting down");
                        finishing = true;
                        broadcast!(ToWorker::Shutdown);
                    }
                }
            }
            self.next_id = coordinator.next_id();
        }
    }
}

/// Accepts control connections and reads each one's hello (bounded wait).
async fn accept_loop(listener: TcpListener, events: mpsc::UnboundedSender<Event>) {
    let next_conn = Arc::new(AtomicU64::new(1));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let events = events.clone();
        let conn = next_conn.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let (mut read, write) = stream.into_split();
            let hello = tokio::time::timeout(
                Duration::from_secs(10),
                protocol::read_control::<_, ToSupervisor>(&mut read),
            )
            .await;
            if let Ok(Ok(Some(ToSupervisor::Hello {
                worker,
                attempt,
                standby,
            }))) = hello
            {
                let _ = events.send(Event::Hello {
                    conn,
                    worker,
                    attempt,
                    standby,
                    read,
                    write,
                });
            }
        });
    }
}

/// Starts the reader and writer tasks of one control connection.
fn spawn_connection(
    conn: u64,
    mut read: tokio::net::tcp::OwnedReadHalf,
    mut write: tokio::net::tcp::OwnedWriteHalf,
    events: mpsc::UnboundedSender<Event>,
) -> mpsc::UnboundedSender<ToWorker> {
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if protocol::write_control(&mut write, &msg).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let msg = protocol::read_control::<_, ToSupervisor>(&mut read)
                .await
                .ok()
                .flatten();
            let end = msg.is_none();
            if events.send(Event::Message { conn, msg }).is_err() || end {
                break;
            }
        }
    });
    tx
}
