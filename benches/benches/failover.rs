//! Failover benchmark: the client-visible outage of a service on a VIP, with
//! Lazarus and, as the baseline, keepalived moving the same VIP between the
//! same namespace hosts, measured by the same client in the same run.
//!
//!     cargo bench -p lazarus-benches --bench failover
//!
//! A client in its own namespace reads the VIP over HTTP every millisecond
//! (each probe bounded by 10 ms); the outage of a trial is the longest gap
//! between two good reads around the fault. Scenarios (`LAZARUS_BENCH_TRIALS`
//! trials each, default 20):
//! - Lazarus kv-service, SIGKILL of the primary worker, hot standby;
//! - the same with a cold standby;
//! - Lazarus, host loss (the primary host's cable cut), default 1 s lease;
//! - the same with a 100 ms lease;
//! - keepalived 2.2 (Debian package), VRRPv3 with advert_int 0.01 s, a
//!   responder on both hosts: process crash found by track_script (interval
//!   1 s, the default), and host loss. keepalived moves only the address;
//!   its responders are stateless. It also reports how long two hosts held
//!   the VIP after a host loss (Lazarus: never, asserted by the tests);
//! - Lazarus supervisor failover: two supervisors under a real etcd (2 s
//!   leadership lease), SIGKILL of the leader; the time until the new leader
//!   committed a checkpoint of the adopted job, and the client's longest
//!   read gap meanwhile. Anchors (published defaults, not measured here):
//!   Flink on Kubernetes, lease 15 s; Flink on ZooKeeper, session timeout
//!   60 s.
//!
//! - the hot standby SIGKILL rows with tiny, 64 MiB and 1 GiB of state
//!   (`LAZARUS_BENCH_ONLY=state` for just these), with the peak RSS of the
//!   primary and of the hot standby holding 1 GiB;
//! - active-active (`LAZARUS_BENCH_ONLY=active` for just these): kv
//!   requests/s through one VIP (active-passive) against two VIPs (two
//!   instances, same client load), and the outage of a host loss on the
//!   lost host's VIP and on the surviving one, beside keepalived with two
//!   VRRP instances (masters on different hosts).
//!
//! Needs root, iproute2 and keepalived (`apt-get install keepalived`); it
//! builds `lazarus` and `kv-service` for its own profile first.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{self, Ha, LzCluster};
use common::netns::{http, ok, parent, pids_with_env, Proc, Testbed};
use lazarus_benches::percentile;

const VIP: &str = "198.18.0.100";
const VIP_KEY: &str = "198.18.0.100/24";

