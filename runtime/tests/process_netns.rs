//! A `kind = "process"` operator with a state directory and a cold
//! standby, on the namespace test bed: the program (a shell script that
//! appends a line to a file in its state directory every 10 ms) is killed;
//! the cold standby's host restores the directory from the last committed
//! checkpoint before the program starts there. The test writes a poison
//! line into the directory right after the kill: a real restore replaces
//! the directory, so the line is gone, and every line the restored file
//! holds was written before the kill, in order.
//!
//! Also: the program runs without CAP_NET_ADMIN and CAP_NET_RAW, and
//! without Lazarus' credentials in its environment.
//!
//! Needs root; fails (never skips) without it.

// Tests measure wall time; the clock rule is for the runtime's decisions.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::cluster::{self, bin_dir, LzCluster, FAST};
use common::netns::{cap_eff, ok, parent, pids_with_env};

#[test]
fn test_process_state_dir_is_restored_on_the_cold_standby() {
    let files = tempfile::tempdir().expect("tmp");
    let state = files.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let script = files.path().join("appender.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nn=$(wc -l < {log} 2>/dev/null || echo 0)\nwhile true; do n=$((n+1)); echo \"line $n\" >> {log}; sleep 0.01; done\n",
            log = state.join("log").display()
        ),
    )
    .expect("script");
    ok("chmod", &["755", script.to_str().expect("utf-8")]);
    let agent_config = format!(
        "allowed_binaries = [\"{}\", \"{}\"]\nallowed_vips = [\"198.18.0.0/15\"]\n",
        bin_dir().display(),
        files.path().display()
    );
    let c = LzCluster::start_with("prs", &["a", "b"], &[], FAST, &agent_config);
    let spec = files.path().join("appender.toml");
    std::fs::write(
        &spec,
        format!(
            r#"[job]
name = "appender"
heartbeat_interval = "100ms"
heartbeat_timeout = "2s"
[checkpoint]
interval = "50ms"
codec = "none"
[restart]
max_attempts = 100
backoff = "10ms"
[[operator]]
name = "app"
kind = "process"
standby = "cold"
[operator.process]
command = "{}"
state_dir = "{}"
stop_timeout = "1s"
"#,
            script.display(),
            state.display()
        ),
    )
    .expect("spec");
    c.submit(&spec, &[]);
    let st = c.wait(
        "the appender running with a cold standby",
        Duration::from_secs(30),
        |s| {
            cluster::job(s, "appender").is_some_and(|j| {
                j["state"] == "running" && j["last_checkpoint"].as_u64().is_some_and(|n| n >= 5)
            }) && cluster::worker(s, "appender", "app-0").is_some_and(|w| w["standby"].is_string())
        },
    );
    let w = cluster::worker(&st, "appender", "app-0").expect("worker");
    let (old, cold) = (
        w["primary"].as_str().expect("primary").to_string(),
        w["standby"].as_str().expect("standby").to_string(),
    );
    assert_ne!(old, cold);

    // The program: a child of the worker on the primary host.
    let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&old));
    let workers = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=app-0", &ip]);
    let program = pids_with_env(&c.bed.tag, &["LAZARUS_JOB=appender"])
        .into_iter()
        .find(|p| workers.contains(&parent(*p)))
        .expect("the program's process");
    // Network capabilities dropped (CAP_NET_ADMIN 12, CAP_NET_RAW 13), and
    // no credential in its environment.
    assert_eq!(
        cap_eff(program) & ((1 << 12) | (1 << 13)),
        0,
        "program capabilities"
    );
    let env = std::fs::read(format!("/proc/{program}/environ")).expect("environ");
    let env = String::from_utf8_lossy(&env);
    assert!(
        !env.contains("LAZARUS_TOKEN="),
        "no worker credential in the program's env"
    );
    assert!(env.contains("LAZARUS_WORKER=app-0"));

    ok("kill", &["-KILL", &program.to_string()]);
    let killed_at = Instant::now();
    let log = state.join("log");
    let before = std::fs::read_to_string(&log).expect("log");
    let mut poisoned = before.clone();
    poisoned.push_str("POISON\n");
    std::fs::write(&log, &poisoned).expect("poison");

    let st = c.wait(
        "the appender running on the cold standby's host",
        Duration::from_secs(30),
        |s| {
            cluster::job(s, "appender")
                .is_some_and(|j| j["state"] == "running" && j["restarts"].as_u64() >= Some(1))
                && cluster::worker(s, "appender", "app-0")
                    .is_some_and(|w| w["primary"] == cold.as_str())
        },
    );
    let w = cluster::worker(&st, "appender", "app-0").expect("worker");
    assert!(
        w["restore_fetched_bytes"].as_u64().is_some_and(|b| b > 0),
        "the cold standby downloaded the directory: {w}"
    );
    let restored_in = killed_at.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let after = std::fs::read_to_string(&log).expect("log");
    assert!(
        !after.contains("POISON"),
        "the directory was replaced by the checkpoint's\n{}",
        c.logs()
    );
    // The restored prefix is a prefix of what was written before the kill,
    // and the program went on from there.
    let lines: Vec<&str> = after.lines().collect();
    let old_lines: Vec<&str> = before.lines().collect();
    let kept = lines
        .iter()
        .zip(old_lines.iter())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        kept >= 5,
        "at least the first checkpoints' lines survive: {kept}"
    );
    assert!(kept <= old_lines.len());
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(
            *l,
            format!("line {}", i + 1),
            "lines in order, none lost in the middle"
        );
    }
    eprintln!(
        "state_dir: {} lines at the kill, {kept} restored, {} now; the cold standby ran again after {restored_in:?}",
        old_lines.len(),
        lines.len()
    );
}
