//! Active-active kv-service on real network namespaces: two instances,
//! each the primary of its own VIP on its own host, each owning half of the
//! key groups; a client on a third host spreads requests over both VIPs.
//!
//! Checks (issue "active-active", tests 1 to 3): every key is answered
//! through either VIP (requests for the other instance's keys are
//! forwarded); after the loss of one host its VIP and share move to the
//! survivor's host within the lease bound, never with two holders of a
//! VIP, the surviving instance keeps its process (a region failover: the
//! instances exchange no records, so only the lost one restarts), and every
//! acknowledged write is readable through both VIPs; when the host comes
//! back nothing moves by itself (no preemption).
//!
//! Needs root; fails (never skips) without it.

#[path = "../../../runtime/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{self, LzCluster, FAST};
use common::netns::{http, pids_with_env};

const VIPS: [&str; 2] = ["198.18.0.100", "198.18.0.101"];

fn vip_key(i: usize) -> String {
    format!("{}/24", VIPS[i])
}

fn addr(i: usize) -> SocketAddr {
    format!("{}:8080", VIPS[i]).parse().expect("addr")
}

fn spec(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/job.toml"))
        .expect("job.toml")
        .replace(
            "worker = \"kv-service\"",
            &format!("worker = \"{}\"", env!("CARGO_BIN_EXE_kv-service")),
        )
        .replace("parallelism = 1", "parallelism = 2")
        .replace("standby = \"hot\"", "standby = \"none\"")
        .replace(
            "vip = \"198.18.0.100/24\"\nvip6 = \"2001:2::100/64\"",
            "vips = [\"198.18.0.100/24\", \"198.18.0.101/24\"]",
        );
    assert!(text.contains("vips = [") && text.contains("parallelism = 2"));
    let path = dir.join("kv-aa.toml");
    std::fs::write(&path, text).expect("spec");
    path
}

