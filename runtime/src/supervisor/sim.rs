//! A deterministic simulation around the [`JobController`]: a fake fleet
//! (hosts that crash and come back; workers that are killed, stall, fail or
//! fail fatally; standbys that die), a fake store (commits that succeed,
//! fail, are slow, or are fenced by another writer) and a manual clock, all
//! driven from one seed. After every step the invariants of the controller's
//! module documentation are checked against the simulated world. Some
//! schedules also lose the supervisor: a new leader's controller adopts the
//! job from the old one's [`Adoption`] record, as on an HA cluster, while
//! the processes run on and rejoin.
//!
//! Run: `cargo nextest run -p lazarus supervisor::sim` (10,000 schedules;
//! `LAZARUS_SIM_SCHEDULES=N` for more or fewer). A failing schedule prints
//! its seed; `LAZARUS_SIM_SEED=S` replays just that one with a trace of
//! every fact and action.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lazarus_sdk::protocol::{Rejoin, ToSupervisor, ToWorker};
use lazarus_storage::{CheckpointId, Epoch, WorkerId, WorkerSnapshot};

#[allow(unused_imports)]
use super::controller::Adoption;
use super::controller::{Action, ConnId, ControllerConfig, Fact, JobController, JobState};
use crate::procs::{ExitKind, Slot, WorkerExited};
use crate::spec::JobSpec;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// splitmix64: small, seedable, good enough for schedules.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn between(&mut self, lo: u64, hi: u64) -> Duration {
        ms(lo + self.below(hi - lo + 1))
    }
}

/// The job specs the simulation runs: every standby kind, with VIPs; the
/// third has independent regions (active-active instances and a separate
/// pipeline), so a failure restarts only its region.
const SPECS: [&str; 3] = [
    r#"
[job]
name = "sim"
worker = "/bin/true"
heartbeat_interval = "20ms"
heartbeat_timeout = "100ms"
[checkpoint]
interval = "30ms"
timeout = "400ms"
[restart]
max_attempts = 12
backoff = "5ms"
max_backoff = "40ms"
[[operator]]
name = "src"
kind = "s"
standby = "hot"
[[operator]]
name = "count"
kind = "c"
parallelism = 2
standby = "cold"
[[operator]]
name = "kv"
kind = "k"
standby = "hot"
vip = "198.18.0.100/24"
port = 8080
[[edge]]
from = "src"
to = "count"
partition = "hash"
[[edge]]
from = "count"
to = "kv"
partition = "hash"
"#,
    r#"
[job]
name = "sim"
worker = "/bin/true"
heartbeat_interval = "20ms"
heartbeat_timeout = "100ms"
[checkpoint]
interval = "20ms"
timeout = "300ms"
max_concurrent = 2
[restart]
max_attempts = 8
backoff = "1ms"
max_backoff = "20ms"
[[operator]]
name = "svc"
kind = "k"
standby = "hot"
vip = "198.18.0.101/24"
port = 8080
[[operator]]
name = "sink"
kind = "s"
standby = "none"
[[edge]]
from = "svc"
to = "sink"
partition = "forward"
"#,
    r#"
[job]
name = "sim"
worker = "/bin/true"
heartbeat_interval = "20ms"
heartbeat_timeout = "100ms"
[checkpoint]
interval = "25ms"
timeout = "300ms"
[restart]
max_attempts = 12
backoff = "2ms"
max_backoff = "30ms"
[[operator]]
name = "kv"
kind = "k"
parallelism = 2
standby = "none"
failback = "60ms"
vips = ["198.18.0.100/24", "198.18.0.101/24"]
port = 8080
[[operator]]
name = "src"
kind = "s"
standby = "none"
[[operator]]
name = "sink"
kind = "t"
standby = "cold"
[[edge]]
from = "src"
to = "sink"
partition = "forward"
"#,
];

/// What happens in the world, at a time.
#[derive(Debug, Clone)]
enum Event {
    /// Deliver a fact to the controller.
    Deliver(Fact),
    /// The controller's periodic tick.
    Tick,
    /// Live, assigned primaries send heartbeats.
    Heartbeats,
    /// A fault is injected.
    Fault,
    /// A process (by pid) reacts to a message.
    Worker { pid: u64, msg: ToWorker },
    /// A process reads `Start`, sent while its assignment was of `epoch`
    /// (a process halted and assigned anew since read it before its halt:
    /// it has no effect now).
    Start {
        pid: u64,
        msg: ToWorker,
        epoch: Option<Epoch>,
    },
    /// A crashed host comes back.
    HostBack(String),
    /// The host-loss detector notices a crashed or cut-off host.
    DetectLoss(String),
    /// A cut-off host's agent fences itself (one lease after the cut): its
    /// processes die, unseen.
    Fence(String),
    /// The supervisor dies; a new leader adopts the job.
    LeaderChange,
}

#[derive(Debug, Clone)]
struct SimProc {
    worker: WorkerId,
    slot: Slot,
    host: String,
    attempt: u64,
    conn: Option<ConnId>,
    alive: bool,
    stalled: bool,
    assigned: bool,
    source: bool,
    /// A primary that said it runs (it survives a leader change).
    running: bool,
    /// The newest checkpoint it snapshotted.
    snap: Option<CheckpointId>,
    /// A source that said it ran dry.
    exhausted: bool,
    /// When it died with its exit reported (on its way for up to 3 ms).
    died_at: Option<Duration>,
    /// A standby whose health check says down (its agent's view).
    down: bool,
    /// What the current controller was told of it.
    down_told: bool,
    /// A worker taken over into another process (that pid): no agent
    /// knows it, no exit is reported for it, it dies with its host
    /// process or its connection.
    guest_of: Option<u64>,
    /// A source's replay target from its assignment (records to emit
    /// again before it reports `Replayed`).
    replay: Option<u64>,
    /// The epoch of its last assignment (its reports carry it).
    epoch: Option<Epoch>,
    /// The epoch of the last `Listening` of it the controller was handed.
    listened: Option<Epoch>,
}

#[derive(Debug)]
struct SimStore {
    /// Highest claimed epoch.
    epoch: Epoch,
    /// Committed manifests: id → epoch.
    committed: BTreeMap<CheckpointId, Epoch>,
    /// Committed (visible) manifests whose commit has not been answered
    /// yet: not durable. No sink may publish from one (rule 2).
    not_durable: BTreeSet<CheckpointId>,
    /// Of those, the ones whose sync will fail: the store withdraws them
    /// (no reader lists them again) as their commit answers `CommitFailed`.
    sync_fails: BTreeSet<CheckpointId>,
}

impl SimStore {
    /// The newest committed checkpoint a reader would restore (the zombie
    /// rule: a manifest whose epoch is lower than a smaller id's is skipped).
    fn latest(&self) -> Option<CheckpointId> {
        let mut best: Option<(CheckpointId, Epoch)> = None;
        for (id, e) in &self.committed {
            if best.is_none_or(|(_, be)| *e >= be) {
                best = Some((*id, *e));
            }
        }
        best.map(|(id, _)| id)
    }
}

/// Why a job may end (rule 6).
#[derive(Debug, Default)]
struct Causes {
    stop: bool,
    fatal: bool,
    fenced: bool,
    exhausted: bool,
}

struct World {
    seed: u64,
    rng: Rng,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(Duration, u64, usize)>>,
    events: Vec<Option<Event>>,
    ctl: JobController,
    plan_sources: BTreeSet<WorkerId>,
    plan: Vec<WorkerId>,
    hosts: BTreeMap<String, bool>,
    /// Hosts the controller was told are lost (and not back).
    known_lost: BTreeSet<String>,
    procs: BTreeMap<u64, SimProc>,
    next_pid: u64,
    next_conn: u64,
    conn_pid: BTreeMap<ConnId, u64>,
    store: SimStore,
    vips: BTreeMap<String, String>,
    causes: Causes,
    faults: bool,
    trace: bool,
    newest_seen: Option<CheckpointId>,
    epoch_seen: Epoch,
    max_restarts: u32,
    /// Keep a log of every action (scripted scenarios read it).
    record: bool,
    log: Vec<(Duration, Action)>,
    /// Every commit takes this long (scripted scenarios).
    slow_commits: Option<Duration>,
    /// Every retention pass takes this long (scripted scenarios).
    slow_retention: Option<Duration>,
    /// The controller's settings (a new leader builds its own from them).
    cfg: ControllerConfig,
    /// Leader changes so far.
    leader_changes: u32,
    /// Standbys the controller was told are down by their health check.
    standby_downs: u32,
    /// A source given a replay target reports `Replayed` this long after
    /// it starts (scripted scenarios; by default it never does).
    replayed_after: Option<Duration>,
}

impl World {
    fn new(seed: u64, faults: bool, spec: usize) -> World {
        World::with_hosts(seed, faults, spec, None)
    }

    fn with_hosts(seed: u64, faults: bool, spec: usize, hosts: Option<usize>) -> World {
        World::with_spec(seed, faults, SPECS[spec % SPECS.len()], hosts)
    }

    fn with_spec(seed: u64, faults: bool, text: &str, hosts: Option<usize>) -> World {
        Self::with_spec_and(seed, faults, text, hosts, |_| {})
    }

    /// As [`World::with_spec`], with the controller's settings changed by
    /// `tweak` first.
    fn with_spec_and(
        seed: u64,
        faults: bool,
        text: &str,
        hosts: Option<usize>,
        tweak: impl FnOnce(&mut ControllerConfig),
    ) -> World {
        let mut rng = Rng(seed);
        let spec = JobSpec::parse(text, "sim.toml", PathBuf::from("/"))
            .expect("the simulation's spec parses");
        let plan = spec.plan();
        let mut cfg = ControllerConfig::from_spec(&spec);
        cfg.retention_every = ms(100);
        cfg.startup_timeout = ms(2000);
        cfg.vips = true;
        cfg.root_cause_wait = ms(10);
        cfg.drain_timeout = ms(500);
        tweak(&mut cfg);
        let n_hosts = hosts.unwrap_or(2 + rng.below(3) as usize);
        let hosts: BTreeMap<String, bool> = (0..n_hosts).map(|i| (format!("h{i}"), true)).collect();
        let store = SimStore {
            epoch: Epoch(1),
            committed: BTreeMap::new(),
            not_durable: BTreeSet::new(),
            sync_fails: BTreeSet::new(),
        };
        let max_restarts = cfg.restart.max_attempts;
        let ctl = JobController::new(
            cfg.clone(),
            Epoch(1),
            CheckpointId(1),
            None,
            hosts.keys().cloned().collect(),
        );
        World {
            seed,
            rng,
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            ctl,
            plan_sources: plan
                .iter()
                .filter(|w| w.is_source)
                .map(|w| w.id.clone())
                .collect(),
            plan: plan.iter().map(|w| w.id.clone()).collect(),
            hosts,
            known_lost: BTreeSet::new(),
            procs: BTreeMap::new(),
            next_pid: 1,
            next_conn: 1,
            conn_pid: BTreeMap::new(),
            store,
            vips: BTreeMap::new(),
            causes: Causes::default(),
            faults,
            trace: false,
            newest_seen: None,
            epoch_seen: Epoch(1),
            max_restarts,
            record: false,
            log: Vec::new(),
            slow_commits: None,
            slow_retention: None,
            cfg,
            leader_changes: 0,
            standby_downs: 0,
            replayed_after: None,
        }
    }

