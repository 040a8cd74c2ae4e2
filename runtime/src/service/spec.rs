//! What a job spec says about unmodified programs: the `[operator.process]`
//! table of a `kind = "process"` operator, `[operator.health]` (any
//! operator) and the job's `[notify]` hooks. These travel to agents inside
//! spawn messages, so they serialize as well as parse; durations are text
//! (`"500ms"`) both ways.
//!
//! ```toml
//! [[operator]]
//! name = "lb"
//! kind = "process"
//! standby = "hot"
//! vip = "198.18.0.100/24"
//! port = 80
//!
//! [operator.process]
//! command = "/usr/sbin/haproxy"
//! args = ["-db", "-f", "/etc/haproxy/haproxy.cfg"]
//!
//! [operator.health]
//! kind = "http"        # http | tcp | exec
//! path = "/healthz"
//! interval = "200ms"
//! fall = 3
//! rise = 2
//!
//! [notify]
//! primary = ["/usr/local/bin/notify", "primary"]
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::duration_text;

/// The operator kind that runs an unmodified program.
pub const PROCESS_KIND: &str = "process";

/// `[operator.process]`: the program a `process` operator runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// Absolute path of the program on the agent hosts (it must be inside
    /// an agent's `allowed_binaries`, if the agent has that list).
    pub command: PathBuf,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment (on top of the agent's, without Lazarus' own
    /// credentials).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute). Default: the agent's directory for
    /// the job.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Signal that asks the program to stop: SIGTERM (default), SIGINT,
    /// SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// SIGKILL after this long. Default 5s.
    #[serde(default = "five_s", with = "duration_text")]
    pub stop_timeout: Duration,
    /// A directory (absolute) the program keeps its state in: it is
    /// checkpointed with the job and restored before the program starts.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Run (argv) before the state directory is copied, so the program
    /// leaves it consistent. Exit 0 is required.
    #[serde(default)]
    pub quiesce: Vec<String>,
    /// Run (argv) after the copy, whatever happened.
    #[serde(default)]
    pub resume: Vec<String>,
    /// Longest a quiesce or resume command may take. Default 10s.
    #[serde(default = "ten_s", with = "duration_text")]
    pub hook_timeout: Duration,
}

fn default_stop_signal() -> String {
    "SIGTERM".into()
}
fn five_s() -> Duration {
    Duration::from_secs(5)
}
fn ten_s() -> Duration {
    Duration::from_secs(10)
}

/// The signals a program may be asked to stop with.
pub fn parse_signal(name: &str) -> Option<i32> {
    Some(match name.trim_start_matches("SIG") {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "KILL" => libc::SIGKILL,
        _ => return None,
    })
}

/// How a health check probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    /// An HTTP request; healthy when the status matches.
    Http,
    /// A TCP connect; healthy when it is accepted.
    Tcp,
    /// A command; healthy when it exits 0.
    Exec,
}

/// `[operator.health]`: keepalived's `track_script` / `HTTP_GET` /
/// `TCP_CHECK` in one table. Run by the agent of each process (primary and
/// standby), so checks go on while no supervisor is reachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// `http`, `tcp` or `exec`.
    pub kind: HealthKind,
    /// Address probed (http, tcp). Default 127.0.0.1.
    #[serde(default = "localhost")]
    pub host: IpAddr,
    /// Port probed (http, tcp). Default: the operator's `port`.
    #[serde(default)]
    pub port: Option<u16>,
    /// HTTP method. Default GET.
    #[serde(default = "default_method")]
    pub method: String,
    /// HTTP path. Default `/`.
    #[serde(default = "default_path")]
    pub path: String,
    /// Expected HTTP status. Default 200.
    #[serde(default = "default_status")]
    pub status: u16,
    /// The command (exec): argv, healthy on exit 0.
    #[serde(default)]
    pub command: Vec<String>,
    /// Time between probes. Default 1s.
    #[serde(default = "one_s", with = "duration_text")]
    pub interval: Duration,
    /// A probe not answered in this long failed. Default 1s.
    #[serde(default = "one_s", with = "duration_text")]
    pub timeout: Duration,
    /// Failures in a row before the process counts as down. Default 3.
    #[serde(default = "three")]
    pub fall: u32,
    /// Successes in a row before a down process counts as up again. Default 2.
    #[serde(default = "two")]
    pub rise: u32,
    /// After a start, failures are not counted for this long (the program
    /// is starting). Default 0s.
    #[serde(default, with = "duration_text")]
    pub start_period: Duration,
}

fn localhost() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_status() -> u16 {
    200
}
fn one_s() -> Duration {
    Duration::from_secs(1)
}
fn three() -> u32 {
    3
}
fn two() -> u32 {
    2
}

