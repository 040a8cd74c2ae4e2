//! The supervisor's view of the cluster: live hosts and their connections,
//! running jobs (where their events go), and one lease table per VIP. One
//! mutex guards it; nothing awaits while holding it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use crate::clock::{Clock, ManualClock, SystemClock};

use lazarus_storage::JobId;
use tokio::sync::{mpsc, watch};

use crate::cluster::config::ClusterConfig;
use crate::cluster::wire::{HostStatus, JobStatusCell, StatusReport, SupervisorMsg, VipStatus};
use crate::fleet::FleetEvent;
use crate::lease::{LeaseAuthority, LeaseDecision, LeaseId, LeaseTable};

/// One agent.
#[derive(Debug)]
pub struct Host {
    /// Its address as seen from the supervisor.
    pub addr: IpAddr,
    /// Its state directory (logs, caches).
    pub state_dir: PathBuf,
    /// Its connection, to send on.
    pub tx: mpsc::UnboundedSender<SupervisorMsg>,
    /// Which connection is current (a re-registration replaces it).
    pub conn: u64,
    /// Last message from it (cluster clock).
    pub last_heard: Duration,
    /// False once declared lost; a lost host must register again.
    pub alive: bool,
    /// When its agent certificate expires (Unix time), on a TLS port.
    pub cert_not_after: Option<i64>,
}

/// A running job.
#[derive(Debug)]
pub struct JobEntry {
    /// Where its fleet events go.
    pub events: mpsc::UnboundedSender<FleetEvent>,
    /// Its status.
    pub status: JobStatusCell,
    /// Asks it to stop.
    pub stop: watch::Sender<crate::supervisor::StopRequest>,
    /// The VIPs its operators hold.
    pub vips: Vec<String>,
    /// What was submitted and where it checkpoints (to rescale it).
    pub submission: Option<std::sync::Arc<(crate::cluster::wire::Submission, String)>>,
    /// The task running it (awaited at shutdown).
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl JobEntry {
    /// Whether the job has ended (finished, stopped or failed).
    pub fn ended(&self) -> bool {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state
            .ended()
    }
}

/// One VIP.
#[derive(Debug)]
struct VipEntry {
    /// The VIP's lease authority (in memory here; the interface allows
    /// one that outlives the supervisor).
    table: Box<dyn LeaseAuthority>,
    assigned: Option<String>,
}

/// Hosts, jobs and leases.
#[derive(Debug)]
pub struct ClusterState {
    /// Settings.
    pub config: ClusterConfig,
    /// Agents by name.
    pub hosts: BTreeMap<String, Host>,
    /// Jobs by id.
    pub jobs: BTreeMap<JobId, JobEntry>,
    vips: BTreeMap<String, VipEntry>,
    clock: Arc<dyn Clock>,
    next_conn: u64,
    /// No VIP lease is granted before this (a new HA leader waits out the
    /// leases its predecessor may have granted).
    grants_from: Duration,
    /// HA: agents hold VIPs under their own etcd leases.
    pub agent_leases: bool,
}

/// The shared handle.
#[derive(Debug, Clone)]
pub struct Cluster(Arc<Mutex<ClusterState>>);

impl Cluster {
    /// An empty cluster on the real clock.
    pub fn new(config: ClusterConfig) -> Cluster {
        Cluster::with_clock(config, Arc::new(SystemClock::default()))
    }

    /// An empty cluster on `clock`.
    pub fn with_clock(config: ClusterConfig, clock: Arc<dyn Clock>) -> Cluster {
        Cluster(Arc::new(Mutex::new(ClusterState {
            config,
            hosts: BTreeMap::new(),
            jobs: BTreeMap::new(),
            vips: BTreeMap::new(),
            clock,
            next_conn: 1,
            grants_from: Duration::ZERO,
            agent_leases: false,
        })))
    }

