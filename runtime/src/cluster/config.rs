//! The supervisor's configuration file (`lazarus supervisor --config`):
//!
//! ```toml
//! heartbeat_interval = "100ms"   # supervisor <-> agent heartbeats
//! host_timeout = "500ms"         # a host is lost after this long without one
//!
//! [lease]                        # VIP leases
//! length = "1s"
//! renew_every = "250ms"
//! drift_margin = "200ms"
//!
//! [garp]                         # announcements of a VIP (keepalived's garp_master_*)
//! count = 3                      # frames per burst (garp_master_repeat)
//! delay = "10ms"                 # gap inside a burst (garp_master_delay)
//! refresh = "0s"                 # repeat the burst while holding; 0 = never (garp_master_refresh)
//!
//! [etcd]                         # several supervisors, one leader (flags win)
//! endpoints = ["http://198.18.0.10:2379", "http://198.18.0.11:2379"]
//! name = "sup-a"                 # unique among the supervisors
//! advertise = "198.18.0.1:7070"  # where agents and clients reach this one
//! prefix = "/lazarus"            # key prefix in etcd
//! lease = "3s"                   # leadership lease (whole seconds, 2s..300s)
//! adopt_timeout = "10s"          # a new leader waits this long for running workers to rejoin;
//!                                # agents keep workers and VIPs this long without any leader
//! ```
//!
//! Every field is optional; unknown fields are errors that name the field.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::cluster::wire::GarpSettings;
use crate::lease::LeaseConfig;
use crate::spec::parse_duration;

/// The supervisor's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Heartbeat interval between supervisor and agents.
    pub heartbeat_interval: Duration,
    /// A host is declared lost after this long without a heartbeat.
    pub host_timeout: Duration,
    /// VIP leases.
    pub lease: LeaseConfig,
    /// VIP announcements.
    pub garp: GarpSettings,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat_interval: Duration::from_millis(100),
            host_timeout: Duration::from_millis(500),
            lease: LeaseConfig::default(),
            garp: GarpSettings {
                count: 3,
                delay_ms: 10,
                refresh_ms: 0,
            },
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    heartbeat_interval: Option<String>,
    host_timeout: Option<String>,
    #[serde(default)]
    lease: LeaseFile,
    #[serde(default)]
    garp: GarpFile,
    #[serde(default)]
    etcd: Option<EtcdFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdFile {
    endpoints: Option<Vec<String>>,
    name: Option<String>,
    advertise: Option<String>,
    prefix: Option<String>,
    lease: Option<String>,
    adopt_timeout: Option<String>,
}

/// The `[etcd]` table of the supervisor's config file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// etcd client URLs.
    pub endpoints: Option<Vec<String>>,
    /// This supervisor's name.
    pub name: Option<String>,
    /// Where agents and clients reach this supervisor.
    pub advertise: Option<std::net::SocketAddr>,
    /// Key prefix.
    pub prefix: Option<String>,
    /// Leadership lease.
    pub lease: Option<Duration>,
    /// Adoption timeout.
    pub adopt_timeout: Option<Duration>,
}