    fn at(&mut self, after: Duration, ev: Event) {
        self.seq += 1;
        self.events.push(Some(ev));
        self.queue.push(std::cmp::Reverse((
            self.now + after,
            self.seq,
            self.events.len() - 1,
        )));
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "simulation seed {} at {:?}: invariant broken: {what}\n  replay: LAZARUS_SIM_SEED={} cargo nextest run -p lazarus supervisor::sim --no-capture",
            self.seed, self.now, self.seed
        );
    }

    fn start(&mut self) {
        let actions = self.ctl.start(self.now);
        self.apply(actions);
        self.at(ms(10), Event::Tick);
        self.at(ms(20), Event::Heartbeats);
        if self.faults {
            let d = self.rng.between(20, 150);
            self.at(d, Event::Fault);
        }
    }

    /// Runs events until `until` (virtual time) or the job ends.
    fn run_until(&mut self, until: Duration) {
        while !self.ctl.is_ended() && self.step_next(until) {}
        self.now = self.now.max(until.min(self.now + ms(1)));
    }

    /// Runs the next event if it is due by `until`; false if none is.
    fn step_next(&mut self, until: Duration) -> bool {
        let Some(std::cmp::Reverse((t, _, i))) = self.queue.peek().copied() else {
            return false;
        };
        if t > until {
            return false;
        }
        self.queue.pop();
        self.now = t;
        if let Some(ev) = self.events[i].take() {
            self.step(ev);
        }
        true
    }

    fn deliver(&mut self, fact: Fact) {
        if self.trace {
            eprintln!("{:>8.1?} fact {fact:?}", self.now);
        }
        if let Fact::CommitDone { checkpoint, .. } = &fact {
            self.store.not_durable.remove(checkpoint);
        }
        if let Fact::CommitFailed { checkpoint, .. } = &fact {
            if self.store.sync_fails.remove(checkpoint) {
                self.store.committed.remove(checkpoint);
                self.store.not_durable.remove(checkpoint);
            }
        }
        if let Fact::HostLost(h) = &fact {
            self.known_lost.insert(h.clone());
        }
        if let Fact::Message {
            conn,
            msg: ToSupervisor::Listening { epoch, .. },
        } = &fact
        {
            if let Some(p) = self
                .conn_pid
                .get(conn)
                .and_then(|pid| self.procs.get_mut(pid))
            {
                p.listened = *epoch;
            }
        }
        if let Fact::HostJoined(h) = &fact {
            self.known_lost.remove(h);
        }
        if let Fact::StandbyHealth { worker, host, up } = &fact {
            for p in self.procs.values_mut().filter(|p| {
                p.alive && p.slot == Slot::Standby && p.worker == *worker && p.host == *host
            }) {
                p.down_told = !up;
                self.standby_downs += u32::from(!up);
            }
        }
        let actions = self.ctl.handle(self.now, fact);
        self.apply(actions);
    }

    fn step(&mut self, ev: Event) {
        match ev {
            Event::Deliver(f) => self.deliver(f),
            Event::Tick => {
                self.deliver(Fact::Tick);
                self.at(ms(5), Event::Tick);
            }
            Event::Heartbeats => {
                let beats: Vec<ConnId> = self
                    .procs
                    .values()
                    .filter(|p| p.alive && !p.stalled && p.assigned && p.slot == Slot::Primary)
                    .filter(|p| self.hosts.get(&p.host) == Some(&true))
                    .filter_map(|p| p.conn)
                    .collect();
                for conn in beats {
                    let d = self.rng.between(0, 3);
                    let msg = ToSupervisor::Heartbeat { records_in: 1 };
                    self.at(d, Event::Deliver(Fact::Message { conn, msg }));
                }
                self.at(ms(20), Event::Heartbeats);
            }
            Event::Fault => {
                self.fault();
                let d = self.rng.between(30, 400);
                self.at(d, Event::Fault);
            }
            Event::Worker { pid, msg } => self.worker_reacts(pid, msg),
            Event::Start { pid, msg, epoch } => {
                if self
                    .procs
                    .get(&pid)
                    .is_some_and(|p| p.assigned && p.epoch == epoch)
                {
                    self.worker_reacts(pid, msg);
                }
            }
            Event::HostBack(h) => {
                // An agent that lost its session fenced itself before it
                // registers again.
                for p in self.procs.values_mut().filter(|p| p.host == h) {
                    p.alive = false;
                }
                self.hosts.insert(h.clone(), true);
                let d = self.rng.between(1, 5);
                self.at(d, Event::Deliver(Fact::HostJoined(h)));
            }
            Event::Fence(h) => {
                if self.hosts.get(&h) == Some(&false) {
                    for p in self.procs.values_mut().filter(|p| p.host == h) {
                        p.alive = false;
                    }
                }
            }
            Event::LeaderChange => self.leader_change(),
            Event::DetectLoss(h) => {
                if self.hosts.get(&h) == Some(&false) {
                    self.deliver(Fact::HostLost(h.clone()));
                    let d = self.rng.between(50, 800);
                    self.at(d, Event::HostBack(h));
                }
            }
        }
        self.check();
    }

    /// A process dies; its exit and its connection's close are reported
    /// (in either order) unless its host is down.
    fn die(&mut self, pid: u64, exit: ExitKind) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if !p.alive {
            return;
        }
        p.alive = false;
        p.died_at = Some(self.now);
        let p = p.clone();
        // What runs inside it dies with it.
        for guest in self.live_pids(|g| g.guest_of == Some(pid)) {
            self.die(guest, exit.clone());
        }
        if self.hosts.get(&p.host) != Some(&true) {
            return;
        }
        if p.guest_of.is_some() {
            // Only its connection tells: no agent reports it.
            if let Some(conn) = p.conn {
                let d = self.rng.between(0, 3);
                self.at(d, Event::Deliver(Fact::Closed { conn }));
            }
            return;
        }
        let exited = WorkerExited {
            worker: p.worker.clone(),
            attempt: p.attempt,
            standby: p.slot == Slot::Standby,
            host: p.host.clone(),
            exit,
            detail: None,
        };
        let d1 = self.rng.between(0, 3);
        self.at(d1, Event::Deliver(Fact::Exited(exited)));
        if let Some(conn) = p.conn {
            let d2 = self.rng.between(0, 3);
            self.at(d2, Event::Deliver(Fact::Closed { conn }));
        }
    }

    fn live_pids(&self, f: impl Fn(&SimProc) -> bool) -> Vec<u64> {
        self.procs
            .iter()
            .filter(|(_, p)| p.alive && f(p))
            .map(|(pid, _)| *pid)
            .collect()
    }

    fn fault(&mut self) {
        match self.rng.below(100) {
            // SIGKILL of a primary's process (what runs inside dies too).
            0..=29 => {
                let pids = self.live_pids(|p| p.slot == Slot::Primary && p.guest_of.is_none());
                if let Some(&pid) = pids.get(self.rng.below(pids.len() as u64) as usize) {
                    self.die(pid, ExitKind::Signal(9));
                }
            }
            // A standby dies.
            30..=39 => {
                let pids = self.live_pids(|p| p.slot == Slot::Standby);
                if let Some(&pid) = pids.get(self.rng.below(pids.len() as u64) as usize) {
                    self.die(pid, ExitKind::Code(1));
                }
            }
            // A primary stalls (SIGSTOP): no heartbeats, no messages.
            40..=47 => {
                let pids = self
                    .live_pids(|p| p.slot == Slot::Primary && p.assigned && p.guest_of.is_none());
                if let Some(&pid) = pids.get(self.rng.below(pids.len() as u64) as usize) {
                    for q in self.live_pids(|q| q.guest_of == Some(pid)) {
                        if let Some(q) = self.procs.get_mut(&q) {
                            q.stalled = true;
                        }
                    }
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.stalled = true;
                    }
                }
            }
            // A host crashes: its processes die unseen; the loss is
            // detected a host timeout later.
            48..=62 => {
                if let Some(h) = self.take_down_a_host() {
                    for p in self.procs.values_mut().filter(|p| p.host == h) {
                        p.alive = false;
                    }
                    let d = self.rng.between(20, 60);
                    self.at(d, Event::DetectLoss(h));
                }
            }
            // A host is cut off: its processes run on, unheard and unreached,
            // until its agent fences them one lease later.
            78..=85 => {
                if let Some(h) = self.take_down_a_host() {
                    let d = self.rng.between(20, 60);
                    self.at(d, Event::DetectLoss(h.clone()));
                    let f = self.rng.between(100, 200);
                    self.at(f, Event::Fence(h));
                }
            }
            // A worker reports a retryable failure and exits.
            63..=72 => {
                let pids = self.live_pids(|p| p.slot == Slot::Primary && p.conn.is_some());
                if let Some(&pid) = pids.get(self.rng.below(pids.len() as u64) as usize) {
                    let conn = self.procs[&pid].conn.expect("filtered");
                    let fatal = self.rng.chance(30);
                    let msg = ToSupervisor::Failed {
                        error: "boom".into(),
                        fatal,
                        epoch: self.procs[&pid].epoch,
                    };
                    self.at(ms(0), Event::Deliver(Fact::Message { conn, msg }));
                    self.causes.fatal |= fatal;
                    if fatal || self.rng.chance(500) {
                        self.die(pid, ExitKind::Code(1));
                    } else if let Some(p) = self.procs.get_mut(&pid) {
                        // The SDK's way: it stops its assignment and waits
                        // to be rolled back in place.
                        p.running = false;
                        p.assigned = false;
                        p.exhausted = false;
                    }
                }
            }
            // Every source runs dry: the job finishes with a final checkpoint.
            73..=75 => {
                let pids = self.live_pids(|p| p.source && p.assigned && p.slot == Slot::Primary);
                for pid in pids {
                    // It ran dry whether or not a leader hears it now.
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.exhausted = true;
                        self.causes.exhausted = true;
                    }
                    if let Some(conn) = self.procs[&pid].conn {
                        self.causes.exhausted = true;
                        let msg = ToSupervisor::SourceExhausted;
                        self.at(ms(1), Event::Deliver(Fact::Message { conn, msg }));
                    }
                }
            }
            // Someone stops the job.
            76 => {
                self.causes.stop = true;
                self.at(
                    ms(0),
                    Event::Deliver(Fact::StopRequested {
                        final_checkpoint: false,
                    }),
                );
            }
            // The supervisor dies; another adopts the job.
            86..=91 => self.at(ms(0), Event::LeaderChange),
            // A standby's health check goes down (or up again): its agent
            // tells the supervisor a moment later.
            92..=96 => {
                let pids = self.live_pids(|p| p.slot == Slot::Standby);
                if let Some(&pid) = pids.get(self.rng.below(pids.len() as u64) as usize) {
                    let p = self.procs.get_mut(&pid).expect("listed");
                    p.down = !p.down;
                    let fact = Fact::StandbyHealth {
                        worker: p.worker.clone(),
                        host: p.host.clone(),
                        up: !p.down,
                    };
                    let d = self.rng.between(0, 3);
                    self.at(d, Event::Deliver(fact));
                }
            }
            // Another writer claims a newer epoch (a second supervisor).
            77 if self.rng.chance(100) => {
                self.store.epoch = Epoch(self.store.epoch.0 + 50);
                self.causes.fenced = true;
            }
            _ => {}
        }
    }

    /// The supervisor dies: everything in flight to it is lost, its sockets
    /// close, and a new leader (a higher epoch) adopts the job from the old
    /// controller's record. Processes that cannot rejoin (a primary not yet
    /// running, a standby not yet following) exit on losing their control
    /// connection; the rest run on until a ticket reaches them through
    /// their agent, which registers with the new leader a little later.
    /// Half the time an agent registered already as the new leader starts
    /// (it is among the hosts the job starts with) and its join event
    /// follows all the same, as a real supervisor's can.
    fn leader_change(&mut self) {
        let early = self.rng.chance(500);
        self.leader_change_with(early);
    }

    /// [`Self::leader_change`], the agents registered before the new leader
    /// starts the job (`early`) or only after.
    fn leader_change_with(&mut self, early: bool) {
        if self.ctl.is_ended() {
            return;
        }
        self.leader_changes += 1;
        let record = self.ctl.adoption();
        for e in self.events.iter_mut() {
            if matches!(e, Some(Event::Deliver(_))) {
                *e = None;
            }
        }
        self.conn_pid.clear();
        self.known_lost.clear();
        // A commit the old leader had in flight: the new one restores what
        // the store shows, as it always did.
        for withdrawn in std::mem::take(&mut self.store.sync_fails) {
            self.store.committed.remove(&withdrawn);
        }
        self.store.not_durable.clear();
        let mut lost = Vec::new();
        for (pid, p) in self.procs.iter_mut().filter(|(_, p)| p.alive) {
            p.conn = None;
            let rejoinable = match p.slot {
                // A taken-over worker ends with its connection.
                Slot::Primary => p.running && p.guest_of.is_none(),
                Slot::Standby => p.assigned,
            };
            if !rejoinable {
                lost.push(*pid);
            }
        }
        for pid in lost {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.alive = false;
            }
        }
        let epoch = Epoch(self.store.epoch.0 + 1000);
        self.store.epoch = epoch;
        let latest = self.store.latest();
        let next = latest.map_or(CheckpointId(1), |c| c.next());
        let up = self.up_hosts();
        let registered = if early {
            up.iter().cloned().collect()
        } else {
            BTreeSet::new()
        };
        let mut ctl = JobController::new(self.cfg.clone(), epoch, next, latest, registered);
        if self.trace {
            eprintln!("{:>8.1?} LEADER CHANGE: adopting {record:?}", self.now);
        }
        let actions = ctl.adopt(self.now, record);
        self.ctl = ctl;
        self.newest_seen = self.newest_seen.min(latest);
        self.epoch_seen = epoch;
        self.apply(actions);
        // The new controller knows nothing of health checks until each
        // agent registers and reports its standbys that are down.
        for p in self.procs.values_mut() {
            p.down_told = false;
        }
        for h in up {
            // An early agent's join event was queued as the job started:
            // it comes before any process used its ticket.
            let d = if early {
                self.rng.between(0, 1)
            } else {
                self.rng.between(5, 80)
            };
            self.at(d, Event::Deliver(Fact::HostJoined(h.clone())));
            let down: Vec<Fact> = self
                .procs
                .values()
                .filter(|p| p.alive && p.down && p.slot == Slot::Standby && p.host == h)
                .map(|p| Fact::StandbyHealth {
                    worker: p.worker.clone(),
                    host: h.clone(),
                    up: false,
                })
                .collect();
            for f in down {
                self.at(d + ms(1), Event::Deliver(f));
            }
        }
    }

    /// The hosts up now.
    fn up_hosts(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, a)| **a)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Marks a random up host down, if at least one other stays up.
    fn take_down_a_host(&mut self) -> Option<String> {
        let up = self.up_hosts();
        if up.len() < 2 {
            return None;
        }
        let h = up[self.rng.below(up.len() as u64) as usize].clone();
        self.hosts.insert(h.clone(), false);
        Some(h)
    }

    fn apply(&mut self, actions: Vec<Action>) {
        let mut vip_checks = Vec::new();
        for a in actions {
            if self.trace {
                eprintln!("{:>8.1?}   action {a:?}", self.now);
            }
            if self.record {
                self.log.push((self.now, a.clone()));
            }
            match a {
                Action::Spawn {
                    host,
                    worker,
                    attempt,
                    slot,
                } => {
                    self.no_lost_host(&host, "spawn");
                    self.start_proc(host, worker, attempt, slot, None);
                }
                Action::Adopt {
                    conn,
                    host,
                    worker,
                    attempt,
                    into,
                } => {
                    self.no_lost_host(&host, "take a worker over on");
                    match self.conn_pid.get(&conn).and_then(|p| self.procs.get(p)) {
                        Some(p) if p.worker != into || p.host != host => self.fail(&format!(
                            "{worker} taken over into {into} on {host} through the connection of {} on {}",
                            p.worker, p.host
                        )),
                        _ => {}
                    }
                    if let Some(&pid) = self.conn_pid.get(&conn) {
                        let d = self.rng.between(0, 2);
                        let msg = ToWorker::Adopt {
                            worker,
                            attempt,
                            token: String::new(),
                        };
                        self.at(d, Event::Worker { pid, msg });
                    }
                }
                Action::Promote {
                    host,
                    worker,
                    attempt,
                } => {
                    self.no_lost_host(&host, "promote");
                    let pid = self.live_pids(|p| {
                        p.worker == worker && p.slot == Slot::Standby && p.host == host
                    });
                    match pid.first() {
                        Some(pid) => {
                            if self.procs[pid].down_told {
                                self.fail(&format!(
                                    "promoted {worker}'s standby on {host}, which its health check says is down"
                                ));
                            }
                            let p = self.procs.get_mut(pid).expect("listed");
                            p.slot = Slot::Primary;
                            p.attempt = attempt;
                        }
                        // It died a moment ago and its exit (as a standby)
                        // is on its way: the agent finds nothing to promote.
                        None if self.procs.values().any(|p| {
                            p.worker == worker && p.slot == Slot::Standby && p.host == host
                        }) => {}
                        None => self.fail(&format!(
                            "promoted {worker} on {host}, where no standby process ever ran"
                        )),
                    }
                }
                Action::Kill { host, worker, slot } => {
                    self.no_lost_host(&host, "kill");
                    for pid in self.live_pids(|p| {
                        p.worker == worker
                            && p.slot == slot
                            && p.host == host
                            && p.guest_of.is_none()
                    }) {
                        self.die(pid, ExitKind::Signal(9));
                    }
                }
                Action::Retag {
                    host,
                    worker,
                    attempt,
                } => {
                    self.no_lost_host(&host, "retag a process on");
                    for pid in self.live_pids(|p| {
                        p.worker == worker
                            && p.slot == Slot::Primary
                            && p.host == host
                            && p.guest_of.is_none()
                    }) {
                        if let Some(p) = self.procs.get_mut(&pid) {
                            p.attempt = attempt;
                        }
                    }
                }
                Action::KillAll { standbys } => {
                    for pid in self.live_pids(|p| {
                        (standbys || p.slot == Slot::Primary) && p.guest_of.is_none()
                    }) {
                        self.die(pid, ExitKind::Signal(9));
                    }
                }
                Action::AssignVip { vip, host } => {
                    self.no_lost_host(&host, "assign a VIP to");
                    self.vips.insert(vip.clone(), host.clone());
                    vip_checks.push((vip, host));
                }
                Action::UnassignVip { vip } => {
                    self.vips.remove(&vip);
                }
                Action::Assign {
                    conn,
                    worker,
                    restore,
                    restore_pending,
                    standby,
                    epoch,
                    replay,
                    ..
                } => {
                    if !standby {
                        // Sinks recover what they are told to restore at
                        // once, unless it is marked pending.
                        let visible_only =
                            restore.is_some_and(|n| self.store.not_durable.contains(&n));
                        if visible_only != restore_pending {
                            self.fail(&format!(
                                "{worker} restores {restore:?} marked pending {restore_pending}, durable {}",
                                !visible_only
                            ));
                        }
                        // Rule 2: a recovery restores the newest committed
                        // checkpoint (and works under the newest epoch).
                        if restore != self.store.latest() {
                            self.fail(&format!(
                                "{worker} restores {restore:?}, the newest committed is {:?}",
                                self.store.latest()
                            ));
                        }
                        if epoch < self.epoch_seen {
                            self.fail("an assignment under an old epoch");
                        }
                    }
                    let Some(&pid) = self.conn_pid.get(&conn) else {
                        continue;
                    };
                    if self.procs.get(&pid).is_some_and(|p| p.stalled || !p.alive) {
                        // A stalled process reads nothing.
                        continue;
                    }
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.assigned = true;
                        p.replay = replay;
                        p.epoch = Some(epoch);
                    }
                    if !standby {
                        let d = self.rng.between(1, 6);
                        let msg = ToSupervisor::Listening {
                            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
                            fetched_bytes: 0,
                            in_flight_records: 0,
                            epoch: Some(epoch),
                        };
                        self.at(d, Event::Deliver(Fact::Message { conn, msg }));
                    }
                }
                Action::Send {
                    conn,
                    msg: ToWorker::Halt,
                } => {
                    // In order with what follows on the connection: the
                    // process drops its assignment before the next arrives.
                    if let Some(p) = self
                        .conn_pid
                        .get(&conn)
                        .and_then(|pid| self.procs.get_mut(pid))
                    {
                        if p.alive && !p.stalled {
                            p.running = false;
                            p.assigned = false;
                            p.exhausted = false;
                        }
                    }
                }
                Action::Send {
                    conn,
                    msg: msg @ ToWorker::Start { .. },
                } => {
                    if let Some(&pid) = self.conn_pid.get(&conn) {
                        // Only a process that said where it listens for its
                        // current assignment is started (not one whose
                        // word of a halted attempt came late).
                        if let Some(p) = self.procs.get(&pid).filter(|p| p.listened != p.epoch) {
                            let why = format!(
                                "Start sent to {} (assigned under {:?}) on a Listening of {:?}",
                                p.worker, p.epoch, p.listened
                            );
                            self.fail(&why);
                        }
                        let d = self.rng.between(0, 2);
                        let epoch = self.procs.get(&pid).and_then(|p| p.epoch);
                        self.at(d, Event::Start { pid, msg, epoch });
                    }
                }
                Action::Send { conn, msg } => {
                    if let ToWorker::Committed { checkpoint } = &msg {
                        if self.store.not_durable.contains(checkpoint) {
                            self.fail(&format!(
                                "Committed({checkpoint}) sent before its commit is durable"
                            ));
                        }
                    }
                    if let Some(&pid) = self.conn_pid.get(&conn) {
                        let d = self.rng.between(0, 2);
                        self.at(d, Event::Worker { pid, msg });
                    }
                }
                Action::Close { conn } => {
                    // A worker whose control connection closes exits.
                    if let Some(&pid) = self.conn_pid.get(&conn) {
                        if let Some(p) = self.procs.get_mut(&pid) {
                            p.conn = None;
                        }
                        self.conn_pid.remove(&conn);
                        self.die(pid, ExitKind::Code(1));
                    }
                }
                Action::Commit(m) => {
                    let slow = self.faults && self.rng.chance(80);
                    let d = if let Some(d) = self.slow_commits {
                        d
                    } else if slow {
                        self.rng.between(50, 400)
                    } else {
                        self.rng.between(1, 6)
                    };
                    let fact = if m.epoch < self.store.epoch {
                        Fact::CommitFenced {
                            checkpoint: m.checkpoint,
                            epoch: m.epoch,
                            error: "fenced".into(),
                        }
                    } else if self.faults && self.rng.chance(40) {
                        if self.rng.chance(500) {
                            // Put, visible, then its sync fails: the store
                            // withdraws it when the commit answers.
                            self.store.committed.insert(m.checkpoint, m.epoch);
                            self.store.not_durable.insert(m.checkpoint);
                            self.store.sync_fails.insert(m.checkpoint);
                        }
                        Fact::CommitFailed {
                            checkpoint: m.checkpoint,
                            epoch: m.epoch,
                            error: "503 slow down, or the manifest's sync failed".into(),
                        }
                    } else {
                        // Ids only go up (rule: never backwards).
                        if let Some((last, _)) = self.store.committed.last_key_value() {
                            if m.checkpoint <= *last {
                                self.fail(&format!(
                                    "commit {} after {last}: ids went backwards",
                                    m.checkpoint
                                ));
                            }
                        }
                        if m.workers.len() != self.plan.len() {
                            self.fail("a manifest without every worker's ack");
                        }
                        self.store.committed.insert(m.checkpoint, m.epoch);
                        self.store.not_durable.insert(m.checkpoint);
                        Fact::CommitDone {
                            checkpoint: m.checkpoint,
                            epoch: m.epoch,
                            stored_bytes: 1,
                        }
                    };
                    self.at(d, Event::Deliver(fact));
                }
                Action::ClaimEpoch(e) => {
                    let d = self.rng.between(1, 20);
                    let fact = if self.faults && self.rng.chance(30) {
                        Fact::StorageFailed {
                            error: "timeout".into(),
                        }
                    } else if e <= self.store.epoch && self.causes.fenced {
                        Fact::EpochFenced {
                            error: "fenced".into(),
                        }
                    } else {
                        self.store.epoch = self.store.epoch.max(e);
                        Fact::EpochClaimed {
                            epoch: e,
                            latest: self.store.latest(),
                        }
                    };
                    self.at(d, Event::Deliver(fact));
                }
                Action::Retention { .. } => {
                    let d = match self.slow_retention {
                        Some(d) => d,
                        None => self.rng.between(1, 300),
                    };
                    self.at(d, Event::Deliver(Fact::RetentionDone { retained: None }));
                }
                Action::Rejoin {
                    host,
                    worker,
                    attempt,
                    slot,
                } => {
                    self.no_lost_host(&host, "hand a rejoin ticket on");
                    if self.hosts.get(&host) != Some(&true) {
                        continue;
                    }
                    let here = |p: &SimProc| {
                        p.worker == worker
                            && p.slot == slot
                            && p.host == host
                            && p.attempt == attempt
                    };
                    // A process on a live connection to this leader takes
                    // a second ticket from it for a duplicate (the SDK's
                    // link): it keeps the connection and ignores it.
                    if !self.live_pids(|p| here(p) && p.conn.is_some()).is_empty() {
                        continue;
                    }
                    let pid = self
                        .live_pids(|p| here(p) && p.conn.is_none())
                        .first()
                        .copied();
                    let d = self.rng.between(1, 8);
                    match pid {
                        Some(pid) => {
                            let conn = ConnId(self.next_conn);
                            self.next_conn += 1;
                            self.conn_pid.insert(conn, pid);
                            let p = self.procs.get_mut(&pid).expect("listed");
                            p.conn = Some(conn);
                            let rejoin = Rejoin {
                                running: p.running,
                                checkpoint: p.snap,
                                followed: None,
                                exhausted: p.exhausted,
                            };
                            let hello = Fact::Hello {
                                conn,
                                worker,
                                attempt,
                                standby: slot == Slot::Standby,
                                rejoin: Some(rejoin),
                            };
                            self.at(d, Event::Deliver(hello));
                        }
                        // The agent has no such process: it says so.
                        None => {
                            let exited = WorkerExited {
                                worker,
                                attempt,
                                standby: slot == Slot::Standby,
                                host,
                                exit: ExitKind::SpawnFailed("not running on this host".into()),
                                detail: None,
                            };
                            self.at(d, Event::Deliver(Fact::Exited(exited)));
                        }
                    }
                }
                Action::PruneCaches { .. } | Action::Recovering { .. } => {}
            }
        }
        // Rule 4: a VIP goes to the host of the worker's live primary.
        for (vip, host) in vip_checks {
            // A standby promoted just as it died, or a primary that died
            // just after its (re)joining hello was sent: its exit is on its
            // way (the controller cannot know yet; the exit moves the VIP on).
            let exit_in_flight = |p: &SimProc| {
                p.host == host
                    && (p.slot == Slot::Standby || p.attempt == self.ctl.attempt_of(&p.worker))
                    && p.died_at.is_some_and(|t| self.now <= t + ms(5))
            };
            let ok = self.procs.values().any(|p| {
                p.alive
                    && p.slot == Slot::Primary
                    && p.host == host
                    && p.attempt == self.ctl.attempt_of(&p.worker)
            }) || self.procs.values().any(exit_in_flight)
                || self.hosts.get(&host) != Some(&true);
            if !ok {
                let procs: Vec<_> = self
                    .procs
                    .values()
                    .filter(|p| p.host == host)
                    .map(|p| (p.worker.to_string(), p.slot, p.attempt, p.alive, p.conn))
                    .collect();
                self.fail(&format!(
                    "VIP {vip} assigned to {host}, where no primary of this attempt ({}) runs: {procs:?}",
                    self.ctl.attempt()
                ));
            }
        }
    }

    fn no_lost_host(&self, host: &str, what: &str) {
        if self.known_lost.contains(host) {
            self.fail(&format!("asked to {what} host {host}, known to be lost"));
        }
    }

    /// A process starts (or, with `guest_of`, a worker inside that one) and
    /// says hello.
    fn start_proc(
        &mut self,
        host: String,
        worker: WorkerId,
        attempt: u64,
        slot: Slot,
        guest_of: Option<u64>,
    ) {
        let pid = self.next_pid;
        self.next_pid += 1;
        let alive = self.hosts.get(&host) == Some(&true);
        self.procs.insert(
            pid,
            SimProc {
                source: self.plan_sources.contains(&worker),
                worker: worker.clone(),
                slot,
                host,
                attempt,
                conn: None,
                alive,
                stalled: false,
                assigned: false,
                running: false,
                snap: None,
                exhausted: false,
                died_at: None,
                down: false,
                down_told: false,
                guest_of,
                replay: None,
                epoch: None,
                listened: None,
            },
        );
        if alive {
            let conn = ConnId(self.next_conn);
            self.next_conn += 1;
            self.conn_pid.insert(conn, pid);
            if let Some(p) = self.procs.get_mut(&pid) {
                p.conn = Some(conn);
            }
            let d = self.rng.between(1, 8);
            let hello = Fact::Hello {
                conn,
                worker,
                attempt,
                standby: slot == Slot::Standby,
                rejoin: None,
            };
            self.at(d, Event::Deliver(hello));
        }
    }

    /// A fake worker's reaction to a control message.
    fn worker_reacts(&mut self, pid: u64, msg: ToWorker) {
        let Some(p) = self.procs.get(&pid).cloned() else {
            return;
        };
        if !p.alive || p.stalled || self.hosts.get(&p.host) != Some(&true) {
            return;
        }
        let Some(conn) = p.conn else {
            return;
        };
        match msg {
            ToWorker::Start { .. } => {
                // A worker that runs already would fail on a second start
                // (a region failover starts only the restarted regions).
                if p.running {
                    self.fail(&format!("Start sent to {}, which runs already", p.worker));
                }
                if let Some(q) = self.procs.get_mut(&pid) {
                    q.running = true;
                }
                let d = self.rng.between(1, 5);
                self.at(
                    d,
                    Event::Deliver(Fact::Message {
                        conn,
                        msg: ToSupervisor::Running { epoch: p.epoch },
                    }),
                );
                if let (true, Some(_), Some(after)) = (p.source, p.replay, self.replayed_after) {
                    let msg = ToSupervisor::Replayed;
                    self.at(after, Event::Deliver(Fact::Message { conn, msg }));
                }
            }
            ToWorker::Trigger { .. } if !p.source => {
                // Only an announcement: the barrier comes from the sources.
            }
            ToWorker::Trigger { checkpoint } => {
                // The barrier reaches every current primary (of its own
                // attempt: after a region failover they differ); each acks
                // unless it is stalled or dead.
                let attempts: BTreeMap<WorkerId, u64> = self
                    .plan
                    .iter()
                    .map(|w| (w.clone(), self.ctl.attempt_of(w)))
                    .collect();
                let current_of = |w: &WorkerId| attempts.get(w).copied().unwrap_or(0);
                let acks: Vec<(ConnId, WorkerId)> = self
                    .procs
                    .values()
                    .filter(|q| {
                        q.alive
                            && !q.stalled
                            && q.assigned
                            && q.slot == Slot::Primary
                            && q.attempt == self.ctl.attempt_of(&q.worker)
                    })
                    .filter_map(|q| q.conn.map(|c| (c, q.worker.clone())))
                    .collect();
                for q in self.procs.values_mut().filter(|q| {
                    q.alive
                        && !q.stalled
                        && q.assigned
                        && q.slot == Slot::Primary
                        && q.attempt == current_of(&q.worker)
                }) {
                    q.snap = Some(q.snap.map_or(checkpoint, |s| s.max(checkpoint)));
                }
                for (c, w) in acks {
                    let d = self.rng.between(1, 25);
                    let msg = ToSupervisor::Ack {
                        checkpoint,
                        snapshot: {
                            let _ = w;
                            WorkerSnapshot::default()
                        },
                        pause_us: 10,
                        records: 0,
                    };
                    self.at(d, Event::Deliver(Fact::Message { conn: c, msg }));
                }
            }
            ToWorker::Follow { checkpoint } => {
                let d = self.rng.between(1, 10);
                let msg = ToSupervisor::Followed {
                    checkpoint,
                    fetched_bytes: 1,
                };
                self.at(d, Event::Deliver(Fact::Message { conn, msg }));
            }
            ToWorker::Adopt {
                worker, attempt, ..
            } => {
                if p.slot != Slot::Primary || p.guest_of.is_some() {
                    self.fail(&format!(
                        "{worker} taken over into {}, which is not a primary's own process",
                        p.worker
                    ));
                }
                self.start_proc(p.host.clone(), worker, attempt, Slot::Primary, Some(pid));
            }
            ToWorker::Shutdown => {
                let d = self.rng.between(1, 10);
                self.at(
                    d,
                    Event::Worker {
                        pid,
                        msg: ToWorker::Abort {
                            checkpoint: CheckpointId(0),
                        },
                    },
                );
                // Exits cleanly (modelled as an immediate clean death).
                self.die(pid, ExitKind::Success);
            }
            _ => {}
        }
    }

    /// Invariants that hold after every step.
    fn check(&mut self) {
        // The shell sleeps until the wake time: one not after now would spin.
        if let Some(t) = self.ctl.wake_at(self.now) {
            if t <= self.now {
                self.fail(&format!("wake time {t:?} is not after now"));
            }
        }
        // Rule 3: at most one live primary process per worker among the
        // reachable hosts (a cut-off host's primary runs on until its agent
        // fences it; the VIP lease keeps clients off it meanwhile).
        let mut primaries: BTreeMap<&WorkerId, usize> = BTreeMap::new();
        for p in self
            .procs
            .values()
            .filter(|p| p.alive && p.slot == Slot::Primary)
            .filter(|p| self.hosts.get(&p.host) == Some(&true))
        {
            *primaries.entry(&p.worker).or_default() += 1;
        }
        if let Some((w, n)) = primaries.iter().find(|(_, n)| **n > 1) {
            self.fail(&format!("{n} live primaries of {w}"));
        }
        // A recovery's parts add up to its total.
        if let Some(r) = self.ctl.summary().recoveries.last() {
            if r.drain_ms + r.restore_ms + r.connect_ms != r.total_ms {
                self.fail(&format!("recovery parts do not add up: {r:?}"));
            }
        }
        // Committed checkpoints and epochs never go backwards (but past a
        // checkpoint the store withdrew: its sync failed).
        let newest = self.ctl.newest_committed();
        let withdrawn = self
            .newest_seen
            .is_some_and(|n| !self.store.committed.contains_key(&n));
        if newest < self.newest_seen && !withdrawn {
            self.fail("the newest committed checkpoint went backwards");
        }
        self.newest_seen = newest;
        if self.ctl.epoch() < self.epoch_seen {
            self.fail("the epoch went backwards");
        }
        self.epoch_seen = self.ctl.epoch();
        // Rule 6: a job ends only for a reason it was given.
        if self.ctl.is_ended() {
            let s = self.ctl.summary();
            let ok = match &s.state {
                JobState::Stopped => self.causes.stop,
                JobState::Finished => {
                    self.causes.exhausted && self.store.committed.last_key_value().is_some()
                }
                JobState::Failed(why) if why.contains("fatal error") => self.causes.fatal,
                JobState::Failed(why) if why.starts_with("fenced") => self.causes.fenced,
                JobState::Failed(why) if why.contains("gave up") => s.restarts > self.max_restarts,
                _ => false,
            };
            if !ok {
                self.fail(&format!(
                    "ended as {:?} without a cause for it ({:?})",
                    s.state, self.causes
                ));
            }
        }
    }

    /// Stops the job and requires it to end, with every process gone.
    fn stop_and_settle(&mut self) {
        self.faults = false;
        self.causes.stop = true;
        for p in self.procs.values_mut() {
            p.stalled = false;
        }
        self.deliver(Fact::StopRequested {
            final_checkpoint: false,
        });
        let until = self.now + ms(2000);
        self.run_until(until);
        if !self.ctl.is_ended() {
            self.fail("a stop request did not end the job within 2 s");
        }
        // Remaining exits are reported; the controller forgets every process.
        let until = self.now + ms(100);
        while let Some(std::cmp::Reverse((t, _, i))) = self.queue.peek().copied() {
            if t > until {
                break;
            }
            self.queue.pop();
            self.now = t;
            if let Some(Event::Deliver(
                f @ (Fact::Exited(_) | Fact::Closed { .. } | Fact::HostLost(_)),
            )) = self.events[i].take()
            {
                self.deliver(f);
            }
        }
        if self.ctl.live_processes() > 0 && self.procs.values().any(|p| p.alive) {
            self.fail("processes left running after the job ended");
        }
        if !self.vips.is_empty() {
            self.fail("VIPs left assigned after the job ended");
        }
    }
}

