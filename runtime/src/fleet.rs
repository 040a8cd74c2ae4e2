//! Where a job's worker processes run, as the supervisor shell sees it: a
//! [`Fleet`] carries out the controller's process and VIP actions, and the
//! job hears [`FleetEvent`]s back. Two implementations: [`LocalFleet`] (one
//! [`ProcessTable`] in this process, `lazarus run`) and
//! `cluster::fleet::ClusterFleet` (the cluster's agents). This module knows
//! nothing of the cluster; the cluster module implements the trait.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use lazarus_storage::{CheckpointId, WorkerId};

use crate::procs::{ProcessTable, Slot, WorkerExited};

/// The host name of `lazarus run`'s single host.
pub const LOCAL_HOST: &str = "local";

/// What happened to the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    /// A worker process ended.
    Exited(WorkerExited),
    /// A host was declared lost: every process on it is gone.
    HostLost(String),
    /// A host registered (or came back).
    HostJoined(String),
    /// A hot standby's health check changed.
    StandbyHealth {
        /// The worker.
        worker: WorkerId,
        /// The standby's host.
        host: String,
        /// Up or down.
        up: bool,
    },
    /// Someone asked to move a worker's primary to a host (`lazarus move`).
    Move {
        /// The worker.
        worker: WorkerId,
        /// The host.
        host: String,
    },
    /// A host refused to do something for the job (its allow-lists).
    Refused {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
}

/// The processes and VIPs of one job. Every call is a send or a signal:
/// nothing here waits for a host.
pub trait Fleet: Send {
    /// Live hosts now.
    fn hosts(&self) -> BTreeSet<String>;
    /// Whether this fleet can hold VIPs.
    fn holds_vips(&self) -> bool;
    /// The local cache directory of workers on `host`.
    fn cache_dir(&self, host: &str) -> PathBuf;
    /// Starts `worker`'s process in `slot` on `host`, told to report to
    /// `supervisor` with `token` (its credential). A failure to start comes
    /// back as an exit.
    fn spawn(
        &mut self,
        host: &str,
        worker: &WorkerId,
        attempt: u64,
        slot: Slot,
        supervisor: SocketAddr,
        token: &str,
    );
    /// Makes `worker`'s standby process on `host` its primary for `attempt`.
    fn promote(&mut self, host: &str, worker: &WorkerId, attempt: u64);
    /// `worker`'s primary process on `host` was rolled back in place: it
    /// belongs to `attempt` now.
    fn retag(&mut self, host: &str, worker: &WorkerId, attempt: u64);
    /// Hands `worker`'s running process in `slot` on `host` a rejoin ticket
    /// for `supervisor` (a new HA leader adopting the job). A process that
    /// is not there comes back as an exit.
    fn rejoin(
        &mut self,
        host: &str,
        worker: &WorkerId,
        attempt: u64,
        slot: Slot,
        supervisor: SocketAddr,
        token: &str,
    ) {
        let _ = (host, worker, attempt, slot, supervisor, token);
    }
    /// SIGKILLs one process.
    fn kill(&mut self, host: &str, worker: &WorkerId, slot: Slot);
    /// SIGKILLs every primary of the job (every process if `standbys`).
    fn kill_all(&mut self, standbys: bool);
    /// Forgets a process whose exit was reported.
    fn reap(&mut self, exit: &WorkerExited);
    /// Moves `vip` to `host`.
    fn assign_vip(&mut self, vip: &str, host: &str);
    /// Nobody holds `vip` any more.
    fn unassign_vip(&mut self, vip: &str);
    /// Prunes the job's local caches on other hosts to what retention kept
    /// (this process's own cache is pruned by the storage task).
    fn prune_caches(&mut self, referenced: &Arc<HashSet<String>>, newest: CheckpointId);
    /// This process's own cache directory, if workers run here.
    fn local_cache(&self) -> Option<PathBuf>;
}

/// `lazarus run`: every process on this host.
pub struct LocalFleet(pub ProcessTable);

impl Fleet for LocalFleet {
    fn hosts(&self) -> BTreeSet<String> {
        BTreeSet::from([LOCAL_HOST.to_string()])
    }

    fn holds_vips(&self) -> bool {
        false
    }

    fn cache_dir(&self, _host: &str) -> PathBuf {
        self.0.cache_dir().to_path_buf()
    }

    fn spawn(
        &mut self,
        _host: &str,
        worker: &WorkerId,
        attempt: u64,
        slot: Slot,
        supervisor: SocketAddr,
        token: &str,
    ) {
        self.0.spawn(worker, attempt, slot, supervisor, token);
    }

    fn promote(&mut self, _host: &str, worker: &WorkerId, attempt: u64) {
        self.0.promote(worker, attempt);
    }

    fn retag(&mut self, _host: &str, worker: &WorkerId, attempt: u64) {
        self.0.retag(worker, attempt);
    }

    fn kill(&mut self, _host: &str, worker: &WorkerId, slot: Slot) {
        self.0.kill(worker, slot);
    }

    fn kill_all(&mut self, standbys: bool) {
        if standbys {
            self.0.kill_all();
        } else {
            self.0.kill_primaries();
        }
    }

    fn reap(&mut self, exit: &WorkerExited) {
        self.0.reap(exit);
    }

    fn assign_vip(&mut self, _vip: &str, _host: &str) {}

    fn unassign_vip(&mut self, _vip: &str) {}

    fn prune_caches(&mut self, _referenced: &Arc<HashSet<String>>, _newest: CheckpointId) {}

    fn local_cache(&self) -> Option<PathBuf> {
        Some(self.0.cache_dir().to_path_buf())
    }
}
