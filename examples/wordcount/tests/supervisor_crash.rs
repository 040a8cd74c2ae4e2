//! The supervisor of a local run (`lazarus run`, a real process) SIGKILLed
//! in the middle of a commit's sync, then started again: the next run
//! resumes from the newest committed checkpoint and the output is still
//! exactly once.
//!
//! The kills are exact, not timed: the run is traced by `strace`, which
//! delivers SIGKILL as the process enters `fsync` on a path named in
//! advance (a manifest just put, the manifests directory, the epoch
//! markers' directory). So each one lands after a manifest (or an epoch
//! marker) became visible and before its sync returned, where a crash
//! between "written" and "durable" would show. Worker processes are traced
//! too (strace follows forks), so strace ends only once every worker of the
//! killed run has exited: no orphan of an old run writes beside the next.
//!
//! Needs `strace` (scripts/test.sh installs it); fails, never skips,
//! without it.

#[path = "../../../runtime/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lazarus_sdk::storage::{CheckpointId, CheckpointStore, JobId};

mod output;
use output::{assert_same_multiset, expected_lines, output_lines};

/// The example's job with this build's worker, 100 ms checkpoints, and a
/// store and state directory of the test's own.
fn job(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/job.toml"))
        .expect("job.toml")
        .replace(
            "worker = \"wordcount\"",
            &format!("worker = \"{}\"", env!("CARGO_BIN_EXE_wordcount")),
        )
        .replace("interval = \"250ms\"", "interval = \"100ms\"")
        .replace("backoff = \"50ms\"", "backoff = \"10ms\"");
    assert!(text.contains(env!("CARGO_BIN_EXE_wordcount")));
    let path = dir.join("job.toml");
    std::fs::write(&path, text).expect("job");
    path
}

fn run_args(dir: &Path) -> Vec<String> {
    let d = |p: &str| dir.join(p).to_str().expect("utf-8").to_string();
    vec![
        "run".into(),
        d("job.toml"),
        "--set".into(),
        format!("input={}", d("input.txt")),
        "--set".into(),
        format!("output={}", d("out")),
        "--store".into(),
        format!("file://{}", d("store")),
        "--state-dir".into(),
        d("state"),
        "--quiet".into(),
    ]
}

fn store(dir: &Path) -> lazarus_sdk::storage::JobStore {
    CheckpointStore::open(&format!("file://{}", dir.join("store").display()))
        .expect("store")
        .job(JobId::new("wordcount").expect("job"))
}

fn newest(dir: &Path) -> Option<CheckpointId> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(store(dir).latest()).ok().map(|m| m.checkpoint)
}

/// Where in a commit the supervisor dies.
#[derive(Debug, Clone)]
enum At {
    /// Entering `fsync` of this checkpoint's manifest, just put (visible,
    /// not yet durable).
    ManifestFile(CheckpointId),
    /// Entering the run's first `fsync` of the manifests directory: its
    /// first commit, making the new manifest's name durable. (strace counts
    /// `when=` per thread, so only the first is exact.)
    ManifestsDir,
    /// Entering the first `fsync` of the epoch markers' directory: the
    /// run's claim of its epoch.
    Claim,
}

/// Runs `lazarus run` under strace until it is SIGKILLed `at`; returns the
/// run's log. Panics if the run ended any other way, or if its workers
/// outlived it by more than 10 s.
fn run_killed(dir: &Path, at: &At, round: usize) -> String {
    let jobs = dir.join("store/jobs/wordcount");
    let (path, when) = match at {
        At::ManifestFile(n) => (jobs.join(format!("manifests/{:020}.manifest", n.0)), 1),
        At::ManifestsDir => (jobs.join("manifests"), 1),
        At::Claim => (jobs.join("epochs"), 1),
    };
    let log = dir.join(format!("run-{round}.log"));
    let file = std::fs::File::create(&log).expect("log");
    let mut cmd = Command::new("strace");
    // Not `--seccomp-bpf`: with it, strace 6.1 traced the fsync but did
    // not inject the signal into this program's threads.
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync"])
        .arg("-e")
        .arg(format!("inject=fsync:signal=KILL:when={when}"))
        .arg("-P")
        .arg(&path)
        .arg(common::cluster::bin_dir().join("lazarus"))
        .args(run_args(dir))
        .env("LAZARUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file);
    let mut child = cmd
        .spawn()
        .expect("strace (scripts/test.sh installs it: apt-get install strace)");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "round {round} ({at:?}): not killed within 120 s (a worker outliving its supervisor keeps strace waiting)\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // strace ends as its tracee did: by SIGKILL (it kills itself with the
    // tracee's signal), once every traced process is gone.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "round {round} ({at:?}): the run was not killed where asked ({status}); did it end first?\n{text}"
    );
    text
}

#[test]
fn test_supervisor_sigkilled_in_a_commits_sync_resumes_exactly_once() {
    let tmp = tempfile::tempdir().expect("dir");
    let dir = tmp.path();
    job(dir);
    let input = dir.join("input.txt");
    wordcount::generate(2_500_000, &input, 99).expect("corpus");

    // Each round dies at a commit a few checkpoints after the newest one
    // committed so far, so every run makes progress before it dies.
    let mut killed_at = Vec::new();
    for (round, kind) in ["file", "dir", "claim", "file", "dir"].iter().enumerate() {
        let before = newest(dir);
        let at = match *kind {
            "file" => At::ManifestFile(CheckpointId(before.map_or(0, |c| c.0) + 3)),
            "dir" => At::ManifestsDir,
            _ => At::Claim,
        };
        let log = run_killed(dir, &at, round);
        let after = newest(dir);
        // The run that died at a claim committed nothing; every other one
        // committed at least up to the checkpoint it died in.
        match &at {
            At::Claim => assert_eq!(after, before, "round {round}: nothing committed\n{log}"),
            At::ManifestFile(n) => assert_eq!(
                after,
                Some(*n),
                "round {round}: the manifest put before the kill is the newest\n{log}"
            ),
            At::ManifestsDir => assert!(
                after > before,
                "round {round}: checkpoints committed before the kill\n{log}"
            ),
        }
        killed_at.push((at, before, after));
    }

    // Once more, to the end, without strace.
    let out = Command::new(common::cluster::bin_dir().join("lazarus"))
        .args(run_args(dir))
        .output()
        .expect("lazarus run");
    assert!(
        out.status.success(),
        "the last run finished: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("supervisor SIGKILLed in a commit's sync, then resumed: {killed_at:?}");
    assert_same_multiset(&expected_lines(&input), &output_lines(&dir.join("out")));
    // Every checkpoint left in the store is whole.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let js = store(dir);
    for e in rt.block_on(js.list()).expect("list") {
        let m = e.manifest().expect("readable manifest").clone();
        let report = rt.block_on(js.verify(&m)).expect("verify");
        assert!(report.is_ok(), "checkpoint {} is whole", m.checkpoint);
    }
}
