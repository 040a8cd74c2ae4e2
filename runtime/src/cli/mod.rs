//! Command-line interface: argument definitions and dispatch. Each command
//! returns an exit code; errors carry context for people (anyhow).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lazarus_storage::{CheckpointStore, Codec, JobId};

pub mod bench;
pub mod checkpoints;
pub mod cluster;
pub mod run;

/// Lazarus: checkpointing fault-tolerance runtime for stateful workers.
#[derive(Debug, Parser)]
#[command(name = "lazarus", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job locally: supervisor and agent in this process, workers as
    /// child processes, checkpoints in a local directory by default.
    Run(RunArgs),
    /// Inspect and maintain a job's checkpoints in a store.
    Checkpoints {
        /// Which checkpoint command.
        #[command(subcommand)]
        command: CheckpointsCommand,
    },
    /// Hold, announce or drop a virtual IP on this host (needs
    /// CAP_NET_ADMIN and CAP_NET_RAW). Agents do this on failover; the
    /// command is for operators and tests.
    Vip {
        /// Which VIP command.
        #[command(subcommand)]
        command: VipCommand,
    },
    /// Run the supervisor of a cluster: agents register here, jobs are
    /// submitted here.
    Supervisor(cluster::SupervisorArgs),
    /// Run this host's agent: starts workers for the supervisor and holds
    /// VIPs under leases (needs CAP_NET_ADMIN and CAP_NET_RAW for VIPs).
    Agent(cluster::AgentArgs),
    /// Submit a job to a supervisor.
    Submit(cluster::SubmitArgs),
    /// Show hosts, jobs, placements, VIP holders and leases.
    Status(cluster::StatusArgs),
    /// Stop a job on a supervisor.
    Stop(cluster::StopArgs),
    /// Take a savepoint of a running job (a checkpoint retention never
    /// deletes; `--stop` stops the job at it).
    Savepoint(cluster::SavepointArgs),
    /// Move a worker's primary to another host (restored there from the
    /// last committed checkpoint; with its region).
    Move(cluster::MoveArgs),
    /// Change an operator's parallelism: stop with a savepoint, start again
    /// from it with the key groups spread over the new instances.
    Rescale(cluster::RescaleArgs),
    /// The cluster's certificate authority.
    Ca {
        /// Which CA command.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Certificates for supervisors, agents, operators and viewers.
    Cert {
        /// Which certificate command.
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Store-level tools.
    Storage {
        /// Which storage command.
        #[command(subcommand)]
        command: StorageCommand,
    },
}

/// Arguments of `lazarus run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The job spec (TOML).
    pub spec: PathBuf,
    /// Store URL (overrides the spec's [store] url). Default:
    /// file://<state dir>/store.
    #[arg(long)]
    pub store: Option<String>,
    /// Override a [params] entry: --set KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// SIGKILL a random worker process about this often (for example 500ms;
    /// each gap is drawn from 0.5 to 1.5 times it).
    #[arg(long, value_parser = run::parse_duration_arg)]
    pub chaos_kill_every: Option<std::time::Duration>,
    /// Seed for the choice of chaos victims and moments.
    #[arg(long, default_value_t = 1)]
    pub chaos_seed: u64,
    /// Stop the chaos after this many kills.
    #[arg(long)]
    pub chaos_max_kills: Option<u32>,
    /// Kill only once a checkpoint has committed since the last recovery
    /// (or the start): every kill then rolls back to a checkpoint, and the
    /// job progresses however fast the kills come.
    #[arg(long)]
    pub chaos_after_commit: bool,
    /// Worker logs and local cache (default .lazarus/<job>).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// No status line.
    #[arg(long)]
    pub quiet: bool,
    /// On Ctrl-C, take a final checkpoint before stopping.
    #[arg(long)]
    pub final_checkpoint_on_stop: bool,
    /// Override an operator's parallelism: --parallelism OPERATOR=N
    /// (repeatable; with --from, key groups are spread over the new count).
    #[arg(long = "parallelism", value_name = "OPERATOR=N")]
    pub parallelism: Vec<String>,
    /// Set an operator's per-instance VIPs: --vips OPERATOR=ADDR/PREFIX,...
    #[arg(long = "vips", value_name = "OPERATOR=ADDR/PREFIX,...")]
    pub vips: Vec<String>,
    /// Start from this savepoint (by name) or committed checkpoint (by id)
    /// instead of the newest committed checkpoint.
    #[arg(long, value_name = "SAVEPOINT_OR_ID")]
    pub from: Option<String>,
}

/// Where a job's checkpoints are.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Store URL: file:///abs/dir, s3://bucket/prefix (endpoint and
    /// credentials from AWS_* variables) or memory://.
    #[arg(long, env = "LAZARUS_STORE")]
    pub store: String,
    /// Job name.
    #[arg(long)]
    pub job: String,
}

impl JobArgs {
    fn open(&self) -> anyhow::Result<(CheckpointStore, JobId)> {
        let store = CheckpointStore::open(&self.store)?;
        let job = JobId::new(self.job.clone())?;
        Ok((store, job))
    }
}

