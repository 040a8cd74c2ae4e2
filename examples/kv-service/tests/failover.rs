//! Failover of the kv-service across hosts, on real network namespaces:
//! a supervisor, two agents and a client that talks only to the VIP.
//!
//! Each test writes acknowledged keys, breaks the primary (SIGKILL of its
//! worker process, or its host's cable cut), keeps writing through the
//! failover, and then checks: the service answers on the VIP again, the
//! client's kernel neighbour entry for the VIP holds the new primary's MAC,
//! every acknowledged write is readable, and exactly one host holds the VIP.
//!
//! Needs root; fails (never skips) without it.

#[path = "../../../runtime/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{self, LzCluster, FAST};
use common::netns::{cap_eff, http, pids_with_env};

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "2001:2::100";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// SIGKILL of the primary worker process.
    Kill,
    /// The primary host's link set down.
    LinkDown,
}

struct Scenario {
    /// Stop the job at the end and check that everything is released.
    stop: bool,
    tag: &'static str,
    standby: &'static str,
    v6: bool,
    fault: Fault,
    config: String,
    lease: Duration,
    /// MiB of state loaded before the fault (1 MiB values): a process
    /// that holds it takes the kernel tens of milliseconds to end.
    ballast_mib: usize,
}

fn spec(dir: &std::path::Path, standby: &str) -> PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/job.toml"))
        .expect("job.toml");
    let worker = env!("CARGO_BIN_EXE_kv-service");
    let text = text
        .replace("worker = \"kv-service\"", &format!("worker = \"{worker}\""))
        .replace("standby = \"hot\"", &format!("standby = \"{standby}\""));
    assert!(text.contains(worker) && text.contains(&format!("standby = \"{standby}\"")));
    let path = dir.join("kv.toml");
    std::fs::write(&path, text).expect("spec");
    path
}

/// Waits (bounded) until kv-0 serves with a following hot standby and the
/// VIP held; returns the status, the VIP holder and the other host.
fn serving_with_standby(c: &LzCluster) -> (serde_json::Value, String, &'static str) {
    let st = c.wait(
        "kv serving on its VIP with a following standby",
        Duration::from_secs(30),
        |st| {
            cluster::worker(st, "kv", "kv-0")
                .is_some_and(|w| w["running"] == true && !w["standby_checkpoint"].is_null())
                && cluster::vip(st, "198.18.0.100/24").is_some_and(|v| v["holder"].is_string())
        },
    );
    let old = cluster::vip(&st, "198.18.0.100/24").expect("vip")["holder"]
        .as_str()
        .expect("holder")
        .to_string();
    let other = if old == "a" { "b" } else { "a" };
    (st, old, other)
}

