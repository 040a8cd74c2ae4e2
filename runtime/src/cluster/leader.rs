//! The supervisor under etcd (`--etcd`): campaign ([`crate::ha::election`]),
//! take over the jobs etcd lists when elected, step down when leadership
//! can no longer be proven, and, as a follower, send agents and clients to
//! the leader.
//!
//! A leader runs each job of etcd whose record says `running`, with store
//! epochs of at least its term's floor. Every etcd write of a leader is
//! conditioned on its term; a job is recorded before it starts and marked
//! stopped before it is stopped. Stepping down aborts every job task
//! without a word to the agents and ends their sessions: they register with
//! the next leader.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazarus_storage::JobId;
use tokio::sync::{watch, OnceCell};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::cluster::server::{check_conflicts, prepare, signal_stop, start_job, ServerOptions};
use crate::cluster::state::Cluster;
use crate::cluster::transport::Dialer;
use crate::cluster::wire::{
    ClientReply, ClientRequest, HaStatus, JobStatusCell, StatusReport, Submission, VipStatus,
};
use crate::ha::{self, Elector, EtcdHealth, HaOptions, HaStore, JobRecord, Role};
use crate::supervisor::{Adoption, JobHa, JobStateKind, PlacementLog, RunSummary};

/// The supervisor's HA state, shared by its connections.
#[derive(Clone)]
pub struct Leadership(Arc<Inner>);

struct Inner {
    opts: HaOptions,
    store: OnceCell<HaStore>,
    role: watch::Receiver<Role>,
    /// The term whose jobs are running here (set once taken over).
    serving: watch::Sender<Option<i64>>,
    /// The etcd record of each job this leader runs.
    records: Mutex<BTreeMap<JobId, JobSync>>,
}