fn schedule(seed: u64, trace: bool) -> (JobState, u32, u32, u32, u32, u32) {
    let mut w = World::new(seed, true, seed as usize);
    w.trace = trace;
    w.start();
    let horizon = ms(1500 + (seed % 7) * 300);
    w.run_until(horizon);
    if !w.ctl.is_ended() {
        w.stop_and_settle();
    } else {
        w.check();
    }
    let s = w.ctl.summary();
    (
        s.state,
        w.leader_changes,
        w.standby_downs,
        s.region_failovers,
        s.takeovers,
        s.kept_processes,
    )
}

#[test]
fn test_random_fault_schedules_keep_the_invariants() {
    if let Ok(seed) = std::env::var("LAZARUS_SIM_SEED") {
        let seed: u64 = seed.parse().expect("LAZARUS_SIM_SEED is a number");
        let (end, changes, ..) = schedule(seed, true);
        eprintln!("seed {seed}: {end:?} after {changes} leader changes");
        return;
    }
    let n: u64 = std::env::var("LAZARUS_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    let mut with_leader_change = 0u64;
    let mut with_standby_down = 0u64;
    let mut with_region_failover = 0u64;
    let mut with_takeover = 0u64;
    let mut with_kept = 0u64;
    for seed in 1..=n {
        let (end, changes, downs, regions, takeovers, kept) = schedule(seed, false);
        with_kept += u64::from(kept > 0);
        with_leader_change += u64::from(changes > 0);
        with_standby_down += u64::from(downs > 0);
        with_region_failover += u64::from(regions > 0);
        with_takeover += u64::from(takeovers > 0);
        let key = match end {
            JobState::Failed(why) if why.contains("fatal") => "failed (fatal)".to_string(),
            JobState::Failed(why) if why.starts_with("fenced") => "failed (fenced)".to_string(),
            JobState::Failed(_) => "failed (gave up)".to_string(),
            other => format!("{:?}", other.kind()).to_lowercase(),
        };
        *ends.entry(key).or_default() += 1;
    }
    eprintln!("{n} schedules ({with_leader_change} with a supervisor failover, {with_standby_down} with a standby down by its health check, {with_region_failover} with a region failover, {with_takeover} with a share taken over into a surviving process, {with_kept} with processes rolled back in place): {ends:?}");
    assert!(
        with_kept * 5 > n,
        "too few schedules roll processes back in place: {with_kept} of {n}"
    );
    assert!(
        with_region_failover * 20 > n,
        "too few schedules recover one region alone: {with_region_failover} of {n}"
    );
    assert!(
        with_takeover * 50 > n,
        "too few schedules take a share over into a surviving process: {with_takeover} of {n}"
    );
    assert!(
        with_leader_change * 5 > n,
        "too few schedules lose their supervisor: {with_leader_change} of {n}"
    );
    assert!(
        with_standby_down * 10 > n,
        "too few schedules have a standby fail its health check: {with_standby_down} of {n}"
    );
    // The schedules must exercise every way of ending, or they test little.
    for k in ["stopped", "finished", "failed (fatal)", "failed (gave up)"] {
        assert!(
            ends.get(k).copied().unwrap_or(0) > 0,
            "no schedule ended {k}: {ends:?}"
        );
    }
}

/// Scripted failover cases on the simulated world: no root, no sockets, no
/// sleeps. Each mirrors a namespace test.
mod scenarios {
    use super::*;

    /// A quiet world (no random faults) with `hosts` hosts, running.
    fn running(spec: usize, hosts: usize) -> World {
        running_spec(SPECS[spec], hosts)
    }

    /// As [`running`], for a spec of the caller's.
    fn running_spec(text: &str, hosts: usize) -> World {
        let mut w = World::with_spec(7, false, text, Some(hosts));
        w.record = true;
        w.start();
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running, "the job runs");
        assert!(w.ctl.newest_committed().is_some(), "and commits");
        w
    }

    fn id(s: &str) -> WorkerId {
        WorkerId::new(s).expect("worker id")
    }

    impl World {
        fn run_for(&mut self, d: Duration) {
            let until = self.now + d;
            self.run_until(until);
        }

        /// `host` crashes: its processes die unseen, and 50 ms pass (its
        /// loss is delivered by the caller).
        fn crash(&mut self, host: &str) {
            self.hosts.insert(host.to_string(), false);
            for p in self.procs.values_mut().filter(|p| p.host == host) {
                p.alive = false;
            }
            self.run_for(ms(50));
        }

        /// The live process of `worker` in `slot`: pid and host.
        fn proc_of(&self, worker: &str, slot: Slot) -> (u64, String) {
            let w = id(worker);
            let pids = self.live_pids(|p| p.worker == w && p.slot == slot);
            assert_eq!(pids.len(), 1, "one live {slot:?} of {worker}");
            (pids[0], self.procs[&pids[0]].host.clone())
        }

        /// Every planned worker's live primary pid.
        fn primary_pids(&self) -> BTreeMap<WorkerId, u64> {
            self.ctl
                .placement()
                .keys()
                .map(|id| (id.clone(), self.proc_of(id.as_str(), Slot::Primary).0))
                .collect()
        }

        /// Process `pid` reports a retryable failure the SDK's way: it
        /// stops its assignment and waits to be rolled back in place.
        fn report_failure(&mut self, pid: u64, error: &str) {
            let conn = self.procs[&pid].conn.expect("connected");
            let msg = ToSupervisor::Failed {
                error: error.into(),
                fatal: false,
                epoch: self.procs[&pid].epoch,
            };
            if let Some(q) = self.procs.get_mut(&pid) {
                q.running = false;
                q.assigned = false;
            }
            self.deliver(Fact::Message { conn, msg });
        }

        /// As the shell after the job's end: events keep coming while
        /// storage work is in flight, up to `until`.
        fn drain_until(&mut self, until: Duration) {
            while (self.ctl.retention_in_flight() || self.ctl.commits_in_flight() > 0)
                && self.step_next(until)
            {}
        }

        fn actions_since(&self, t: Duration) -> Vec<Action> {
            self.log
                .iter()
                .filter(|(at, _)| *at >= t)
                .map(|(_, a)| a.clone())
                .collect()
        }
    }

    /// A periodic checkpoint's trigger reaches every primary: the sources
    /// put the barrier in, the others read their inputs ahead to meet it.
    /// The final checkpoint's reaches only the sources: its barriers align
    /// in order, so it holds no records in flight that no commit follows.
    #[test]
    fn test_triggers_announce_periodic_checkpoints_to_every_primary_but_not_the_final_one() {
        let mut w = running(0, 3);
        let primaries = w.primary_pids();
        let worker_of = |w: &World, conn: ConnId| {
            w.procs
                .values()
                .find(|p| p.conn == Some(conn))
                .map(|p| p.worker.clone())
        };
        let triggered = |w: &World, since: Duration| {
            let mut by: BTreeMap<CheckpointId, BTreeSet<WorkerId>> = BTreeMap::new();
            for a in w.actions_since(since) {
                if let Action::Send {
                    conn,
                    msg: ToWorker::Trigger { checkpoint },
                } = a
                {
                    let who = worker_of(w, conn).expect("a known process");
                    by.entry(checkpoint).or_default().insert(who);
                }
            }
            by
        };
        let all: BTreeSet<WorkerId> = primaries.keys().cloned().collect();
        let periodic = triggered(&w, Duration::ZERO);
        assert!(periodic.len() >= 3, "{periodic:?}");
        for (n, to) in &periodic {
            assert_eq!(to, &all, "checkpoint {n} was announced to every primary");
        }

        // The source runs dry: the job finishes with a final checkpoint.
        let t = w.now;
        let src = primaries[&id("src-0")];
        w.causes.exhausted = true;
        if let Some(p) = w.procs.get_mut(&src) {
            p.exhausted = true;
        }
        let conn = w.procs[&src].conn.expect("connected");
        w.deliver(Fact::Message {
            conn,
            msg: ToSupervisor::SourceExhausted,
        });
        w.run_for(ms(300));
        let last = triggered(&w, t);
        let (n, to) = last.iter().next_back().expect("a final checkpoint");
        assert_eq!(
            to,
            &BTreeSet::from([id("src-0")]),
            "the final checkpoint {n} goes to the sources only: {last:?}"
        );
        assert_eq!(w.ctl.newest_committed(), Some(*n), "and it committed");
        assert_eq!(w.ctl.state(), JobState::Finished);

        // `read_ahead = false`: no worker but the sources hears of one.
        let w = running_spec(
            &SPECS[0].replace("[checkpoint]", "[checkpoint]\nread_ahead = false"),
            3,
        );
        let aligned = triggered(&w, Duration::ZERO);
        assert!(!aligned.is_empty());
        for (n, to) in &aligned {
            assert_eq!(to, &BTreeSet::from([id("src-0")]), "checkpoint {n}");
        }
    }

    /// The final checkpoint's retention pass runs even when a periodic
    /// pass is still running as it commits (that pass listed the
    /// checkpoints before the final one): it starts when that pass ends,
    /// and until then the job's end waits for it.
    #[test]
    fn test_the_final_retention_pass_runs_after_the_one_running() {
        let mut w = running(0, 3);
        let retention = |w: &World, since: Duration| {
            w.actions_since(since)
                .iter()
                .filter(|a| matches!(a, Action::Retention { .. }))
                .count()
        };
        // A pass that takes 10 s starts within one retention interval.
        w.slow_retention = Some(ms(10_000));
        let slow_from = w.now;
        w.run_for(ms(2_500));
        assert_eq!(
            retention(&w, slow_from),
            1,
            "one periodic pass, still running"
        );
        assert!(w.ctl.retention_in_flight());

        let src = w.primary_pids()[&id("src-0")];
        w.causes.exhausted = true;
        if let Some(p) = w.procs.get_mut(&src) {
            p.exhausted = true;
        }
        let conn = w.procs[&src].conn.expect("connected");
        let exhausted_at = w.now;
        w.deliver(Fact::Message {
            conn,
            msg: ToSupervisor::SourceExhausted,
        });
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Finished);
        assert_eq!(
            retention(&w, exhausted_at),
            0,
            "the final pass waits for the running one"
        );
        assert!(
            w.ctl.retention_in_flight(),
            "and the job's end waits for both"
        );

        w.slow_retention = None;
        let until = w.now + ms(10_000);
        w.drain_until(until);
        assert_eq!(
            retention(&w, exhausted_at),
            1,
            "the final checkpoint's pass ran once the other ended"
        );
        assert!(!w.ctl.retention_in_flight());
    }

    #[test]
    fn test_sigkill_with_hot_standby_promotes_the_standby_in_place_and_moves_the_vip() {
        let mut w = running(0, 3);
        let (old, _) = w.proc_of("kv-0", Slot::Primary);
        let (standby, standby_host) = w.proc_of("kv-0", Slot::Standby);
        let epoch = w.ctl.epoch();
        w.die(old, ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        let (now, host) = w.proc_of("kv-0", Slot::Primary);
        assert_eq!(
            now, standby,
            "the standby process itself is the primary now"
        );
        assert_eq!(host, standby_host);
        assert_eq!(
            w.vips.get("198.18.0.100/24"),
            Some(&standby_host),
            "the VIP moved with it"
        );
        assert!(w.ctl.epoch() > epoch, "a recovery claims a new epoch");
        assert_eq!(w.ctl.summary().restarts, 1);
        let (_, new_standby) = w.proc_of("kv-0", Slot::Standby);
        assert_ne!(new_standby, host, "a new standby on another host");
    }

    /// A promoted standby's replacement starts only after the recovery:
    /// once every worker runs again, plus the restart section's
    /// `standby_delay` (its start would take the failover's cores).
    #[test]
    fn test_a_promoted_standby_is_replaced_only_after_the_recovery() {
        let mut w = running(0, 3);
        let (old, _) = w.proc_of("kv-0", Slot::Primary);
        let killed = w.now;
        w.die(old, ExitKind::Signal(9));
        let mut ran = None;
        while w.now < killed + ms(1000) {
            w.run_for(ms(1));
            if ran.is_none() && w.ctl.state() == JobState::Running {
                ran = Some(w.now);
            }
        }
        let ran = ran.expect("recovered");
        let spawned: Vec<Duration> = w
            .log
            .iter()
            .filter(|(at, a)| {
                *at >= killed
                    && matches!(a, Action::Spawn { slot: Slot::Standby, worker, .. } if worker.as_str() == "kv-0")
            })
            .map(|(at, _)| *at)
            .collect();
        assert_eq!(spawned.len(), 1, "one replacement standby: {spawned:?}");
        assert!(
            spawned[0] >= ran + ms(100),
            "started {:?} after the recovery ran, not before its delay",
            spawned[0].saturating_sub(ran)
        );
        assert!(
            spawned[0] <= ran + ms(150),
            "and soon after it: {:?}",
            spawned[0].saturating_sub(ran)
        );
        let (_, host) = w.proc_of("kv-0", Slot::Standby);
        assert_ne!(host, w.proc_of("kv-0", Slot::Primary).1);
    }

    /// Detection is timed from the first sign of the failure: for a crash
    /// the exit or the closed connection (the wait for the other one,
    /// bounded by the root-cause wait), for a stall the last heartbeat
    /// (the heartbeat timeout).
    #[test]
    fn test_recoveries_report_how_long_detection_took() {
        let mut w = running(0, 3);
        let (old, _) = w.proc_of("kv-0", Slot::Primary);
        w.die(old, ExitKind::Signal(9));
        w.run_for(ms(300));
        let crash = *w.ctl.summary().recoveries.last().expect("a recovery");
        let crash_detect = crash
            .detect_ms
            .expect("a crash is seen before it is acted on");
        assert!(
            crash_detect <= 100,
            "a crash is named within the root-cause wait: {crash:?}"
        );

        let (stalled, _) = w.proc_of("kv-0", Slot::Primary);
        w.procs.get_mut(&stalled).expect("live").stalled = true;
        let before = w.ctl.summary().recoveries.len();
        w.run_for(ms(600));
        let recoveries = &w.ctl.summary().recoveries;
        assert_eq!(recoveries.len(), before + 1, "the stall was recovered from");
        let stall = recoveries[before];
        let detect = stall
            .detect_ms
            .expect("the last heartbeat is the first sign");
        assert!(
            (100..=160).contains(&detect),
            "the heartbeat timeout (100 ms) after the last heartbeat: {stall:?}"
        );
        assert_eq!(
            stall.total_ms,
            stall.drain_ms + stall.restore_ms + stall.connect_ms,
            "detection is not part of the total"
        );
    }

    #[test]
    fn test_an_exit_by_signal_is_acted_on_before_its_connection_closes() {
        // An exit reported from the exit word: the process is still being
        // torn down, its connection open. Killed by a signal, it has said
        // all it will; an exit with a code may still have last words.
        for (exit, waits) in [(ExitKind::Signal(9), false), (ExitKind::Code(1), true)] {
            let mut w = running(0, 3);
            let (old, host) = w.proc_of("kv-0", Slot::Primary);
            let p = &w.procs[&old];
            let exited = WorkerExited {
                worker: p.worker.clone(),
                attempt: p.attempt,
                standby: false,
                host,
                exit: exit.clone(),
                detail: None,
            };
            w.deliver(Fact::Exited(exited));
            assert_eq!(
                w.ctl.state() == JobState::Running,
                waits,
                "{exit}: recovery starts at once unless last words may come"
            );
            w.run_for(ms(300));
            assert_eq!(w.ctl.state(), JobState::Running, "{exit}: recovered");
            let cause = w.ctl.summary().last_failure.clone().unwrap_or_default();
            assert!(cause.contains(&exit.to_string()), "{exit}: {cause}");
        }
    }

    #[test]
    fn test_a_standby_down_by_its_health_check_is_never_promoted() {
        let mut w = running(0, 3);
        let (old, old_host) = w.proc_of("kv-0", Slot::Primary);
        let (standby, standby_host) = w.proc_of("kv-0", Slot::Standby);
        w.deliver(Fact::StandbyHealth {
            worker: WorkerId::new("kv-0").expect("valid"),
            host: standby_host.clone(),
            up: false,
        });
        w.die(old, ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        let (now, host) = w.proc_of("kv-0", Slot::Primary);
        assert_ne!(now, standby, "the down standby was not promoted");
        assert!(!w.procs[&standby].alive, "it was stopped");
        assert_ne!(host, old_host, "the primary moved off the failed host");
        assert_eq!(w.vips.get("198.18.0.100/24"), Some(&host), "with its VIP");
        // Up again: the next standby is promoted as usual.
        let (next, next_host) = w.proc_of("kv-0", Slot::Standby);
        w.deliver(Fact::StandbyHealth {
            worker: WorkerId::new("kv-0").expect("valid"),
            host: next_host.clone(),
            up: false,
        });
        w.deliver(Fact::StandbyHealth {
            worker: WorkerId::new("kv-0").expect("valid"),
            host: next_host.clone(),
            up: true,
        });
        w.die(now, ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.proc_of("kv-0", Slot::Primary), (next, next_host));
    }

    #[test]
    fn test_leader_change_adopts_without_restarting_or_moving_anything() {
        let mut w = running(0, 3);
        let pids: Vec<u64> = w.live_pids(|_| true);
        let vips = w.vips.clone();
        let before = w.ctl.newest_committed().expect("committed");
        let attempt = w.ctl.attempt();
        w.leader_change();
        let t = w.now;
        w.run_for(ms(300));
        assert_eq!(
            w.ctl.state(),
            JobState::Running,
            "the new leader runs the job"
        );
        assert_eq!(w.ctl.attempt(), attempt, "the same attempt, adopted");
        assert_eq!(w.ctl.summary().restarts, 0, "nothing restarted");
        assert_eq!(w.live_pids(|_| true), pids, "every process kept running");
        assert_eq!(w.vips, vips, "the VIP stayed where it was");
        assert!(
            !w.actions_since(t).iter().any(|a| matches!(
                a,
                Action::Spawn { .. }
                    | Action::Promote { .. }
                    | Action::Kill { .. }
                    | Action::KillAll { .. }
            )),
            "no process started, promoted or killed"
        );
        let after = w.ctl.newest_committed().expect("committed");
        assert!(
            after > before,
            "checkpoints resume under the new leader: {before} -> {after}"
        );
        assert!(w.ctl.epoch() > Epoch(1), "under a new epoch");
    }

    /// The agents registered as the new leader started the job, and their
    /// join events came after: each process gets one ticket, not two (a
    /// second one, handed to a process already connected with the first,
    /// once made it leave the leader and be refused: a kv-service HA flake).
    #[test]
    fn test_agents_registered_at_the_start_of_an_adoption_hand_one_ticket_each() {
        let mut w = running(0, 3);
        let pids: Vec<u64> = w.live_pids(|_| true);
        let t = w.now;
        w.leader_change_with(true);
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        assert_eq!(w.ctl.summary().restarts, 0, "nothing restarted");
        assert_eq!(w.live_pids(|_| true), pids, "every process kept running");
        let mut tickets: BTreeMap<(String, Slot), usize> = BTreeMap::new();
        for a in w.actions_since(t) {
            if let Action::Rejoin { worker, slot, .. } = a {
                *tickets.entry((worker.to_string(), slot)).or_default() += 1;
            }
        }
        assert_eq!(
            tickets.len(),
            pids.len(),
            "a ticket for each process: {tickets:?}"
        );
        assert!(
            tickets.values().all(|n| *n == 1),
            "one ticket per process: {tickets:?}"
        );
    }

    #[test]
    fn test_a_process_missing_at_adoption_fails_the_attempt_and_recovers() {
        let mut w = running(0, 3);
        let (gone, _) = w.proc_of("count-0", Slot::Primary);
        w.trace = std::env::var("LAZARUS_SIM_TRACE").is_ok();
        w.leader_change();
        // It died while no leader listened: its agent says so at the ticket.
        if let Some(p) = w.procs.get_mut(&gone) {
            p.alive = false;
        }
        w.run_for(ms(600));
        assert_eq!(w.ctl.state(), JobState::Running, "recovered");
        assert_eq!(w.ctl.summary().restarts, 1, "one recovery");
        let (new, _) = w.proc_of("count-0", Slot::Primary);
        assert_ne!(new, gone, "a new count-0 process");
    }

    #[test]
    fn test_sigkill_with_cold_standby_starts_a_process_on_the_standby_host() {
        let mut w = running(0, 3);
        let placed = w.ctl.placement()[&id("count-0")].clone();
        let standby_host = placed.standby.clone().expect("a cold standby is placed");
        let (old, host) = w.proc_of("count-0", Slot::Primary);
        assert_eq!(host, placed.primary);
        w.die(old, ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        let (new, new_host) = w.proc_of("count-0", Slot::Primary);
        assert_ne!(new, old, "a new process");
        assert_eq!(new_host, standby_host, "on the cold standby's host");
        assert!(
            w.live_pids(|p| p.worker == id("count-0") && p.slot == Slot::Standby)
                .is_empty(),
            "cold: nothing runs in standby"
        );
    }

    #[test]
    fn test_sigkill_without_standby_restarts_on_another_host() {
        let mut w = running(1, 2);
        let (old, host) = w.proc_of("sink-0", Slot::Primary);
        w.die(old, ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        let (new, new_host) = w.proc_of("sink-0", Slot::Primary);
        assert_ne!(new, old);
        assert_ne!(new_host, host, "moved to the other host");
    }

    /// Active-active instances are regions of their own: a SIGKILL of one
    /// restarts that one only (elsewhere: no standby); the other keeps its
    /// process and VIP and is never told to start again. With `failback`,
    /// the restarted one returns to its first host after the hold-down.
    #[test]
    fn test_region_failover_leaves_the_other_regions_running() {
        let mut w = running(2, 3);
        let (survivor, survivor_host) = w.proc_of("kv-1", Slot::Primary);
        let (src, _) = w.proc_of("src-0", Slot::Primary);
        let (victim, home) = w.proc_of("kv-0", Slot::Primary);
        let committed = w.ctl.newest_committed();
        let killed_at = w.now;
        w.die(victim, ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        let s = w.ctl.summary();
        assert_eq!(
            (s.region_failovers, s.moves),
            (2, 1),
            "the crash, then the fail-back"
        );
        let (back, host) = w.proc_of("kv-0", Slot::Primary);
        assert_ne!(back, victim);
        assert_eq!(host, home, "back on its first host");
        assert_eq!(w.vips.get("198.18.0.100/24"), Some(&home));
        // The other regions: same processes, VIP untouched, nothing sent.
        assert_eq!(
            w.proc_of("kv-1", Slot::Primary),
            (survivor, survivor_host.clone())
        );
        assert_eq!(w.proc_of("src-0", Slot::Primary).0, src);
        assert_eq!(w.vips.get("198.18.0.101/24"), Some(&survivor_host));
        for a in w.actions_since(killed_at) {
            let touches_survivor = match &a {
                Action::Kill { worker, .. }
                | Action::Spawn { worker, .. }
                | Action::Promote { worker, .. } => {
                    worker.as_str() == "kv-1" || worker.as_str() == "src-0"
                }
                Action::AssignVip { vip, .. } => vip == "198.18.0.101/24",
                Action::KillAll { .. } => true,
                _ => false,
            };
            assert!(!touches_survivor, "{a:?} touches a surviving region");
        }
        assert!(w.ctl.newest_committed() > committed, "checkpoints go on");
    }

    /// A SIGKILL of one worker of a pipeline: its process is replaced, and
    /// every other worker keeps its process, halted and rolled back in
    /// place to the last committed checkpoint (a new assignment on its
    /// connection), with no kill; checkpoints go on.
    #[test]
    fn test_a_failure_rolls_the_other_processes_back_in_place() {
        let mut w = running(0, 3);
        let before = w.primary_pids();
        let victim = id("count-1");
        let committed = w.ctl.newest_committed();
        let t = w.now;
        w.die(before[&victim], ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        for (worker, pid) in &before {
            let (now, _) = w.proc_of(worker.as_str(), Slot::Primary);
            if *worker == victim {
                assert_ne!(now, *pid, "the failed worker's process is replaced");
            } else {
                assert_eq!(now, *pid, "{worker} kept its process");
            }
        }
        let s = w.ctl.summary();
        assert_eq!(s.restarts, 1);
        assert_eq!(s.kept_processes as usize, before.len() - 1);
        let acted = w.actions_since(t);
        assert!(
            !acted.iter().any(|a| matches!(a, Action::KillAll { .. })),
            "nothing killed wholesale: {acted:?}"
        );
        assert!(
            acted
                .iter()
                .any(|a| matches!(a, Action::Retag { worker, .. } if worker.as_str() == "count-0")),
            "the agent learns the kept process's new attempt"
        );
        w.run_for(ms(200));
        assert!(w.ctl.newest_committed() > committed, "checkpoints go on");
    }

    /// A SIGKILLed worker's peer notices first (its channel closed) and
    /// reports a retryable failure before the victim's exit and connection
    /// close arrive: still a rollback in place, in which only the victim's
    /// process is replaced (the wordcount chaos test once lost every kept
    /// process this way).
    #[test]
    fn test_a_peer_reporting_first_still_rolls_back_in_place() {
        for (exit_after, close_after) in [(ms(2), ms(4)), (ms(4), ms(2)), (ms(40), ms(45))] {
            let mut w = running(0, 3);
            let before = w.primary_pids();
            let victim = id("count-1");
            let pid = before[&victim];
            let p = w.procs.get_mut(&pid).expect("victim");
            p.alive = false;
            p.died_at = Some(w.now);
            let p = p.clone();
            w.report_failure(before[&id("src-0")], "output channel closed");
            let exited = WorkerExited {
                worker: p.worker.clone(),
                attempt: p.attempt,
                standby: false,
                host: p.host.clone(),
                exit: ExitKind::Signal(9),
                detail: None,
            };
            w.at(exit_after, Event::Deliver(Fact::Exited(exited)));
            let closed = p.conn.expect("victim connected");
            w.at(close_after, Event::Deliver(Fact::Closed { conn: closed }));
            w.run_for(ms(300));
            assert_eq!(w.ctl.state(), JobState::Running);
            for (worker, pid) in &before {
                let (now, _) = w.proc_of(worker.as_str(), Slot::Primary);
                if *worker == victim {
                    assert_ne!(now, *pid, "the failed worker's process is replaced");
                } else {
                    assert_eq!(
                        now, *pid,
                        "{worker} kept its process (exit after {exit_after:?}, close after {close_after:?})"
                    );
                }
            }
        }
    }

    /// A process rolled back in place keeps its connection: its word of
    /// the attempt it was halted in (here a `Listening`) arriving after
    /// the next assignment is dropped by its epoch, and nobody is started
    /// until the process says where it listens now.
    #[test]
    fn test_a_late_word_of_a_halted_attempt_is_dropped() {
        let mut w = running(0, 3);
        let (kept, _) = w.proc_of("count-0", Slot::Primary);
        let conn = w.procs[&kept].conn.expect("connected");
        let halted = w.procs[&kept].epoch.expect("assigned");
        let (peer, _) = w.proc_of("src-0", Slot::Primary);
        w.report_failure(peer, "boom");
        // Until the kept process is assigned anew.
        let deadline = w.now + ms(200);
        while w.procs[&kept].epoch == Some(halted) && w.now < deadline {
            w.run_for(ms(1));
        }
        let assigned = w.procs[&kept].epoch.expect("assigned");
        assert!(assigned > halted, "assigned anew");
        // Its answer to the new assignment is held back 50 ms; its word of
        // the halted attempt comes now.
        let fresh: Vec<usize> = w
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                matches!(e, Some(Event::Deliver(Fact::Message { conn: c, msg: ToSupervisor::Listening { .. } })) if *c == conn)
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(fresh.len(), 1, "its Listening is on its way");
        let held = w.events[fresh[0]].take().expect("queued");
        w.at(ms(50), held);
        let stale = ToSupervisor::Listening {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            fetched_bytes: 0,
            in_flight_records: 0,
            epoch: Some(halted),
        };
        w.deliver(Fact::Message { conn, msg: stale });
        // The sim fails on a Start sent before the fresh Listening.
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        assert_eq!(w.proc_of("count-0", Slot::Primary).0, kept, "kept");
        assert_eq!(w.ctl.summary().restarts, 1);
    }

    /// A kept process that never answers its new assignment (here it
    /// stalled right after its halt) holds the attempt until the startup
    /// timeout; that failure replaces every process, so the job runs again
    /// (rolling back in place again would keep the stuck process forever).
    #[test]
    fn test_an_attempt_that_does_not_start_replaces_every_process() {
        let mut w = running(0, 3);
        let before = w.primary_pids();
        let (peer, stuck) = (before[&id("src-0")], before[&id("count-0")]);
        w.report_failure(peer, "boom");
        if let Some(q) = w.procs.get_mut(&stuck) {
            q.stalled = true;
        }
        w.run_for(ms(1000));
        assert_eq!(w.ctl.state(), JobState::Recovering, "waits for it");
        w.run_for(ms(1500));
        assert_eq!(w.ctl.state(), JobState::Running, "{:?}", w.ctl.summary());
        let s = w.ctl.summary();
        assert!(
            s.last_failure
                .as_deref()
                .is_some_and(|f| f.contains("did not start")),
            "{s:?}"
        );
        for (worker, pid) in &before {
            let (now, _) = w.proc_of(worker.as_str(), Slot::Primary);
            assert_ne!(now, *pid, "{worker} was replaced");
        }
    }

    /// A failure before the attempt that recovered from the last one has
    /// committed anything still times the sources' replay: they started
    /// from the restored checkpoint, so what they emitted since is their
    /// whole count (the wordcount SIGKILL test lost every replay figure
    /// when kills came faster than commits).
    #[test]
    fn test_a_failure_before_the_attempts_first_commit_still_gives_a_replay_target() {
        let mut w = running(0, 3);
        let (first, _) = w.proc_of("count-1", Slot::Primary);
        w.die(first, ExitKind::Signal(9));
        let restored = w.ctl.newest_committed();
        let deadline = w.now + ms(500);
        while w.ctl.summary().recoveries.is_empty() && w.now < deadline {
            w.run_for(ms(1));
        }
        assert_eq!(w.ctl.summary().recoveries.len(), 1, "recovered");
        // One heartbeat of the new attempt (every 20 ms), before its first
        // checkpoint (every 30 ms) can commit.
        w.run_for(ms(21));
        assert_eq!(
            w.ctl.newest_committed(),
            restored,
            "nothing committed since the recovery"
        );
        let (second, _) = w.proc_of("count-0", Slot::Primary);
        let t = w.now;
        w.die(second, ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        let replay = w.actions_since(t).into_iter().find_map(|a| match a {
            Action::Assign {
                worker,
                standby: false,
                replay,
                ..
            } if worker.as_str() == "src-0" => Some(replay),
            _ => None,
        });
        assert_eq!(
            replay,
            Some(Some(1)),
            "the source is told to report after re-emitting its heartbeat's count"
        );
    }

    /// A recovery's replay: a source that reports it before the last worker
    /// runs again counts 0 ms (the replay did not delay anything); one that
    /// reports later counts from the moment every worker ran.
    #[test]
    fn test_a_replay_reported_before_the_last_worker_runs_counts_as_zero() {
        for (after, early) in [(ms(0), true), (ms(60), false)] {
            let mut w = running(0, 3);
            w.replayed_after = Some(after);
            let (victim, _) = w.proc_of("count-1", Slot::Primary);
            w.die(victim, ExitKind::Signal(9));
            w.run_for(ms(300));
            let s = w.ctl.summary();
            assert_eq!(s.recoveries.len(), 1, "recovered");
            let r = &s.recoveries[0];
            match (early, r.replay_ms) {
                (true, Some(0)) => {}
                (false, Some(ms)) if (40..=60).contains(&ms) => {}
                _ => panic!("reported {after:?} after the start: {r:?}"),
            }
        }
    }

    /// Chaos with `after_commit` kills only once the attempt has committed
    /// a checkpoint; without it, kills come as fast as they are due (here
    /// faster than checkpoints), and some recovery rolls back to nothing
    /// new.
    #[test]
    fn test_chaos_after_commit_waits_for_each_attempt_to_commit() {
        for after_commit in [true, false] {
            let mut w = World::with_spec_and(7, false, SPECS[0], Some(3), |cfg| {
                cfg.chaos = Some(super::super::controller::Chaos {
                    every: ms(5),
                    seed: 3,
                    max_kills: Some(6),
                    after_commit,
                });
            });
            w.start();
            let (mut kills, mut committed_at_kill) = (0, 0);
            let mut kill_without_commit = false;
            while w.now < ms(5000) && kills < 6 {
                w.run_for(ms(1));
                let s = w.ctl.summary();
                if s.chaos_kills > kills {
                    kills = s.chaos_kills;
                    kill_without_commit |= s.committed == committed_at_kill;
                    committed_at_kill = s.committed;
                }
            }
            assert_eq!(kills, 6, "every kill fired (after_commit {after_commit})");
            assert_eq!(
                kill_without_commit, !after_commit,
                "after_commit {after_commit}: a kill with no commit since the one before"
            );
        }
    }

    /// Active-active takeover: with two hosts, the lost host's instance is
    /// taken over inside the surviving instance's running process (no
    /// process starts, the survivor is not restarted), its VIP moves there;
    /// the fail-back after the hold-down ends it there (no kill: its
    /// connection closes) and starts it at home. A SIGKILL of a process
    /// holding a taken-over instance restarts both.
    #[test]
    fn test_a_lost_instance_is_taken_over_inside_the_survivors_process() {
        let mut w = running(2, 2);
        let (victim, home) = w.proc_of("kv-0", Slot::Primary);
        let (survivor, survivor_host) = w.proc_of("kv-1", Slot::Primary);
        assert_ne!(home, survivor_host);
        w.crash(&home);
        let lost_at = w.now;
        w.deliver(Fact::HostLost(home.clone()));
        w.run_for(ms(200));
        assert_eq!(w.ctl.state(), JobState::Running);
        let (guest, there) = w.proc_of("kv-0", Slot::Primary);
        assert_ne!(guest, victim);
        assert_eq!(there, survivor_host);
        assert_eq!(
            w.procs[&guest].guest_of,
            Some(survivor),
            "inside the survivor's process"
        );
        assert_eq!(
            w.proc_of("kv-1", Slot::Primary).0,
            survivor,
            "not restarted"
        );
        assert_eq!(w.ctl.summary().takeovers, 1);
        assert_eq!(w.vips.get("198.18.0.100/24"), Some(&survivor_host));
        let status = w.ctl.status();
        let kv0 = status
            .workers
            .iter()
            .find(|s| s.worker.as_str() == "kv-0")
            .expect("kv-0");
        assert_eq!(kv0.taken_over_by.as_ref().map(|w| w.as_str()), Some("kv-1"));
        assert!(
            !w.actions_since(lost_at).iter().any(|a| matches!(a, Action::Spawn { worker, slot: Slot::Primary, .. } if worker.as_str() == "kv-0")),
            "no process started for kv-0"
        );
        // Home again: after the 60 ms hold-down, kv-0 is a process there.
        w.hosts.insert(home.clone(), true);
        w.deliver(Fact::HostJoined(home.clone()));
        let back_at = w.now;
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        let (back, host) = w.proc_of("kv-0", Slot::Primary);
        assert_eq!(host, home);
        assert_eq!(w.procs[&back].guest_of, None);
        assert!(!w.procs[&guest].alive, "the taken-over instance ended");
        assert!(
            !w.actions_since(back_at)
                .iter()
                .any(|a| matches!(a, Action::Kill { .. } | Action::KillAll { .. })),
            "nothing killed: the taken-over instance ends with its connection"
        );
        assert_eq!(
            w.proc_of("kv-1", Slot::Primary).0,
            survivor,
            "still not restarted"
        );
        assert_eq!(w.vips.get("198.18.0.100/24"), Some(&home));

        // Taken over again, then the process holding both dies: both restart.
        w.crash(&home);
        w.deliver(Fact::HostLost(home.clone()));
        w.run_for(ms(200));
        let (guest, _) = w.proc_of("kv-0", Slot::Primary);
        assert_eq!(w.procs[&guest].guest_of, Some(survivor));
        let restarts = w.ctl.summary().restarts;
        w.die(survivor, ExitKind::Signal(9));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        assert!(w.ctl.summary().restarts > restarts);
        let (kv1, _) = w.proc_of("kv-1", Slot::Primary);
        let (kv0, _) = w.proc_of("kv-0", Slot::Primary);
        assert_ne!(kv1, survivor);
        assert!(
            kv0 != guest && w.procs[&kv0].guest_of.is_none(),
            "both started anew"
        );
    }

    /// `takeover = "process"`: the same host loss starts a process of its
    /// own for the lost instance on the survivor's host; nothing is taken
    /// over.
    #[test]
    fn test_takeover_process_starts_a_process_of_its_own() {
        let text = SPECS[2].replace(
            "failback = \"60ms\"",
            "failback = \"60ms\"\ntakeover = \"process\"",
        );
        assert!(text.contains("takeover = \"process\""));
        let mut w = running_spec(&text, 2);
        let (victim, home) = w.proc_of("kv-0", Slot::Primary);
        let (survivor, survivor_host) = w.proc_of("kv-1", Slot::Primary);
        w.crash(&home);
        w.deliver(Fact::HostLost(home.clone()));
        w.run_for(ms(200));
        assert_eq!(w.ctl.state(), JobState::Running);
        let (own, there) = w.proc_of("kv-0", Slot::Primary);
        assert_ne!(own, victim);
        assert_eq!(there, survivor_host);
        assert_eq!(w.procs[&own].guest_of, None, "a process of its own");
        assert_eq!(w.proc_of("kv-1", Slot::Primary).0, survivor);
        assert_eq!(w.ctl.summary().takeovers, 0);
    }

    /// A lost host's instance moves to a survivor; when the host is back,
    /// it returns only after the hold-down, and a `move` request moves the
    /// other one; nothing else restarts.
    #[test]
    fn test_fail_back_waits_for_the_hold_down_and_moves_go_where_asked() {
        let mut w = running(2, 3);
        let (_, home) = w.proc_of("kv-0", Slot::Primary);
        let (survivor, survivor_host) = w.proc_of("kv-1", Slot::Primary);
        assert_ne!(home, survivor_host);
        w.crash(&home);
        w.deliver(Fact::HostLost(home.clone()));
        w.run_for(ms(200));
        let (_, away) = w.proc_of("kv-0", Slot::Primary);
        assert_ne!(away, home);
        w.hosts.insert(home.clone(), true);
        w.deliver(Fact::HostJoined(home.clone()));
        w.run_for(ms(40));
        assert_eq!(
            w.proc_of("kv-0", Slot::Primary).1,
            away,
            "held down for 60 ms"
        );
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        assert_eq!(w.proc_of("kv-0", Slot::Primary).1, home, "failed back");
        assert_eq!(w.vips.get("198.18.0.100/24"), Some(&home));
        assert_eq!(w.ctl.summary().moves, 1);
        assert!(
            w.ctl
                .summary()
                .last_failure
                .is_some_and(|f| f.contains("lost")),
            "a fail-back is not reported as the last failure: {:?}",
            w.ctl.summary().last_failure
        );
        assert_eq!(
            w.proc_of("kv-1", Slot::Primary).0,
            survivor,
            "never restarted"
        );
        // An operator's move: to a live host, not to a dead or the same one.
        let target = w
            .hosts
            .keys()
            .find(|h| **h != survivor_host)
            .cloned()
            .expect("another host");
        w.deliver(Fact::MoveRequested {
            worker: id("kv-1"),
            host: survivor_host.clone(),
        });
        w.deliver(Fact::MoveRequested {
            worker: id("kv-1"),
            host: "nowhere".into(),
        });
        assert_eq!(
            w.ctl.summary().moves,
            1,
            "no move to the same or an unknown host"
        );
        w.deliver(Fact::MoveRequested {
            worker: id("kv-1"),
            host: target.clone(),
        });
        // Its new home: fail-back does not take it back.
        w.run_for(ms(300));
        assert_eq!(w.ctl.summary().moves, 2);
        assert_eq!(w.ctl.state(), JobState::Running);
        assert_eq!(w.proc_of("kv-1", Slot::Primary).1, target);
        assert_eq!(w.vips.get("198.18.0.101/24"), Some(&target));
        assert_eq!(w.proc_of("kv-0", Slot::Primary).1, home, "kv-0 stays");
    }

    #[test]
    fn test_host_loss_promotes_elsewhere_and_sends_nothing_to_the_lost_host() {
        let mut w = running(0, 3);
        let (_, host) = w.proc_of("kv-0", Slot::Primary);
        let (standby, standby_host) = w.proc_of("kv-0", Slot::Standby);
        w.crash(&host);
        let lost_at = w.now;
        w.deliver(Fact::HostLost(host.clone()));
        w.run_for(ms(300));
        assert_eq!(w.ctl.state(), JobState::Running);
        assert_eq!(
            w.proc_of("kv-0", Slot::Primary),
            (standby, standby_host.clone())
        );
        assert_eq!(w.vips.get("198.18.0.100/24"), Some(&standby_host));
        assert!(!w.ctl.hosts().contains(&host));
        // `no_lost_host` checked every action; here the whole log once more.
        for a in w.actions_since(lost_at) {
            let target = match &a {
                Action::Spawn { host, .. }
                | Action::Promote { host, .. }
                | Action::Kill { host, .. }
                | Action::AssignVip { host, .. } => Some(host),
                _ => None,
            };
            assert_ne!(target, Some(&host), "{a:?} targets the lost host");
        }
        assert!(w
            .ctl
            .summary()
            .last_failure
            .is_some_and(|f| f.contains(&format!("host {host} lost"))));
    }

    #[test]
    fn test_dead_standby_is_replaced_after_a_backoff_not_at_once() {
        let mut w = running(0, 3);
        let (standby, host) = w.proc_of("kv-0", Slot::Standby);
        w.die(standby, ExitKind::Code(1));
        w.run_for(ms(100));
        assert!(
            w.live_pids(|p| p.worker == id("kv-0") && p.slot == Slot::Standby)
                .is_empty(),
            "no respawn within the first 100 ms"
        );
        w.run_for(ms(300));
        let (new, new_host) = w.proc_of("kv-0", Slot::Standby);
        assert_ne!(new, standby);
        assert_eq!(new_host, host, "placed where it was");
        assert_eq!(w.ctl.summary().restarts, 0, "the primary never stopped");
    }

    #[test]
    fn test_stop_kills_everything_and_releases_the_vip() {
        let mut w = running(0, 3);
        w.causes.stop = true;
        w.deliver(Fact::StopRequested {
            final_checkpoint: false,
        });
        assert!(w.ctl.is_ended());
        assert_eq!(w.ctl.summary().state, JobState::Stopped);
        assert!(w.vips.is_empty(), "the VIP is unassigned");
        assert!(
            w.procs.values().all(|p| !p.alive),
            "every process, standbys too"
        );
    }

    #[test]
    fn test_a_slow_commit_does_not_delay_a_recovery_and_its_sinks_wait_for_it() {
        let mut w = running(0, 3);
        w.slow_commits = Some(ms(2000));
        // Run until a commit is in flight (visible in the store, not durable).
        for _ in 0..200 {
            if w.ctl.commits_in_flight() > 0 {
                break;
            }
            w.run_for(ms(1));
        }
        assert!(w.ctl.commits_in_flight() > 0, "a commit is in flight");
        let pending = *w
            .store
            .not_durable
            .last()
            .expect("a commit not yet durable");
        let (victim, _) = w.proc_of("count-1", Slot::Primary);
        let t = w.now;
        w.die(victim, ExitKind::Signal(9));
        w.run_for(ms(10));
        let acted = w.actions_since(t);
        assert!(
            acted.iter().any(|a| matches!(a, Action::Send { msg: ToWorker::Halt, .. })),
            "the exit is handled at once (the others halted), with the commit still in flight: {acted:?}"
        );
        w.run_for(ms(300));
        assert_eq!(
            w.ctl.state(),
            JobState::Running,
            "recovered without waiting for the commit's answer"
        );
        assert!(
            w.ctl.commits_in_flight() > 0,
            "the commit is still in flight"
        );
        assert_eq!(
            w.ctl.restored(),
            Some(pending),
            "the visible checkpoint is restored"
        );
        let acted = w.actions_since(t);
        let assigned: Vec<bool> = acted
            .iter()
            .filter_map(|a| match a {
                Action::Assign {
                    standby: false,
                    restore_pending,
                    ..
                } => Some(*restore_pending),
                _ => None,
            })
            .collect();
        assert!(
            !assigned.is_empty() && assigned.iter().all(|p| *p),
            "every assignment marks the restore pending: {assigned:?}"
        );
        let told = |acted: &[Action]| {
            acted
                .iter()
                .filter(|a| matches!(a, Action::Send { msg: ToWorker::Committed { checkpoint }, .. } if *checkpoint == pending))
                .count()
        };
        assert_eq!(
            told(&acted),
            0,
            "nobody is told it is committed before it is durable"
        );
        let t = w.now;
        w.run_for(ms(2000));
        assert!(
            !w.store.not_durable.contains(&pending),
            "the commit answered"
        );
        assert_eq!(
            told(&w.actions_since(t)),
            w.plan.len(),
            "once durable, every primary of the attempt hears of it"
        );
        assert_eq!(w.ctl.state(), JobState::Running);
    }

    #[test]
    fn test_fatal_worker_error_ends_the_job_without_restarts() {
        let mut w = running(0, 2);
        let (pid, _) = w.proc_of("src-0", Slot::Primary);
        let conn = w.procs[&pid].conn.expect("connected");
        w.causes.fatal = true;
        let msg = ToSupervisor::Failed {
            error: "input /x: No such file or directory".into(),
            fatal: true,
            epoch: w.procs[&pid].epoch,
        };
        w.deliver(Fact::Message { conn, msg });
        let s = w.ctl.summary();
        let JobState::Failed(why) = &s.state else {
            panic!("failed: {s:?}");
        };
        assert!(why.contains("input /x: No such file or directory"), "{why}");
        assert_eq!(s.restarts, 0);
    }
}