/// PUT until acknowledged (bounded: `limit`). Returns whether it was.
fn put_acked(addr: SocketAddr, key: &str, value: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok((status, _)) = http(
            addr,
            "PUT",
            &format!("/kv/{key}"),
            value.as_bytes(),
            Duration::from_millis(500),
        ) {
            if status == 201 || status == 204 {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The VIP lease in force: under etcd (`LAZARUS_TEST_HA=1`) an etcd lease,
/// whole seconds and at least 2 s.
fn effective_lease(configured: Duration) -> Duration {
    if std::env::var("LAZARUS_TEST_HA").is_ok_and(|v| v == "1") {
        Duration::from_secs(configured.as_secs_f64().ceil().max(2.0) as u64)
    } else {
        configured
    }
}

fn run(s: Scenario) {
    let c = LzCluster::start(s.tag, &["a", "b"], &["cl"], &s.config);
    let spec = spec(c.dir.path(), s.standby);
    c.submit(&spec, &[]);
    let vip_key = if s.v6 {
        "2001:2::100/64"
    } else {
        "198.18.0.100/24"
    };
    let vip_ip = if s.v6 { VIP6 } else { VIP4 };
    let addr: SocketAddr = if s.v6 {
        format!("[{VIP6}]:8080")
    } else {
        format!("{VIP4}:8080")
    }
    .parse()
    .expect("addr");
    let hot = s.standby == "hot";
    let ready = c.wait(
        "kv running, VIP held by its primary",
        Duration::from_secs(30),
        |st| {
            cluster::serving(st, "kv", "kv-0", vip_key)
                .is_some_and(|(w, _)| !hot || !w["standby_checkpoint"].is_null())
        },
    );
    let w = cluster::worker(&ready, "kv", "kv-0").expect("worker");
    let old = w["primary"].as_str().expect("primary").to_string();
    let other = if old == "a" { "b" } else { "a" };
    if s.standby != "none" {
        assert_eq!(
            w["standby"].as_str(),
            Some(other),
            "standby on the other host: {w}"
        );
    }
    let v = cluster::vip(&ready, vip_key).expect("vip");
    assert!(
        v["lease_id"].is_u64() && v["lease_expires_in_ms"].is_u64(),
        "status shows the lease: {v}"
    );

    // Acknowledged writes before the fault.
    let before = c
        .bed
        .in_host("cl", move || {
            (0..30)
                .map(|i| {
                    (
                        format!("k{i}"),
                        format!("v{i}"),
                        put_acked(
                            addr,
                            &format!("k{i}"),
                            &format!("v{i}"),
                            Duration::from_secs(10),
                        ),
                    )
                })
                .collect::<Vec<_>>()
        })
        .join()
        .expect("client");
    assert!(
        before.iter().all(|(_, _, acked)| *acked),
        "writes before the fault: {before:?}\n{}",
        c.logs()
    );
    // An acknowledged delete survives too.
    let deleted = c
        .bed
        .in_host("cl", move || {
            http(addr, "DELETE", "/kv/k29", b"", Duration::from_secs(5))
                .map(|(s, _)| s)
                .ok()
        })
        .join()
        .expect("client");
    assert_eq!(deleted, Some(204), "DELETE k29");
    let before: Vec<_> = before.into_iter().filter(|(k, _, _)| k != "k29").collect();
    let epoch_before = cluster::job(&ready, "kv").expect("job")["epoch"]
        .as_u64()
        .expect("epoch");

    // Ballast: its killed process is then still being torn down when the
    // agent reports its exit from the exit word.
    let ballast = s.ballast_mib;
    let loaded = c
        .bed
        .in_host("cl", move || {
            // 8 writers at once (threads started in the client's namespace
            // stay in it); each write waits for its checkpoint.
            let writers: Vec<_> = (0..8)
                .map(|w| {
                    std::thread::spawn(move || {
                        let value = vec![b'b'; (1 << 20) - 1024];
                        (0..ballast)
                            .filter(|i| i % 8 == w)
                            .filter(|i| {
                                let path = format!("/kv/ballast{i}");
                                let put = http(addr, "PUT", &path, &value, Duration::from_secs(30));
                                !matches!(put, Ok((201 | 204, _)))
                            })
                            .count()
                    })
                })
                .collect();
            writers
                .into_iter()
                .map(|w| w.join().unwrap_or(1))
                .sum::<usize>()
        })
        .join()
        .expect("client");
    assert_eq!(loaded, 0, "ballast values not stored\n{}", c.logs());
    if ballast > 0 && hot {
        // The standby holds the loaded state before the fault (a promotion
        // then restores nothing, as checked below).
        let loaded_at = cluster::job(&c.status().expect("status"), "kv").expect("job")
            ["last_checkpoint"]
            .as_u64()
            .expect("a checkpoint");
        c.wait(
            "the hot standby followed the loaded state",
            Duration::from_secs(30),
            |st| {
                cluster::worker(st, "kv", "kv-0")
                    .and_then(|w| w["standby_checkpoint"].as_u64())
                    .is_some_and(|n| n >= loaded_at)
            },
        );
    }

    // A prober reads through the VIP every millisecond (bounded: 30 s).
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let prober = {
        let (stop, probes) = (stop.clone(), probes.clone());
        c.bed.in_host("cl", move || {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
                let ok = matches!(http(addr, "GET", "/kv/k0", b"", Duration::from_millis(100)), Ok((200, ref b)) if b == b"v0");
                probes.lock().expect("probes").push((Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // Watch who holds the VIP (host loss: never two holders).
    let holders: Arc<Mutex<Vec<(Instant, bool, bool)>>> = Arc::default();
    std::thread::sleep(Duration::from_millis(100));

    let fault_at = Instant::now();
    let killed = match s.fault {
        Fault::Kill => {
            let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&old));
            let pids = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0", &ip]);
            assert_eq!(pids.len(), 1, "one kv-0 process on {old}: {pids:?}");
            common::netns::ok("kill", &["-KILL", &pids[0].to_string()]);
            Some(pids[0])
        }
        Fault::LinkDown => {
            c.bed.link_down(&old);
            None
        }
    };
    let watch_until = Instant::now() + effective_lease(s.lease) * 3 + Duration::from_millis(1500);
    while Instant::now() < watch_until && s.fault == Fault::LinkDown {
        let (ha, hb) = (c.bed.holds("a", vip_ip), c.bed.holds("b", vip_ip));
        holders
            .lock()
            .expect("holders")
            .push((Instant::now(), ha, hb));
    }

    // Writes through the failover: each retried until acknowledged.
    let during = c
        .bed
        .in_host("cl", move || {
            (0..20)
                .map(|i| {
                    (
                        format!("w{i}"),
                        format!("x{i}"),
                        put_acked(
                            addr,
                            &format!("w{i}"),
                            &format!("x{i}"),
                            Duration::from_secs(20),
                        ),
                    )
                })
                .collect::<Vec<_>>()
        })
        .join()
        .expect("client");

    let after = c.wait(
        "kv running on the new primary with the VIP",
        Duration::from_secs(30),
        |st| {
            cluster::serving(st, "kv", "kv-0", vip_key).is_some_and(|(w, _)| w["primary"] == other)
        },
    );
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    prober.join().expect("prober");
    if let Some(pid) = killed.filter(|_| s.ballast_mib > 0) {
        // The agent saw the kill on the worker's exit word, while the
        // kernel was still ending the process, with its real status; the
        // recovery names the signal.
        let logs = c.logs();
        assert!(
            logs.contains(&format!(
                "pid {pid} killed by signal 9, reported from its exit word"
            )),
            "exit of {pid} reported from its exit word:\n{logs}"
        );
        let cause = cluster::job(&after, "kv").expect("job")["last_failure"].clone();
        assert!(
            cause
                .as_str()
                .is_some_and(|c| c.contains("killed by signal 9")),
            "the recovery names the signal: {cause}"
        );
    }

    // The client's kernel now sends VIP traffic to the new primary's MAC.
    let entry = c.bed.neighbour("cl", vip_ip);
    assert_eq!(
        entry.as_ref().map(|(m, _)| m.clone()),
        Some(c.bed.mac(other)),
        "client neighbour entry for {vip_ip}"
    );
    // Every acknowledged write is readable.
    assert!(
        during.iter().all(|(_, _, a)| *a),
        "writes during failover not acknowledged in time: {during:?}\n{}",
        c.logs()
    );
    let all: Vec<(String, String)> = before
        .iter()
        .chain(during.iter())
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    let reads = c
        .bed
        .in_host("cl", move || {
            all.into_iter()
                .map(|(k, v)| {
                    let got = http(
                        addr,
                        "GET",
                        &format!("/kv/{k}"),
                        b"",
                        Duration::from_secs(2),
                    );
                    (
                        k,
                        v,
                        got.map(|(s, b)| (s, String::from_utf8_lossy(&b).to_string()))
                            .map_err(|e| e.to_string()),
                    )
                })
                .collect::<Vec<_>>()
        })
        .join()
        .expect("client");
    for (k, v, got) in &reads {
        assert_eq!(
            got.as_ref().ok(),
            Some(&(200, v.clone())),
            "acknowledged write {k}={v} after failover"
        );
    }
    let gone = c
        .bed
        .in_host("cl", move || {
            http(addr, "GET", "/kv/k29", b"", Duration::from_secs(2))
                .map(|(s, _)| s)
                .ok()
        })
        .join()
        .expect("client");
    assert_eq!(
        gone,
        Some(404),
        "the acknowledged delete of k29 survived the failover"
    );
    // The recovery took a new epoch: the demoted attempt's commits are fenced.
    let epoch_after = cluster::job(&after, "kv").expect("job")["epoch"]
        .as_u64()
        .expect("epoch");
    assert!(
        epoch_after > epoch_before,
        "epoch {epoch_before} -> {epoch_after}"
    );
    // The service answered again after the fault; the outage is the
    // longest gap between two good reads around it.
    let probes = probes.lock().expect("probes").clone();
    assert!(
        probes
            .iter()
            .any(|(t, ok)| *t > fault_at + Duration::from_millis(50) && *ok),
        "no successful read through the VIP after the fault"
    );
    let good: Vec<Instant> = probes
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(t, _)| *t)
        .collect();
    let outage = good
        .windows(2)
        .filter(|w| w[1] > fault_at)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    eprintln!(
        "{}: client-visible outage {outage:?} ({} probes, {} good)",
        s.tag,
        probes.len(),
        good.len()
    );
    // Exactly one host holds the VIP.
    assert!(c.bed.holds(other, vip_ip), "{other} holds {vip_ip}");
    assert!(!c.bed.holds(&old, vip_ip), "{old} still holds {vip_ip}");
    let w = cluster::worker(&after, "kv", "kv-0").expect("worker");
    match s.standby {
        // Promotion restored from the local cache the standby kept current.
        "hot" => assert_eq!(
            w["restore_fetched_bytes"], 0,
            "promoted hot standby downloaded nothing: {w}"
        ),
        _ => assert!(
            w["restore_fetched_bytes"].as_u64().is_some_and(|b| b > 0),
            "a new process restored from storage: {w}"
        ),
    }
    // The worker process has no network capabilities; only the agent does.
    let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(other));
    let pids = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0", &ip]);
    assert!(!pids.is_empty(), "kv-0 runs on {other}");
    for pid in pids {
        let caps = cap_eff(pid);
        assert_eq!(
            caps & (1 << 12 | 1 << 13),
            0,
            "worker {pid} has CAP_NET_ADMIN/CAP_NET_RAW: {caps:#x}"
        );
    }
    if s.fault == Fault::LinkDown {
        // The isolated host dropped the VIP by its lease expiry, and from
        // then on never two holders (in fact never at any sample).
        let h = holders.lock().expect("holders").clone();
        let bound = effective_lease(s.lease) + Duration::from_millis(150);
        let old_is_a = old == "a";
        let dropped = h
            .iter()
            .find(|(_, ha, hb)| !(if old_is_a { *ha } else { *hb }))
            .map(|(t, _, _)| t.duration_since(fault_at));
        assert!(
            dropped.is_some_and(|d| d <= bound),
            "{old} removed the VIP {dropped:?} after the cut; bound {bound:?}"
        );
        let both: Vec<_> = h
            .iter()
            .filter(|(_, a, b)| *a && *b)
            .map(|(t, _, _)| t.duration_since(fault_at))
            .collect();
        assert!(
            both.is_empty(),
            "two hosts held the VIP at {both:?} after the cut ({} samples)",
            h.len()
        );
        eprintln!(
            "{}: {old} removed the VIP {dropped:?} after the cut ({} samples, never two holders)",
            s.tag,
            h.len()
        );
    }
    // LAZARUS_TEST_LOGS=1 prints the supervisor's and agents' logs.
    if std::env::var("LAZARUS_TEST_LOGS").is_ok() {
        eprintln!("{}", c.logs());
    }
    if s.stop {
        // A standby that dies is replaced (after a short backoff) and
        // follows again.
        let st = c.wait(
            "a new standby following on the old host",
            Duration::from_secs(30),
            |st| {
                cluster::worker(st, "kv", "kv-0").is_some_and(|w| {
                    w["standby"] == old.as_str() && !w["standby_checkpoint"].is_null()
                })
            },
        );
        let followed = cluster::worker(&st, "kv", "kv-0").expect("kv-0")["standby_checkpoint"]
            .as_u64()
            .expect("checkpoint");
        let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&old));
        let standby = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0", &ip]);
        assert_eq!(standby.len(), 1, "one standby process on {old}");
        common::netns::ok("kill", &["-KILL", &standby[0].to_string()]);
        c.wait(
            "the standby replaced and following",
            Duration::from_secs(30),
            |st| {
                cluster::worker(st, "kv", "kv-0").is_some_and(|w| {
                    w["standby_checkpoint"]
                        .as_u64()
                        .is_some_and(|n| n > followed)
                        && w["primary"] == other
                }) && !pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0", &ip])
                    .contains(&standby[0])
            },
        );
        let out = c.cli(&["stop", "kv"]);
        assert!(
            out.status.success(),
            "stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait("kv stopped, VIP released", Duration::from_secs(20), |st| {
            cluster::job(st, "kv").is_some_and(|j| j["state"] == "stopped")
                && cluster::vip(st, vip_key)
                    .is_some_and(|v| v["holder"].is_null() && v["assigned"].is_null())
        });
        let start = Instant::now();
        while (c.bed.holds("a", vip_ip) || c.bed.holds("b", vip_ip))
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !c.bed.holds("a", vip_ip) && !c.bed.holds("b", vip_ip),
            "a stopped job leaves no VIP"
        );
        let kv = |tag: &str| pids_with_env(tag, &["LAZARUS_WORKER=kv-0"]);
        while !kv(&c.bed.tag).is_empty() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            kv(&c.bed.tag).is_empty(),
            "a stopped job leaves no worker process"
        );
    }
}

