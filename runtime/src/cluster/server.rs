//! `lazarus supervisor`: one listening port for agents and clients. Agents
//! register and heartbeat; a host that stays silent past the timeout is
//! lost, and every job hears it. VIP leases are granted, renewed and taken
//! back here ([`crate::cluster::state`]). Jobs run as [`crate::supervisor`]
//! tasks on a cluster [`Fleet`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use lazarus_sdk::protocol;
use lazarus_storage::JobId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Agent and client connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 4096;

use crate::cluster::config::ClusterConfig;
use crate::cluster::fleet::ClusterFleet;
use crate::cluster::leader::{self, Leadership};
use crate::cluster::state::{Cluster, JobEntry};
use crate::cluster::transport::{Acceptor, BoxRead, BoxWrite, Dialer};
use crate::cluster::wire::{
    job_status_cell, AgentMsg, ClientReply, ClientRequest, HaWelcome, ProcRef, Submission,
    SupervisorMsg,
};
use crate::fleet::FleetEvent;
use crate::ha::HaOptions;
use crate::procs::WorkerExited;
use crate::security::{Identity, Role};
use crate::spec::JobSpec;
use crate::supervisor::{self, LocalRun, StopRequest};

/// `lazarus supervisor`'s settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Where agents, workers and clients connect.
    pub listen: SocketAddr,
    /// Default store of submitted jobs (a spec's `[store] url` wins).
    pub store: Option<String>,
    /// Heartbeats, leases, announcements.
    pub config: ClusterConfig,
    /// The supervisor's own state (nothing durable: checkpoints are in the
    /// store).
    pub state_dir: PathBuf,
    /// Mutual TLS, or plain TCP for test setups.
    pub acceptor: Acceptor,
    /// TLS for jobs' control ports (workers), on a TLS cluster.
    pub job_tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    /// High availability on etcd; `None`: a single supervisor.
    pub ha: Option<HaOptions>,
    /// How this supervisor reaches the leader when it follows (client
    /// requests are forwarded there).
    pub forward: Dialer,
}

/// Runs the supervisor until `stop` turns true. `ready` gets the bound
/// address.
pub async fn serve(
    opts: ServerOptions,
    mut stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    opts.config
        .validate()
        .map_err(|e| anyhow::anyhow!("supervisor config: {e}"))?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "supervisor listening");
    if let Some(r) = ready {
        let _ = r.send(bound);
    }
    if let Some(ha) = &opts.ha {
        ha.validate()
            .map_err(|e| anyhow::anyhow!("supervisor HA settings: {e}"))?;
    }
    let cluster = Cluster::new(opts.config);
    cluster.lock().agent_leases = opts.ha.is_some();
    // Every task of the supervisor: the heartbeat loop, one per connection,
    // one per job. Cancelling `cancel` ends the first two kinds; jobs are
    // stopped through their own stop signal so they release what they hold.
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    tracker.spawn(heartbeat_loop(cluster.clone(), cancel.clone()));
    let opts = std::sync::Arc::new(ServerOptions {
        listen: bound,
        ..opts
    });
    // With etcd: campaign, and run the jobs etcd lists while leading.
    let ha = opts.ha.as_ref().map(|ha| {
        Leadership::start(
            ha.clone(),
            cluster.clone(),
            opts.clone(),
            &tracker,
            cancel.clone(),
        )
    });
    let slots = std::sync::Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.context("connection limit closed")?,
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() { break } else { continue }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => {
                        backoff = Duration::from_millis(5);
                        a
                    }
                    Err(e) => {
                        // Out of descriptors, usually: back off, do not spin.
                        tracing::warn!(error = %e, ?backoff, "accept failed; backing off");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let (cluster, opts, conn_cancel) = (cluster.clone(), opts.clone(), cancel.clone());
                let jobs = tracker.clone();
                let ha = ha.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    tokio::select! {
                        r = connection(stream, peer, cluster, opts, jobs, ha) => {
                            if let Err(e) = r {
                                tracing::debug!(%peer, error = %e, "connection ended");
                            }
                        }
                        _ = conn_cancel.cancelled() => {}
                    }
                });
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    if opts.ha.is_some() {
        // HA: the jobs belong to the cluster, not to this supervisor. Let go
        // of them without a word to the agents (their workers and VIPs
        // stay), then resign (the campaign task deletes the leader key when
        // cancelled), so another supervisor adopts them at once.
        cluster.lock().step_down();
        tracing::info!("shutting down: jobs left running for the next leader");
    }
    // Stop every job; each kills its workers and releases its VIPs. Wait
    // for them (bounded: 10 s), so the agents hear it before we go.
    let tasks: Vec<_> = {
        let mut c = cluster.lock();
        c.jobs
            .values_mut()
            .filter_map(|j| {
                let _ = j.stop.send(StopRequest::Stop);
                j.task.take()
            })
            .collect()
    };
    let deadline = crate::clock::tokio_now() + Duration::from_secs(10);
    for t in tasks {
        let _ = tokio::time::timeout_at(deadline, t).await;
    }
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("supervisor tasks still running after 5 s at shutdown");
    }
    Ok(())
}

