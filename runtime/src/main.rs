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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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
