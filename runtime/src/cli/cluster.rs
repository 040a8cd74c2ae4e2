//! `lazarus supervisor`, `agent`, `submit`, `status` and `stop`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use tokio::sync::watch;

use crate::cluster::agent::{run_agent, AgentConfig, AgentOptions};
use crate::cluster::client;
use crate::cluster::config::{ClusterConfig, EtcdSettings};
use crate::cluster::server::{serve, ServerOptions};
use crate::cluster::transport::{Acceptor, Dialer};
use crate::security::{Role, TlsMaterial};

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
    #[command(flatten)]
    /// Mutual TLS (a supervisor certificate).
    pub tls: ServeTls,
    /// etcd client URLs, comma-separated (http://HOST:PORT): run as one
    /// of several supervisors, one of them elected leader in etcd. Also
    /// `[etcd] endpoints` in --config.
    #[arg(long, value_delimiter = ',', env = "LAZARUS_ETCD")]
    pub etcd: Vec<String>,
    /// This supervisor's name among the cluster's supervisors (with
    /// --etcd; default: the --listen address).
    #[arg(long)]
    pub name: Option<String>,
    /// Address agents and clients reach this supervisor at (with --etcd;
    /// default: the --listen address).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address (`docs/metrics.md`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

/// TLS for a daemon: a certificate directory, or an explicit opt-out.
#[derive(Debug, Clone, Args)]
pub struct ServeTls {
    /// Directory with ca.pem, cert.pem and key.pem (from `lazarus cert
    /// issue`): every control connection uses mutual TLS and the peer's
    /// role comes from its certificate.
    #[arg(long, value_name = "DIR", conflicts_with = "insecure_plaintext")]
    pub tls: Option<PathBuf>,
    /// Run the control port WITHOUT authentication or encryption: anyone
    /// who reaches it can join, submit and stop. For test setups only.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

/// TLS for a client command.
#[derive(Debug, Clone, Args)]
pub struct ClientTls {
    /// Directory with ca.pem, cert.pem and key.pem of an operator (submit,
    /// stop, status) or viewer (status) certificate.
    #[arg(long, value_name = "DIR", env = "LAZARUS_TLS_DIR")]
    pub tls: Option<PathBuf>,
}

impl ClientTls {
    fn dialer(&self) -> anyhow::Result<Dialer> {
        match &self.tls {
            None => Ok(Dialer::Plain),
            Some(dir) => {
                let m = TlsMaterial::load(dir)?;
                warn_if_expiring(&m);
                Ok(Dialer::tls(m.client_config()?))
            }
        }
    }
}

/// Certificates expiring within this are warned about at start.
const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 86400);

fn warn_if_expiring(m: &TlsMaterial) {
    if let Ok(left) = m.expires_in() {
        if left < EXPIRY_WARNING {
            eprintln!(
                "warning: certificate {} in {} expires in {} days; issue a new one (lazarus cert issue)",
                m.identity,
                m.dir.display(),
                left.as_secs() / 86400
            );
        }
    }
}

/// The TLS material of a daemon that must be `role` (and `name`, if given).
fn daemon_tls(
    tls: &ServeTls,
    role: Role,
    name: Option<&str>,
) -> anyhow::Result<Option<TlsMaterial>> {
    match (&tls.tls, tls.insecure_plaintext) {
        (Some(dir), _) => {
            let m = TlsMaterial::load(dir)?;
            if m.identity.role != role || name.is_some_and(|n| n != m.identity.name) {
                let want = match name {
                    Some(n) => format!("{role:?}:{n}").to_lowercase(),
                    None => format!("a {role:?} certificate").to_lowercase(),
                };
                anyhow::bail!(
                    "--tls {}: the certificate is {}, this needs {want}",
                    dir.display(),
                    m.identity
                );
            }
            warn_if_expiring(&m);
            Ok(Some(m))
        }
        (None, true) => {
            tracing::warn!(
                "INSECURE: the control port runs without TLS; anyone who reaches it is trusted"
            );
            eprintln!("warning: --insecure-plaintext: no authentication and no encryption on the control port");
            Ok(None)
        }
        (None, false) => anyhow::bail!(
            "refusing to run without TLS: pass --tls DIR with this host's certificate \
             (lazarus ca init, then lazarus cert issue), or --insecure-plaintext for a test setup"
        ),
    }
}

