//! The textbook keepalived setup, on Lazarus, on real network namespaces:
//! two HAProxy hosts (`lb1`, `lb2`) active-passive on VIP 198.18.0.100,
//! three employees API servers (`be1`..`be3`) behind them, PostgreSQL on
//! `db`, a client on `client` that uses only the VIP. HAProxy, PostgreSQL
//! and the API are unmodified programs (`kind = "process"`); HAProxy and
//! PostgreSQL come from Debian (scripts/test.sh installs them).
//!
//! A client writes employees (acknowledged by 201) and reads them back
//! through the VIP the whole time; each test breaks something, measures the
//! client's outage, and checks that every acknowledged employee is still
//! in PostgreSQL.
//!
//! Needs root; fails (never skips) without it.

#[path = "../../../runtime/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{self, bin_dir, LzCluster, FAST, METRICS_PORT};
use common::netns::{http, parent as ppid, pids_with_env, Proc};

const VIP: &str = "198.18.0.100";
const VIP_KEY: &str = "198.18.0.100/24";
const API_PORT: u16 = 8000;
const LBS: [&str; 2] = ["lb1", "lb2"];
const BACKENDS: [&str; 3] = ["be1", "be2", "be3"];

fn example(file: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// HAProxy from Debian's package (scripts/test.sh installs it).
fn haproxy() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("LAZARUS_TEST_HAPROXY").unwrap_or_else(|_| "/usr/sbin/haproxy".into()),
    );
    assert!(
        p.exists(),
        "{} not found: run scripts/test.sh (it installs Debian's haproxy) or set LAZARUS_TEST_HAPROXY",
        p.display()
    );
    p
}

/// PostgreSQL's server binaries (Debian's postgresql package).
fn pg_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LAZARUS_TEST_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|p| p.join("postgres").exists());
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("PostgreSQL not found under /usr/lib/postgresql: run scripts/test.sh (it installs Debian's postgresql) or set LAZARUS_TEST_PG_BIN")
    })
}

struct Pair {
    c: LzCluster,
    _pg: Proc,
    /// Example files (configs, hook) live here, readable by every host.
    files: tempfile::TempDir,
    notify_log: PathBuf,
}

