//! The supervisor of one job: a thin I/O shell around the pure
//! [`JobController`]. In local mode (`lazarus run`) its workers run in this
//! process's [`LocalFleet`]; on a cluster (`lazarus supervisor`) on the
//! agents, through `cluster::fleet::ClusterFleet`. Either way it drives a
//! [`Fleet`].
//!
//! | module | owns |
//! | --- | --- |
//! | `controller` | every decision: phases, checkpoints, failure detection, standbys, placement, VIPs, recovery (pure) |
//! | `storage` | commits, epoch claims and retention in tasks of their own; results come back as facts |
//! | `sim` (tests) | a seeded simulation of fleets, stores and clocks around the controller |
//!
//! The shell owns the sockets (one accept loop and one task per control
//! connection), the fleet, the clock and the storage tasks. It turns each
//! event into a [`Fact`], asks the controller, and carries out the
//! [`Action`]s. Every task it starts belongs to one [`TaskTracker`] under
//! one [`CancellationToken`], and the shell waits for them (bounded) before
//! it returns.

pub mod controller;
#[cfg(test)]
mod sim;
pub mod storage;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lazarus_sdk::protocol::{self, Assignment, ToSupervisor, ToWorker};
use lazarus_storage::{CheckpointId, CheckpointStore, Codec, Epoch, ErrorKind, WorkerId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use controller::{
    Action, AdoptedProc, Adoption, Chaos, ConnId, ControllerConfig, Fact, JobController, JobState,
    JobStateKind, RecoveryTime, RunSummary,
};

use crate::clock::{Clock, Stopwatch, SystemClock};
use crate::cluster::wire::JobStatusCell;
use crate::fleet::{Fleet, FleetEvent, LocalFleet};
use crate::metrics::JobMetrics;
use crate::procs::{ProcessTable, Slot};
use crate::security::{random_token, tokens_match};
use crate::spec::{JobSpec, PlannedWorker};
use crate::units::format_bytes;
use storage::{StorageRequest, StorageWorker};

/// A run's settings.
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
    /// The lowest store epoch this run may claim (HA: derived from the
    /// leader's term, so a deposed leader's commits are fenced); 0 = none.
    pub epoch_floor: u64,
    /// HA: how long an adoption waits for the processes to rejoin.
    pub adopt_timeout: Option<Duration>,
    /// Start from this savepoint or checkpoint id (`--from`) instead of
    /// the newest committed checkpoint. Ignored when adopting a running job.
    pub from: Option<String>,
}

/// Writes a job's placement where a new leader finds it (HA: etcd), before
/// the change takes effect. An error is retried; a supervisor that lost its
/// leadership has its job tasks aborted.
pub type PlacementLog =
    Arc<dyn Fn(Adoption) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Where a job's workers connect: the address (a fresh port each run) and,
/// on a TLS cluster, the supervisor's certificate for them.
pub struct ControlPort {
    /// The address to listen on.
    pub ip: IpAddr,
    /// TLS for the workers' connections.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// A job under an HA leader.
#[derive(Clone)]
pub struct JobHa {
    /// The running job to adopt (from its record), instead of starting it.
    pub adopt: Option<Adoption>,
    /// Where placement changes are written first.
    pub log: PlacementLog,
}

/// Control connections accepted at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;
/// A connection must say hello within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The end of a job waits this long for its processes and storage tasks.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a job's owner asks of it, through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopRequest {
    /// Keep running.
    #[default]
    Run,
    /// Stop now (with a final checkpoint if the run was set up for one).
    Stop,
    /// Take a final checkpoint, then stop: nothing after it is committed,
    /// so a savepoint of it restarts exactly where the job stopped.
    StopWithCheckpoint,
}

/// Runs `run` until it finishes, is stopped (`stop` turns true), or fails.
pub async fn run_local(
    run: LocalRun,
    stop: watch::Receiver<StopRequest>,
) -> anyhow::Result<RunSummary> {
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut table = ProcessTable::new(
        crate::fleet::LOCAL_HOST,
        run.worker_binary.clone(),
        &run.state_dir,
        Box::new(move |e| {
            let _ = events_tx.send(FleetEvent::Exited(e));
        }),
    )
    .with_context(|| format!("preparing state directory {}", run.state_dir.display()))?;
    for w in run.spec.plan().iter().filter(|w| w.process.is_some()) {
        table.set_program_worker(&w.id);
    }
    let status = crate::cluster::wire::job_status_cell(&run.spec.job_id(), Epoch(0));
    run_job(
        run,
        Box::new(LocalFleet(table)),
        events,
        ControlPort {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            tls: None,
        },
        status,
        stop,
        None,
    )
    .await
}

