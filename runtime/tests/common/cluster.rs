//! A Lazarus cluster on the namespace test bed: `lazarus supervisor` in
//! host `sup` (198.18.0.1), `lazarus agent` in each agent host, clients in
//! the remaining hosts. Processes and namespaces go away on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::netns::{Proc, Testbed};

/// Where the workspace's binaries are (next to the test executable's
/// `deps/` directory).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    let bin = dir.join("lazarus");
    assert!(
        bin.exists(),
        "{} has no lazarus binary: build the workspace first (cargo build --workspace)",
        dir.display()
    );
    // A test of another package does not rebuild `lazarus`: refuse a binary
    // older than the sources it is built from, rather than test stale code.
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .expect("binary mtime");
    // The sources it was built from are in cargo's dep-info next to it (a
    // test-only module such as the supervisor's simulator is not one of
    // them); without that file, every file under the source folders.
    if let Some(newer) = std::fs::read_to_string(dir.join("lazarus.d"))
        .ok()
        .and_then(|d| newest_listed(&d))
    {
        assert!(
            newer <= built,
            "{} is older than a source it is built from ({newer:?}): rebuild it (cargo build --workspace, or run the tests with --workspace)",
            bin.display()
        );
    } else if let Some(root) = dir.parent().and_then(Path::parent) {
        for src in ["runtime/src", "worker-sdk/src", "storage/src"] {
            if let Some(newer) = newest(&root.join(src)).filter(|t| *t > built) {
                panic!(
                    "{} is older than {src} ({newer:?}): rebuild it (cargo build --workspace, or run the tests with --workspace)",
                    bin.display()
                );
            }
        }
    }
    dir
}

/// The newest modification time of the files a dep-info file lists
/// (`target: dep dep ...`, a space inside a path escaped as `\ `).
fn newest_listed(dep_info: &str) -> Option<std::time::SystemTime> {
    let (_, deps) = dep_info.lines().next()?.split_once(": ")?;
    deps.replace("\\ ", "\u{0}")
        .split_whitespace()
        .map(|p| p.replace('\u{0}', " "))
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

fn newest(dir: &Path) -> Option<std::time::SystemTime> {
    let mut best = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        best = best.max(t);
    }
    best
}

/// Heartbeats every 50 ms, a host lost after 400 ms, 100 ms leases.
/// Ends inside `[garp]`, so a test can append `refresh = ...`.
pub const FAST: &str = "heartbeat_interval = \"50ms\"\nhost_timeout = \"400ms\"\n[lease]\nlength = \"100ms\"\nrenew_every = \"25ms\"\ndrift_margin = \"50ms\"\n[garp]\ncount = 3\ndelay = \"5ms\"\n";

/// Where every test supervisor and agent serves Prometheus metrics (on its
/// host's address).
pub const METRICS_PORT: u16 = 9464;

pub struct LzCluster {
    // Fields drop in order: agents (they stop their workers), the
    // supervisors, etcd, then the test bed (sweep, namespaces deleted).
    pub agents: Vec<Proc>,
    pub sup: Option<Proc>,
    /// HA: the other supervisors (hosts `sup2`, `sup3`, ...), by host.
    pub more_sups: Vec<(String, Option<Proc>)>,
    /// HA with [`Ha::tarpit`]: the silent supervisor (host `tarpit`).
    pub tarpit: Option<Proc>,
    /// HA: the etcd members, by host.
    pub etcd: Vec<(String, Option<Proc>)>,
    pub bed: Testbed,
    pub dir: tempfile::TempDir,
    /// Every supervisor's address, comma-separated (what agents and the
    /// CLI are given).
    pub addr: String,
    pub agent_names: Vec<String>,
    /// HA: the etcd client URLs, comma-separated.
    pub etcd_urls: Option<String>,
    /// Supervisor and agents run as user `nobody` (65534), the agents with
    /// only CAP_NET_ADMIN and CAP_NET_RAW, ambient (deploy/systemd).
    pub unprivileged: bool,
}

/// The user unprivileged daemons run as.
pub const NOBODY: &str = "65534";