/// PUT until acknowledged (bounded by `limit`), through VIP `via`.
fn put_acked(via: usize, key: &str, value: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok((s, _)) = http(
            addr(via),
            "PUT",
            &format!("/kv/{key}"),
            value.as_bytes(),
            Duration::from_millis(500),
        ) {
            if s == 201 || s == 204 {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Writes every pair, through the two VIPs in turn, each retried until
/// acknowledged (bounded by `limit`); returns the keys that were not.
fn unacked(c: &LzCluster, pairs: &[(String, String)], limit: Duration) -> Vec<String> {
    let pairs = pairs.to_vec();
    c.bed
        .in_host("cl", move || {
            pairs
                .iter()
                .enumerate()
                .filter(|(i, (k, v))| !put_acked(i % 2, k, v, limit))
                .map(|(_, (k, _))| k.clone())
                .collect::<Vec<_>>()
        })
        .join()
        .expect("client")
}

/// Reads every pair through both VIPs; returns the mismatches.
fn unreadable(c: &LzCluster, pairs: Vec<(String, String)>) -> Vec<String> {
    c.bed
        .in_host("cl", move || {
            let mut bad = Vec::new();
            for (k, v) in &pairs {
                for (via, vip) in VIPS.iter().enumerate() {
                    let got = http(
                        addr(via),
                        "GET",
                        &format!("/kv/{k}"),
                        b"",
                        Duration::from_secs(2),
                    );
                    if !matches!(&got, Ok((200, b)) if b == v.as_bytes()) {
                        bad.push(format!("{k} via {vip}: {got:?}"));
                    }
                }
            }
            bad
        })
        .join()
        .expect("client")
}

/// The pids whose sockets listen on `addr`:8080 on `host`, from the
/// kernel's socket table (`ss`).
fn listener_pids(c: &LzCluster, host: &str, addr: &str) -> Vec<u32> {
    let out = c
        .bed
        .exec(host, "ss", &["-Hltnp", &format!("src {addr}:8080")]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut pids: Vec<u32> = text
        .split("pid=")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn holder(st: &serde_json::Value, i: usize) -> Option<String> {
    cluster::vip(st, &vip_key(i)).and_then(|v| v["holder"].as_str().map(str::to_string))
}

#[test]
fn test_active_active_serves_any_key_on_either_vip_and_survives_host_loss() {
    let c = LzCluster::start("aa", &["a", "b"], &["cl"], FAST);
    c.submit(&spec(c.dir.path()), &[]);
    let ready = c.wait(
        "both instances serving, each on its VIP",
        Duration::from_secs(30),
        |st| {
            cluster::serving(st, "kv", "kv-0", &vip_key(0)).is_some()
                && cluster::serving(st, "kv", "kv-1", &vip_key(1)).is_some()
        },
    );
    let (h0, h1) = (
        holder(&ready, 0).expect("vip 0"),
        holder(&ready, 1).expect("vip 1"),
    );
    assert_ne!(h0, h1, "the two primaries are spread over the two hosts");

    // 1. Writes through either VIP, each acknowledged; every key reads back
    //    through both.
    let written: Vec<(String, String)> = (0..40)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    let acked = unacked(&c, &written, Duration::from_secs(10));
    assert!(
        acked.is_empty(),
        "not acknowledged: {acked:?}\n{}",
        c.logs()
    );
    let bad = unreadable(&c, written.clone());
    assert!(bad.is_empty(), "{bad:?}\n{}", c.logs());

    // 2. Host loss of kv-0's host: its VIP and share move to the survivor.
    let (lost, survivor) = (h0.clone(), h1.clone());
    let survivor_pid = || {
        let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&survivor));
        pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-1", &ip])
    };
    let before = survivor_pid();
    assert_eq!(
        before.len(),
        1,
        "one kv-1 process on {survivor}: {before:?}"
    );
    let holders: Arc<Mutex<Vec<(bool, bool)>>> = Arc::default();
    let lost_at = Instant::now();
    c.bed.link_down(&lost);
    // Never two holders of VIP 0 (sampled until the survivor holds it).
    let moved = loop {
        let (a, b) = (c.bed.holds("a", VIPS[0]), c.bed.holds("b", VIPS[0]));
        holders.lock().expect("holders").push((a, b));
        if c.bed.holds(&survivor, VIPS[0]) {
            break lost_at.elapsed();
        }
        assert!(
            lost_at.elapsed() < Duration::from_secs(30),
            "VIP 0 never moved\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(
        holders
            .lock()
            .expect("holders")
            .iter()
            .all(|(a, b)| !(*a && *b)),
        "two holders of {} at once",
        VIPS[0]
    );
    // Served again on both VIPs, by the survivor; writes through both.
    let during: Vec<(String, String)> = (0..20)
        .map(|i| (format!("w{i}"), format!("x{i}")))
        .collect();
    let late = unacked(&c, &during, Duration::from_secs(20));
    assert!(
        late.is_empty(),
        "not acknowledged after the loss: {late:?}\n{}",
        c.logs()
    );
    let after = c.wait(
        "both instances on the survivor, each with its VIP",
        Duration::from_secs(30),
        |st| {
            [0usize, 1].iter().all(|&i| {
                cluster::serving(st, "kv", &format!("kv-{i}"), &vip_key(i))
                    .is_some_and(|(w, _)| w["primary"] == survivor.as_str())
            })
        },
    );
    // A region failover: kv-1 kept its process (and its share's state).
    let job = cluster::job(&after, "kv").expect("job");
    assert_eq!(
        survivor_pid(),
        before,
        "the surviving instance was not restarted: {job}"
    );
    assert!(
        job["region_failovers"].as_u64().is_some_and(|n| n >= 1),
        "{job}"
    );
    // Taken over inside kv-1's process: no kv-0 process was started, and
    // the kernel says the survivor's process listens on VIP 0.
    assert!(job["takeovers"].as_u64().is_some_and(|n| n >= 1), "{job}");
    let kv0 = job["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["worker"] == "kv-0"))
        .expect("kv-0 in status");
    assert_eq!(kv0["taken_over_by"], "kv-1", "{job}");
    let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&survivor));
    assert_eq!(
        pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0", &ip]),
        Vec::<u32>::new(),
        "no kv-0 process on the survivor"
    );
    assert_eq!(
        listener_pids(&c, &survivor, VIPS[0]),
        before,
        "VIP 0's listener is in kv-1's process"
    );
    let mut all = written.clone();
    all.extend(during);
    let bad = unreadable(&c, all.clone());
    assert!(
        bad.is_empty(),
        "acknowledged writes lost: {bad:?}\n{}",
        c.logs()
    );
    assert!(!c.bed.holds(&lost, VIPS[0]) || !c.bed.holds(&survivor, VIPS[0]));

    // 3. The host comes back: nothing moves by itself (nopreempt).
    c.bed.link_up(&lost);
    c.wait("the lost host alive again", Duration::from_secs(30), |st| {
        st["hosts"].as_array().is_some_and(|hs| {
            hs.iter()
                .any(|h| h["name"] == lost.as_str() && h["alive"] == true)
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    let st = c.status().expect("status");
    for (i, vip) in VIPS.iter().enumerate() {
        assert_eq!(
            holder(&st, i).as_deref(),
            Some(survivor.as_str()),
            "VIP {i} stays: {st}"
        );
        assert!(
            !c.bed.holds(&lost, vip),
            "the returned host took VIP {i} back"
        );
    }
    let bad = unreadable(&c, all);
    assert!(bad.is_empty(), "{bad:?}");
    eprintln!(
        "active-active: VIP {} moved {moved:?} after the loss of host {lost}; epoch {} -> {}",
        VIPS[0],
        cluster::job(&ready, "kv")
            .map(|j| j["epoch"].clone())
            .unwrap_or_default(),
        cluster::job(&after, "kv")
            .map(|j| j["epoch"].clone())
            .unwrap_or_default(),
    );
}

/// Test 3 with fail-back configured, and `lazarus move`: after the lost host
/// has been back for the hold-down, the moved instance returns to it (the
/// other instance keeps its process), no acknowledged write is lost; an
/// operator moves an instance on request; bad requests are refused by name.
#[test]
fn test_fail_back_after_the_hold_down_and_move_on_request() {
    let c = LzCluster::start("aafb", &["a", "b"], &["cl"], FAST);
    let text = std::fs::read_to_string(spec(c.dir.path()))
        .expect("spec")
        .replace("port = 8080", "port = 8080\nfailback = \"1s\"");
    let path = c.dir.path().join("kv-fb.toml");
    std::fs::write(&path, text).expect("spec");
    c.submit(&path, &[]);
    let serving_on = |st: &serde_json::Value, i: usize, host: &str| {
        cluster::serving(st, "kv", &format!("kv-{i}"), &vip_key(i))
            .is_some_and(|(w, _)| w["primary"] == host)
    };
    let ready = c.wait("both instances serving", Duration::from_secs(30), |st| {
        cluster::serving(st, "kv", "kv-0", &vip_key(0)).is_some()
            && cluster::serving(st, "kv", "kv-1", &vip_key(1)).is_some()
    });
    let (home, other) = (
        holder(&ready, 0).expect("vip 0"),
        holder(&ready, 1).expect("vip 1"),
    );
    assert_ne!(home, other);
    let pid_of = |worker: &str, host: &str| {
        let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(host));
        pids_with_env(&c.bed.tag, &[&format!("LAZARUS_WORKER={worker}"), &ip])
    };
    let kv1 = pid_of("kv-1", &other);
    assert_eq!(kv1.len(), 1);
    let write = |from: usize, n: usize, tag: &'static str| {
        let keys: Vec<(String, String)> = (from..from + n)
            .map(|i| (format!("{tag}{i}"), format!("{tag}-v{i}")))
            .collect();
        let late = unacked(&c, &keys, Duration::from_secs(20));
        assert!(late.is_empty(), "not acknowledged: {late:?}\n{}", c.logs());
        keys
    };
    let mut all = write(0, 20, "a");
    c.bed.link_down(&home);
    c.wait(
        "kv-0 moved to the survivor",
        Duration::from_secs(30),
        |st| serving_on(st, 0, &other),
    );
    all.extend(write(0, 10, "b"));
    c.bed.link_up(&home);
    let back_at = Instant::now();
    let st = c.wait(
        "kv-0 back on its first host after the hold-down",
        Duration::from_secs(30),
        |st| serving_on(st, 0, &home) && serving_on(st, 1, &other),
    );
    let job = cluster::job(&st, "kv").expect("job");
    assert!(job["moves"].as_u64().is_some_and(|n| n >= 1), "{job}");
    assert!(c.bed.holds(&home, VIPS[0]) && !c.bed.holds(&other, VIPS[0]));
    assert_eq!(
        pid_of("kv-1", &other),
        kv1,
        "kv-1 was never restarted: {job}"
    );
    assert_eq!(
        pid_of("kv-0", &home).len(),
        1,
        "kv-0 is a process of its own at home again"
    );
    let ended = Instant::now();
    while !listener_pids(&c, &other, VIPS[0]).is_empty() {
        assert!(
            ended.elapsed() < Duration::from_secs(5),
            "the taken-over share still listens in kv-1's process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    all.extend(write(0, 10, "c"));
    let bad = unreadable(&c, all.clone());
    assert!(
        bad.is_empty(),
        "acknowledged writes lost: {bad:?}\n{}",
        c.logs()
    );
    eprintln!(
        "fail-back: kv-0 home again {:?} after its host returned",
        back_at.elapsed()
    );

    // `lazarus move`: bad requests are refused by name; a good one moves.
    for (args, says) in [
        (
            vec!["move", "kv", "kv-9", "--to", "a"],
            "has no worker \"kv-9\" (workers: kv-0, kv-1)",
        ),
        (
            vec!["move", "kv", "kv-1", "--to", "zz"],
            "host zz is not a live agent",
        ),
        (vec!["move", "nojob", "kv-1", "--to", "a"], "no job nojob"),
    ] {
        let out = c.cli(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success() && text.contains(says),
            "{args:?}: {text}"
        );
    }
    let out = c.cli(&["move", "kv", "kv-1", "--to", &home]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait("kv-1 moved on request", Duration::from_secs(30), |st| {
        serving_on(st, 1, &home) && serving_on(st, 0, &home)
    });
    all.extend(write(0, 10, "d"));
    let bad = unreadable(&c, all);
    assert!(
        bad.is_empty(),
        "acknowledged writes lost: {bad:?}\n{}",
        c.logs()
    );
}

/// Test 4 and 5 for the service: rescale the active-active kv-service
/// 2 -> 3 (a VIP for the new instance), every acknowledged key readable
/// through all three VIPs; then stop it at a savepoint and start it again
/// from the savepoint: the same data.
#[test]
fn test_rescale_the_service_and_restart_it_from_a_savepoint() {
    let c = LzCluster::start("aars", &["a", "b"], &["cl"], FAST);
    let path = spec(c.dir.path());
    c.submit(&path, &[]);
    c.wait("both instances serving", Duration::from_secs(30), |st| {
        cluster::serving(st, "kv", "kv-0", &vip_key(0)).is_some()
            && cluster::serving(st, "kv", "kv-1", &vip_key(1)).is_some()
    });
    let keys: Vec<(String, String)> = (0..30)
        .map(|i| (format!("r{i}"), format!("rv{i}")))
        .collect();
    let late = unacked(&c, &keys, Duration::from_secs(10));
    assert!(late.is_empty(), "{late:?}");
    let text = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // Without a VIP for the new instance: refused, the job left alone.
    let out = c.cli(&["rescale", "kv", "--operator", "kv", "--parallelism", "3"]);
    assert!(
        !out.status.success()
            && text(&out).contains("give --vip for each of the 1 added instances"),
        "{}",
        text(&out)
    );
    let out = c.cli(&[
        "rescale",
        "kv",
        "--operator",
        "kv",
        "--parallelism",
        "3",
        "--vip",
        "198.18.0.102/24",
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.logs());
    let three = |st: &serde_json::Value| {
        (0..3).all(|i| {
            cluster::serving(st, "kv", &format!("kv-{i}"), &format!("198.18.0.10{i}/24")).is_some()
        })
    };
    c.wait("three instances serving", Duration::from_secs(60), three);
    let all3 = |c: &LzCluster, keys: Vec<(String, String)>| {
        c.bed
            .in_host("cl", move || {
                let mut bad = Vec::new();
                for (k, v) in &keys {
                    for i in 0..3 {
                        let addr: SocketAddr =
                            format!("198.18.0.10{i}:8080").parse().expect("addr");
                        let got = http(
                            addr,
                            "GET",
                            &format!("/kv/{k}"),
                            b"",
                            Duration::from_secs(2),
                        );
                        if !matches!(&got, Ok((200, b)) if b == v.as_bytes()) {
                            bad.push(format!("{k} via .10{i}: {got:?}"));
                        }
                    }
                }
                bad
            })
            .join()
            .expect("client")
    };
    let bad = all3(&c, keys.clone());
    assert!(bad.is_empty(), "after the rescale: {bad:?}\n{}", c.logs());
    // Stop at a savepoint, start again from it (same parallelism and VIPs).
    let out = c.cli(&["savepoint", "kv", "--name", "kv-sp", "--stop"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.logs());
    c.wait("kv stopped", Duration::from_secs(30), |st| {
        cluster::job(st, "kv").is_some_and(|j| j["state"] == "finished" || j["state"] == "stopped")
    });
    let out = c.cli(&[
        "submit",
        path.to_str().expect("utf-8"),
        "--from",
        "kv-sp",
        "--parallelism",
        "kv=3",
        "--vips",
        "kv=198.18.0.100/24,198.18.0.101/24,198.18.0.102/24",
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.logs());
    c.wait(
        "three instances serving again",
        Duration::from_secs(60),
        three,
    );
    let bad = all3(&c, keys);
    assert!(
        bad.is_empty(),
        "after the restart from the savepoint: {bad:?}\n{}",
        c.logs()
    );
}