/// Runs `run` on `fleet` (whose events arrive on `events`), with the job's
/// control port on `control_ip` and its state published to `status`.
pub async fn run_job(
    run: LocalRun,
    fleet: Box<dyn Fleet>,
    events: mpsc::UnboundedReceiver<FleetEvent>,
    control: ControlPort,
    status: JobStatusCell,
    stop: watch::Receiver<StopRequest>,
    ha: Option<JobHa>,
) -> anyhow::Result<RunSummary> {
    let job = run.spec.job_id();
    let span = tracing::info_span!("job", %job);
    let result = Shell::run(run, fleet, events, control, status.clone(), stop, ha)
        .instrument(span)
        .await;
    if let Err(e) = &result {
        let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
        st.state = JobStateKind::Failed;
        st.failure = Some(format!("{e:#}"));
    }
    result
}

/// What a control connection's task tells the shell.
enum ConnEvent {
    Hello {
        conn: ConnId,
        worker: WorkerId,
        attempt: u64,
        standby: bool,
        token: Option<String>,
        rejoin: Option<lazarus_sdk::protocol::Rejoin>,
        tx: mpsc::UnboundedSender<ToWorker>,
    },
    Message {
        conn: ConnId,
        msg: ToSupervisor,
    },
    Closed {
        conn: ConnId,
    },
}

struct Shell {
    run: LocalRun,
    fleet: Box<dyn Fleet>,
    /// Senders of accepted connections; dropping one closes it (after its
    /// queued messages are written).
    conns: HashMap<ConnId, mpsc::UnboundedSender<ToWorker>>,
    storage: StorageWorker,
    /// The job's control address (workers connect here).
    addr: SocketAddr,
    /// The credentials of each process spawned (or asked to rejoin) and not
    /// yet connected.
    tokens: HashMap<(WorkerId, u64, Slot), Vec<String>>,
    /// Each attempt's data-channel key, by its epoch.
    channel_keys: HashMap<Epoch, String>,
    /// The codec of state chunks, resolved for the store (`codec = "auto"`).
    codec: Codec,
}

impl Shell {
    async fn run(
        run: LocalRun,
        fleet: Box<dyn Fleet>,
        mut events: mpsc::UnboundedReceiver<FleetEvent>,
        control: ControlPort,
        status: JobStatusCell,
        mut stop: watch::Receiver<StopRequest>,
        ha: Option<JobHa>,
    ) -> anyhow::Result<RunSummary> {
        let started = Stopwatch::start();
        let clock = SystemClock::default();
        let job = run.spec.job_id();
        let store =
            CheckpointStore::open(&run.store_url).context("opening the checkpoint store")?;
        let js = store.job(job.clone());
        let codec = run.spec.checkpoint.codec.resolve(js.is_local_directory());
        tracing::info!(?codec, "state chunk codec");
        // A new supervisor takes a new epoch: commits of any older one are fenced.
        let epoch = Epoch(
            (js.current_epoch()
                .await
                .context("reading the job's epoch")?
                .0
                + 1)
            .max(run.epoch_floor),
        );
        js.claim_epoch(epoch)
            .await
            .context("claiming the job's epoch")?;
        let adopting = ha.as_ref().is_some_and(|h| h.adopt.is_some());
        let latest = match &run.from {
            Some(from) if !adopting => Some(storage::start_from(&js, from, epoch).await?),
            _ => match js.latest().await {
                Ok(m) => Some(m.checkpoint),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e).context("reading the latest checkpoint"),
            },
        };
        let next_id = latest.map_or(CheckpointId(1), |c| c.next());
        let ControlPort {
            ip: control_ip,
            tls: control_tls,
        } = control;
        let listener = TcpListener::bind(SocketAddr::new(control_ip, 0))
            .await
            .context("binding the control port")?;
        let addr = listener.local_addr()?;
        tracing::info!(%epoch, %addr, next = %next_id, "supervisor started");

