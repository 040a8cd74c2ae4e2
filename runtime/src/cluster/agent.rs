//! `lazarus agent`: one per host. It registers with the supervisor, runs
//! the worker processes it is told to (one [`ProcessTable`] per job), reports their
//! exits at once, and holds VIPs on its interface only under a lease.
//!
//! Each VIP is a pure [`VipHolder`]; this shell carries out what it decides
//! (lease requests, netlink add/remove) and owns each VIP's announcement
//! burst task, aborting it the moment the VIP is released or its lease runs
//! out, so no gratuitous ARP for a VIP leaves a host that gave it up.
//!
//! Self-fencing, by the agent's own clock:
//! - a VIP whose lease is not renewed by its expiry is removed at that
//!   moment, and the agent's primaries are stopped;
//! - a supervisor that stays silent for one lease length ends the session:
//!   every worker process is killed and every VIP removed, then the agent
//!   registers again.
//!
//! On an HA cluster (the welcome says so) the VIP leases are the agent's
//! own, in etcd ([`crate::cluster::etcd_vips`]), and a lost session is not
//! a reason to fence: workers keep running and VIPs stay held while their
//! etcd lease lives, and the agent registers with the next leader, reporting
//! its processes; the leader adopts them (rejoin tickets) or stops them.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use lazarus_sdk::protocol;
use lazarus_storage::{JobId, LocalCache, WorkerId};
use tokio::sync::{mpsc, watch};

use crate::clock::{Clock, SystemClock};
use crate::cluster::allow::AllowList;
use crate::cluster::etcd_vips::EtcdVips;
use crate::cluster::transport::{BoxRead, BoxWrite, Dialer};
use crate::cluster::vip_holder::{HolderAction, VipHolder};
use crate::cluster::wire::SpawnService;
use crate::cluster::wire::{AgentMsg, HaWelcome, ProcRef, SupervisorMsg, WireExit};
use crate::lease::LeaseId;
use crate::procs::{ExitKind, ProcessTable, Slot, WorkerExited};
use crate::service::health::HealthChange;
use crate::service::notify::{Notifier, NotifyEvent, NotifyState};
use crate::service::spec::{HealthKind, NotifySpec};
use crate::vip::{parse_vip, Announcement, Vip};

/// How long a supervisor may take to answer an agent's registration.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(5);

/// `lazarus agent`'s settings.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// This host's name.
    pub name: String,
    /// The supervisors' addresses: one, or every supervisor of an HA
    /// cluster (a follower sends the agent to the leader).
    pub supervisors: Vec<SocketAddr>,
    /// The interface VIPs go on.
    pub iface: String,
    /// Worker logs and local caches.
    pub state_dir: PathBuf,
    /// Address workers listen on for data channels (default: this host's
    /// address toward the supervisor).
    pub bind_ip: Option<IpAddr>,
    /// Mutual TLS to the supervisor, or plain TCP for test setups.
    pub dialer: Dialer,
    /// What this agent agrees to run and hold.
    pub allow: AllowList,
    /// The cluster CA (on a TLS cluster): workers connect to their job's
    /// port over TLS and check the supervisor against it.
    pub ca_file: Option<PathBuf>,
    /// This host's own notify hooks, run for every job's processes here
    /// (after the job's own).
    pub notify: Option<NotifySpec>,
}

/// `lazarus agent --config FILE`: every field optional, unknown fields are
/// errors naming the field; command-line flags win.
///
/// ```toml
/// state_dir = "/var/lib/lazarus"   # worker logs and local caches
/// bind_ip = "198.18.0.2"           # data channels of this host's workers
/// allowed_binaries = ["/opt/lazarus/bin"]          # workers only from here
/// allowed_vips = ["198.18.0.0/15", "2001:2::/48"]  # VIPs only within these
///
/// [notify]                         # hooks for every job's processes here
/// primary = ["/usr/local/bin/lazarus-notify"]
/// fault = ["/usr/local/bin/lazarus-notify"]
/// timeout = "5s"
/// ```
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Worker logs and local caches.
    pub state_dir: Option<PathBuf>,
    /// Address workers listen on for data channels.
    pub bind_ip: Option<IpAddr>,
    /// Directories worker binaries must be in (unset: any binary).
    pub allowed_binaries: Option<Vec<PathBuf>>,
    /// Prefixes VIPs must be within, like "198.18.0.0/15" (unset: any).
    pub allowed_vips: Option<Vec<String>>,
    /// Notify hooks for every job's processes on this host.
    pub notify: Option<NotifySpec>,
    /// Serve Prometheus metrics here (`ADDR:PORT`).
    pub metrics: Option<SocketAddr>,
}

impl AgentConfig {
    /// The allow-lists; errors name the entry.
    pub fn allow_list(&self) -> Result<AllowList, String> {
        let vips = match &self.allowed_vips {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|s| crate::cluster::allow::parse_prefix(s))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(AllowList {
            binaries: self.allowed_binaries.clone(),
            vips,
        })
    }
}

