//! Health checks, run by the agent against each process it starts for an
//! operator with `[operator.health]`: keepalived's vocabulary and rules.
//!
//! - A process counts as up from its start; `fall` failed probes in a row
//!   make it down, `rise` passed probes in a row make a down process up
//!   again. Failures within `start_period` of the start are not counted.
//! - A probe that does not finish within `timeout` failed.
//! - Probes are `interval` apart, counted from the start of the previous
//!   one, and never overlap.
//!
//! [`HealthState`] is the pure counter; [`probe`] does one probe;
//! [`run_checks`] is the loop the agent spawns, which sends every change.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::service::spec::{HealthKind, HealthSpec};

/// A change of a process's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    /// Up or down now.
    pub up: bool,
    /// The last probe's result, for logs and reports.
    pub detail: String,
}

/// The counter: up or down, and the probes in a row against that.
#[derive(Debug, Clone)]
pub struct HealthState {
    fall: u32,
    rise: u32,
    start_period: Duration,
    started: Duration,
    up: bool,
    run: u32,
}

impl HealthState {
    /// A process started at `started` (up).
    pub fn new(spec: &HealthSpec, started: Duration) -> HealthState {
        HealthState {
            fall: spec.fall.max(1),
            rise: spec.rise.max(1),
            start_period: spec.start_period,
            started,
            up: true,
            run: 0,
        }
    }

    /// Whether the process counts as up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// One probe's result at `now`; `Some(up)` when the state changed.
    pub fn observe(&mut self, now: Duration, ok: bool) -> Option<bool> {
        if self.up {
            if ok {
                self.run = 0;
            } else if now.saturating_sub(self.started) >= self.start_period {
                self.run += 1;
                if self.run >= self.fall {
                    self.up = false;
                    self.run = 0;
                    return Some(false);
                }
            }
        } else if ok {
            self.run += 1;
            if self.run >= self.rise {
                self.up = true;
                self.run = 0;
                return Some(true);
            }
        } else {
            self.run = 0;
        }
        None
    }
}

/// One probe; `Err` says why it failed.
pub async fn probe(spec: &HealthSpec) -> Result<(), String> {
    match tokio::time::timeout(spec.timeout, probe_once(spec)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
    }
}

async fn probe_once(spec: &HealthSpec) -> Result<(), String> {
    let addr = SocketAddr::new(spec.host, spec.port.unwrap_or(0));
    match spec.kind {
        HealthKind::Tcp => tokio::net::TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("connect {addr}: {e}")),
        HealthKind::Http => {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let req = format!(
                "{} {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lazarus-health\r\nConnection: close\r\n\r\n",
                spec.method, spec.path
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("send to {addr}: {e}"))?;
            // The status line is all a check needs: `HTTP/1.x NNN ...`.
            let mut head = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                let got = s
                    .read(&mut head[n..])
                    .await
                    .map_err(|e| format!("read from {addr}: {e}"))?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            let line = String::from_utf8_lossy(&head[..n]);
            let status = line
                .strip_prefix("HTTP/1.")
                .and_then(|r| r.get(2..5))
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| format!("{addr} did not answer HTTP ({:?})", line.trim()))?;
            if status == spec.status {
                Ok(())
            } else {
                Err(format!(
                    "{addr}{} answered {status}, expected {}",
                    spec.path, spec.status
                ))
            }
        }
        HealthKind::Exec => {
            let (cmd, args) = spec
                .command
                .split_first()
                .ok_or("an exec check without a command")?;
            let mut c = tokio::process::Command::new(cmd);
            c.args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            #[cfg(target_os = "linux")]
            // SAFETY: runs between fork and exec; only prctl calls.
            unsafe {
                c.pre_exec(crate::procs::drop_network_capabilities);
            }
            let status = c.status().await.map_err(|e| format!("{cmd}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{cmd} {status}"))
            }
        }
    }
}

