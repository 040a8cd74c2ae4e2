//! Streaming benchmarks, each figure beside its baseline from the same run.
//!
//!     cargo bench -p lazarus-benches --bench streaming
//!
//! 1. wordcount records/s (words) with checkpoints every 1 s beside
//!    checkpoints off (only the final one): the overhead in %, best of
//!    `LAZARUS_BENCH_ROUNDS` (default 3) runs each, and the checkpoint
//!    latency; on the generated corpus (`LAZARUS_BENCH_WORDS`, default
//!    10,000,000) and on one with a long tail of distinct words
//!    (`LAZARUS_BENCH_TAIL_WORDS`, default 5,000,000: about 720,000
//!    distinct, like the issue's corpus of source text). Beside it, the
//!    CPU time (user + sys) of the workers and the supervisor per run,
//!    which moves less than wall time with the machine's speed; and the
//!    overhead of each round's pair (off and every 1 s back to back), the
//!    median and range, which a drift of the machine's speed over minutes
//!    moves less than the best of each.
//! 2. checkpoint latency (trigger → commit) p50/p99 and the processing pause
//!    of the snapshot (the synchronous part, per worker and checkpoint) at
//!    keyed-state sizes of 10 MiB, 100 MiB and 1 GiB with 10 % of the key
//!    groups dirtied between checkpoints. The pause should not grow with the
//!    state. `LAZARUS_BENCH_STATE_SIZES` (default `10MiB,100MiB,1GiB`),
//!    `LAZARUS_BENCH_STATE_MS` (run length per size, default 9000).
//!
//! 3. recovery of wordcount from a SIGKILL of one worker (20 kills, one
//!    every 400 ms on average): failure detected → every worker processing
//!    again, p50/p99 and its parts, with the processes that did not fail
//!    rolled back in place (the default) beside every process replaced
//!    (`keep_processes = false`), restart backoff 1 ms in both.
//!
//! `LAZARUS_BENCH_SECTIONS` (default `1,2,3`) picks the sections to run.
//!
//! Workers are real processes (the `lazarus-bench-worker` binary); the store
//! is a local directory under `target/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lazarus::spec::JobSpec;
use lazarus::supervisor::{run_local, JobState, LocalRun, RunSummary};
use lazarus_benches::percentile;

fn run(rt: &tokio::runtime::Runtime, spec: JobSpec, state: &Path) -> RunSummary {
    run_with(rt, spec, state, None)
}

fn run_with(
    rt: &tokio::runtime::Runtime,
    spec: JobSpec,
    state: &Path,
    chaos: Option<lazarus::supervisor::Chaos>,
) -> RunSummary {
    let _ = std::fs::remove_dir_all(state);
    let (_tx, rx) = tokio::sync::watch::channel(lazarus::supervisor::StopRequest::Run);
    let run = LocalRun {
        spec,
        store_url: format!("file://{}", state.join("store").display()),
        worker_binary: PathBuf::from(env!("CARGO_BIN_EXE_lazarus-bench-worker")),
        state_dir: state.to_path_buf(),
        chaos,
        status_every: None,
        final_checkpoint_on_stop: false,
        epoch_floor: 0,
        adopt_timeout: None,
        from: None,
    };
    let summary = rt.block_on(run_local(run, rx)).expect("run");
    assert_eq!(summary.state, JobState::Finished, "{summary:?}");
    summary
}

fn wordcount_spec(dir: &Path, input: &Path, output: &Path, interval: &str) -> JobSpec {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/wordcount/job.toml"
    ))
    .expect("job.toml")
    .replace(
        "interval = \"250ms\"",
        &format!("interval = \"{interval}\""),
    );
    let mut spec = JobSpec::parse(&text, "wordcount", dir.to_path_buf()).expect("spec");
    spec.set_params(&[
        format!("input={}", input.display()),
        format!("output={}", output.display()),
    ])
    .expect("params");
    spec
}