/// `[notify]` of a job (and of an agent's config): keepalived's
/// `notify_master`, `notify_backup`, `notify_fault` and `notify_stop`. Each
/// is an argv run on the agent's host when a process of the job there
/// changes role, with `LAZARUS_NOTIFY_STATE`, `LAZARUS_NOTIFY_JOB`,
/// `LAZARUS_NOTIFY_WORKER`, `LAZARUS_NOTIFY_HOST`, `LAZARUS_NOTIFY_VIP` and
/// `LAZARUS_NOTIFY_REASON` in its environment. Hooks of one host run one
/// at a time in the order of the events, each for at most `timeout`; a
/// failure is logged and never holds up a failover.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// The process became the primary (started as one, or promoted).
    #[serde(default)]
    pub primary: Vec<String>,
    /// A hot standby started.
    #[serde(default)]
    pub standby: Vec<String>,
    /// The process failed (exited, or failed its health check).
    #[serde(default)]
    pub fault: Vec<String>,
    /// The process was stopped on request (job stopped, moved, fenced).
    #[serde(default)]
    pub stopped: Vec<String>,
    /// Longest a hook may run before it is killed. Default 5s.
    #[serde(default = "five_s", with = "duration_text")]
    pub timeout: Duration,
}

impl NotifySpec {
    /// No hook set.
    pub fn is_empty(&self) -> bool {
        self.primary.is_empty()
            && self.standby.is_empty()
            && self.fault.is_empty()
            && self.stopped.is_empty()
    }

    /// Checks the hooks; the error names the field (`primary`, …).
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (f, argv) in [
            ("primary", &self.primary),
            ("standby", &self.standby),
            ("fault", &self.fault),
            ("stopped", &self.stopped),
        ] {
            if let Some(cmd) = argv.first() {
                if !cmd.starts_with('/') {
                    return Err((
                        f.into(),
                        format!("{cmd:?} must be an absolute path on the agent hosts"),
                    ));
                }
            }
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(300) {
            return Err((
                "timeout".into(),
                "must be more than 0 and at most 300s".into(),
            ));
        }
        Ok(())
    }
}

impl ProcessSpec {
    /// Checks the table; the error names the field (`command`, …).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let abs = |f: &str, p: &std::path::Path| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err((
                    f.to_string(),
                    format!(
                        "{} must be an absolute path on the agent hosts",
                        p.display()
                    ),
                ))
            }
        };
        abs("command", &self.command)?;
        if let Some(d) = &self.cwd {
            abs("cwd", d)?;
        }
        if let Some(d) = &self.state_dir {
            abs("state_dir", d)?;
            if d.parent().is_none() {
                return Err(("state_dir".into(), "must not be /".into()));
            }
        }
        if parse_signal(&self.stop_signal).is_none() {
            return Err((
                "stop_signal".into(),
                format!(
                    "{:?} is not one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGKILL",
                    self.stop_signal
                ),
            ));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(("env".into(), format!("{k:?} is not a variable name")));
            }
            if k.starts_with("LAZARUS_") {
                return Err((
                    "env".into(),
                    format!("{k:?}: LAZARUS_* variables are set by Lazarus"),
                ));
            }
        }
        for (f, argv) in [("quiesce", &self.quiesce), ("resume", &self.resume)] {
            if let Some(cmd) = argv.first() {
                abs(f, std::path::Path::new(cmd))?;
            }
            if !argv.is_empty() && self.state_dir.is_none() {
                return Err((f.into(), "only means something with a state_dir".into()));
            }
        }
        if self.hook_timeout.is_zero() {
            return Err(("hook_timeout".into(), "must be more than 0".into()));
        }
        Ok(())
    }
}