/// A pause before trial `trial`'s fault, spread over one second, so that
/// periodic checks (keepalived's track_script, heartbeats) are hit at every
/// phase rather than at the harness's rhythm.
fn phase(trial: usize) -> Duration {
    Duration::from_millis((trial as u64 * 397) % 1000)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Reads the VIP every millisecond from the client host until dropped.
struct Prober {
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<(Instant, bool)>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(bed: &Testbed, client: &str, addr: SocketAddr) -> Prober {
        Prober::start_key(bed, client, addr, "k0", "v0")
    }

    /// Reads key `key` (expecting `value`) through `addr` every millisecond.
    fn start_key(bed: &Testbed, client: &str, addr: SocketAddr, key: &str, value: &str) -> Prober {
        let (path, want) = (format!("/kv/{key}"), value.as_bytes().to_vec());
        let stop = Arc::new(AtomicBool::new(false));
        let probes: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
        let (s, p) = (stop.clone(), probes.clone());
        let handle = bed.in_host(client, move || {
            let start = Instant::now();
            // Bounded: at most one hour of probing.
            while !s.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(3600) {
                let good = matches!(
                    http(addr, "GET", &path, b"", Duration::from_millis(10)),
                    Ok((200, ref b)) if *b == want
                );
                p.lock().expect("probes").push((Instant::now(), good));
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Prober {
            stop,
            probes,
            handle: Some(handle),
        }
    }

    /// Waits (bounded) for `n` good reads in a row after `since`.
    fn wait_good(&self, since: Instant, n: usize, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            let p = self.probes.lock().expect("probes");
            let tail = p
                .iter()
                .rev()
                .take_while(|(t, good)| *t > since && *good)
                .count();
            if tail >= n {
                return true;
            }
            drop(p);
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// The longest gap between two good reads from `from` on.
    fn outage(&self, from: Instant) -> Duration {
        let p = self.probes.lock().expect("probes");
        let good: Vec<Instant> = p.iter().filter(|(_, g)| *g).map(|(t, _)| *t).collect();
        good.windows(2)
            .filter(|w| w[1] > from)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of the service process.
    Kill,
    /// The primary host's link set down (carrier lost).
    LinkDown,
    /// The primary host cut off with its carrier up (its bridge port
    /// leaves the bridge): a partition.
    Partition,
    /// The service process hangs (SIGSTOP): alive, answering nothing.
    Hang,
}

/// Samples which of hosts a and b hold the VIP for `span`; returns how long
/// both did (sum of sample intervals with both).
fn both_holders(bed: &Testbed, span: Duration) -> Duration {
    let start = Instant::now();
    let mut both = Duration::ZERO;
    let mut last = Instant::now();
    while start.elapsed() < span {
        let (a, b) = (bed.holds("a", VIP), bed.holds("b", VIP));
        let now = Instant::now();
        if a && b {
            both += now.duration_since(last);
        }
        last = now;
    }
    both
}

fn kv_spec(dir: &Path, bins: &Path, standby: &str) -> PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/kv-service/job.toml"
    ))
    .expect("kv job.toml");
    let text = text
        .replace(
            "worker = \"kv-service\"",
            &format!("worker = \"{}\"", bins.join("kv-service").display()),
        )
        .replace("standby = \"hot\"", &format!("standby = \"{standby}\""));
    let path = dir.join(format!("kv-{standby}.toml"));
    std::fs::write(&path, text).expect("spec");
    path
}

/// Prints the peak and current RSS (from `/proc/<pid>/status`) of kv-0's
/// primary and hot standby processes beside the state size.
fn memory_line(tag: &str, state_mib: usize) {
    let kb = |status: &str, field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    for pid in pids_with_env(tag, &["LAZARUS_WORKER=kv-0"]) {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let standby = env.split(|b| *b == 0).any(|v| v == b"LAZARUS_STANDBY=1");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let (peak, now) = (kb(&status, "VmHWM:"), kb(&status, "VmRSS:"));
        println!(
            "  memory, {state_mib} MiB of kv state: {:<12} peak RSS {:>6} MiB ({:.2} x the state), now {:>6} MiB",
            if standby { "hot standby" } else { "primary" },
            peak / 1024,
            peak as f64 / 1024.0 / state_mib as f64,
            now / 1024
        );
    }
}

fn lazarus_trials(
    tag: &str,
    standby: &str,
    fault: Fault,
    config: &str,
    trials: usize,
    state_mib: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let c = LzCluster::start(tag, &["a", "b"], &["cl"], config);
    let bins = cluster::bin_dir();
    c.submit(&kv_spec(c.dir.path(), &bins, standby), &[]);
    let addr: SocketAddr = format!("{VIP}:8080").parse().expect("addr");
    let ready = |what: &str| {
        c.wait(what, Duration::from_secs(60), |s| {
            let alive = s["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().all(|h| h["alive"] == true));
            alive
                && cluster::serving(s, "kv", "kv-0", VIP_KEY).is_some_and(|(w, _)| {
                    !w["standby"].is_null()
                        && (standby != "hot" || !w["standby_checkpoint"].is_null())
                })
        })
    };
    ready("kv ready");
    let seeded = c
        .bed
        .in_host("cl", move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok((201 | 204, _)) =
                    http(addr, "PUT", "/kv/k0", b"v0", Duration::from_secs(1))
                {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        })
        .join()
        .expect("client");
    assert!(seeded, "could not write k0\n{}", c.logs());
    // Bulk state: `state_mib` values of 1 MiB - 1 KiB, each acknowledged
    // (so committed) before the trials start; 8 writers at once (threads
    // started in the client's namespace stay in it).
    let bulk = c
        .bed
        .in_host("cl", move || {
            let writers: Vec<_> = (0..8)
                .map(|w| {
                    std::thread::spawn(move || {
                        let value = vec![b'x'; (1 << 20) - 1024];
                        (0..state_mib).filter(|i| i % 8 == w).all(|i| {
                            matches!(
                                http(
                                    addr,
                                    "PUT",
                                    &format!("/kv/bulk{i}"),
                                    &value,
                                    Duration::from_secs(30)
                                ),
                                Ok((201 | 204, _))
                            )
                        })
                    })
                })
                .collect();
            writers.into_iter().all(|w| w.join().unwrap_or(false))
        })
        .join()
        .expect("client");
    assert!(bulk, "could not write the bulk state\n{}", c.logs());
    if standby == "hot" {
        // The trials measure a standby that follows: wait until it has
        // followed the checkpoint holding the bulk state (for 1 GiB,
        // seconds of copying and decoding that would otherwise overlap
        // the first trials).
        let st = ready("kv ready after the bulk state");
        let bulk_at = cluster::job(&st, "kv")
            .and_then(|j| j["last_checkpoint"].as_u64())
            .expect("a checkpoint holds the bulk state");
        c.wait(
            "the standby followed the bulk state",
            Duration::from_secs(120),
            |s| {
                cluster::worker(s, "kv", "kv-0")
                    .and_then(|w| w["standby_checkpoint"].as_u64())
                    .is_some_and(|n| n >= bulk_at)
            },
        );
        // And the disk done with it: the bulk's chunks and the standby's
        // cached copy (2 GiB at 1 GiB of state) are written back for tens
        // of seconds otherwise, and every commit's fsync waits behind them
        // (23-78 ms commits in the first trials, against 1.5 ms after).
        let flushed = Instant::now();
        ok("sync", &[]);
        eprintln!(
            "  {tag}: bulk state written back ({:.1} s)",
            flushed.elapsed().as_secs_f64()
        );
    }
    if state_mib >= 1024 {
        // Both processes' peak memory, from the kernel.
        memory_line(&c.bed.tag, state_mib);
    }
    let prober = Prober::start(&c.bed, "cl", addr);
    let mut outages = Vec::new();
    let mut two_holders = Vec::new();
    for trial in 0..trials {
        let st = ready("kv ready for the next trial");
        if trial > 0 {
            // The supervisor's own timing of the previous trial's recovery
            // (detection, drain, restore, connect): where a slow one went.
            let r = cluster::job(&st, "kv").map(|j| j["last_recovery"].to_string());
            eprintln!(
                "  {tag} trial {}: recovery {}",
                trial - 1,
                r.unwrap_or_default()
            );
        }
        let old = cluster::worker(&st, "kv", "kv-0").expect("kv-0")["primary"]
            .as_str()
            .expect("host")
            .to_string();
        assert!(
            prober.wait_good(Instant::now(), 50, Duration::from_secs(10)),
            "no steady reads before trial {trial}"
        );
        std::thread::sleep(phase(trial));
        let fault_at = Instant::now();
        match fault {
            Fault::Kill => {
                let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&old));
                let pids = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0", &ip]);
                assert_eq!(pids.len(), 1, "one kv-0 process on {old}");
                ok("kill", &["-KILL", &pids[0].to_string()]);
            }
            Fault::LinkDown => c.bed.link_down(&old),
            Fault::Partition => c.bed.partition(&old),
            Fault::Hang => unreachable!("the kv rows do not hang"),
        }
        let both = if fault == Fault::Partition {
            both_holders(&c.bed, Duration::from_secs(2))
        } else {
            Duration::ZERO
        };
        assert!(
            prober.wait_good(fault_at, 50, Duration::from_secs(30)),
            "{tag}: the service did not come back in trial {trial}\n{}",
            c.logs()
        );
        let outage = prober.outage(fault_at - Duration::from_millis(50));
        if outage > SLOW_TRIAL {
            // Where a slow trial went: the end of every process's log.
            eprintln!(
                "  {tag} trial {trial}: slow; the logs' last lines:\n{}",
                c.logs()
            );
        }
        outages.push(outage);
        two_holders.push(both);
        eprintln!(
            "  {tag} trial {trial}: outage {}, two holders {}",
            ms(outage),
            ms(both)
        );
        match fault {
            Fault::LinkDown => c.bed.link_up(&old),
            Fault::Partition => c.bed.heal(&old),
            Fault::Kill | Fault::Hang => {}
        }
    }
    (outages, two_holders)
}

/// An unmodified program on Lazarus (`kind = "process"`): this bench's
/// own responder, with a hot standby (already running, as with keepalived)
/// and an http health check every 100 ms (100 ms timeout, fall 2). A crash
/// is seen as the program's exit; a hang (SIGSTOP) by the check.
fn process_trials(tag: &str, fault: Fault, trials: usize) -> Vec<Duration> {
    let exe = std::env::current_exe().expect("bench executable");
    let agent_config = format!(
        "allowed_binaries = [\"{}\", \"{}\"]\nallowed_vips = [\"198.18.0.0/15\"]\n",
        cluster::bin_dir().display(),
        exe.parent().expect("deps").display()
    );
    let config = "heartbeat_interval = \"100ms\"\nhost_timeout = \"500ms\"\n";
    let c = LzCluster::start_with(tag, &["a", "b"], &["cl"], config, &agent_config);
    let spec = format!(
        r#"[job]
name = "svc"
heartbeat_interval = "100ms"
heartbeat_timeout = "2s"
[checkpoint]
interval = "200ms"
[restart]
max_attempts = 1000
backoff = "10ms"
max_backoff = "500ms"
[[operator]]
name = "svc"
kind = "process"
standby = "hot"
vip = "{VIP_KEY}"
port = 8080
[operator.process]
command = "{exe}"
args = ["--serve", "8080", "/dev/null"]
[operator.health]
kind = "http"
path = "/kv/k0"
interval = "100ms"
timeout = "100ms"
fall = 2
rise = 2
"#,
        exe = exe.display()
    );
    let path = c.dir.path().join("svc.toml");
    std::fs::write(&path, spec).expect("spec");
    c.submit(&path, &[]);
    let addr: SocketAddr = format!("{VIP}:8080").parse().expect("addr");
    let ready = |what: &str| {
        c.wait(what, Duration::from_secs(60), |s| {
            cluster::serving(s, "svc", "svc-0", VIP_KEY)
                .is_some_and(|(w, _)| !w["standby_checkpoint"].is_null())
        })
    };
    ready("the responder on its VIP with a hot standby");
    let prober = Prober::start(&c.bed, "cl", addr);
    let mut outages = Vec::new();
    for trial in 0..trials {
        let st = ready("the responder ready for the next trial");
        let old = cluster::worker(&st, "svc", "svc-0").expect("svc-0")["primary"]
            .as_str()
            .expect("host")
            .to_string();
        assert!(
            prober.wait_good(Instant::now(), 50, Duration::from_secs(10)),
            "no steady reads before trial {trial}"
        );
        // The program (not the worker around it) on the primary's host.
        let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&old));
        let shims = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=svc-0", &ip]);
        let program = pids_with_env(&c.bed.tag, &["LAZARUS_JOB=svc"])
            .into_iter()
            .find(|p| shims.contains(&parent(*p)))
            .expect("the responder's process on the primary host");
        std::thread::sleep(phase(trial));
        let fault_at = Instant::now();
        let signal = if fault == Fault::Hang {
            "-STOP"
        } else {
            "-KILL"
        };
        ok("kill", &[signal, &program.to_string()]);
        assert!(
            prober.wait_good(fault_at, 50, Duration::from_secs(30)),
            "{tag}: the service did not come back in trial {trial}\n{}",
            c.logs()
        );
        let outage = prober.outage(fault_at - Duration::from_millis(50));
        outages.push(outage);
        eprintln!("  {tag} trial {trial}: outage {}", ms(outage));
        // A hung program was stopped by its agent; make sure it is gone.
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &program.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
    outages
}

/// Supervisor failover: per trial, SIGKILL the leader supervisor; returns
/// (leader killed -> checkpoint committed by the new leader, the client's
/// longest read gap in the trial). The killed supervisor is started again
/// before the next trial.
fn supervisor_trials(trials: usize) -> (Vec<Duration>, Vec<Duration>) {
    let config = "heartbeat_interval = \"100ms\"\nhost_timeout = \"500ms\"\n[lease]\nlength = \"2s\"\nrenew_every = \"500ms\"\ndrift_margin = \"200ms\"\n";
    let ha = Ha {
        supervisors: 2,
        etcd_members: 1,
        lease: "2s",
        tarpit: false,
    };
    let mut c = LzCluster::start_ha("fbsup", ha, &["a", "b"], &["cl"], config);
    let bins = cluster::bin_dir();
    c.submit(&kv_spec(c.dir.path(), &bins, "hot"), &[]);
    let addr: SocketAddr = format!("{VIP}:8080").parse().expect("addr");
    let seeded = c
        .bed
        .in_host("cl", move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok((201 | 204, _)) =
                    http(addr, "PUT", "/kv/k0", b"v0", Duration::from_secs(1))
                {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        })
        .join()
        .expect("client");
    assert!(seeded, "could not write k0\n{}", c.logs());
    let prober = Prober::start(&c.bed, "cl", addr);
    let job = |s: &serde_json::Value, f: &str| {
        cluster::job(s, "kv").map_or(0, |j| j[f].as_u64().unwrap_or(0))
    };
    let mut resumed = Vec::new();
    let mut gaps = Vec::new();
    for trial in 0..trials {
        let st = c.wait(
            "a leader, both supervisors, kv running",
            Duration::from_secs(60),
            |s| {
                s["ha"]["leader"]["name"].is_string()
                    && s["ha"]["supervisors"]
                        .as_array()
                        .is_some_and(|m| m.len() == 2)
                    && cluster::serving(s, "kv", "kv-0", VIP_KEY).is_some()
            },
        );
        let leader = st["ha"]["leader"]["name"]
            .as_str()
            .expect("leader")
            .to_string();
        let ckpt = job(&st, "last_checkpoint");
        assert!(
            prober.wait_good(Instant::now(), 50, Duration::from_secs(10)),
            "no steady reads before trial {trial}"
        );
        std::thread::sleep(phase(trial));
        let from = Instant::now();
        c.supervisor_mut(&leader)
            .as_mut()
            .expect("leader process")
            .child
            .kill()
            .expect("SIGKILL the leader");
        c.wait("the new leader committing", Duration::from_secs(60), |s| {
            s["ha"]["leader"]["name"]
                .as_str()
                .is_some_and(|l| l != leader)
                && job(s, "last_checkpoint") > ckpt
        });
        let took = from.elapsed();
        std::thread::sleep(Duration::from_millis(200));
        let gap = prober.outage(from - Duration::from_millis(50));
        eprintln!(
            "  supervisor failover trial {trial}: checkpoint under the new leader after {}, longest read gap {}",
            ms(took),
            ms(gap)
        );
        resumed.push(took);
        gaps.push(gap);
        let p = c.spawn_supervisor(&leader);
        *c.supervisor_mut(&leader) = Some(p);
    }
    (resumed, gaps)
}

type Row = (String, Vec<Duration>, Vec<Duration>, String);

/// The active-active table: throughput, then the host-loss outages.
fn print_active(rows: &[Row], throughput: &[String]) {
    println!("\nactive-passive (one VIP) against active-active (two VIPs), same client load:");
    println!("\n| load | one VIP | two VIPs | ratio |\n| --- | --- | --- | --- |");
    for l in throughput {
        println!("{l}");
    }
    print_rows(rows);
}

fn print_rows(rows: &[Row]) {
    println!("\n| scenario | p50 | p99 | max | two VIP holders (max) | bounds |\n| --- | --- | --- | --- | --- | --- |");
    for (name, v, both, bound) in rows {
        println!(
            "| {name} | {} | {} | {} | {} | {bound} |",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(percentile(v, 1.0)),
            ms(percentile(both, 1.0))
        );
    }
}

/// `--serve PORT PIDFILE`: the stateless responder keepalived fails over.
fn serve(port: u16, pidfile: &str) {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind responder");
    std::fs::write(pidfile, std::process::id().to_string()).expect("pidfile");
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 << 10 {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nv0");
    }
}

struct Keepalived {
    // Drop order: processes, then the bed.
    procs: Vec<Proc>,
    responders: Vec<Option<Proc>>,
    bed: Testbed,
    dir: tempfile::TempDir,
}

impl Keepalived {
    fn responder(&self, host: &str) -> Proc {
        let pidfile = self.dir.path().join(format!("{host}.pid"));
        let exe = std::env::current_exe().expect("bench executable");
        self.bed.spawn(
            host,
            &exe,
            &["--serve", "8080", pidfile.to_str().expect("utf-8")],
            &[],
            &self.dir.path().join(format!("responder-{host}.log")),
        )
    }

    /// Starts keepalived (VRRP only, in the foreground) on `host` with `conf`.
    fn start(&mut self, host: &str, conf: &str) {
        let path = self.dir.path().join(format!("keepalived-{host}.conf"));
        std::fs::write(&path, conf).expect("conf");
        let d = self.dir.path();
        let args = [
            "--dont-fork",
            "--log-console",
            "--vrrp",
            "-f",
            path.to_str().expect("utf-8"),
            "-p",
            &format!("{}/{host}-main.pid", d.display()),
            "-r",
            &format!("{}/{host}-vrrp.pid", d.display()),
            "-c",
            &format!("{}/{host}-checkers.pid", d.display()),
        ];
        let p = self.bed.spawn(
            host,
            Path::new("/usr/sbin/keepalived"),
            &args,
            &[],
            &d.join(format!("keepalived-{host}.log")),
        );
        self.procs.push(p);
    }

    fn holders(&self) -> (bool, bool) {
        (self.bed.holds("a", VIP), self.bed.holds("b", VIP))
    }
}

/// keepalived's track_script: `kill -0` of the responder (a crash only),
/// or an HTTP request through bash's /dev/tcp bounded by `timeout` (crash
/// and hang), every `interval` seconds, `fall` failures.
#[derive(Clone, Copy)]
struct Track {
    interval: &'static str,
    fall: u32,
    http: bool,
}

const TRACK_PID_1S: Track = Track {
    interval: "1",
    fall: 1,
    http: false,
};

fn keepalived_trials(fault: Fault, trials: usize, track: Track) -> (Vec<Duration>, Vec<Duration>) {
    let tag = match (fault, track.http) {
        (Fault::Kill, false) => "kak",
        (Fault::Kill, true) => "kck",
        (Fault::Hang, _) => "khk",
        (Fault::LinkDown, _) => "kal",
        (Fault::Partition, _) => "kap",
    };
    let bed = Testbed::new(tag, &["a", "b", "cl"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut k = Keepalived {
        procs: Vec::new(),
        responders: vec![None, None],
        bed,
        dir,
    };
    for (i, host) in ["a", "b"].iter().enumerate() {
        k.responders[i] = Some(k.responder(host));
        let pidfile = k.dir.path().join(format!("{host}.pid"));
        let conf = format!(
            r#"global_defs {{
    router_id ka_{host}
    vrrp_version 3
    enable_script_security
    script_user root
    vrrp_garp_master_repeat 3
}}
vrrp_script chk_service {{
    script "{script}"
    interval {interval}
    timeout {interval}
    fall {fall}
    rise 1
}}
vrrp_instance VI_1 {{
    state BACKUP
    nopreempt
    interface eth0
    virtual_router_id 51
    priority {prio}
    advert_int 0.01
    virtual_ipaddress {{
        {VIP_KEY} dev eth0
    }}
    track_script {{
        chk_service
    }}
}}
"#,
            script = if track.http {
                // The same probe a client makes, killed by keepalived at
                // its `timeout` (a hang).
                let check = k.dir.path().join("check.sh");
                std::fs::write(
                    &check,
                    "#!/bin/bash\nexec 3<>/dev/tcp/127.0.0.1/8080 || exit 1\nprintf 'GET /kv/k0 HTTP/1.0\\r\\n\\r\\n' >&3\nhead -c 12 <&3 | grep -q 200\n",
                )
                .expect("check script");
                ok("chmod", &["755", check.to_str().expect("utf-8")]);
                check.display().to_string()
            } else {
                format!("/bin/sh -c 'kill -0 $(cat {})'", pidfile.display())
            },
            interval = track.interval,
            fall = track.fall,
            prio = if i == 0 { 150 } else { 100 },
        );
        k.start(host, &conf);
    }
    let single = |k: &Keepalived, limit: Duration| {
        let start = Instant::now();
        while start.elapsed() < limit {
            let (a, b) = k.holders();
            if a != b {
                return Some(if a { "a" } else { "b" });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    };
    single(&k, Duration::from_secs(20)).expect("keepalived elected a master");
    let addr: SocketAddr = format!("{VIP}:8080").parse().expect("addr");
    let prober = Prober::start(&k.bed, "cl", addr);
    let mut outages = Vec::new();
    let mut two_holders = Vec::new();
    let mut stale_after_heal = 0;
    for trial in 0..trials {
        // A stable single master, serving.
        let master = single(&k, Duration::from_secs(20))
            .expect("one master")
            .to_string();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            prober.wait_good(Instant::now(), 50, Duration::from_secs(10)),
            "keepalived: no steady reads before trial {trial}"
        );
        let idx = if master == "a" { 0 } else { 1 };
        std::thread::sleep(phase(trial));
        let fault_at = Instant::now();
        match fault {
            Fault::Kill => {
                if let Some(mut r) = k.responders[idx].take() {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                }
            }
            Fault::Hang => {
                if let Some(r) = &k.responders[idx] {
                    ok("kill", &["-STOP", &r.pid().to_string()]);
                }
            }
            Fault::LinkDown => k.bed.link_down(&master),
            Fault::Partition => k.bed.partition(&master),
        }
        let both = if fault == Fault::Partition {
            both_holders(&k.bed, Duration::from_secs(2))
        } else {
            Duration::ZERO
        };
        assert!(
            prober.wait_good(fault_at, 50, Duration::from_secs(30)),
            "keepalived: no failover in trial {trial}"
        );
        let outage = prober.outage(fault_at - Duration::from_millis(50));
        outages.push(outage);
        two_holders.push(both);
        match fault {
            Fault::LinkDown => k.bed.link_up(&master),
            Fault::Partition => {
                k.bed.heal(&master);
                // After the split brain resolves, the winner may not announce
                // again and the client can keep the loser's MAC: flush it
                // (counted), so that the next trial starts clean.
                let healed = Instant::now();
                if !prober.wait_good(healed, 50, Duration::from_secs(5)) {
                    stale_after_heal += 1;
                    ok("ip", &["-n", k.bed.ns("cl"), "neigh", "flush", "all"]);
                }
            }
            Fault::Kill | Fault::Hang => {
                if let Some(mut r) = k.responders[idx].take() {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                }
                k.responders[idx] = Some(k.responder(&master));
                // Let its track script see the service again.
                std::thread::sleep(Duration::from_millis(1500));
            }
        }
        eprintln!(
            "  keepalived {tag} trial {trial}: outage {}, two holders {}",
            ms(outage),
            ms(both)
        );
    }
    drop(prober);
    if stale_after_heal > 0 {
        println!("keepalived {tag}: after {stale_after_heal} of {trials} healed partitions the client still reached the losing host 5 s later (its neighbour entry was flushed)");
    }
    (outages, two_holders)
}

/// An unmodified program behind a VIP, crash and hang: Lazarus (process
/// operator, hot standby, http check 100 ms / fall 2) against keepalived
/// with track_script (the same HTTP probe, every 1 s: its default and its
/// minimum).
fn process_rows(rows: &mut Vec<Row>, trials: usize) {
    rows.push((
        "lazarus process crash (process operator, hot standby)".into(),
        process_trials("fpk", Fault::Kill, trials),
        Vec::new(),
        "exit seen at once by the worker around it; no check needed".into(),
    ));
    rows.push((
        "lazarus process hang (SIGSTOP), http check 100 ms, fall 2".into(),
        process_trials("fph", Fault::Hang, trials),
        Vec::new(),
        "2 failed checks of 100 ms, then failover".into(),
    ));
    // keepalived 2.2 refuses a vrrp_script interval or timeout under 1 s
    // ("must be between 1 and 4294"): 1 s is both its default and the
    // fastest it can be tuned to; fall 1 is the fastest reaction.
    let http_1s = Track {
        interval: "1",
        fall: 1,
        http: true,
    };
    for (name, fault, track, bound) in [
        (
            "keepalived process crash, track_script http",
            Fault::Kill,
            http_1s,
            "interval 1 s (default and minimum), timeout 1 s, fall 1",
        ),
        (
            "keepalived process hang, track_script http",
            Fault::Hang,
            http_1s,
            "interval 1 s (default and minimum), timeout 1 s, fall 1",
        ),
    ] {
        let (v, both) = keepalived_trials(fault, trials, track);
        rows.push((name.to_string(), v, both, bound.to_string()));
    }
}

fn build_binaries() {
    let exe = std::env::current_exe().expect("bench executable");
    let release = exe.components().any(|c| c.as_os_str() == "release");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut args = vec!["build", "-q", "-p", "lazarus", "-p", "kv-service"];
    if release {
        args.push("--release");
    }
    let status = std::process::Command::new(cargo)
        .args(&args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("cargo build");
    assert!(status.success(), "building lazarus and kv-service failed");
}

const VIP_B: &str = "198.18.0.101";

/// The kv job active-active: two instances, one VIP each, no standby, back
/// to their first host 1 s after it returns.
fn kv_active_spec(dir: &Path, bins: &Path) -> PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/kv-service/job.toml"
    ))
    .expect("kv job.toml")
    .replace(
        "worker = \"kv-service\"",
        &format!("worker = \"{}\"", bins.join("kv-service").display()),
    )
    .replace("parallelism = 1", "parallelism = 2")
    .replace("standby = \"hot\"", "standby = \"none\"\nfailback = \"1s\"")
    .replace(
        "vip = \"198.18.0.100/24\"\nvip6 = \"2001:2::100/64\"",
        "vips = [\"198.18.0.100/24\", \"198.18.0.101/24\"]",
    );
    assert!(
        text.contains("vips = ["),
        "the kv job.toml changed: update this bench"
    );
    let path = dir.join("kv-active.toml");
    std::fs::write(&path, text).expect("spec");
    path
}

