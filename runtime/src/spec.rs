//! The job spec: a TOML file describing operators, edges, checkpointing,
//! restarts, storage and parameters. Parsing rejects unknown fields;
//! [`JobSpec::validate`] checks the graph. Every error names the field.
//!
//! ```toml
//! [job]
//! name = "wordcount"
//! worker = "wordcount"        # worker binary: a path (relative to this file) or a name
//! key_groups = 128            # fixed for the job's lifetime
//!
//! [checkpoint]
//! interval = "1s"             # or "off"
//! timeout = "60s"
//! max_concurrent = 1
//! retention = 3
//! retention_interval = "2s"   # at most one retention pass this often
//! codec = "auto"             # none for a local directory, zstd (level 1) for any other store
//! read_ahead = true           # find barriers by reading inputs ahead (records in flight kept)
//!
//! [restart]
//! max_attempts = 20
//! backoff = "100ms"           # doubled per consecutive failure, up to max_backoff
//! max_backoff = "5s"
//! keep_processes = true       # roll workers that did not fail back in place
//!
//! [[operator]]
//! name = "source"
//! kind = "file-source"
//! parallelism = 1
//!
//! [[edge]]
//! from = "source"
//! to = "tokenizer"
//! partition = "rebalance"     # forward | hash | rebalance
//!
//! [params]
//! input = "input.txt"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lazarus_sdk::protocol::{OutputEdge, Partition};
use lazarus_storage::{Codec, JobId, WorkerId};
use serde::{Deserialize, Deserializer};

use crate::service::spec::{HealthSpec, NotifySpec, ProcessSpec, PROCESS_KIND};

/// A spec that cannot be used, and where.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read job spec {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the message, not a `source`: printed once).
        error: std::io::Error,
    },
    /// TOML or a field's type or value is wrong.
    #[error("job spec {origin}: {message}")]
    Parse {
        /// The file (or "<inline>").
        origin: String,
        /// The parser's message (names the field and line).
        message: String,
    },
    /// A field is well-formed but invalid.
    #[error("job spec {origin}: {field}: {message}")]
    Invalid {
        /// The file.
        origin: String,
        /// The field, for example `operator[1].parallelism`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

pub use crate::units::parse_duration;

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn de_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim() == "off" {
        return Ok(None);
    }
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `[job]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Job name (also its name in the store).
    pub name: String,
    /// The worker binary: a path (relative to the spec file), or a name
    /// looked up next to the `lazarus` binary and then on `PATH`. Not
    /// needed when every operator is `kind = "process"` (those run an
    /// unmodified program under `lazarus` itself).
    #[serde(default)]
    pub worker: String,
    /// Key groups for keyed state; at least the largest parallelism. Default 128.
    #[serde(default = "default_key_groups")]
    pub key_groups: u32,
    /// Worker heartbeat interval. Default 500ms.
    #[serde(default = "default_heartbeat", deserialize_with = "de_duration")]
    pub heartbeat_interval: Duration,
    /// A worker silent this long is declared failed. Default 10s (a worker
    /// that exits is seen at once; this catches hangs).
    #[serde(
        default = "default_heartbeat_timeout",
        deserialize_with = "de_duration"
    )]
    pub heartbeat_timeout: Duration,
}

fn default_key_groups() -> u32 {
    128
}
fn default_heartbeat() -> Duration {
    Duration::from_millis(500)
}
fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[checkpoint]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Time between checkpoint triggers; `"off"` takes only the final one.
    /// Default 1s. Shorter means less replay after a failure, more overhead.
    #[serde(default = "default_interval", deserialize_with = "de_interval")]
    pub interval: Option<Duration>,
    /// A checkpoint not committed this long after its trigger is aborted. Default 60s.
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Checkpoints in flight at once. Default 1.
    #[serde(default = "one")]
    pub max_concurrent: u32,
    /// Committed checkpoints kept in the store. Default 3.
    #[serde(default = "three")]
    pub retention: usize,
    /// At most one retention pass (a listing of the job's manifests and
    /// chunks, deletes) per this interval; between passes up to one
    /// interval's worth of extra checkpoints stays in the store. Default 2s.
    /// The final checkpoint's pass always runs.
    #[serde(
        default = "default_retention_interval",
        deserialize_with = "de_duration"
    )]
    pub retention_interval: Duration,
    /// Codec of state chunks: `auto` (the default), `none` or `zstd`
    /// (level 1). See [`CodecChoice`].
    #[serde(default)]
    pub codec: CodecChoice,
    /// Workers find each checkpoint's barriers by reading their inputs
    /// ahead, and keep the records read ahead of them with the checkpoint
    /// (like Flink's unaligned checkpoints): checkpoints complete in about
    /// the time the barriers take to cross the job, not the time its full
    /// channels take to drain; a recovery then processes those records
    /// again first. `false` aligns barriers in order. Default true.
    #[serde(default = "yes")]
    pub read_ahead: bool,
}

fn default_interval() -> Option<Duration> {
    Some(Duration::from_secs(1))
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}
fn one() -> u32 {
    1
}
fn three() -> usize {
    3
}
fn default_retention_interval() -> Duration {
    Duration::from_secs(2)
}
/// The `[checkpoint]` codec of state chunks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecChoice {
    /// `none` for a local-directory store, `zstd` for any other. On a local
    /// disk compression costs the processing hosts' CPU and saves bytes
    /// that cost little: zstd level 1 runs at about 300 MB/s per core here,
    /// a local disk writes 2 GB/s, and an uncompressed chunk is restored by
    /// mapping it where it lies. A remote store's bytes cost transfer time
    /// and money, and zstd stores state such as wordcount's in a third.
    #[default]
    Auto,
    /// Stored as is.
    None,
    /// zstd, level 1.
    Zstd,
}

impl CodecChoice {
    /// The codec for a store that is (`true`) or is not a local directory.
    pub fn resolve(self, local_directory: bool) -> Codec {
        match self {
            CodecChoice::Auto if local_directory => Codec::None,
            CodecChoice::Auto | CodecChoice::Zstd => Codec::Zstd,
            CodecChoice::None => Codec::None,
        }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            interval: default_interval(),
            timeout: default_timeout(),
            max_concurrent: 1,
            retention: 3,
            retention_interval: default_retention_interval(),
            codec: CodecChoice::Auto,
            read_ahead: true,
        }
    }
}

/// `[restart]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSection {
    /// Restarts allowed before the job fails. Default 20.
    #[serde(default = "twenty")]
    pub max_attempts: u32,
    /// Wait before the first restart, doubled per consecutive failure. Default 100ms.
    #[serde(default = "default_backoff", deserialize_with = "de_duration")]
    pub backoff: Duration,
    /// Longest wait between restarts. Default 5s.
    #[serde(default = "default_max_backoff", deserialize_with = "de_duration")]
    pub max_backoff: Duration,
    /// A recovery keeps the processes that did not fail and rolls them
    /// back in place (restored from the checkpoint without a restart);
    /// `false` replaces every process of the failed workers' regions.
    /// Default true.
    #[serde(default = "yes")]
    pub keep_processes: bool,
    /// A hot standby promoted by a recovery is replaced this long after
    /// every worker runs again, not at once: the new standby's start (its
    /// process, then reading and decoding the whole state) would take the
    /// cores the failover needs. Default 100ms.
    #[serde(default = "default_standby_delay", deserialize_with = "de_duration")]
    pub standby_delay: Duration,
}

fn yes() -> bool {
    true
}

fn twenty() -> u32 {
    20
}
fn default_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}
fn default_standby_delay() -> Duration {
    Duration::from_millis(100)
}

