//! Wordcount, end to end with real processes: the committed output is
//! compared, as a multiset of lines, with what an independent count of the
//! input predicts, after runs with and without worker processes SIGKILLed at
//! random moments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lazarus::spec::JobSpec;
use lazarus::supervisor::{run_local, Chaos, JobState, LocalRun, RunSummary, StopRequest};
use lazarus_sdk::protocol::IN_FLIGHT_PART;
use lazarus_sdk::storage::{CheckpointStore, JobId};

mod output;
use output::{assert_same_multiset, expected_lines, output_lines};

fn spec(dir: &Path, input: &Path, output: &Path, extra: &str) -> JobSpec {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/job.toml"))
        .expect("job.toml");
    // Faster checkpoints and restarts than the example's defaults, so a test
    // run sees many kills and still makes progress between them.
    let text = text
        .replace("interval = \"250ms\"", "interval = \"100ms\"")
        .replace("backoff = \"50ms\"", "backoff = \"10ms\"")
        .replace("max_backoff = \"1s\"", "max_backoff = \"200ms\"")
        .replace(
            "key_groups = 32",
            "key_groups = 32\nheartbeat_interval = \"50ms\"",
        )
        .replace("[params]", &format!("{extra}\n[params]"));
    let mut spec = JobSpec::parse(&text, "job.toml", dir.to_path_buf()).expect("spec");
    spec.set_params(&[
        format!("input={}", input.display()),
        format!("output={}", output.display()),
    ])
    .expect("params");
    spec
}

async fn run(spec: JobSpec, state: &Path, chaos: Option<Chaos>) -> RunSummary {
    run_on(
        spec,
        state,
        chaos,
        format!("file://{}", state.join("store").display()),
    )
    .await
}

/// A local run of this example's worker binary.
fn local_run(
    spec: JobSpec,
    store_url: &str,
    state: &Path,
    chaos: Option<Chaos>,
    from: Option<&str>,
) -> LocalRun {
    LocalRun {
        spec,
        store_url: store_url.to_string(),
        worker_binary: PathBuf::from(env!("CARGO_BIN_EXE_wordcount")),
        state_dir: state.to_path_buf(),
        chaos,
        status_every: None,
        final_checkpoint_on_stop: false,
        epoch_floor: 0,
        adopt_timeout: None,
        from: from.map(str::to_string),
    }
}

async fn run_on(
    spec: JobSpec,
    state: &Path,
    chaos: Option<Chaos>,
    store_url: String,
) -> RunSummary {
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(StopRequest::Run);
    let run = local_run(spec, &store_url, state, chaos, None);
    tokio::time::timeout(Duration::from_secs(600), run_local(run, stop_rx))
        .await
        .expect("the job finishes within 10 minutes")
        .expect("run")
}

/// Asks a running job to stop (`how`) and waits for its summary.
async fn stop<E: std::fmt::Debug>(
    stop_tx: &tokio::sync::watch::Sender<StopRequest>,
    run: tokio::task::JoinHandle<Result<RunSummary, E>>,
    how: StopRequest,
) -> RunSummary {
    stop_tx.send(how).expect("the run listens");
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("stops promptly")
        .expect("task")
        .expect("run")
}

