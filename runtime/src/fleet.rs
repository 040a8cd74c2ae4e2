//! Where a job's worker processes run: one local [`Agent`] (`lazarus run`)
//! or the agents of a cluster (`lazarus supervisor`). The supervisor's job
//! loop talks to a [`Fleet`] and hears [`FleetEvent`]s; it does not know
//! which one it has.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use lazarus_storage::{CheckpointId, JobId, WorkerId};
use tokio::sync::mpsc;

use crate::agent::{Agent, Slot, WorkerExited};
use crate::cluster::state::Cluster;
use crate::cluster::wire::SupervisorMsg;

/// The host name of `lazarus run`'s single agent.
pub const LOCAL_HOST: &str = "local";

/// What happened to the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    /// A worker process ended.
    Exited(WorkerExited),
    /// A host was declared lost: every process on it is gone.
    HostLost(String),
}

/// A job's processes on the cluster's agents.
#[derive(Debug)]
pub struct ClusterFleet {
    job: JobId,
    cluster: Cluster,
    binary: PathBuf,
    /// Processes started and not yet reported ended: host and attempt.
    procs: BTreeMap<(WorkerId, Slot), (String, u64)>,
}

/// The processes of one job.
pub enum Fleet {
    /// `lazarus run`: one agent in this process.
    Local(Agent),
    /// `lazarus supervisor`: agents on other hosts.
    Cluster(ClusterFleet),
}

