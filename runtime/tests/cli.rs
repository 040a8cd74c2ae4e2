//! The `lazarus` binary, run as a process: checkpoint commands on real
//! stores, and the errors people get for bad input.
// Tests measure wall time; the clock rule is for the runtime's decisions.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn lazarus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args(args)
        .env_remove("LAZARUS_STORE")
        .output()
        .expect("run lazarus")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn chunk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(chunk_files(&p));
        } else if p.extension().is_some_and(|x| x == "chunk") {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn test_bench_keep_then_verify_catches_a_flipped_chunk_byte() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("file://{}", dir.path().display());
    let out = lazarus(&[
        "storage", "bench", "--store", &url, "--job", "j", "--size", "64MiB", "--keep",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("MiB/s") && t.contains("restored state equals written state"),
        "{t}"
    );

    let out = lazarus(&["checkpoints", "verify", "--store", &url, "--job", "j"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("all 3 objects good"), "{}", text(&out));

    // Flip one byte in the middle of one chunk file.
    let chunks = chunk_files(dir.path());
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    let victim = &chunks[1];
    let mut bytes = std::fs::read(victim).expect("read chunk");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(victim, bytes).expect("write chunk");

    let out = lazarus(&["checkpoints", "verify", "--store", &url, "--job", "j"]);
    assert!(
        !out.status.success(),
        "verify passed a corrupt chunk: {}",
        text(&out)
    );
    let key = victim
        .strip_prefix(dir.path())
        .expect("inside store")
        .to_string_lossy()
        .to_string();
    let t = text(&out);
    assert!(
        t.contains(&format!("BAD {key}")),
        "verify output does not name {key}: {t}"
    );
    assert!(t.contains("CRC mismatch"), "{t}");
    // The other chunk is still reported good.
    assert!(t.contains("(2 good)"), "{t}");
}

#[test]
fn test_list_inspect_gc_on_several_checkpoints() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("file://{}", dir.path().display());
    for codec in ["none", "zstd", "zstd"] {
        let out = lazarus(&[
            "storage",
            "bench",
            "--store",
            &url,
            "--job",
            "k",
            "--size",
            "3MiB",
            "--codec",
            codec,
            "--keep",
            "--workers",
            "3",
            "--chunk-size",
            "512KiB",
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = lazarus(&["checkpoints", "list", "--store", &url, "--job", "k"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(
        t.lines().filter(|l| l.contains("committed")).count(),
        3,
        "{t}"
    );

    let out = lazarus(&[
        "checkpoints",
        "inspect",
        "--store",
        &url,
        "--job",
        "k",
        "--id",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect --json is JSON");
    assert_eq!(manifest["checkpoint"], 2);
    assert_eq!(manifest["workers"].as_object().map(|w| w.len()), Some(3));
    assert_eq!(manifest["workers"]["bench-0"]["chunks"][0]["codec"], "zstd");

    let out = lazarus(&[
        "checkpoints",
        "gc",
        "--store",
        &url,
        "--job",
        "k",
        "--keep",
        "1",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("kept checkpoints: 3") && t.contains("deleted manifests: 1, 2"),
        "{t}"
    );
    assert_eq!(
        chunk_files(dir.path()).len(),
        6,
        "only checkpoint 3's chunks remain"
    );
    let out = lazarus(&["checkpoints", "verify", "--store", &url, "--job", "k"]);
    assert!(out.status.success(), "{}", text(&out));

    let out = lazarus(&[
        "checkpoints",
        "inspect",
        "--store",
        &url,
        "--job",
        "k",
        "--id",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("checkpoint 1 is not committed"),
        "{}",
        text(&out)
    );
}

#[test]
fn test_bench_without_keep_leaves_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("file://{}", dir.path().display());
    let out = lazarus(&[
        "storage", "bench", "--store", &url, "--size", "1MiB", "--codec", "zstd",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(chunk_files(dir.path()).is_empty());
    let out = lazarus(&[
        "checkpoints",
        "list",
        "--store",
        &url,
        "--job",
        "lazarus-bench",
    ]);
    assert!(!out.status.success());
}

#[test]
fn test_bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("file://{}", dir.path().display());
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "checkpoints",
                "list",
                "--store",
                "ftp://host/x",
                "--job",
                "j",
            ],
            "unsupported scheme \"ftp\"",
        ),
        (
            &["checkpoints", "list", "--store", "not a url", "--job", "j"],
            "invalid store URL \"not a url\"",
        ),
        (
            &[
                "checkpoints",
                "list",
                "--store",
                "file://relative/dir",
                "--job",
                "j",
            ],
            "takes no host",
        ),
        (
            &["checkpoints", "list", "--store", "s3://", "--job", "j"],
            "missing bucket",
        ),
        (
            &[
                "checkpoints",
                "list",
                "--store",
                &url,
                "--job",
                "no-such-job",
            ],
            "job no-such-job has no checkpoints",
        ),
        (
            &["checkpoints", "verify", "--store", &url, "--job", "../etc"],
            "invalid job name \"../etc\"",
        ),
        (
            &[
                "checkpoints",
                "gc",
                "--store",
                &url,
                "--job",
                "j",
                "--keep",
                "-1",
            ],
            "--keep",
        ),
        (
            &["storage", "bench", "--store", &url, "--size", "12XB"],
            "unknown unit",
        ),
        (
            &["storage", "bench", "--store", &url, "--codec", "lz4"],
            "expected \"none\" or \"zstd\"",
        ),
        (
            &["storage", "bench", "--store", &url, "--size", "0"],
            "--size must be more than 0",
        ),
        (&["checkpoints", "list", "--job", "j"], "--store"),
        (&["checkpoints", "frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expected) in cases {
        let out = lazarus(args);
        let t = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {t}");
        assert!(
            t.contains(expected),
            "{args:?}: expected {expected:?} in: {t}"
        );
        assert!(!t.contains("panicked"), "{args:?} panicked: {t}");
    }
}

#[test]
fn test_bench_and_verify_against_s3() {
    let endpoint = std::env::var("LAZARUS_TEST_S3_ENDPOINT")
        .expect("LAZARUS_TEST_S3_ENDPOINT is not set: run scripts/test.sh, which starts an S3-compatible server");
    let bucket = std::env::var("LAZARUS_TEST_S3_BUCKET").unwrap_or_else(|_| "lazarus-test".into());
    let url = format!("s3://{bucket}/cli-{}", std::process::id());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lazarus"))
            .args(args)
            .env("AWS_ENDPOINT", &endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .output()
            .expect("run lazarus")
    };
    let out = run(&[
        "storage", "bench", "--store", &url, "--job", "s", "--size", "20MiB", "--codec", "zstd",
        "--keep",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["checkpoints", "verify", "--store", &url, "--job", "s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("all 3 objects good"), "{}", text(&out));
}

const SPEC: &str = r#"
[job]
name = "j"
worker = "WORKER"
[[operator]]
name = "a"
kind = "file-source"
[[operator]]
name = "b"
kind = "file-sink"
parallelism = PAR
[[edge]]
from = "a"
to = "b"
partition = "rebalance"
"#;

fn write_spec(dir: &Path, worker: &str, par: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("job-{n}.toml"));
    std::fs::write(&path, SPEC.replace("WORKER", worker).replace("PAR", par)).expect("write spec");
    path.display().to_string()
}

#[test]
fn test_run_rejects_bad_specs_and_arguments_clearly() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state").display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![write_spec(dir.path(), "wordcount", "0")],
            "operator[1].parallelism: must be between 1 and 256, got 0",
        ),
        (
            vec![write_spec(dir.path(), "no-such-worker-binary", "1")],
            "job.worker: worker binary \"no-such-worker-binary\" not found",
        ),
        (
            vec![write_spec(dir.path(), "./bin/missing", "1")],
            "worker binary \"./bin/missing\" not found",
        ),
        (
            vec![dir.path().join("absent.toml").display().to_string()],
            "absent.toml",
        ),
        (
            vec![
                write_spec(dir.path(), "x", "1"),
                "--set".into(),
                "novalue".into(),
            ],
            "\"novalue\" is not KEY=VALUE",
        ),
        (
            vec![
                write_spec(dir.path(), "x", "1"),
                "--chaos-kill-every".into(),
                "often".into(),
            ],
            "not a duration",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["run".to_string()];
        full.extend(args.clone());
        full.extend(["--state-dir".to_string(), state.clone()]);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = lazarus(&refs);
        let t = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {t}");
        assert!(
            t.contains(expected),
            "{args:?}: expected {expected:?} in: {t}"
        );
        assert!(!t.contains("panicked"), "{t}");
    }
    // Malformed TOML names the line.
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "[job]\nname = \"j\"\nworker = \n").expect("write");
    let out = lazarus(&["run", &path.display().to_string()]);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("broken.toml") && t.contains("line 3"),
        "{t}"
    );
}

#[test]
fn test_cluster_commands_name_bad_input() {
    // No supervisor at that address: a clear error, not a hang.
    let out = lazarus(&["status", "--supervisor", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("connecting to the supervisor at 127.0.0.1:1"),
        "{}",
        text(&out)
    );
    // A bad address.
    let out = lazarus(&["status", "--supervisor", "nowhere"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--supervisor"), "{}", text(&out));
    // A config with a misspelt field.
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("sup.toml");
    std::fs::write(
        &cfg,
        "heartbeat_interval = \"50ms\"\nhost_timout = \"1s\"\n",
    )
    .expect("cfg");
    let out = lazarus(&[
        "supervisor",
        "--listen",
        "127.0.0.1:0",
        "--config",
        cfg.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("unknown field `host_timout`"),
        "{}",
        text(&out)
    );
    // An agent config with a bad field.
    let acfg = dir.path().join("agent.toml");
    std::fs::write(&acfg, "bind_ip = \"not-an-ip\"\n").expect("cfg");
    let out = lazarus(&[
        "agent",
        "--name",
        "a",
        "--supervisor",
        "127.0.0.1:1",
        "--iface",
        "lo",
        "--config",
        acfg.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("agent config") && text(&out).contains("invalid IP"),
        "{}",
        text(&out)
    );
    // An interface that does not exist.
    let out = lazarus(&[
        "agent",
        "--name",
        "a",
        "--supervisor",
        "127.0.0.1:1",
        "--iface",
        "no-such-if0",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--iface no-such-if0"), "{}", text(&out));
}

#[test]
fn test_supervisor_refuses_bad_submissions_and_garbage() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("dir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut sup = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args([
            "supervisor",
            "--listen",
            &addr,
            "--state-dir",
            dir.path().join("sup").to_str().expect("utf-8"),
            "--store",
            &format!("file://{}", dir.path().join("store").display()),
            "--insecure-plaintext",
        ])
        .spawn()
        .expect("supervisor");
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "supervisor did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A spec with an error: the supervisor names it; no store: says so.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[job]\nname = \"j\"\nworker = \"w\"\n[[operator]]\nname = \"x\"\nkind = \"k\"\nparallelism = 0\n").expect("spec");
    let out = lazarus(&[
        "submit",
        bad.to_str().expect("utf-8"),
        "--supervisor",
        &addr,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("operator[0].parallelism"),
        "{}",
        text(&out)
    );
    let vip = dir.path().join("vip.toml");
    std::fs::write(&vip, "[job]\nname = \"j\"\nworker = \"w\"\n[[operator]]\nname = \"x\"\nkind = \"k\"\nparallelism = 2\nvip = \"198.18.0.100/24\"\n").expect("spec");
    let out = lazarus(&[
        "submit",
        vip.to_str().expect("utf-8"),
        "--supervisor",
        &addr,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("operator[0].vip: a VIP is served by one primary"),
        "{}",
        text(&out)
    );
    // Two running jobs cannot serve the same VIP (no agents: the first job
    // waits for a host, still running).
    let worker = env!("CARGO_BIN_EXE_lazarus");
    for (name, expect_ok) in [("j1", true), ("j2", false)] {
        let spec = dir.path().join(format!("{name}.toml"));
        std::fs::write(&spec, format!("[job]\nname = \"{name}\"\nworker = \"{worker}\"\n[[operator]]\nname = \"x\"\nkind = \"k\"\nvip = \"198.18.0.100/24\"\n")).expect("spec");
        let out = lazarus(&[
            "submit",
            spec.to_str().expect("utf-8"),
            "--supervisor",
            &addr,
        ]);
        assert_eq!(out.status.success(), expect_ok, "{name}: {}", text(&out));
        if !expect_ok {
            assert!(
                text(&out).contains("VIP 198.18.0.100/24 is already served by running job j1"),
                "{}",
                text(&out)
            );
        }
    }
    // Garbage on the wire: an error frame back, and the supervisor lives on.
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    let body = br#"{"type":"launch_missiles"}"#;
    s.write_all(&(body.len() as u32).to_le_bytes())
        .expect("write");
    s.write_all(body).expect("write");
    let mut reply = Vec::new();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.read_to_end(&mut reply);
    assert!(
        String::from_utf8_lossy(&reply).contains("unrecognised first message"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    s.write_all(&u32::MAX.to_le_bytes()).expect("write");
    drop(s);
    let out = lazarus(&["status", "--supervisor", &addr, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["hosts"].as_array().map(Vec::len), Some(0));
    let _ = sup.kill();
    let _ = sup.wait();
}

/// Errors a newcomer meets read once and say what to do.
#[test]
fn test_newcomer_errors_name_each_cause_once_with_a_hint() {
    let dir = tempfile::tempdir().expect("dir");
    // A spec path that does not exist: one cause, not the same one twice.
    let missing = dir.path().join("nope.toml");
    let o = lazarus(&["run", missing.to_str().expect("utf-8")]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("cannot read job spec"), "{t}");
    assert_eq!(t.matches("No such file or directory").count(), 1, "{t}");

    // An s3:// store without credentials: named variables, no request sent.
    // Any request would go to the instance metadata address (169.254.169.254)
    // and take seconds to time out; the check is local and immediate.
    let start = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args([
            "checkpoints",
            "list",
            "--store",
            "s3://bucket/prefix",
            "--job",
            "j",
        ])
        .env_remove("LAZARUS_STORE")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE")
        .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .env_remove("LAZARUS_S3_INSTANCE_CREDENTIALS")
        .output()
        .expect("run lazarus");
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("no S3 credentials"), "{t}");
    assert!(
        t.contains("AWS_ACCESS_KEY_ID") && t.contains("AWS_SECRET_ACCESS_KEY"),
        "{t}"
    );
    assert!(t.contains("LAZARUS_S3_INSTANCE_CREDENTIALS"), "{t}");
    assert!(!t.contains("169.254"), "{t}");
    assert_eq!(
        t.lines().filter(|l| l.contains("error")).count(),
        1,
        "once: {t}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "no network wait: {:?}",
        start.elapsed()
    );

    // Half a key pair names the missing half.
    let o = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args([
            "checkpoints",
            "list",
            "--store",
            "s3://bucket/prefix",
            "--job",
            "j",
        ])
        .env_remove("LAZARUS_STORE")
        .env("AWS_ACCESS_KEY_ID", "k")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .expect("run lazarus");
    let t = text(&o);
    assert!(t.contains("AWS_SECRET_ACCESS_KEY is not"), "{t}");
}

/// A daemon without TLS settings refuses to start, naming both ways out;
/// a certificate of the wrong kind is refused naming what it is.
#[test]
fn test_daemons_refuse_to_run_without_tls_unless_told_loudly() {
    let dir = tempfile::tempdir().expect("dir");
    let out = lazarus(&["supervisor", "--listen", "127.0.0.1:0"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("refusing to run without TLS"), "{t}");
    assert!(
        t.contains("--tls DIR") && t.contains("--insecure-plaintext"),
        "{t}"
    );
    let out = lazarus(&[
        "agent",
        "--name",
        "a",
        "--supervisor",
        "127.0.0.1:1",
        "--iface",
        "lo",
    ]);
    assert!(
        text(&out).contains("refusing to run without TLS"),
        "{}",
        text(&out)
    );
    // An operator's certificate does not make a supervisor, nor h1's an h2.
    let ca = dir.path().join("ca");
    assert!(lazarus(&["ca", "init", ca.to_str().expect("utf-8")])
        .status
        .success());
    for (role, name) in [("operator", "alice"), ("agent", "h1")] {
        let out = lazarus(&[
            "cert",
            "issue",
            "--ca",
            ca.to_str().expect("utf-8"),
            "--role",
            role,
            "--name",
            name,
            "--out",
            dir.path().join(name).to_str().expect("utf-8"),
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = lazarus(&[
        "supervisor",
        "--listen",
        "127.0.0.1:0",
        "--tls",
        dir.path().join("alice").to_str().expect("utf-8"),
    ]);
    assert!(
        text(&out)
            .contains("the certificate is operator:alice, this needs a supervisor certificate"),
        "{}",
        text(&out)
    );
    let out = lazarus(&[
        "agent",
        "--name",
        "h2",
        "--supervisor",
        "127.0.0.1:1",
        "--iface",
        "lo",
        "--tls",
        dir.path().join("h1").to_str().expect("utf-8"),
    ]);
    assert!(
        text(&out).contains("the certificate is agent:h1, this needs agent:h2"),
        "{}",
        text(&out)
    );
    // Bad role and name in cert issue.
    let out = lazarus(&[
        "cert",
        "issue",
        "--ca",
        ca.to_str().expect("utf-8"),
        "--role",
        "admin",
        "--name",
        "x",
        "--out",
        dir.path().join("x").to_str().expect("utf-8"),
    ]);
    assert!(
        text(&out).contains("unknown role \"admin\""),
        "{}",
        text(&out)
    );
}

/// Bad HA settings are refused before anything starts, each naming what is
/// wrong; no etcd is contacted.
#[test]
fn test_supervisor_refuses_bad_etcd_settings_clearly() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("sup");
    let state = state.to_str().expect("utf-8");
    let config = dir.path().join("sup.toml");
    let config_s = config.to_str().expect("utf-8");
    let base = ["supervisor", "--insecure-plaintext", "--state-dir", state];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        if !extra.contains(&"--listen") {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        args.extend_from_slice(extra);
        lazarus(&args)
    };
    for (extra, file, needle) in [
        (
            vec!["--etcd", "127.0.0.1:2379"],
            None,
            "must start with http:// or https://",
        ),
        (
            vec!["--etcd", "http://127.0.0.1:2379", "--name", "a b"],
            None,
            "supervisor name \"a b\"",
        ),
        (
            vec!["--config", config_s],
            Some("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nlease = \"1s\"\n"),
            "must be between 2s",
        ),
        (
            vec!["--config", config_s],
            Some("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nlease = \"2500ms\"\n"),
            "must be whole seconds",
        ),
        (
            vec!["--config", config_s],
            Some("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nadopt_timeout = \"1s\"\n"),
            "adopt_timeout",
        ),
        (
            vec!["--config", config_s],
            Some("[etcd]\nendpoint = [\"http://127.0.0.1:2379\"]\n"),
            "unknown field `endpoint`",
        ),
        (
            vec!["--config", config_s],
            Some("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nadvertise = \"somewhere\"\n"),
            "etcd.advertise",
        ),
        (
            vec![
                "--etcd",
                "http://127.0.0.1:2379",
                "--listen",
                "0.0.0.0:7070",
            ],
            None,
            "--advertise",
        ),
    ] {
        if let Some(text) = file {
            std::fs::write(&config, text).expect("config");
        }
        let out = run(&extra);
        assert!(!out.status.success(), "{extra:?} was accepted");
        let t = text(&out);
        assert!(t.contains(needle), "{extra:?}: {needle:?} not in {t:?}");
        assert!(!t.contains("panicked"), "{t}");
    }
}

/// The sample configs under deploy/ parse as the daemons read them.
#[test]
fn test_deploy_samples_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let agent = lazarus::cluster::agent::AgentConfig::from_file(&root.join("agent.toml"))
        .expect("deploy/agent.toml");
    agent.allow_list().expect("allow-lists");
    let notify = agent.notify.expect("[notify]");
    notify.validate().expect("hooks");
    assert!(agent.metrics.is_some());
    lazarus::cluster::config::ClusterConfig::from_file(&root.join("supervisor.toml"))
        .expect("deploy/supervisor.toml");
    for unit in ["lazarus-agent.service", "lazarus-supervisor.service"] {
        let text = std::fs::read_to_string(root.join("systemd").join(unit)).expect("unit");
        assert!(text.contains("ExecStart=/usr/local/bin/lazarus "), "{unit}");
    }
    let agent_unit =
        std::fs::read_to_string(root.join("systemd/lazarus-agent.service")).expect("unit");
    assert!(agent_unit.contains("AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW\n"));
    assert!(agent_unit.contains("User=lazarus"));
}

/// A process-only job runs its program, and a bad `[operator.process]`
/// is refused before anything starts, naming the field.
#[test]
fn test_process_operator_runs_a_program_and_refuses_bad_specs() {
    let t = tempfile::tempdir().expect("tmp");
    let spec = t.path().join("p.toml");
    let marker = t.path().join("ran");
    std::fs::write(
        &spec,
        format!(
            "[job]\nname = \"p\"\n[checkpoint]\ninterval = \"50ms\"\n[[operator]]\nname = \"p\"\nkind = \"process\"\n[operator.process]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"echo $LAZARUS_WORKER > {} && sleep 30\"]\n",
            marker.display()
        ),
    )
    .expect("spec");
    let state = t.path().join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args(["run", spec.to_str().expect("utf-8"), "--state-dir"])
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("lazarus run");
    let start = std::time::Instant::now();
    while !marker.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signals the child started above.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().expect("wait");
    assert!(marker.exists(), "the program ran");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker").trim(),
        "p-0",
        "the program sees its worker's name"
    );
    assert!(status.success(), "stopped cleanly: {status:?}");

    std::fs::write(
        &spec,
        "[job]\nname = \"p\"\n[[operator]]\nname = \"p\"\nkind = \"process\"\n[operator.process]\ncommand = \"sh\"\n",
    )
    .expect("spec");
    let out = lazarus(&["run", spec.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("operator[0].process.command: sh must be an absolute path"),
        "{}",
        text(&out)
    );
}