async fn verify_store(state: &Path) {
    let store =
        CheckpointStore::open(&format!("file://{}", state.join("store").display())).expect("store");
    let js = store.job(JobId::new("wordcount").expect("job"));
    let entries = js.list().await.expect("list");
    assert!(!entries.is_empty());
    for e in entries {
        let m = e.manifest().expect("readable manifest").clone();
        let report = js.verify(&m).await.expect("verify");
        assert!(
            report.is_ok(),
            "checkpoint {} has bad objects: {:?}",
            m.checkpoint,
            report.bad().collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_wordcount_is_exactly_once_with_and_without_sigkills() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.txt");
    wordcount::generate(1_500_000, &input, 42).expect("corpus");
    let expected = expected_lines(&input);
    assert_eq!(expected.values().sum::<u64>(), 1_500_000);

    // Without failures.
    let (out_a, state_a) = (dir.path().join("out-a"), dir.path().join("state-a"));
    let summary = run(spec(dir.path(), &input, &out_a, ""), &state_a, None).await;
    assert_eq!(summary.state, JobState::Finished, "{summary:?}");
    assert_eq!(summary.restarts, 0);
    let clean = output_lines(&out_a);
    assert_same_multiset(&expected, &clean);
    verify_store(&state_a).await;

    // 12 SIGKILLs of random worker processes at random moments (gaps of
    // 75 to 225 ms); some land mid-checkpoint.
    let (out_b, state_b) = (dir.path().join("out-b"), dir.path().join("state-b"));
    let chaos = Chaos {
        every: Duration::from_millis(150),
        seed: 1234,
        max_kills: Some(12),
        after_commit: false,
    };
    let summary = run(spec(dir.path(), &input, &out_b, ""), &state_b, Some(chaos)).await;
    eprintln!("chaos run: {summary:?}");
    assert_eq!(summary.state, JobState::Finished, "{summary:?}");
    assert_eq!(
        summary.chaos_kills, 12,
        "the job ended before every kill: make the input larger"
    );
    assert!(
        summary.kills_during_checkpoint >= 1,
        "no kill landed during a checkpoint: {summary:?}"
    );
    assert!(summary.restarts >= 10, "{summary:?}");
    // Every recovery that got the job running again is timed, its parts
    // adding up (a kill during a recovery extends that recovery).
    assert!(
        !summary.recoveries.is_empty() && summary.recoveries.len() <= summary.restarts as usize,
        "{:?}",
        summary.recoveries
    );
    for r in &summary.recoveries {
        assert_eq!(
            r.drain_ms + r.restore_ms + r.connect_ms,
            r.total_ms,
            "{r:?}"
        );
        assert!(r.total_ms > 0 && r.total_ms < 30_000, "{r:?}");
    }
    // Barriers were found by reading ahead, the records read ahead of
    // them were kept with checkpoints, and restores processed them again:
    // the exact output below covers that path.
    assert!(
        summary.in_flight_checkpoints >= 1 && summary.in_flight_restored >= 1,
        "no records in flight kept and restored: {summary:?}"
    );
    let chaotic = output_lines(&out_b);
    assert_same_multiset(&expected, &chaotic);
    assert_eq!(clean, chaotic, "chaos changed the output");
    verify_store(&state_b).await;
}

/// This test process's children with `LAZARUS_WORKER` set: worker → pid.
fn my_workers() -> HashMap<String, u32> {
    let me = std::process::id();
    let mut found = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // Field 4 of /proc/PID/stat is the parent (after the parenthesised name).
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let after = s.rsplit_once(')')?.1.to_string();
                after.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if parent != Some(me) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in env.split(|b| *b == 0) {
            if let Some(w) = var.strip_prefix(b"LAZARUS_WORKER=") {
                found.insert(String::from_utf8_lossy(w).into_owned(), pid);
            }
        }
    }
    found
}

/// Issue 11, "rollback without restarting survivors": SIGKILLs of random
/// workers replace only those processes; every worker that was not killed
/// keeps its process id across all the recoveries (halted, rolled back in
/// place to the last committed checkpoint), and the output is still
/// exactly once. With `keep_processes = false` every process is replaced,
/// which the same pid check tells apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_workers_that_did_not_fail_keep_their_processes_and_the_output_stays_exact() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.txt");
    wordcount::generate(1_500_000, &input, 7).expect("corpus");
    let expected = expected_lines(&input);
    for keep in [true, false] {
        let out = dir.path().join(format!("out-{keep}"));
        let state = dir.path().join(format!("state-{keep}"));
        let mut spec = spec(dir.path(), &input, &out, "");
        spec.restart.keep_processes = keep;
        // The pids of every worker, first and last seen.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen: HashMap<String, (u32, u32)> = HashMap::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for (w, pid) in my_workers() {
                        seen.entry(w)
                            .and_modify(|e| e.1 = pid)
                            .or_insert((pid, pid));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                seen
            })
        };
        let chaos = Chaos {
            every: Duration::from_millis(300),
            seed: 77,
            max_kills: Some(3),
            // Each kill rolls back to a checkpoint of its attempt, so each
            // recovery has a replay to time, however loaded the machine.
            after_commit: true,
        };
        let summary = run(spec, &state, Some(chaos)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = sampler.join().expect("sampler");
        eprintln!("keep_processes = {keep}: {seen:?}\n{summary:?}");
        assert_eq!(summary.state, JobState::Finished, "{summary:?}");
        assert_eq!(summary.chaos_kills, 3, "make the input larger");
        assert!(summary.restarts >= 3, "{summary:?}");
        // A recovery after the source got past a checkpoint is timed until
        // the source has emitted again what it had emitted since (replay).
        assert!(
            summary.recoveries.iter().any(|r| r.replay_ms.is_some()),
            "no recovery reported its replay: {:?}",
            summary.recoveries
        );
        // A SIGKILLed process is seen to go (its exit or its connection)
        // before the recovery starts: every recovery times its detection,
        // within the root-cause wait.
        assert!(
            summary
                .recoveries
                .iter()
                .all(|r| r.detect_ms.is_some_and(|ms| ms <= 1000)),
            "a recovery without its detection time: {:?}",
            summary.recoveries
        );
        assert_eq!(seen.len(), 7, "every worker seen: {seen:?}");
        let kept: Vec<&String> = seen
            .iter()
            .filter(|(_, (first, last))| first == last)
            .map(|(w, _)| w)
            .collect();
        if keep {
            assert!(
                kept.len() >= 7 - summary.chaos_kills as usize,
                "only {kept:?} kept their processes after {} kills",
                summary.chaos_kills
            );
            assert!(summary.kept_processes >= 3 * 4, "{summary:?}");
        } else {
            assert!(kept.is_empty(), "{kept:?} were not replaced");
            assert_eq!(summary.kept_processes, 0);
        }
        assert_same_multiset(&expected, &output_lines(&out));
        verify_store(&state).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_worker_panicking_on_start_gives_up_clearly_and_keeps_checkpoints() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.txt");
    wordcount::generate(20_000, &input, 3).expect("corpus");
    let (out, state) = (dir.path().join("out"), dir.path().join("state"));
    let good = run(spec(dir.path(), &input, &out, ""), &state, None).await;
    assert_eq!(good.state, JobState::Finished);
    let committed = good.last_checkpoint.expect("a checkpoint");

    let mut bad = spec(dir.path(), &input, &out, "");
    bad.restart.max_attempts = 2;
    bad.set_params(&["panic_on_start=tokenizer".into()])
        .expect("param");
    let summary = run(bad, &state, None).await;
    let JobState::Failed(why) = &summary.state else {
        panic!("expected failure, got {summary:?}")
    };
    assert!(why.contains("gave up after 2 restarts"), "{why}");
    assert!(why.contains("tokenizer-"), "names the worker: {why}");
    assert!(
        why.contains("panic_on_start"),
        "carries the worker's own message: {why}"
    );
    assert_eq!(summary.restarts, 3);
    // Nothing committed was lost.
    let store =
        CheckpointStore::open(&format!("file://{}", state.join("store").display())).expect("store");
    let latest = store
        .job(JobId::new("wordcount").expect("job"))
        .latest()
        .await
        .expect("latest");
    assert_eq!(latest.checkpoint, committed);
    verify_store(&state).await;
    assert_same_multiset(&expected_lines(&input), &output_lines(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_missing_input_fails_with_the_workers_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(
        dir.path(),
        &dir.path().join("no-such-file.txt"),
        &dir.path().join("out"),
        "",
    );
    // A missing input is fatal: no restart, however many are allowed.
    s.restart.max_attempts = 1000;
    let summary = run(s, &dir.path().join("state"), None).await;
    let JobState::Failed(why) = &summary.state else {
        panic!("expected failure, got {summary:?}")
    };
    assert!(why.contains("no-such-file.txt"), "{why}");
    assert!(why.contains("fatal"), "{why}");
    assert_eq!(summary.restarts, 0, "{summary:?}");
    assert_eq!(why.matches("No such file or directory").count(), 1, "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stop_with_final_checkpoint_then_resume_is_exactly_once() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.txt");
    wordcount::generate(3_000_000, &input, 9).expect("corpus");
    let (out, state) = (dir.path().join("out"), dir.path().join("state"));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(StopRequest::Run);
    let first = LocalRun {
        spec: spec(dir.path(), &input, &out, ""),
        store_url: format!("file://{}", state.join("store").display()),
        worker_binary: PathBuf::from(env!("CARGO_BIN_EXE_wordcount")),
        state_dir: state.clone(),
        chaos: None,
        status_every: None,
        final_checkpoint_on_stop: true,
        epoch_floor: 0,
        adopt_timeout: None,
        from: None,
    };
    let handle = tokio::spawn(run_local(first, stop_rx));
    // Stop once the first output is committed (checkpoints come every 100
    // ms; the whole input takes over a second even on an idle machine, so
    // a fixed wait could see it done): bounded, 20 s.
    let waited = std::time::Instant::now();
    while !out.exists() || output_lines(&out).is_empty() {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "no output committed within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped = stop(&stop_tx, handle, StopRequest::Stop).await;
    // Stopped with a final checkpoint: every worker exited, output so far committed.
    assert!(
        matches!(stopped.state, JobState::Finished | JobState::Stopped),
        "{stopped:?}"
    );
    let partial: u64 = output_lines(&out).values().sum();
    assert!(
        partial > 0 && partial < 3_000_000,
        "stopped mid-way: {partial} lines"
    );
    // A second run resumes from the final checkpoint and completes the job.
    let resumed = run(spec(dir.path(), &input, &out, ""), &state, None).await;
    assert_eq!(resumed.state, JobState::Finished, "{resumed:?}");
    assert!(
        resumed.epoch > stopped.epoch,
        "a new supervisor takes a new epoch"
    );
    assert_same_multiset(&expected_lines(&input), &output_lines(&out));
    verify_store(&state).await;
}

/// Test 4 and 5 of active-active/savepoints: stop with a final checkpoint,
/// pin it as a savepoint, then start again from it with the counters (and
/// the sinks chained to them by `forward` edges) rescaled 2 -> 4, under
/// SIGKILLs. The output stays exactly once, so every count continued from
/// the savepoint's state; the savepoint survives retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rescale_from_a_savepoint_is_exactly_once() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.txt");
    wordcount::generate(3_000_000, &input, 11).expect("corpus");
    let (out, state) = (dir.path().join("out"), dir.path().join("state"));
    let store_url = format!("file://{}", state.join("store").display());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(StopRequest::Run);
    let first = local_run(
        spec(dir.path(), &input, &out, ""),
        &store_url,
        &state,
        None,
        None,
    );
    let handle = tokio::spawn(run_local(first, stop_rx));
    // Stopped as soon as a checkpoint has published output (a fixed delay
    // raced the job's end on a fast run): mid-way, with counts to carry.
    let started = std::time::Instant::now();
    let published = |out: &Path| {
        std::fs::read_dir(out).is_ok_and(|d| {
            d.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.') && !name.starts_with('_')
            })
        })
    };
    while !published(&out) && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = stop(&stop_tx, handle, StopRequest::StopWithCheckpoint).await;
    assert_eq!(
        stopped.state,
        JobState::Finished,
        "the final checkpoint committed: {stopped:?}"
    );
    let js = CheckpointStore::open(&store_url)
        .expect("store")
        .job(JobId::new("wordcount").expect("job"));
    let at = js.latest().await.expect("latest").checkpoint;
    assert_eq!(Some(at), stopped.last_checkpoint);
    js.create_savepoint("before-rescale", at)
        .await
        .expect("savepoint");
    let in_flight = holding_in_flight(&js.manifest(at).await.expect("manifest"));
    assert!(
        in_flight.is_empty(),
        "the final checkpoint aligns its barriers in order, so it holds nothing in flight: {in_flight:?}"
    );
    let partial: u64 = output_lines(&out).values().sum();
    assert!(
        partial > 0 && partial < 3_000_000,
        "stopped mid-way: {partial} lines"
    );

    // Rescale: counter and sink (forward-chained) to 4, from the savepoint.
    let mut rescaled = spec(dir.path(), &input, &out, "");
    rescaled
        .set_parallelism(&["counter=4".into(), "sink=4".into()])
        .expect("parallelism");
    rescaled.validate().expect("valid");
    let chaos = Chaos {
        every: Duration::from_millis(700),
        seed: 5,
        max_kills: Some(3),
        after_commit: false,
    };
    let second = local_run(
        rescaled,
        &store_url,
        &state,
        Some(chaos),
        Some("before-rescale"),
    );
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(StopRequest::Run);
    let resumed = tokio::time::timeout(Duration::from_secs(600), run_local(second, stop_rx))
        .await
        .expect("finishes")
        .expect("run");
    assert_eq!(resumed.state, JobState::Finished, "{resumed:?}");
    assert_same_multiset(&expected_lines(&input), &output_lines(&out));
    let last = js.latest().await.expect("latest");
    for w in ["counter-3", "sink-3"] {
        assert!(
            last.workers.keys().any(|k| k.as_str() == w),
            "the rescaled job has {w}: {:?}",
            last.workers.keys().collect::<Vec<_>>()
        );
    }
    // Retention (keep 3) ran many times: the savepoint is still there, whole.
    let pinned = js.resolve_start("before-rescale").await.expect("pinned");
    assert_eq!(pinned.checkpoint, at);
    assert!(js.verify(&pinned).await.expect("verify").is_ok());
    assert!(
        js.list().await.expect("list").len() <= 4,
        "retention still deletes unpinned checkpoints"
    );
    verify_store(&state).await;
}

