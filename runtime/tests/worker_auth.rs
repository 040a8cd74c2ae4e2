//! A job's control port accepts a worker only with the credential the
//! supervisor issued for that one process. The job's worker binary here is a
//! script that never connects, so the worker's identity is unclaimed: the
//! moment an attacker on the network would use to speak for it (take its
//! assignment, send fake acks into a manifest).

// Tests measure wall time; the clock rule is for the runtime's decisions.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use lazarus::spec::JobSpec;
use lazarus::supervisor::{run_local, LocalRun};
use lazarus_sdk::protocol::{self, ToSupervisor, ToWorker};
use lazarus_storage::WorkerId;
use tokio::net::TcpStream;

/// The environment of the process whose environment has `marker`.
fn environ_with(marker: &str) -> Option<Vec<(String, String)>> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<(String, String)> = raw
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        if vars.iter().any(|(k, v)| format!("{k}={v}") == marker) {
            return Some(vars);
        }
    }
    None
}

/// Says hello as `worker` with `token`; returns the first answer, if any.
async fn hello(addr: SocketAddr, worker: &str, token: Option<&str>) -> Option<ToWorker> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let msg = ToSupervisor::Hello {
        worker: WorkerId::new(worker).expect("id"),
        attempt: 0,
        standby: false,
        token: token.map(str::to_string),
        rejoin: None,
    };
    protocol::write_control(&mut s, &msg).await.expect("write");
    tokio::time::timeout(
        Duration::from_secs(2),
        protocol::read_control::<_, ToWorker>(&mut s),
    )
    .await
    .ok()
    .and_then(|r| r.ok())
    .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_control_port_accepts_a_worker_only_with_its_process_credential() {
    let dir = tempfile::tempdir().expect("dir");
    let idle = dir.path().join("idle-worker");
    std::fs::write(&idle, "#!/bin/sh\nexec sleep 30\n").expect("script");
    std::fs::set_permissions(&idle, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let tag = format!("LAZARUS_TEST_TAG={}", std::process::id());
    let text = format!(
        "[job]\nname = \"auth\"\nworker = \"{}\"\n[[operator]]\nname = \"x\"\nkind = \"k\"\n",
        idle.display()
    );
    let spec = JobSpec::parse(&text, "auth.toml", dir.path().to_path_buf()).expect("spec");
    let (stop_tx, stop) = tokio::sync::watch::channel(lazarus::supervisor::StopRequest::Run);
    let run = LocalRun {
        spec,
        store_url: format!("file://{}", dir.path().join("store").display()),
        worker_binary: idle.clone(),
        state_dir: dir.path().join("state"),
        chaos: None,
        status_every: None,
        final_checkpoint_on_stop: false,
        epoch_floor: 0,
        adopt_timeout: None,
        from: None,
    };
    // The idle worker inherits this test's environment: tag it to find it.
    std::env::set_var("LAZARUS_TEST_TAG", std::process::id().to_string());
    let job = tokio::spawn(run_local(run, stop));

    let start = Instant::now();
    let env = loop {
        if let Some(env) =
            environ_with(&tag).filter(|e| e.iter().any(|(k, _)| k == "LAZARUS_TOKEN"))
        {
            break env;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the idle worker started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .expect(k)
    };
    let addr: SocketAddr = get("LAZARUS_SUPERVISOR").parse().expect("addr");
    let token = get("LAZARUS_TOKEN");
    assert_eq!(token.len(), 32, "128 random bits as hex");

    // No credential, a guessed one, the right one for another worker: no
    // assignment, the connection is closed.
    assert_eq!(hello(addr, "x-0", None).await, None, "no credential");
    assert_eq!(
        hello(addr, "x-0", Some(&"0".repeat(32))).await,
        None,
        "a guess"
    );
    assert_eq!(
        hello(addr, "y-0", Some(&token)).await,
        None,
        "another worker's name"
    );
    // The job did not notice: the same process (attempt 0, same credential)
    // still waits; a failure would have replaced it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = environ_with(&tag).expect("the idle worker still runs");
    assert!(still.contains(&("LAZARUS_TOKEN".to_string(), token.clone())));
    assert!(still.contains(&("LAZARUS_ATTEMPT".to_string(), "0".to_string())));
    // Positive control: the process's own credential gets its assignment.
    match hello(addr, "x-0", Some(&token)).await {
        Some(ToWorker::Assign(a)) => assert_eq!(a.worker.as_str(), "x-0"),
        other => panic!("the real credential gets the assignment, got {other:?}"),
    }
    // Used once: the same credential again gets nothing.
    assert_eq!(hello(addr, "x-0", Some(&token)).await, None, "a replay");

    let _ = stop_tx.send(lazarus::supervisor::StopRequest::Stop);
    let summary = tokio::time::timeout(Duration::from_secs(30), job)
        .await
        .expect("the job stops")
        .expect("task")
        .expect("run");
    // The only failure is the positive control's own connection closing
    // after it was assigned (the worker "disconnected").
    assert!(summary.restarts <= 1, "{summary:?}");
}