impl AgentConfig {
    /// Reads `path`; errors name the file and the field.
    pub fn from_file(path: &std::path::Path) -> Result<AgentConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A follower's answer to a registration: register with the leader.
#[derive(Debug, thiserror::Error)]
#[error("this supervisor does not lead (leader: {0:?})")]
struct NotLeader(Option<SocketAddr>);

/// One VIP this agent was asked to hold.
struct HeldVip {
    vip: Vip,
    holder: VipHolder,
    /// The running announcement burst; dropping it aborts the burst.
    announce: Option<AbortOnDrop>,
    /// The burst prepared (interface and frames), so its first frame
    /// leaves right after the address is added.
    prepared: Option<Announcement>,
}

struct AgentState {
    opts: AgentOptions,
    clock: SystemClock,
    jobs: BTreeMap<JobId, ProcessTable>,
    exits_tx: mpsc::UnboundedSender<(JobId, WorkerExited)>,
    exits_rx: mpsc::UnboundedReceiver<(JobId, WorkerExited)>,
    vips: BTreeMap<String, HeldVip>,
    seq: u64,
    /// The supervisor of the current (or last) session.
    supervisor: SocketAddr,
    /// HA cluster: VIP leases in etcd, workers kept across sessions.
    ha: Option<EtcdVips>,
    /// How long workers and VIPs are kept without any leader (HA).
    adopt_window: Duration,
    /// Since when no leader has had this agent registered (HA).
    detached_since: Option<Duration>,
    /// Lease answers from etcd.
    lease_tx: mpsc::UnboundedSender<SupervisorMsg>,
    lease_rx: mpsc::UnboundedReceiver<SupervisorMsg>,
    /// Background work: announcement bursts and cache pruning.
    tasks: tokio_util::task::TaskTracker,
    /// Around each worker: program, health check, hooks, VIPs.
    services: BTreeMap<(JobId, WorkerId), SpawnService>,
    /// Running health checks, by process.
    checks: BTreeMap<(JobId, WorkerId, Slot), Check>,
    health_tx: mpsc::UnboundedSender<(JobId, WorkerId, u64, HealthChange)>,
    health_rx: mpsc::UnboundedReceiver<(JobId, WorkerId, u64, HealthChange)>,
    /// Why a process is being stopped (by request, or its failed check):
    /// its exit is reported with this.
    stopping: BTreeMap<(JobId, WorkerId, Slot), Stopping>,
    /// Hot standbys here that their health check says are down (told again
    /// to every new supervisor session: a new leader starts knowing none).
    standbys_down: BTreeMap<(JobId, WorkerId), String>,
    notifier: Notifier,
}

/// Why the agent ended a process.
#[derive(Debug, Clone)]
enum Stopping {
    /// Asked to (the job stops or moves): `stopped` hooks.
    Requested(String),
    /// Its health check failed: a fault, with this reason.
    Unhealthy(String),
}

/// Runs the agent until `stop` turns true.
pub async fn run_agent(opts: AgentOptions, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating state directory {}", opts.state_dir.display()))?;
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    let (lease_tx, lease_rx) = mpsc::unbounded_channel();
    let (health_tx, health_rx) = mpsc::unbounded_channel();
    let tasks = tokio_util::task::TaskTracker::new();
    let notifier = Notifier::start(&tasks);
    let mut st = AgentState {
        opts,
        clock: SystemClock::default(),
        jobs: BTreeMap::new(),
        exits_tx,
        exits_rx,
        vips: BTreeMap::new(),
        seq: 0,
        supervisor: SocketAddr::from(([0, 0, 0, 0], 0)),
        ha: None,
        adopt_window: Duration::from_secs(10),
        detached_since: None,
        lease_tx,
        lease_rx,
        tasks,
        services: BTreeMap::new(),
        checks: BTreeMap::new(),
        health_tx,
        health_rx,
        stopping: BTreeMap::new(),
        standbys_down: BTreeMap::new(),
        notifier,
    };
    anyhow::ensure!(
        !st.opts.supervisors.is_empty(),
        "the agent needs at least one supervisor address"
    );
    let mut next = 0usize;
    let mut redirect: Option<SocketAddr> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        // A follower's redirect first, then the list in turn.
        let addr = redirect.take().unwrap_or_else(|| {
            let a = st.opts.supervisors[next % st.opts.supervisors.len()];
            next += 1;
            a
        });
        st.supervisor = addr;
        let dialer = st.opts.dialer.clone();
        let dial = dialer.dial(addr, Duration::from_secs(1));
        let Some(dialed) = st.renewing(dial, &mut stop).await else {
            continue;
        };
        match dialed {
            Ok((read, write, local)) => {
                match st.session(read, write, local.ip(), &mut stop).await {
                    Ok(()) => {
                        st.fence("stopping").await;
                        break;
                    }
                    Err(e) => match e.downcast::<NotLeader>() {
                        Ok(NotLeader(leader)) => {
                            tracing::info!(%addr, ?leader, "not the leader; trying the leader");
                            redirect = leader;
                            if redirect.is_some() {
                                // Paced: two followers with stale views
                                // cannot make this spin.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%addr, error = %format!("{e:#}"), "session with the supervisor ended")
                        }
                    },
                }
            }
            Err(e) => tracing::warn!(%addr, error = %e, "cannot reach the supervisor"),
        }
        // The next try goes to another supervisor than the one that just
        // failed: a follower may still name a hung leader as the leader.
        let count = st.opts.supervisors.len();
        if count > 1 && st.opts.supervisors[next % count] == addr {
            next += 1;
        }
        if st.ha.is_some() {
            // HA: the workers go on and the VIPs stay (etcd leases) while a
            // new leader can still adopt them; look for it.
            let since = *st.detached_since.get_or_insert(st.now());
            if st.now().saturating_sub(since) > st.adopt_window {
                st.fence("no leader adopted this host's workers in time")
                    .await;
            }
            // Every supervisor in turn, 50 ms apart: a new leader is
            // found within a round.
            st.detached(Duration::from_millis(50), &mut stop).await;
        } else {
            st.fence("no session with the supervisor").await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.changed() => {}
            }
        }
    }
    // Bursts were aborted with their VIPs; cache pruning finishes (bounded).
    st.tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), st.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("agent tasks still running after 5 s at shutdown");
    }
    Ok(())
}