/// The kv job's key groups (its job.toml), to pick keys each instance owns.
const KV_KEY_GROUPS: u32 = 16;

/// The host holding `vip`, from a status.
fn holder(s: &serde_json::Value, vip: &str) -> Option<String> {
    cluster::vip(s, vip).and_then(|v| v["holder"].as_str().map(str::to_string))
}

/// The first key `probe<i>` that instance `index` of 2 owns.
fn key_owned_by(index: u32) -> String {
    (0..)
        .map(|i| format!("probe{i}"))
        .find(|k| {
            let g = lazarus_sdk::key_group(k.as_bytes(), KV_KEY_GROUPS);
            lazarus_sdk::group_owner(g, KV_KEY_GROUPS, 2) == index
        })
        .expect("some key")
}

/// Requests per second from `threads` clients in host `cl` for `span`,
/// spread over `addrs` (GETs of `keys`, or PUTs of them when `write`).
fn throughput(
    bed: &Testbed,
    addrs: &[SocketAddr],
    keys: &[String],
    span: Duration,
    threads: usize,
    write: bool,
) -> f64 {
    let clients: Vec<_> = (0..threads)
        .map(|t| {
            let (addrs, keys) = (addrs.to_vec(), keys.to_vec());
            bed.in_host("cl", move || {
                let start = Instant::now();
                let mut ok = 0u64;
                let mut i = t;
                while start.elapsed() < span {
                    let addr = addrs[i % addrs.len()];
                    let path = format!("/kv/{}", keys[i % keys.len()]);
                    let r = if write {
                        http(addr, "PUT", &path, b"w", Duration::from_secs(2))
                    } else {
                        http(addr, "GET", &path, b"", Duration::from_secs(2))
                    };
                    ok += u64::from(matches!(r, Ok((200 | 201 | 204, _))));
                    i += threads;
                }
                ok
            })
        })
        .collect();
    let total: u64 = clients.into_iter().map(|c| c.join().expect("client")).sum();
    total as f64 / span.as_secs_f64()
}