/// Arguments of `lazarus agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// This host's name, unique in the cluster.
    #[arg(long)]
    pub name: String,
    /// The supervisor's address; on an HA cluster every supervisor's,
    /// comma-separated (followers send the agent to the leader).
    #[arg(long, value_delimiter = ',', required = true)]
    pub supervisor: Vec<SocketAddr>,
    /// The interface VIPs are added to and announced on.
    #[arg(long)]
    pub iface: String,
    /// Worker logs and local caches (default .lazarus/agent-<name>).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Agent settings (TOML: state_dir, bind_ip, allow-lists, [notify],
    /// metrics); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`docs/metrics.md`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    /// Mutual TLS (an agent certificate for this host's name).
    pub tls: ServeTls,
}

/// Arguments of `lazarus submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// The job spec (TOML).
    pub spec: PathBuf,
    /// The supervisor's address, or several, comma-separated: the first
    /// that answers is asked (followers forward to the leader).
    #[arg(
        long,
        env = "LAZARUS_SUPERVISOR_ADDR",
        value_delimiter = ',',
        required = true
    )]
    pub supervisor: Vec<SocketAddr>,
    /// Override a [params] entry: --set KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Override an operator's parallelism: --parallelism OPERATOR=N
    /// (repeatable; with --from, key groups are spread over the new count).
    #[arg(long = "parallelism", value_name = "OPERATOR=N")]
    pub parallelism: Vec<String>,
    /// Set an operator's per-instance VIPs: --vips OPERATOR=ADDR/PREFIX,...
    /// (repeatable).
    #[arg(long = "vips", value_name = "OPERATOR=ADDR/PREFIX,...")]
    pub vips: Vec<String>,
    /// Start from this savepoint (by name) or committed checkpoint (by id)
    /// instead of the newest committed checkpoint.
    #[arg(long, value_name = "SAVEPOINT_OR_ID")]
    pub from: Option<String>,
    #[command(flatten)]
    /// Client TLS.
    pub tls: ClientTls,
}

/// Arguments of `lazarus savepoint`.
#[derive(Debug, Clone, Args)]
pub struct SavepointArgs {
    /// The job.
    pub job: String,
    /// The savepoint's name (default savepoint-<checkpoint>).
    #[arg(long)]
    pub name: Option<String>,
    /// Stop the job at the savepoint (after a final checkpoint).
    #[arg(long)]
    pub stop: bool,
    /// The supervisor's address, or several, comma-separated.
    #[arg(
        long,
        env = "LAZARUS_SUPERVISOR_ADDR",
        value_delimiter = ',',
        required = true
    )]
    pub supervisor: Vec<SocketAddr>,
    #[command(flatten)]
    /// Client TLS.
    pub tls: ClientTls,
}

/// Arguments of `lazarus move`.
#[derive(Debug, Clone, Args)]
pub struct MoveArgs {
    /// The job.
    pub job: String,
    /// The worker (`<operator>-<index>`, as in `lazarus status`).
    pub worker: String,
    /// The host (agent name) to move it to.
    #[arg(long)]
    pub to: String,
    /// The supervisor's address, or several, comma-separated.
    #[arg(
        long,
        env = "LAZARUS_SUPERVISOR_ADDR",
        value_delimiter = ',',
        required = true
    )]
    pub supervisor: Vec<SocketAddr>,
    #[command(flatten)]
    /// Client TLS.
    pub tls: ClientTls,
}

/// Arguments of `lazarus rescale`.
#[derive(Debug, Clone, Args)]
pub struct RescaleArgs {
    /// The job.
    pub job: String,
    /// The operator to rescale.
    #[arg(long)]
    pub operator: String,
    /// Its new number of instances (1 to the job's key groups).
    #[arg(long)]
    pub parallelism: u32,
    /// A VIP for an added instance of an operator with one VIP per
    /// instance (repeatable, in instance order).
    #[arg(long = "vip", value_name = "ADDR/PREFIX")]
    pub vip: Vec<String>,
    /// The supervisor's address, or several, comma-separated.
    #[arg(
        long,
        env = "LAZARUS_SUPERVISOR_ADDR",
        value_delimiter = ',',
        required = true
    )]
    pub supervisor: Vec<SocketAddr>,
    #[command(flatten)]
    /// Client TLS.
    pub tls: ClientTls,
}