    /// Locks the state (a poisoned lock is taken over: the state stays
    /// consistent between statements).
    pub fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClusterState {
    /// The cluster clock's time.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Notes that `name` was heard from now.
    pub fn heard(&mut self, name: &str) {
        let now = self.now();
        if let Some(h) = self.hosts.get_mut(name) {
            h.last_heard = now;
        }
    }

    /// Registers (or re-registers) host `name`; returns the connection id.
    pub fn register(
        &mut self,
        name: &str,
        addr: IpAddr,
        state_dir: PathBuf,
        tx: mpsc::UnboundedSender<SupervisorMsg>,
    ) -> u64 {
        let conn = self.next_conn;
        self.next_conn += 1;
        let now = self.now();
        let replaced = self.hosts.insert(
            name.to_string(),
            Host {
                addr,
                state_dir,
                tx,
                conn,
                last_heard: now,
                alive: true,
                cert_not_after: None,
            },
        );
        if replaced.is_some_and(|h| h.alive) {
            // Its old processes belong to a connection that is gone; their
            // jobs learn it as a host loss and place them again.
            tracing::warn!(
                host = name,
                "host re-registered; its previous session is lost"
            );
            self.notify_lost(name);
        }
        tracing::info!(host = name, %addr, "agent registered");
        for j in self.jobs.values() {
            let _ = j.events.send(FleetEvent::HostJoined(name.to_string()));
        }
        conn
    }

    /// Whether `conn` is `name`'s current, live connection.
    pub fn current(&self, name: &str, conn: u64) -> bool {
        self.hosts
            .get(name)
            .is_some_and(|h| h.conn == conn && h.alive)
    }

    /// Sends to a live host; false if it is not live.
    pub fn send(&self, host: &str, msg: SupervisorMsg) -> bool {
        match self.hosts.get(host) {
            Some(h) if h.alive => h.tx.send(msg).is_ok(),
            _ => false,
        }
    }

    /// Names of live hosts.
    pub fn alive(&self) -> BTreeSet<String> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.alive)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Declares `name` lost: its connection is dropped, and every job hears it.
    pub fn lose(&mut self, name: &str, why: &str) {
        let Some(h) = self.hosts.get_mut(name) else {
            return;
        };
        if !h.alive {
            return;
        }
        h.alive = false;
        // Dropping the sender ends the connection's writer: the agent sees
        // its session end and fences itself.
        let (dead, _) = mpsc::unbounded_channel();
        h.tx = dead;
        tracing::warn!(host = name, why, "host lost");
        self.notify_lost(name);
    }

    fn notify_lost(&self, name: &str) {
        for j in self.jobs.values() {
            let _ = j.events.send(FleetEvent::HostLost(name.to_string()));
        }
    }

