//! Prometheus metrics (`--metrics ADDR` on the supervisor and the agent),
//! through the `metrics` facade and its Prometheus exporter. Names and
//! labels are documented in `docs/metrics.md`; this module is the only place
//! that spells them.
//!
//! The job controller stays pure: the supervisor shell hands each job's
//! status to a [`JobMetrics`] after every fact, which turns changes into
//! counter increments and histogram samples. Cluster-wide gauges (agent
//! heartbeat age, VIP leases) are set from the status report by
//! [`observe_cluster`] every half second; the agent sets its own.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::clock::Stopwatch;
use crate::cluster::wire::{JobStatus, StatusReport};
use crate::supervisor::{JobStateKind, RunSummary};

/// Checkpoint trigger → commit.
pub const CHECKPOINT_DURATION: &str = "lazarus_checkpoint_duration_seconds";
/// Stored bytes of each committed checkpoint.
pub const CHECKPOINT_SIZE: &str = "lazarus_checkpoint_size_bytes";
/// Committed checkpoints.
pub const CHECKPOINTS_COMMITTED: &str = "lazarus_checkpoints_committed_total";
/// Aborted checkpoints.
pub const CHECKPOINTS_ABORTED: &str = "lazarus_checkpoints_aborted_total";
/// Worker restores from a checkpoint.
pub const RESTORES: &str = "lazarus_restores_total";
/// Bytes those restores downloaded (local cache hits are not counted).
pub const RESTORE_BYTES: &str = "lazarus_restore_bytes_total";
/// Planned moves of a worker (fail-backs and `lazarus move`).
pub const MOVES: &str = "lazarus_moves_total";
/// Active-active instances taken over inside a surviving instance's process.
pub const TAKEOVERS: &str = "lazarus_takeovers_total";
/// Failovers (recoveries), by cause.
pub const FAILOVERS: &str = "lazarus_failovers_total";
/// Failure detected → every worker running again.
pub const FAILOVER_DURATION: &str = "lazarus_failover_duration_seconds";
/// Checkpoints a hot standby is behind the newest commit.
pub const STANDBY_LAG: &str = "lazarus_standby_lag_checkpoints";
/// 1 for the job's current state, 0 for the others.
pub const JOB_STATE: &str = "lazarus_job_state";
/// Since the supervisor last heard from an agent.
pub const AGENT_HEARTBEAT_AGE: &str = "lazarus_agent_heartbeat_age_seconds";
/// Agents alive.
pub const AGENTS_ALIVE: &str = "lazarus_agents_alive";
/// 1 for the holder of a VIP's lease.
pub const VIP_LEASE_HOLDER: &str = "lazarus_vip_lease_holder";
/// Until a VIP's lease expires.
pub const VIP_LEASE_REMAINING: &str = "lazarus_vip_lease_remaining_seconds";
/// Agent: 1 while this host has the VIP on its interface.
pub const VIP_HELD: &str = "lazarus_vip_held";
/// Agent: since it last heard from its supervisor.
pub const SUPERVISOR_HEARTBEAT_AGE: &str = "lazarus_supervisor_heartbeat_age_seconds";
/// Agent: health probes, by result.
pub const HEALTH_CHECKS: &str = "lazarus_health_checks_total";
/// Agent: 1 while a process counts as up by its check.
pub const HEALTH_UP: &str = "lazarus_health_up";
/// Agent: notify hooks run, by state and result.
pub const NOTIFY_HOOKS: &str = "lazarus_notify_hooks_total";
/// Agent: worker process exits, by kind.
pub const WORKER_EXITS: &str = "lazarus_worker_exits_total";

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process serves metrics (gauges that cost a status report
/// are only computed then).
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Serves metrics on `addr` (every path answers) from now on. Call once per
/// process, inside the tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    let seconds = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    ];
    let bytes = [
        1024.0,
        16384.0,
        262144.0,
        1048576.0,
        16777216.0,
        268435456.0,
        1073741824.0,
        4294967296.0,
    ];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &bytes)?
        .install()
        .map_err(|e| anyhow::anyhow!("--metrics {addr}: {e}"))?;
    ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        CHECKPOINT_DURATION,
        Unit::Seconds,
        "checkpoint trigger to commit"
    );
    describe_histogram!(
        CHECKPOINT_SIZE,
        Unit::Bytes,
        "stored bytes of a committed checkpoint"
    );
    describe_counter!(CHECKPOINTS_COMMITTED, "checkpoints committed");
    describe_counter!(CHECKPOINTS_ABORTED, "checkpoints aborted");
    describe_counter!(RESTORES, "worker restores from a checkpoint");
    describe_counter!(RESTORE_BYTES, Unit::Bytes, "bytes downloaded by restores");
    describe_counter!(FAILOVERS, "failovers (recoveries) by cause");
    describe_counter!(
        MOVES,
        "planned moves of a worker: fail-backs and lazarus move"
    );
    describe_counter!(
        TAKEOVERS,
        "failed instances taken over inside a surviving instance's process"
    );
    describe_histogram!(
        FAILOVER_DURATION,
        Unit::Seconds,
        "failure detected to every worker running again"
    );
    describe_gauge!(STANDBY_LAG, "checkpoints a hot standby is behind");
    describe_gauge!(JOB_STATE, "1 for the job's current state");
    describe_gauge!(
        AGENT_HEARTBEAT_AGE,
        Unit::Seconds,
        "since the supervisor heard from the agent"
    );
    describe_gauge!(AGENTS_ALIVE, "agents alive");
    describe_gauge!(VIP_LEASE_HOLDER, "1 for the holder of the VIP lease");
    describe_gauge!(
        VIP_LEASE_REMAINING,
        Unit::Seconds,
        "until the VIP lease expires"
    );
    describe_gauge!(VIP_HELD, "1 while the VIP is on this host's interface");
    describe_gauge!(
        SUPERVISOR_HEARTBEAT_AGE,
        Unit::Seconds,
        "since the agent heard from its supervisor"
    );
    describe_counter!(HEALTH_CHECKS, "health probes by result");
    describe_gauge!(HEALTH_UP, "1 while the process counts as up by its check");
    describe_counter!(NOTIFY_HOOKS, "notify hooks run, by state and result");
    describe_counter!(WORKER_EXITS, "worker process exits, by kind");
}