impl Default for RestartSection {
    fn default() -> Self {
        RestartSection {
            max_attempts: 20,
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            keep_processes: true,
            standby_delay: default_standby_delay(),
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Store URL; default a local directory (see `lazarus run --help`).
    pub url: Option<String>,
}

/// `[[operator]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSpec {
    /// Name, unique in the job; workers are named `<name>-<index>`.
    pub name: String,
    /// Which registered kind of the worker binary builds it.
    pub kind: String,
    /// Instances. Default 1.
    #[serde(default = "one")]
    pub parallelism: u32,
    /// How a failed worker of this operator is replaced (several hosts):
    /// `hot`, `cold` or `none` (default).
    #[serde(default)]
    pub standby: StandbyKind,
    /// IPv4 service VIP with prefix (`198.18.0.100/24`), held by the
    /// agent of this operator's primary. Needs parallelism 1.
    #[serde(default)]
    pub vip: Option<String>,
    /// IPv6 service VIP with prefix (`2001:2::100/64`), as `vip`.
    #[serde(default)]
    pub vip6: Option<String>,
    /// Active-active: one IPv4 VIP per instance, in instance order (at
    /// most `parallelism`); instance `i` serves `vips[i]`. Instead of `vip`.
    #[serde(default)]
    pub vips: Vec<String>,
    /// Active-active: one IPv6 VIP per instance, as `vips`.
    #[serde(default)]
    pub vips6: Vec<String>,
    /// The service port on the VIP; the worker sees it as parameter
    /// `lazarus.port` (and the VIPs as `lazarus.vip`, `lazarus.vip6`).
    #[serde(default)]
    pub port: Option<u16>,
    /// The hosts (agent names) its processes may run on; empty: any.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Automatic fail-back (keepalived's preempt, with a delay): an
    /// instance moved off the host it first ran on goes back once that host
    /// has been up this long. Unset: it stays where it is (`nopreempt`).
    /// Needs `standby = "none"`.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub failback: Option<Duration>,
    /// Active-active with `standby = "none"`: who takes a failed
    /// instance's share over. `survivor` (default): a surviving instance
    /// on the chosen host, inside its running process; `process`: a
    /// process of its own.
    #[serde(default)]
    pub takeover: Option<Takeover>,
    /// `kind = "process"`: the unmodified program it runs.
    #[serde(default)]
    pub process: Option<ProcessSpec>,
    /// A health check its agent runs against each of its processes.
    #[serde(default)]
    pub health: Option<HealthSpec>,
}

/// Who takes a failed active-active instance's share over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Takeover {
    /// A surviving instance on the chosen host, in its running process
    /// (Flink's slots, Kafka Streams' tasks): nothing starts, only the
    /// lost share is restored.
    #[default]
    Survivor,
    /// A process of its own (isolation over speed).
    Process,
}

/// How a failed worker is replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StandbyKind {
    /// A process on another host follows each commit into its local cache
    /// and is promoted without a download.
    Hot,
    /// A host is chosen ahead of time; on failure a process starts there
    /// and restores from storage.
    Cold,
    /// On failure the worker restarts on another healthy host if there is
    /// one (else on the same host).
    #[default]
    None,
}

/// `[[edge]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSpec {
    /// Upstream operator.
    pub from: String,
    /// Downstream operator.
    pub to: String,
    /// How records are spread.
    pub partition: Partition,
}

