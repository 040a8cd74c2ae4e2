#![allow(clippy::disallowed_methods)] // until the VIP holder is split out (later commit)
//! `lazarus agent`: one per host. It registers with the supervisor, runs
//! the worker processes it is told to (one [`ProcessTable`] per job), reports their
//! exits at once, and holds VIPs on its interface only under a lease.
//!
//! Self-fencing, by the agent's own clock:
//! - a VIP whose lease is not renewed by its expiry is removed at that
//!   moment, and the agent's primaries are stopped;
//! - a supervisor that stays silent for one lease length ends the session:
//!   every worker process is killed and every VIP removed, then the agent
//!   registers again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lazarus_sdk::protocol;
use lazarus_storage::{JobId, LocalCache};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::cluster::wire::{AgentMsg, GarpSettings, SupervisorMsg, WireExit};
use crate::lease::{LeaseHolder, LeaseId};
use crate::procs::{ProcessTable, Slot, WorkerExited};
use crate::vip::{parse_vip, Vip};

/// `lazarus agent`'s settings.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// This host's name.
    pub name: String,
    /// The supervisor's address.
    pub supervisor: SocketAddr,
    /// The interface VIPs go on.
    pub iface: String,
    /// Worker logs and local caches.
    pub state_dir: PathBuf,
    /// Address workers listen on for data channels (default: this host's
    /// address toward the supervisor).
    pub bind_ip: Option<IpAddr>,
}

/// `lazarus agent --config FILE`: every field optional, unknown fields are
/// errors naming the field; command-line flags win.
///
/// ```toml
/// state_dir = "/var/lib/lazarus"   # worker logs and local caches
/// bind_ip = "198.18.0.2"           # data channels of this host's workers
/// ```
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Worker logs and local caches.
    pub state_dir: Option<PathBuf>,
    /// Address workers listen on for data channels.
    pub bind_ip: Option<IpAddr>,
}

impl AgentConfig {
    /// Reads `path`; errors name the file and the field.
    pub fn from_file(path: &std::path::Path) -> Result<AgentConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// One VIP this agent was asked to hold.
struct HeldVip {
    vip: Vip,
    garp: GarpSettings,
    holder: LeaseHolder,
    wanted: bool,
    on_iface: bool,
    /// Requests in flight: sequence number → send time (agent clock).
    pending: HashMap<u64, Duration>,
    next_renew: Duration,
    retry_at: Option<Duration>,
    refresh_at: Option<Duration>,
}

struct AgentState {
    opts: AgentOptions,
    origin: Instant,
    jobs: BTreeMap<JobId, ProcessTable>,
    exits_tx: mpsc::UnboundedSender<(JobId, WorkerExited)>,
    exits_rx: mpsc::UnboundedReceiver<(JobId, WorkerExited)>,
    vips: BTreeMap<String, HeldVip>,
    seq: u64,
}

/// Runs the agent until `stop` turns true.
pub async fn run_agent(opts: AgentOptions, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating state directory {}", opts.state_dir.display()))?;
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    let mut st = AgentState {
        opts,
        origin: Instant::now(),
        jobs: BTreeMap::new(),
        exits_tx,
        exits_rx,
        vips: BTreeMap::new(),
        seq: 0,
    };
    loop {
        if *stop.borrow() {
            break;
        }
        let addr = st.opts.supervisor;
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => match st.session(stream, &mut stop).await {
                Ok(()) => {
                    st.fence("stopping").await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "session with the supervisor ended")
                }
            },
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "cannot reach the supervisor"),
            Err(_) => tracing::debug!(%addr, "connecting to the supervisor timed out"),
        }
        st.fence("no session with the supervisor").await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
    }
    Ok(())
}

impl AgentState {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Kills every worker and removes every VIP.
    async fn fence(&mut self, why: &str) {
        let mut any = false;
        for agent in self.jobs.values_mut() {
            any |= !agent.running().is_empty();
            agent.kill_all();
        }
        for (name, v) in &mut self.vips {
            if v.on_iface {
                any = true;
                if let Err(e) = v.vip.release().await {
                    tracing::error!(vip = %name, error = %e, "removing the VIP failed");
                }
                v.on_iface = false;
            }
        }
        self.vips.clear();
        if any {
            tracing::warn!(why, "fenced: workers stopped, VIPs removed");
        }
    }

