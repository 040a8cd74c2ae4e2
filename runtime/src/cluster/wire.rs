//! Messages between the supervisor, its agents and CLI clients. Framed like
//! the worker control protocol (`lazarus_sdk::protocol::write_control`):
//! length-prefixed JSON, each message tagged by `type`. The first frame on
//! a connection says who is speaking: `register` (an agent), `submit` or
//! `status` (a client).

use std::net::SocketAddr;
use std::path::PathBuf;

use lazarus_storage::{CheckpointId, Epoch, JobId, WorkerId};
use serde::{Deserialize, Serialize};

use crate::placement::Placed;
use crate::procs::ExitKind;
use crate::spec::StandbyKind;
use crate::supervisor::JobStateKind;

/// Agent → supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First frame: who the agent is.
    Register {
        /// Host name, unique in the cluster.
        name: String,
        /// Where its worker logs and local cache live.
        state_dir: PathBuf,
        /// Worker processes it runs (an agent that kept its workers through
        /// a supervisor failover): the new leader adopts or stops them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        procs: Vec<ProcRef>,
    },
    /// Liveness, every heartbeat interval.
    Heartbeat,
    /// A hot standby's health check changed (a primary that goes down is
    /// killed by its agent and reported as exited).
    Health {
        /// Its job.
        job: JobId,
        /// The worker.
        worker: WorkerId,
        /// Up or down.
        up: bool,
        /// The check's last result.
        detail: String,
    },
    /// A worker process ended.
    Exited {
        /// Its job.
        job: JobId,
        /// The worker.
        worker: WorkerId,
        /// The attempt it ran for.
        attempt: u64,
        /// Whether it was a standby.
        standby: bool,
        /// How it ended.
        exit: WireExit,
        /// Its log's telling line.
        detail: Option<String>,
    },
    /// Asks for the lease of `vip`; `seq` pairs the answer with this request.
    LeaseAcquire {
        /// The VIP (`addr/prefix`).
        vip: String,
        /// Request number.
        seq: u64,
    },
    /// Renews lease `id` of `vip`.
    LeaseRenew {
        /// The VIP.
        vip: String,
        /// The lease.
        id: u64,
        /// Request number.
        seq: u64,
    },
    /// The agent refused what it was asked (a binary or VIP outside its
    /// allow-lists): the job it was for cannot run here.
    Refused {
        /// The job, when the request named one (a spawn).
        job: Option<JobId>,
        /// The VIP, when the request was to hold one.
        vip: Option<String>,
        /// Why, naming the path or address and the list.
        reason: String,
    },
    /// The VIP is off the interface: lease `id` may go to someone else now.
    LeaseReleased {
        /// The VIP.
        vip: String,
        /// The lease.
        id: u64,
    },
}

/// How a worker ended, on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireExit {
    /// Exit code 0.
    Success,
    /// Non-zero exit code.
    Code {
        /// The code.
        code: i32,
    },
    /// Killed by a signal.
    Signal {
        /// The signal.
        signal: i32,
    },
    /// Could not be started.
    SpawnFailed {
        /// Why.
        error: String,
    },
}

impl From<&ExitKind> for WireExit {
    fn from(e: &ExitKind) -> Self {
        match e {
            ExitKind::Success => WireExit::Success,
            ExitKind::Code(code) => WireExit::Code { code: *code },
            ExitKind::Signal(signal) => WireExit::Signal { signal: *signal },
            ExitKind::SpawnFailed(error) | ExitKind::HostLost(error) => WireExit::SpawnFailed {
                error: error.clone(),
            },
        }
    }
}

impl From<WireExit> for ExitKind {
    fn from(e: WireExit) -> Self {
        match e {
            WireExit::Success => ExitKind::Success,
            WireExit::Code { code } => ExitKind::Code(code),
            WireExit::Signal { signal } => ExitKind::Signal(signal),
            WireExit::SpawnFailed { error } => ExitKind::SpawnFailed(error),
        }
    }
}

/// Gratuitous ARP / unsolicited NA settings (keepalived's garp_master_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GarpSettings {
    /// Frames per burst (`garp_master_repeat`).
    pub count: u32,
    /// Gap between frames of a burst, ms.
    pub delay_ms: u64,
    /// Repeat the burst this often while holding, ms; 0 = never
    /// (`garp_master_refresh`).
    pub refresh_ms: u64,
}