impl AgentState {
    fn now(&self) -> Duration {
        self.clock.now()
    }

    /// The cluster has supervisors under etcd: VIP leases from etcd from now
    /// on, and rejoin tickets for every worker started.
    fn become_ha(&mut self, cfg: HaWelcome) {
        if self.ha.is_some() {
            return;
        }
        tracing::info!(etcd = ?cfg.etcd, "HA cluster: VIP leases in etcd, workers kept across supervisor failovers");
        self.adopt_window = Duration::from_millis(cfg.adopt_ms.max(1000));
        self.ha = Some(EtcdVips::start(
            cfg,
            self.opts.name.clone(),
            self.lease_tx.clone(),
            &self.tasks,
        ));
        let wait = self.rejoin_wait();
        for (job, t) in self.jobs.iter_mut() {
            if let Err(e) = t.enable_rejoin() {
                tracing::error!(%job, error = %e, "cannot prepare rejoin tickets");
            }
            t.set_env("LAZARUS_REJOIN_TIMEOUT_MS", &wait);
        }
    }

    /// How long a worker waits for a new leader: a little longer than the
    /// agent keeps it (the agent decides).
    fn rejoin_wait(&self) -> String {
        (self.adopt_window + Duration::from_secs(5))
            .as_millis()
            .to_string()
    }