/// A parsed job spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `[job]`
    pub job: JobSection,
    /// `[checkpoint]`
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// `[restart]`
    #[serde(default)]
    pub restart: RestartSection,
    /// `[store]`
    #[serde(default)]
    pub store: StoreSection,
    /// `[[operator]]`
    #[serde(rename = "operator", default)]
    pub operators: Vec<OperatorSpec>,
    /// `[[edge]]`
    #[serde(rename = "edge", default)]
    pub edges: Vec<EdgeSpec>,
    /// `[params]`, passed to every operator.
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    /// `[notify]`: hooks run on the hosts of the job's processes when one
    /// changes role.
    #[serde(default)]
    pub notify: Option<NotifySpec>,
    /// Where the spec came from (for messages and relative paths).
    #[serde(skip)]
    pub origin: String,
    /// Directory of the spec file.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// The parameter that hands a `process` worker its program.
pub const PROCESS_PARAM: &str = "lazarus.process";

/// One worker of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedWorker {
    /// Its id.
    pub id: WorkerId,
    /// Operator name.
    pub operator: String,
    /// Operator kind.
    pub kind: String,
    /// Instance index.
    pub index: u32,
    /// Operator parallelism.
    pub parallelism: u32,
    /// Upstream workers (one input channel each).
    pub inputs: Vec<WorkerId>,
    /// Output edges.
    pub outputs: Vec<OutputEdge>,
    /// True for sources (operators with no inputs).
    pub is_source: bool,
    /// How it is replaced after a failure.
    pub standby: StandbyKind,
    /// The VIPs its primary's agent holds (`addr/prefix`).
    pub vips: Vec<String>,
    /// Active-active: every instance's VIP, in instance order (the worker
    /// sees their addresses as `lazarus.peers`, to forward to a key's owner).
    pub peer_vips: Vec<String>,
    /// Its service port, if any.
    pub port: Option<u16>,
    /// The hosts it may run on (empty: any).
    pub hosts: Vec<String>,
    /// Fail back to the host it first ran on after this hold-down.
    pub failback: Option<Duration>,
    /// Active-active: a failed instance may be taken over inside a
    /// surviving instance's process.
    pub takeover: bool,
    /// The program it runs (`kind = "process"`).
    pub process: Option<ProcessSpec>,
    /// Its health check, port resolved.
    pub health: Option<HealthSpec>,
}

impl PlannedWorker {
    /// Parameters only this worker gets: its port and VIPs.
    pub fn own_params(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        if let Some(port) = self.port {
            p.insert("lazarus.port".to_string(), port.to_string());
        }
        for v in &self.vips {
            let addr = v.split('/').next().unwrap_or(v).to_string();
            let key = if addr.contains(':') {
                "lazarus.vip6"
            } else {
                "lazarus.vip"
            };
            p.insert(key.to_string(), addr);
        }
        if !self.peer_vips.is_empty() {
            let addrs: Vec<&str> = self
                .peer_vips
                .iter()
                .map(|v| v.split('/').next().unwrap_or(v))
                .collect();
            p.insert("lazarus.peers".to_string(), addrs.join(","));
        }
        if let Some(process) = &self.process {
            p.insert(
                PROCESS_PARAM.to_string(),
                serde_json::to_string(process).expect("a process spec serializes"),
            );
        }
        p
    }
}