/// Writes `keys` (each acknowledged) through `addr`.
fn preload(bed: &Testbed, addr: SocketAddr, keys: &[String]) {
    let keys = keys.to_vec();
    let ok = bed
        .in_host("cl", move || {
            keys.iter().all(|k| {
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(20) {
                    let body = format!("v-{k}");
                    if let Ok((201 | 204, _)) = http(
                        addr,
                        "PUT",
                        &format!("/kv/{k}"),
                        body.as_bytes(),
                        Duration::from_secs(2),
                    ) {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                false
            })
        })
        .join()
        .expect("client");
    assert!(ok, "could not preload the keys");
}

/// Active-active against active-passive and keepalived with two VRRP
/// instances: kv throughput through one VIP and through two with the same
/// client load, and the outage of a host loss on the lost VIP and on the
/// surviving one. Returns the throughput lines.
fn active_rows(rows: &mut Vec<Row>, trials: usize) -> Vec<String> {
    // The fastest settings of the active-passive host-loss row, so the two
    // shapes are compared at the same detection speed.
    let fast = "heartbeat_interval = \"10ms\"\nhost_timeout = \"40ms\"\n[lease]\nlength = \"40ms\"\nrenew_every = \"10ms\"\ndrift_margin = \"10ms\"\n";
    let span = if trials < 5 {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(4)
    };
    let threads = 8;
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let a: SocketAddr = format!("{VIP}:8080").parse().expect("addr");
    let b: SocketAddr = format!("{VIP_B}:8080").parse().expect("addr");
    let bins = cluster::bin_dir();
    let mut lines = Vec::new();

    // Active-passive: one primary (hot standby), one VIP.
    let (ap_read, ap_write) = {
        let c = LzCluster::start("aap", &["a", "b"], &["cl"], fast);
        c.submit(&kv_spec(c.dir.path(), &bins, "hot"), &[]);
        c.wait("kv serving", Duration::from_secs(60), |s| {
            cluster::serving(s, "kv", "kv-0", VIP_KEY).is_some()
        });
        preload(&c.bed, a, &keys);
        (
            throughput(&c.bed, &[a], &keys, span, threads, false),
            throughput(&c.bed, &[a], &keys, span, threads, true),
        )
    };
    // Active-active: two primaries on two hosts, two VIPs, the same load
    // spread over both (half the requests are forwarded to the owner).
    let c = LzCluster::start("aaa", &["a", "b"], &["cl"], fast);
    c.submit(&kv_active_spec(c.dir.path(), &bins), &[]);
    let spread = |s: &serde_json::Value| {
        cluster::serving(s, "kv", "kv-0", VIP_KEY).is_some()
            && cluster::serving(s, "kv", "kv-1", "198.18.0.101/24").is_some()
            && holder(s, VIP_KEY) != holder(s, "198.18.0.101/24")
    };
    let st = c.wait("both instances serving", Duration::from_secs(60), spread);
    preload(&c.bed, a, &keys);
    let aa_read = throughput(&c.bed, &[a, b], &keys, span, threads, false);
    let aa_write = throughput(&c.bed, &[a, b], &keys, span, threads, true);
    lines.push(format!(
        "| reads (GET, {threads} clients, new connection per request) | {ap_read:.0} req/s | {aa_read:.0} req/s | {:.2}x |",
        aa_read / ap_read.max(1e-9)
    ));
    lines.push(format!(
        "| writes (PUT, acknowledged after commit) | {ap_write:.0} req/s | {aa_write:.0} req/s | {:.2}x |",
        aa_write / ap_write.max(1e-9)
    ));

    // Host loss of kv-0's host, every trial from the spread layout (the
    // instance fails back 1 s after its host returns).
    let home = holder(&st, VIP_KEY).expect("holder");
    let (k0, k1) = (key_owned_by(0), key_owned_by(1));
    preload(&c.bed, a, &[k0.clone(), k1.clone()]);
    let lost_probe = Prober::start_key(&c.bed, "cl", a, &k0, &format!("v-{k0}"));
    let kept_probe = Prober::start_key(&c.bed, "cl", b, &k1, &format!("v-{k1}"));
    let (mut lost, mut kept) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        c.wait("spread over both hosts", Duration::from_secs(60), |s| {
            spread(s) && holder(s, VIP_KEY).as_deref() == Some(home.as_str())
        });
        assert!(
            lost_probe.wait_good(Instant::now(), 50, Duration::from_secs(20))
                && kept_probe.wait_good(Instant::now(), 50, Duration::from_secs(20)),
            "no steady reads before trial {trial}"
        );
        std::thread::sleep(phase(trial));
        let fault_at = Instant::now();
        c.bed.link_down(&home);
        assert!(
            lost_probe.wait_good(fault_at, 50, Duration::from_secs(30)),
            "active-active: the lost VIP did not come back in trial {trial}\n{}",
            c.logs()
        );
        let from = fault_at - Duration::from_millis(50);
        lost.push(lost_probe.outage(from));
        kept.push(kept_probe.outage(from));
        eprintln!(
            "  active-active trial {trial}: lost VIP outage {}, surviving VIP longest gap {}",
            ms(*lost.last().expect("pushed")),
            ms(*kept.last().expect("pushed"))
        );
        c.bed.link_up(&home);
    }
    drop((lost_probe, kept_probe));
    // How each loss was recovered: inside the survivor's process or not.
    let takeovers = c
        .status()
        .ok()
        .and_then(|s| cluster::job(&s, "kv").and_then(|j| j["takeovers"].as_u64()))
        .unwrap_or(0);
    rows.push((
        "lazarus active-active host loss: the lost host's VIP".into(),
        lost,
        Vec::new(),
        format!("two kv instances, no standby; heartbeat 10 ms, host timeout 40 ms, lease 40 ms + 10 ms; the lost share taken over inside the survivor's process in {takeovers} of {trials} trials"),
    ));
    rows.push((
        "lazarus active-active host loss: the surviving VIP (longest gap)".into(),
        kept,
        Vec::new(),
        "region failover: the surviving instance keeps running".into(),
    ));
    drop(c);
    let (lost, kept) = keepalived_active_trials(trials);
    rows.push((
        "keepalived two VRRP instances, host loss: the lost host's VIP".into(),
        lost,
        Vec::new(),
        "VI_1 master on a, VI_2 master on b, advert 0.01 s, preempt_delay 1 s; stateless responders".into(),
    ));
    rows.push((
        "keepalived two VRRP instances, host loss: the surviving VIP (longest gap)".into(),
        kept,
        Vec::new(),
        "the other instance's master is not involved".into(),
    ));
    lines
}

/// keepalived with two VRRP instances (one VIP each, masters on different
/// hosts), stateless responders on both: the outage on each VIP when host
/// a (VIP 1's master) loses its link.
fn keepalived_active_trials(trials: usize) -> (Vec<Duration>, Vec<Duration>) {
    let bed = Testbed::new("kaa", &["a", "b", "cl"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut k = Keepalived {
        procs: Vec::new(),
        responders: vec![None, None],
        bed,
        dir,
    };
    for (i, host) in ["a", "b"].iter().enumerate() {
        k.responders[i] = Some(k.responder(host));
        let (p1, p2) = if i == 0 { (150, 100) } else { (100, 150) };
        let conf = format!(
            r#"global_defs {{
    router_id kaa_{host}
    vrrp_version 3
    vrrp_garp_master_repeat 3
}}
vrrp_instance VI_1 {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {p1}
    advert_int 0.01
    preempt_delay 1
    virtual_ipaddress {{
        {VIP_KEY} dev eth0
    }}
}}
vrrp_instance VI_2 {{
    state BACKUP
    interface eth0
    virtual_router_id 52
    priority {p2}
    advert_int 0.01
    preempt_delay 1
    virtual_ipaddress {{
        {VIP_B}/24 dev eth0
    }}
}}
"#
        );
        k.start(host, &conf);
    }
    let spread = |k: &Keepalived, limit: Duration| {
        let start = Instant::now();
        while start.elapsed() < limit {
            let (a1, b1) = (k.bed.holds("a", VIP), k.bed.holds("b", VIP));
            let (a2, b2) = (k.bed.holds("a", VIP_B), k.bed.holds("b", VIP_B));
            if a1 && !b1 && b2 && !a2 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    let a: SocketAddr = format!("{VIP}:8080").parse().expect("addr");
    let b: SocketAddr = format!("{VIP_B}:8080").parse().expect("addr");
    let lost_probe = Prober::start(&k.bed, "cl", a);
    let kept_probe = Prober::start(&k.bed, "cl", b);
    let (mut lost, mut kept) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        assert!(
            spread(&k, Duration::from_secs(30)),
            "keepalived: the two masters are not on a and b before trial {trial}"
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            lost_probe.wait_good(Instant::now(), 50, Duration::from_secs(10))
                && kept_probe.wait_good(Instant::now(), 50, Duration::from_secs(10)),
            "keepalived: no steady reads before trial {trial}"
        );
        std::thread::sleep(phase(trial));
        let fault_at = Instant::now();
        k.bed.link_down("a");
        assert!(
            lost_probe.wait_good(fault_at, 50, Duration::from_secs(30)),
            "keepalived: no failover in trial {trial}"
        );
        let from = fault_at - Duration::from_millis(50);
        lost.push(lost_probe.outage(from));
        kept.push(kept_probe.outage(from));
        eprintln!(
            "  keepalived two instances trial {trial}: lost VIP outage {}, surviving VIP longest gap {}",
            ms(*lost.last().expect("pushed")),
            ms(*kept.last().expect("pushed"))
        );
        k.bed.link_up("a");
    }
    (lost, kept)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        let port = args
            .get(i + 1)
            .and_then(|p| p.parse().ok())
            .expect("--serve PORT PIDFILE");
        serve(port, args.get(i + 2).expect("--serve PORT PIDFILE"));
        return;
    }
    let trials: usize = std::env::var("LAZARUS_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    build_binaries();
    assert!(
        Path::new("/usr/sbin/keepalived").exists(),
        "the baseline needs keepalived: apt-get install keepalived"
    );
    let default = "heartbeat_interval = \"100ms\"\nhost_timeout = \"500ms\"\n";
    let fast = "heartbeat_interval = \"50ms\"\nhost_timeout = \"400ms\"\n[lease]\nlength = \"100ms\"\nrenew_every = \"25ms\"\ndrift_margin = \"50ms\"\n";
    let fastest = "heartbeat_interval = \"10ms\"\nhost_timeout = \"40ms\"\n[lease]\nlength = \"40ms\"\nrenew_every = \"10ms\"\ndrift_margin = \"10ms\"\n";
    println!("failover: client-visible outage, {trials} trials each (probe every 1 ms, 10 ms probe timeout)");
    let scenarios: Vec<(&str, &str, &str, Fault, &str, &str, usize)> = vec![
        (
            "lazarus SIGKILL, hot standby",
            "fbh",
            "hot",
            Fault::Kill,
            default,
            "exit seen at once; no lease wait (release confirmed)",
            0,
        ),
        (
            "lazarus SIGKILL, cold standby",
            "fbc",
            "cold",
            Fault::Kill,
            default,
            "exit seen at once; no lease wait; restore from storage",
            0,
        ),
        (
            "lazarus SIGKILL, hot standby, 64 MiB state",
            "fbh64",
            "hot",
            Fault::Kill,
            default,
            "promoted standby restores from its local cache",
            64,
        ),
        (
            "lazarus SIGKILL, hot standby, 1 GiB state",
            "fbh1g",
            "hot",
            Fault::Kill,
            default,
            "promoted standby holds the state decoded (not in the smoke run)",
            1024,
        ),
        (
            "lazarus SIGKILL, cold standby, 64 MiB state",
            "fbc64",
            "cold",
            Fault::Kill,
            default,
            "new process downloads 64 MiB from the store (file://)",
            64,
        ),
        (
            "lazarus host loss, 1 s lease",
            "fbl",
            "hot",
            Fault::LinkDown,
            default,
            "heartbeat 100 ms, host timeout 500 ms; lease 1 s + 200 ms margin",
            0,
        ),
        (
            "lazarus host loss, 100 ms lease",
            "fbf",
            "hot",
            Fault::LinkDown,
            fast,
            "heartbeat 50 ms, host timeout 400 ms; lease 100 ms + 50 ms margin",
            0,
        ),
        (
            "lazarus host loss, 40 ms lease",
            "fbx",
            "hot",
            Fault::LinkDown,
            fastest,
            "heartbeat 10 ms, host timeout 40 ms; lease 40 ms + 10 ms margin",
            0,
        ),
        (
            "lazarus partition, 40 ms lease",
            "fbp",
            "hot",
            Fault::Partition,
            fastest,
            "as above; carrier stays up",
            0,
        ),
    ];
    let mut rows = Vec::new();
    // LAZARUS_BENCH_ONLY=supervisor: just the supervisor failover rows;
    // LAZARUS_BENCH_ONLY=process: just the unmodified-program rows;
    // LAZARUS_BENCH_ONLY=state: just the hot standby SIGKILL rows (tiny,
    // 64 MiB and 1 GiB of state).
    let only = std::env::var("LAZARUS_BENCH_ONLY").unwrap_or_default();
    let only_supervisor = only == "supervisor";
    if only == "active" {
        let lines = active_rows(&mut rows, trials);
        print_active(&rows, &lines);
        return;
    }
    if only == "state" {
        for (name, tag, standby, fault, config, bound, state_mib) in scenarios {
            if fault != Fault::Kill || standby != "hot" {
                continue;
            }
            let (v, both) = lazarus_trials(tag, standby, fault, config, trials, state_mib);
            rows.push((name.to_string(), v, both, bound.to_string()));
        }
        print_rows(&rows);
        return;
    }
    if only.is_empty() || only == "process" {
        process_rows(&mut rows, trials);
        if only == "process" {
            print_rows(&rows);
            return;
        }
    }
    let (resumed, gaps) = supervisor_trials(trials);
    rows.push((
        "lazarus supervisor failover: leader SIGKILL -> checkpoint by the new leader".to_string(),
        resumed,
        Vec::new(),
        "etcd, 2 s leadership lease (Flink: 15 s Kubernetes lease, 60 s ZooKeeper session)"
            .to_string(),
    ));
    rows.push((
        "lazarus supervisor failover: client's longest read gap".to_string(),
        gaps,
        Vec::new(),
        "goal: no outage (reads every 1 ms, 10 ms timeout)".to_string(),
    ));
    if only_supervisor {
        print_rows(&rows);
        return;
    }
    for (name, tag, standby, fault, config, bound, state_mib) in scenarios {
        if state_mib > 64 && trials == 1 {
            println!("  {name}: not run in the smoke run (1 trial); cargo bench runs it");
            continue;
        }
        let (v, both) = lazarus_trials(tag, standby, fault, config, trials, state_mib);
        rows.push((name.to_string(), v, both, bound.to_string()));
    }
    for (name, fault, bound) in [
        (
            "keepalived process crash",
            Fault::Kill,
            "track_script interval 1 s (default), advert 0.01 s",
        ),
        (
            "keepalived host loss",
            Fault::LinkDown,
            "advert 0.01 s (master down after ≈ 3 adverts)",
        ),
        (
            "keepalived partition",
            Fault::Partition,
            "advert 0.01 s; carrier stays up",
        ),
    ] {
        let (v, both) = keepalived_trials(fault, trials, TRACK_PID_1S);
        rows.push((name.to_string(), v, both, bound.to_string()));
    }
    let mut active = Vec::new();
    let lines = active_rows(&mut active, trials);
    print_rows(&rows);
    print_active(&active, &lines);
    let p50 = |name: &str| {
        let row = rows.iter().find(|r| r.0 == name).expect("row");
        percentile(&row.1, 0.5)
    };
    let line = |what: &str, ka: &str, lz: &str| {
        let (k, l) = (p50(ka), p50(lz));
        println!(
            "  {what}: {ka} {} / {lz} {} = {:.2}x",
            ms(k),
            ms(l),
            k.as_secs_f64() / l.as_secs_f64().max(1e-9)
        );
    };
    println!("\nratio of p50 outages (keepalived / lazarus):");
    line(
        "process crash",
        "keepalived process crash",
        "lazarus SIGKILL, hot standby",
    );
    line(
        "host loss",
        "keepalived host loss",
        "lazarus host loss, 40 ms lease",
    );
    line(
        "partition",
        "keepalived partition",
        "lazarus partition, 40 ms lease",
    );
    println!(
        "hot against cold standby with 64 MiB of state (p50): hot {} / cold {}",
        ms(p50("lazarus SIGKILL, hot standby, 64 MiB state")),
        ms(p50("lazarus SIGKILL, cold standby, 64 MiB state"))
    );
}

/// A kv trial slower than this prints its processes' last log lines.
const SLOW_TRIAL: Duration = Duration::from_millis(100);