/// Probes every `interval` until dropped, sending each change of state
/// (with the probe's message) through `changes`; `now` is the agent's
/// clock. Failures are logged with the process's name.
pub async fn run_checks(
    spec: HealthSpec,
    (job, worker): (String, String),
    now: impl Fn() -> Duration,
    changes: impl Fn(HealthChange),
) {
    let name = format!("{job}/{worker}");
    let mut state = HealthState::new(&spec, now());
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: give the program one interval to start.
    tick.tick().await;
    loop {
        tick.tick().await;
        let result = probe(&spec).await;
        metrics::counter!(crate::metrics::HEALTH_CHECKS, "job" => job.clone(), "worker" => worker.clone(), "result" => if result.is_ok() { "pass" } else { "fail" }).increment(1);
        if let Err(e) = &result {
            tracing::debug!(process = %name, check = %spec.describe(), error = %e, "health probe failed");
        }
        if let Some(up) = state.observe(now(), result.is_ok()) {
            let detail = match result {
                Ok(()) => format!("{} passed {} times in a row", spec.describe(), spec.rise),
                Err(e) => format!(
                    "{} failed {} times in a row (last: {e})",
                    spec.describe(),
                    spec.fall
                ),
            };
            if up {
                tracing::info!(process = %name, %detail, "health check: up");
            } else {
                tracing::warn!(process = %name, %detail, "health check: down");
            }
            changes(HealthChange { up, detail });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fall: u32, rise: u32, start_ms: u64) -> HealthSpec {
        let mut s: HealthSpec = toml::from_str("kind = \"tcp\"\nport = 1").expect("spec");
        s.fall = fall;
        s.rise = rise;
        s.start_period = Duration::from_millis(start_ms);
        s
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn test_fall_and_rise_count_in_a_row() {
        let mut h = HealthState::new(&spec(3, 2, 0), ms(0));
        assert!(h.is_up());
        // Two failures, a success: the run restarts.
        assert_eq!(h.observe(ms(1), false), None);
        assert_eq!(h.observe(ms(2), false), None);
        assert_eq!(h.observe(ms(3), true), None);
        assert_eq!(h.observe(ms(4), false), None);
        assert_eq!(h.observe(ms(5), false), None);
        assert_eq!(h.observe(ms(6), false), Some(false));
        assert!(!h.is_up());
        // Down: one success, a failure, then two successes.
        assert_eq!(h.observe(ms(7), true), None);
        assert_eq!(h.observe(ms(8), false), None);
        assert_eq!(h.observe(ms(9), true), None);
        assert_eq!(h.observe(ms(10), true), Some(true));
        assert!(h.is_up());
        // Up again: it takes `fall` new failures.
        assert_eq!(h.observe(ms(11), false), None);
    }

    #[test]
    fn test_start_period_failures_do_not_count() {
        let mut h = HealthState::new(&spec(1, 1, 500), ms(1000));
        assert_eq!(h.observe(ms(1100), false), None);
        assert_eq!(h.observe(ms(1499), false), None);
        assert_eq!(h.observe(ms(1500), false), Some(false));
    }

    #[tokio::test]
    async fn test_probes_against_real_sockets_and_commands() {
        // An HTTP server on loopback answering 200 then 503.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            for code in [200, 503] {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.expect("read");
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz HTTP/1.0"));
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let mut h: HealthSpec = toml::from_str(&format!(
            "kind = \"http\"\nport = {port}\npath = \"/healthz\""
        ))
        .expect("spec");
        h.resolve(None).expect("valid");
        assert_eq!(probe(&h).await, Ok(()));
        let err = probe(&h).await.expect_err("503");
        assert!(err.contains("answered 503, expected 200"), "{err}");
        // Nothing listens any more.
        let err = probe(&h).await.expect_err("refused");
        assert!(err.contains("connect"), "{err}");

        let mut t = h.clone();
        t.kind = HealthKind::Tcp;
        assert!(probe(&t).await.is_err());

        let mut e: HealthSpec =
            toml::from_str("kind = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 3\"]")
                .expect("spec");
        e.resolve(None).expect("valid");
        let err = probe(&e).await.expect_err("exit 3");
        assert!(err.contains("exit status: 3"), "{err}");
        e.command = vec!["/bin/sh".into(), "-c".into(), "sleep 5".into()];
        e.timeout = Duration::from_millis(100);
        let err = probe(&e).await.expect_err("timeout");
        assert!(err.contains("no answer within"), "{err}");
        e.command = vec!["/bin/true".into()];
        assert_eq!(probe(&e).await, Ok(()));
    }
}
