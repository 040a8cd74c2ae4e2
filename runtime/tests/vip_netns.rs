//! The VIP on real hosts: network namespaces on a bridge (198.18.0.0/24 and
//! 2001:2::/64), the `lazarus vip` command run inside them, and the client
//! namespace's kernel neighbour table read with `ip neigh`.
//!
//! Needs root (namespaces, CAP_NET_ADMIN, CAP_NET_RAW) and iproute2; without
//! them the tests fail and say so, they never skip. Every namespace is
//! deleted when a test ends, also when it fails.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn lazarus_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lazarus")
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e} (VIP tests need iproute2)"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Hosts as namespaces on a bridge; removed on drop.
struct Testbed {
    bridge: String,
    hosts: Vec<String>,
}

impl Testbed {
    /// Hosts `a`, `b` (VIP holders) and `c` (client): host i gets
    /// 198.18.0.(i+1), 2001:2::(i+1) and MAC 02:00:00:00:00:0(i+1).
    fn new(tag: &str) -> Testbed {
        let uid = ok("id", &["-u"]);
        assert_eq!(
            uid.trim(),
            "0",
            "the VIP tests need root (network namespaces, CAP_NET_ADMIN, CAP_NET_RAW): run scripts/test.sh as root"
        );
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let mut bed = Testbed {
            bridge: format!("lzbr{id}"),
            hosts: Vec::new(),
        };
        ok("ip", &["netns", "add", &bed.bridge]);
        ok(
            "ip",
            &["-n", &bed.bridge, "link", "add", "br0", "type", "bridge"],
        );
        ok("ip", &["-n", &bed.bridge, "link", "set", "br0", "up"]);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let ns = format!("lz{name}{id}");
            ok("ip", &["netns", "add", &ns]);
            bed.hosts.push(ns.clone());
            let veth = format!("v{name}");
            ok(
                "ip",
                &[
                    "-n",
                    &bed.bridge,
                    "link",
                    "add",
                    &veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &ns,
                ],
            );
            ok(
                "ip",
                &["-n", &bed.bridge, "link", "set", &veth, "master", "br0"],
            );
            ok("ip", &["-n", &bed.bridge, "link", "set", &veth, "up"]);
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
                    &format!("02:00:00:00:00:0{n}"),
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
                    &format!("2001:2::{n}/64"),
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

    fn host(&self, name: &str) -> &str {
        let i = ["a", "b", "c"]
            .iter()
            .position(|h| *h == name)
            .expect("host");
        &self.hosts[i]
    }

    /// Runs `lazarus ARGS` inside host `name`.
    fn lazarus(&self, name: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.host(name), lazarus_bin()];
        full.extend_from_slice(args);
        ok("ip", &full)
    }

    /// The client's neighbour entry for `addr`: (MAC, state).
    fn neighbour(&self, client: &str, addr: &str) -> Option<(String, String)> {
        let out = ok(
            "ip",
            &[
                "-n",
                self.host(client),
                "neigh",
                "show",
                addr,
                "dev",
                "eth0",
            ],
        );
        let words: Vec<&str> = out.split_whitespace().collect();
        let mac = words
            .iter()
            .position(|w| *w == "lladdr")
            .and_then(|i| words.get(i + 1))?;
        Some((mac.to_string(), words.last().unwrap_or(&"").to_string()))
    }

    /// Makes the client resolve `addr` through real traffic (a TCP connect
    /// attempt; the answer does not matter, the ARP/ND exchange does).
    fn touch(&self, client: &str, addr: &str) {
        // bash's /dev/tcp takes IPv6 literals bare (no brackets).
        let script = format!("exec 3<>/dev/tcp/{addr}/9 2>/dev/null; exit 0");
        let _ = run(
            "ip",
            &[
                "netns",
                "exec",
                self.host(client),
                "timeout",
                "2",
                "bash",
                "-c",
                &script,
            ],
        );
    }

    fn holds(&self, host: &str, addr: &str) -> bool {
        ok(
            "ip",
            &["-n", self.host(host), "addr", "show", "dev", "eth0"],
        )
        .contains(&format!(" {addr}/"))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.bridge)) {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// Polls (bounded: `limit`) until the client's entry for `addr` has `mac`.
fn wait_for_mac(bed: &Testbed, addr: &str, mac: &str, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let entry = bed.neighbour("c", addr);
        if entry.as_ref().is_some_and(|(m, _)| m == mac) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "after {limit:?} the client's entry for {addr} is {entry:?}, expected {mac}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn takeover(vip: &str, prefix: &str, tag: &str) {
    let bed = Testbed::new(tag);
    let with_prefix = format!("{vip}/{prefix}");
    let acquire = [
        "vip",
        "acquire",
        "--iface",
        "eth0",
        "--address",
        &with_prefix,
        "--count",
        "3",
        "--delay",
        "10ms",
    ];
    let release = [
        "vip",
        "release",
        "--iface",
        "eth0",
        "--address",
        &with_prefix,
    ];

    // A holds the VIP; the client learns A's MAC by talking to it.
    bed.lazarus("a", &acquire);
    assert!(bed.holds("a", vip));
    bed.touch("c", vip);
    wait_for_mac(&bed, vip, "02:00:00:00:00:01", Duration::from_secs(3)).expect("client learned A");

    // A releases, B acquires and announces. The client sends nothing: only
    // B's announcement can move its entry, and it must do so at once, inside
    // the kernel's 1 s locktime.
    bed.lazarus("a", &release);
    assert!(!bed.holds("a", vip), "A still holds the VIP after release");
    // Control: B holding the address without announcing it moves nothing,
    // so what moves the entry below is the announcement and only that.
    let mut add = vec![
        "-n",
        bed.host("b"),
        "addr",
        "add",
        with_prefix.as_str(),
        "dev",
        "eth0",
    ];
    if vip.contains(':') {
        add.push("nodad");
    }
    ok("ip", &add);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        bed.neighbour("c", vip).map(|(m, _)| m),
        Some("02:00:00:00:00:01".to_string()),
        "the client's entry moved without an announcement"
    );
    bed.lazarus("b", &acquire);
    assert!(bed.holds("b", vip));
    let took = wait_for_mac(&bed, vip, "02:00:00:00:00:02", Duration::from_secs(1))
        .expect("announcement moved the entry");
    eprintln!("{vip}: client's neighbour entry moved to B {took:?} after B's acquire returned");
    // Exactly one holder.
    assert!(bed.holds("b", vip) && !bed.holds("a", vip));
    // Releasing twice is fine.
    bed.lazarus("b", &release);
    bed.lazarus("b", &release);
    assert!(!bed.holds("b", vip));
}

#[test]
fn test_ipv4_vip_moves_with_gratuitous_arp() {
    takeover("198.18.0.100", "24", "v4");
}

#[test]
fn test_ipv6_vip_moves_with_unsolicited_na() {
    takeover("2001:2::100", "64", "v6");
}