        let cancel = CancellationToken::new();
        // A run whose task is aborted (a deposed HA leader) ends its own
        // tasks too: accept loop, connections, storage.
        let _cancel_on_drop = cancel.clone().drop_guard();
        let tracker = TaskTracker::new();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
        tracker.spawn(accept_loop(
            listener,
            control_tls.map(tokio_rustls::TlsAcceptor::from),
            conn_tx,
            tracker.clone(),
            cancel.child_token(),
        ));
        let (fact_tx, mut facts) = mpsc::unbounded_channel();
        let storage = StorageWorker::start(
            js,
            fleet.local_cache(),
            fact_tx,
            &tracker,
            cancel.child_token(),
        );

        let mut ctl = JobController::new(
            controller_config(&run, fleet.holds_vips()),
            epoch,
            next_id,
            latest,
            fleet.hosts(),
        );
        let mut shell = Shell {
            codec,
            fleet,
            conns: HashMap::new(),
            storage,
            addr,
            tokens: HashMap::new(),
            channel_keys: HashMap::new(),
            run,
        };
        let log = ha.as_ref().map(|h| h.log.clone());
        let actions = match ha.and_then(|h| h.adopt) {
            Some(a) => ctl.adopt(clock.now(), a),
            None => ctl.start(clock.now()),
        };
        let mut logged = None;
        write_ahead(&log, &ctl, &actions, &mut logged).await;
        shell.apply(actions);
        let mut metrics = JobMetrics::new(&shell.run.spec.job.name, ctl.counters());
        publish(&status, &ctl, &mut metrics);

        let spec = &shell.run.spec;
        let tick_every = spec
            .checkpoint
            .interval
            .map_or(Duration::from_millis(50), |i| {
                (i / 4).clamp(Duration::from_millis(5), Duration::from_millis(100))
            });
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let status_every = shell.run.status_every;
        let mut status_tick =
            tokio::time::interval(status_every.unwrap_or(Duration::from_secs(3600)));
        status_tick.tick().await;
        let mut last_status = (Stopwatch::start(), 0u64);
        let mut stop_seen = false;
        let far = Duration::from_secs(365 * 24 * 3600);

        while !ctl.is_ended() {
            let now = clock.now();
            let wake = clock.deadline(ctl.wake_at(now).unwrap_or(now + far));
            let fact = tokio::select! {
                Some(ev) = events.recv() => shell.fleet_fact(ev),
                Some(ev) = conn_rx.recv() => match shell.conn_fact(ev) {
                    Some(f) => f,
                    None => continue,
                },
                Some(f) = facts.recv() => f,
                _ = tick.tick() => Fact::Tick,
                _ = tokio::time::sleep_until(wake) => Fact::Tick,
                changed = stop.changed(), if !stop_seen => {
                    let request = *stop.borrow();
                    if changed.is_ok() && request == StopRequest::Run {
                        continue;
                    }
                    stop_seen = true;
                    Fact::StopRequested {
                        final_checkpoint: request == StopRequest::StopWithCheckpoint,
                    }
                }
                _ = status_tick.tick(), if status_every.is_some() => {
                    print_status_line(&ctl, started, &mut last_status);
                    continue;
                }
            };
            let actions = ctl.handle(clock.now(), fact);
            write_ahead(&log, &ctl, &actions, &mut logged).await;
            shell.apply(actions);
            publish(&status, &ctl, &mut metrics);
        }

