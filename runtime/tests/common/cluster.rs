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
    if let Some(root) = dir.parent().and_then(Path::parent) {
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

pub struct LzCluster {
    // Fields drop in order: agents (they stop their workers), the
    // supervisor, then the test bed (sweep, namespaces deleted).
    pub agents: Vec<Proc>,
    pub sup: Option<Proc>,
    pub bed: Testbed,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub agent_names: Vec<String>,
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
    pub fn start_with(
        tag: &str,
        agents: &[&str],
        others: &[&str],
        config: &str,
        agent_config: &str,
    ) -> LzCluster {
        let mut names = vec!["sup"];
        names.extend_from_slice(agents);
        names.extend_from_slice(others);
        let bed = Testbed::new(tag, &names);
        let dir = tempfile::tempdir().expect("tempdir");
        let bins = bin_dir();
        let config_path = dir.path().join("supervisor.toml");
        std::fs::write(&config_path, config).expect("config");
        let addr = format!("{}:7070", bed.ip("sup"));
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
        let mut identities = vec![
            ("supervisor", "sup", "sup"),
            ("operator", "test", "operator"),
        ];
        identities.extend(agents.iter().map(|a| ("agent", *a, *a)));
        for (role, name, out) in identities {
            let (ca, out) = (p("ca"), p(out));
            lz(&[
                "cert", "issue", "--ca", &ca, "--role", role, "--name", name, "--out", &out,
            ]);
        }
        let store = format!("file://{}", dir.path().join("store").display());
        let sup = bed.spawn(
            "sup",
            &bins.join("lazarus"),
            &[
                "supervisor",
                "--listen",
                &addr,
                "--store",
                &store,
                "--config",
                config_path.to_str().expect("utf-8"),
                "--state-dir",
                dir.path().join("sup").to_str().expect("utf-8"),
                "--tls",
                &p("sup"),
            ],
            &[("LAZARUS_LOG", "info")],
            &dir.path().join("supervisor.log"),
        );
        let mut cluster = LzCluster {
            agents: Vec::new(),
            sup: Some(sup),
            bed,
            dir,
            addr,
            agent_names: agents.iter().map(|s| s.to_string()).collect(),
        };
        let agent_config_path = cluster.dir.path().join("agent.toml");
        std::fs::write(&agent_config_path, agent_config).expect("agent config");
        for a in agents {
            let tls = cluster.dir.path().join("pki").join(a);
            let state = cluster.dir.path().join(format!("agent-{a}"));
            let log = cluster.dir.path().join(format!("agent-{a}.log"));
            let p = cluster.bed.spawn(
                a,
                &bins.join("lazarus"),
                &[
                    "agent",
                    "--name",
                    a,
                    "--supervisor",
                    &cluster.addr,
                    "--iface",
                    "eth0",
                    "--state-dir",
                    state.to_str().expect("utf-8"),
                    "--tls",
                    tls.to_str().expect("utf-8"),
                    "--config",
                    agent_config_path.to_str().expect("utf-8"),
                ],
                &[("LAZARUS_LOG", "info")],
                &log,
            );
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
        for p in self.sup.iter().chain(self.agents.iter()) {
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