/// A worker process an agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    /// Its job.
    pub job: JobId,
    /// The worker.
    pub worker: WorkerId,
    /// The attempt it belongs to now.
    pub attempt: u64,
    /// A hot standby.
    pub standby: bool,
}

/// How agents of an HA cluster hold VIPs: under their own etcd lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaWelcome {
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// Key prefix (VIP leases are `<prefix>/vips/<vip>`).
    pub prefix: String,
    /// The VIP lease length, ms (an etcd lease TTL: whole seconds, at
    /// least 2 s).
    pub lease_ms: u64,
    /// How long the agent keeps its workers and VIPs without any leader:
    /// a new leader adopts them within this; after it the agent fences.
    #[serde(default = "default_adopt_ms")]
    pub adopt_ms: u64,
}

fn default_adopt_ms() -> u64 {
    10_000
}

/// Supervisor → agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SupervisorMsg {
    /// Registration accepted; the settings both sides use.
    Welcome {
        /// Heartbeat interval, ms.
        heartbeat_ms: u64,
        /// Lease length, ms: also how long the agent runs workers without
        /// hearing from the supervisor before it stops them.
        lease_ms: u64,
        /// Lease renewal interval, ms.
        renew_ms: u64,
        /// Supervisors under etcd: VIP leases are the agent's own, in etcd,
        /// and the agent keeps its workers when the supervisor goes away.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ha: Option<HaWelcome>,
    },
    /// Registration refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// This supervisor does not lead (HA): register with `leader` instead
    /// (or another supervisor of the list, if no leader is known).
    NotLeader {
        /// The leader's address, if one is elected.
        leader: Option<SocketAddr>,
    },
    /// Liveness.
    Heartbeat,
    /// Start a worker process.
    Spawn {
        /// Its job.
        job: JobId,
        /// The worker.
        worker: WorkerId,
        /// The attempt.
        attempt: u64,
        /// Start it as a hot standby.
        standby: bool,
        /// The worker binary.
        binary: PathBuf,
        /// The job's control address.
        supervisor: SocketAddr,
        /// The process's credential toward the job's control port.
        token: String,
        /// What the agent runs around the process: the program of a
        /// `process` operator, its health check, the job's notify hooks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<Box<SpawnService>>,
    },
    /// A new leader adopts this process: hand it the ticket (its
    /// `LAZARUS_REJOIN_FILE`); an agent without it reports it exited.
    Rejoin {
        /// Its job.
        job: JobId,
        /// The worker.
        worker: WorkerId,
        /// The attempt the process belongs to now.
        attempt: u64,
        /// Its slot: a hot standby.
        standby: bool,
        /// The job's control address at the new leader.
        supervisor: SocketAddr,
        /// A one-time credential for it.
        token: String,
    },
    /// The worker's standby process becomes its primary for `attempt`.
    Promote {
        /// Its job.
        job: JobId,
        /// The worker.
        worker: WorkerId,
        /// The attempt.
        attempt: u64,
    },
    /// The worker's primary process was rolled back in place: it belongs
    /// to `attempt` now (its exit is reported so, a rejoin names it so).
    Retag {
        /// Its job.
        job: JobId,
        /// The worker.
        worker: WorkerId,
        /// The attempt.
        attempt: u64,
    },
    /// SIGKILL one process.
    Kill {
        /// Its job.
        job: JobId,
        /// The worker.
        worker: WorkerId,
        /// The standby process, not the primary.
        standby: bool,
    },
    /// SIGKILL every primary of a job (`standbys` too if set).
    KillAll {
        /// The job.
        job: JobId,
        /// Standbys as well.
        standbys: bool,
    },
    /// Hold `vip` on the agent's interface (ask for its lease first).
    HoldVip {
        /// The VIP (`addr/prefix`).
        vip: String,
        /// Announcement settings.
        garp: GarpSettings,
    },
    /// Remove `vip` and give its lease back.
    ReleaseVip {
        /// The VIP.
        vip: String,
    },
    /// Lease answer: granted (or renewed) for `length_ms` from the request.
    LeaseGranted {
        /// The VIP.
        vip: String,
        /// The lease.
        id: u64,
        /// Its length, ms.
        length_ms: u64,
        /// The request answered.
        seq: u64,
    },
    /// Lease answer: held by someone else; ask again in `retry_ms`.
    LeaseHeld {
        /// The VIP.
        vip: String,
        /// The current holder.
        holder: String,
        /// When to ask again, ms from now.
        retry_ms: u64,
    },
    /// Lease answer: the lease is gone; drop the VIP now.
    LeaseLost {
        /// The VIP.
        vip: String,
    },
    /// Prune the job's local cache to these chunk keys (retention ran).
    Prune {
        /// The job.
        job: JobId,
        /// Chunk keys retained manifests refer to.
        referenced: Vec<String>,
        /// The newest retained checkpoint.
        newest: CheckpointId,
    },
}