        // The job is over: every process was told to die and every VIP let
        // go. Wait (bounded) for the exits, and for storage work in flight
        // (the final checkpoint's retention pass included), so that nothing
        // of the job outlives this call.
        let deadline = clock.deadline(clock.now() + DRAIN_TIMEOUT);
        while ctl.live_processes() > 0 || ctl.commits_in_flight() > 0 || ctl.retention_in_flight() {
            let fact = tokio::select! {
                Some(ev) = events.recv() => shell.fleet_fact(ev),
                Some(f) = facts.recv() => f,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            let actions = ctl.handle(clock.now(), fact);
            shell.apply(actions);
        }
        // Connections and the accept loop end now; the storage task ends
        // once its queue is empty (its sender is dropped with the shell).
        shell.conns.clear();
        drop(shell);
        cancel.cancel();
        tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("storage work still running after {DRAIN_TIMEOUT:?}; abandoned");
        }
        while let Ok(f) = facts.try_recv() {
            let _ = ctl.handle(clock.now(), f);
        }
        let mut summary = ctl.summary();
        summary.elapsed = started.elapsed();
        publish(&status, &ctl, &mut metrics);
        Ok(summary)
    }

    fn fleet_fact(&mut self, ev: FleetEvent) -> Fact {
        match ev {
            FleetEvent::Exited(e) => {
                self.fleet.reap(&e);
                // A process that ended before its hello takes its
                // credential with it.
                let slot = if e.standby {
                    Slot::Standby
                } else {
                    Slot::Primary
                };
                self.tokens.remove(&(e.worker.clone(), e.attempt, slot));
                Fact::Exited(e)
            }
            FleetEvent::HostLost(h) => Fact::HostLost(h),
            FleetEvent::HostJoined(h) => Fact::HostJoined(h),
            FleetEvent::Refused { host, reason } => Fact::Refused { host, reason },
            FleetEvent::Move { worker, host } => Fact::MoveRequested { worker, host },
            FleetEvent::StandbyHealth { worker, host, up } => {
                Fact::StandbyHealth { worker, host, up }
            }
        }
    }

    fn conn_fact(&mut self, ev: ConnEvent) -> Option<Fact> {
        match ev {
            ConnEvent::Hello {
                conn,
                worker,
                attempt,
                standby,
                token,
                rejoin,
                tx,
            } => {
                // Only the process this shell spawned holds the credential
                // for its worker, attempt and slot: anyone else who reaches
                // the port is dropped here, before any decision sees it.
                let slot = if standby {
                    Slot::Standby
                } else {
                    Slot::Primary
                };
                let key = (worker.clone(), attempt, slot);
                let valid = match (self.tokens.get(&key), token.as_deref()) {
                    (Some(expected), Some(presented)) => expected
                        .iter()
                        .any(|e| !e.is_empty() && tokens_match(presented, e)),
                    _ => false,
                };
                if !valid {
                    tracing::warn!(%worker, attempt, ?slot, "control connection refused: no valid credential for this worker process");
                    return None;
                }
                self.tokens.remove(&key);
                self.conns.insert(conn, tx);
                Some(Fact::Hello {
                    conn,
                    worker,
                    attempt,
                    standby,
                    rejoin,
                })
            }
            ConnEvent::Message { conn, msg } => Some(Fact::Message { conn, msg }),
            ConnEvent::Closed { conn } => {
                self.conns.remove(&conn);
                Some(Fact::Closed { conn })
            }
        }
    }

    /// Carries out the controller's actions. Each is a send, a signal or a
    /// queued storage request: nothing here waits.
    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Spawn {
                    host,
                    worker,
                    attempt,
                    slot,
                } => {
                    let token = new_credential();
                    self.tokens
                        .insert((worker.clone(), attempt, slot), vec![token.clone()]);
                    self.fleet
                        .spawn(&host, &worker, attempt, slot, self.addr, &token);
                }
                Action::Adopt {
                    conn,
                    host,
                    worker,
                    attempt,
                    into,
                } => {
                    let token = new_credential();
                    self.tokens.insert(
                        (worker.clone(), attempt, Slot::Primary),
                        vec![token.clone()],
                    );
                    tracing::info!(%worker, attempt, %into, %host, "taking a share over into a surviving instance's process");
                    self.send(
                        conn,
                        ToWorker::Adopt {
                            worker,
                            attempt,
                            token,
                        },
                    );
                }
                Action::Rejoin {
                    host,
                    worker,
                    attempt,
                    slot,
                } => {
                    let token = new_credential();
                    // Every ticket handed out stays good until one is used:
                    // an agent that registers twice gets a second one.
                    self.tokens
                        .entry((worker.clone(), attempt, slot))
                        .or_default()
                        .push(token.clone());
                    self.fleet
                        .rejoin(&host, &worker, attempt, slot, self.addr, &token);
                }
                Action::Promote {
                    host,
                    worker,
                    attempt,
                } => self.fleet.promote(&host, &worker, attempt),
                Action::Kill { host, worker, slot } => self.fleet.kill(&host, &worker, slot),
                Action::Retag {
                    host,
                    worker,
                    attempt,
                } => self.fleet.retag(&host, &worker, attempt),
                Action::KillAll { standbys } => self.fleet.kill_all(standbys),
                Action::AssignVip { vip, host } => self.fleet.assign_vip(&vip, &host),
                Action::UnassignVip { vip } => self.fleet.unassign_vip(&vip),
                Action::Assign {
                    conn,
                    worker,
                    host,
                    epoch,
                    restore,
                    restore_pending,
                    standby,
                    replay,
                } => {
                    let Some(w) = self.run.spec_worker(&worker) else {
                        continue;
                    };
                    let key = self.channel_key(epoch);
                    let mut a = Box::new(self.assignment(&w, epoch, restore, &host, key));
                    a.replay_records = replay;
                    a.restore_pending = restore_pending;
                    let msg = if standby {
                        ToWorker::Standby(a)
                    } else {
                        ToWorker::Assign(a)
                    };
                    self.send(conn, msg);
                }
                Action::Send { conn, msg } => self.send(conn, msg),
                Action::Close { conn } => {
                    self.conns.remove(&conn);
                }
                Action::Commit(manifest) => self.storage.send(StorageRequest::Commit(manifest)),
                Action::ClaimEpoch(epoch) => self.storage.send(StorageRequest::ClaimEpoch(epoch)),
                Action::Retention { keep } => self.storage.send(StorageRequest::Retention(keep)),
                Action::PruneCaches { newest, referenced } => {
                    self.fleet.prune_caches(&referenced, newest)
                }
                Action::Recovering { why, backoff } => {
                    if self.run.status_every.is_some() {
                        eprintln!("[lazarus] failure: {why}; restarting from the last committed checkpoint in {backoff:?}");
                    }
                }
            }
        }
    }

    fn send(&self, conn: ConnId, msg: ToWorker) {
        if let Some(tx) = self.conns.get(&conn) {
            let _ = tx.send(msg);
        }
    }

    /// The data-channel key of the attempt running under `epoch`: one per
    /// attempt, so a worker of an older attempt cannot feed a newer one.
    fn channel_key(&mut self, epoch: Epoch) -> String {
        self.channel_keys
            .entry(epoch)
            .or_insert_with(|| {
                let a = random_token().unwrap_or_default();
                let b = random_token().unwrap_or_default();
                format!("{a}{b}")
            })
            .clone()
    }

    /// The assignment of `w` under `epoch` restoring `restore`, on `host`.
    fn assignment(
        &self,
        w: &PlannedWorker,
        epoch: Epoch,
        restore: Option<CheckpointId>,
        host: &str,
        channel_key: String,
    ) -> Assignment {
        let spec = &self.run.spec;
        let mut params = spec.params();
        params.extend(w.own_params());
        Assignment {
            job: spec.job_id(),
            worker: w.id.clone(),
            operator: w.operator.clone(),
            kind: w.kind.clone(),
            index: w.index,
            parallelism: w.parallelism,
            key_groups: spec.job.key_groups,
            params,
            store: self.run.store_url.clone(),
            epoch,
            restore,
            inputs: w.inputs.clone(),
            outputs: w.outputs.clone(),
            cache_dir: self.fleet.cache_dir(host),
            heartbeat_ms: spec.job.heartbeat_interval.as_millis() as u64,
            codec: self.codec,
            channel_key: Some(channel_key),
            replay_records: None,
            restore_pending: false,
        }
    }
}

