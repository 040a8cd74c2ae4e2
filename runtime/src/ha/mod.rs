//! Supervisor high availability on etcd (`lazarus supervisor --etcd`).
//!
//! | module | owns |
//! | --- | --- |
//! | `election` | one supervisor's campaign: its etcd lease, the leader key, the term, and the proof of leadership by its own clock |
//! | `records` | what etcd holds: job records, members, health; every leader write is a transaction conditioned on its term |
//!
//! Keys, under a prefix (default `/lazarus`):
//!
//! ```text
//! <prefix>/leader               the leader (JSON Member), bound to its lease; its create revision is the term
//! <prefix>/supervisors/<name>   every running supervisor (JSON Member), bound to its lease
//! <prefix>/jobs/<job>           a job record (JSON JobRecord), written only by the leader
//! ```
//!
//! Store epochs derive from the term ([`epoch_floor`]): a deposed leader's
//! epochs are all below the new leader's, so its commits are fenced by the
//! store's epoch markers as well as by etcd.

pub mod election;
pub mod records;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use election::{Elector, Role};
pub use records::{EtcdHealth, HaStore, JobRecord};

/// Errors of the etcd layer.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// etcd could not be reached or refused the request.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A request did not finish in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// A leader write found that this supervisor no longer leads.
    #[error("not the leader any more (term {term} ended)")]
    NotLeader {
        /// The term that ended.
        term: i64,
    },
    /// A value in etcd is not what Lazarus wrote.
    #[error("etcd key {key}: {reason}")]
    Malformed {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// How a supervisor reaches etcd and campaigns.
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// etcd client URLs, like `http://198.18.0.10:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix, default `/lazarus` (several clusters can share one etcd).
    pub prefix: String,
    /// This supervisor's name (unique among the cluster's supervisors).
    pub name: String,
    /// Where agents and clients reach this supervisor.
    pub advertise: SocketAddr,
    /// The leadership lease: a leader that cannot renew it within this
    /// stops acting, and a dead leader is replaced about this long after it
    /// died. etcd's minimum is 2 s with its default timing.
    pub lease: Duration,
    /// How long a new leader waits for a running job's processes to rejoin,
    /// and how long agents keep workers and VIPs without any leader.
    pub adopt_timeout: Duration,
}

impl HaOptions {
    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("--etcd: at least one endpoint (http://HOST:PORT)".into());
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "--etcd: endpoint {e:?} must start with http:// or https://"
                ));
            }
        }
        if self.lease < Duration::from_secs(2) || self.lease > Duration::from_secs(300) {
            return Err(format!(
                "etcd lease {:?}: must be between 2s (etcd's minimum) and 300s",
                self.lease
            ));
        }
        // etcd's lease TTL is whole seconds: the leader's proof must not
        // outlast what etcd was asked for.
        if self.lease.subsec_nanos() != 0 {
            return Err(format!(
                "etcd lease {:?}: must be whole seconds (etcd's lease TTL is)",
                self.lease
            ));
        }
        if self.adopt_timeout < self.lease || self.adopt_timeout > Duration::from_secs(3600) {
            return Err(format!(
                "etcd adopt_timeout {:?}: must be at least the lease ({:?}) and at most 1h",
                self.adopt_timeout, self.lease
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return Err(format!(
                "etcd prefix {:?}: must start with '/' and not end with it",
                self.prefix
            ));
        }
        if self.name.is_empty()
            || self.name.len() > 64
            || self.name.chars().any(|c| c.is_whitespace() || c == '/')
        {
            return Err(format!(
                "supervisor name {:?}: 1 to 64 characters, no spaces or '/'",
                self.name
            ));
        }
        Ok(())
    }
}

/// A supervisor as etcd lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its name.
    pub name: String,
    /// Its address for agents and clients.
    pub addr: SocketAddr,
}

/// Bits of an epoch below the term: a leader can claim 2^20 epochs of a
/// job (one per start and recovery) before its epochs would reach the next
/// term's.
pub const EPOCH_TERM_SHIFT: u32 = 20;

/// The lowest store epoch a leader of `term` may claim: every epoch of an
/// older term is below it.
pub fn epoch_floor(term: i64) -> u64 {
    (term.max(0) as u64) << EPOCH_TERM_SHIFT
}

pub(crate) fn leader_key(prefix: &str) -> String {
    format!("{prefix}/leader")
}

pub(crate) fn member_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/supervisors/{name}")
}

pub(crate) fn jobs_prefix(prefix: &str) -> String {
    format!("{prefix}/jobs/")
}

/// Connects to etcd (bounded: 5 s per attempt, 2 s per request).
pub async fn connect(endpoints: &[String]) -> Result<etcd_client::Client, HaError> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
    let connect = etcd_client::Client::connect(endpoints, Some(opts));
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| HaError::Timeout(Duration::from_secs(5)))?
        .map_err(HaError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> HaOptions {
        HaOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/lazarus".into(),
            name: "sup-a".into(),
            advertise: "127.0.0.1:7070".parse().expect("addr"),
            lease: Duration::from_secs(3),
            adopt_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn test_epochs_of_a_later_term_are_above_every_epoch_of_an_earlier_one() {
        let older_last = epoch_floor(41) + (1 << EPOCH_TERM_SHIFT) - 1;
        assert!(epoch_floor(42) > older_last);
        assert_eq!(epoch_floor(-1), 0);
    }

    #[test]
    fn test_bad_ha_settings_are_named() {
        let mut o = opts();
        assert_eq!(o.validate(), Ok(()));
        o.endpoints = vec!["127.0.0.1:2379".into()];
        assert!(o.validate().expect_err("invalid").contains("http://"));
        let mut o = opts();
        o.lease = Duration::from_secs(1);
        assert!(o.validate().expect_err("invalid").contains("2s"));
        o.lease = Duration::from_millis(2500);
        assert!(o.validate().expect_err("invalid").contains("whole seconds"));
        let mut o = opts();
        o.prefix = "lazarus/".into();
        assert!(o.validate().expect_err("invalid").contains("prefix"));
        let mut o = opts();
        o.name = "a b".into();
        assert!(o.validate().expect_err("invalid").contains("name"));
        let mut o = opts();
        o.endpoints.clear();
        assert!(o.validate().expect_err("invalid").contains("at least one"));
    }
}
