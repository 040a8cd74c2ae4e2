//! The authenticated control plane on loopback: a supervisor with mutual
//! TLS, and peers with every kind of credential. Each refusal has a
//! positive control that succeeds with the right credential, and after each
//! refusal the cluster is checked unchanged.

// Tests measure wall time; the clock rule is for the runtime's decisions.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use lazarus::cluster::client;
use lazarus::cluster::config::ClusterConfig;
use lazarus::cluster::server::{serve, ServerOptions};
use lazarus::cluster::transport::{Acceptor, Dialer};
use lazarus::cluster::wire::{AgentMsg, SupervisorMsg};
use lazarus::security::{ca_init, issue, Identity, Role, TlsMaterial};
use lazarus_sdk::protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

fn id(role: Role, name: &str) -> Identity {
    Identity {
        role,
        name: name.into(),
    }
}

/// A CA in `root/ca` and certificates for the usual cast.
fn pki(root: &Path) {
    ca_init(&root.join("ca"), 30).expect("ca");
    for (role, name, dir) in [
        (Role::Supervisor, "s1", "sup"),
        (Role::Agent, "h1", "h1"),
        (Role::Operator, "alice", "op"),
        (Role::Viewer, "bob", "viewer"),
    ] {
        issue(&root.join("ca"), &id(role, name), &root.join(dir), 30).expect("issue");
    }
}

fn dialer(dir: &Path) -> Dialer {
    let m = TlsMaterial::load(dir).expect("material");
    Dialer::tls(m.client_config().expect("client config"))
}

struct Sup {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn supervisor(root: &Path) -> Sup {
    let m = TlsMaterial::load(&root.join("sup")).expect("supervisor material");
    let dir = tempfile::tempdir().expect("dir");
    let (stop, stop_rx) = watch::channel(false);
    let (ready, bound) = tokio::sync::oneshot::channel();
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        store: Some(format!("file://{}", dir.path().join("store").display())),
        config: ClusterConfig::default(),
        state_dir: dir.path().join("state"),
        acceptor: Acceptor::tls(m.server_config().expect("server config")),
        job_tls: Some(m.worker_server_config().expect("worker config")),
        ha: None,
        forward: Dialer::Plain,
    };
    tokio::spawn(async move { serve(opts, stop_rx, Some(ready)).await });
    Sup {
        addr: bound.await.expect("bound"),
        stop,
        _dir: dir,
    }
}

/// Registers as `name` with `dialer`: the supervisor's first answer.
async fn register(d: &Dialer, addr: SocketAddr, name: &str) -> Result<SupervisorMsg, String> {
    let (mut r, mut w, _) = d
        .dial(addr, Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())?;
    let msg = AgentMsg::Register {
        name: name.into(),
        state_dir: "/tmp/x".into(),
        procs: Vec::new(),
    };
    protocol::write_control(&mut w, &msg)
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        protocol::read_control::<_, SupervisorMsg>(&mut r),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| e.to_string())?;
    // Keep the session open a moment, so that a welcome shows in status.
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::mem::forget((r, w));
    reply.ok_or_else(|| "closed".to_string())
}

async fn hosts(root: &Path, addr: SocketAddr) -> Vec<String> {
    client::status(&dialer(&root.join("op")), &[addr])
        .await
        .expect("operator reads status")
        .hosts
        .into_iter()
        .map(|h| h.name)
        .collect()
}