impl LocalRun {
    fn spec_worker(&self, id: &WorkerId) -> Option<PlannedWorker> {
        self.spec.plan().into_iter().find(|w| w.id == *id)
    }
}

/// The controller's settings from the spec and the run's options.
pub fn controller_config(run: &LocalRun, vips: bool) -> ControllerConfig {
    let mut cfg = ControllerConfig::from_spec(&run.spec);
    if let Some(t) = run.adopt_timeout {
        cfg.adopt_timeout = t;
    }
    cfg.final_checkpoint_on_stop = run.final_checkpoint_on_stop;
    cfg.chaos = run.chaos;
    cfg.vips = vips;
    cfg
}

/// A one-time credential for a worker process (new, or asked to rejoin).
fn new_credential() -> String {
    random_token().unwrap_or_else(|e| {
        // Never expected; an empty credential matches nothing.
        tracing::error!(error = %e, "no credential for a worker process");
        String::new()
    })
}

/// HA: writes the controller's placement (processes, hosts, VIPs, whether
/// the attempt runs) to etcd whenever it changed, before `actions` carry
/// the change out, retrying until it is written: a leader that lost its
/// term has this task aborted.
async fn write_ahead(
    log: &Option<PlacementLog>,
    ctl: &JobController,
    _actions: &[Action],
    logged: &mut Option<Adoption>,
) {
    let Some(log) = log else {
        return;
    };
    let now = ctl.adoption();
    if logged.as_ref() == Some(&now) {
        return;
    }
    let mut wait = Duration::from_millis(20);
    loop {
        match log(now.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "writing the placement to etcd failed; retrying before acting");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            }
        }
    }
    *logged = Some(now);
}