fn state_spec(dir: &Path, bytes: u64, duration_ms: u64) -> JobSpec {
    let text = format!(
        r#"
        [job]
        name = "state-bench"
        worker = "lazarus-bench-worker"
        key_groups = 128
        [checkpoint]
        interval = "1s"
        timeout = "120s"
        codec = "none"
        retention = 2
        [[operator]]
        name = "keys"
        kind = "key-source"
        [[operator]]
        name = "state"
        kind = "state-holder"
        [[edge]]
        from = "keys"
        to = "state"
        partition = "hash"
        [params]
        state_bytes = "{bytes}"
        dirty_percent = "10"
        window_ms = "1000"
        duration_ms = "{duration_ms}"
        rate = "20000"
        "#
    );
    JobSpec::parse(&text, "state-bench", dir.to_path_buf()).expect("spec")
}

/// The machine's speed at the job's own work, for comparing runs across
/// machines and hours: the same count in one thread, in memory, without
/// Lazarus (split on whitespace, count in a `HashMap`, build each output
/// line `word<TAB>count`), in words/s, best of `rounds`.
fn single_thread_words_per_s(text: &str, rounds: usize) -> f64 {
    use std::io::Write;
    let mut best = 0.0f64;
    for _ in 0..rounds.max(1) {
        let start = std::time::Instant::now();
        let mut counts: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        let (mut words, mut out_bytes) = (0u64, 0usize);
        let mut line = Vec::with_capacity(64);
        for w in text.split_whitespace() {
            let c = counts.entry(w).or_insert(0);
            *c += 1;
            line.clear();
            line.extend_from_slice(w.as_bytes());
            line.push(b'\t');
            write!(line, "{c}").expect("in memory");
            out_bytes += line.len();
            words += 1;
        }
        std::hint::black_box(out_bytes);
        best = best.max(words as f64 / start.elapsed().as_secs_f64());
    }
    best
}

/// CPU time (user + system) of this process (the supervisor) and of its
/// children waited for so far (the workers of finished runs).
fn cpu_time() -> Duration {
    let of = |who| {
        // SAFETY: getrusage fills the struct it is given; zeroed is a valid
        // rusage.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut r) };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(r.ru_utime) + tv(r.ru_stime)
    };
    of(libc::RUSAGE_SELF) + of(libc::RUSAGE_CHILDREN)
}

