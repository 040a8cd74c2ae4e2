//! `lazarus supervisor`, `agent`, `submit`, `status` and `stop`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use tokio::sync::watch;

use crate::cluster::agent::{run_agent, AgentConfig, AgentOptions};
use crate::cluster::client;
use crate::cluster::config::ClusterConfig;
use crate::cluster::server::{serve, ServerOptions};

/// Arguments of `lazarus supervisor`.
#[derive(Debug, Clone, Args)]
pub struct SupervisorArgs {
    /// Address agents, workers and clients connect to, for example
    /// 198.18.0.1:7070.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Store of submitted jobs whose spec has no [store] url.
    #[arg(long, env = "LAZARUS_STORE")]
    pub store: Option<String>,
    /// Heartbeat, lease and announcement settings (TOML; see
    /// `lazarus::cluster::config`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The supervisor's working directory (default .lazarus/supervisor).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// Arguments of `lazarus agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// This host's name, unique in the cluster.
    #[arg(long)]
    pub name: String,
    /// The supervisor's address.
    #[arg(long)]
    pub supervisor: SocketAddr,
    /// The interface VIPs are added to and announced on.
    #[arg(long)]
    pub iface: String,
    /// Worker logs and local caches (default .lazarus/agent-<name>).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Agent settings (TOML: state_dir, bind_ip); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Arguments of `lazarus submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// The job spec (TOML).
    pub spec: PathBuf,
    /// The supervisor's address.
    #[arg(long, env = "LAZARUS_SUPERVISOR_ADDR")]
    pub supervisor: SocketAddr,
    /// Override a [params] entry: --set KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Arguments of `lazarus status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The supervisor's address.
    #[arg(long, env = "LAZARUS_SUPERVISOR_ADDR")]
    pub supervisor: SocketAddr,
    /// Print JSON (hosts, jobs, placements, VIP holders and leases).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `lazarus stop`.
#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    /// The job.
    pub job: String,
    /// The supervisor's address.
    #[arg(long, env = "LAZARUS_SUPERVISOR_ADDR")]
    pub supervisor: SocketAddr,
}

fn stop_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(true);
    });
    rx
}

/// `lazarus supervisor`.
pub async fn supervisor(args: &SupervisorArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(p) => {
            ClusterConfig::from_file(p).map_err(|e| anyhow::anyhow!("supervisor config {e}"))?
        }
        None => ClusterConfig::default(),
    };
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".lazarus/supervisor"));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    serve(
        ServerOptions {
            listen: args.listen,
            store: args.store.clone(),
            config,
            state_dir,
        },
        stop_on_signals(),
        None,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// `lazarus agent`.
pub async fn agent(args: &AgentArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(p) => AgentConfig::from_file(p).map_err(|e| anyhow::anyhow!("agent config {e}"))?,
        None => AgentConfig::default(),
    };
    let state_dir = args
        .state_dir
        .clone()
        .or(config.state_dir)
        .unwrap_or_else(|| PathBuf::from(format!(".lazarus/agent-{}", args.name)));
    if !crate::vip::interface_exists(&args.iface) {
        anyhow::bail!("--iface {}: no such interface on this host", args.iface);
    }
    run_agent(
        AgentOptions {
            name: args.name.clone(),
            supervisor: args.supervisor,
            iface: args.iface.clone(),
            state_dir,
            bind_ip: config.bind_ip,
        },
        stop_on_signals(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// `lazarus submit`.
pub async fn submit(args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let message = client::submit(args.supervisor, &args.spec, &args.set).await?;
    println!("{message}");
    Ok(ExitCode::SUCCESS)
}

/// `lazarus status`.
pub async fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let report = client::status(args.supervisor).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", client::render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// `lazarus stop`.
pub async fn stop(args: &StopArgs) -> anyhow::Result<ExitCode> {
    let job = lazarus_storage::JobId::new(args.job.clone())?;
    println!("{}", client::stop(args.supervisor, job).await?);
    Ok(ExitCode::SUCCESS)
}