impl HealthSpec {
    /// Checks the table and fills in the port from the operator's `port`;
    /// the error names the field.
    pub fn resolve(&mut self, operator_port: Option<u16>) -> Result<(), (String, String)> {
        match self.kind {
            HealthKind::Http | HealthKind::Tcp => {
                if self.port.is_none() {
                    self.port = operator_port;
                }
                if self.port.is_none_or(|p| p == 0) {
                    return Err((
                        "port".into(),
                        "an http or tcp check needs a port (here or the operator's `port`)".into(),
                    ));
                }
                if !self.command.is_empty() {
                    return Err(("command".into(), "only an exec check runs a command".into()));
                }
            }
            HealthKind::Exec => match self.command.first() {
                None => return Err(("command".into(), "an exec check needs a command".into())),
                Some(c) if !c.starts_with('/') => {
                    return Err((
                        "command".into(),
                        format!("{c:?} must be an absolute path on the agent hosts"),
                    ))
                }
                Some(_) => {}
            },
        }
        if self.method.is_empty() || !self.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err((
                "method".into(),
                format!("{:?} is not an HTTP method", self.method),
            ));
        }
        if !self.path.starts_with('/') || self.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err((
                "path".into(),
                format!(
                    "{:?} must start with / and hold no spaces or control characters",
                    self.path
                ),
            ));
        }
        if !(100..=599).contains(&self.status) {
            return Err((
                "status".into(),
                format!("{} is not an HTTP status", self.status),
            ));
        }
        if self.interval < Duration::from_millis(10) {
            return Err(("interval".into(), "must be at least 10ms".into()));
        }
        if self.timeout.is_zero() {
            return Err(("timeout".into(), "must be more than 0".into()));
        }
        if !(1..=100).contains(&self.fall) {
            return Err(("fall".into(), format!("must be 1..=100, got {}", self.fall)));
        }
        if !(1..=100).contains(&self.rise) {
            return Err(("rise".into(), format!("must be 1..=100, got {}", self.rise)));
        }
        Ok(())
    }

    /// What the check probes, for messages: `http GET 127.0.0.1:80/healthz`.
    pub fn describe(&self) -> String {
        let port = self.port.unwrap_or(0);
        match self.kind {
            HealthKind::Http => format!(
                "http {} {}{}",
                self.method,
                std::net::SocketAddr::new(self.host, port),
                self.path
            ),
            HealthKind::Tcp => format!("tcp {}", std::net::SocketAddr::new(self.host, port)),
            HealthKind::Exec => format!("exec {}", self.command.join(" ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(text: &str) -> HealthSpec {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn test_health_defaults_and_port_from_the_operator() {
        let mut h = health("kind = \"http\"\npath = \"/healthz\"");
        h.resolve(Some(8080)).expect("valid");
        assert_eq!(h.port, Some(8080));
        assert_eq!((h.fall, h.rise), (3, 2));
        assert_eq!(h.interval, Duration::from_secs(1));
        assert_eq!(h.describe(), "http GET 127.0.0.1:8080/healthz");
        // Round trip through the wire form.
        let back: HealthSpec =
            serde_json::from_str(&serde_json::to_string(&h).expect("json")).expect("back");
        assert_eq!(back, h);
    }

    #[test]
    fn test_bad_health_names_the_field() {
        for (text, port, field) in [
            ("kind = \"tcp\"", None, "port"),
            ("kind = \"exec\"", None, "command"),
            ("kind = \"exec\"\ncommand = [\"check.sh\"]", None, "command"),
            ("kind = \"http\"\npath = \"x\"", Some(1), "path"),
            ("kind = \"http\"\nmethod = \"get\"", Some(1), "method"),
            ("kind = \"http\"\nstatus = 99", Some(1), "status"),
            ("kind = \"tcp\"\nfall = 0", Some(1), "fall"),
            ("kind = \"tcp\"\nrise = 0", Some(1), "rise"),
            ("kind = \"tcp\"\ninterval = \"1ms\"", Some(1), "interval"),
        ] {
            let err = health(text).resolve(port).expect_err(text);
            assert_eq!(err.0, field, "{text}: {err:?}");
        }
        assert!(toml::from_str::<HealthSpec>("kind = \"ping\"").is_err());
        assert!(toml::from_str::<HealthSpec>("kind = \"tcp\"\nbogus = 1").is_err());
    }

    #[test]
    fn test_bad_process_names_the_field() {
        let ok: ProcessSpec =
            toml::from_str("command = \"/bin/sleep\"\nargs = [\"1\"]").expect("parses");
        ok.validate().expect("valid");
        assert_eq!(ok.stop_timeout, Duration::from_secs(5));
        for (text, field) in [
            ("command = \"sleep\"", "command"),
            ("command = \"/bin/x\"\ncwd = \"rel\"", "cwd"),
            (
                "command = \"/bin/x\"\nstop_signal = \"SIGFOO\"",
                "stop_signal",
            ),
            (
                "command = \"/bin/x\"\nenv = { LAZARUS_TOKEN = \"x\" }",
                "env",
            ),
            ("command = \"/bin/x\"\nquiesce = [\"/bin/true\"]", "quiesce"),
            ("command = \"/bin/x\"\nstate_dir = \"/\"", "state_dir"),
        ] {
            let p: ProcessSpec = toml::from_str(text).expect(text);
            assert_eq!(p.validate().expect_err(text).0, field, "{text}");
        }
    }

    #[test]
    fn test_notify_hooks_must_be_absolute() {
        let n: NotifySpec = toml::from_str("primary = [\"notify.sh\"]").expect("parses");
        assert_eq!(n.validate().expect_err("relative").0, "primary");
        let n: NotifySpec = toml::from_str("fault = [\"/bin/true\"]").expect("parses");
        n.validate().expect("valid");
        assert!(!n.is_empty());
    }
}