/// What an agent runs around one worker process (part of a spawn).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnService {
    /// A `process` operator's program: the agent starts `lazarus
    /// process-worker` (itself), which runs it; the program, not the
    /// worker binary, is checked against the allow-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<PathBuf>,
    /// The operator's health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::service::spec::HealthSpec>,
    /// The job's notify hooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<crate::service::spec::NotifySpec>,
    /// The operator's VIPs (for the hooks' environment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<String>,
}

impl SpawnService {
    /// What the plan and the job's hooks say for `w`.
    pub fn for_worker(
        w: &crate::spec::PlannedWorker,
        notify: Option<&crate::service::spec::NotifySpec>,
    ) -> SpawnService {
        SpawnService {
            program: w.process.as_ref().map(|p| p.command.clone()),
            health: w.health.clone(),
            notify: notify.filter(|n| !n.is_empty()).cloned(),
            vips: w.vips.clone(),
        }
    }
}

/// Client → supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientRequest {
    /// Run a job.
    Submit {
        /// The spec's TOML text.
        spec: String,
        /// Where it came from (for messages).
        origin: String,
        /// Its directory (relative paths, the worker binary).
        dir: PathBuf,
        /// `--set KEY=VALUE` overrides.
        set: Vec<String>,
        /// `--parallelism OPERATOR=N` overrides.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        parallelism: Vec<String>,
        /// `--vips OPERATOR=ADDR/PREFIX,...` overrides.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vips: Vec<String>,
        /// `--from`: a savepoint's name or a committed checkpoint's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// The cluster's state.
    Status,
    /// Stop a job.
    Stop {
        /// The job.
        job: JobId,
    },
    /// Take a savepoint of a running job: the next checkpoint to commit is
    /// pinned under `name`; with `stop`, the job stops after a final
    /// checkpoint, which is pinned.
    Savepoint {
        /// The job.
        job: JobId,
        /// Its name (default `savepoint-<checkpoint>`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Stop the job at it.
        #[serde(default)]
        stop: bool,
    },
    /// Move a worker's primary to a host (the moved share of an
    /// active-active service back home, or anywhere it may run).
    Move {
        /// The job.
        job: JobId,
        /// The worker.
        worker: String,
        /// The host.
        host: String,
    },
    /// Change an operator's parallelism: stop with a savepoint, start again
    /// from it with the key groups spread over `parallelism` instances.
    Rescale {
        /// The job.
        job: JobId,
        /// The operator.
        operator: String,
        /// Its new parallelism.
        parallelism: u32,
        /// VIPs for the added instances of an operator with one VIP per
        /// instance (a scale-down drops the last ones).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vips: Vec<String>,
    },
}

/// A job as submitted: what a supervisor needs to run it again (after a
/// rescale, or as a new HA leader).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    /// The spec's TOML text.
    pub spec: String,
    /// Where it came from (for messages).
    pub origin: String,
    /// Its directory (relative paths, the worker binary).
    pub dir: PathBuf,
    /// `--set KEY=VALUE` overrides.
    pub set: Vec<String>,
    /// `--parallelism OPERATOR=N` overrides, in order (later ones win).
    pub parallelism: Vec<String>,
    /// `--vips OPERATOR=ADDR/PREFIX,...` overrides, in order.
    #[serde(default)]
    pub vips: Vec<String>,
}

/// Supervisor → client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientReply {
    /// Accepted.
    Ok {
        /// What happened.
        message: String,
    },
    /// Refused.
    Error {
        /// Why.
        message: String,
    },
    /// The cluster's state.
    Status(Box<StatusReport>),
    /// This supervisor cannot answer now (it follows and knows no leader):
    /// ask another one.
    Unavailable {
        /// Why.
        message: String,
    },
}