#[test]
fn test_hot_standby_takes_over_after_sigkill_ipv4() {
    // The 256 MiB ballast loads both cores (its writers, the standby
    // following it, and after the kill a new standby restoring all of it),
    // beside the other tests of the suite. With the 100 ms lease and 400 ms
    // host timeout of `FAST` a supervisor starved for 100 ms once fenced
    // both agents mid-test: the lease doing its job, not what this test is
    // about. A SIGKILL failover does not wait for any lease, so this one
    // keeps fast heartbeats and gives the lease and host timeout 1 s.
    run(Scenario {
        stop: true,
        tag: "kvhot",
        standby: "hot",
        v6: false,
        fault: Fault::Kill,
        config: "heartbeat_interval = \"50ms\"\nhost_timeout = \"1s\"\n[lease]\nlength = \"1s\"\nrenew_every = \"100ms\"\ndrift_margin = \"50ms\"\n[garp]\ncount = 3\ndelay = \"5ms\"\n".into(),
        lease: Duration::from_secs(1),
        ballast_mib: 256,
    });
}

#[test]
fn test_host_loss_moves_vip_after_lease_expiry() {
    // The default 1 s lease: the isolated host drops the VIP by then, the
    // new holder gets it only after lease + drift margin.
    run(Scenario {
        stop: false,
        tag: "kvloss",
        standby: "hot",
        v6: false,
        fault: Fault::LinkDown,
        config: "heartbeat_interval = \"50ms\"\nhost_timeout = \"400ms\"\n".into(),
        lease: Duration::from_secs(1),
        ballast_mib: 0,
    });
}