impl EtcdSettings {
    /// The `[etcd]` table of `path`, if it has one; errors name the file and
    /// the field.
    pub fn from_file(path: &Path) -> Result<Option<EtcdSettings>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        EtcdSettings::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The `[etcd]` table of the TOML text, if it has one.
    pub fn parse(text: &str) -> Result<Option<EtcdSettings>, String> {
        let f: File = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let Some(e) = f.etcd else {
            return Ok(None);
        };
        let advertise = match &e.advertise {
            Some(a) => Some(
                a.parse()
                    .map_err(|err| format!("etcd.advertise: {a:?}: {err} (want HOST:PORT)"))?,
            ),
            None => None,
        };
        let lease = match &e.lease {
            Some(l) => Some(parse_duration(l).map_err(|err| format!("etcd.lease: {err}"))?),
            None => None,
        };
        let adopt_timeout = match &e.adopt_timeout {
            Some(l) => Some(parse_duration(l).map_err(|err| format!("etcd.adopt_timeout: {err}"))?),
            None => None,
        };
        Ok(Some(EtcdSettings {
            endpoints: e.endpoints,
            name: e.name,
            advertise,
            prefix: e.prefix,
            lease,
            adopt_timeout,
        }))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFile {
    length: Option<String>,
    renew_every: Option<String>,
    drift_margin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GarpFile {
    count: Option<u32>,
    delay: Option<String>,
    refresh: Option<String>,
}

impl ClusterConfig {
    /// Reads `path`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<ClusterConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        ClusterConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the TOML text.
    pub fn parse(text: &str) -> Result<ClusterConfig, String> {
        let f: File = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut c = ClusterConfig::default();
        let dur = |field: &str, v: &Option<String>, into: &mut Duration| -> Result<(), String> {
            if let Some(v) = v {
                *into = parse_duration(v).map_err(|e| format!("{field}: {e}"))?;
            }
            Ok(())
        };
        dur(
            "heartbeat_interval",
            &f.heartbeat_interval,
            &mut c.heartbeat_interval,
        )?;
        dur("host_timeout", &f.host_timeout, &mut c.host_timeout)?;
        dur("lease.length", &f.lease.length, &mut c.lease.length)?;
        dur(
            "lease.renew_every",
            &f.lease.renew_every,
            &mut c.lease.renew_every,
        )?;
        dur(
            "lease.drift_margin",
            &f.lease.drift_margin,
            &mut c.lease.drift_margin,
        )?;
        if let Some(n) = f.garp.count {
            c.garp.count = n;
        }
        let mut delay = Duration::from_millis(c.garp.delay_ms);
        dur("garp.delay", &f.garp.delay, &mut delay)?;
        c.garp.delay_ms = delay.as_millis() as u64;
        let mut refresh = Duration::from_millis(c.garp.refresh_ms);
        dur("garp.refresh", &f.garp.refresh, &mut refresh)?;
        c.garp.refresh_ms = refresh.as_millis() as u64;
        c.validate()?;
        Ok(c)
    }

    /// Checks the fields together.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_zero() {
            return Err("heartbeat_interval: must be more than 0".into());
        }
        if self.host_timeout < self.heartbeat_interval * 2 {
            return Err("host_timeout: must be at least twice heartbeat_interval".into());
        }
        if !(1..=100).contains(&self.garp.count) {
            return Err("garp.count: must be 1..=100".into());
        }
        self.lease.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parses_fields_and_names_bad_ones() {
        let c = ClusterConfig::parse(
            "heartbeat_interval = \"20ms\"\nhost_timeout = \"100ms\"\n[lease]\nlength = \"100ms\"\nrenew_every = \"25ms\"\ndrift_margin = \"20ms\"\n[garp]\ncount = 5\ndelay = \"1ms\"\nrefresh = \"1s\"\n",
        )
        .expect("valid");
        assert_eq!(c.lease.length, Duration::from_millis(100));
        assert_eq!(c.garp.refresh_ms, 1000);
        assert_eq!(
            ClusterConfig::parse("").expect("empty"),
            ClusterConfig::default()
        );
        for (text, needle) in [
            (
                "heartbeat_intervall = \"1s\"",
                "unknown field `heartbeat_intervall`",
            ),
            ("host_timeout = \"1 week\"", "host_timeout"),
            (
                "host_timeout = \"150ms\"",
                "host_timeout: must be at least twice",
            ),
            ("[lease]\nrenew_every = \"900ms\"", "lease.renew_every"),
            ("[garp]\ncount = 0", "garp.count"),
            ("[etcd]\nendpoint = []", "unknown field `endpoint`"),
        ] {
            let e = ClusterConfig::parse(text).expect_err(text);
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        }
    }

    #[test]
    fn test_etcd_table_parses_and_names_bad_fields() {
        let e = EtcdSettings::parse(
            "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nname = \"a\"\nadvertise = \"127.0.0.1:7070\"\nlease = \"5s\"\n",
        )
        .expect("valid")
        .expect("has [etcd]");
        assert_eq!(e.lease, Some(Duration::from_secs(5)));
        assert_eq!(e.name.as_deref(), Some("a"));
        assert_eq!(EtcdSettings::parse("").expect("empty"), None);
        let bad = EtcdSettings::parse("[etcd]\nadvertise = \"nowhere\"").expect_err("bad");
        assert!(bad.contains("etcd.advertise"), "{bad}");
        let bad = EtcdSettings::parse("[etcd]\nlease = \"soon\"").expect_err("bad");
        assert!(bad.contains("etcd.lease"), "{bad}");
    }
}