impl Fleet {
    /// A local fleet; exits arrive on the returned channel.
    pub fn local(
        agent: Agent,
        mut exits: mpsc::UnboundedReceiver<WorkerExited>,
    ) -> (Fleet, mpsc::UnboundedReceiver<FleetEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(e) = exits.recv().await {
                if tx.send(FleetEvent::Exited(e)).is_err() {
                    break;
                }
            }
        });
        (Fleet::Local(agent), rx)
    }

    /// A fleet on `cluster`'s agents running `binary` for `job`.
    pub fn cluster(job: JobId, cluster: Cluster, binary: PathBuf) -> Fleet {
        Fleet::Cluster(ClusterFleet {
            job,
            cluster,
            binary,
            procs: BTreeMap::new(),
        })
    }

    /// Live hosts.
    pub fn hosts(&self) -> BTreeSet<String> {
        match self {
            Fleet::Local(_) => BTreeSet::from([LOCAL_HOST.to_string()]),
            Fleet::Cluster(c) => c.cluster.lock().alive(),
        }
    }

    /// Whether this fleet can hold VIPs.
    pub fn has_vips(&self) -> bool {
        matches!(self, Fleet::Cluster(_))
    }

    /// The local cache directory of workers on `host`.
    pub fn cache_dir(&self, host: &str) -> PathBuf {
        match self {
            Fleet::Local(a) => a.cache_dir().to_path_buf(),
            Fleet::Cluster(c) => c
                .cluster
                .lock()
                .hosts
                .get(host)
                .map(|h| h.state_dir.join(c.job.as_str()).join("cache"))
                .unwrap_or_default(),
        }
    }

    /// Starts `worker`'s process in `slot` on `host`.
    pub fn spawn(
        &mut self,
        host: &str,
        worker: &WorkerId,
        attempt: u64,
        slot: Slot,
        supervisor: SocketAddr,
    ) {
        match self {
            Fleet::Local(a) => a.spawn(worker, attempt, slot, supervisor),
            Fleet::Cluster(c) => {
                c.procs
                    .insert((worker.clone(), slot), (host.to_string(), attempt));
                let sent = c.cluster.lock().send(
                    host,
                    SupervisorMsg::Spawn {
                        job: c.job.clone(),
                        worker: worker.clone(),
                        attempt,
                        standby: slot == Slot::Standby,
                        binary: c.binary.clone(),
                        supervisor,
                    },
                );
                if !sent {
                    // The host went away: its loss event covers this process.
                    tracing::warn!(host, %worker, "spawn on a host that is not live");
                }
            }
        }
    }

    /// The host of `worker`'s process in `slot`, if it runs.
    pub fn host_of(&self, worker: &WorkerId, slot: Slot) -> Option<String> {
        match self {
            Fleet::Local(a) => a.has(worker, slot).then(|| LOCAL_HOST.to_string()),
            Fleet::Cluster(c) => c.procs.get(&(worker.clone(), slot)).map(|(h, _)| h.clone()),
        }
    }

    /// Makes `worker`'s standby process its primary for `attempt`.
    pub fn promote(&mut self, worker: &WorkerId, attempt: u64) -> bool {
        match self {
            Fleet::Local(a) => a.promote(worker, attempt),
            Fleet::Cluster(c) => {
                let Some((host, _)) = c.procs.remove(&(worker.clone(), Slot::Standby)) else {
                    return false;
                };
                c.procs
                    .insert((worker.clone(), Slot::Primary), (host.clone(), attempt));
                c.cluster.lock().send(
                    &host,
                    SupervisorMsg::Promote {
                        job: c.job.clone(),
                        worker: worker.clone(),
                        attempt,
                    },
                )
            }
        }
    }

    /// SIGKILLs one process.
    pub fn kill(&mut self, worker: &WorkerId, slot: Slot) {
        match self {
            Fleet::Local(a) => a.kill(worker, slot),
            Fleet::Cluster(c) => {
                if let Some((host, _)) = c.procs.get(&(worker.clone(), slot)) {
                    c.cluster.lock().send(
                        host,
                        SupervisorMsg::Kill {
                            job: c.job.clone(),
                            worker: worker.clone(),
                            standby: slot == Slot::Standby,
                        },
                    );
                }
            }
        }
    }

    /// SIGKILLs every primary (`standbys`: every process).
    pub fn kill_all(&mut self, standbys: bool) {
        match self {
            Fleet::Local(a) if standbys => a.kill_all(),
            Fleet::Local(a) => a.kill_primaries(),
            Fleet::Cluster(c) => {
                let hosts: BTreeSet<&String> = c.procs.values().map(|(h, _)| h).collect();
                let cluster = c.cluster.lock();
                for h in hosts {
                    cluster.send(
                        h,
                        SupervisorMsg::KillAll {
                            job: c.job.clone(),
                            standbys,
                        },
                    );
                }
            }
        }
    }

    /// Forgets a process whose exit was reported.
    pub fn reap(&mut self, exit: &WorkerExited) {
        match self {
            Fleet::Local(a) => a.reap(exit),
            Fleet::Cluster(c) => {
                let slot = if exit.standby {
                    Slot::Standby
                } else {
                    Slot::Primary
                };
                let key = (exit.worker.clone(), slot);
                if c.procs
                    .get(&key)
                    .is_some_and(|(h, a)| *h == exit.host && *a == exit.attempt)
                {
                    c.procs.remove(&key);
                }
            }
        }
    }

    /// Forgets every process on a lost host.
    pub fn host_lost(&mut self, host: &str) -> Vec<(WorkerId, Slot)> {
        match self {
            Fleet::Local(_) => Vec::new(),
            Fleet::Cluster(c) => {
                let gone: Vec<(WorkerId, Slot)> = c
                    .procs
                    .iter()
                    .filter(|(_, (h, _))| h == host)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &gone {
                    c.procs.remove(k);
                }
                gone
            }
        }
    }

    /// Primary processes believed running.
    pub fn running_primaries(&self) -> usize {
        match self {
            Fleet::Local(a) => a
                .running()
                .iter()
                .filter(|(_, s, _)| *s == Slot::Primary)
                .count(),
            Fleet::Cluster(c) => c.procs.keys().filter(|(_, s)| *s == Slot::Primary).count(),
        }
    }

    /// Moves `vip` to `host`.
    pub fn assign_vip(&self, vip: &str, host: &str) {
        if let Fleet::Cluster(c) = self {
            c.cluster.lock().assign_vip(vip, host);
        }
    }

    /// Nobody holds `vip` any more.
    pub fn unassign_vip(&self, vip: &str) {
        if let Fleet::Cluster(c) = self {
            c.cluster.lock().unassign_vip(vip);
        }
    }

    /// Tells the agents to prune the job's local caches (the local agent's
    /// cache is pruned by the supervisor itself).
    pub fn prune_remote(
        &self,
        referenced: &std::collections::HashSet<String>,
        newest: CheckpointId,
    ) {
        if let Fleet::Cluster(c) = self {
            let cluster = c.cluster.lock();
            for h in cluster.alive() {
                cluster.send(
                    &h,
                    SupervisorMsg::Prune {
                        job: c.job.clone(),
                        referenced: referenced.iter().cloned().collect(),
                        newest,
                    },
                );
            }
        }
    }
}