#[test]
fn test_host_loss_with_100ms_lease() {
    run(Scenario {
        stop: false,
        tag: "kvloss1",
        standby: "hot",
        v6: false,
        fault: Fault::LinkDown,
        config: FAST.into(),
        lease: Duration::from_millis(100),
        ballast_mib: 0,
    });
}

#[test]
fn test_cold_standby_restores_from_storage() {
    run(Scenario {
        stop: false,
        tag: "kvcold",
        standby: "cold",
        v6: false,
        fault: Fault::Kill,
        config: FAST.into(),
        lease: Duration::from_millis(100),
        ballast_mib: 0,
    });
}

#[test]
fn test_no_standby_restarts_on_the_other_host() {
    run(Scenario {
        stop: false,
        tag: "kvnone",
        standby: "none",
        v6: false,
        fault: Fault::Kill,
        config: FAST.into(),
        lease: Duration::from_millis(100),
        ballast_mib: 0,
    });
}

#[test]
fn test_ipv6_vip_moves_with_unsolicited_na() {
    run(Scenario {
        stop: false,
        tag: "kvv6",
        standby: "hot",
        v6: true,
        fault: Fault::Kill,
        config: FAST.into(),
        lease: Duration::from_millis(100),
        ballast_mib: 0,
    });
}