/// `setpriv` arguments that run the rest of the command line as `nobody`
/// with exactly `caps` (e.g. `+net_admin,+net_raw`), ambient; none if
/// empty.
fn as_nobody(caps: &str) -> Vec<String> {
    let mut args = vec![
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".to_string(),
    ];
    if caps.is_empty() {
        args.extend(["--inh-caps=-all".into(), "--bounding-set=-all".into()]);
    } else {
        args.extend([
            format!("--inh-caps=-all,{caps}"),
            format!("--ambient-caps={caps}"),
            format!("--bounding-set=-all,{caps}"),
        ]);
    }
    args.push("--".into());
    args
}

/// Supervisors under etcd: `supervisors` supervisor hosts (`sup`, `sup2`,
/// ...), `etcd_members` etcd hosts (`etcd1`, ...), and the leadership lease.
#[derive(Debug, Clone, Copy)]
pub struct Ha {
    pub supervisors: usize,
    pub etcd_members: usize,
    pub lease: &'static str,
    /// One more address at the end of the agents' supervisor list (host
    /// `tarpit`, not given to the CLI): a process that completes the TLS
    /// handshake with a supervisor certificate of the cluster's CA and then
    /// never answers, as a supervisor hung after its handshake would. It
    /// logs `handshake <peer ip>` for every handshake.
    pub tarpit: bool,
}

/// The etcd binary: `LAZARUS_TEST_ETCD` (scripts/test.sh installs it), or
/// the copy scripts/test.sh keeps under target/test-tools.
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LAZARUS_TEST_ETCD") {
        return PathBuf::from(p);
    }
    let fallback = bin_dir()
        .parent()
        .map(|t| t.join("test-tools/etcd-venv/bin/etcd"))
        .filter(|p| p.exists());
    fallback.unwrap_or_else(|| {
        panic!("the HA tests need etcd: run scripts/test.sh (it installs etcd) or set LAZARUS_TEST_ETCD=/path/to/etcd")
    })
}

impl LzCluster {
    /// Starts a supervisor with `config` and one agent per `agents` name;
    /// `others` are plain hosts (clients). Waits until every agent is alive.
    pub fn start(tag: &str, agents: &[&str], others: &[&str], config: &str) -> LzCluster {
        // Every test agent runs under allow-lists: binaries from the build
        // directory, VIPs from the benchmarking ranges.
        let agent_config = format!(
            "allowed_binaries = [\"{}\"]\nallowed_vips = [\"198.18.0.0/15\", \"2001:2::/48\"]\n",
            bin_dir().display()
        );
        Self::start_with(tag, agents, others, config, &agent_config)
    }

    /// As [`LzCluster::start`], with `agent_config` as every agent's
    /// `--config`.
    ///
    /// With `LAZARUS_TEST_HA=1` the supervisor runs under a real etcd
    /// (elected leader, VIP leases in etcd): scripts/test.sh runs the
    /// cluster tests once this way, so that everything they check holds with
    /// `--etcd` as well as without.
    pub fn start_with(
        tag: &str,
        agents: &[&str],
        others: &[&str],
        config: &str,
        agent_config: &str,
    ) -> LzCluster {
        let ha = std::env::var("LAZARUS_TEST_HA")
            .is_ok_and(|v| v == "1")
            .then_some(Ha {
                supervisors: 1,
                etcd_members: 1,
                lease: "2s",
                tarpit: false,
            });
        Self::start_full(tag, agents, others, config, agent_config, ha, false)
    }

    /// As [`LzCluster::start`], with the supervisor and the agents as user
    /// `nobody`: the supervisor without any capability, the agents with only
    /// CAP_NET_ADMIN and CAP_NET_RAW as ambient capabilities, as the units
    /// under `deploy/systemd` run them. The binaries they run are copies in
    /// [`LzCluster::unprivileged_bin`] (the checkout may be where `nobody`
    /// cannot read); put worker binaries there with
    /// [`LzCluster::install_binary`]. Agents allow binaries from there only.
    pub fn start_unprivileged(
        tag: &str,
        agents: &[&str],
        others: &[&str],
        config: &str,
    ) -> LzCluster {
        // The allow-list is written once the cluster's directory exists.
        Self::start_full(tag, agents, others, config, "", None, true)
    }

