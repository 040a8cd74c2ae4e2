//! What etcd holds for the cluster: job records (written only by the
//! leader, each write a transaction conditioned on its term), the
//! supervisors, and etcd's own health for `lazarus status`.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{jobs_prefix, leader_key, HaError, Member};

/// Bound on one etcd request of the leader.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A job as etcd remembers it: enough to run it again on any supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job id.
    pub job: String,
    /// The spec as submitted (TOML text).
    pub spec: String,
    /// Where the spec came from (for messages).
    pub origin: String,
    /// The spec's directory (relative paths in it resolve here).
    pub dir: PathBuf,
    /// `--set` overrides as submitted.
    pub set: Vec<String>,
    /// `--parallelism` overrides as submitted (and added by rescales).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parallelism: Vec<String>,
    /// `--vips` overrides as submitted (and set by rescales).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<String>,
    /// The store the job checkpoints to.
    pub store: String,
    /// `running` (a leader must run it) or a terminal state: `finished`,
    /// `stopped`, `failed`.
    pub state: String,
    /// The store epoch its current run claimed.
    pub epoch: u64,
    /// The newest committed checkpoint the leader has seen.
    pub last_checkpoint: Option<u64>,
    /// The term of the leader that wrote this record.
    pub term: i64,
    /// Why it failed, when `state` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Where its processes and VIPs are (written before each change takes
    /// effect): what a new leader adopts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<crate::supervisor::Adoption>,
}

impl JobRecord {
    /// What was submitted, to run it again.
    pub fn submission(&self) -> crate::cluster::wire::Submission {
        crate::cluster::wire::Submission {
            spec: self.spec.clone(),
            origin: self.origin.clone(),
            dir: self.dir.clone(),
            set: self.set.clone(),
            parallelism: self.parallelism.clone(),
            vips: self.vips.clone(),
        }
    }

    /// A leader must run this job.
    pub fn wants_running(&self) -> bool {
        self.state == "running"
    }
}

/// etcd's health as a supervisor sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdHealth {
    /// The endpoints configured.
    pub endpoints: Vec<String>,
    /// A status request to etcd succeeded.
    pub healthy: bool,
    /// etcd's version, when healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The leader's (and followers' read-only) view of etcd.
#[derive(Clone)]
pub struct HaStore {
    client: etcd_client::Client,
    prefix: String,
    endpoints: Vec<String>,
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, HaError> {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .map_err(|_| HaError::Timeout(REQUEST_TIMEOUT))?
        .map_err(HaError::from)
}

impl HaStore {
    /// Over `client`, under `prefix`.
    pub fn new(client: etcd_client::Client, prefix: &str, endpoints: &[String]) -> HaStore {
        HaStore {
            client,
            prefix: prefix.to_string(),
            endpoints: endpoints.to_vec(),
        }
    }

    /// Writes `rec` if `term` still leads; [`HaError::NotLeader`] if not.
    pub async fn put_job(&self, term: i64, rec: &JobRecord) -> Result<(), HaError> {
        let key = format!("{}{}", jobs_prefix(&self.prefix), rec.job);
        let value = serde_json::to_vec(rec).map_err(|e| HaError::Malformed {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                leader_key(&self.prefix),
                CompareOp::Equal,
                term,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        let mut c = self.client.clone();
        let resp = bounded(c.txn(txn)).await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(HaError::NotLeader { term })
        }
    }

    /// Every job record; a record that does not parse is an error naming
    /// its key (nothing is guessed).
    pub async fn jobs(&self) -> Result<Vec<JobRecord>, HaError> {
        let mut c = self.client.clone();
        let resp = bounded(c.get(
            jobs_prefix(&self.prefix),
            Some(GetOptions::new().with_prefix()),
        ))
        .await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice::<JobRecord>(kv.value()).map_err(|e| HaError::Malformed {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// The supervisors with a live lease, by name.
    pub async fn members(&self) -> Result<Vec<Member>, HaError> {
        let mut c = self.client.clone();
        let resp = bounded(c.get(
            super::member_key(&self.prefix, ""),
            Some(GetOptions::new().with_prefix()),
        ))
        .await?;
        let mut out: Vec<Member> = resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every VIP held under an agent's etcd lease: VIP → (agent, lease).
    pub async fn vip_holders(
        &self,
    ) -> Result<std::collections::BTreeMap<String, (String, i64)>, HaError> {
        let prefix = format!("{}/vips/", self.prefix);
        let mut c = self.client.clone();
        let resp = bounded(c.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                (
                    key.strip_prefix(&prefix).unwrap_or(&key).to_string(),
                    (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()),
                )
            })
            .collect())
    }

    /// Seconds left on etcd lease `id` (etcd's granularity), if it lives.
    pub async fn lease_ttl(&self, id: i64) -> Option<i64> {
        let mut c = self.client.clone();
        bounded(c.lease_time_to_live(id, None))
            .await
            .ok()
            .map(|r| r.ttl())
            .filter(|t| *t >= 0)
    }

    /// The current leader and its term, if any.
    pub async fn leader(&self) -> Result<Option<(Member, i64)>, HaError> {
        let mut c = self.client.clone();
        let resp = bounded(c.get(leader_key(&self.prefix), None)).await?;
        Ok(resp.kvs().first().and_then(|kv| {
            serde_json::from_slice::<Member>(kv.value())
                .ok()
                .map(|m| (m, kv.create_revision()))
        }))
    }

    /// Asks etcd for its status.
    pub async fn health(&self) -> EtcdHealth {
        let mut c = self.client.clone();
        match bounded(c.status()).await {
            Ok(s) => EtcdHealth {
                endpoints: self.endpoints.clone(),
                healthy: true,
                version: Some(s.version().to_string()),
                error: None,
            },
            Err(e) => EtcdHealth {
                endpoints: self.endpoints.clone(),
                healthy: false,
                version: None,
                error: Some(e.to_string()),
            },
        }
    }
}