/// With `garp.refresh`, the holder repeats its announcement while it holds
/// the VIP: a client entry pointing elsewhere is corrected without any
/// traffic. Without it (the control), the wrong entry stays.
#[test]
fn test_garp_refresh_repairs_a_wrong_client_entry() {
    for (refresh, tag) in [("100ms", "kvref"), ("0s", "kvnoref")] {
        let config = format!("{FAST}refresh = \"{refresh}\"\n");
        let c = LzCluster::start(tag, &["a", "b"], &["cl"], &config);
        let spec = spec(c.dir.path(), "hot");
        c.submit(&spec, &[]);
        let st = c.wait("kv running with its VIP", Duration::from_secs(30), |st| {
            cluster::vip(st, "198.18.0.100/24").is_some_and(|v| {
                v["holder"].is_string()
                    && cluster::worker(st, "kv", "kv-0").is_some_and(|w| w["running"] == true)
            })
        });
        let holder = cluster::vip(&st, "198.18.0.100/24").expect("vip")["holder"]
            .as_str()
            .expect("holder")
            .to_string();
        // Let the initial burst pass, then point the client elsewhere.
        std::thread::sleep(Duration::from_millis(1200));
        let wrong = "02:00:00:00:00:99";
        common::netns::ok(
            "ip",
            &[
                "-n",
                c.bed.ns("cl"),
                "neigh",
                "replace",
                VIP4,
                "lladdr",
                wrong,
                "dev",
                "eth0",
                "nud",
                "stale",
            ],
        );
        let start = Instant::now();
        let mut mac = None;
        while start.elapsed() < Duration::from_millis(1500) {
            mac = c.bed.neighbour("cl", VIP4).map(|(m, _)| m);
            if mac.as_deref() == Some(c.bed.mac(&holder).as_str()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if refresh == "0s" {
            assert_eq!(
                mac.as_deref(),
                Some(wrong),
                "without refresh nothing corrects the entry"
            );
        } else {
            assert_eq!(mac, Some(c.bed.mac(&holder)), "refresh corrected the entry");
            eprintln!(
                "refresh {refresh}: entry corrected {:?} after it was spoiled",
                start.elapsed()
            );
        }
    }
}

/// An agent stopped on purpose (SIGTERM, maintenance) releases its VIP
/// with a confirmation: the other host takes over without waiting for the
/// 1 s lease to run out.
#[test]
fn test_agent_shutdown_hands_over_without_lease_wait() {
    let config = "heartbeat_interval = \"50ms\"\nhost_timeout = \"400ms\"\n";
    let c = LzCluster::start("kvterm", &["a", "b"], &["cl"], config);
    c.submit(&spec(c.dir.path(), "hot"), &[]);
    let (_, old, other) = serving_with_standby(&c);
    let idx = c.agent_names.iter().position(|n| *n == old).expect("agent");
    let start = Instant::now();
    let mut agents = c.agents.iter().collect::<Vec<_>>();
    let pid = agents.remove(idx).pid();
    common::netns::ok("kill", &["-TERM", &pid.to_string()]);
    while !c.bed.holds(other, VIP4) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = start.elapsed();
    assert!(
        c.bed.holds(other, VIP4),
        "{other} took the VIP\n{}",
        c.logs()
    );
    assert!(!c.bed.holds(&old, VIP4), "{old} let the VIP go");
    assert!(
        took < Duration::from_millis(600),
        "handover took {took:?}: the 1 s lease was waited for\n{}",
        c.logs()
    );
    eprintln!("agent shutdown: VIP on {other} {took:?} after SIGTERM to {old}'s agent");
}

/// Captures, in host `client`'s namespace for `window`, every ARP frame
/// whose sender address is `vip`: arrival time and sender MAC. A raw
/// AF_PACKET socket (root); the loop is bounded in time and count.
fn capture_arp(
    c: &LzCluster,
    client: &str,
    vip: std::net::Ipv4Addr,
    window: Duration,
) -> std::thread::JoinHandle<Vec<(Instant, String)>> {
    c.bed.in_host(client, move || {
        let proto = (libc::ETH_P_ARP as u16).to_be() as i32;
        // SAFETY: plain socket calls on a descriptor this closure owns.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: `tv` outlives the call; the size is its size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let end = Instant::now() + window;
        let mut buf = [0u8; 2048];
        let mut seen = Vec::new();
        for _ in 0..1_000_000 {
            if Instant::now() >= end {
                break;
            }
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            // Ethernet header (14) + ARP: sender MAC at 22..28, sender IP at 28..32.
            if n < 42 || buf[28..32] != vip.octets() {
                continue;
            }
            let mac: Vec<String> = buf[22..28].iter().map(|b| format!("{b:02x}")).collect();
            seen.push((Instant::now(), mac.join(":")));
        }
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        seen
    })
}

#[test]
fn test_no_gratuitous_arp_leaves_a_host_after_it_released_the_vip() {
    // keepalived-like long bursts: 80 announcements 50 ms apart (4 s).
    let config = "heartbeat_interval = \"50ms\"\nhost_timeout = \"400ms\"\n[garp]\ncount = 80\ndelay = \"50ms\"\n";
    let c = LzCluster::start("kvgarp", &["a", "b"], &["cl"], config);
    c.submit(&spec(c.dir.path(), "hot"), &[]);
    let (_, old, other) = serving_with_standby(&c);
    // Fail over to `other`: it takes the VIP and starts a 4 s burst.
    let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&old));
    let pids = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0", &ip]);
    assert_eq!(pids.len(), 1, "one kv-0 process on {old}: {pids:?}");
    common::netns::ok("kill", &["-KILL", &pids[0].to_string()]);
    let start = Instant::now();
    while !c.bed.holds(other, VIP4) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        c.bed.holds(other, VIP4),
        "{other} took the VIP\n{}",
        c.logs()
    );
    // The job's control port speaks TLS: the new primary holds the cluster
    // CA, and a handshake against the port verifies the supervisor's
    // certificate with it (a plaintext port completes no handshake).
    let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(other));
    let pid = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0", &ip])[0];
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let var = |k: &str| {
        env.split(|b| *b == 0)
            .map(|kv| String::from_utf8_lossy(kv).to_string())
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
    };
    let ca = var("LAZARUS_CA").expect("workers get the cluster CA");
    let job_port: SocketAddr = var("LAZARUS_SUPERVISOR")
        .expect("addr")
        .parse()
        .expect("addr");
    let handshake = c
        .bed
        .in_host("cl", move || {
            use tokio_rustls::rustls;
            use tokio_rustls::rustls::pki_types::pem::PemObject as _;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls::pki_types::CertificateDer::pem_file_iter(&ca).expect("ca") {
                    roots.add(cert.expect("cert")).expect("root");
                }
                let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                let name =
                    rustls::pki_types::ServerName::try_from("supervisor.lazarus").expect("name");
                let tcp = tokio::net::TcpStream::connect(job_port)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                        .connect(name, tcp),
                )
                .await
                .map_err(|_| "timeout".to_string())?
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
        })
        .join()
        .expect("client");
    assert_eq!(
        handshake,
        Ok(()),
        "the job port speaks TLS with the supervisor's certificate"
    );
    let capture = capture_arp(
        &c,
        "cl",
        VIP4.parse().expect("ip"),
        Duration::from_millis(2500),
    );
    std::thread::sleep(Duration::from_millis(400));
    // Stop the job: `other` releases the VIP in the middle of its burst.
    let out = c.cli(&["stop", "kv"]);
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stop_at = Instant::now();
    while c.bed.holds(other, VIP4) && stop_at.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let released = Instant::now();
    assert!(
        !c.bed.holds(other, VIP4),
        "{other} released the VIP\n{}",
        c.logs()
    );
    let frames = capture.join().expect("capture");
    let mac = c.bed.mac(other);
    let before = frames
        .iter()
        .filter(|(t, m)| *m == mac && *t < released)
        .count();
    let after: Vec<Duration> = frames
        .iter()
        .filter(|(t, m)| *m == mac && *t > released + Duration::from_millis(30))
        .map(|(t, _)| t.duration_since(released))
        .collect();
    // Control: the capture sees the burst while the VIP is held (about 8
    // announcements in 400 ms, two ARP forms each).
    assert!(
        before >= 4,
        "the capture saw {other}'s burst: {before} frames\n{frames:?}"
    );
    assert!(
        after.is_empty(),
        "{} announcements from {other} after it released the VIP (first {:?} after)\n{}",
        after.len(),
        after.first(),
        c.logs()
    );
    eprintln!("{before} announcements from {other} while it held the VIP, none after its release");
}