    /// Where an unprivileged cluster's binaries are.
    pub fn unprivileged_bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// Copies `binary` to [`LzCluster::unprivileged_bin`]; returns the copy.
    pub fn install_binary(&self, binary: &Path) -> PathBuf {
        let to = self
            .unprivileged_bin()
            .join(binary.file_name().expect("a file name"));
        std::fs::copy(binary, &to).unwrap_or_else(|e| panic!("copying {}: {e}", binary.display()));
        super::netns::ok("chmod", &["755", to.to_str().expect("utf-8")]);
        to
    }

    /// The `lazarus` binary the daemons run.
    fn daemon_binary(&self) -> PathBuf {
        if self.unprivileged {
            self.unprivileged_bin().join("lazarus")
        } else {
            bin_dir().join("lazarus")
        }
    }

    /// As [`LzCluster::start`], with supervisors under etcd.
    pub fn start_ha(
        tag: &str,
        ha: Ha,
        agents: &[&str],
        others: &[&str],
        config: &str,
    ) -> LzCluster {
        let agent_config = format!(
            "allowed_binaries = [\"{}\"]\nallowed_vips = [\"198.18.0.0/15\", \"2001:2::/48\"]\n",
            bin_dir().display()
        );
        Self::start_full(tag, agents, others, config, &agent_config, Some(ha), false)
    }

