//! The deployment of `deploy/systemd`, on the namespace test bed: the
//! supervisor and both agents run as user `nobody`, the supervisor without
//! any capability, the agents with only CAP_NET_ADMIN and CAP_NET_RAW as
//! ambient capabilities. The kv-service with a hot standby still gets its
//! VIP (netlink) announced (raw frames) and fails over on a SIGKILL; its
//! worker processes hold neither capability, in any set.
//!
//! Needs root (to create the test bed and drop to `nobody`); fails, never
//! skips, without it.

#[path = "../../../runtime/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::{self, LzCluster, FAST, NOBODY};
use common::netns::{http, ok, pids_with_env};

const NET_CAPS: u64 = (1 << 12) | (1 << 13);

/// (uid, CapEff, CapPrm, CapInh, CapAmb) of `pid`.
fn creds(pid: u32) -> (String, u64, u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
            .trim_start_matches(name)
            .trim()
            .to_string()
    };
    let cap = |name: &str| u64::from_str_radix(&field(name), 16).expect("hex");
    let uid = field("Uid:")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    (
        uid,
        cap("CapEff:"),
        cap("CapPrm:"),
        cap("CapInh:"),
        cap("CapAmb:"),
    )
}

#[test]
fn test_unprivileged_daemons_hold_and_move_the_vip_and_workers_get_no_capability() {
    let c = LzCluster::start_unprivileged("unp", &["a", "b"], &["cl"], FAST);
    // The daemons: nobody; agents with exactly the two capabilities.
    for a in &c.agents {
        let (uid, eff, prm, _, amb) = creds(a.pid());
        // `ip netns exec` execs setpriv, which execs lazarus: the same pid.
        assert_eq!(uid, NOBODY, "agent {} runs as nobody", a.name);
        assert_eq!(
            (eff, prm, amb),
            (NET_CAPS, NET_CAPS, NET_CAPS),
            "agent {}",
            a.name
        );
    }
    let sup = c.sup.as_ref().expect("supervisor");
    let (uid, eff, prm, _, _) = creds(sup.pid());
    assert_eq!(
        (uid.as_str(), eff, prm),
        (NOBODY, 0, 0),
        "the supervisor holds nothing"
    );

    let worker = c.install_binary(std::path::Path::new(env!("CARGO_BIN_EXE_kv-service")));
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/job.toml"))
        .expect("job.toml")
        .replace(
            "worker = \"kv-service\"",
            &format!("worker = \"{}\"", worker.display()),
        );
    let spec = c.dir.path().join("kv.toml");
    std::fs::write(&spec, text).expect("spec");
    c.submit(&spec, &[]);
    let st = c.wait(
        "kv on its VIP with a following standby",
        Duration::from_secs(30),
        |s| {
            cluster::serving(s, "kv", "kv-0", "198.18.0.100/24")
                .is_some_and(|(w, _)| !w["standby_checkpoint"].is_null())
        },
    );
    let old = cluster::worker(&st, "kv", "kv-0").expect("kv-0")["primary"]
        .as_str()
        .expect("host")
        .to_string();
    let other = if old == "a" { "b" } else { "a" };
    assert!(
        c.bed.holds(&old, "198.18.0.100"),
        "the VIP is on {old} (netlink as nobody)"
    );
    c.bed.touch("cl", "198.18.0.100");
    let (mac, _) = c
        .bed
        .neighbour("cl", "198.18.0.100")
        .expect("neighbour entry");
    assert_eq!(mac, c.bed.mac(&old));

    // Workers: nobody, no network capability in any set.
    let workers = pids_with_env(&c.bed.tag, &["LAZARUS_WORKER=kv-0"]);
    assert_eq!(workers.len(), 2, "primary and standby");
    for pid in &workers {
        let (uid, eff, prm, inh, amb) = creds(*pid);
        assert_eq!(uid, NOBODY);
        assert_eq!(
            (eff | prm | inh | amb) & NET_CAPS,
            0,
            "worker {pid}: eff {eff:x} prm {prm:x} inh {inh:x} amb {amb:x}"
        );
    }

    // A write, a SIGKILL of the primary, the VIP on the other host.
    let addr: SocketAddr = "198.18.0.100:8080".parse().expect("addr");
    let put = c
        .bed
        .in_host("cl", move || {
            http(addr, "PUT", "/kv/k", b"v", Duration::from_secs(5))
        })
        .join()
        .expect("client");
    assert!(matches!(put, Ok((201 | 204, _))), "{put:?}");
    let ip = format!("LAZARUS_BIND_IP={}", c.bed.ip(&old));
    let primary = pids_with_env(
        &c.bed.tag,
        &["LAZARUS_WORKER=kv-0", "LAZARUS_STANDBY=0", &ip],
    );
    assert_eq!(primary.len(), 1);
    ok("kill", &["-KILL", &primary[0].to_string()]);
    c.wait("kv on the other host", Duration::from_secs(20), |s| {
        cluster::serving(s, "kv", "kv-0", "198.18.0.100/24")
            .is_some_and(|(w, _)| w["primary"] == other)
    });
    assert!(c.bed.holds(other, "198.18.0.100") && !c.bed.holds(&old, "198.18.0.100"));
    let got = c
        .bed
        .in_host("cl", move || {
            http(addr, "GET", "/kv/k", b"", Duration::from_secs(5))
        })
        .join()
        .expect("client");
    assert!(
        matches!(got, Ok((200, ref b)) if b == b"v"),
        "{got:?}\n{}",
        c.logs()
    );
}