    async fn session(
        &mut self,
        stream: TcpStream,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        stream.set_nodelay(true)?;
        let local_ip = stream.local_addr()?.ip();
        let (mut read, mut write) = stream.into_split();
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
        })?;
        let welcome = tokio::time::timeout(
            Duration::from_secs(5),
            protocol::read_control::<_, SupervisorMsg>(&mut read),
        )
        .await
        .context("no answer to registration within 5 s")??;
        let (heartbeat, lease, renew) = match welcome {
            Some(SupervisorMsg::Welcome {
                heartbeat_ms,
                lease_ms,
                renew_ms,
            }) => (
                Duration::from_millis(heartbeat_ms.max(1)),
                Duration::from_millis(lease_ms.max(1)),
                Duration::from_millis(renew_ms.max(1)),
            ),
            Some(SupervisorMsg::Refused { reason }) => {
                anyhow::bail!("registration refused: {reason}")
            }
            other => anyhow::bail!("expected a welcome, got {other:?}"),
        };
        tracing::info!(name = %self.opts.name, supervisor = %self.opts.supervisor, %local_ip, ?lease, "registered");
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
        let mut last_heard = Instant::now();
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
                    last_heard = Instant::now();
                    self.handle(msg, local_ip, renew, &out).await;
                }
                Some((job, e)) = self.exits_rx.recv() => {
                    if let Some(agent) = self.jobs.get_mut(&job) {
                        agent.reap(&e);
                    }
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
                    if last_heard.elapsed() > lease {
                        anyhow::bail!("the supervisor was silent for {lease:?} (one lease)");
                    }
                    self.leases(renew, &out).await;
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

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Renewals, retries, refreshes and expiry of held VIPs.
    async fn leases(&mut self, renew: Duration, out: &mpsc::UnboundedSender<AgentMsg>) {
        let now = self.now();
        let mut expired = false;
        let names: Vec<String> = self.vips.keys().cloned().collect();
        for name in names {
            let v = self.vips.get_mut(&name).expect("listed");
            let seq = &mut self.seq;
            if v.on_iface && !v.holder.valid(now) {
                tracing::warn!(vip = %name, "VIP lease expired without renewal: removing the VIP");
                if let Err(e) = v.vip.release().await {
                    tracing::error!(vip = %name, error = %e, "removing the VIP failed");
                }
                v.on_iface = false;
                v.holder.on_lost();
                expired = true;
                // Ask again: the supervisor decides whether it is still ours.
                v.retry_at = Some(now);
                continue;
            }
            if let Some(id) = v.holder.lease() {
                if now >= v.next_renew {
                    *seq += 1;
                    let seq = *seq;
                    v.pending.insert(seq, now);
                    v.next_renew = now + renew;
                    let _ = out.send(AgentMsg::LeaseRenew {
                        vip: name.clone(),
                        id: id.0,
                        seq,
                    });
                }
            } else if v.wanted && v.retry_at.is_some_and(|t| now >= t) {
                *seq += 1;
                let seq = *seq;
                v.retry_at = Some(now + renew);
                v.pending.insert(seq, now);
                let _ = out.send(AgentMsg::LeaseAcquire {
                    vip: name.clone(),
                    seq,
                });
            }
            if v.on_iface && v.refresh_at.is_some_and(|t| now >= t) {
                v.refresh_at = Some(now + Duration::from_millis(v.garp.refresh_ms));
                let vip = v.vip.clone();
                tokio::spawn(async move {
                    if let Err(e) = vip.announce().await {
                        tracing::warn!(error = %e, "VIP refresh announcement failed");
                    }
                });
            }
        }
        if expired {
            // Self-fencing: no primary serves without its VIP lease.
            for agent in self.jobs.values_mut() {
                agent.kill_primaries();
            }
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
            SupervisorMsg::Welcome { .. } | SupervisorMsg::Heartbeat => {}
            SupervisorMsg::Refused { reason } => tracing::warn!(reason, "supervisor refused"),
            SupervisorMsg::Spawn {
                job,
                worker,
                attempt,
                standby,
                binary,
                supervisor,
            } => {
                let supervisor = if supervisor.ip().is_unspecified() {
                    SocketAddr::new(self.opts.supervisor.ip(), supervisor.port())
                } else {
                    supervisor
                };
                let Some(agent) = self.job_agent(&job, &binary, local_ip) else {
                    return;
                };
                let slot = if standby {
                    Slot::Standby
                } else {
                    Slot::Primary
                };
                agent.spawn(&worker, attempt, slot, supervisor);
            }
            SupervisorMsg::Promote {
                job,
                worker,
                attempt,
            } => {
                if let Some(agent) = self.jobs.get_mut(&job) {
                    agent.promote(&worker, attempt);
                }
            }
            SupervisorMsg::Kill {
                job,
                worker,
                standby,
            } => {
                if let Some(agent) = self.jobs.get_mut(&job) {
                    agent.kill(
                        &worker,
                        if standby {
                            Slot::Standby
                        } else {
                            Slot::Primary
                        },
                    );
                }
            }
            SupervisorMsg::KillAll { job, standbys } => {
                if let Some(agent) = self.jobs.get_mut(&job) {
                    if standbys {
                        agent.kill_all();
                    } else {
                        agent.kill_primaries();
                    }
                }
            }
            SupervisorMsg::HoldVip { vip, garp } => {
                let seq = self.next_seq();
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
                            garp,
                            holder: LeaseHolder::default(),
                            wanted: true,
                            on_iface: false,
                            pending: HashMap::new(),
                            next_renew: now,
                            retry_at: None,
                            refresh_at: None,
                        })
                    }
                };
                v.wanted = true;
                v.garp = garp;
                v.vip.count = garp.count;
                v.vip.delay = Duration::from_millis(garp.delay_ms);
                if v.holder.lease().is_none() {
                    v.pending.insert(seq, now);
                    v.retry_at = Some(now + renew);
                    let _ = out.send(AgentMsg::LeaseAcquire { vip, seq });
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
                let Some(sent_at) = v.pending.remove(&seq) else {
                    return;
                };
                if !v.wanted {
                    let _ = out.send(AgentMsg::LeaseReleased { vip, id });
                    return;
                }
                v.holder
                    .on_granted(LeaseId(id), Duration::from_millis(length_ms), sent_at);
                v.next_renew = sent_at + renew;
                v.retry_at = None;
                if !v.on_iface && v.holder.valid(self.origin.elapsed()) {
                    match v.vip.add().await {
                        Ok(()) => {
                            v.on_iface = true;
                            let vip_c = v.vip.clone();
                            tokio::spawn(async move {
                                if let Err(e) = vip_c.announce().await {
                                    tracing::error!(error = %e, "VIP announcement failed");
                                }
                            });
                            if v.garp.refresh_ms > 0 {
                                v.refresh_at = Some(
                                    self.origin.elapsed()
                                        + Duration::from_millis(v.garp.refresh_ms),
                                );
                            }
                            tracing::info!(%vip, lease = id, "VIP held");
                        }
                        Err(e) => {
                            tracing::error!(%vip, error = %e, "adding the VIP failed; giving the lease back");
                            v.holder.on_lost();
                            v.retry_at = Some(now + renew);
                            let _ = out.send(AgentMsg::LeaseReleased { vip, id });
                        }
                    }
                }
            }
            SupervisorMsg::LeaseHeld {
                vip,
                holder,
                retry_ms,
            } => {
                if let Some(v) = self.vips.get_mut(&vip) {
                    tracing::info!(%vip, %holder, retry_ms, "VIP lease held elsewhere; waiting");
                    v.retry_at = Some(now + Duration::from_millis(retry_ms));
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
                tokio::task::spawn_blocking(move || {
                    let referenced: HashSet<String> = referenced.into_iter().collect();
                    match LocalCache::new(&dir).and_then(|c| c.prune(&job, &referenced, newest)) {
                        Ok(n) => tracing::debug!(deleted = n, "local cache pruned"),
                        Err(e) => tracing::warn!(error = %e, "pruning the local cache failed"),
                    }
                });
            }
        }
    }

    /// Stops wanting `vip`: removes it from the interface and gives its
    /// lease back (confirmed release: the next holder need not wait).
    async fn let_go(&mut self, vip: &str, out: &mpsc::UnboundedSender<AgentMsg>) {
        let Some(v) = self.vips.get_mut(vip) else {
            return;
        };
        v.wanted = false;
        v.retry_at = None;
        if v.on_iface {
            if let Err(e) = v.vip.release().await {
                tracing::error!(%vip, error = %e, "removing the VIP failed");
            }
            v.on_iface = false;
        }
        if let Some(id) = v.holder.lease() {
            v.holder.on_lost();
            let _ = out.send(AgentMsg::LeaseReleased {
                vip: vip.to_string(),
                id: id.0,
            });
        }
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
            self.jobs.insert(job.clone(), agent);
        }
        self.jobs.get_mut(job)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
