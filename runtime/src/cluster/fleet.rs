//! A job's processes on the cluster's agents: the [`Fleet`] that sends the
//! controller's actions to agents through [`ClusterState`]. A send to a
//! host that is not live is dropped: that host's loss event reaches the job
//! and covers whatever the message was for.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use lazarus_storage::{CheckpointId, JobId, WorkerId};

use crate::cluster::state::Cluster;
use crate::cluster::wire::{SpawnService, SupervisorMsg};
use crate::fleet::Fleet;
use crate::procs::{Slot, WorkerExited};

/// See the module documentation.
#[derive(Debug)]
pub struct ClusterFleet {
    job: JobId,
    cluster: Cluster,
    binary: PathBuf,
    /// What agents run around each worker's processes.
    services: BTreeMap<WorkerId, SpawnService>,
}

impl ClusterFleet {
    /// A fleet on `cluster`'s agents running `binary` for `job`, with
    /// `services` around its workers (programs, checks, hooks).
    pub fn new(
        job: JobId,
        cluster: Cluster,
        binary: PathBuf,
        services: BTreeMap<WorkerId, SpawnService>,
    ) -> ClusterFleet {
        ClusterFleet {
            job,
            cluster,
            binary,
            services,
        }
    }

    fn send(&self, host: &str, msg: SupervisorMsg) {
        if !self.cluster.lock().send(host, msg) {
            tracing::debug!(host, job = %self.job, "message to a host that is not live dropped");
        }
    }
}

impl Fleet for ClusterFleet {
    fn hosts(&self) -> BTreeSet<String> {
        self.cluster.lock().alive()
    }

    fn holds_vips(&self) -> bool {
        true
    }

    fn cache_dir(&self, host: &str) -> PathBuf {
        self.cluster
            .lock()
            .hosts
            .get(host)
            .map(|h| h.state_dir.join(self.job.as_str()).join("cache"))
            .unwrap_or_default()
    }

    fn spawn(
        &mut self,
        host: &str,
        worker: &WorkerId,
        attempt: u64,
        slot: Slot,
        supervisor: SocketAddr,
        token: &str,
    ) {
        let msg = SupervisorMsg::Spawn {
            job: self.job.clone(),
            worker: worker.clone(),
            attempt,
            standby: slot == Slot::Standby,
            binary: self.binary.clone(),
            supervisor,
            token: token.to_string(),
            service: self
                .services
                .get(worker)
                .filter(|s| **s != SpawnService::default())
                .map(|s| Box::new(s.clone())),
        };
        let c = self.cluster.lock();
        if !c.send(host, msg) {
            // A host a new leader presumed alive that has not registered
            // (yet), or one just lost: the process cannot start there. Said
            // at once, so the job places it again instead of waiting for
            // its start-up timeout.
            tracing::warn!(host, %worker, job = %self.job, "cannot start a worker on a host that is not registered");
            if let Some(j) = c.jobs.get(&self.job) {
                let _ = j
                    .events
                    .send(crate::fleet::FleetEvent::Exited(WorkerExited {
                        worker: worker.clone(),
                        attempt,
                        standby: slot == Slot::Standby,
                        host: host.to_string(),
                        exit: crate::procs::ExitKind::SpawnFailed(format!(
                            "host {host} is not registered with this supervisor"
                        )),
                        detail: None,
                    }));
            }
        }
    }

    fn promote(&mut self, host: &str, worker: &WorkerId, attempt: u64) {
        self.send(
            host,
            SupervisorMsg::Promote {
                job: self.job.clone(),
                worker: worker.clone(),
                attempt,
            },
        );
    }

    fn retag(&mut self, host: &str, worker: &WorkerId, attempt: u64) {
        self.send(
            host,
            SupervisorMsg::Retag {
                job: self.job.clone(),
                worker: worker.clone(),
                attempt,
            },
        );
    }

    fn rejoin(
        &mut self,
        host: &str,
        worker: &WorkerId,
        attempt: u64,
        slot: Slot,
        supervisor: SocketAddr,
        token: &str,
    ) {
        self.send(
            host,
            SupervisorMsg::Rejoin {
                job: self.job.clone(),
                worker: worker.clone(),
                attempt,
                standby: slot == Slot::Standby,
                supervisor,
                token: token.to_string(),
            },
        );
    }

    fn kill(&mut self, host: &str, worker: &WorkerId, slot: Slot) {
        self.send(
            host,
            SupervisorMsg::Kill {
                job: self.job.clone(),
                worker: worker.clone(),
                standby: slot == Slot::Standby,
            },
        );
    }

    fn kill_all(&mut self, standbys: bool) {
        let cluster = self.cluster.lock();
        for h in cluster.alive() {
            cluster.send(
                &h,
                SupervisorMsg::KillAll {
                    job: self.job.clone(),
                    standbys,
                },
            );
        }
    }

    fn reap(&mut self, _exit: &WorkerExited) {}

    fn assign_vip(&mut self, vip: &str, host: &str) {
        self.cluster.lock().assign_vip(vip, host);
    }

    fn unassign_vip(&mut self, vip: &str) {
        self.cluster.lock().unassign_vip(vip);
    }

    fn prune_caches(&mut self, referenced: &Arc<HashSet<String>>, newest: CheckpointId) {
        let cluster = self.cluster.lock();
        let referenced: Vec<String> = referenced.iter().cloned().collect();
        for h in cluster.alive() {
            cluster.send(
                &h,
                SupervisorMsg::Prune {
                    job: self.job.clone(),
                    referenced: referenced.clone(),
                    newest,
                },
            );
        }
    }

    fn local_cache(&self) -> Option<PathBuf> {
        None
    }
}