/// Arguments of `lazarus status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The supervisor's address, or several, comma-separated: the first
    /// that answers is asked (followers forward to the leader).
    #[arg(
        long,
        env = "LAZARUS_SUPERVISOR_ADDR",
        value_delimiter = ',',
        required = true
    )]
    pub supervisor: Vec<SocketAddr>,
    /// Print JSON (hosts, jobs, placements, VIP holders and leases).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    /// Client TLS.
    pub tls: ClientTls,
}

/// Arguments of `lazarus stop`.
#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    /// The job.
    pub job: String,
    /// The supervisor's address, or several, comma-separated: the first
    /// that answers is asked (followers forward to the leader).
    #[arg(
        long,
        env = "LAZARUS_SUPERVISOR_ADDR",
        value_delimiter = ',',
        required = true
    )]
    pub supervisor: Vec<SocketAddr>,
    #[command(flatten)]
    /// Client TLS.
    pub tls: ClientTls,
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
    let (acceptor, job_tls, forward) = match daemon_tls(&args.tls, Role::Supervisor, None)? {
        Some(m) => (
            Acceptor::tls(m.server_config()?),
            Some(m.worker_server_config()?),
            Dialer::tls(m.client_config()?),
        ),
        None => (Acceptor::Plain, None, Dialer::Plain),
    };
    let file_etcd = match &args.config {
        Some(p) => {
            EtcdSettings::from_file(p).map_err(|e| anyhow::anyhow!("supervisor config {e}"))?
        }
        None => None,
    };
    let ha = ha_options(args, file_etcd)?;
    if let Some(addr) = args.metrics {
        crate::metrics::install(addr)?;
    }
    serve(
        ServerOptions {
            listen: args.listen,
            store: args.store.clone(),
            config,
            state_dir,
            acceptor,
            job_tls,
            ha,
            forward,
        },
        stop_on_signals(),
        None,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// The HA settings from the flags, then the config file's `[etcd]`.
fn ha_options(
    args: &SupervisorArgs,
    file: Option<EtcdSettings>,
) -> anyhow::Result<Option<crate::ha::HaOptions>> {
    let file = file.unwrap_or_default();
    let endpoints = if args.etcd.is_empty() {
        file.endpoints.clone().unwrap_or_default()
    } else {
        args.etcd.clone()
    };
    if endpoints.is_empty() {
        return Ok(None);
    }
    let advertise = args.advertise.or(file.advertise).unwrap_or(args.listen);
    if advertise.ip().is_unspecified() {
        anyhow::bail!(
            "--advertise: {advertise} is not an address agents can reach; \
             with --etcd and an unspecified --listen, pass --advertise HOST:PORT"
        );
    }
    let ha = crate::ha::HaOptions {
        endpoints,
        prefix: file.prefix.clone().unwrap_or_else(|| "/lazarus".into()),
        name: args
            .name
            .clone()
            .or(file.name.clone())
            .unwrap_or_else(|| advertise.to_string()),
        advertise,
        lease: file.lease.unwrap_or(std::time::Duration::from_secs(3)),
        adopt_timeout: file
            .adopt_timeout
            .unwrap_or(std::time::Duration::from_secs(10)),
    };
    ha.validate()
        .map_err(|e| anyhow::anyhow!("supervisor HA settings: {e}"))?;
    Ok(Some(ha))
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
        .or(config.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(format!(".lazarus/agent-{}", args.name)));
    if !crate::vip::interface_exists(&args.iface) {
        anyhow::bail!("--iface {}: no such interface on this host", args.iface);
    }
    let allow = config
        .allow_list()
        .map_err(|e| anyhow::anyhow!("agent config: {e}"))?;
    if allow.binaries.is_none() {
        eprintln!("warning: no allowed_binaries in the agent config: this agent runs any worker binary a job names");
    }
    if allow.vips.is_none() {
        eprintln!(
            "warning: no allowed_vips in the agent config: this agent holds any VIP a job names"
        );
    }
    if let Some(n) = &config.notify {
        n.validate()
            .map_err(|(f, m)| anyhow::anyhow!("agent config: notify.{f}: {m}"))?;
    }
    if let Some(addr) = args.metrics.or(config.metrics) {
        crate::metrics::install(addr)?;
    }
    let (dialer, ca_file) = match daemon_tls(&args.tls, Role::Agent, Some(&args.name))? {
        Some(m) => (Dialer::tls(m.client_config()?), Some(m.dir.join("ca.pem"))),
        None => (Dialer::Plain, None),
    };
    run_agent(
        AgentOptions {
            name: args.name.clone(),
            supervisors: args.supervisor.clone(),
            iface: args.iface.clone(),
            state_dir,
            bind_ip: config.bind_ip,
            dialer,
            allow,
            ca_file,
            notify: config.notify.clone(),
        },
        stop_on_signals(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// `lazarus submit`.
pub async fn submit(args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let message = client::submit(
        &args.tls.dialer()?,
        &args.supervisor,
        &args.spec,
        &args.set,
        &args.parallelism,
        &args.vips,
        args.from.as_deref(),
    )
    .await?;
    println!("{message}");
    Ok(ExitCode::SUCCESS)
}

/// `lazarus savepoint`.
pub async fn savepoint(args: &SavepointArgs) -> anyhow::Result<ExitCode> {
    let job = lazarus_storage::JobId::new(args.job.clone())?;
    if let Some(name) = &args.name {
        lazarus_storage::Savepoint::check_name(name)?;
    }
    let req = crate::cluster::wire::ClientRequest::Savepoint {
        job,
        name: args.name.clone(),
        stop: args.stop,
    };
    println!(
        "{}",
        client::done(&args.tls.dialer()?, &args.supervisor, req).await?
    );
    Ok(ExitCode::SUCCESS)
}

/// `lazarus move`.
pub async fn move_worker(args: &MoveArgs) -> anyhow::Result<ExitCode> {
    let job = lazarus_storage::JobId::new(args.job.clone())?;
    let req = crate::cluster::wire::ClientRequest::Move {
        job,
        worker: args.worker.clone(),
        host: args.to.clone(),
    };
    println!(
        "{}",
        client::done(&args.tls.dialer()?, &args.supervisor, req).await?
    );
    Ok(ExitCode::SUCCESS)
}

/// `lazarus rescale`.
pub async fn rescale(args: &RescaleArgs) -> anyhow::Result<ExitCode> {
    let job = lazarus_storage::JobId::new(args.job.clone())?;
    if args.parallelism == 0 {
        anyhow::bail!("--parallelism must be at least 1");
    }
    let req = crate::cluster::wire::ClientRequest::Rescale {
        job,
        operator: args.operator.clone(),
        parallelism: args.parallelism,
        vips: args.vip.clone(),
    };
    println!(
        "{}",
        client::done(&args.tls.dialer()?, &args.supervisor, req).await?
    );
    Ok(ExitCode::SUCCESS)
}

/// `lazarus status`.
pub async fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let report = client::status(&args.tls.dialer()?, &args.supervisor).await?;
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
    println!(
        "{}",
        client::stop(&args.tls.dialer()?, &args.supervisor, job).await?
    );
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `lazarus ca init`.
#[derive(Debug, Clone, Args)]
pub struct CaInitArgs {
    /// Directory for ca.pem and ca.key (keep ca.key off the cluster's hosts).
    pub dir: PathBuf,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
}

/// Arguments of `lazarus cert issue`.
#[derive(Debug, Clone, Args)]
pub struct CertIssueArgs {
    /// The CA directory (from `lazarus ca init`).
    #[arg(long)]
    pub ca: PathBuf,
    /// supervisor, agent, operator or viewer.
    #[arg(long)]
    pub role: String,
    /// The name: an agent's host name (it may register only under it), or
    /// who holds an operator or viewer certificate.
    #[arg(long)]
    pub name: String,
    /// Output directory: cert.pem, key.pem (owner only) and ca.pem.
    #[arg(long)]
    pub out: PathBuf,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// `lazarus ca init`.
pub fn ca_init(args: &CaInitArgs) -> anyhow::Result<ExitCode> {
    let cert = crate::security::ca_init(&args.dir, args.days)?;
    println!(
        "cluster CA written: {} (key: {})",
        cert.display(),
        args.dir.join("ca.key").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `lazarus cert issue`.
pub fn cert_issue(args: &CertIssueArgs) -> anyhow::Result<ExitCode> {
    let identity = crate::security::Identity {
        role: args.role.parse()?,
        name: args.name.clone(),
    };
    crate::security::issue(&args.ca, &identity, &args.out, args.days)?;
    println!(
        "certificate for {identity} written to {} (valid {} days)",
        args.out.display(),
        args.days
    );
    Ok(ExitCode::SUCCESS)
}