/// An agent runs worker binaries only from its allowed directories and
/// holds VIPs only within its allowed prefixes, whoever asks; the job ends
/// with an error naming the path or the address. (Every other test runs
/// its agents with allow-lists that admit the job: the positive control.)
#[test]
fn test_agents_refuse_binaries_and_vips_outside_their_allow_lists() {
    for (tag, agent_config, expected) in [
        (
            "kvallowb",
            "allowed_binaries = [\"/usr/lib/nowhere\"]\n",
            "is outside this agent's allowed_binaries (/usr/lib/nowhere)",
        ),
        (
            "kvallowv",
            "allowed_vips = [\"198.19.0.0/24\"]\n",
            "VIP 198.18.0.100/24 is outside this agent's allowed_vips (198.19.0.0/24)",
        ),
    ] {
        let config = "heartbeat_interval = \"50ms\"\nhost_timeout = \"400ms\"\n";
        let c = LzCluster::start_with(tag, &["a", "b"], &[], config, agent_config);
        c.submit(&spec(c.dir.path(), "hot"), &[]);
        let st = c.wait("the job refused", Duration::from_secs(30), |st| {
            cluster::job(st, "kv").is_some_and(|j| j["state"] == "failed")
        });
        let j = cluster::job(&st, "kv").expect("job");
        let failure = j["failure"].as_str().unwrap_or_default();
        assert!(
            failure.contains("refused") && failure.contains(expected),
            "{j}\n{}",
            c.logs()
        );
        assert_eq!(j["restarts"], 0, "refusals are not retried: {j}");
        // Nothing of the job runs (its processes were killed: their exits
        // are reported after the job's state turns failed), and nobody
        // holds the VIP.
        let gone = Instant::now() + Duration::from_secs(5);
        while !pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0"]).is_empty()
            && Instant::now() < gone
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0"]).is_empty());
        assert!(!c.bed.holds("a", VIP4) && !c.bed.holds("b", VIP4));
    }
}

