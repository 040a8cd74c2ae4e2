//! `lazarus submit`, `lazarus status` and `lazarus stop`: one request, one
//! reply, over the supervisor's port.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use lazarus_sdk::protocol;

use lazarus_storage::JobId;

use crate::cluster::transport::Dialer;
use crate::cluster::wire::{ClientReply, ClientRequest, StatusReport};

/// How long to connect (and, separately, to finish the TLS handshake)
/// when the request has nowhere else to go.
const DIAL_ONLY: Duration = Duration::from_secs(5);

/// The same when another supervisor can be asked instead: one that hangs
/// (its kernel still accepts connections) costs this long, no more.
pub const DIAL_ONE_OF_MANY: Duration = Duration::from_secs(1);

/// Sends `req` and returns the reply (bounded: `dial_within` to connect
/// and again for the TLS handshake, 10 s to answer; a savepoint or a
/// rescale, which wait for checkpoints and a stop, 150 s).
pub async fn request(
    dialer: &Dialer,
    supervisor: SocketAddr,
    req: &ClientRequest,
    dial_within: Duration,
) -> anyhow::Result<ClientReply> {
    let (mut read, mut write, _) = dialer
        .dial(supervisor, dial_within)
        .await
        .with_context(|| format!("connecting to the supervisor at {supervisor}"))?;
    protocol::write_control(&mut write, req).await?;
    let hint = match dialer {
        Dialer::Plain => {
            " (if it requires TLS, pass --tls DIR with an operator or viewer certificate)"
        }
        Dialer::Tls(_) => "",
    };
    let answer = match req {
        ClientRequest::Savepoint { .. } | ClientRequest::Rescale { .. } => Duration::from_secs(150),
        _ => Duration::from_secs(10),
    };
    tokio::time::timeout(answer, protocol::read_control(&mut read))
        .await
        .with_context(|| format!("the supervisor did not answer within {answer:?}"))?
        .with_context(|| format!("reading the supervisor's answer{hint}"))?
        .with_context(|| format!("the supervisor closed the connection without answering{hint}"))
}

/// How long a dial to one of `supervisors` may take.
fn dial_bound(supervisors: &[SocketAddr]) -> Duration {
    if supervisors.len() > 1 {
        DIAL_ONE_OF_MANY
    } else {
        DIAL_ONLY
    }
}