/// The workers of `manifest` whose snapshot keeps records in flight.
fn holding_in_flight(manifest: &lazarus_sdk::storage::Manifest) -> Vec<String> {
    manifest
        .workers
        .iter()
        .filter(|(_, s)| s.chunks.iter().any(|c| c.name() == IN_FLIGHT_PART))
        .map(|(w, _)| w.to_string())
        .collect()
}

/// A periodic checkpoint keeps the records its workers read ahead of the
/// barriers (in flight). Resumed from one with the counters and sinks
/// rescaled 2 -> 4, each of those records goes to the new instance that
/// owns its key, is processed once before any new input, and the output is
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rescale_from_a_periodic_checkpoint_carries_its_records_in_flight() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.txt");
    wordcount::generate(2_000_000, &input, 17).expect("corpus");
    let (out, state) = (dir.path().join("out"), dir.path().join("state"));
    let store_url = format!("file://{}", state.join("store").display());
    let js = CheckpointStore::open(&store_url)
        .expect("store")
        .job(JobId::new("wordcount").expect("job"));
    let local = |spec: JobSpec| local_run(spec, &store_url, &state, None, None);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(StopRequest::Run);
    let handle = tokio::spawn(run_local(
        local(spec(dir.path(), &input, &out, "")),
        stop_rx,
    ));
    // Stopped (no final checkpoint) once a committed checkpoint keeps
    // records in flight to a counter or a sink: the pipeline runs flat
    // out, so their inputs are full at nearly every checkpoint.
    let rescaled_op = |w: &String| w.starts_with("counter-") || w.starts_with("sink-");
    let started = std::time::Instant::now();
    loop {
        if let Ok(m) = js.latest().await {
            if holding_in_flight(&m).iter().any(rescaled_op) {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30) && !handle.is_finished(),
            "no checkpoint kept records in flight to a counter or a sink"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped = stop(&stop_tx, handle, StopRequest::Stop).await;
    assert_eq!(stopped.state, JobState::Stopped, "{stopped:?}");
    let at = js.latest().await.expect("latest");
    let holders = holding_in_flight(&at);
    assert!(
        holders.iter().any(rescaled_op),
        "checkpoint {} (the newest; a stop took it at most one interval after the one found) keeps no records in flight to a counter or a sink: {holders:?}",
        at.checkpoint
    );

    let mut rescaled = spec(dir.path(), &input, &out, "");
    rescaled
        .set_parallelism(&["counter=4".into(), "sink=4".into()])
        .expect("parallelism");
    rescaled.validate().expect("valid");
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(StopRequest::Run);
    let resumed = tokio::time::timeout(
        Duration::from_secs(600),
        run_local(local(rescaled), stop_rx),
    )
    .await
    .expect("finishes")
    .expect("run");
    assert_eq!(resumed.state, JobState::Finished, "{resumed:?}");
    assert!(
        resumed.in_flight_restored >= 1,
        "the restore processed no records in flight: {resumed:?}"
    );
    assert_same_multiset(&expected_lines(&input), &output_lines(&out));
    verify_store(&state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_wordcount_on_s3_store_with_sigkills() {
    // Workers inherit AWS_ENDPOINT, AWS_ALLOW_HTTP and the credentials that
    // scripts/test.sh exports for its S3 server.
    let endpoint = std::env::var("LAZARUS_TEST_S3_ENDPOINT")
        .expect("LAZARUS_TEST_S3_ENDPOINT is not set: run scripts/test.sh, which starts an S3-compatible server");
    assert!(
        std::env::var("AWS_ENDPOINT").is_ok_and(|e| e == endpoint),
        "AWS_ENDPOINT must point at LAZARUS_TEST_S3_ENDPOINT for the worker processes"
    );
    let bucket = std::env::var("LAZARUS_TEST_S3_BUCKET").unwrap_or_else(|_| "lazarus-test".into());
    let url = format!("s3://{bucket}/wordcount-{}", std::process::id());
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.txt");
    wordcount::generate(300_000, &input, 5).expect("corpus");
    let out = dir.path().join("out");
    let chaos = Chaos {
        every: Duration::from_millis(300),
        seed: 99,
        max_kills: Some(2),
        after_commit: false,
    };
    let summary = run_on(
        spec(dir.path(), &input, &out, ""),
        &dir.path().join("state"),
        Some(chaos),
        url.clone(),
    )
    .await;
    assert_eq!(summary.state, JobState::Finished, "{summary:?}");
    assert!(summary.committed >= 1);
    assert_same_multiset(&expected_lines(&input), &output_lines(&out));
    let js = CheckpointStore::open(&url)
        .expect("store")
        .job(JobId::new("wordcount").expect("job"));
    let entries = js.list().await.expect("list");
    assert!(!entries.is_empty(), "no checkpoint reached the S3 store");
    for e in entries {
        let m = e.manifest().expect("manifest").clone();
        assert!(
            js.verify(&m).await.expect("verify").is_ok(),
            "checkpoint {} on S3",
            m.checkpoint
        );
    }
}

/// The pid of this test process's child running `worker`, if any.
fn child_worker(worker: &str) -> Option<u32> {
    let me = std::process::id().to_string();
    let want = format!("LAZARUS_WORKER={worker}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name: state, ppid, ...
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1));
        if ppid != Some(me.as_str()) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// A worker that hangs (SIGSTOP: alive, connected, silent) is caught by the
/// heartbeat timeout, not by an exit, and the job still ends exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_frozen_worker_is_caught_by_missed_heartbeats() {
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.txt");
    wordcount::generate(3_000_000, &input, 5).expect("corpus");
    let (out, state) = (dir.path().join("out"), dir.path().join("state"));
    let mut s = spec(dir.path(), &input, &out, "");
    s.job.heartbeat_timeout = Duration::from_millis(800);
    let job_state = state.clone();
    let job = tokio::spawn(async move { run(s, &job_state, None).await });
    // Bounded: the tokenizer runs within 30 s, then it is frozen.
    let start = std::time::Instant::now();
    let pid = loop {
        if let Some(pid) = child_worker("tokenizer-0") {
            break pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no tokenizer-0 process"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let summary = job.await.expect("job task");
    assert_eq!(summary.state, JobState::Finished, "{summary:?}");
    assert!(summary.restarts >= 1, "{summary:?}");
    let why = summary.last_failure.clone().unwrap_or_default();
    assert!(
        why.contains("missed heartbeats"),
        "the frozen worker was found by its heartbeats: {why}"
    );
    // Its detection is timed from its last heartbeat: the timeout, and at
    // most one supervisor tick and heartbeat interval more.
    let detect = summary.recoveries.first().and_then(|r| r.detect_ms);
    assert!(
        detect.is_some_and(|ms| (800..=2000).contains(&ms)),
        "detection of a frozen worker: {:?}",
        summary.recoveries
    );
    assert_same_multiset(&expected_lines(&input), &output_lines(&out));
}