/// The rogue-agent story on the namespace LAN: a further host runs
/// `lazarus agent` with a certificate from another CA. The supervisor
/// refuses it at the handshake and logs why; it never becomes a host, is
/// never placed work and never holds the VIP, while the real agents (the
/// positive control) serve the job.
#[test]
fn test_a_rogue_agent_is_refused_at_the_first_step() {
    let config = "heartbeat_interval = \"50ms\"\nhost_timeout = \"400ms\"\n";
    let c = LzCluster::start("kvrogue", &["a", "b"], &["r"], config);
    let lazarus = cluster::bin_dir().join("lazarus");
    let lz = lazarus.to_str().expect("utf-8");
    let path = |p: &str| c.dir.path().join(p).to_str().expect("utf-8").to_string();
    for args in [
        vec!["ca", "init", &path("rogue-ca")],
        vec![
            "cert",
            "issue",
            "--ca",
            &path("rogue-ca"),
            "--role",
            "agent",
            "--name",
            "r",
            "--out",
            &path("rogue-r"),
        ],
    ] {
        let out = std::process::Command::new(lz)
            .args(&args)
            .output()
            .expect("lazarus");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rogue_log = c.dir.path().join("rogue.log");
    let _rogue = c.bed.spawn(
        "r",
        &lazarus,
        &[
            "agent",
            "--name",
            "r",
            "--supervisor",
            &c.addr,
            "--iface",
            "eth0",
            "--state-dir",
            &path("rogue-state"),
            "--tls",
            &path("rogue-r"),
        ],
        &[("LAZARUS_LOG", "info")],
        &rogue_log,
    );
    c.submit(&spec(c.dir.path(), "hot"), &[]);
    let (st, _, _) = serving_with_standby(&c);
    let hosts: Vec<&str> = st["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(hosts, vec!["a", "b"], "the rogue never became a host");
    let w = cluster::worker(&st, "kv", "kv-0").expect("worker");
    assert_ne!(w["primary"], "r");
    assert_ne!(w["standby"], "r");
    assert!(!c.bed.holds("r", VIP4));
    let sup_log = c.sup.as_ref().map(|p| p.log_text()).unwrap_or_default();
    let rogue_ip = c.bed.ip("r");
    assert!(
        sup_log.lines().any(|l| l.contains("connection refused")
            && l.contains(&rogue_ip)
            && l.contains("TLS handshake")),
        "the supervisor logs why it refused {rogue_ip}:\n{sup_log}"
    );
}