/// `lazarus status --json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// Heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// A host is lost after this long without a heartbeat, ms.
    pub host_timeout_ms: u64,
    /// Lease length, ms.
    pub lease_ms: u64,
    /// Lease drift margin, ms.
    pub drift_margin_ms: u64,
    /// Hosts by name.
    pub hosts: Vec<HostStatus>,
    /// Jobs.
    pub jobs: Vec<JobStatus>,
    /// VIPs and their leases.
    pub vips: Vec<VipStatus>,
    /// Supervisor high availability (`--etcd`); absent for a single
    /// supervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaStatus>,
}

/// The supervisors and etcd, in `lazarus status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HaStatus {
    /// The supervisor that answered.
    pub answered_by: String,
    /// The leader, if one is elected.
    pub leader: Option<crate::ha::Member>,
    /// The leader's term (the leader key's create revision in etcd).
    pub term: Option<i64>,
    /// Every supervisor with a live etcd lease (the leader among them).
    pub supervisors: Vec<crate::ha::Member>,
    /// etcd as the answering supervisor sees it.
    pub etcd: crate::ha::EtcdHealth,
}

/// One host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    /// Its name.
    pub name: String,
    /// Its address as the supervisor sees it.
    pub addr: String,
    /// Alive or lost.
    pub alive: bool,
    /// Since the last heartbeat, ms.
    pub last_heartbeat_ms: u64,
    /// Days until its agent certificate expires (TLS only; negative once
    /// past).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_expires_in_days: Option<i64>,
}

/// One job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job.
    pub job: String,
    /// Its state: `starting`, `running`, `recovering`, `finishing`,
    /// `finished`, `stopped` or `failed`.
    pub state: JobStateKind,
    /// Why it failed, when `state` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The supervisor's current epoch for it.
    pub epoch: u64,
    /// The current attempt (0 = first start).
    pub attempt: u64,
    /// Restarts after failures.
    pub restarts: u32,
    /// Of those, region failovers: only the failed workers' regions
    /// restarted, the other workers kept running.
    #[serde(default)]
    pub region_failovers: u32,
    /// Planned moves: fail-backs and `lazarus move` (not counted in
    /// `restarts`).
    #[serde(default)]
    pub moves: u32,
    /// Failed active-active instances taken over by a surviving instance's
    /// running process.
    #[serde(default)]
    pub takeovers: u32,
    /// The newest recovery's time and parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<crate::supervisor::controller::RecoveryTime>,
    /// Checkpoints committed.
    pub committed: u64,
    /// The newest committed checkpoint.
    pub last_checkpoint: Option<u64>,
    /// The last failure, if any.
    pub last_failure: Option<String>,
    /// Its workers.
    pub workers: Vec<WorkerStatus>,
}

/// One worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The worker.
    pub worker: WorkerId,
    /// Its standby kind.
    pub standby_kind: StandbyKind,
    /// Where it runs.
    #[serde(flatten)]
    pub placed: Placed,
    /// Its primary is running (connected, processing).
    pub running: bool,
    /// Bytes its last restore read from the store (downloaded, or mapped in
    /// place from a local directory; 0 when all came from the local cache).
    pub restore_fetched_bytes: u64,
    /// The newest checkpoint its hot standby holds locally.
    pub standby_checkpoint: Option<u64>,
    /// Taken over (active-active): it runs inside this worker's process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_over_by: Option<WorkerId>,
}

/// One VIP.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipStatus {
    /// The VIP (`addr/prefix`).
    pub vip: String,
    /// The host that should hold it.
    pub assigned: Option<String>,
    /// The lease holder.
    pub holder: Option<String>,
    /// The lease.
    pub lease_id: Option<u64>,
    /// Until the lease expires, ms (authority clock).
    pub lease_expires_in_ms: Option<u64>,
}

/// Job → the cluster's status view.
pub type JobStatusCell = std::sync::Arc<std::sync::Mutex<JobStatus>>;

/// A job's status with a fresh state.
pub fn job_status_cell(job: &JobId, epoch: Epoch) -> JobStatusCell {
    std::sync::Arc::new(std::sync::Mutex::new(JobStatus {
        job: job.to_string(),
        state: JobStateKind::Starting,
        epoch: epoch.0,
        ..JobStatus::default()
    }))
}