impl Leadership {
    /// Starts campaigning and the take-over loop.
    pub fn start(
        opts: HaOptions,
        cluster: Cluster,
        server: Arc<ServerOptions>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Leadership {
        let elector = Elector::start(opts.clone(), tracker, cancel.clone());
        let (serving, _) = watch::channel(None);
        let me = Leadership(Arc::new(Inner {
            opts,
            store: OnceCell::new(),
            role: elector.role(),
            serving,
            records: Mutex::new(BTreeMap::new()),
        }));
        tracker.spawn(
            me.clone()
                .take_over_loop(cluster, server, tracker.clone(), cancel),
        );
        me
    }

    /// `Ok(term)` while this supervisor leads and runs its jobs; otherwise
    /// the leader's address, if one is known.
    pub fn leading(&self) -> Result<i64, Option<SocketAddr>> {
        if let Some(term) = *self.0.serving.borrow() {
            return Ok(term);
        }
        match &*self.0.role.borrow() {
            Role::Follower { leader, .. } => Err(leader.as_ref().map(|m| m.addr)),
            // Elected, still taking over: nobody to send them to yet.
            Role::Leader { .. } => Err(None),
        }
    }

    async fn store(&self) -> Result<&HaStore, ha::HaError> {
        self.0
            .store
            .get_or_try_init(|| async {
                let client = ha::connect(&self.0.opts.endpoints).await?;
                Ok(HaStore::new(
                    client,
                    &self.0.opts.prefix,
                    &self.0.opts.endpoints,
                ))
            })
            .await
    }

    async fn take_over_loop(
        self,
        cluster: Cluster,
        server: Arc<ServerOptions>,
        jobs: TaskTracker,
        cancel: CancellationToken,
    ) {
        let mut role = self.0.role.clone();
        loop {
            let term = role.borrow_and_update().term();
            let serving = *self.0.serving.borrow();
            if serving.is_some() && serving != term {
                self.step_down(&cluster);
            }
            if let Some(term) = term.filter(|t| serving != Some(*t)) {
                self.take_over(term, &cluster, &server, &jobs, &role)
                    .instrument(tracing::info_span!("take_over", term))
                    .await;
            }
            tokio::select! {
                changed = role.changed() => if changed.is_err() { break },
                _ = cancel.cancelled() => break,
            }
        }
        if self.0.serving.borrow().is_some() {
            // Shutting down: the server stops the jobs itself.
            self.0.serving.send_replace(None);
        }
    }

    fn step_down(&self, cluster: &Cluster) {
        self.0.serving.send_replace(None);
        self.0
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        cluster.lock().step_down();
        tracing::warn!("stepped down: jobs here aborted, agents sent to the next leader");
    }

    /// Runs every job etcd says is running, then serves.
    async fn take_over(
        &self,
        term: i64,
        cluster: &Cluster,
        server: &ServerOptions,
        jobs: &TaskTracker,
        role: &watch::Receiver<Role>,
    ) {
        cluster.lock().take_over();
        let mut wait = Duration::from_millis(100);
        let (store, records) = loop {
            if role.borrow().term() != Some(term) {
                return;
            }
            match self.store().await {
                Ok(store) => match store.jobs().await {
                    Ok(r) => break (store.clone(), r),
                    Err(e) => tracing::warn!(error = %e, "reading the job records"),
                },
                Err(e) => tracing::warn!(error = %e, "connecting to etcd"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        };
        let mut adopted = 0;
        for rec in records.into_iter().filter(JobRecord::wants_running) {
            let sync = JobSync::new(store.clone(), term, rec.clone());
            let started = prepare(rec.submission(), server)
                .and_then(|p| start_job(p, cluster, server, jobs, Some(sync.clone())));
            match started {
                Ok(()) => {
                    adopted += 1;
                    self.remember(sync);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::error!(job = %rec.job, error = %why, "cannot run the job etcd lists; marking it failed");
                    sync.finish("failed", Some(why)).await;
                }
            }
        }
        tracing::info!(term, jobs = adopted, "leading");
        self.0.serving.send_replace(Some(term));
    }

    /// The record of job `job` this leader keeps in etcd.
    fn record(&self, job: &JobId) -> Option<JobSync> {
        self.0
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job)
            .cloned()
    }

    /// Records job `job` as stopped, before the stop takes effect: a new
    /// leader will not start it again. The error is the client's answer.
    async fn record_stopped(&self, job: &JobId) -> Result<(), String> {
        let sync = self.record(job).ok_or_else(|| format!("no job {job}"))?;
        sync.put("stopped", None)
            .await
            .map_err(|e| format!("job {job} not stopped: recording it in etcd failed: {e}"))
    }

    fn remember(&self, sync: JobSync) {
        if let Ok(id) = JobId::new(sync.job()) {
            self.0
                .records
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, sync);
        }
    }

    async fn status(&self, mut report: StatusReport, term: Option<i64>) -> StatusReport {
        let (leader, supervisors, etcd) = match self.store().await {
            Ok(store) => {
                let leader = store.leader().await.ok().flatten();
                let members = store.members().await.unwrap_or_default();
                // VIP leases are the agents' own, in etcd.
                if let Ok(holders) = store.vip_holders().await {
                    let mut ttls = BTreeMap::new();
                    for (_, l) in holders.values() {
                        if let Some(t) = store.lease_ttl(*l).await {
                            ttls.insert(*l, t as u64 * 1000);
                        }
                    }
                    for v in report.vips.iter_mut() {
                        let held = holders.get(&v.vip);
                        v.holder = held.map(|(h, _)| h.clone());
                        v.lease_id = held.map(|(_, l)| *l as u64);
                        // etcd counts whole seconds.
                        v.lease_expires_in_ms = held.and_then(|(_, l)| ttls.get(l).copied());
                    }
                    for (vip, (h, l)) in holders {
                        if !report.vips.iter().any(|v| v.vip == vip) {
                            report.vips.push(VipStatus {
                                vip,
                                assigned: None,
                                holder: Some(h),
                                lease_id: Some(l as u64),
                                lease_expires_in_ms: ttls.get(&l).copied(),
                            });
                        }
                    }
                }
                (leader, members, store.health().await)
            }
            Err(e) => (
                None,
                Vec::new(),
                EtcdHealth {
                    endpoints: self.0.opts.endpoints.clone(),
                    healthy: false,
                    version: None,
                    error: Some(e.to_string()),
                },
            ),
        };
        StatusReport {
            ha: Some(HaStatus {
                answered_by: self.0.opts.name.clone(),
                term: term.or(leader.as_ref().map(|(_, t)| *t)),
                leader: leader.map(|(m, _)| m),
                supervisors,
                etcd,
            }),
            ..report
        }
    }
}

/// A leader's answer to a client.
pub async fn client_request(
    req: ClientRequest,
    term: i64,
    cluster: &Cluster,
    server: &ServerOptions,
    jobs: &TaskTracker,
    ha: &Leadership,
) -> ClientReply {
    match req {
        ClientRequest::Status => {
            let report = cluster.lock().report();
            ClientReply::Status(Box::new(ha.status(report, Some(term)).await))
        }
        ClientRequest::Stop { job } => {
            if let Err(message) = ha.record_stopped(&job).await {
                return ClientReply::Error { message };
            }
            signal_stop(cluster, &job)
        }
        ClientRequest::Savepoint { job, name, stop } => {
            if stop {
                if let Err(message) = ha.record_stopped(&job).await {
                    return ClientReply::Error { message };
                }
            }
            match crate::cluster::savepoint::take(cluster, &job, name, stop).await {
                Ok(message) => ClientReply::Ok { message },
                Err(e) => ClientReply::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        ClientRequest::Move { job, worker, host } => {
            match crate::cluster::server::request_move(cluster, server, &job, &worker, &host) {
                Ok(message) => ClientReply::Ok { message },
                Err(e) => ClientReply::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        ClientRequest::Rescale {
            job,
            operator,
            parallelism,
            vips,
        } => {
            let rescaled = async {
                use crate::cluster::savepoint::{plan_rescale, stop_for_rescale};
                use anyhow::Context as _;
                let plan = plan_rescale(cluster, server, &job, &operator, parallelism, &vips)?;
                let old = ha.record(&job).with_context(|| format!("no job {job}"))?;
                // Recorded as stopped before it stops: a new leader does
                // not start the old plan again.
                old.put("stopped", None).await.with_context(|| {
                    format!("job {job} not rescaled: recording the stop in etcd failed")
                })?;
                let (next, reply) = stop_for_rescale(cluster, &job, plan).await?;
                let from = next.from.clone().unwrap_or_default();
                let sub = next.submission.clone();
                let store = ha.store().await?.clone();
                let rec = JobRecord {
                    job: job.to_string(),
                    spec: sub.spec,
                    origin: sub.origin,
                    dir: sub.dir,
                    set: sub.set,
                    parallelism: sub.parallelism,
                    vips: sub.vips,
                    store: next.store_url.clone(),
                    state: "running".into(),
                    epoch: 0,
                    last_checkpoint: None,
                    term,
                    failure: None,
                    placement: None,
                };
                let sync = JobSync::new(store, term, rec);
                let started = async {
                    sync.put("running", None).await?;
                    start_job(next, cluster, server, jobs, Some(sync.clone()))
                }
                .await;
                started.with_context(|| {
                    format!("job {job} stopped at savepoint {from} but did not start again; submit it with --from {from}")
                })?;
                ha.remember(sync);
                anyhow::Ok(reply)
            };
            match rescaled.await {
                Ok(message) => ClientReply::Ok { message },
                Err(e) => ClientReply::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        ClientRequest::Submit {
            spec,
            origin,
            dir,
            set,
            parallelism,
            vips,
            from,
        } => {
            let submitted = async {
                let sub = Submission {
                    spec: spec.clone(),
                    origin: origin.clone(),
                    dir: dir.clone(),
                    set: set.clone(),
                    parallelism: parallelism.clone(),
                    vips: vips.clone(),
                };
                let mut prepared = prepare(sub, server)?;
                prepared.from = from;
                check_conflicts(&cluster.lock(), &prepared.spec)?;
                let job = prepared.spec.job_id();
                let store = ha.store().await?.clone();
                let rec = JobRecord {
                    job: job.to_string(),
                    spec,
                    origin,
                    dir,
                    set,
                    parallelism,
                    vips,
                    store: prepared.store_url.clone(),
                    state: "running".into(),
                    epoch: 0,
                    last_checkpoint: None,
                    term,
                    failure: None,
                    placement: None,
                };
                let sync = JobSync::new(store, term, rec);
                // Recorded before it runs: if this leader dies now, the next
                // one runs it.
                sync.put("running", None).await?;
                start_job(prepared, cluster, server, jobs, Some(sync.clone()))?;
                ha.remember(sync);
                anyhow::Ok(format!("job {job} submitted"))
            };
            match submitted.await {
                Ok(message) => ClientReply::Ok { message },
                Err(e) => ClientReply::Error {
                    message: format!("{e:#}"),
                },
            }
        }
    }
}

/// A follower's answer: the leader's, relayed; or, without a leader, its
/// own view of the supervisors and etcd (status) or an error naming why.
pub async fn forward(
    req: ClientRequest,
    leader: Option<SocketAddr>,
    ha: &Leadership,
    dialer: &Dialer,
) -> ClientReply {
    match leader {
        Some(addr) => match crate::cluster::client::request(
            dialer,
            addr,
            &req,
            crate::cluster::client::DIAL_ONE_OF_MANY,
        )
        .await
        {
            Ok(reply) => reply,
            // The leader known here may be gone or hung: the client asks
            // another supervisor.
            Err(e) => ClientReply::Unavailable {
                message: format!("forwarding to the leader at {addr}: {e:#}"),
            },
        },
        None => match req {
            ClientRequest::Status => {
                ClientReply::Status(Box::new(ha.status(StatusReport::default(), None).await))
            }
            _ => {
                let why = match &*ha.0.role.borrow() {
                    Role::Follower { error: Some(e), .. } => format!(" (etcd: {e})"),
                    _ => String::new(),
                };
                ClientReply::Unavailable {
                    message: format!("no leader is elected right now{why}; try again shortly"),
                }
            }
        },
    }
}

/// One job's record in etcd, kept by the leader that runs it.
#[derive(Clone)]
pub struct JobSync {
    store: HaStore,
    term: i64,
    record: Arc<Mutex<JobRecord>>,
}

impl JobSync {
    fn new(store: HaStore, term: i64, record: JobRecord) -> JobSync {
        JobSync {
            store,
            term,
            record: Arc::new(Mutex::new(record)),
        }
    }

    fn job(&self) -> String {
        self.lock().job.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lowest store epoch the job may claim under this term.
    pub fn epoch_floor(&self) -> u64 {
        ha::epoch_floor(self.term)
    }

    /// The job's HA hooks: adopt what the record says runs (if anything),
    /// and write placement changes to the record first.
    pub fn job_ha(&self) -> JobHa {
        let adopt = {
            let r = self.lock();
            r.placement.clone().filter(|_| r.wants_running())
        };
        let sync = self.clone();
        let log: PlacementLog = Arc::new(move |a: Adoption| {
            let sync = sync.clone();
            Box::pin(async move { sync.put_placement(a).await.map_err(|e| e.to_string()) })
        });
        JobHa { adopt, log }
    }

    /// Writes the record with a new placement, its state unchanged (a job
    /// being stopped stays stopped).
    async fn put_placement(&self, a: Adoption) -> Result<(), ha::HaError> {
        self.put_with(|r| r.placement = Some(a)).await
    }

    /// Writes the record with `state`.
    async fn put(&self, state: &str, failure: Option<String>) -> Result<(), ha::HaError> {
        self.put_with(|r| {
            r.state = state.to_string();
            r.failure = failure;
        })
        .await
    }

    /// Changes the record with `change` and writes it, conditioned on the
    /// term.
    async fn put_with(&self, change: impl FnOnce(&mut JobRecord)) -> Result<(), ha::HaError> {
        let rec = {
            let mut r = self.lock();
            change(&mut r);
            r.term = self.term;
            r.clone()
        };
        self.store.put_job(self.term, &rec).await
    }

    /// Runs the job, writing its epoch and newest committed checkpoint to
    /// etcd as they change (checked every 500 ms).
    pub async fn follow(
        &self,
        running: impl std::future::Future<Output = anyhow::Result<RunSummary>>,
        status: &JobStatusCell,
    ) -> anyhow::Result<RunSummary> {
        tokio::pin!(running);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = &mut running => return r,
                _ = tick.tick() => {
                    let (epoch, last) = {
                        let s = status.lock().unwrap_or_else(|p| p.into_inner());
                        (s.epoch, s.last_checkpoint)
                    };
                    let changed = {
                        let mut r = self.lock();
                        let changed = r.epoch != epoch || r.last_checkpoint != last;
                        r.epoch = epoch;
                        r.last_checkpoint = last;
                        changed && r.wants_running()
                    };
                    if changed {
                        if let Err(e) = self.put("running", None).await {
                            tracing::warn!(error = %e, "updating the job record in etcd");
                        }
                    }
                }
            }
        }
    }

    /// Records how the job ended.
    pub async fn ended(&self, status: &JobStatusCell) {
        let (state, failure) = {
            let s = status.lock().unwrap_or_else(|p| p.into_inner());
            (s.state, s.failure.clone())
        };
        let state = match state {
            JobStateKind::Finished => "finished",
            JobStateKind::Failed => "failed",
            // Stopped, or ended while starting/running: a stop request.
            _ => "stopped",
        };
        self.finish(state, failure).await;
    }

    async fn finish(&self, state: &str, failure: Option<String>) {
        if let Err(e) = self.put(state, failure).await {
            tracing::warn!(error = %e, state, "recording the job's end in etcd");
        }
    }
}