fn publish(status: &JobStatusCell, ctl: &JobController, metrics: &mut JobMetrics) {
    let s = ctl.status();
    metrics.observe(ctl.counters(), &s);
    *status.lock().unwrap_or_else(|p| p.into_inner()) = s;
}

fn print_status_line(ctl: &JobController, started: Stopwatch, last: &mut (Stopwatch, u64)) {
    let s = ctl.summary();
    let (t0, r0) = *last;
    let rate = s.source_records.saturating_sub(r0) as f64 / t0.elapsed().as_secs_f64().max(1e-3);
    *last = (Stopwatch::start(), s.source_records);
    eprintln!(
        "[lazarus {:>6.1}s] {:<10} {:>10.0} records/s | checkpoint {} ({} ms, {}) | restarts {}",
        started.elapsed().as_secs_f64(),
        s.state.kind().to_string(),
        rate,
        s.last_checkpoint.map_or("-".into(), |c| c.to_string()),
        s.checkpoint_latencies.last().map_or(0, |d| d.as_millis()),
        format_bytes(s.last_checkpoint_bytes),
        s.restarts,
    );
}

/// Accepts control connections; each gets a task that reads its hello
/// (bounded wait) and then relays its messages. At most
/// [`MAX_CONNECTIONS`] at once; accept errors (out of descriptors) back off
/// instead of spinning.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    events: mpsc::UnboundedSender<ConnEvent>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let next_conn = AtomicU64::new(1);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = cancel.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = cancel.cancelled() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                backoff = Duration::from_millis(5);
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "accepting a control connection failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let conn = ConnId(next_conn.fetch_add(1, Ordering::Relaxed));
        let (events, cancel, tls) = (events.clone(), cancel.clone(), tls.clone());
        tracker.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = connection(conn, stream, tls, events) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

/// One control connection: hello, then messages in both directions until
/// either side closes. The shell closes it by dropping its sender (queued
/// messages are written first).
async fn connection(
    conn: ConnId,
    stream: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    events: mpsc::UnboundedSender<ConnEvent>,
) {
    let _ = stream.set_nodelay(true);
    type Read = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
    type Write = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
    let (mut read, mut write): (Read, Write) = match tls {
        None => {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
        // On a cluster with TLS: the supervisor's certificate; the worker
        // proves itself inside with its one-time credential.
        Some(acceptor) => {
            match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    let (r, w) = tokio::io::split(s);
                    (Box::new(r), Box::new(w))
                }
                Ok(Err(e)) => {
                    tracing::warn!(?conn, error = %e, "job control connection refused: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        ?conn,
                        "job control connection refused: no TLS handshake in time"
                    );
                    return;
                }
            }
        }
    };
    let hello = tokio::time::timeout(
        HELLO_TIMEOUT,
        protocol::read_control::<_, ToSupervisor>(&mut read),
    )
    .await;
    let Ok(Ok(Some(ToSupervisor::Hello {
        worker,
        attempt,
        standby,
        token,
        rejoin,
    }))) = hello
    else {
        tracing::debug!(?conn, "control connection without a hello; closed");
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    let hello = ConnEvent::Hello {
        conn,
        worker,
        attempt,
        standby,
        token,
        rejoin,
        tx,
    };
    if events.send(hello).is_err() {
        return;
    }
    let writer = async {
        while let Some(msg) = rx.recv().await {
            if protocol::write_control(&mut write, &msg).await.is_err() {
                break;
            }
        }
    };
    let reader = async {
        while let Ok(Some(msg)) = protocol::read_control::<_, ToSupervisor>(&mut read).await {
            if events.send(ConnEvent::Message { conn, msg }).is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    let _ = events.send(ConnEvent::Closed { conn });
}