/// Sends heartbeats and declares silent hosts lost.
async fn heartbeat_loop(cluster: Cluster, cancel: CancellationToken) {
    let every = cluster.lock().config.heartbeat_interval;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let mut c = cluster.lock();
        for h in c.alive() {
            c.send(&h, SupervisorMsg::Heartbeat);
        }
        for h in c.overdue() {
            c.lose(&h, "missed heartbeats");
        }
        if crate::metrics::enabled() {
            crate::metrics::observe_cluster(&c.report());
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    cluster: Cluster,
    opts: std::sync::Arc<ServerOptions>,
    jobs: TaskTracker,
    ha: Option<Leadership>,
) -> anyhow::Result<()> {
    let (mut read, mut write, peer_cert) = match opts.acceptor.accept(stream, peer).await {
        Ok(c) => c,
        Err(e) => {
            // No certificate, another CA, expired, garbage, too slow: the
            // peer learns nothing and the cluster is unchanged.
            tracing::warn!(%peer, error = %e, "connection refused");
            return Ok(());
        }
    };
    let first: serde_json::Value =
        tokio::time::timeout(Duration::from_secs(10), protocol::read_control(&mut read))
            .await
            .context("no first message within 10 s")??
            .context("closed before the first message")?;
    let identity = peer_cert.as_ref().map(|p| p.identity.clone());
    let not_after = peer_cert.and_then(|p| p.not_after);
    if let Ok(AgentMsg::Register {
        name,
        state_dir,
        procs,
    }) = serde_json::from_value(first.clone())
    {
        // An agent registers only under the name its certificate carries.
        if let Some(id) = identity
            .as_ref()
            .filter(|id| !(id.role == Role::Agent && id.name == name))
        {
            let reason = format!(
                "certificate {id} may not register as agent {name:?} (needs an agent:{name} certificate)"
            );
            tracing::warn!(%peer, %id, agent = %name, "agent registration refused: {reason}");
            protocol::write_control(&mut write, &SupervisorMsg::Refused { reason }).await?;
            return Ok(());
        }
        // A follower sends agents to the leader.
        if let Some(Err(leader)) = ha.as_ref().map(Leadership::leading) {
            protocol::write_control(&mut write, &SupervisorMsg::NotLeader { leader }).await?;
            return Ok(());
        }
        let session = AgentSession {
            name,
            state_dir,
            addr: peer.ip(),
            not_after,
            procs,
            ha: opts.ha.as_ref().map(|h| HaWelcome {
                etcd: h.endpoints.clone(),
                prefix: h.prefix.clone(),
                lease_ms: vip_lease_ttl(&opts.config).as_millis() as u64,
                adopt_ms: h.adopt_timeout.as_millis() as u64,
            }),
        };
        return agent_session(session, read, write, cluster).await;
    }
    let reply = match serde_json::from_value::<ClientRequest>(first) {
        Ok(req) => match authorize(identity.as_ref(), &req) {
            Ok(()) => match &ha {
                Some(ha) => match ha.leading() {
                    Ok(term) => leader::client_request(req, term, &cluster, &opts, &jobs, ha).await,
                    // A follower forwards to the leader (or answers that
                    // there is none).
                    Err(leader) => leader::forward(req, leader, ha, &opts.forward).await,
                },
                None => client_request(req, &cluster, &opts, &jobs).await,
            },
            Err(message) => {
                tracing::warn!(%peer, "request refused: {message}");
                ClientReply::Error { message }
            }
        },
        Err(e) => ClientReply::Error {
            message: format!("unrecognised first message: {e}"),
        },
    };
    protocol::write_control(&mut write, &reply).await?;
    Ok(())
}

/// VIP leases in etcd (HA): the configured lease length in whole seconds,
/// at least etcd's minimum of 2 s.
fn vip_lease_ttl(c: &ClusterConfig) -> Duration {
    Duration::from_secs(c.lease.length.as_millis().div_ceil(1000).max(2) as u64)
}

/// A registered agent's session.
struct AgentSession {
    name: String,
    state_dir: PathBuf,
    addr: IpAddr,
    not_after: Option<i64>,
    /// Processes it runs (after a supervisor failover).
    procs: Vec<ProcRef>,
    /// HA: how it holds VIPs.
    ha: Option<HaWelcome>,
}

async fn agent_session(
    s: AgentSession,
    mut read: BoxRead,
    mut write: BoxWrite,
    cluster: Cluster,
) -> anyhow::Result<()> {
    let AgentSession {
        name,
        state_dir,
        addr,
        not_after,
        procs,
        ha,
    } = s;
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_whitespace() || c == '/') {
        let refused = SupervisorMsg::Refused {
            reason: format!("invalid agent name {name:?}: 1 to 64 characters, no spaces or '/'"),
        };
        protocol::write_control(&mut write, &refused).await?;
        return Ok(());
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<SupervisorMsg>();
    // The writer is part of this session's task: it ends with it.
    let writer = async move {
        while let Some(msg) = rx.recv().await {
            if protocol::write_control(&mut write, &msg).await.is_err() {
                break;
            }
        }
    };
    let conn = {
        let mut c = cluster.lock();
        // HA: VIP leases are renewed with etcd keep-alives, a quarter of
        // their TTL apart.
        let renew_ms = match &ha {
            Some(h) => h.lease_ms / 4,
            None => c.config.lease.renew_every.as_millis() as u64,
        };
        let is_ha = ha.is_some();
        let welcome = SupervisorMsg::Welcome {
            heartbeat_ms: c.config.heartbeat_interval.as_millis() as u64,
            lease_ms: c.config.lease.length.as_millis() as u64,
            renew_ms,
            ha,
        };
        let _ = tx.send(welcome);
        // Processes of jobs this supervisor does not run (stopped, or
        // ended, while no leader listened) are stopped; the jobs it runs
        // adopt theirs through rejoin tickets.
        let orphans: std::collections::BTreeSet<JobId> = procs
            .iter()
            .filter(|p| c.jobs.get(&p.job).is_none_or(|j| j.ended()))
            .map(|p| p.job.clone())
            .collect();
        for job in orphans {
            tracing::warn!(host = %name, %job, "stopping processes of a job not running here");
            let _ = tx.send(SupervisorMsg::KillAll {
                job,
                standbys: true,
            });
        }
        // An HA agent keeps VIPs across leaders: confirm the ones it should
        // hold and take back those moved while no leader reached it.
        if is_ha {
            for order in c.vip_orders(&name) {
                let _ = tx.send(order);
            }
        }
        let conn = c.register(&name, addr, state_dir, tx.clone());
        if let Some(h) = c.hosts.get_mut(&name) {
            h.cert_not_after = not_after;
        }
        conn
    };
    let reader = async {
        loop {
            let msg = match protocol::read_control::<_, AgentMsg>(&mut read).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(host = %name, error = %e, "bad message from agent; closing its session");
                    break;
                }
            };
            let mut c = cluster.lock();
            if !c.current(&name, conn) {
                // Declared lost (or replaced): this session is over.
                break;
            }
            c.heard(&name);
            let reply = match msg {
                AgentMsg::Heartbeat | AgentMsg::Register { .. } => None,
                AgentMsg::Exited {
                    job,
                    worker,
                    attempt,
                    standby,
                    exit,
                    detail,
                } => {
                    if let Some(j) = c.jobs.get(&job) {
                        let _ = j.events.send(FleetEvent::Exited(WorkerExited {
                            worker,
                            attempt,
                            standby,
                            host: name.clone(),
                            exit: exit.into(),
                            detail,
                        }));
                    }
                    None
                }
                AgentMsg::LeaseAcquire { vip, seq } => Some(c.lease_acquire(&name, &vip, seq)),
                AgentMsg::LeaseRenew { vip, id, seq } => Some(c.lease_renew(&name, &vip, id, seq)),
                AgentMsg::Refused { job, vip, reason } => {
                    tracing::warn!(host = %name, ?job, ?vip, %reason, "agent refused");
                    let owner = job.or_else(|| {
                        vip.as_ref().and_then(|v| {
                            c.jobs
                                .iter()
                                .find(|(_, j)| !j.ended() && j.vips.contains(v))
                                .map(|(id, _)| id.clone())
                        })
                    });
                    if let Some(j) = owner.as_ref().and_then(|j| c.jobs.get(j)) {
                        let _ = j.events.send(FleetEvent::Refused {
                            host: name.clone(),
                            reason,
                        });
                    }
                    None
                }
                AgentMsg::LeaseReleased { vip, id } => {
                    c.lease_released(&name, &vip, id);
                    None
                }
                AgentMsg::Health {
                    job,
                    worker,
                    up,
                    detail,
                } => {
                    tracing::info!(host = %name, %job, %worker, up, %detail, "standby health changed");
                    if let Some(j) = c.jobs.get(&job) {
                        let _ = j.events.send(FleetEvent::StandbyHealth {
                            worker,
                            host: name.clone(),
                            up,
                        });
                    }
                    None
                }
            };
            if let Some(r) = reply {
                let _ = tx.send(r);
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    // The connection closed: the host is gone for its jobs now, not after
    // the heartbeat timeout. Its VIP lease still runs out on its own clock.
    let mut c = cluster.lock();
    if c.current(&name, conn) {
        c.lose(&name, "connection closed");
    }
    Ok(())
}

/// What each role may ask (no identity: a plain port, everything).
fn authorize(identity: Option<&Identity>, req: &ClientRequest) -> Result<(), String> {
    let Some(id) = identity else {
        return Ok(());
    };
    let (allowed, what, needs): (&[Role], &str, &str) = match req {
        ClientRequest::Status => (
            &[Role::Viewer, Role::Operator, Role::Supervisor],
            "read the status",
            "viewer or operator",
        ),
        ClientRequest::Submit { .. } => (
            &[Role::Operator, Role::Supervisor],
            "submit jobs",
            "operator",
        ),
        ClientRequest::Stop { .. } => {
            (&[Role::Operator, Role::Supervisor], "stop jobs", "operator")
        }
        ClientRequest::Savepoint { .. } => (
            &[Role::Operator, Role::Supervisor],
            "take savepoints",
            "operator",
        ),
        ClientRequest::Rescale { .. } => (
            &[Role::Operator, Role::Supervisor],
            "rescale jobs",
            "operator",
        ),
        ClientRequest::Move { .. } => (
            &[Role::Operator, Role::Supervisor],
            "move workers",
            "operator",
        ),
    };
    if allowed.contains(&id.role) {
        Ok(())
    } else {
        Err(format!(
            "certificate {id} may not {what} (needs the {needs} role)"
        ))
    }
}

async fn client_request(
    req: ClientRequest,
    cluster: &Cluster,
    opts: &ServerOptions,
    jobs: &TaskTracker,
) -> ClientReply {
    let reply = |r: anyhow::Result<String>| match r {
        Ok(message) => ClientReply::Ok { message },
        Err(e) => ClientReply::Error {
            message: format!("{e:#}"),
        },
    };
    match req {
        ClientRequest::Status => ClientReply::Status(Box::new(cluster.lock().report())),
        ClientRequest::Stop { job } => signal_stop(cluster, &job),
        ClientRequest::Submit {
            spec,
            origin,
            dir,
            set,
            parallelism,
            vips,
            from,
        } => {
            let sub = Submission {
                spec,
                origin,
                dir,
                set,
                parallelism,
                vips,
            };
            reply(submit(sub, from, cluster, opts, jobs))
        }
        ClientRequest::Savepoint { job, name, stop } => {
            reply(crate::cluster::savepoint::take(cluster, &job, name, stop).await)
        }
        ClientRequest::Move { job, worker, host } => {
            reply(request_move(cluster, opts, &job, &worker, &host))
        }
        ClientRequest::Rescale {
            job,
            operator,
            parallelism,
            vips,
        } => reply(
            crate::cluster::savepoint::rescale(
                cluster,
                opts,
                jobs,
                &job,
                &operator,
                parallelism,
                &vips,
            )
            .await,
        ),
    }
}

/// Asks job `job` to move `worker`'s primary to `host`, after checking
/// that both exist (the job moves it if it is running then).
pub(crate) fn request_move(
    cluster: &Cluster,
    opts: &ServerOptions,
    job: &JobId,
    worker: &str,
    host: &str,
) -> anyhow::Result<String> {
    let c = cluster.lock();
    let entry = c.jobs.get(job).with_context(|| format!("no job {job}"))?;
    if entry.ended() {
        anyhow::bail!("job {job} is not running");
    }
    let sub = entry
        .submission
        .as_ref()
        .map(|s| s.0.clone())
        .with_context(|| format!("job {job} has no submission on record"))?;
    let plan = prepare(sub, opts)?.spec.plan();
    let Some(w) = plan.iter().find(|w| w.id.as_str() == worker) else {
        let names: Vec<&str> = plan.iter().map(|w| w.id.as_str()).collect();
        anyhow::bail!(
            "job {job} has no worker {worker:?} (workers: {})",
            names.join(", ")
        );
    };
    if !w.hosts.is_empty() && !w.hosts.iter().any(|h| h == host) {
        anyhow::bail!("{worker} may run only on {}", w.hosts.join(", "));
    }
    if !c.alive().iter().any(|h| h == host) {
        anyhow::bail!("host {host} is not a live agent of this cluster");
    }
    entry
        .events
        .send(FleetEvent::Move {
            worker: w.id.clone(),
            host: host.to_string(),
        })
        .map_err(|_| anyhow::anyhow!("job {job} is ending"))?;
    Ok(format!(
        "moving {worker} of job {job} to {host} (restored from the last committed checkpoint)"
    ))
}

/// Tells job `job`'s task to stop.
pub(crate) fn signal_stop(cluster: &Cluster, job: &JobId) -> ClientReply {
    match cluster.lock().jobs.get(job) {
        Some(j) => {
            let _ = j.stop.send(StopRequest::Stop);
            ClientReply::Ok {
                message: format!("stopping job {job}"),
            }
        }
        None => ClientReply::Error {
            message: format!("no job {job}"),
        },
    }
}

fn submit(
    sub: Submission,
    from: Option<String>,
    cluster: &Cluster,
    opts: &ServerOptions,
    jobs: &TaskTracker,
) -> anyhow::Result<String> {
    let mut job = prepare(sub, opts)?;
    job.from = from;
    let id = job.spec.job_id();
    start_job(job, cluster, opts, jobs, None)?;
    Ok(format!("job {id} submitted"))
}

/// A validated job, ready to start.
pub(crate) struct Prepared {
    pub spec: JobSpec,
    pub store_url: String,
    pub binary: PathBuf,
    /// What was submitted (kept to rescale the job).
    pub submission: Submission,
    /// Where its first run starts (`--from`); `None`: the newest committed
    /// checkpoint.
    pub from: Option<String>,
}

/// Parses and validates a submitted spec.
pub(crate) fn prepare(sub: Submission, opts: &ServerOptions) -> anyhow::Result<Prepared> {
    let mut spec = JobSpec::parse(&sub.spec, &sub.origin, sub.dir.clone())?;
    spec.set_params(&sub.set)?;
    spec.set_parallelism(&sub.parallelism)?;
    spec.set_vips(&sub.vips)?;
    spec.validate()?;
    let binary = spec.resolve_worker()?;
    let store_url = spec
        .store
        .url
        .clone()
        .or_else(|| opts.store.clone())
        .context(
        "the job has no store: set [store] url in the spec or start the supervisor with --store",
    )?;
    Ok(Prepared {
        spec,
        store_url,
        binary,
        submission: sub,
        from: None,
    })
}

/// Refuses a job already running, or one whose VIPs a running job serves.
pub(crate) fn check_conflicts(
    c: &crate::cluster::state::ClusterState,
    spec: &JobSpec,
) -> anyhow::Result<Vec<String>> {
    let job = spec.job_id();
    if c.jobs.get(&job).is_some_and(|j| !j.ended()) {
        anyhow::bail!("job {job} is already running");
    }
    let vips: Vec<String> = spec.plan().into_iter().flat_map(|w| w.vips).collect();
    let addr = |v: &str| v.split('/').next().unwrap_or(v).to_string();
    for (other, j) in c.jobs.iter().filter(|(_, j)| !j.ended()) {
        if let Some(v) = vips
            .iter()
            .find(|v| j.vips.iter().any(|o| addr(o) == addr(v)))
        {
            anyhow::bail!("VIP {v} is already served by running job {other}");
        }
    }
    Ok(vips)
}

/// Starts `job` as a task on `jobs`. With `ha` (a leader's store and
/// term), its store epoch is at least the term's floor, and its record in
/// etcd follows its checkpoints and gets its final state.
pub(crate) fn start_job(
    job: Prepared,
    cluster: &Cluster,
    opts: &ServerOptions,
    jobs: &TaskTracker,
    ha: Option<leader::JobSync>,
) -> anyhow::Result<()> {
    let Prepared {
        spec,
        store_url,
        binary,
        submission,
        from,
    } = job;
    let job = spec.job_id();
    let mut c = cluster.lock();
    let vips = check_conflicts(&c, &spec)?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(StopRequest::Run);
    let status = job_status_cell(&job, lazarus_storage::Epoch(0));
    c.jobs.insert(
        job.clone(),
        JobEntry {
            events: events_tx,
            status: status.clone(),
            stop: stop_tx,
            vips,
            submission: Some(std::sync::Arc::new((submission, store_url.clone()))),
            task: None,
        },
    );
    let run = LocalRun {
        spec,
        store_url,
        worker_binary: binary.clone(),
        state_dir: opts.state_dir.join(job.as_str()),
        chaos: None,
        status_every: None,
        final_checkpoint_on_stop: false,
        epoch_floor: ha.as_ref().map_or(0, leader::JobSync::epoch_floor),
        adopt_timeout: opts.ha.as_ref().map(|h| h.adopt_timeout),
        from,
    };
    let services = run
        .spec
        .plan()
        .iter()
        .map(|w| {
            let s = crate::cluster::wire::SpawnService::for_worker(w, run.spec.notify.as_ref());
            (w.id.clone(), s)
        })
        .collect();
    let fleet = Box::new(ClusterFleet::new(
        job.clone(),
        cluster.clone(),
        binary,
        services,
    ));
    let control_ip = opts.listen.ip();
    let job_tls = opts.job_tls.clone();
    let j = job.clone();
    let task = jobs.spawn(async move {
        let job_ha = ha.as_ref().map(leader::JobSync::job_ha);
        let running = supervisor::run_job(
            run,
            fleet,
            events_rx,
            supervisor::ControlPort {
                ip: control_ip,
                tls: job_tls,
            },
            status.clone(),
            stop_rx,
            job_ha,
        );
        let result = match &ha {
            Some(sync) => sync.follow(running, &status).await,
            None => running.await,
        };
        match result {
            Ok(summary) => {
                tracing::info!(job = %j, state = ?summary.state, committed = summary.committed, restarts = summary.restarts, "job ended")
            }
            Err(e) => tracing::error!(job = %j, error = %format!("{e:#}"), "job failed"),
        }
        if let Some(sync) = &ha {
            sync.ended(&status).await;
        }
    });
    if let Some(entry) = c.jobs.get_mut(&job) {
        entry.task = Some(task);
    }
    Ok(())
}