impl Pair {
    fn start(tag: &str) -> Pair {
        let files = tempfile::tempdir().expect("tempdir");
        chmod(files.path(), 0o755);
        let notify_log = files.path().join("notify.log");
        let hook = files.path().join("notify.sh");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$LAZARUS_NOTIFY_HOST $1 $LAZARUS_NOTIFY_JOB $LAZARUS_NOTIFY_WORKER $LAZARUS_NOTIFY_VIP\" >> {}\n",
                notify_log.display()
            ),
        )
        .expect("hook");
        chmod(&hook, 0o755);
        let haproxy = haproxy();
        let agent_config = format!(
            "allowed_binaries = [\"{}\", \"{}\", \"{}\"]\nallowed_vips = [\"198.18.0.0/15\"]\n",
            bin_dir().display(),
            haproxy.parent().expect("dir").display(),
            files.path().display()
        );
        let mut agents: Vec<&str> = LBS.to_vec();
        agents.extend(BACKENDS);
        let config = format!("{FAST}refresh = \"1s\"\n");
        let c = LzCluster::start_with(tag, &agents, &["db", "client"], &config, &agent_config);
        let pg = start_postgres(&c, files.path());
        let db = format!(
            "host={} port=5432 user=postgres dbname=postgres connect_timeout=2",
            c.bed.ip("db")
        );

        // The configs, from the example's templates.
        let servers: String = BACKENDS
            .iter()
            .enumerate()
            .map(|(i, h)| format!("    server api{} {}:{API_PORT} check\n", i + 1, c.bed.ip(h)))
            .collect();
        let cfg = files.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            example("haproxy.cfg.in")
                .replace("@PORT@", "80")
                .replace("@SERVERS@", &servers),
        )
        .expect("haproxy.cfg");
        let lb = example("lb.toml.in")
            .replace("@NOTIFY@", hook.to_str().expect("utf-8"))
            .replace("@VIP@", VIP_KEY)
            .replace("@PORT@", "80")
            .replace("@LB_HOSTS@", "\"lb1\", \"lb2\"")
            .replace("@HAPROXY@", haproxy.to_str().expect("utf-8"))
            .replace("@HAPROXY_CFG@", cfg.to_str().expect("utf-8"));
        assert!(!lb.contains('@'), "every placeholder filled: {lb}");
        let lb_path = files.path().join("lb.toml");
        std::fs::write(&lb_path, lb).expect("lb.toml");
        for (i, h) in BACKENDS.iter().enumerate() {
            let n = (i + 1).to_string();
            let api = example("api.toml.in")
                .replace("@N@", &n)
                .replace("@HOST@", h)
                .replace("@API_PORT@", &API_PORT.to_string())
                .replace("@DB@", &db)
                .replace(
                    "@API@",
                    bin_dir().join("employees-api").to_str().expect("utf-8"),
                );
            assert!(!api.contains('@'), "every placeholder filled: {api}");
            let path = files.path().join(format!("api-{n}.toml"));
            std::fs::write(&path, api).expect("api.toml");
            c.submit(&path, &[]);
        }
        c.submit(&lb_path, &[]);
        let pair = Pair {
            c,
            _pg: pg,
            files,
            notify_log,
        };
        pair.serving();
        pair
    }

    /// The last lines of both HAProxies' logs (failed, retried and
    /// redispatched requests, server checks that changed a state), for
    /// failure messages.
    fn haproxy_logs(&self) -> String {
        let mut out = String::new();
        for lb in LBS {
            let dir = self
                .c
                .dir
                .path()
                .join(format!("agent-{lb}"))
                .join("lb")
                .join("logs");
            let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                out.push_str(&format!("--- {lb}: {} ---\n", log.display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Waits until every API job runs and HAProxy serves on the VIP with
    /// its standby running; returns the primary LB host.
    fn serving(&self) -> String {
        let st = self.c.wait(
            "the API servers running and HAProxy on the VIP with a standby",
            Duration::from_secs(60),
            |st| {
                (1..=3).all(|n| {
                    cluster::job(st, &format!("api-{n}")).is_some_and(|j| j["state"] == "running")
                }) && cluster::serving(st, "lb", "haproxy-0", VIP_KEY)
                    .is_some_and(|(w, _)| w["standby"].is_string())
            },
        );
        let w = cluster::worker(&st, "lb", "haproxy-0").expect("worker");
        let primary = w["primary"].as_str().expect("primary").to_string();
        // And the client is answered through the VIP.
        let addr = vip_addr();
        let ok = self
            .c
            .bed
            .in_host("client", move || {
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(20) {
                    if matches!(
                        http(addr, "GET", "/employees", b"", Duration::from_millis(500)),
                        Ok((200, _))
                    ) {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                false
            })
            .join()
            .expect("client");
        assert!(ok, "the API answers through the VIP\n{}", self.c.logs());
        primary
    }

    /// The process id of `worker`'s program (not the worker around it) on
    /// `host`. Found by the host it runs on, not by the slot its worker was
    /// started in: a standby promoted before the test looks keeps the
    /// environment of a standby.
    fn program_pid(&self, job: &str, worker: &str, host: &str) -> u32 {
        let w = format!("LAZARUS_WORKER={worker}");
        let jobvar = format!("LAZARUS_JOB={job}");
        // A worker's program starts a moment after `status` names its slot.
        let start = Instant::now();
        loop {
            let workers = pids_with_env(&self.c.bed.tag, &[&w]);
            let programs = pids_with_env(&self.c.bed.tag, &[&w, &jobvar]);
            // The program's parent is its worker (not another program: a
            // program's own children are not it).
            let found: Vec<u32> = programs
                .iter()
                .copied()
                .filter(|p| {
                    let parent = ppid(*p);
                    workers.contains(&parent)
                        && !programs.contains(&parent)
                        && self.c.bed.runs_in(*p, host)
                })
                .collect();
            match found[..] {
                [pid] => return pid,
                _ if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => panic!(
                    "not one program of {job}/{worker} on {host} after 10 s: {found:?} (workers {workers:?}, programs {programs:?})\n{}",
                    self.c.logs()
                ),
            }
        }
    }

    /// The host of `job`/`worker`'s primary slot, from `status`.
    fn primary_host(&self, job: &str, worker: &str) -> String {
        let st = self.c.status().expect("status");
        cluster::worker(&st, job, worker)
            .and_then(|w| w["primary"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("{job}/{worker} has no primary: {st}"))
    }

    fn notify_lines(&self, host: &str) -> Vec<String> {
        std::fs::read_to_string(&self.notify_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("{host} ")))
            .map(|l| l.split(' ').nth(1).unwrap_or("").to_string())
            .collect()
    }

    /// Scrapes `host`'s metrics endpoint and parses it (text format).
    fn scrape(&self, host: &str) -> prometheus_parse::Scrape {
        let addr: SocketAddr = format!("{}:{METRICS_PORT}", self.c.bed.ip(host))
            .parse()
            .expect("addr");
        let (status, body) = self
            .c
            .bed
            .in_host("client", move || {
                http(addr, "GET", "/metrics", b"", Duration::from_secs(5))
            })
            .join()
            .expect("scrape")
            .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
        assert_eq!(status, 200, "metrics of {host}");
        let text = String::from_utf8(body).expect("utf-8");
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("metrics of {host} do not parse: {e}\n{text}"))
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn vip_addr() -> SocketAddr {
    format!("{VIP}:80").parse().expect("addr")
}

/// PostgreSQL in host `db`, as the `postgres` user, on a fresh cluster.
fn start_postgres(c: &LzCluster, files: &Path) -> Proc {
    let bin = pg_bin();
    let data = files.join("pgdata");
    std::fs::create_dir_all(&data).expect("pgdata");
    common::netns::ok(
        "chown",
        &["-R", "postgres:postgres", data.to_str().expect("utf-8")],
    );
    let initdb = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .args([
            "-D",
            data.to_str().expect("utf-8"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ])
        .output()
        .expect("initdb");
    assert!(
        initdb.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&initdb.stderr)
    );
    let hba = data.join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).expect("pg_hba");
    text.push_str("host all all 198.18.0.0/15 trust\n");
    std::fs::write(&hba, text).expect("pg_hba");
    let log = files.join("postgres.log");
    let listen = format!("listen_addresses={}", c.bed.ip("db"));
    let socket = format!("unix_socket_directories={}", data.display());
    let pg = c.bed.spawn(
        "db",
        Path::new("/usr/sbin/runuser"),
        &[
            "-u",
            "postgres",
            "--",
            bin.join("postgres").to_str().expect("utf-8"),
            "-D",
            data.to_str().expect("utf-8"),
            "-c",
            &listen,
            "-c",
            &socket,
            "-c",
            "fsync=off",
            "-p",
            "5432",
        ],
        &[],
        &log,
    );
    let addr: SocketAddr = format!("{}:5432", c.bed.ip("db")).parse().expect("addr");
    let up = c
        .bed
        .in_host("client", move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
        .join()
        .expect("probe");
    assert!(
        up,
        "PostgreSQL did not come up: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    pg
}

/// The failed requests after `from`: how long after it, and what.
/// The failed requests sent at or after `from`, each with when it was sent
/// and when it failed, relative to `from`.
fn failures_since(failures: &Mutex<Vec<Failure>>, from: Instant) -> Vec<String> {
    failures
        .lock()
        .expect("failures")
        .iter()
        .filter(|f| f.sent >= from)
        .map(|f| {
            format!(
                "sent +{:?}, failed +{:?}: {}",
                f.sent.duration_since(from),
                f.failed.duration_since(from),
                f.what
            )
        })
        .collect()
}

/// How long the [`Client`] waits for one answer before it counts the
/// request as failed. 300 ms failed once under the full suite's load (a
/// GET sent 1 s after a back-end kill, when HAProxy had long routed around
/// it); a request HAProxy retries on another server after its own connect
/// timeout (500 ms) must still count as served.
const REQUEST_LIMIT: Duration = Duration::from_secs(1);

/// A failed request of the [`Client`].
#[derive(Debug, Clone)]
struct Failure {
    sent: Instant,
    failed: Instant,
    /// Its status and body, or its error.
    what: String,
}

/// The client: creates an employee, reads it back, over and over, through
/// the VIP only, every few ms (bounded: `limit` and 50,000 requests).
struct Client {
    stop: Arc<AtomicBool>,
    /// (when, ok) of every request.
    timeline: Arc<Mutex<Vec<(Instant, bool)>>>,
    /// Ids whose creation was acknowledged (201).
    acked: Arc<Mutex<Vec<i64>>>,
    /// Every failed request (an assertion names them).
    failures: Arc<Mutex<Vec<Failure>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(p: &Pair, limit: Duration) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, t, a, f) = (
            stop.clone(),
            timeline.clone(),
            acked.clone(),
            failures.clone(),
        );
        let describe = |what: &str, r: &Result<(u16, Vec<u8>), String>| match r {
            Ok((status, body)) => {
                let body = String::from_utf8_lossy(body);
                format!("{what}: {status} {}", &body[..body.len().min(200)])
            }
            Err(e) => format!("{what}: {e}"),
        };
        let addr = vip_addr();
        let handle = p.c.bed.in_host("client", move || {
            let start = Instant::now();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) && start.elapsed() < limit && n < 50_000 {
                n += 1;
                let body = format!(
                    "{{\"name\":\"employee {n}\",\"title\":\"engineer\",\"salary\":{}}}",
                    50_000 + n
                );
                let sent = Instant::now();
                let r = http(addr, "POST", "/employees", body.as_bytes(), REQUEST_LIMIT);
                let ok = match &r {
                    Ok((201, b)) => {
                        let v: serde_json::Value = serde_json::from_slice(b).unwrap_or_default();
                        if let Some(id) = v["id"].as_i64() {
                            a.lock().expect("acked").push(id);
                        }
                        true
                    }
                    _ => false,
                };
                if !ok {
                    let r = r.map_err(|e| e.to_string());
                    f.lock().expect("failures").push(Failure {
                        sent,
                        failed: Instant::now(),
                        what: describe("POST /employees", &r),
                    });
                }
                t.lock().expect("timeline").push((Instant::now(), ok));
                let last = a.lock().expect("acked").last().copied();
                if let Some(id) = last {
                    let sent = Instant::now();
                    let r = http(addr, "GET", &format!("/employees/{id}"), b"", REQUEST_LIMIT);
                    let ok = matches!(r, Ok((200, _)));
                    if !ok {
                        let r = r.map_err(|e| e.to_string());
                        f.lock().expect("failures").push(Failure {
                            sent,
                            failed: Instant::now(),
                            what: describe(&format!("GET /employees/{id}"), &r),
                        });
                    }
                    t.lock().expect("timeline").push((Instant::now(), ok));
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        Client {
            stop,
            timeline,
            acked,
            failures,
            handle: Some(handle),
        }
    }

    /// Stops; returns the longest time without a successful request after
    /// `from`, the failed requests after `from`, and the acknowledged ids.
    fn finish(mut self, from: Instant) -> (Duration, usize, Vec<i64>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("client thread");
        }
        let t = self.timeline.lock().expect("timeline").clone();
        let mut last_ok = from;
        let mut gap = Duration::ZERO;
        let mut failed = 0;
        for (when, ok) in t.iter().filter(|(w, _)| *w >= from) {
            if *ok {
                gap = gap.max(when.duration_since(last_ok));
                last_ok = *when;
            } else {
                failed += 1;
            }
        }
        (gap, failed, self.acked.lock().expect("acked").clone())
    }
}

/// Every acknowledged employee is in PostgreSQL (read through the VIP,
/// and counted with psql on the database host).
fn check_no_loss(p: &Pair, acked: &[i64]) {
    assert!(!acked.is_empty(), "the client created employees");
    let addr = vip_addr();
    let ids = acked.to_vec();
    let missing =
        p.c.bed
            .in_host("client", move || {
                let (status, body) =
                    http(addr, "GET", "/employees", b"", Duration::from_secs(5)).expect("list");
                assert_eq!(status, 200);
                let all: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("json");
                let have: std::collections::BTreeSet<i64> =
                    all.iter().filter_map(|e| e["id"].as_i64()).collect();
                ids.into_iter()
                    .filter(|i| !have.contains(i))
                    .collect::<Vec<_>>()
            })
            .join()
            .expect("client");
    assert!(
        missing.is_empty(),
        "acknowledged employees lost: {missing:?}"
    );
    let psql = pg_bin().join("psql");
    let out = p.c.bed.exec(
        "client",
        psql.to_str().expect("utf-8"),
        &[
            "-h",
            &p.c.bed.ip("db"),
            "-U",
            "postgres",
            "-tAc",
            "SELECT count(*) FROM employees",
        ],
    );
    let count: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("psql: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        count >= acked.len(),
        "PostgreSQL holds {count} employees, {} acknowledged",
        acked.len()
    );
}

fn counter(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn other(lb: &str) -> &'static str {
    if lb == "lb1" {
        "lb2"
    } else {
        "lb1"
    }
}

/// Waits until the VIP is served by `host`'s HAProxy.
fn wait_vip_on(p: &Pair, host: &str, limit: Duration) {
    p.c.wait(&format!("the VIP on {host}"), limit, |st| {
        cluster::serving(st, "lb", "haproxy-0", VIP_KEY).is_some_and(|(w, _)| w["primary"] == host)
    });
    let start = Instant::now();
    while !p.c.bed.holds(host, VIP) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(p.c.bed.holds(host, VIP), "{host} holds the VIP");
}

#[test]
fn test_haproxy_sigkill_and_backend_kill_keep_serving_with_hooks_in_order_and_metrics() {
    let p = Pair::start("hpk");
    let old = p.serving();
    let new = other(&old);
    let sup_before = p.scrape("sup");
    let failovers_before = counter(&sup_before, "lazarus_failovers_total", &[("job", "lb")]);
    let client = Client::start(&p, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));

    // 1. SIGKILL the active HAProxy: the standby's HAProxy (already
    //    running) gets the VIP.
    let standby_pid = p.program_pid("lb", "haproxy-0", new);
    let pid = p.program_pid("lb", "haproxy-0", &old);
    let t0 = Instant::now();
    common::netns::ok("kill", &["-KILL", &pid.to_string()]);
    wait_vip_on(&p, new, Duration::from_secs(10));
    // The promoted HAProxy is the process the standby already ran on the
    // new host: nothing restarted.
    assert_eq!(p.program_pid("lb", "haproxy-0", new), standby_pid);
    assert!(std::path::Path::new(&format!("/proc/{standby_pid}")).exists());
    let (mac_ns, _) = {
        p.c.bed.touch("client", VIP);
        p.c.bed
            .neighbour("client", VIP)
            .expect("the client has a neighbour entry for the VIP")
    };
    assert_eq!(
        mac_ns,
        p.c.bed.mac(new),
        "the client's neighbour entry moved"
    );
    assert!(!p.c.bed.holds(&old, VIP), "the old host let the VIP go");

    // 2. One back-end dies: HAProxy routes around it (its own checks and
    //    retries), the API keeps answering; Lazarus restarts it on be2.
    std::thread::sleep(Duration::from_secs(1));
    let api_pid = p.program_pid("api-2", "api-0", &p.primary_host("api-2", "api-0"));
    // The kill lands somewhere between these two instants (starting `kill`
    // takes a few ms): a request sent before `t1` may be in flight at it.
    let t0_kill = Instant::now();
    common::netns::ok("kill", &["-KILL", &api_pid.to_string()]);
    let t1 = Instant::now();
    p.c.wait("api-2 restarted", Duration::from_secs(20), |st| {
        cluster::job(st, "api-2")
            .is_some_and(|j| j["state"] == "running" && j["restarts"].as_u64() >= Some(1))
    });
    std::thread::sleep(Duration::from_secs(1));
    let failures = client.failures.clone();
    let (gap, failed, acked) = client.finish(t0);
    // The client sends one request at a time. The one in flight when the
    // back-end died may fail: a POST that reached the back-end is not
    // replayed by HAProxy (it may have been applied), as it should not be.
    // Every request sent after the kill must succeed.
    let in_flight: Vec<Failure> = failures
        .lock()
        .expect("failures")
        .iter()
        .filter(|f| f.sent < t1 && f.failed >= t0_kill)
        .cloned()
        .collect();
    let after = failures_since(&failures, t1);
    eprintln!(
        "HAProxy SIGKILL: longest client gap {gap:?}, {failed} failed requests in all; after the back-end kill: {} sent after it failed, {} in flight at it failed {in_flight:?}",
        after.len(),
        in_flight.len()
    );
    assert!(
        gap < Duration::from_secs(3),
        "outage {gap:?}\n{}",
        p.c.logs()
    );
    assert!(in_flight.len() <= 1, "one request at a time: {in_flight:?}");
    assert!(
        after.is_empty(),
        "HAProxy routes around a dead back-end without a failed request: {after:#?}\n{}\n{}",
        p.c.logs(),
        p.haproxy_logs()
    );
    check_no_loss(&p, &acked);

    // 3. The hooks ran on each host, in order.
    let wait_hooks = Instant::now();
    while p.notify_lines(&old).len() < 3 && wait_hooks.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        p.notify_lines(&old),
        ["primary", "fault", "standby"],
        "hooks on {old}"
    );
    assert_eq!(
        p.notify_lines(new),
        ["standby", "primary"],
        "hooks on {new}"
    );
    let line = std::fs::read_to_string(&p.notify_log).expect("log");
    assert!(line.contains("lb haproxy-0 198.18.0.100/24"), "{line}");

    // 4. The metrics show it: the supervisor counted the failover, the new
    //    primary's agent holds the VIP, checks ran.
    let sup = p.scrape("sup");
    let failovers = counter(&sup, "lazarus_failovers_total", &[("job", "lb")]);
    assert!(
        failovers >= failovers_before + 1.0,
        "failovers {failovers_before} -> {failovers}"
    );
    let fo: Vec<String> = sup
        .samples
        .iter()
        .filter(|s| s.metric == "lazarus_failovers_total")
        .map(|s| format!("{:?} {:?}", s.labels, s.value))
        .collect();
    assert!(
        counter(
            &sup,
            "lazarus_failovers_total",
            &[("job", "api-2"), ("cause", "worker_exit")]
        ) >= 1.0,
        "{fo:?}"
    );
    assert!(
        counter(
            &sup,
            "lazarus_checkpoints_committed_total",
            &[("job", "lb")]
        ) >= 1.0
    );
    assert!(
        sup.samples
            .iter()
            .any(|s| s.metric == "lazarus_failover_duration_seconds_count"
                || s.metric == "lazarus_failover_duration_seconds"),
        "a failover duration histogram"
    );
    assert_eq!(
        counter(
            &sup,
            "lazarus_vip_lease_holder",
            &[("vip", VIP_KEY), ("host", new)]
        ),
        1.0
    );
    let agent = p.scrape(new);
    assert_eq!(
        counter(&agent, "lazarus_vip_held", &[("vip", VIP_KEY)]),
        1.0
    );
    assert!(
        counter(
            &agent,
            "lazarus_health_checks_total",
            &[("job", "lb"), ("result", "pass")]
        ) > 0.0
    );
    assert!(
        counter(
            &agent,
            "lazarus_notify_hooks_total",
            &[("state", "primary"), ("result", "ok")]
        ) >= 1.0
    );
    let old_agent = p.scrape(&old);
    assert_eq!(
        counter(&old_agent, "lazarus_vip_held", &[("vip", VIP_KEY)]),
        0.0
    );
    let _ = &p.files;
}

#[test]
fn test_haproxy_hang_fails_its_check_moves_the_vip_and_does_not_flap() {
    let p = Pair::start("hph");
    let old = p.serving();
    let new = other(&old);
    let client = Client::start(&p, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));

    // HAProxy hangs: its process lives, but answers nothing.
    let pid = p.program_pid("lb", "haproxy-0", &old);
    let t0 = Instant::now();
    common::netns::ok("kill", &["-STOP", &pid.to_string()]);
    wait_vip_on(&p, new, Duration::from_secs(10));
    let moved = t0.elapsed();
    let st = p.c.status().expect("status");
    let why = cluster::job(&st, "lb").expect("lb")["last_failure"].to_string();
    assert!(
        why.contains("health check"),
        "the failover names the check: {why}"
    );
    // It resumes (if it still exists: the agent stopped it as failed) and
    // the old host gets a standby again; nothing moves back.
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status();
    p.c.wait(
        "a standby on the old host again",
        Duration::from_secs(20),
        |st| cluster::worker(st, "lb", "haproxy-0").is_some_and(|w| w["standby"] == old.as_str()),
    );
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        assert!(
            p.c.bed.holds(new, VIP) && !p.c.bed.holds(&old, VIP),
            "no flapping"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (gap, failed, acked) = client.finish(t0);
    eprintln!("HAProxy hang: VIP moved after {moved:?}; longest client gap {gap:?}, {failed} failed requests");
    assert!(
        gap < Duration::from_secs(3),
        "outage {gap:?}\n{}",
        p.c.logs()
    );
    check_no_loss(&p, &acked);
    let hooks = p.notify_lines(&old);
    assert_eq!(
        hooks.first().map(String::as_str),
        Some("primary"),
        "{hooks:?}"
    );
    assert!(hooks.iter().any(|h| h == "fault"), "{hooks:?}");
}

#[test]
fn test_haproxy_host_loss_moves_the_vip_after_the_lease_and_never_two_holders() {
    let p = Pair::start("hpl");
    let old = p.serving();
    let new = other(&old);
    let client = Client::start(&p, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));

    let t0 = Instant::now();
    p.c.bed.link_down(&old);
    let limit = Instant::now();
    let mut both = 0;
    while !(p.c.bed.holds(new, VIP)) && limit.elapsed() < Duration::from_secs(15) {
        if p.c.bed.holds(&old, VIP) && p.c.bed.holds(new, VIP) {
            both += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        p.c.bed.holds(new, VIP),
        "{new} holds the VIP\n{}",
        p.c.logs()
    );
    assert!(
        !p.c.bed.holds(&old, VIP),
        "the cut-off host dropped the VIP (lease)"
    );
    assert_eq!(both, 0, "never two holders");
    wait_vip_on(&p, new, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let (gap, failed, acked) = client.finish(t0);
    eprintln!("LB host loss: longest client gap {gap:?}, {failed} failed requests");
    assert!(
        gap < Duration::from_secs(5),
        "outage {gap:?}\n{}",
        p.c.logs()
    );
    p.c.bed.link_up(&old);
    check_no_loss(&p, &acked);
}