impl JobSpec {
    /// Reads and validates the spec at `path`.
    pub fn from_file(path: &Path) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|error| SpecError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, &path.display().to_string(), dir)
    }

    /// Parses and validates spec text.
    pub fn parse(text: &str, origin: &str, dir: PathBuf) -> Result<JobSpec, SpecError> {
        let mut spec: JobSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        spec.origin = origin.to_string();
        spec.dir = dir;
        spec.validate()?;
        Ok(spec)
    }

    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError::Invalid {
            origin: self.origin.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Checks everything parsing cannot: names, ranges, the graph.
    pub fn validate(&self) -> Result<(), SpecError> {
        JobId::new(self.job.name.clone()).map_err(|e| self.invalid("job.name", e.to_string()))?;
        let sdk_ops = self.operators.iter().any(|o| o.kind != PROCESS_KIND);
        if self.job.worker.trim().is_empty() && sdk_ops {
            return Err(self.invalid(
                "job.worker",
                "must name the worker binary (only a job whose operators are all kind = \"process\" needs none)",
            ));
        }
        if let Some(n) = &self.notify {
            n.validate()
                .map_err(|(f, m)| self.invalid(format!("notify.{f}"), m))?;
        }
        if self.operators.is_empty() {
            return Err(self.invalid("operator", "the job has no [[operator]]"));
        }
        let mut names = BTreeSet::new();
        let mut max_par = 1;
        for (i, op) in self.operators.iter().enumerate() {
            let field = |f: &str| format!("operator[{i}].{f}");
            WorkerId::new(format!("{}-0", op.name))
                .map_err(|e| self.invalid(field("name"), e.to_string()))?;
            if !names.insert(op.name.as_str()) {
                return Err(self.invalid(field("name"), format!("{:?} is used twice", op.name)));
            }
            if op.kind.trim().is_empty() {
                return Err(self.invalid(field("kind"), "must not be empty"));
            }
            if !(1..=256).contains(&op.parallelism) {
                return Err(self.invalid(
                    field("parallelism"),
                    format!("must be between 1 and 256, got {}", op.parallelism),
                ));
            }
            max_par = max_par.max(op.parallelism);
            for (f, v, v6) in [("vip", &op.vip, false), ("vip6", &op.vip6, true)] {
                let Some(v) = v else { continue };
                let (addr, _) =
                    crate::vip::parse_vip(v).map_err(|e| self.invalid(field(f), e.to_string()))?;
                if addr.is_ipv6() != v6 {
                    return Err(self.invalid(
                        field(f),
                        format!("{v:?} is not an IPv{} address", if v6 { 6 } else { 4 }),
                    ));
                }
                if op.parallelism != 1 {
                    return Err(self.invalid(
                        field(f),
                        format!("a VIP is served by one primary: parallelism must be 1 (for one VIP per instance, active-active, use {f}s = [...])"),
                    ));
                }
            }
            for (f, list, v6, single, one) in [
                ("vips", &op.vips, false, &op.vip, "vip"),
                ("vips6", &op.vips6, true, &op.vip6, "vip6"),
            ] {
                if list.is_empty() {
                    continue;
                }
                if single.is_some() {
                    return Err(self.invalid(
                        field(f),
                        format!(
                            "set either {one} (one primary) or {f} (one per instance), not both"
                        ),
                    ));
                }
                if list.len() > op.parallelism as usize {
                    return Err(self.invalid(
                        field(f),
                        format!(
                            "{} VIPs for {} instances: at most one VIP per instance",
                            list.len(),
                            op.parallelism
                        ),
                    ));
                }
                for v in list {
                    let (addr, _) = crate::vip::parse_vip(v)
                        .map_err(|e| self.invalid(field(f), e.to_string()))?;
                    if addr.is_ipv6() != v6 {
                        return Err(self.invalid(
                            field(f),
                            format!("{v:?} is not an IPv{} address", if v6 { 6 } else { 4 }),
                        ));
                    }
                }
            }
            if op.takeover.is_some()
                && (op.standby != StandbyKind::None || (op.vips.is_empty() && op.vips6.is_empty()))
            {
                return Err(self.invalid(
                    field("takeover"),
                    "takeover chooses who takes over a failed active-active instance (one VIP per instance, `vips`) without a standby; set vips and standby = \"none\", or drop takeover",
                ));
            }
            if op.failback.is_some() && op.standby != StandbyKind::None {
                return Err(self.invalid(
                    field("failback"),
                    "fail-back moves an instance without a standby back to the host it first ran on; with a standby, set standby = \"none\" or drop failback",
                ));
            }
            if op.port == Some(0) {
                return Err(self.invalid(field("port"), "must be 1..=65535"));
            }
            match (&op.process, op.kind == PROCESS_KIND) {
                (None, true) => {
                    return Err(self.invalid(
                        field("process"),
                        "a kind = \"process\" operator needs an [operator.process] table with its command",
                    ))
                }
                (Some(_), false) => {
                    return Err(self.invalid(
                        field("process"),
                        format!("only a kind = \"process\" operator runs a program (this one is {:?})", op.kind),
                    ))
                }
                (Some(p), true) => {
                    p.validate()
                        .map_err(|(f, m)| self.invalid(field(&format!("process.{f}")), m))?;
                    if p.state_dir.is_some() && op.standby == StandbyKind::Hot {
                        return Err(self.invalid(
                            field("process.state_dir"),
                            "a hot standby's program already runs and cannot take the primary's state: use standby = \"cold\" (restored before it starts) or \"none\"",
                        ));
                    }
                }
                (None, false) => {}
            }
            if let Some(h) = &op.health {
                h.clone()
                    .resolve(op.port)
                    .map_err(|(f, m)| self.invalid(field(&format!("health.{f}")), m))?;
            }
            let mut seen_hosts = BTreeSet::new();
            for h in &op.hosts {
                if h.trim().is_empty() || !seen_hosts.insert(h.as_str()) {
                    return Err(
                        self.invalid(field("hosts"), format!("{h:?} is empty or listed twice"))
                    );
                }
            }
            if op.standby != StandbyKind::None && op.hosts.len() == 1 {
                return Err(self.invalid(
                    field("hosts"),
                    "a standby needs another host than its primary: list at least two hosts, or set standby = \"none\"",
                ));
            }
        }
        // A VIP address belongs to one instance of one operator.
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (i, op) in self.operators.iter().enumerate() {
            let named = [
                ("vip", op.vip.iter().collect::<Vec<_>>()),
                ("vip6", op.vip6.iter().collect()),
                ("vips", op.vips.iter().collect()),
                ("vips6", op.vips6.iter().collect()),
            ];
            for (f, list) in named {
                for v in list {
                    let addr = v.split('/').next().unwrap_or(v).to_string();
                    let here = format!("operator[{i}].{f}");
                    if let Some(first) = seen.insert(addr.clone(), here.clone()) {
                        return Err(self.invalid(
                            here,
                            format!("VIP {addr} is also named by {first}: each VIP is served by one instance"),
                        ));
                    }
                }
            }
        }
        if self.job.key_groups < max_par || self.job.key_groups > 32_768 {
            return Err(self.invalid(
                "job.key_groups",
                format!(
                    "must be between the largest parallelism ({max_par}) and 32768, got {}",
                    self.job.key_groups
                ),
            ));
        }
        let par = |name: &str| {
            self.operators
                .iter()
                .find(|o| o.name == name)
                .map(|o| o.parallelism)
        };
        let mut seen = BTreeSet::new();
        for (i, e) in self.edges.iter().enumerate() {
            let from = par(&e.from).ok_or_else(|| {
                self.invalid(
                    format!("edge[{i}].from"),
                    format!("unknown operator {:?}", e.from),
                )
            })?;
            let to = par(&e.to).ok_or_else(|| {
                self.invalid(
                    format!("edge[{i}].to"),
                    format!("unknown operator {:?}", e.to),
                )
            })?;
            if e.from == e.to {
                return Err(self.invalid(format!("edge[{i}]"), "an operator cannot feed itself"));
            }
            if !seen.insert((e.from.as_str(), e.to.as_str())) {
                return Err(self.invalid(
                    format!("edge[{i}]"),
                    format!("{} -> {} is declared twice", e.from, e.to),
                ));
            }
            if e.partition == Partition::Forward && from != to {
                return Err(self.invalid(
                    format!("edge[{i}].partition"),
                    format!("forward needs equal parallelism, {} has {from} and {} has {to}; use rebalance or hash", e.from, e.to),
                ));
            }
        }
        // Acyclic: repeatedly remove operators without remaining inputs.
        let mut remaining: BTreeSet<&str> = names.clone();
        loop {
            let free: Vec<&str> = remaining
                .iter()
                .copied()
                .filter(|n| {
                    !self
                        .edges
                        .iter()
                        .any(|e| e.to == *n && remaining.contains(e.from.as_str()))
                })
                .collect();
            if free.is_empty() {
                break;
            }
            for n in free {
                remaining.remove(n);
            }
        }
        if !remaining.is_empty() {
            return Err(self.invalid(
                "edge",
                format!(
                    "the graph has a cycle through {}",
                    remaining.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let c = &self.checkpoint;
        if c.timeout.is_zero() {
            return Err(self.invalid("checkpoint.timeout", "must be more than 0"));
        }
        if c.interval.is_some_and(|i| i < Duration::from_millis(10)) {
            return Err(self.invalid("checkpoint.interval", "must be at least 10ms (or \"off\")"));
        }
        if c.max_concurrent == 0 {
            return Err(self.invalid("checkpoint.max_concurrent", "must be at least 1"));
        }
        if c.retention == 0 {
            return Err(self.invalid("checkpoint.retention", "must be at least 1"));
        }
        if self.job.heartbeat_interval.is_zero()
            || self.job.heartbeat_timeout <= self.job.heartbeat_interval
        {
            return Err(self.invalid(
                "job.heartbeat_timeout",
                "must be longer than job.heartbeat_interval, which must be more than 0",
            ));
        }
        for (k, v) in &self.params {
            if !matches!(
                v,
                toml::Value::String(_)
                    | toml::Value::Integer(_)
                    | toml::Value::Float(_)
                    | toml::Value::Boolean(_)
            ) {
                return Err(
                    self.invalid(format!("params.{k}"), "must be a string, number or boolean")
                );
            }
        }
        Ok(())
    }

    /// The job id.
    pub fn job_id(&self) -> JobId {
        JobId::new(self.job.name.clone()).expect("validated")
    }

    /// `[params]` as strings, after `overrides` (`--set KEY=VALUE`).
    pub fn params(&self) -> BTreeMap<String, String> {
        self.params
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect()
    }

    /// Applies `KEY=VALUE` overrides to `[params]`.
    pub fn set_params(&mut self, overrides: &[String]) -> Result<(), SpecError> {
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| self.invalid("--set", format!("{o:?} is not KEY=VALUE")))?;
            self.params
                .insert(k.trim().to_string(), toml::Value::String(v.to_string()));
        }
        Ok(())
    }

    /// Applies `--parallelism OP=P` overrides (rescaling: the job then
    /// restores each operator's key groups from however many instances
    /// wrote them). `validate` checks the result like any spec.
    pub fn set_parallelism(&mut self, overrides: &[String]) -> Result<(), SpecError> {
        for o in overrides {
            let (op, p) = o
                .split_once('=')
                .ok_or_else(|| self.invalid("--parallelism", format!("{o:?} is not OPERATOR=N")))?;
            let (op, p) = (op.trim(), p.trim());
            let n: u32 = p.parse().map_err(|e| {
                self.invalid(
                    "--parallelism",
                    format!("{o:?}: {p:?} is not a whole number ({e})"),
                )
            })?;
            let Some(i) = self.operators.iter().position(|x| x.name == op) else {
                let names: Vec<&str> = self.operators.iter().map(|x| x.name.as_str()).collect();
                return Err(self.invalid(
                    "--parallelism",
                    format!(
                        "{o:?}: no operator {op:?} (operators: {})",
                        names.join(", ")
                    ),
                ));
            };
            self.operators[i].parallelism = n;
        }
        Ok(())
    }

    /// Applies `--vips OPERATOR=ADDR/PREFIX,...` overrides: the operator's
    /// per-instance VIPs (IPv4 into `vips`, IPv6 into `vips6`); an empty
    /// list clears both. `validate` checks the result like any spec.
    pub fn set_vips(&mut self, overrides: &[String]) -> Result<(), SpecError> {
        for o in overrides {
            let (op, list) = o.split_once('=').ok_or_else(|| {
                self.invalid("--vips", format!("{o:?} is not OPERATOR=ADDR/PREFIX,..."))
            })?;
            let op = op.trim();
            let Some(i) = self.operators.iter().position(|x| x.name == op) else {
                let names: Vec<&str> = self.operators.iter().map(|x| x.name.as_str()).collect();
                return Err(self.invalid(
                    "--vips",
                    format!(
                        "{o:?}: no operator {op:?} (operators: {})",
                        names.join(", ")
                    ),
                ));
            };
            let addrs: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .collect();
            let (v6, v4): (Vec<String>, Vec<String>) =
                addrs.into_iter().partition(|v| v.contains(':'));
            self.operators[i].vips = v4;
            self.operators[i].vips6 = v6;
        }
        Ok(())
    }

    /// `operator` and every operator joined to it by `forward` edges (which
    /// need equal parallelism): what a rescale of `operator` rescales.
    pub fn forward_group(&self, operator: &str) -> Vec<String> {
        let mut group = vec![operator.to_string()];
        let mut i = 0;
        while i < group.len() {
            for e in self
                .edges
                .iter()
                .filter(|e| e.partition == Partition::Forward)
            {
                for (a, b) in [(&e.from, &e.to), (&e.to, &e.from)] {
                    if *a == group[i] && !group.contains(b) {
                        group.push(b.clone());
                    }
                }
            }
            i += 1;
        }
        group
    }

    /// Every worker of the job, with its channels.
    pub fn plan(&self) -> Vec<PlannedWorker> {
        let wid = |op: &str, i: u32| WorkerId::new(format!("{op}-{i}")).expect("validated names");
        let mut plan = Vec::new();
        for op in &self.operators {
            for index in 0..op.parallelism {
                let mut inputs = Vec::new();
                for e in self.edges.iter().filter(|e| e.to == op.name) {
                    let up = self
                        .operators
                        .iter()
                        .find(|o| o.name == e.from)
                        .expect("validated");
                    for j in 0..up.parallelism {
                        if e.partition != Partition::Forward || j == index {
                            inputs.push(wid(&up.name, j));
                        }
                    }
                }
                let outputs = self
                    .edges
                    .iter()
                    .filter(|e| e.from == op.name)
                    .map(|e| {
                        let down = self
                            .operators
                            .iter()
                            .find(|o| o.name == e.to)
                            .expect("validated");
                        let targets = match e.partition {
                            Partition::Forward => vec![wid(&down.name, index)],
                            _ => (0..down.parallelism).map(|j| wid(&down.name, j)).collect(),
                        };
                        OutputEdge {
                            partition: e.partition,
                            targets,
                        }
                    })
                    .collect();
                plan.push(PlannedWorker {
                    id: wid(&op.name, index),
                    operator: op.name.clone(),
                    kind: op.kind.clone(),
                    index,
                    parallelism: op.parallelism,
                    is_source: inputs.is_empty(),
                    inputs,
                    outputs,
                    standby: op.standby,
                    vips: op
                        .vip
                        .iter()
                        .chain(op.vip6.iter())
                        .chain(op.vips.get(index as usize))
                        .chain(op.vips6.get(index as usize))
                        .cloned()
                        .collect(),
                    peer_vips: if op.vips.is_empty() {
                        op.vips6.clone()
                    } else {
                        op.vips.clone()
                    },
                    port: op.port,
                    hosts: op.hosts.clone(),
                    failback: op.failback,
                    takeover: op.takeover.unwrap_or_default() == Takeover::Survivor,
                    process: op.process.clone(),
                    health: op.health.clone().map(|mut h| {
                        h.resolve(op.port).expect("validated");
                        h
                    }),
                });
            }
        }
        plan
    }

    /// Finds the worker binary: a path (relative to the spec's directory),
    /// else a file of that name next to `lazarus` itself, else on `PATH`.
    pub fn resolve_worker(&self) -> Result<PathBuf, SpecError> {
        let name = &self.job.worker;
        if name.trim().is_empty() {
            // Only `process` operators: they run under `lazarus` itself.
            return std::env::current_exe().map_err(|e| {
                self.invalid("job.worker", format!("cannot find the lazarus binary: {e}"))
            });
        }
        let mut tried = Vec::new();
        if name.contains('/') {
            let p = self.dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p);
        } else {
            if let Some(dir) = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
            {
                let p = dir.join(name);
                if p.is_file() {
                    return Ok(p);
                }
                tried.push(p);
            }
            for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
                let p = dir.join(name);
                if p.is_file() {
                    return Ok(p);
                }
            }
            tried.push(PathBuf::from(format!("$PATH/{name}")));
        }
        Err(self.invalid(
            "job.worker",
            format!(
                "worker binary {name:?} not found (tried {}); build it first, for example `cargo build --release -p wordcount`",
                tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [job]
        name = "wc"
        worker = "wordcount"
        [checkpoint]
        interval = "250ms"
        [[operator]]
        name = "source"
        kind = "file-source"
        [[operator]]
        name = "tok"
        kind = "tokenizer"
        parallelism = 2
        [[operator]]
        name = "count"
        kind = "counter"
        parallelism = 2
        [[edge]]
        from = "source"
        to = "tok"
        partition = "rebalance"
        [[edge]]
        from = "tok"
        to = "count"
        partition = "hash"
        [params]
        input = "in.txt"
        n = 3
    "#;

    fn parse(text: &str) -> Result<JobSpec, SpecError> {
        JobSpec::parse(text, "test.toml", PathBuf::from("."))
    }

    /// `auto` (the default) stores a local directory's chunks as they are
    /// and compresses any other store's; an explicit codec is kept; an
    /// unknown one is refused naming the field.
    #[test]
    fn test_codec_auto_resolves_by_store_and_explicit_ones_are_kept() {
        let spec = parse(GOOD).expect("valid");
        assert_eq!(spec.checkpoint.codec, CodecChoice::Auto);
        assert_eq!(spec.checkpoint.codec.resolve(true), Codec::None);
        assert_eq!(spec.checkpoint.codec.resolve(false), Codec::Zstd);
        for (text, codec) in [("zstd", Codec::Zstd), ("none", Codec::None)] {
            let chosen = GOOD.replace("[checkpoint]", &format!("[checkpoint]\ncodec = \"{text}\""));
            let choice = parse(&chosen).expect("valid").checkpoint.codec;
            assert_eq!(choice.resolve(true), codec, "{text} on a local directory");
            assert_eq!(choice.resolve(false), codec, "{text} on a remote store");
        }
        let bad = parse(&GOOD.replace("[checkpoint]", "[checkpoint]\ncodec = \"lz4\""))
            .expect_err("no such codec");
        assert!(bad.to_string().contains("codec"), "{bad}");
    }

    #[test]
    fn test_good_spec_plans_workers_and_channels() {
        let spec = parse(GOOD).expect("valid");
        assert_eq!(spec.checkpoint.interval, Some(Duration::from_millis(250)));
        assert_eq!(spec.params()["n"], "3");
        let plan = spec.plan();
        assert_eq!(plan.len(), 5);
        let count1 = plan
            .iter()
            .find(|w| w.id.as_str() == "count-1")
            .expect("count-1");
        assert_eq!(count1.inputs.len(), 2);
        assert!(plan[0].is_source && plan[0].outputs[0].targets.len() == 2);
        assert!(
            spec.checkpoint.read_ahead,
            "barriers are read ahead by default"
        );
        let aligned = parse(&GOOD.replace("[checkpoint]", "[checkpoint]\nread_ahead = false"))
            .expect("valid");
        assert!(!aligned.checkpoint.read_ahead);
        let bad = parse(&GOOD.replace("[checkpoint]", "[checkpoint]\nread_ahead = \"yes\""))
            .expect_err("not a bool");
        assert!(bad.to_string().contains("read_ahead"), "{bad}");
    }

    #[test]
    fn test_bad_specs_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "parallelism = 2",
                "operator[2].parallelism: must be between 1 and 256, got 0",
            ),
            ("partition = \"hash\"", "unknown operator \"nope\""),
            ("kind = \"tokenizer\"", "unknown field `paralelism`"),
            ("interval = \"250ms\"", "unknown unit"),
            ("[params]", "forward needs equal parallelism"),
            ("name = \"wc\"", "invalid job name"),
        ];
        let broken = [
            GOOD.replacen(
                "parallelism = 2\n        [[edge]]",
                "parallelism = 0\n        [[edge]]",
                1,
            ),
            GOOD.replacen("to = \"count\"", "to = \"nope\"", 1),
            GOOD.replacen(
                "kind = \"tokenizer\"",
                "kind = \"tokenizer\"\n        paralelism = 3",
                1,
            ),
            GOOD.replacen("\"250ms\"", "\"250 fortnights\"", 1),
            GOOD.replacen("partition = \"rebalance\"", "partition = \"forward\"", 1),
            GOOD.replacen("name = \"wc\"", "name = \"w/c\"", 1),
        ];
        for ((_, expected), text) in cases.iter().zip(broken.iter()) {
            let err = parse(text).expect_err(expected).to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
            assert!(err.starts_with("job spec test.toml"), "{err}");
        }
        let cyclic =
            format!("{GOOD}\n[[edge]]\nfrom = \"count\"\nto = \"tok\"\npartition = \"hash\"\n");
        // [params] comes last in GOOD, so an appended [[edge]] is fine TOML.
        let err = parse(&cyclic).expect_err("cycle").to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn test_standby_and_vips_are_checked() {
        let with = |extra: &str| {
            let text = GOOD.replacen(
                "kind = \"tokenizer\"",
                &format!("kind = \"tokenizer\"\n        {extra}"),
                1,
            );
            parse(&text).map_err(|e| e.to_string())
        };
        let ok = GOOD.replacen("parallelism = 2", "parallelism = 1", 1);
        let one = |extra: &str| {
            let text = ok.replacen(
                "kind = \"tokenizer\"",
                &format!("kind = \"tokenizer\"\n        {extra}"),
                1,
            );
            parse(&text).map_err(|e| e.to_string())
        };
        let e = with("standby = \"warm\"").expect_err("unknown standby");
        assert!(e.contains("unknown variant `warm`"), "{e}");
        let e = one("vip6 = \"198.18.0.100/24\"").expect_err("v4 as vip6");
        assert!(
            e.contains(".vip6") && e.contains("not an IPv6 address"),
            "{e}"
        );
        let e = one("vip = \"198.18.0.300/24\"").expect_err("bad address");
        assert!(e.contains(".vip: invalid VIP"), "{e}");
        let e = one("port = 0").expect_err("port 0");
        assert!(e.contains(".port: must be 1..=65535"), "{e}");
        let spec = one("standby = \"hot\"\n        vip = \"198.18.0.100/24\"\n        vip6 = \"2001:2::100/64\"\n        port = 8080")
            .expect("valid");
        let w = spec
            .plan()
            .into_iter()
            .find(|w| w.vips.len() == 2)
            .expect("the VIP operator");
        assert_eq!(w.standby, StandbyKind::Hot);
        let p = w.own_params();
        assert_eq!(p.get("lazarus.port").map(String::as_str), Some("8080"));
        assert_eq!(
            p.get("lazarus.vip").map(String::as_str),
            Some("198.18.0.100")
        );
        assert_eq!(
            p.get("lazarus.vip6").map(String::as_str),
            Some("2001:2::100")
        );
    }

    #[test]
    fn test_active_active_vips_one_per_instance() {
        let with = |extra: &str| {
            let text = GOOD.replacen(
                "kind = \"tokenizer\"",
                &format!("kind = \"tokenizer\"\n        {extra}"),
                1,
            );
            parse(&text).map_err(|e| e.to_string())
        };
        let spec = with("vips = [\"198.18.0.100/24\", \"198.18.0.101/24\"]\n        vips6 = [\"2001:2::100/64\"]\n        port = 8080")
            .expect("valid");
        let plan = spec.plan();
        let tok = |i: u32| {
            plan.iter()
                .find(|w| w.operator == "tok" && w.index == i)
                .expect("instance")
        };
        assert_eq!(tok(0).vips, vec!["198.18.0.100/24", "2001:2::100/64"]);
        assert_eq!(tok(1).vips, vec!["198.18.0.101/24"]);
        let p = tok(1).own_params();
        assert_eq!(
            p.get("lazarus.vip").map(String::as_str),
            Some("198.18.0.101")
        );
        assert_eq!(
            p.get("lazarus.peers").map(String::as_str),
            Some("198.18.0.100,198.18.0.101")
        );
        // Bad input, each named by its field.
        for (extra, says) in [
            (
                "vips = [\"198.18.0.100/24\", \"198.18.0.101/24\", \"198.18.0.102/24\"]",
                "operator[1].vips: 3 VIPs for 2 instances: at most one VIP per instance",
            ),
            (
                "vips = [\"2001:2::100/64\"]",
                "operator[1].vips: \"2001:2::100/64\" is not an IPv4 address",
            ),
            (
                "vips = [\"198.18.0.100/24\", \"198.18.0.100/24\"]",
                "operator[1].vips: VIP 198.18.0.100 is also named by operator[1].vips",
            ),
            ("vip = \"198.18.0.100/24\"", "use vips = [...]"),
            (
                "vips = [\"198.18.0.100/24\"]\n        takeover = \"anyone\"",
                "unknown variant `anyone`, expected `survivor` or `process`",
            ),
        ] {
            let e = with(extra).expect_err(extra);
            assert!(e.contains(says), "{extra}: {e}");
        }
        // Who takes a failed instance over: a survivor's process by default.
        assert!(tok(0).takeover);
        let own =
            with("vips = [\"198.18.0.100/24\"]\n        takeover = \"process\"").expect("valid");
        assert!(own
            .plan()
            .iter()
            .all(|w| !w.takeover || w.operator != "tok"));
        let e = with("takeover = \"survivor\"").expect_err("not active-active");
        assert!(
            e.contains("operator[1].takeover: takeover chooses who takes over a failed active-active instance"),
            "{e}"
        );
        // A VIP shared by two operators.
        let text = GOOD
            .replacen(
                "kind = \"tokenizer\"",
                "kind = \"tokenizer\"\n        vips = [\"198.18.0.100/24\"]",
                1,
            )
            .replacen(
                "kind = \"counter\"",
                "kind = \"counter\"\n        vips = [\"198.18.0.100/24\"]",
                1,
            );
        let e = parse(&text).map_err(|e| e.to_string()).expect_err("shared");
        assert!(
            e.contains("VIP 198.18.0.100 is also named by operator[1].vips"),
            "{e}"
        );
    }

    #[test]
    fn test_parallelism_overrides_and_forward_groups() {
        let mut spec = parse(GOOD).expect("good");
        assert_eq!(spec.forward_group("count"), vec!["count".to_string()]);
        spec.set_parallelism(&["tok=3".into()]).expect("override");
        spec.validate().expect("valid");
        assert_eq!(
            spec.plan().iter().filter(|w| w.operator == "tok").count(),
            3
        );
        for (o, says) in [
            ("tok", "is not OPERATOR=N"),
            ("tok=x", "\"x\" is not a whole number"),
            ("nope=2", "no operator \"nope\""),
        ] {
            let e = spec.set_parallelism(&[o.into()]).expect_err(o).to_string();
            assert!(e.contains("--parallelism") && e.contains(says), "{o}: {e}");
        }
        // --vips: per-instance VIPs by family; refused by name when wrong.
        spec.set_vips(&["tok=198.18.0.100/24,2001:2::100/64".into()])
            .expect("vips");
        spec.validate().expect("valid");
        assert_eq!(spec.operators[1].vips, vec!["198.18.0.100/24"]);
        assert_eq!(spec.operators[1].vips6, vec!["2001:2::100/64"]);
        let e = spec
            .set_vips(&["nope=198.18.0.1/24".into()])
            .expect_err("op");
        assert!(
            e.to_string().contains("--vips") && e.to_string().contains("no operator"),
            "{e}"
        );
        spec.set_vips(&[
            "tok=198.18.0.100/24,198.18.0.101/24,198.18.0.102/24,198.18.0.103/24".into(),
        ])
        .expect("parsed");
        let e = spec
            .validate()
            .expect_err("4 VIPs for 3 instances")
            .to_string();
        assert!(e.contains("4 VIPs for 3 instances"), "{e}");
        spec.set_vips(&["tok=".into()]).expect("cleared");
        spec.set_parallelism(&["tok=0".into()]).expect("parsed");
        let e = spec.validate().expect_err("0").to_string();
        assert!(e.contains("must be between 1 and 256, got 0"), "{e}");
    }

    #[test]
    fn test_set_overrides_params() {
        let mut spec = parse(GOOD).expect("valid");
        spec.set_params(&["input=/tmp/x".into(), "new=1".into()])
            .expect("set");
        assert_eq!(spec.params()["input"], "/tmp/x");
        assert!(spec.set_params(&["novalue".into()]).is_err());
    }
}