    /// Awaits `f`. On an HA cluster the VIP leases go on being renewed
    /// (or run out, by this host's clock) meanwhile: a supervisor that is
    /// slow to answer must not hold up the self-fencing. `None` if `stop`
    /// was set.
    async fn renewing<F: std::future::Future>(
        &mut self,
        f: F,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<F::Output> {
        if self.ha.is_none() {
            return Some(f.await);
        }
        tokio::pin!(f);
        loop {
            tokio::select! {
                r = &mut f => return Some(r),
                _ = self.detached(Duration::from_millis(50), stop) => {
                    if *stop.borrow() {
                        return None;
                    }
                }
            }
        }
    }

    /// Between sessions on an HA cluster (for `span`, or until `stop`):
    /// VIP leases renewed through etcd, exits reaped (the next leader sees
    /// them missing from the report).
    async fn detached(&mut self, span: Duration, stop: &mut watch::Receiver<bool>) {
        let (out, _drop) = mpsc::unbounded_channel::<AgentMsg>();
        let until = tokio::time::sleep(span);
        tokio::pin!(until);
        let mut check = tokio::time::interval(Duration::from_millis(2));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let local = SocketAddr::from(([0, 0, 0, 0], 0)).ip();
        loop {
            tokio::select! {
                _ = &mut until => return,
                Some(msg) = self.lease_rx.recv() => self.handle(msg, local, Duration::from_millis(250), &out).await,
                Some((job, e)) = self.exits_rx.recv() => {
                    tracing::warn!(%job, worker = %e.worker, "worker exited while no supervisor listens");
                    self.exited(&job, e);
                }
                Some((job, worker, id, change)) = self.health_rx.recv() => self.health(job, worker, id, change, None),
                _ = check.tick() => self.leases(&out).await,
                _ = stop.changed() => return,
            }
        }
    }

    /// The worker processes this agent runs, for a new leader.
    fn report(&self) -> Vec<ProcRef> {
        self.jobs
            .iter()
            .flat_map(|(job, t)| {
                t.processes()
                    .into_iter()
                    .map(|(worker, slot, attempt)| ProcRef {
                        job: job.clone(),
                        worker,
                        attempt,
                        standby: slot == Slot::Standby,
                    })
            })
            .collect()
    }

    /// Kills every worker and removes every VIP (no session: nothing to
    /// confirm to).
    async fn fence(&mut self, why: &str) {
        let mut any = false;
        let jobs: Vec<JobId> = self.jobs.keys().cloned().collect();
        for job in jobs {
            self.kill_job(&job, true, why);
        }
        for agent in self.jobs.values_mut() {
            any |= !agent.running().is_empty();
        }
        let names: Vec<String> = self.vips.keys().cloned().collect();
        for name in names {
            let Some(v) = self.vips.get_mut(&name) else {
                continue;
            };
            any |= v.holder.on_iface();
            let actions = v.holder.release();
            self.carry_out(&name, actions, None).await;
        }
        self.vips.clear();
        if let Some(ha) = &self.ha {
            ha.flush(Duration::from_secs(1)).await;
        }
        if any {
            tracing::warn!(why, "fenced: workers stopped, VIPs removed");
        }
    }

    /// Carries out a VIP holder's actions; `out` is the session (None when
    /// there is none: lease messages are dropped).
    async fn carry_out(
        &mut self,
        name: &str,
        actions: Vec<HolderAction>,
        out: Option<&mpsc::UnboundedSender<AgentMsg>>,
    ) {
        let mut queue: std::collections::VecDeque<HolderAction> = actions.into();
        while let Some(a) = queue.pop_front() {
            let now = self.now();
            let Some(v) = self.vips.get_mut(name) else {
                return;
            };
            let send = |m: AgentMsg| {
                if let Some(out) = out {
                    let _ = out.send(m);
                }
            };
            match (a, &self.ha) {
                // HA: the lease authority is etcd.
                (HolderAction::Acquire { seq }, Some(ha)) => ha.acquire(name, seq),
                (HolderAction::Renew { seq, .. }, Some(ha)) => ha.renew(name, seq),
                (HolderAction::Released { .. }, Some(ha)) => ha.release(name),
                (HolderAction::Acquire { seq }, None) => send(AgentMsg::LeaseAcquire {
                    vip: name.to_string(),
                    seq,
                }),
                (HolderAction::Renew { id, seq }, None) => send(AgentMsg::LeaseRenew {
                    vip: name.to_string(),
                    id: id.0,
                    seq,
                }),
                (HolderAction::Released { id }, None) => send(AgentMsg::LeaseReleased {
                    vip: name.to_string(),
                    id: id.0,
                }),
                (HolderAction::AddAddress, _) => {
                    let ok = match v.vip.add().await {
                        Ok(()) => {
                            tracing::info!(vip = %name, lease = ?v.holder.lease(), "VIP held");
                            metrics::gauge!(crate::metrics::VIP_HELD, "vip" => name.to_string())
                                .set(1.0);
                            true
                        }
                        Err(e) => {
                            tracing::error!(vip = %name, error = %e, "adding the VIP failed; giving the lease back");
                            false
                        }
                    };
                    queue.extend(v.holder.added(now, ok));
                }
                (HolderAction::RemoveAddress, _) => {
                    metrics::gauge!(crate::metrics::VIP_HELD, "vip" => name.to_string()).set(0.0);
                    if let Err(e) = v.vip.release().await {
                        tracing::error!(vip = %name, error = %e, "removing the VIP failed");
                    }
                }
                (HolderAction::StartAnnounce, _) => {
                    // Replacing the handle aborts a burst still running.
                    v.announce = None;
                    // The first frames leave now; the burst's rest in a task.
                    // A prepared one that fails (the interface changed)
                    // is prepared again.
                    let started = match v.prepared.clone() {
                        Some(p) => p
                            .start()
                            .or_else(|_| v.vip.prepare().and_then(Announcement::start)),
                        None => v.vip.prepare().and_then(Announcement::start),
                    };
                    match started {
                        Ok(rest) => {
                            v.announce = Some(AbortOnDrop(self.tasks.spawn(async move {
                                if let Err(e) = rest.await {
                                    tracing::error!(error = %e, "VIP announcement failed");
                                }
                            })));
                        }
                        Err(e) => {
                            tracing::error!(vip = %name, error = %e, "VIP announcement failed")
                        }
                    }
                }
                (HolderAction::StopAnnounce, _) => {
                    v.announce = None;
                }
                (HolderAction::StopPrimaries, _) => {
                    tracing::warn!(vip = %name, "VIP lease expired without renewal: VIP removed, primaries stopped");
                    let jobs: Vec<JobId> = self.jobs.keys().cloned().collect();
                    for job in jobs {
                        self.kill_job(&job, false, "the VIP lease expired without renewal");
                    }
                }
            }
        }
    }

    async fn session(
        &mut self,
        mut read: BoxRead,
        mut write: BoxWrite,
        local_ip: IpAddr,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let (out, mut out_rx) = mpsc::unbounded_channel::<AgentMsg>();
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if protocol::write_control(&mut write, &msg).await.is_err() {
                    break;
                }
            }
        });
        let mut writer = AbortOnDrop(writer);
        out.send(AgentMsg::Register {
            name: self.opts.name.clone(),
            state_dir: self.opts.state_dir.clone(),
            procs: self.report(),
        })?;
        let registration = tokio::time::timeout(
            REGISTRATION_TIMEOUT,
            protocol::read_control::<_, SupervisorMsg>(&mut read),
        );
        // A leader whose etcd lost quorum can take its time to answer.
        let Some(answer) = self.renewing(registration, stop).await else {
            return Ok(());
        };
        let welcome = answer.with_context(|| {
            format!("no answer to registration within {REGISTRATION_TIMEOUT:?}")
        })??;
        let (heartbeat, lease, renew) = match welcome {
            Some(SupervisorMsg::Welcome {
                heartbeat_ms,
                lease_ms,
                renew_ms,
                ha,
            }) => {
                if let Some(ha) = ha {
                    self.become_ha(ha);
                }
                self.detached_since = None;
                (
                    Duration::from_millis(heartbeat_ms.max(1)),
                    Duration::from_millis(lease_ms.max(1)),
                    Duration::from_millis(renew_ms.max(1)),
                )
            }
            Some(SupervisorMsg::Refused { reason }) => {
                anyhow::bail!("registration refused: {reason}")
            }
            Some(SupervisorMsg::NotLeader { leader }) => return Err(NotLeader(leader).into()),
            other => anyhow::bail!("expected a welcome, got {other:?}"),
        };
        tracing::info!(name = %self.opts.name, supervisor = %self.supervisor, %local_ip, ?lease, "registered");
        for ((job, worker), detail) in &self.standbys_down {
            out.send(AgentMsg::Health {
                job: job.clone(),
                worker: worker.clone(),
                up: false,
                detail: detail.clone(),
            })?;
        }
        let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Result<SupervisorMsg, String>>();
        let reader = tokio::spawn(async move {
            loop {
                let msg = match protocol::read_control::<_, SupervisorMsg>(&mut read).await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err("the supervisor closed the connection".to_string()),
                    Err(e) => Err(format!("bad message from the supervisor: {e}")),
                };
                let end = msg.is_err();
                if in_tx.send(msg).is_err() || end {
                    break;
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        let mut last_heard = self.now();
        let mut hb = tokio::time::interval(heartbeat);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Lease checks run often: a VIP must go at its expiry, not later.
        let mut check = tokio::time::interval(
            Duration::from_millis(2)
                .min(renew / 4)
                .max(Duration::from_millis(1)),
        );
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = in_rx.recv() => {
                    let msg = msg.unwrap_or_else(|| Err("reader ended".into())).map_err(|e| anyhow::anyhow!(e))?;
                    last_heard = self.now();
                    self.handle(msg, local_ip, renew, &out).await;
                }
                Some(msg) = self.lease_rx.recv() => self.handle(msg, local_ip, renew, &out).await,
                Some((job, worker, id, change)) = self.health_rx.recv() => self.health(job, worker, id, change, Some(&out)),
                Some((job, mut e)) = self.exits_rx.recv() => {
                    e = self.exited(&job, e);
                    out.send(AgentMsg::Exited {
                        job,
                        worker: e.worker,
                        attempt: e.attempt,
                        standby: e.standby,
                        exit: WireExit::from(&e.exit),
                        detail: e.detail,
                    })?;
                }
                _ = hb.tick() => out.send(AgentMsg::Heartbeat)?,
                _ = check.tick() => {
                    metrics::gauge!(crate::metrics::SUPERVISOR_HEARTBEAT_AGE).set(self.now().saturating_sub(last_heard).as_secs_f64());
                    if self.now().saturating_sub(last_heard) > lease {
                        anyhow::bail!("the supervisor was silent for {lease:?} (one lease)");
                    }
                    self.leases(&out).await;
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        // A clean shutdown gives every VIP back with a
                        // confirmed release, so the next holder need not
                        // wait for the lease to run out.
                        let names: Vec<String> = self.vips.keys().cloned().collect();
                        for name in names {
                            self.let_go(&name, &out).await;
                        }
                        drop(out);
                        let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer.0).await;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Renewals, retries, refreshes and expiry of held VIPs.
    async fn leases(&mut self, out: &mpsc::UnboundedSender<AgentMsg>) {
        let now = self.now();
        let names: Vec<String> = self.vips.keys().cloned().collect();
        for name in names {
            let Some(v) = self.vips.get_mut(&name) else {
                continue;
            };
            let actions = v.holder.tick(now, &mut self.seq);
            self.carry_out(&name, actions, Some(out)).await;
        }
    }

    async fn handle(
        &mut self,
        msg: SupervisorMsg,
        local_ip: IpAddr,
        renew: Duration,
        out: &mpsc::UnboundedSender<AgentMsg>,
    ) {
        let now = self.now();
        match msg {
            SupervisorMsg::Welcome { .. }
            | SupervisorMsg::Heartbeat
            | SupervisorMsg::NotLeader { .. } => {}
            SupervisorMsg::Refused { reason } => tracing::warn!(reason, "supervisor refused"),
            SupervisorMsg::Spawn {
                job,
                worker,
                attempt,
                standby,
                binary,
                supervisor,
                token,
                service,
            } => {
                let supervisor = if supervisor.ip().is_unspecified() {
                    SocketAddr::new(self.supervisor.ip(), supervisor.port())
                } else {
                    supervisor
                };
                let service = service.map(|s| *s).unwrap_or_default();
                // A `process` operator's program is what runs here (the
                // worker around it is this binary), and so are an exec
                // check and the job's hooks: each must be allowed.
                let mut run_here: Vec<std::path::PathBuf> =
                    vec![service.program.clone().unwrap_or_else(|| binary.clone())];
                if let Some(h) = service
                    .health
                    .as_ref()
                    .filter(|h| h.kind == HealthKind::Exec)
                {
                    run_here.extend(h.command.first().map(std::path::PathBuf::from));
                }
                if let Some(n) = &service.notify {
                    for argv in [&n.primary, &n.standby, &n.fault, &n.stopped] {
                        run_here.extend(argv.first().map(std::path::PathBuf::from));
                    }
                }
                let allowed = run_here
                    .iter()
                    .try_for_each(|p| self.opts.allow.check_binary(p));
                if let Err(reason) = allowed {
                    tracing::warn!(%job, %worker, %reason, "spawn refused");
                    let _ = out.send(AgentMsg::Refused {
                        job: Some(job.clone()),
                        vip: None,
                        reason: reason.clone(),
                    });
                    // The process the supervisor counts on never started.
                    let _ = out.send(AgentMsg::Exited {
                        job,
                        worker,
                        attempt,
                        standby,
                        exit: WireExit::SpawnFailed { error: reason },
                        detail: None,
                    });
                    return;
                }
                let Some(agent) = self.job_agent(&job, &binary, local_ip) else {
                    return;
                };
                let slot = if standby {
                    Slot::Standby
                } else {
                    Slot::Primary
                };
                if service.program.is_some() {
                    agent.set_program_worker(&worker);
                }
                agent.spawn(&worker, attempt, slot, supervisor, &token);
                self.services.insert((job.clone(), worker.clone()), service);
                self.start_check(&job, &worker, slot);
                let (state, reason) = if standby {
                    (NotifyState::Standby, "started as a hot standby")
                } else {
                    (NotifyState::Primary, "started as the primary")
                };
                self.notify(&job, &worker, state, reason.to_string());
            }
            SupervisorMsg::Rejoin {
                job,
                worker,
                attempt,
                standby,
                supervisor,
                token,
            } => {
                let supervisor = if supervisor.ip().is_unspecified() {
                    SocketAddr::new(self.supervisor.ip(), supervisor.port())
                } else {
                    supervisor
                };
                let slot = if standby {
                    Slot::Standby
                } else {
                    Slot::Primary
                };
                let ticket = lazarus_sdk::protocol::RejoinTicket {
                    supervisor,
                    token,
                    attempt,
                    standby,
                };
                let handed = self
                    .jobs
                    .get(&job)
                    .is_some_and(|t| t.rejoin(&worker, slot, attempt, &ticket));
                if handed {
                    tracing::info!(%job, %worker, attempt, standby, %supervisor, "worker handed to the new leader");
                } else {
                    // The leader counts on a process that is not here.
                    let _ = out.send(AgentMsg::Exited {
                        job,
                        worker,
                        attempt,
                        standby,
                        exit: WireExit::SpawnFailed {
                            error: "not running on this host any more".into(),
                        },
                        detail: None,
                    });
                }
            }
            SupervisorMsg::Promote {
                job,
                worker,
                attempt,
            } => {
                let promoted = self
                    .jobs
                    .get_mut(&job)
                    .is_some_and(|agent| agent.promote(&worker, attempt));
                if promoted {
                    self.standbys_down.remove(&(job.clone(), worker.clone()));
                    let key = (job.clone(), worker.clone(), Slot::Standby);
                    if let Some(check) = self.checks.remove(&key) {
                        self.checks
                            .insert((job.clone(), worker.clone(), Slot::Primary), check);
                    }
                    self.notify(
                        &job,
                        &worker,
                        NotifyState::Primary,
                        "promoted from hot standby".into(),
                    );
                }
            }
            SupervisorMsg::Retag {
                job,
                worker,
                attempt,
            } => {
                if let Some(agent) = self.jobs.get_mut(&job) {
                    agent.retag(&worker, attempt);
                }
            }
            SupervisorMsg::Kill {
                job,
                worker,
                standby,
            } => {
                let slot = if standby {
                    Slot::Standby
                } else {
                    Slot::Primary
                };
                self.kill_one(
                    &job,
                    &worker,
                    slot,
                    Stopping::Requested("stopped by the supervisor".into()),
                );
            }
            SupervisorMsg::KillAll { job, standbys } => {
                self.kill_job(&job, standbys, "stopped by the supervisor");
            }
            SupervisorMsg::HoldVip { vip, garp } => {
                if let Err(reason) = self.opts.allow.check_vip(&vip) {
                    tracing::warn!(%vip, %reason, "VIP refused");
                    let _ = out.send(AgentMsg::Refused {
                        job: None,
                        vip: Some(vip),
                        reason,
                    });
                    return;
                }
                let iface = self.opts.iface.clone();
                let v = match self.vips.entry(vip.clone()) {
                    std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        let (addr, prefix) = match parse_vip(&vip) {
                            Ok(p) => p,
                            Err(err) => {
                                tracing::error!(%vip, error = %err, "cannot hold VIP");
                                return;
                            }
                        };
                        e.insert(HeldVip {
                            vip: Vip {
                                iface,
                                addr,
                                prefix,
                                count: garp.count,
                                delay: Duration::from_millis(garp.delay_ms),
                            },
                            holder: VipHolder::new(garp, renew),
                            announce: None,
                            prepared: None,
                        })
                    }
                };
                v.vip.count = garp.count;
                v.vip.delay = Duration::from_millis(garp.delay_ms);
                let actions = v.holder.hold(now, garp, &mut self.seq);
                self.carry_out(&vip, actions, Some(out)).await;
                // While the lease is asked for: ready to announce at once.
                if let Some(v) = self.vips.get_mut(&vip) {
                    if !v
                        .prepared
                        .as_ref()
                        .is_some_and(|p| p.is_for(v.vip.count, v.vip.delay))
                    {
                        v.prepared = v
                            .vip
                            .prepare()
                            .inspect_err(|e| tracing::warn!(%vip, error = %e, "cannot prepare the VIP's announcement"))
                            .ok();
                    }
                }
            }
            SupervisorMsg::ReleaseVip { vip } => {
                self.let_go(&vip, out).await;
            }
            SupervisorMsg::LeaseGranted {
                vip,
                id,
                length_ms,
                seq,
            } => {
                let Some(v) = self.vips.get_mut(&vip) else {
                    let _ = out.send(AgentMsg::LeaseReleased { vip, id });
                    return;
                };
                let actions =
                    v.holder
                        .granted(now, LeaseId(id), Duration::from_millis(length_ms), seq);
                self.carry_out(&vip, actions, Some(out)).await;
            }
            SupervisorMsg::LeaseHeld {
                vip,
                holder,
                retry_ms,
            } => {
                if let Some(v) = self.vips.get_mut(&vip) {
                    tracing::info!(%vip, %holder, retry_ms, "VIP lease held elsewhere; waiting");
                    v.holder
                        .held_elsewhere(now, Duration::from_millis(retry_ms));
                }
            }
            SupervisorMsg::LeaseLost { vip } if self.ha.is_some() => {
                // etcd let this agent's lease expire: off at once, then ask
                // again (the leader still wants it here).
                tracing::warn!(%vip, "VIP lease expired in etcd");
                if let Some(v) = self.vips.get_mut(&vip) {
                    let actions = v.holder.expired(now);
                    self.carry_out(&vip, actions, Some(out)).await;
                }
            }
            SupervisorMsg::LeaseLost { vip } => {
                tracing::warn!(%vip, "VIP lease lost");
                self.let_go(&vip, out).await;
            }
            SupervisorMsg::Prune {
                job,
                referenced,
                newest,
            } => {
                let dir = self.opts.state_dir.join(job.as_str()).join("cache");
                self.tasks.spawn_blocking(move || {
                    let referenced: HashSet<String> = referenced.into_iter().collect();
                    match LocalCache::new(&dir).and_then(|c| c.prune(&job, &referenced, newest)) {
                        Ok(n) => tracing::debug!(deleted = n, "local cache pruned"),
                        Err(e) => tracing::warn!(error = %e, "pruning the local cache failed"),
                    }
                });
            }
        }
    }

    /// Stops wanting `vip`: stops its burst, removes it from the interface
    /// and gives its lease back (confirmed release: the next holder need
    /// not wait).
    async fn let_go(&mut self, vip: &str, out: &mpsc::UnboundedSender<AgentMsg>) {
        let Some(v) = self.vips.get_mut(vip) else {
            return;
        };
        let actions = v.holder.release();
        self.carry_out(vip, actions, Some(out)).await;
    }

    /// Kills one process, remembering why (its exit is reported so).
    fn kill_one(&mut self, job: &JobId, worker: &WorkerId, slot: Slot, why: Stopping) {
        let Some(agent) = self.jobs.get_mut(job) else {
            return;
        };
        if agent
            .processes()
            .iter()
            .any(|(w, s, _)| w == worker && *s == slot)
        {
            self.stopping
                .entry((job.clone(), worker.clone(), slot))
                .or_insert(why);
            agent.kill(worker, slot);
        }
    }

    /// Kills a job's primaries (and standbys if `standbys`).
    fn kill_job(&mut self, job: &JobId, standbys: bool, why: &str) {
        let procs = self
            .jobs
            .get(job)
            .map(|t| t.processes())
            .unwrap_or_default();
        for (worker, slot, _) in procs {
            if standbys || slot == Slot::Primary {
                self.kill_one(job, &worker, slot, Stopping::Requested(why.to_string()));
            }
        }
    }

    /// Books a process's exit: its check ends, its hooks run; returns the
    /// exit with a failed check named in its detail.
    fn exited(&mut self, job: &JobId, mut e: WorkerExited) -> WorkerExited {
        if let Some(agent) = self.jobs.get_mut(job) {
            agent.reap(&e);
        }
        let slot = if e.standby {
            Slot::Standby
        } else {
            Slot::Primary
        };
        let key = (job.clone(), e.worker.clone(), slot);
        self.checks.remove(&key);
        if slot == Slot::Standby {
            self.standbys_down.remove(&(job.clone(), e.worker.clone()));
        }
        let (state, reason) = match self.stopping.remove(&key) {
            Some(Stopping::Requested(why)) => (NotifyState::Stopped, why),
            Some(Stopping::Unhealthy(why)) => {
                e.detail = Some(format!("failed its health check: {why}"));
                (
                    NotifyState::Fault,
                    format!("failed its health check: {why}"),
                )
            }
            None if e.exit == ExitKind::Success => (NotifyState::Stopped, e.exit.to_string()),
            None => (
                NotifyState::Fault,
                match &e.detail {
                    Some(d) => format!("{}: {d}", e.exit),
                    None => e.exit.to_string(),
                },
            ),
        };
        let kind = match &e.exit {
            ExitKind::Success => "success",
            ExitKind::Code(_) => "code",
            ExitKind::Signal(_) => "signal",
            ExitKind::SpawnFailed(_) => "spawn_failed",
            ExitKind::HostLost(_) => "host_lost",
        };
        metrics::counter!(crate::metrics::WORKER_EXITS, "job" => job.to_string(), "kind" => kind, "state" => state.as_str()).increment(1);
        self.notify(job, &e.worker, state, reason);
        e
    }

    /// Starts the health check of `worker`'s process in `slot`, if its
    /// operator has one.
    fn start_check(&mut self, job: &JobId, worker: &WorkerId, slot: Slot) {
        let Some(spec) = self
            .services
            .get(&(job.clone(), worker.clone()))
            .and_then(|s| s.health.clone())
        else {
            return;
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tx = self.health_tx.clone();
        let clock = self.clock;
        let (j, w) = (job.clone(), worker.clone());
        metrics::gauge!(crate::metrics::HEALTH_UP, "job" => job.to_string(), "worker" => worker.to_string()).set(1.0);
        let task = self.tasks.spawn(crate::service::health::run_checks(
            spec,
            (job.to_string(), worker.to_string()),
            move || clock.now(),
            move |change| {
                let _ = tx.send((j.clone(), w.clone(), id, change));
            },
        ));
        self.checks.insert(
            (job.clone(), worker.clone(), slot),
            Check {
                id,
                _task: AbortOnDrop(task),
            },
        );
    }

    /// A health check changed: a primary that went down is killed (a
    /// fault: the supervisor fails over); a standby's state goes to the
    /// supervisor, which never promotes a standby that is down.
    fn health(
        &mut self,
        job: JobId,
        worker: WorkerId,
        id: u64,
        change: HealthChange,
        out: Option<&mpsc::UnboundedSender<AgentMsg>>,
    ) {
        metrics::gauge!(crate::metrics::HEALTH_UP, "job" => job.to_string(), "worker" => worker.to_string())
            .set(if change.up { 1.0 } else { 0.0 });
        let Some(slot) = [Slot::Primary, Slot::Standby].into_iter().find(|s| {
            self.checks
                .get(&(job.clone(), worker.clone(), *s))
                .is_some_and(|c| c.id == id)
        }) else {
            return;
        };
        match (slot, change.up) {
            (Slot::Primary, false) => {
                tracing::warn!(%job, %worker, detail = %change.detail, "primary failed its health check: stopping it (failover)");
                self.kill_one(&job, &worker, slot, Stopping::Unhealthy(change.detail));
            }
            (Slot::Primary, true) => {}
            (Slot::Standby, up) => {
                if up {
                    self.standbys_down.remove(&(job.clone(), worker.clone()));
                } else {
                    self.standbys_down
                        .insert((job.clone(), worker.clone()), change.detail.clone());
                }
                if !up {
                    self.notify(
                        &job,
                        &worker,
                        NotifyState::Fault,
                        format!("hot standby failed its health check: {}", change.detail),
                    );
                } else {
                    self.notify(
                        &job,
                        &worker,
                        NotifyState::Standby,
                        format!(
                            "hot standby passes its health check again: {}",
                            change.detail
                        ),
                    );
                }
                if let Some(out) = out {
                    let _ = out.send(AgentMsg::Health {
                        job,
                        worker,
                        up,
                        detail: change.detail,
                    });
                }
            }
        }
    }

    /// Queues the job's and this host's hooks for a role change.
    fn notify(&self, job: &JobId, worker: &WorkerId, state: NotifyState, reason: String) {
        let service = self.services.get(&(job.clone(), worker.clone()));
        let hooks: Vec<NotifySpec> = service
            .and_then(|s| s.notify.clone())
            .into_iter()
            .chain(self.opts.notify.clone())
            .collect();
        tracing::info!(%job, %worker, state = state.as_str(), %reason, "role changed");
        self.notifier.fire(
            hooks,
            NotifyEvent {
                state,
                job: job.to_string(),
                worker: worker.to_string(),
                host: self.opts.name.clone(),
                vips: service.map(|s| s.vips.clone()).unwrap_or_default(),
                reason,
            },
        );
    }

    /// The job's local agent, created on first use.
    fn job_agent(
        &mut self,
        job: &JobId,
        binary: &std::path::Path,
        local_ip: IpAddr,
    ) -> Option<&mut ProcessTable> {
        if !self.jobs.contains_key(job) {
            let dir = self.opts.state_dir.join(job.as_str());
            let (tx, j) = (self.exits_tx.clone(), job.clone());
            let report: crate::procs::ExitReporter = Box::new(move |e| {
                let _ = tx.send((j.clone(), e));
            });
            let mut agent = match ProcessTable::new(
                &self.opts.name,
                binary.to_path_buf(),
                &dir,
                report,
            ) {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(%job, error = %e, dir = %dir.display(), "cannot prepare the job's directory");
                    return None;
                }
            };
            let bind = self.opts.bind_ip.unwrap_or(local_ip);
            agent.set_env("LAZARUS_BIND_IP", &bind.to_string());
            if self.ha.is_some() {
                if let Err(e) = agent.enable_rejoin() {
                    tracing::error!(%job, error = %e, "cannot prepare rejoin tickets; workers will not survive a supervisor failover");
                }
                agent.set_env("LAZARUS_REJOIN_TIMEOUT_MS", &self.rejoin_wait());
            }
            if let Some(ca) = &self.opts.ca_file {
                agent.set_env("LAZARUS_CA", &ca.display().to_string());
            }
            self.jobs.insert(job.clone(), agent);
        }
        self.jobs.get_mut(job)
    }
}

/// A running health check: its task (aborted with it) and the id its
/// reports carry, so a report of a replaced check is ignored.
struct Check {
    id: u64,
    _task: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