/// The failover cause of a recovery, from its message: `worker_exit`,
/// `health_check`, `host_lost`, `heartbeat`, `startup` or `other`.
pub fn failover_cause(why: &str) -> &'static str {
    if why.contains("health check") {
        "health_check"
    } else if why.contains("was lost with its host")
        || why.contains("host ") && why.contains("lost")
    {
        "host_lost"
    } else if why.contains("silent") || why.contains("heartbeat") {
        "heartbeat"
    } else if why.contains("did not start") || why.contains("startup") {
        "startup"
    } else if why.contains("worker ") {
        "worker_exit"
    } else {
        "other"
    }
}

/// Turns one job's status changes into metrics.
#[derive(Debug)]
pub struct JobMetrics {
    job: String,
    committed: u64,
    aborted: u64,
    restores: u64,
    restarts: u32,
    moves: u32,
    takeovers: u32,
    state: Option<JobStateKind>,
    failing_since: Option<Stopwatch>,
    /// Restarts whose cause is not final yet, and the last cause seen.
    pending: u32,
    last_failure: Option<String>,
}

impl JobMetrics {
    /// For job `job`, counting from what `summary` already says (an
    /// adopted job does not count its past again).
    pub fn new(job: &str, summary: &RunSummary) -> JobMetrics {
        JobMetrics {
            job: job.to_string(),
            committed: summary.committed,
            aborted: summary.aborted,
            restores: summary.restores,
            restarts: summary.restarts,
            moves: summary.moves,
            takeovers: summary.takeovers,
            state: None,
            failing_since: None,
            pending: 0,
            last_failure: summary.last_failure.clone(),
        }
    }