/// Sends `req` to the first of `supervisors` that can be reached (every
/// supervisor of an HA cluster forwards to the leader); an answer, even an
/// error, ends the search.
pub async fn request_any(
    dialer: &Dialer,
    supervisors: &[SocketAddr],
    req: &ClientRequest,
) -> anyhow::Result<ClientReply> {
    let mut last = None;
    for &s in supervisors {
        match request(dialer, s, req, dial_bound(supervisors)).await {
            // A follower that knows no leader: another may.
            Ok(ClientReply::Unavailable { message }) => {
                last = Some(anyhow::anyhow!("{s}: {message}"));
            }
            Ok(reply) => return Ok(reply),
            Err(e) => {
                tracing::debug!(supervisor = %s, error = %format!("{e:#}"), "trying the next supervisor");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no supervisor address given")))
}

/// Submits the spec at `path` with `set` and `parallelism` overrides,
/// starting `from` a savepoint or checkpoint id if given.
pub async fn submit(
    dialer: &Dialer,
    supervisor: &[SocketAddr],
    path: &Path,
    set: &[String],
    parallelism: &[String],
    vips: &[String],
    from: Option<&str>,
) -> anyhow::Result<String> {
    let spec =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let dir = std::fs::canonicalize(path)
        .with_context(|| format!("resolving {}", path.display()))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let req = ClientRequest::Submit {
        spec,
        origin: path.display().to_string(),
        dir,
        set: set.to_vec(),
        parallelism: parallelism.to_vec(),
        vips: vips.to_vec(),
        from: from.map(str::to_string),
    };
    acknowledged(request_any(dialer, supervisor, &req).await?)
}

/// Sends `req` (a savepoint or a rescale) and returns the supervisor's
/// answer once it is done.
pub async fn done(
    dialer: &Dialer,
    supervisor: &[SocketAddr],
    req: ClientRequest,
) -> anyhow::Result<String> {
    acknowledged(request_any(dialer, supervisor, &req).await?)
}

/// Stops `job`.
pub async fn stop(
    dialer: &Dialer,
    supervisor: &[SocketAddr],
    job: JobId,
) -> anyhow::Result<String> {
    acknowledged(request_any(dialer, supervisor, &ClientRequest::Stop { job }).await?)
}

/// The message of an `Ok` reply; an `Error` reply becomes the error.
fn acknowledged(reply: ClientReply) -> anyhow::Result<String> {
    match reply {
        ClientReply::Ok { message } => Ok(message),
        ClientReply::Error { message } | ClientReply::Unavailable { message } => {
            anyhow::bail!("{message}")
        }
        ClientReply::Status(_) => anyhow::bail!("unexpected status reply"),
    }
}

/// The cluster's status.
pub async fn status(dialer: &Dialer, supervisor: &[SocketAddr]) -> anyhow::Result<StatusReport> {
    // Of an HA cluster, the first answer that knows a leader (a supervisor
    // cut off from etcd knows none); otherwise the first answer.
    let mut first = None;
    let mut last_err = None;
    for &s in supervisor {
        match request(dialer, s, &ClientRequest::Status, dial_bound(supervisor)).await {
            Ok(ClientReply::Status(r)) => {
                if r.ha.as_ref().is_none_or(|h| h.leader.is_some()) {
                    return Ok(*r);
                }
                first.get_or_insert(*r);
            }
            Ok(ClientReply::Error { message } | ClientReply::Unavailable { message }) => {
                last_err = Some(anyhow::anyhow!("{message}"))
            }
            Ok(ClientReply::Ok { message }) => {
                last_err = Some(anyhow::anyhow!("unexpected reply: {message}"))
            }
            Err(e) => last_err = Some(e),
        }
    }
    match (first, last_err) {
        (Some(r), _) => Ok(r),
        (None, Some(e)) => Err(e),
        (None, None) => anyhow::bail!("no supervisor address given"),
    }
}

/// Renders a status report for people.
pub fn render(s: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "heartbeat {} ms, host timeout {} ms, lease {} ms (+{} ms drift margin)",
        s.heartbeat_ms, s.host_timeout_ms, s.lease_ms, s.drift_margin_ms
    );
    let _ = writeln!(
        out,
        "\nHOST            ADDRESS          STATE  LAST HEARTBEAT"
    );
    for h in &s.hosts {
        let _ = writeln!(
            out,
            "{:<15} {:<16} {:<6} {} ms ago",
            h.name,
            h.addr,
            if h.alive { "alive" } else { "lost" },
            h.last_heartbeat_ms
        );
    }
    for h in &s.hosts {
        if let Some(days) = h.cert_expires_in_days.filter(|d| *d <= 30) {
            let _ = writeln!(
                out,
                "warning: the certificate of agent {} expires in {days} days; issue a new one (lazarus cert issue) and restart the agent",
                h.name
            );
        }
    }
    for j in &s.jobs {
        let _ = writeln!(
            out,
            "\nJOB {} — {} (epoch {}, attempt {}, restarts {}, {} checkpoints, last {})",
            j.job,
            j.state,
            j.epoch,
            j.attempt,
            j.restarts,
            j.committed,
            j.last_checkpoint.map_or("-".into(), |c| c.to_string())
        );
        if let Some(f) = &j.failure {
            let _ = writeln!(out, "  failed: {f}");
        }
        if let Some(f) = &j.last_failure {
            let _ = writeln!(out, "  last failure: {f}");
        }
        if let Some(r) = &j.last_recovery {
            let _ = writeln!(
                out,
                "  last recovery: {} ms to every worker running (drain {} + restore {} + connect {}){}{}{}",
                r.total_ms,
                r.drain_ms,
                r.restore_ms,
                r.connect_ms,
                if r.region_failover { ", region failover" } else { "" },
                r.detect_ms
                    .map_or(String::new(), |ms| format!("; detected {ms} ms after its first sign")),
                r.replay_ms
                    .map_or(String::new(), |ms| format!("; sources back where they were {ms} ms later"))
            );
        }
        let _ = writeln!(
            out,
            "  WORKER          PRIMARY         STANDBY              RUNNING"
        );
        for w in &j.workers {
            let standby = match (&w.placed.standby, w.standby_checkpoint) {
                (Some(h), Some(c)) => format!("{h} ({:?}, at {c})", w.standby_kind).to_lowercase(),
                (Some(h), None) => format!("{h} ({:?})", w.standby_kind).to_lowercase(),
                (None, _) => "-".into(),
            };
            let _ = writeln!(
                out,
                "  {:<15} {:<15} {:<20} {}",
                w.worker.to_string(),
                w.placed.primary,
                standby,
                w.running
            );
        }
    }
    if !s.vips.is_empty() {
        let _ = writeln!(
            out,
            "\nVIP                  ASSIGNED        HOLDER          LEASE"
        );
        for v in &s.vips {
            let _ = writeln!(
                out,
                "{:<20} {:<15} {:<15} {}",
                v.vip,
                v.assigned.as_deref().unwrap_or("-"),
                v.holder.as_deref().unwrap_or("-"),
                match (v.lease_id, v.lease_expires_in_ms) {
                    (Some(id), Some(ms)) => format!("#{id}, expires in {ms} ms"),
                    _ => "-".into(),
                }
            );
        }
    }
    if let Some(ha) = &s.ha {
        let leader = ha.leader.as_ref().map(|m| m.name.as_str());
        let _ = writeln!(
            out,
            "\nSUPERVISOR      ADDRESS               ROLE      (answered by {}{})",
            ha.answered_by,
            ha.term.map(|t| format!(", term {t}")).unwrap_or_default()
        );
        for m in &ha.supervisors {
            let role = if Some(m.name.as_str()) == leader {
                "leader"
            } else {
                "follower"
            };
            let _ = writeln!(out, "{:<15} {:<21} {}", m.name, m.addr, role);
        }
        if leader.is_none() {
            let _ = writeln!(out, "(no leader elected)");
        }
        let e = &ha.etcd;
        let _ = writeln!(
            out,
            "etcd {}: {}",
            e.endpoints.join(","),
            match (&e.version, &e.error) {
                (Some(v), _) if e.healthy => format!("healthy (version {v})"),
                (_, Some(err)) => format!("UNREACHABLE: {err}"),
                _ => "unknown".into(),
            }
        );
    }
    out
}