/// The median, least and greatest of `values` (at least one).
fn median_and_range(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Distinct whitespace-separated words of `text`.
fn distinct_words(text: &str) -> usize {
    text.split_whitespace()
        .collect::<std::collections::HashSet<_>>()
        .len()
}

fn main() {
    let base = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/bench-streaming"
    ));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("dir");
    let base = base.canonicalize().expect("canonical");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let sections = std::env::var("LAZARUS_BENCH_SECTIONS").unwrap_or_else(|_| "1,2,3".into());
    let section = |n: &str| sections.split(',').any(|s| s.trim() == n);

    // 1. Throughput with and without checkpoints.
    let words: u64 = std::env::var("LAZARUS_BENCH_WORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let input = base.join("words.txt");
    if section("1") || section("3") {
        wordcount::generate(words, &input, 11).expect("corpus");
    }
    if section("1") {
        // The generated corpus, and one with a long tail of distinct words
        // (the issue's real corpus: 5 M words, 706,554 distinct).
        let tail_words: u64 = std::env::var("LAZARUS_BENCH_TAIL_WORDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5_000_000);
        let tail_input = base.join("words-tail.txt");
        wordcount::generate_with_tail(tail_words, &tail_input, 11, 730_000).expect("corpus");
        let rounds: usize = std::env::var("LAZARUS_BENCH_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3)
            .max(1);
        for (label, corpus, n) in [
            ("generated, skewed 20k-word vocabulary", &input, words),
            ("long tail of distinct words", &tail_input, tail_words),
        ] {
            let text = std::fs::read_to_string(corpus).expect("corpus");
            let distinct = distinct_words(&text);
            let single = single_thread_words_per_s(&text, rounds);
            drop(text);
            let mut on = Vec::new();
            let mut off = Vec::new();
            let mut latencies = Vec::new();
            let (mut cpu_on, mut cpu_off) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                for (interval, out, cpu) in [
                    ("off", &mut off, &mut cpu_off),
                    ("1s", &mut on, &mut cpu_on),
                ] {
                    let dir = base.join(format!("wc-{interval}-{round}"));
                    let spec = wordcount_spec(&base, corpus, &dir.join("out"), interval);
                    let cpu_before = cpu_time();
                    let s = run(&rt, spec, &dir.join("state"));
                    cpu.push(cpu_time().saturating_sub(cpu_before).as_secs_f64());
                    if interval == "1s" {
                        latencies.extend(s.checkpoint_latencies.iter().copied());
                    }
                    out.push(n as f64 / s.elapsed.as_secs_f64());
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            // Each round ran off and every 1 s back to back: the overhead
            // of each pair moves less with the machine's speed over
            // minutes than the best of each does.
            let (wall, wall_lo, wall_hi) = median_and_range(
                on.iter()
                    .zip(&off)
                    .map(|(on, off)| 100.0 * (off - on) / off),
            );
            let (cpu, cpu_lo, cpu_hi) = median_and_range(
                cpu_on
                    .iter()
                    .zip(&cpu_off)
                    .map(|(on, off)| 100.0 * (on - off) / off),
            );
            let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
            let (on, off) = (best(&on), best(&off));
            println!(
                "wordcount, {n} words ({label}: {distinct} distinct), 7 worker processes (best of {rounds} runs each):"
            );
            println!(
                "  {:<44} {:>12.0} words/s",
                "baseline: checkpoints off (final one only)", off
            );
            println!(
                "  {:<44} {:>12.0} words/s   overhead {:.1} %   (checkpoint latency p50 {} ms, p99 {} ms, {} checkpoints)",
                "checkpoints every 1 s",
                on,
                100.0 * (off - on) / off,
                percentile(&latencies, 0.5).as_millis(),
                percentile(&latencies, 0.99).as_millis(),
                latencies.len()
            );
            // CPU time moves less than wall time with the machine's speed:
            // what checkpointing costs in work, the least of the rounds each.
            let least = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
            let (cpu_on, cpu_off) = (least(&cpu_on), least(&cpu_off));
            println!(
                "  {:<44} {:>9.2} s off, {:.2} s every 1 s   overhead {:.1} %   (user + sys of the workers and the supervisor, least of {rounds} runs each)",
                "CPU time",
                cpu_off,
                cpu_on,
                100.0 * (cpu_on - cpu_off) / cpu_off
            );
            println!(
                "  {:<44} wall {:.1} % ({:.1} to {:.1}), CPU {:.1} % ({:.1} to {:.1})   (median of {rounds} back-to-back pairs, range)",
                "overhead per round",
                wall,
                wall_lo,
                wall_hi,
                cpu,
                cpu_lo,
                cpu_hi
            );
            println!(
                "  {:<44} {:>12.0} words/s   (the machine's speed now; Lazarus with checkpoints at {:.2} x it, on 2 cores)",
                "reference: one thread, in memory, no Lazarus",
                single,
                on / single
            );
        }
        let _ = std::fs::remove_file(&tail_input);
    }

    if section("2") {
        // 2. Latency and pause against state size.
        let sizes = std::env::var("LAZARUS_BENCH_STATE_SIZES")
            .unwrap_or_else(|_| "10MiB,100MiB,1GiB".into());
        let state_ms: u64 = std::env::var("LAZARUS_BENCH_STATE_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(9000);
        println!();
        println!("keyed state, 128 key groups, 10 % of them dirtied per 1 s checkpoint interval, codec none:");
        // The pause of the first checkpoint (all the state) is printed
        // apart, as its latency is: it is carried by the acks of the first
        // checkpoint and of the next one (an ack carries the stalls the
        // previous snapshot's serialization caused).
        println!(
            "  {:>10}  {:>14}  {:>14}  {:>14}  {:>14}  {:>14}  {:>14}  {:>14}",
            "state",
            "first ckpt ms",
            "latency p50 ms",
            "latency p99 ms",
            "first pause us",
            "pause p50 us",
            "pause p99 us",
            "pause max us"
        );
        for size in sizes.split(',') {
            let bytes = lazarus::units::parse_size(size).expect("size");
            let dir = base.join(format!("state-{size}"));
            let s = run(&rt, state_spec(&base, bytes, state_ms), &dir);
            let (first, rest) = s
                .checkpoint_latencies
                .split_first()
                .map_or((Duration::ZERO, &[][..]), |(f, r)| (*f, r));
            let first_id = s.pauses.iter().map(|(c, _)| *c).min();
            let (first_pauses, pauses): (Vec<_>, Vec<_>) = s
                .pauses
                .iter()
                .copied()
                .partition(|(c, _)| first_id.is_some_and(|f| c.0 <= f.0 + 1));
            let max = |v: &[(lazarus_storage::CheckpointId, Duration)]| {
                v.iter()
                    .map(|(_, p)| *p)
                    .max()
                    .unwrap_or_default()
                    .as_micros()
            };
            let steady: Vec<Duration> = pauses.iter().map(|(_, p)| *p).collect();
            println!(
                "  {:>10}  {:>14}  {:>14}  {:>14}  {:>14}  {:>14}  {:>14}  {:>14}",
                size,
                first.as_millis(),
                percentile(rest, 0.5).as_millis(),
                percentile(rest, 0.99).as_millis(),
                max(&first_pauses),
                percentile(&steady, 0.5).as_micros(),
                percentile(&steady, 0.99).as_micros(),
                max(&pauses),
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    if section("3") {
        // 3. Recovery from a SIGKILL: rolled back in place against replaced.
        println!();
        println!("wordcount recovery from a SIGKILL of one of its 7 workers (20 kills; restart backoff 1 ms):");
        println!(
            "  {:<40} {:>8} {:>8}   {:>22}",
            "", "p50 ms", "p99 ms", "p50 drain/restore/connect"
        );
        for keep in [false, true] {
            let dir = base.join(format!("recovery-{keep}"));
            let mut spec = wordcount_spec(&base, &input, &dir.join("out"), "250ms");
            spec.restart.backoff = Duration::from_millis(1);
            spec.restart.max_backoff = Duration::from_millis(1);
            spec.restart.keep_processes = keep;
            let chaos = lazarus::supervisor::Chaos {
                every: Duration::from_millis(400),
                seed: 5,
                max_kills: Some(20),
                after_commit: false,
            };
            let s = run_with(&rt, spec, &dir.join("state"), Some(chaos));
            let ms = |f: fn(&lazarus::supervisor::RecoveryTime) -> u64| {
                let v: Vec<Duration> = s
                    .recoveries
                    .iter()
                    .map(|r| Duration::from_millis(f(r)))
                    .collect();
                (
                    percentile(&v, 0.5).as_millis(),
                    percentile(&v, 0.99).as_millis(),
                )
            };
            let (total, total99) = ms(|r| r.total_ms);
            let (drain, restore, connect) = (
                ms(|r| r.drain_ms).0,
                ms(|r| r.restore_ms).0,
                ms(|r| r.connect_ms).0,
            );
            // The optional parts, over the recoveries that have them.
            let known =
                |f: fn(&lazarus::supervisor::RecoveryTime) -> Option<u64>| -> Vec<Duration> {
                    s.recoveries
                        .iter()
                        .filter_map(|r| f(r).map(Duration::from_millis))
                        .collect()
                };
            let (replays, detects) = (known(|r| r.replay_ms), known(|r| r.detect_ms));
            // The slowest recovery's parts: where a p99 comes from.
            let slowest = s
                .recoveries
                .iter()
                .max_by_key(|r| r.total_ms)
                .map(|r| {
                    format!(
                        "slowest {} ms = {}/{}/{}",
                        r.total_ms, r.drain_ms, r.restore_ms, r.connect_ms
                    )
                })
                .unwrap_or_default();
            println!(
                "  {:<40} {:>8} {:>8}   {:>22}   ({slowest}; {} recoveries, {} processes kept; detection p50 {} ms, p99 {} ms over {}; then replay p50 {} ms, p99 {} ms over {})",
                if keep {
                    "processes that did not fail kept"
                } else {
                    "baseline: every process replaced"
                },
                total,
                total99,
                format!("{drain}/{restore}/{connect}"),
                s.recoveries.len(),
                s.kept_processes,
                percentile(&detects, 0.5).as_millis(),
                percentile(&detects, 0.99).as_millis(),
                detects.len(),
                percentile(&replays, 0.5).as_millis(),
                percentile(&replays, 0.99).as_millis(),
                replays.len()
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}
