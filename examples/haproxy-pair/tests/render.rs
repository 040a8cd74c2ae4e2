//! The example's templates, rendered by `render.sh` as an operator would,
//! are valid job specs (and a valid HAProxy config, where HAProxy is
//! installed); broken settings are refused by name. No root needed.

use std::path::Path;
use std::process::Command;

fn render(out: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("render.sh");
    Command::new("bash")
        .arg(script)
        .arg(out)
        .envs(env.iter().copied())
        .output()
        .expect("bash")
}

const ENV: [(&str, &str); 5] = [
    ("VIP", "198.18.0.100/24"),
    ("LB_HOSTS", "lb1 lb2"),
    ("BACKENDS", "be1=198.18.0.4 be2=198.18.0.5 be3=198.18.0.6"),
    ("DB", "host=198.18.0.7 user=postgres dbname=postgres"),
    ("API", "/usr/local/lib/lazarus/workers/employees-api"),
];

#[test]
fn test_rendered_specs_are_valid_jobs() {
    let t = tempfile::tempdir().expect("tmp");
    let out = render(t.path(), &ENV);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lb = lazarus::spec::JobSpec::from_file(&t.path().join("lb.toml")).expect("lb.toml");
    let plan = lb.plan();
    assert_eq!(plan.len(), 1);
    let w = &plan[0];
    assert_eq!(w.kind, "process");
    assert_eq!(w.hosts, ["lb1", "lb2"]);
    assert_eq!(w.vips, ["198.18.0.100/24"]);
    let health = w.health.as_ref().expect("a health check");
    assert_eq!(
        health.port,
        Some(80),
        "the check probes the operator's port"
    );
    assert!(lb.notify.as_ref().is_some_and(|n| !n.is_empty()));
    assert!(
        lb.job.worker.is_empty(),
        "a process-only job names no worker binary"
    );
    for n in 1..=3 {
        let api = lazarus::spec::JobSpec::from_file(&t.path().join(format!("api-{n}.toml")))
            .expect("api spec");
        let w = &api.plan()[0];
        assert_eq!(w.hosts, [format!("be{n}")]);
        let p = w.process.as_ref().expect("a program");
        assert_eq!(p.env["EMPLOYEES_NAME"], format!("api-{n}"));
    }
    if Path::new("/usr/sbin/haproxy").exists() {
        let cfg = t.path().join("haproxy.cfg");
        let check = Command::new("/usr/sbin/haproxy")
            .args(["-c", "-f", cfg.to_str().expect("utf-8")])
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}

#[test]
fn test_missing_settings_are_named() {
    let t = tempfile::tempdir().expect("tmp");
    let out = render(t.path(), &ENV[1..]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set VIP"));
}

#[test]
fn test_bad_process_specs_are_refused_by_field() {
    let base = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("lb.toml.in"))
        .expect("template")
        .replace("@NOTIFY@", "/usr/local/bin/notify")
        .replace("@VIP@", "198.18.0.100/24")
        .replace("@PORT@", "80")
        .replace("@LB_HOSTS@", "\"lb1\", \"lb2\"")
        .replace("@HAPROXY@", "/usr/sbin/haproxy")
        .replace("@HAPROXY_CFG@", "/etc/haproxy/haproxy.cfg");
    let parse = |text: &str| lazarus::spec::JobSpec::parse(text, "lb.toml", ".".into());
    parse(&base).expect("the template is valid");
    for (from, to, field) in [
        (
            "command = \"/usr/sbin/haproxy\"",
            "command = \"haproxy\"",
            "operator[0].process.command",
        ),
        (
            "hosts = [\"lb1\", \"lb2\"]",
            "hosts = [\"lb1\"]",
            "operator[0].hosts",
        ),
        ("fall = 3", "fall = 0", "operator[0].health.fall"),
        (
            "kind = \"http\"",
            "kind = \"exec\"",
            "operator[0].health.command",
        ),
        (
            "stop_signal = \"SIGUSR1\"",
            "stop_signal = \"SIGWHAT\"",
            "operator[0].process.stop_signal",
        ),
        (
            "primary = [\"/usr/local/bin/notify\", \"primary\"]",
            "primary = [\"notify\"]",
            "notify.primary",
        ),
        ("kind = \"process\"", "kind = \"haproxy\"", "job.worker"),
        (
            "[operator.process]",
            "[operator.process]\nstate_dir = \"/var/lib/x\"",
            "operator[0].process.state_dir",
        ),
    ] {
        assert!(base.contains(from), "{from}");
        let text = base.replacen(from, to, 1);
        let err = parse(&text).expect_err(field).to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}
