//! The VIP on real hosts: network namespaces on a bridge (198.18.0.0/24 and
//! 2001:2::/64), the `lazarus vip` command run inside them, and the client
//! namespace's kernel neighbour table read with `ip neigh`.
//!
//! Needs root (namespaces, CAP_NET_ADMIN, CAP_NET_RAW) and iproute2; without
//! them the tests fail and say so, they never skip. Every namespace is
//! deleted when a test ends, also when it fails.
// Tests measure wall time; the clock rule is for the runtime's decisions.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::netns::{ok, Testbed};

fn lazarus_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lazarus")
}

/// Runs `lazarus ARGS` inside host `name`.
fn lazarus(bed: &Testbed, name: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", bed.ns(name), lazarus_bin()];
    full.extend_from_slice(args);
    ok("ip", &full)
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
    let bed = Testbed::new(tag, &["a", "b", "c"]);
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
    lazarus(&bed, "a", &acquire);
    assert!(bed.holds("a", vip));
    bed.touch("c", vip);
    wait_for_mac(&bed, vip, "02:00:00:00:00:01", Duration::from_secs(3)).expect("client learned A");

    // A releases, B acquires and announces. The client sends nothing: only
    // B's announcement can move its entry, and it must do so at once, inside
    // the kernel's 1 s locktime.
    lazarus(&bed, "a", &release);
    assert!(!bed.holds("a", vip), "A still holds the VIP after release");
    // Control: B holding the address without announcing it moves nothing,
    // so what moves the entry below is the announcement and only that.
    let mut add = vec![
        "-n",
        bed.ns("b"),
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
    lazarus(&bed, "b", &acquire);
    assert!(bed.holds("b", vip));
    let took = wait_for_mac(&bed, vip, "02:00:00:00:00:02", Duration::from_secs(1))
        .expect("announcement moved the entry");
    eprintln!("{vip}: client's neighbour entry moved to B {took:?} after B's acquire returned");
    // Exactly one holder.
    assert!(bed.holds("b", vip) && !bed.holds("a", vip));
    // Releasing twice is fine.
    lazarus(&bed, "b", &release);
    lazarus(&bed, "b", &release);
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