    /// Hosts silent for longer than the timeout.
    pub fn overdue(&self) -> Vec<String> {
        let timeout = self.config.host_timeout;
        let now = self.now();
        self.hosts
            .iter()
            .filter(|(_, h)| h.alive && now.saturating_sub(h.last_heard) > timeout)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Makes `host` the one that should hold `vip`: the current holder (if
    /// another) is told to release, `host` to acquire the lease.
    pub fn assign_vip(&mut self, vip: &str, host: &str) {
        let now = self.now();
        let lease = self.config.lease;
        let garp = self.config.garp;
        let entry = self
            .vips
            .entry(vip.to_string())
            .or_insert_with(|| VipEntry {
                table: Box::new(LeaseTable::new(lease)),
                assigned: None,
            });
        let previous = entry.assigned.replace(host.to_string());
        let holder = entry.table.holder(now).map(|(h, _)| h);
        let mut others: BTreeSet<String> = [previous, holder].into_iter().flatten().collect();
        if self.agent_leases {
            // The holder is in etcd, unknown here (it may hold it since
            // before this leader): every other host lets go.
            others.extend(self.hosts.keys().cloned());
        }
        for old in others {
            if old != host {
                self.send(&old, SupervisorMsg::ReleaseVip { vip: vip.into() });
            }
        }
        tracing::info!(vip, host, "VIP assigned");
        self.send(
            host,
            SupervisorMsg::HoldVip {
                vip: vip.into(),
                garp,
            },
        );
    }

    /// Nobody should hold `vip` any more (its job ended).
    pub fn unassign_vip(&mut self, vip: &str) {
        let now = self.now();
        let Some(entry) = self.vips.get_mut(vip) else {
            return;
        };
        let previous = entry.assigned.take();
        let holder = entry.table.holder(now).map(|(h, _)| h);
        for h in [previous, holder].into_iter().flatten() {
            self.send(&h, SupervisorMsg::ReleaseVip { vip: vip.into() });
        }
    }

    /// What `host` must hold and let go of now (told at its registration:
    /// an HA agent may still hold a VIP that was moved while no leader
    /// could reach it).
    pub fn vip_orders(&self, host: &str) -> Vec<SupervisorMsg> {
        let garp = self.config.garp;
        self.vips
            .iter()
            .filter_map(|(vip, e)| match e.assigned.as_deref() {
                Some(h) if h == host => Some(SupervisorMsg::HoldVip {
                    vip: vip.clone(),
                    garp,
                }),
                Some(_) => Some(SupervisorMsg::ReleaseVip { vip: vip.clone() }),
                None => None,
            })
            .collect()
    }

    /// Forgets every host, job and lease: this supervisor no longer leads.
    /// Agent sessions end at their next message; job tasks are aborted.
    pub fn step_down(&mut self) {
        for j in self.jobs.values_mut() {
            if let Some(t) = j.task.take() {
                t.abort();
            }
        }
        self.jobs.clear();
        self.hosts.clear();
        self.vips.clear();
    }

    /// Takes over as a new leader: no VIP lease before every lease the
    /// previous leader may have granted has surely run out.
    pub fn take_over(&mut self) {
        let c = self.config.lease;
        self.grants_from = self.now() + c.length + c.drift_margin;
    }

    /// A lease request from `host`.
    pub fn lease_acquire(&mut self, host: &str, vip: &str, seq: u64) -> SupervisorMsg {
        let now = self.now();
        let Some(entry) = self.vips.get_mut(vip) else {
            return SupervisorMsg::LeaseLost { vip: vip.into() };
        };
        if entry.assigned.as_deref() != Some(host) {
            return SupervisorMsg::LeaseLost { vip: vip.into() };
        }
        if now < self.grants_from {
            // A new HA leader: leases the previous leader granted may still
            // run; no grant until they surely expired.
            return SupervisorMsg::LeaseHeld {
                vip: vip.into(),
                holder: "(a lease of the previous leader)".into(),
                retry_ms: self.grants_from.saturating_sub(now).as_millis() as u64 + 1,
            };
        }
        match entry.table.acquire(host, now) {
            LeaseDecision::Granted { id, length } => {
                tracing::info!(vip, host, lease = id.0, "VIP lease granted");
                SupervisorMsg::LeaseGranted {
                    vip: vip.into(),
                    id: id.0,
                    length_ms: length.as_millis() as u64,
                    seq,
                }
            }
            LeaseDecision::Held { holder, retry_at } => SupervisorMsg::LeaseHeld {
                vip: vip.into(),
                holder,
                retry_ms: retry_at.saturating_sub(now).as_millis() as u64 + 1,
            },
            LeaseDecision::Lost => SupervisorMsg::LeaseLost { vip: vip.into() },
        }
    }

    /// A renewal from `host`.
    pub fn lease_renew(&mut self, host: &str, vip: &str, id: u64, seq: u64) -> SupervisorMsg {
        let now = self.now();
        let Some(entry) = self.vips.get_mut(vip) else {
            return SupervisorMsg::LeaseLost { vip: vip.into() };
        };
        if entry.assigned.as_deref() != Some(host) {
            return SupervisorMsg::LeaseLost { vip: vip.into() };
        }
        match entry.table.renew(host, LeaseId(id), now) {
            LeaseDecision::Granted { id, length } => SupervisorMsg::LeaseGranted {
                vip: vip.into(),
                id: id.0,
                length_ms: length.as_millis() as u64,
                seq,
            },
            _ => SupervisorMsg::LeaseLost { vip: vip.into() },
        }
    }

    /// `host` dropped `vip`: the lease ends now, and the assigned host (if
    /// another) is told to ask again at once.
    pub fn lease_released(&mut self, host: &str, vip: &str, id: u64) {
        let garp = self.config.garp;
        let Some(entry) = self.vips.get_mut(vip) else {
            return;
        };
        entry.table.release(host, LeaseId(id));
        tracing::info!(vip, host, lease = id, "VIP lease released");
        if let Some(next) = entry.assigned.clone().filter(|a| a != host) {
            self.send(
                &next,
                SupervisorMsg::HoldVip {
                    vip: vip.into(),
                    garp,
                },
            );
        }
    }

    /// The cluster for `lazarus status`.
    pub fn report(&self) -> StatusReport {
        let now = self.now();
        let c = &self.config;
        StatusReport {
            heartbeat_ms: c.heartbeat_interval.as_millis() as u64,
            host_timeout_ms: c.host_timeout.as_millis() as u64,
            lease_ms: c.lease.length.as_millis() as u64,
            drift_margin_ms: c.lease.drift_margin.as_millis() as u64,
            hosts: self
                .hosts
                .iter()
                .map(|(name, h)| HostStatus {
                    name: name.clone(),
                    addr: h.addr.to_string(),
                    alive: h.alive,
                    last_heartbeat_ms: now.saturating_sub(h.last_heard).as_millis() as u64,
                    cert_expires_in_days: h.cert_not_after.map(crate::security::days_left),
                })
                .collect(),
            jobs: self
                .jobs
                .values()
                .map(|j| j.status.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .collect(),
            vips: self
                .vips
                .iter()
                .map(|(vip, e)| {
                    let held = e.table.holder(now);
                    VipStatus {
                        vip: vip.clone(),
                        assigned: e.assigned.clone(),
                        holder: held.as_ref().map(|(h, _)| h.clone()),
                        lease_id: held.as_ref().and_then(|_| e.table.lease_id()).map(|i| i.0),
                        lease_expires_in_ms: held
                            .map(|(_, until)| until.saturating_sub(now).as_millis() as u64),
                    }
                })
                .collect(),
            ha: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::SupervisorMsg as M;

    fn host(c: &mut ClusterState, name: &str) -> mpsc::UnboundedReceiver<M> {
        let (tx, rx) = mpsc::unbounded_channel();
        c.register(
            name,
            "198.18.0.9".parse().expect("ip"),
            PathBuf::from("/x"),
            tx,
        );
        rx
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<M>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(format!("{m:?}"));
        }
        out
    }

    #[test]
    fn test_vip_moves_only_after_a_confirmed_release() {
        let cluster = Cluster::new(ClusterConfig::default());
        let mut c = cluster.lock();
        let (mut a, mut b) = (host(&mut c, "a"), host(&mut c, "b"));
        let v = "198.18.0.100/24";
        c.assign_vip(v, "a");
        assert!(drain(&mut a).iter().any(|m| m.starts_with("HoldVip")));
        let M::LeaseGranted { id: first, .. } = c.lease_acquire("a", v, 1) else {
            panic!("a gets the lease");
        };
        // Someone not assigned cannot take it.
        assert!(matches!(c.lease_acquire("b", v, 2), M::LeaseLost { .. }));
        c.assign_vip(v, "b");
        assert!(drain(&mut a).iter().any(|m| m.starts_with("ReleaseVip")));
        assert!(drain(&mut b).iter().any(|m| m.starts_with("HoldVip")));
        // a has not confirmed: b must wait for expiry plus margin.
        assert!(
            matches!(c.lease_acquire("b", v, 3), M::LeaseHeld { ref holder, .. } if holder == "a")
        );
        // a's renewal is refused now that the VIP is b's.
        assert!(matches!(
            c.lease_renew("a", v, first, 4),
            M::LeaseLost { .. }
        ));
        // a confirms; b is told to ask again and gets it at once.
        c.lease_released("a", v, first);
        assert!(drain(&mut b).iter().any(|m| m.starts_with("HoldVip")));
        assert!(matches!(c.lease_acquire("b", v, 5), M::LeaseGranted { id, .. } if id != first));
        let r = c.report();
        assert_eq!(r.vips[0].holder.as_deref(), Some("b"));
        assert!(r.vips[0].lease_expires_in_ms.is_some_and(|ms| ms <= 1000));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn test_silent_host_is_overdue_only_past_the_timeout() {
        let clock = ManualClock::default();
        let config = ClusterConfig::default(); // host timeout 500 ms
        let cluster = Cluster::with_clock(config, Arc::new(clock.clone()));
        let mut c = cluster.lock();
        let _a = host(&mut c, "a");
        let _b = host(&mut c, "b");
        clock.advance(ms(400));
        c.heard("b");
        clock.advance(ms(100));
        assert!(c.overdue().is_empty(), "exactly the timeout is not past it");
        clock.advance(ms(1));
        assert_eq!(c.overdue(), vec!["a".to_string()]);
        clock.advance(ms(400));
        assert_eq!(c.overdue().len(), 2);
        assert_eq!(c.report().hosts[1].last_heartbeat_ms, 501);
    }

    #[test]
    fn test_unreleased_vip_goes_to_the_next_host_only_after_expiry_and_margin() {
        let clock = ManualClock::default();
        let config = ClusterConfig::default(); // lease 1 s, margin 200 ms
        let cluster = Cluster::with_clock(config, Arc::new(clock.clone()));
        let mut c = cluster.lock();
        let (_a, _b) = (host(&mut c, "a"), host(&mut c, "b"));
        let v = "198.18.0.100/24";
        c.assign_vip(v, "a");
        assert!(matches!(c.lease_acquire("a", v, 1), M::LeaseGranted { .. }));
        clock.advance(ms(300));
        // a is cut off: it never renews nor releases. b is assigned.
        c.assign_vip(v, "b");
        let M::LeaseHeld { retry_ms, .. } = c.lease_acquire("b", v, 2) else {
            panic!("held while a's lease may still run");
        };
        assert_eq!(
            retry_ms, 901,
            "1 s lease + 200 ms margin - 300 ms, rounded up"
        );
        clock.advance(ms(899));
        assert!(matches!(c.lease_acquire("b", v, 3), M::LeaseHeld { .. }));
        clock.advance(ms(1));
        assert!(matches!(c.lease_acquire("b", v, 4), M::LeaseGranted { .. }));
        // a's late renewal is refused: it must already have dropped the VIP.
        assert!(matches!(c.lease_renew("a", v, 1, 5), M::LeaseLost { .. }));
    }

    #[test]
    fn test_lost_host_is_reported_to_jobs_and_stops_receiving() {
        let cluster = Cluster::new(ClusterConfig::default());
        let mut c = cluster.lock();
        let mut a = host(&mut c, "a");
        let (events, mut rx) = mpsc::unbounded_channel();
        let (stop, _) = watch::channel(crate::supervisor::StopRequest::Run);
        let job = JobId::new("j").expect("job");
        c.jobs.insert(
            job.clone(),
            JobEntry {
                events,
                status: crate::cluster::wire::job_status_cell(&job, lazarus_storage::Epoch(1)),
                stop,
                vips: Vec::new(),
                submission: None,
                task: None,
            },
        );
        assert!(c.send("a", M::Heartbeat));
        c.lose("a", "test");
        assert_eq!(rx.try_recv().ok(), Some(FleetEvent::HostLost("a".into())));
        assert!(!c.send("a", M::Heartbeat), "a lost host gets nothing");
        assert!(c.alive().is_empty());
        assert_eq!(
            drain(&mut a).len(),
            1,
            "only the heartbeat sent before the loss"
        );
        // It comes back: a fresh, live registration.
        let _a2 = host(&mut c, "a");
        assert_eq!(c.alive().len(), 1);
    }
}
