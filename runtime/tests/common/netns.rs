//! Hosts as network namespaces on a bridge, for the VIP and failover tests.
//!
//! One namespace holds a bridge; each named host is a namespace joined to
//! it by a veth pair (`eth0` inside the host, `v<name>` on the bridge).
//! Host number i (1-based, in the order given) gets 198.18.0.i/24,
//! 2001:2::i/64 and MAC 02:00:00:00:00:ii. Nothing touches the machine's
//! own interfaces. Dropping the test bed kills the processes started in it
//! and deletes every namespace, also when a test fails.
//!
//! Needs root and iproute2: without them the constructor fails and says
//! so; it never skips.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e} (these tests need iproute2)"))
}

pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A process started in a host; killed (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(3));
    }
}

pub struct Testbed {
    pub bridge: String,
    pub names: Vec<String>,
    pub namespaces: Vec<String>,
    /// Marks every process started here (inherited by their children), so
    /// that nothing survives the test.
    pub tag: String,
}

impl Testbed {
    pub fn new(tag: &str, names: &[&str]) -> Testbed {
        let uid = ok("id", &["-u"]);
        assert_eq!(
            uid.trim(),
            "0",
            "these tests need root (network namespaces, CAP_NET_ADMIN, CAP_NET_RAW): run scripts/test.sh as root"
        );
        assert!(names.len() < 200);
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let mut bed = Testbed {
            bridge: format!("lzbr{id}"),
            names: Vec::new(),
            namespaces: Vec::new(),
            tag: format!("lztest-{id}"),
        };
        ok("ip", &["netns", "add", &bed.bridge]);
        // Registered at once: a failure below still deletes it on drop.
        let br = bed.bridge.clone();
        ok("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ok("ip", &["-n", &br, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("lz{name}{id}");
            ok("ip", &["netns", "add", &ns]);
            bed.names.push(name.to_string());
            bed.namespaces.push(ns.clone());
            let veth = format!("v{name}");
            ok(
                "ip",
                &[
                    "-n", &br, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            );
            ok("ip", &["-n", &br, "link", "set", &veth, "master", "br0"]);
            ok("ip", &["-n", &br, "link", "set", &veth, "up"]);
            let n = i + 1;
            ok(
                "ip",
                &[
                    "-n",
                    &ns,
                    "link",
                    "set",
                    "eth0",
                    "address",
                    &format!("02:00:00:00:00:{n:02x}"),
                ],
            );
            ok(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("198.18.0.{n}/24"),
                    "dev",
                    "eth0",
                ],
            );
            ok(
                "ip",
                &[
                    "-n",
                    &ns,
                    "-6",
                    "addr",
                    "add",
                    &format!("2001:2::{n:x}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
            ok("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            ok("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        bed
    }

    fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no host {name} in the test bed"))
    }

    /// The namespace of host `name`.
    pub fn ns(&self, name: &str) -> &str {
        &self.namespaces[self.index(name)]
    }

    /// Whether process `pid` runs in host `name` (its network namespace is
    /// the host's). False if the process is gone.
    pub fn runs_in(&self, pid: u32, name: &str) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let host = std::fs::metadata(format!("/run/netns/{}", self.ns(name)))
            .unwrap_or_else(|e| panic!("namespace of host {name}: {e}"));
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| m.dev() == host.dev() && m.ino() == host.ino())
    }

    /// Host `name`'s IPv4 address.
    pub fn ip(&self, name: &str) -> String {
        format!("198.18.0.{}", self.index(name) + 1)
    }

    /// Host `name`'s MAC address.
    pub fn mac(&self, name: &str) -> String {
        format!("02:00:00:00:00:{:02x}", self.index(name) + 1)
    }

    /// Runs `program ARGS` inside host `name` and waits for it.
    pub fn exec(&self, name: &str, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.ns(name), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Starts `program ARGS` inside host `name`, output to `log`.
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Proc {
        let file = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(name)])
            .arg(program)
            .args(args)
            .env("LAZARUS_TEST_TAG", &self.tag)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} in {name}: {e}", program.display()));
        Proc {
            child,
            log: log.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// Runs `ip link set v<name> ARGS` on the bridge side of host `name`.
    fn port(&self, name: &str, args: &[&str]) {
        let port = format!("v{name}");
        let mut full = vec!["-n", self.bridge.as_str(), "link", "set", port.as_str()];
        full.extend_from_slice(args);
        ok("ip", &full);
    }

    /// Cuts host `name` off from `ip` only (a blackhole route in its
    /// namespace); everything else stays reachable.
    pub fn cut_route(&self, name: &str, ip: &str) {
        ok(
            "ip",
            &[
                "-n",
                self.ns(name),
                "route",
                "add",
                "blackhole",
                &format!("{ip}/32"),
            ],
        );
    }

    /// Undoes [`Testbed::cut_route`].
    pub fn restore_route(&self, name: &str, ip: &str) {
        ok(
            "ip",
            &[
                "-n",
                self.ns(name),
                "route",
                "del",
                "blackhole",
                &format!("{ip}/32"),
            ],
        );
    }

    /// Cuts host `name`'s cable (its bridge port goes down).
    pub fn link_down(&self, name: &str) {
        self.port(name, &["down"]);
    }

    /// Partitions host `name` with its carrier up: its bridge port leaves
    /// the bridge, so frames stop flowing but no link goes down.
    pub fn partition(&self, name: &str) {
        self.port(name, &["nomaster"]);
    }

    /// Heals [`Testbed::partition`].
    pub fn heal(&self, name: &str) {
        self.port(name, &["master", "br0"]);
    }

    /// Reconnects host `name`'s cable.
    pub fn link_up(&self, name: &str) {
        self.port(name, &["up"]);
    }

    /// The neighbour entry of `addr` in host `client`: (MAC, state).
    pub fn neighbour(&self, client: &str, addr: &str) -> Option<(String, String)> {
        let out = ok(
            "ip",
            &["-n", self.ns(client), "neigh", "show", addr, "dev", "eth0"],
        );
        let words: Vec<&str> = out.split_whitespace().collect();
        let mac = words
            .iter()
            .position(|w| *w == "lladdr")
            .and_then(|i| words.get(i + 1))?;
        Some((mac.to_string(), words.last().unwrap_or(&"").to_string()))
    }

    /// Makes `client` resolve `addr` through real traffic.
    pub fn touch(&self, client: &str, addr: &str) {
        let script = format!("exec 3<>/dev/tcp/{addr}/9 2>/dev/null; exit 0");
        let _ = self.exec(client, "timeout", &["2", "bash", "-c", &script]);
    }

    /// Whether host `name` has `addr` on eth0.
    pub fn holds(&self, name: &str, addr: &str) -> bool {
        ok("ip", &["-n", self.ns(name), "addr", "show", "dev", "eth0"])
            .contains(&format!(" {addr}/"))
    }

    /// Runs `f` on a thread inside host `name`'s network namespace: sockets
    /// it opens belong to that host.
    pub fn in_host<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(name));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Kills every process carrying this test bed's tag (workers included).
    pub fn sweep(&self) {
        for pid in pids_with_env(&self.tag, &[]) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.sweep();
        for ns in self.namespaces.iter().chain(std::iter::once(&self.bridge)) {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// The effective capabilities of process `pid` (`CapEff`).
pub fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .expect("CapEff");
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).expect("hex")
}

/// The parent of process `pid` (0 if it is gone).
pub fn parent(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            after.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Processes whose environment has all of `pairs` (for example a worker's
/// `LAZARUS_WORKER=kv-0` and `LAZARUS_STANDBY=0`) and this test bed's tag.
pub fn pids_with_env(tag: &str, pairs: &[&str]) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    let tag = format!("LAZARUS_TEST_TAG={tag}");
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if vars.contains(&tag.as_bytes()) && pairs.iter().all(|p| vars.contains(&p.as_bytes())) {
            found.push(pid);
        }
    }
    found
}

/// One HTTP/1.1 request with `Connection: close`, bounded by `timeout`.
/// Returns the status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: kv\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    let head = String::from_utf8_lossy(&out[..text_end]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, out[text_end + 4..].to_vec()))
}
