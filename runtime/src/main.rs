//! The `lazarus` binary: parses arguments, sets up tracing, runs a command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Started by an agent for a `kind = "process"` operator: a worker, not
    // the CLI (it sets up its own tracing and runtime).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == lazarus::service::process::PROCESS_WORKER_ARG)
    {
        return lazarus::service::process::run_process_worker();
    }
    let cli = lazarus::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAZARUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The supervisor's and the agents' threads wait for events and must
    // answer at once: short time slices let them preempt a busy thread
    // when they wake, such as a dying process's teardown during a
    // failover (docs/performance.md). The workers and programs they start
    // get the default slice back.
    lazarus_sdk::latency_critical_alone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(lazarus_sdk::latency_critical_alone)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(lazarus::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