#[tokio::test]
async fn test_agents_register_only_as_their_certificate_says() {
    let root = tempfile::tempdir().expect("root");
    pki(root.path());
    let sup = supervisor(root.path()).await;
    let h1 = dialer(&root.path().join("h1"));

    // agent:h1 trying to be h2: refused with the reason, never a host.
    let reply = register(&h1, sup.addr, "h2").await.expect("an answer");
    match reply {
        SupervisorMsg::Refused { reason } => assert!(
            reason.contains("certificate agent:h1 may not register as agent \"h2\""),
            "{reason}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        hosts(root.path(), sup.addr).await.is_empty(),
        "nothing joined"
    );

    // An operator certificate is not an agent's either.
    let op = dialer(&root.path().join("op"));
    assert!(matches!(
        register(&op, sup.addr, "alice").await,
        Ok(SupervisorMsg::Refused { .. })
    ));

    // Positive control: agent:h1 as h1 is welcome and shows up.
    let reply = register(&h1, sup.addr, "h1").await.expect("an answer");
    assert!(matches!(reply, SupervisorMsg::Welcome { .. }), "{reply:?}");
    assert_eq!(hosts(root.path(), sup.addr).await, vec!["h1".to_string()]);
    // Status carries the agent certificate's expiry and warns within 30 days
    // (these test certificates are valid for 30 days).
    let report = client::status(&dialer(&root.path().join("op")), &[sup.addr])
        .await
        .expect("status");
    // 30 days, or 29 if a second boundary passed since it was issued.
    let days = report.hosts[0].cert_expires_in_days;
    assert!(matches!(days, Some(29 | 30)), "{days:?}");
    let text = client::render(&report);
    assert!(
        text.contains(&format!(
            "warning: the certificate of agent h1 expires in {} days",
            days.unwrap_or_default()
        )),
        "{text}"
    );
    let _ = sup.stop.send(true);
}

#[tokio::test]
async fn test_no_certificate_another_ca_or_expired_gets_nothing() {
    let root = tempfile::tempdir().expect("root");
    pki(root.path());
    let sup = supervisor(root.path()).await;

    // No certificate at all: plain TCP speaking the protocol.
    let plain = register(&Dialer::Plain, sup.addr, "h1").await;
    assert!(plain.is_err(), "plaintext gets no answer: {plain:?}");

    // A certificate from another CA, with the right name.
    let other = tempfile::tempdir().expect("other");
    ca_init(&other.path().join("ca"), 30).expect("ca");
    issue(
        &other.path().join("ca"),
        &id(Role::Agent, "h1"),
        &other.path().join("h1"),
        30,
    )
    .expect("issue");
    let e = register(&dialer(&other.path().join("h1")), sup.addr, "h1")
        .await
        .expect_err("another CA is refused");
    assert!(e.contains("handshake"), "{e}");

    // An expired certificate (valid for 0 days: it ended when issued).
    issue(
        &root.path().join("ca"),
        &id(Role::Agent, "h1"),
        &root.path().join("h1-old"),
        0,
    )
    .expect("issue");
    // Certificate times have one-second resolution: let it be over.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = register(&dialer(&root.path().join("h1-old")), sup.addr, "h1")
        .await
        .expect_err("an expired certificate is refused");
    // TLS 1.3: the server's verdict on a client certificate arrives as an
    // alert after the client's side of the handshake.
    assert!(e.contains("CertificateExpired"), "{e}");

    // Nobody joined; status without a certificate gets nothing either.
    assert!(hosts(root.path(), sup.addr).await.is_empty());
    assert!(client::status(&Dialer::Plain, &[sup.addr]).await.is_err());
    let _ = sup.stop.send(true);
}

#[tokio::test]
async fn test_viewer_reads_status_and_cannot_submit_or_stop() {
    let root = tempfile::tempdir().expect("root");
    pki(root.path());
    let sup = supervisor(root.path()).await;
    let viewer = dialer(&root.path().join("viewer"));
    client::status(&viewer, &[sup.addr])
        .await
        .expect("a viewer reads status");
    let job = lazarus_storage::JobId::new("kv").expect("job");
    let e = client::stop(&viewer, &[sup.addr], job.clone())
        .await
        .expect_err("a viewer may not stop");
    assert!(
        e.to_string()
            .contains("certificate viewer:bob may not stop jobs (needs the operator role)"),
        "{e}"
    );
    let spec = root.path().join("job.toml");
    std::fs::write(
        &spec,
        "[job]\nname = \"x\"\nworker = \"/bin/true\"\n[[operator]]\nname = \"a\"\nkind = \"k\"\n",
    )
    .expect("spec");
    let e = client::submit(&viewer, &[sup.addr], &spec, &[], &[], &[], None)
        .await
        .expect_err("a viewer may not submit");
    assert!(e.to_string().contains("may not submit jobs"), "{e}");
    // Positive control: the operator's stop reaches the job table.
    let e = client::stop(&dialer(&root.path().join("op")), &[sup.addr], job)
        .await
        .expect_err("no such job");
    assert_eq!(e.to_string(), "no job kv");
    let _ = sup.stop.send(true);
}

#[tokio::test]
async fn test_garbage_truncated_handshakes_and_slow_clients_do_not_block_others() {
    let root = tempfile::tempdir().expect("root");
    pki(root.path());
    let sup = supervisor(root.path()).await;
    // A slow-loris client: connects and says nothing.
    let mut silent = tokio::net::TcpStream::connect(sup.addr)
        .await
        .expect("connect");
    // A truncated handshake: the first bytes of a TLS record, then nothing.
    let mut truncated = tokio::net::TcpStream::connect(sup.addr)
        .await
        .expect("connect");
    truncated
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    // Garbage.
    let mut garbage = tokio::net::TcpStream::connect(sup.addr)
        .await
        .expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    // Everyone else is served meanwhile.
    let start = Instant::now();
    assert!(hosts(root.path(), sup.addr).await.is_empty());
    assert!(start.elapsed() < Duration::from_secs(2), "served at once");
    // Garbage is closed at once; the silent and truncated ones within the
    // handshake bound (5 s), not held forever.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), garbage.read(&mut buf))
        .await
        .expect("garbage closed promptly");
    assert!(matches!(n, Ok(0) | Err(_)) || n.is_ok_and(|n| n > 0 && buf[0] == 0x15));
    for (what, s) in [("silent", &mut silent), ("truncated", &mut truncated)] {
        let closed = tokio::time::timeout(Duration::from_secs(8), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{what} connection closed within the handshake bound"
        );
    }
    let _ = sup.stop.send(true);
}