    fn start_full(
        tag: &str,
        agents: &[&str],
        others: &[&str],
        config: &str,
        agent_config: &str,
        ha: Option<Ha>,
        unprivileged: bool,
    ) -> LzCluster {
        let sup_hosts: Vec<String> = match ha {
            None => vec!["sup".into()],
            Some(h) => (0..h.supervisors.max(1))
                .map(|i| {
                    if i == 0 {
                        "sup".into()
                    } else {
                        format!("sup{}", i + 1)
                    }
                })
                .collect(),
        };
        let etcd_hosts: Vec<String> = ha
            .map(|h| (1..=h.etcd_members).map(|i| format!("etcd{i}")).collect())
            .unwrap_or_default();
        let tarpit = ha.is_some_and(|h| h.tarpit);
        let mut names: Vec<&str> = sup_hosts.iter().map(String::as_str).collect();
        if tarpit {
            names.push("tarpit");
        }
        names.extend(etcd_hosts.iter().map(String::as_str));
        names.extend_from_slice(agents);
        names.extend_from_slice(others);
        let bed = Testbed::new(tag, &names);
        let dir = tempfile::tempdir().expect("tempdir");
        let bins = bin_dir();
        let config_path = dir.path().join("supervisor.toml");
        std::fs::write(&config_path, config).expect("config");
        let addr = sup_hosts
            .iter()
            .map(|h| format!("{}:7070", bed.ip(h)))
            .collect::<Vec<_>>()
            .join(",");
        // Every test cluster runs with mutual TLS: a CA and one certificate
        // per supervisor, agent and the test's operator, issued by the
        // binary under test.
        let pki = dir.path().join("pki");
        let lz = |args: &[&str]| {
            let out = std::process::Command::new(bin_dir().join("lazarus"))
                .args(args)
                .output()
                .expect("lazarus");
            assert!(
                out.status.success(),
                "lazarus {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let p = |name: &str| pki.join(name).to_str().expect("utf-8").to_string();
        lz(&["ca", "init", &p("ca")]);
        let mut identities = vec![("operator", "test", "operator")];
        identities.extend(
            sup_hosts
                .iter()
                .map(|h| ("supervisor", h.as_str(), h.as_str())),
        );
        if tarpit {
            identities.push(("supervisor", "tarpit", "tarpit"));
        }
        identities.extend(agents.iter().map(|a| ("agent", *a, *a)));
        for (role, name, out) in identities {
            let (ca, out) = (p("ca"), p(out));
            lz(&[
                "cert", "issue", "--ca", &ca, "--role", role, "--name", name, "--out", &out,
            ]);
        }
        let etcd_urls = (!etcd_hosts.is_empty()).then(|| {
            etcd_hosts
                .iter()
                .map(|h| format!("http://{}:2379", bed.ip(h)))
                .collect::<Vec<_>>()
                .join(",")
        });
        if let Some(h) = ha {
            let mut extra = std::fs::read_to_string(&config_path).expect("config");
            extra.push_str(&format!("\n[etcd]\nlease = \"{}\"\n", h.lease));
            std::fs::write(&config_path, extra).expect("config");
        }
        let mut cluster = LzCluster {
            agents: Vec::new(),
            sup: None,
            more_sups: Vec::new(),
            tarpit: None,
            etcd: Vec::new(),
            bed,
            dir,
            addr,
            agent_names: agents.iter().map(|s| s.to_string()).collect(),
            etcd_urls,
            unprivileged,
        };
        if unprivileged {
            // Everything the daemons read or write belongs to `nobody`,
            // binaries included (copied out of the checkout).
            std::fs::create_dir_all(cluster.unprivileged_bin()).expect("bin dir");
            cluster.install_binary(&bin_dir().join("lazarus"));
            let d = cluster.dir.path().to_str().expect("utf-8").to_string();
            std::fs::create_dir_all(cluster.dir.path().join("store")).expect("store");
            for a in agents {
                std::fs::create_dir_all(cluster.dir.path().join(format!("agent-{a}")))
                    .expect("agent dir");
            }
            let owner = format!("{NOBODY}:{NOBODY}");
            super::netns::ok("chown", &["-R", &owner, &d]);
            super::netns::ok("chmod", &["755", &d]);
        }
        for h in &etcd_hosts {
            let p = cluster.spawn_etcd(h, &etcd_hosts, "new");
            cluster.etcd.push((h.clone(), Some(p)));
        }
        for (i, h) in sup_hosts.iter().enumerate() {
            let p = cluster.spawn_supervisor(h);
            if i == 0 {
                cluster.sup = Some(p);
            } else {
                cluster.more_sups.push((h.clone(), Some(p)));
            }
        }
        let mut agent_sups = cluster.addr.clone();
        if tarpit {
            cluster.tarpit = Some(cluster.spawn_tarpit());
            agent_sups.push_str(&format!(",{}:7070", cluster.bed.ip("tarpit")));
        }
        let agent_config_path = cluster.dir.path().join("agent.toml");
        let agent_config = if unprivileged {
            format!(
                "allowed_binaries = [\"{}\"]\nallowed_vips = [\"198.18.0.0/15\", \"2001:2::/48\"]\n",
                cluster.unprivileged_bin().display()
            )
        } else {
            agent_config.to_string()
        };
        std::fs::write(&agent_config_path, agent_config).expect("agent config");
        for a in agents {
            let tls = cluster.dir.path().join("pki").join(a);
            let state = cluster.dir.path().join(format!("agent-{a}"));
            let log = cluster.dir.path().join(format!("agent-{a}.log"));
            let mut wrapped: Vec<String> = Vec::new();
            let program = if cluster.unprivileged {
                wrapped = as_nobody("+net_admin,+net_raw");
                wrapped.push(cluster.daemon_binary().to_str().expect("utf-8").to_string());
                PathBuf::from("/usr/bin/setpriv")
            } else {
                bins.join("lazarus")
            };
            let mut args: Vec<&str> = wrapped.iter().map(String::as_str).collect();
            let metrics = format!("{}:{METRICS_PORT}", cluster.bed.ip(a));
            args.extend([
                "agent",
                "--name",
                a,
                "--supervisor",
                &agent_sups,
                "--iface",
                "eth0",
                "--state-dir",
                state.to_str().expect("utf-8"),
                "--tls",
                tls.to_str().expect("utf-8"),
                "--config",
                agent_config_path.to_str().expect("utf-8"),
                "--metrics",
                &metrics,
            ]);
            let p = cluster
                .bed
                .spawn(a, &program, &args, &[("LAZARUS_LOG", "info")], &log);
            cluster.agents.push(p);
        }
        let n = agents.len();
        cluster.wait("every agent registered", Duration::from_secs(20), |s| {
            s["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().filter(|h| h["alive"] == true).count() == n)
        });
        cluster
    }

    /// Starts the silent supervisor of [`Ha::tarpit`] in host `tarpit`
    /// (Python's `ssl`, which is OpenSSL: another TLS stack than ours) and
    /// waits until it listens.
    fn spawn_tarpit(&self) -> Proc {
        const TARPIT: &str = r#"
import socket, ssl, sys, threading
ip, pki = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(pki + "/cert.pem", pki + "/key.pem")
ctx.load_verify_locations(pki + "/ca.pem")
ctx.verify_mode = ssl.CERT_REQUIRED
held = []
lock = threading.Lock()
def log(line):
    # One line at a time: print() from two threads interleaves its pieces.
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
def handshake(c, peer):
    try:
        c.settimeout(5)
        t = ctx.wrap_socket(c, server_side=True)
        t.settimeout(None)
        held.append(t)
        log("handshake " + peer[0])
    except Exception as e:
        log("handshake failed %s %s" % (peer[0], e))
srv = socket.create_server((ip, 7070))
log("listening")
while True:
    c, peer = srv.accept()
    threading.Thread(target=handshake, args=(c, peer), daemon=True).start()
"#;
        let pki = self.dir.path().join("pki").join("tarpit");
        let log = self.dir.path().join("tarpit.log");
        let ip = self.bed.ip("tarpit");
        let p = self.bed.spawn(
            "tarpit",
            Path::new("python3"),
            &["-c", TARPIT, &ip, pki.to_str().expect("utf-8")],
            &[],
            &log,
        );
        let start = Instant::now();
        while !p.log_text().contains("listening") {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the tarpit did not start: {}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// Starts `lazarus supervisor` in host `host` (with etcd when the
    /// cluster has it), logging to `<host>.log` (a restart starts it anew).
    pub fn spawn_supervisor(&self, host: &str) -> Proc {
        let bins = bin_dir();
        let p = |name: &str| {
            self.dir
                .path()
                .join("pki")
                .join(name)
                .to_str()
                .expect("utf-8")
                .to_string()
        };
        let store = format!("file://{}", self.dir.path().join("store").display());
        let listen = format!("{}:7070", self.bed.ip(host));
        let config = self.dir.path().join("supervisor.toml");
        let state = self.dir.path().join(host);
        let mut args = vec![
            "supervisor".to_string(),
            "--listen".into(),
            listen,
            "--store".into(),
            store,
            "--config".into(),
            config.to_str().expect("utf-8").into(),
            "--state-dir".into(),
            state.to_str().expect("utf-8").into(),
            "--tls".into(),
            p(host),
            // Every test supervisor serves metrics (METRICS_PORT in its
            // namespace): the code path runs in every cluster test.
            "--metrics".into(),
            format!("{}:{METRICS_PORT}", self.bed.ip(host)),
        ];
        if let Some(urls) = &self.etcd_urls {
            args.extend(["--etcd".into(), urls.clone(), "--name".into(), host.into()]);
        }
        let (program, args) = if self.unprivileged {
            let mut wrapped = as_nobody("");
            wrapped.push(self.daemon_binary().to_str().expect("utf-8").to_string());
            wrapped.extend(args);
            (PathBuf::from("/usr/bin/setpriv"), wrapped)
        } else {
            (bins.join("lazarus"), args)
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = if host == "sup" {
            "supervisor.log".to_string()
        } else {
            format!("{host}.log")
        };
        self.bed.spawn(
            host,
            &program,
            &args,
            &[("LAZARUS_LOG", "info")],
            &self.dir.path().join(log),
        )
    }

    /// Starts etcd member `host` of `members` (`state`: new or existing).
    pub fn spawn_etcd(&self, host: &str, members: &[String], state: &str) -> Proc {
        let ip = self.bed.ip(host);
        let cluster = members
            .iter()
            .map(|m| format!("{m}=http://{}:2380", self.bed.ip(m)))
            .collect::<Vec<_>>()
            .join(",");
        let data = self.dir.path().join(format!("{host}.data"));
        let (client, peer) = (format!("http://{ip}:2379"), format!("http://{ip}:2380"));
        self.bed.spawn(
            host,
            &etcd_binary(),
            &[
                "--name",
                host,
                "--data-dir",
                data.to_str().expect("utf-8"),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                state,
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                // Members are killed, never powered off: the page cache
                // keeps what they wrote, and the test machine's disk is
                // spared an fsync per write.
                "--unsafe-no-fsync",
            ],
            &[],
            &self.dir.path().join(format!("{host}.log")),
        )
    }

    /// The supervisor process in `host`.
    pub fn supervisor_mut(&mut self, host: &str) -> &mut Option<Proc> {
        if host == "sup" {
            return &mut self.sup;
        }
        &mut self
            .more_sups
            .iter_mut()
            .find(|(h, _)| h == host)
            .unwrap_or_else(|| panic!("no supervisor host {host}"))
            .1
    }

    /// `lazarus ARGS --supervisor ADDR --tls OPERATOR`, run in the
    /// supervisor's host (a client command: status, submit, stop).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let lazarus = bin_dir().join("lazarus");
        let tls = self.dir.path().join("pki").join("operator");
        let mut full: Vec<&str> = args.to_vec();
        full.extend([
            "--supervisor",
            &self.addr,
            "--tls",
            tls.to_str().expect("utf-8"),
        ]);
        self.bed
            .exec("sup", lazarus.to_str().expect("utf-8"), &full)
    }

    /// `lazarus status --json`, run in the supervisor's host.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Polls the status (bounded by `limit`) until `f` holds; panics with
    /// the last status and the logs otherwise.
    pub fn wait(
        &self,
        what: &str,
        limit: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < limit {
            match self.status() {
                Ok(s) if f(&s) => return s,
                Ok(s) => last = Some(s),
                Err(e) => last = Some(serde_json::Value::String(e)),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "waited {limit:?} for {what}; last status: {}\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            self.logs()
        );
    }

    /// Supervisor and agent logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let sups = self.more_sups.iter().filter_map(|(_, p)| p.as_ref());
        let all = self.sup.iter().chain(sups).chain(self.tarpit.iter());
        for p in all.chain(self.agents.iter()) {
            let text = p.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} ({}) ---\n", p.name, p.log.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// `lazarus submit SPEC`.
    pub fn submit(&self, spec: &Path, set: &[&str]) {
        let mut args = vec!["submit", spec.to_str().expect("utf-8")];
        for s in set {
            args.push("--set");
            args.push(s);
        }
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "submit failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The job's first worker entry in a status.
pub fn worker<'a>(
    s: &'a serde_json::Value,
    job: &str,
    worker: &str,
) -> Option<&'a serde_json::Value> {
    s["jobs"].as_array()?.iter().find(|j| j["job"] == job)?["workers"]
        .as_array()?
        .iter()
        .find(|w| w["worker"] == worker)
}

/// The job's entry in a status.
pub fn job<'a>(s: &'a serde_json::Value, job: &str) -> Option<&'a serde_json::Value> {
    s["jobs"].as_array()?.iter().find(|j| j["job"] == job)
}

/// The VIP's entry in a status.
pub fn vip<'a>(s: &'a serde_json::Value, vip: &str) -> Option<&'a serde_json::Value> {
    s["vips"].as_array()?.iter().find(|v| v["vip"] == vip)
}

/// The worker's and the VIP's entries when `job` runs, `worker` runs, and
/// the VIP is held by the worker's primary host: the service is up.
pub fn serving<'a>(
    s: &'a serde_json::Value,
    job_name: &str,
    worker_name: &str,
    vip_key: &str,
) -> Option<(&'a serde_json::Value, &'a serde_json::Value)> {
    let (w, j, v) = (
        worker(s, job_name, worker_name)?,
        job(s, job_name)?,
        vip(s, vip_key)?,
    );
    (j["state"] == "running" && w["running"] == true && v["holder"] == w["primary"])
        .then_some((w, v))
}