    /// After a fact: what changed since the last call.
    pub fn observe(&mut self, summary: &RunSummary, status: &JobStatus) {
        let job = self.job.clone();
        if summary.committed > self.committed {
            let new = (summary.committed - self.committed) as usize;
            counter!(CHECKPOINTS_COMMITTED, "job" => job.clone()).increment(new as u64);
            for d in summary.checkpoint_latencies.iter().rev().take(new) {
                histogram!(CHECKPOINT_DURATION, "job" => job.clone()).record(d.as_secs_f64());
            }
            histogram!(CHECKPOINT_SIZE, "job" => job.clone())
                .record(summary.last_checkpoint_bytes as f64);
            self.committed = summary.committed;
        }
        if summary.aborted > self.aborted {
            counter!(CHECKPOINTS_ABORTED, "job" => job.clone())
                .increment(summary.aborted - self.aborted);
            self.aborted = summary.aborted;
        }
        if summary.restores > self.restores {
            counter!(RESTORES, "job" => job.clone()).increment(summary.restores - self.restores);
            self.restores = summary.restores;
        }
        if summary.restored_bytes > 0 {
            counter!(RESTORE_BYTES, "job" => job.clone()).absolute(summary.restored_bytes);
        }
        if summary.moves > self.moves {
            counter!(MOVES, "job" => job.clone()).increment(u64::from(summary.moves - self.moves));
            self.moves = summary.moves;
        }
        if summary.takeovers > self.takeovers {
            counter!(TAKEOVERS, "job" => job.clone())
                .increment(u64::from(summary.takeovers - self.takeovers));
            self.takeovers = summary.takeovers;
        }
        if summary.restarts > self.restarts {
            self.pending += summary.restarts - self.restarts;
            self.restarts = summary.restarts;
            self.failing_since.get_or_insert_with(Stopwatch::start);
        }
        // A failure's cause is final once the controller names it (it may
        // wait briefly for the crashed process's exit).
        let named = summary.last_failure != self.last_failure;
        if self.pending > 0 && (named || status.state == JobStateKind::Running) {
            let cause = failover_cause(summary.last_failure.as_deref().unwrap_or(""));
            counter!(FAILOVERS, "job" => job.clone(), "cause" => cause)
                .increment(u64::from(self.pending));
            self.pending = 0;
        }
        self.last_failure.clone_from(&summary.last_failure);
        if status.state == JobStateKind::Running {
            if let Some(t0) = self.failing_since.take() {
                histogram!(FAILOVER_DURATION, "job" => job.clone())
                    .record(t0.elapsed().as_secs_f64());
            }
        }
        if self.state != Some(status.state) {
            if let Some(old) = self.state {
                gauge!(JOB_STATE, "job" => job.clone(), "state" => old.to_string()).set(0.0);
            }
            gauge!(JOB_STATE, "job" => job.clone(), "state" => status.state.to_string()).set(1.0);
            self.state = Some(status.state);
        }
        let newest = status.last_checkpoint.unwrap_or(0);
        for w in &status.workers {
            if let Some(followed) = w.standby_checkpoint {
                let lag = newest.saturating_sub(followed) as f64;
                gauge!(STANDBY_LAG, "job" => job.clone(), "worker" => w.worker.to_string())
                    .set(lag);
            }
        }
    }
}

/// Sets the cluster-wide gauges from a status report.
pub fn observe_cluster(report: &StatusReport) {
    let mut alive = 0.0;
    for h in &report.hosts {
        if h.alive {
            alive += 1.0;
        }
        gauge!(AGENT_HEARTBEAT_AGE, "host" => h.name.clone())
            .set(Duration::from_millis(h.last_heartbeat_ms).as_secs_f64());
    }
    gauge!(AGENTS_ALIVE).set(alive);
    for v in &report.vips {
        let holder = v.holder.clone().unwrap_or_default();
        for h in &report.hosts {
            gauge!(VIP_LEASE_HOLDER, "vip" => v.vip.clone(), "host" => h.name.clone())
                .set(if h.name == holder { 1.0 } else { 0.0 });
        }
        gauge!(VIP_LEASE_REMAINING, "vip" => v.vip.clone())
            .set(v.lease_expires_in_ms.unwrap_or(0) as f64 / 1000.0);
    }
}
