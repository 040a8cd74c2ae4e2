//! `lazarus run JOB.toml`: local mode. Supervisor and agent in this process,
//! workers as child processes, a local-directory store by default.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::RunArgs;
use crate::spec::JobSpec;
use crate::supervisor::{self, Chaos, JobState, LocalRun, RunSummary};
use crate::units::format_bytes;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// The store of a local run: `--store`, else the spec's `[store] url`,
/// else a directory under the state directory.
fn choose_store(flag: Option<&str>, spec: Option<&str>, state_dir: &Path) -> String {
    match (flag, spec) {
        (Some(url), _) | (None, Some(url)) => url.to_string(),
        (None, None) => format!("file://{}", state_dir.join("store").display()),
    }
}

/// Runs the job.
pub async fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let mut spec = JobSpec::from_file(&args.spec)?;
    spec.set_params(&args.set)?;
    spec.set_parallelism(&args.parallelism)?;
    spec.set_vips(&args.vips)?;
    spec.validate()?;
    let worker_binary = spec.resolve_worker()?;
    let state_dir = absolute(
        &args
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".lazarus").join(&spec.job.name)),
    )?;
    let store_url = choose_store(args.store.as_deref(), spec.store.url.as_deref(), &state_dir);
    let chaos = args.chaos_kill_every.map(|every| Chaos {
        every,
        seed: args.chaos_seed,
        max_kills: args.chaos_max_kills,
        after_commit: args.chaos_after_commit,
    });
    eprintln!(
        "[lazarus] job {} ({} workers) from {}; store {}; worker binary {}",
        spec.job.name,
        spec.plan().len(),
        args.spec.display(),
        store_url,
        worker_binary.display()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(supervisor::StopRequest::Run);
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("[lazarus] stopping (Ctrl-C again to force)");
            let _ = stop_tx.send(supervisor::StopRequest::Stop);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    let summary = supervisor::run_local(
        LocalRun {
            spec,
            store_url: store_url.clone(),
            worker_binary,
            state_dir,
            chaos,
            status_every: (!args.quiet).then_some(Duration::from_secs(1)),
            final_checkpoint_on_stop: args.final_checkpoint_on_stop,
            epoch_floor: 0,
            adopt_timeout: None,
            from: args.from.clone(),
        },
        stop_rx,
    )
    .await;
    ctrl_c.abort();
    let summary = summary?;
    print_summary(&summary, &store_url);
    Ok(match summary.state {
        JobState::Finished | JobState::Stopped => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

fn print_summary(s: &RunSummary, store: &str) {
    let mut lat = s.checkpoint_latencies.clone();
    lat.sort();
    let mut pauses: Vec<Duration> = s.pauses.iter().map(|(_, p)| *p).collect();
    pauses.sort();
    let state = match &s.state {
        JobState::Failed(why) => format!("FAILED: {why}"),
        other => format!("{other:?}").to_lowercase(),
    };
    println!("job {} (epoch {}): {state}", s.job, s.epoch);
    println!(
        "  {:.1} s, {} source records read (replays included), {} checkpoints committed (newest {}, {}), {} restarts, {} chaos kills ({} during a checkpoint)",
        s.elapsed.as_secs_f64(),
        s.source_records,
        s.committed,
        s.last_checkpoint.map_or("none".into(), |c| c.to_string()),
        format_bytes(s.last_checkpoint_bytes),
        s.restarts,
        s.chaos_kills,
        s.kills_during_checkpoint
    );
    println!(
        "  checkpoint latency p50 {} ms, p99 {} ms; snapshot pause p50 {} us, max {} us",
        percentile(&lat, 0.5).as_millis(),
        percentile(&lat, 0.99).as_millis(),
        percentile(&pauses, 0.5).as_micros(),
        pauses.last().copied().unwrap_or_default().as_micros()
    );
    if s.in_flight_checkpoints > 0 {
        println!(
            "  {} checkpoints kept records in flight (read ahead of their barriers): {} in all; restores processed {} of them again",
            s.in_flight_checkpoints,
            format_bytes(s.in_flight_bytes),
            s.in_flight_restored
        );
    }
    if !s.recoveries.is_empty() {
        let mut totals: Vec<Duration> = s
            .recoveries
            .iter()
            .map(|r| Duration::from_millis(r.total_ms))
            .collect();
        totals.sort();
        let last = s.recoveries.last().expect("not empty");
        println!(
            "  recovery (failure detected -> every worker running): p50 {} ms, p99 {} ms over {}; last {} ms = drain {} + restore {} + connect {}, detected {} after its first sign, then sources back where they were after {}",
            percentile(&totals, 0.5).as_millis(),
            percentile(&totals, 0.99).as_millis(),
            s.recoveries.len(),
            last.total_ms,
            last.drain_ms,
            last.restore_ms,
            last.connect_ms,
            last.detect_ms
                .map_or("(no sign before)".to_string(), |ms| format!("{ms} ms")),
            last.replay_ms
                .map_or("(not known)".to_string(), |ms| format!("{ms} ms of replay"))
        );
    }
    println!(
        "  checkpoints: lazarus checkpoints list --store {store} --job {}",
        s.job
    );
}

/// Parses `--chaos-kill-every` and friends.
pub fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    let d = crate::spec::parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_store_flag_wins_over_the_spec_which_wins_over_the_default() {
        let dir = Path::new("/var/lz");
        assert_eq!(
            choose_store(Some("s3://b/p"), Some("file:///x"), dir),
            "s3://b/p"
        );
        assert_eq!(choose_store(None, Some("file:///x"), dir), "file:///x");
        assert_eq!(choose_store(None, None, dir), "file:///var/lz/store");
    }
}