/// `lazarus checkpoints …`
#[derive(Debug, Subcommand)]
pub enum CheckpointsCommand {
    /// List a job's checkpoints: id, epoch, time, size, workers, status.
    List {
        #[command(flatten)]
        /// The job.
        job: JobArgs,
    },
    /// Show one checkpoint's manifest (the latest committed by default).
    Inspect {
        #[command(flatten)]
        /// The job.
        job: JobArgs,
        /// Checkpoint id.
        #[arg(long)]
        id: Option<u64>,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every object of a checkpoint (all checkpoints by default).
    /// Exits 0 only when every object is good; names each bad one otherwise.
    Verify {
        #[command(flatten)]
        /// The job.
        job: JobArgs,
        /// Checkpoint id.
        #[arg(long)]
        id: Option<u64>,
    },
    /// Keep the newest N committed checkpoints; delete older ones and every
    /// chunk no kept checkpoint references.
    Gc {
        #[command(flatten)]
        /// The job.
        job: JobArgs,
        /// How many committed checkpoints to keep (at least 1).
        #[arg(long)]
        keep: usize,
    },
    /// Pin a committed checkpoint (the latest by default) under a name:
    /// retention never deletes it; `run`/`submit --from NAME` start from it.
    /// (`lazarus savepoint` does this for a running cluster job.)
    Savepoint {
        #[command(flatten)]
        /// The job.
        job: JobArgs,
        /// The savepoint's name.
        #[arg(long)]
        name: String,
        /// Checkpoint id (default: the latest committed).
        #[arg(long)]
        id: Option<u64>,
    },
    /// Delete a savepoint (its checkpoint then ages out under retention).
    DeleteSavepoint {
        #[command(flatten)]
        /// The job.
        job: JobArgs,
        /// The savepoint's name.
        #[arg(long)]
        name: String,
    },
}

/// `lazarus vip …`
#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// Add the VIP to the interface and announce it (gratuitous ARP in
    /// request and reply form, or unsolicited NA for IPv6).
    Acquire(VipArgs),
    /// Announce the VIP again without adding it.
    Announce(VipArgs),
    /// Remove the VIP from the interface.
    Release(VipArgs),
}

/// Arguments of `lazarus vip …`.
#[derive(Debug, Clone, Args)]
pub struct VipArgs {
    /// Interface.
    #[arg(long)]
    pub iface: String,
    /// Address with prefix, for example 198.18.0.100/24 or 2001:2::100/64.
    #[arg(long)]
    pub address: String,
    /// Announcements per burst.
    #[arg(long, default_value_t = 5)]
    pub count: u32,
    /// Delay between announcements.
    #[arg(long, default_value = "20ms", value_parser = run::parse_duration_arg)]
    pub delay: std::time::Duration,
}

/// `lazarus ca …`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a cluster CA (ca.pem, ca.key) in a new directory.
    Init(cluster::CaInitArgs),
}

/// `lazarus cert …`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a key and certificate for one identity, signed by the CA.
    Issue(cluster::CertIssueArgs),
}

/// `lazarus storage …`
#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Write a checkpoint of generated state, restore it, check it, and print
    /// write and restore throughput. Use it to size a store.
    Bench(BenchArgs),
}

/// Arguments of `lazarus storage bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Store URL.
    #[arg(long, env = "LAZARUS_STORE")]
    pub store: String,
    /// Job to write the checkpoint under.
    #[arg(long, default_value = "lazarus-bench")]
    pub job: String,
    /// Total state size, for example 64MiB or 1GiB.
    #[arg(long, default_value = "256MiB", value_parser = parse_size_arg)]
    pub size: u64,
    /// Payload codec.
    #[arg(long, default_value = "none", value_parser = parse_codec_arg)]
    pub codec: Codec,
    /// Workers the state is split across.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Largest chunk, for example 64MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size_arg)]
    pub chunk_size: u64,
    /// Keep the checkpoint committed in the store (default: delete it after).
    #[arg(long)]
    pub keep: bool,
    /// Local cache directory for the restore (default: a temporary directory).
    #[arg(long)]
    pub cache: Option<PathBuf>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s)
}

fn parse_codec_arg(s: &str) -> Result<Codec, String> {
    s.parse::<Codec>().map_err(|e| e.to_string())
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(&args).await,
        Command::Supervisor(args) => cluster::supervisor(&args).await,
        Command::Agent(args) => cluster::agent(&args).await,
        Command::Submit(args) => cluster::submit(&args).await,
        Command::Savepoint(args) => cluster::savepoint(&args).await,
        Command::Rescale(args) => cluster::rescale(&args).await,
        Command::Move(args) => cluster::move_worker(&args).await,
        Command::Status(args) => cluster::status(&args).await,
        Command::Stop(args) => cluster::stop(&args).await,
        Command::Ca {
            command: CaCommand::Init(args),
        } => cluster::ca_init(&args),
        Command::Cert {
            command: CertCommand::Issue(args),
        } => cluster::cert_issue(&args),
        Command::Checkpoints { command } => match command {
            CheckpointsCommand::List { job } => checkpoints::list(&job).await,
            CheckpointsCommand::Inspect { job, id, json } => {
                checkpoints::inspect(&job, id, json).await
            }
            CheckpointsCommand::Verify { job, id } => checkpoints::verify(&job, id).await,
            CheckpointsCommand::Gc { job, keep } => checkpoints::gc(&job, keep).await,
            CheckpointsCommand::Savepoint { job, name, id } => {
                checkpoints::savepoint(&job, &name, id).await
            }
            CheckpointsCommand::DeleteSavepoint { job, name } => {
                checkpoints::delete_savepoint(&job, &name).await
            }
        },
        Command::Storage {
            command: StorageCommand::Bench(args),
        } => bench::run(&args).await,
        Command::Vip { command } => {
            let (args, op) = match &command {
                VipCommand::Acquire(a) => (a, "acquire"),
                VipCommand::Announce(a) => (a, "announce"),
                VipCommand::Release(a) => (a, "release"),
            };
            let (addr, prefix) = crate::vip::parse_vip(&args.address)?;
            let vip = crate::vip::Vip {
                iface: args.iface.clone(),
                addr,
                prefix,
                count: args.count,
                delay: args.delay,
            };
            match op {
                "acquire" => vip.acquire().await?,
                "announce" => vip.announce().await?,
                _ => vip.release().await?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
