//! The worker process main loop. A worker author's `main` is one call:
//! [`run_worker`]. Everything else happens here:
//!
//! 1. connect to the supervisor (`LAZARUS_SUPERVISOR`), say hello, get the
//!    [`Assignment`];
//! 2. restore state from the assigned checkpoint (through the local cache);
//!    sinks recover (publish what that checkpoint committed, drop the rest);
//! 3. listen for inputs, report the address, connect outputs when told;
//! 4. process: records in, records routed out over bounded channels (a slow
//!    consumer applies backpressure all the way up); barriers aligned across
//!    inputs (an input that delivered barrier `n` is not read again until
//!    every input has); at alignment, snapshot (freeze only), forward the
//!    barrier, and hand the frozen parts to the uploader, which serializes
//!    and writes them off the processing path and then acks;
//! 5. sinks publish on `Committed`; heartbeats carry progress; `Shutdown`
//!    exits cleanly. Any error exits non-zero: the supervisor rolls the job
//!    back to the last committed checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lazarus_storage::{
    CheckpointId, CheckpointStore, ChunkRef, Codec, JobStore, LocalCache, Manifest, WorkerId,
    WorkerSnapshot,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::align::BarrierAligner;
use crate::decoded::DecodedParts;
use crate::in_flight::{InFlight, InputItem, ReadAhead};
use crate::link::{Adoption, LinkState};
use crate::operator::{BoxError, Context, Registry, Role};
use crate::protocol::{self, Assignment, DataMsg, Partition, ToSupervisor, ToWorker};
use crate::record::{group_owner, key_group, Emitter, Record};
use crate::state::{PartContent, Restored, Snapshot};

type Result<T, E = BoxError> = std::result::Result<T, E>;

/// The most records in one data frame.
const BATCH: usize = 1024;
/// Records a source emits per poll: small, so a trigger (handled between
/// polls) is not kept waiting and little is in flight ahead of a barrier.
const SOURCE_BATCH: usize = 256;
/// Data frames buffered per output channel before the sender waits.
const CHANNEL_DEPTH: usize = 4;
/// The longest a worker with inputs works between two chances for its
/// control messages to reach it (see [`ControlWindow`]).
const CONTROL_EVERY: Duration = Duration::from_micros(500);
/// Kernel socket buffers of data channels. Small on purpose: everything in
/// flight must drain before a barrier passes (aligned checkpoints), so
/// buffering bounds checkpoint latency under backpressure.
const SOCKET_BUFFER: u32 = 64 << 10;

/// Runs this process as a Lazarus worker with the operator kinds in
/// `registry`, and returns its exit code. Configuration comes from the
/// environment the agent sets: `LAZARUS_SUPERVISOR` (address),
/// `LAZARUS_WORKER` (worker id), `LAZARUS_ATTEMPT`, and optionally
/// `LAZARUS_BIND_IP` (data listener address, default 127.0.0.1),
/// `LAZARUS_STANDBY=1` (start as a hot standby) and
/// `LAZARUS_LOG` (tracing filter); on an HA cluster `LAZARUS_REJOIN_FILE`
/// (where a new leader's ticket appears: the worker survives a supervisor
/// failover) and `LAZARUS_REJOIN_TIMEOUT_MS` (how long it waits for one).
///
/// ```no_run
/// use lazarus_sdk::*;
/// struct Pass;
/// impl Operator for Pass {
///     fn process(&mut self, r: Record, out: &mut Emitter) -> Result<(), BoxError> { out.emit(r); Ok(()) }
/// }
/// fn main() -> std::process::ExitCode {
///     run_worker(Registry::new().operator("pass", |_| Ok(Pass)))
/// }
/// ```
pub fn run_worker(registry: Registry) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAZARUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let env = match WorkerEnv::from_env() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("lazarus worker: {e} (this binary is started by a lazarus agent)");
            return ExitCode::from(2);
        }
    };
    crate::tuning::fixed_mmap_threshold();
    crate::exit_word::arm();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lazarus worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let worker = env.worker.clone();
    crate::tuning::latency_critical();
    match runtime.block_on(main_loop(Arc::new(registry), env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazarus worker {worker}: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) struct WorkerEnv {
    pub(crate) supervisor: SocketAddr,
    pub(crate) worker: WorkerId,
    pub(crate) attempt: u64,
    pub(crate) bind_ip: IpAddr,
    pub(crate) standby: bool,
    /// This process's credential toward the supervisor.
    pub(crate) token: Option<String>,
    /// The cluster CA (`LAZARUS_CA`): connect to the supervisor over TLS.
    pub(crate) ca: Option<std::path::PathBuf>,
    /// Where the agent puts a new leader's ticket (`LAZARUS_REJOIN_FILE`,
    /// HA clusters only): the worker survives a supervisor failover.
    pub(crate) rejoin_file: Option<std::path::PathBuf>,
}

impl WorkerEnv {
    fn from_env() -> Result<WorkerEnv> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
        };
        let supervisor = var("LAZARUS_SUPERVISOR")?
            .parse()
            .map_err(|e| format!("LAZARUS_SUPERVISOR: {e}"))?;
        let worker = WorkerId::new(var("LAZARUS_WORKER")?)?;
        let attempt = var("LAZARUS_ATTEMPT")?
            .parse()
            .map_err(|e| format!("LAZARUS_ATTEMPT: {e}"))?;
        let bind_ip = match std::env::var("LAZARUS_BIND_IP") {
            Ok(ip) => ip.parse().map_err(|e| format!("LAZARUS_BIND_IP: {e}"))?,
            Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let standby = std::env::var("LAZARUS_STANDBY").is_ok_and(|v| v == "1");
        let token = std::env::var("LAZARUS_TOKEN").ok();
        let ca = std::env::var_os("LAZARUS_CA").map(std::path::PathBuf::from);
        let rejoin_file = std::env::var_os("LAZARUS_REJOIN_FILE").map(std::path::PathBuf::from);
        Ok(WorkerEnv {
            supervisor,
            worker,
            attempt,
            bind_ip,
            standby,
            token,
            ca,
            rejoin_file,
        })
    }
}

/// Aborts a task when dropped: the tasks an assignment starts end with it,
/// whichever way it ends.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One data message encoded (length prefix included) on the thread that
/// made its records, which are then freed there too. Encoded and freed by
/// the connection's writer task, on another thread, they went through
/// glibc's locked arena bins instead of the freeing thread's cache: in a
/// wordcount run malloc and free were about a third of all CPU.
#[derive(Debug)]
struct Frame(Vec<u8>);

impl Frame {
    fn of(msg: &DataMsg) -> Frame {
        let mut buf = Vec::with_capacity(msg.encoded_len());
        msg.encode(&mut buf);
        Frame(buf)
    }
}

/// The sending side of one output edge.
struct EdgeOut {
    partition: Partition,
    senders: Vec<mpsc::Sender<Frame>>,
    /// Round-robin position (rebalance edges).
    next: usize,
    /// The job's key groups (hash edges route by key group owner).
    key_groups: u32,
}

/// The tasks that write one assignment's output connections. An
/// assignment that ends normally lets them finish: each drains its
/// channel (the end of the stream included) and closes its connection.
/// One that was halted or failed has them aborted, so a writer blocked on
/// a peer that never reads (a lost host: TCP gives up only after many
/// minutes) does not outlive it with its connection and buffers.
#[derive(Clone, Default)]
struct Writers(Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>);

impl Writers {
    fn add(&self, task: &tokio::task::JoinHandle<()>) {
        let mut tasks = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }

    /// Aborts every writer still running; returns how many there were.
    fn abort_all(&self) -> usize {
        let tasks = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let running = tasks.iter().filter(|t| !t.is_finished()).count();
        tasks.iter().for_each(tokio::task::AbortHandle::abort);
        running
    }
}

/// A snapshot on its way to storage.
struct UploadJob {
    checkpoint: CheckpointId,
    parts: Vec<(String, PartContent)>,
    metadata: Vec<u8>,
    pause: Duration,
    /// Records taken in (a source: emitted) before the snapshot.
    records: u64,
}

/// What a snapshot needs besides the instance: where frozen parts go, and
/// the worker's record count (acked with each snapshot).
struct Snapshotter {
    upload_tx: mpsc::UnboundedSender<UploadJob>,
    records: Arc<AtomicU64>,
}

/// The control connection's read half (plain TCP, or TLS on a cluster).
pub(crate) type CtlRead = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
/// Its write half.
pub(crate) type CtlWrite = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// Connects to the supervisor. With `LAZARUS_CA` (a cluster with TLS) the
/// connection is TLS, and the supervisor must prove the name
/// `supervisor.lazarus` with a certificate from that CA; this process then
/// proves itself inside it with its one-time credential.
pub(crate) async fn connect_supervisor(
    env: &WorkerEnv,
    supervisor: SocketAddr,
) -> Result<(CtlRead, CtlWrite)> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(supervisor))
        .await
        .map_err(|_| format!("connect to supervisor {supervisor}: no answer within 5 s"))?
        .map_err(|e| format!("connect to supervisor {supervisor}: {e}"))?;
    stream.set_nodelay(true)?;
    let Some(ca) = &env.ca else {
        let (r, w) = stream.into_split();
        return Ok((Box::new(r), Box::new(w)));
    };
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("LAZARUS_CA {}: {e}", ca.display()))?
    {
        roots
            .add(cert.map_err(|e| format!("LAZARUS_CA {}: {e}", ca.display()))?)
            .map_err(|e| format!("LAZARUS_CA {}: {e}", ca.display()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("supervisor.lazarus")
        .map_err(|e| format!("TLS name: {e}"))?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, stream),
    )
    .await
    .map_err(|_| "TLS handshake with the supervisor did not finish within 5 s")?
    .map_err(|e| format!("TLS handshake with the supervisor {supervisor}: {e}"))?;
    let (r, w) = tokio::io::split(tls);
    Ok((Box::new(r), Box::new(w)))
}

async fn main_loop(registry: Arc<Registry>, env: WorkerEnv) -> Result<()> {
    let env = Arc::new(env);
    let (ctl_read, mut ctl_write) = connect_supervisor(&env, env.supervisor).await?;
    protocol::write_control(
        &mut ctl_write,
        &ToSupervisor::Hello {
            worker: env.worker.clone(),
            attempt: env.attempt,
            standby: env.standby,
            token: env.token.clone(),
            rejoin: None,
        },
    )
    .await?;
    // The control link: one task, which reconnects to a new leader on an
    // HA cluster. `None` from `ctl_in` means the supervisor is gone.
    let (to_sup, to_sup_rx) = mpsc::unbounded_channel::<ToSupervisor>();
    let (ctl_tx, mut ctl_in) = mpsc::unbounded_channel::<Option<ToWorker>>();
    let link_state = LinkState::default();
    let (adopt_tx, adopt_rx) = mpsc::unbounded_channel::<Adoption>();
    let control_link = tokio::spawn(crate::link::run(
        env.clone(),
        ctl_read,
        ctl_write,
        to_sup_rx,
        ctl_tx,
        adopt_tx,
        link_state.clone(),
    ));
    // Workers taken over into this process run beside this one, and end
    // with it.
    let _guests = TaskGuard(tokio::spawn(run_guests(
        registry.clone(),
        env.clone(),
        adopt_rx,
    )));
    // State parts this process holds decoded, shared by its assignments:
    // a rollback in place and a promotion restore from them.
    let decoded = DecodedParts::default();
    let (assignment, early) = match ctl_in.recv().await.flatten() {
        Some(ToWorker::Assign(a)) => (*a, None),
        Some(ToWorker::Standby(a)) => {
            // A service kind runs on the standby too (only the VIP moves
            // on promotion), and a kind that restores ahead keeps the
            // state of every followed checkpoint decoded: built now.
            let early = if registry.builds_early(&a.kind) || registry.restores_ahead(&a.kind) {
                Some(Prepared {
                    role: registry.build(&a.kind, &context(&a))?,
                    restored: None,
                    in_flight: Vec::new(),
                })
            } else {
                None
            };
            let ahead = registry.restores_ahead(&a.kind);
            match follow(
                *a,
                early,
                ahead,
                &decoded,
                &mut ctl_in,
                &to_sup,
                &link_state,
            )
            .await?
            {
                Some(promoted) => promoted,
                None => return Ok(()),
            }
        }
        Some(ToWorker::Shutdown) | None => return Ok(()),
        Some(other) => return Err(format!("expected an assignment, got {other:?}").into()),
    };
    let (mut assignment, mut early) = (assignment, early);
    // The last assignment's operator instance, kept while the next one
    // restores: its key groups untouched since the checkpoint are taken
    // over without a read or a decode (a rollback in place from memory).
    let mut last_role: Option<Role> = None;
    let result = loop {
        if assignment.worker != env.worker {
            return Err(format!(
                "assigned as {}, started as {}",
                assignment.worker, env.worker
            )
            .into());
        }
        let epoch = assignment.epoch;
        let span = tracing::info_span!("worker", worker = %assignment.worker, %epoch);
        // A halt ends the assignment wherever it waits: also in a send to a
        // peer on a lost host, which would otherwise block until TCP gives
        // up. The assignment reads every other control message in order.
        let (fwd_tx, mut fwd_rx) = mpsc::unbounded_channel();
        let writers = Writers::default();
        let run = run_assignment(
            &registry,
            early.take(),
            &mut last_role,
            &decoded,
            &env,
            assignment,
            &to_sup,
            &mut fwd_rx,
            &link_state,
            &writers,
        )
        .instrument(span);
        let result = until_halted(run, &mut ctl_in, fwd_tx).await;
        if result.is_err() {
            let aborted = writers.abort_all();
            tracing::debug!(aborted, "output writers of the ended assignment aborted");
        }
        // What reached the assignment but was not read by it (a shutdown
        // right after its failure) is read next, before anything newer.
        let unread: Vec<Option<ToWorker>> = std::iter::from_fn(|| fwd_rx.try_recv().ok()).collect();
        match &result {
            Ok(()) => break result,
            Err(e) if e.is::<Halted>() => {}
            Err(e) => {
                let fatal = crate::operator::Fatal::is_fatal(e);
                let _ = to_sup.send(ToSupervisor::Failed {
                    error: e.to_string(),
                    fatal,
                    epoch: Some(epoch),
                });
                if fatal {
                    break result;
                }
            }
        }
        // Rolled back in place: the supervisor keeps this process and sends
        // the next attempt's assignment (or stops it, or closes).
        match next_assignment(unread, &mut ctl_in).await {
            Ok(Some(a)) => {
                tracing::info!(epoch = %a.epoch, restore = ?a.restore, "rolled back in place: a new assignment");
                link_state.reset();
                assignment = a;
            }
            Ok(None) => break result.or(Ok(())),
            Err(e) => break Err(e),
        }
    };
    drop(to_sup);
    // Let the last messages (acks, the failure) reach the supervisor.
    let _ = tokio::time::timeout(Duration::from_secs(2), control_link).await;
    result
}

/// Runs an assignment until it ends or a [`ToWorker::Halt`] arrives on
/// `ctl_in`, whichever comes first; every other control message is passed
/// on to it through `fwd`, in order. A halt drops the assignment where it
/// waits (between records: its state is whole; what it staged is dropped by
/// the next assignment's restore, as after a crash).
async fn until_halted(
    run: impl std::future::Future<Output = Result<()>>,
    ctl_in: &mut mpsc::UnboundedReceiver<Option<ToWorker>>,
    fwd: mpsc::UnboundedSender<Option<ToWorker>>,
) -> Result<()> {
    tokio::pin!(run);
    let mut fwd = Some(fwd);
    loop {
        tokio::select! {
            biased;
            msg = ctl_in.recv(), if fwd.is_some() => match msg {
                Some(Some(ToWorker::Halt)) => {
                    tracing::info!("halted by the supervisor for a recovery");
                    return Err(Box::new(Halted));
                }
                Some(msg) => {
                    if let Some(f) = &fwd {
                        let _ = f.send(msg);
                    }
                }
                // The control link is gone: the assignment sees its
                // channel close.
                None => fwd = None,
            },
            result = &mut run => return result,
        }
    }
}

/// Lets control messages reach a busy assignment. They reach it through
/// [`until_halted`], which forwards them (and hears a halt) only while the
/// assignment yields. A worker whose inputs are always ready never waits,
/// so it yielded only when tokio's budget ran out (128 operations): the
/// busy counters of a wordcount heard checkpoint announcements 19-155 ms
/// late, while every other worker heard them within 3 ms. An open window
/// yields once `CONTROL_EVERY` of work has passed since the last one.
struct ControlWindow(crate::clock::Stopwatch);

impl ControlWindow {
    fn new() -> ControlWindow {
        ControlWindow(crate::clock::Stopwatch::start())
    }

    /// Yields if the assignment has worked `CONTROL_EVERY` since the last
    /// time: one wake-up, about a microsecond.
    async fn open(&mut self) {
        if self.0.elapsed() >= CONTROL_EVERY {
            tokio::task::yield_now().await;
            self.0 = crate::clock::Stopwatch::start();
        }
    }
}

/// A [`ToWorker::Halt`] ended the assignment: the process waits for the
/// next one.
#[derive(Debug)]
struct Halted;

impl std::fmt::Display for Halted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("halted by the supervisor for a recovery")
    }
}

impl std::error::Error for Halted {}

/// How long a halted or failed worker waits for the supervisor to roll it
/// back in place before it exits.
const ROLLBACK_WAIT: Duration = Duration::from_secs(60);

/// After a halt or a failure: the next attempt's assignment, `None` on a
/// shutdown, an error when the supervisor is gone or silent. `unread`
/// (control messages the ended assignment did not read) comes first.
async fn next_assignment(
    unread: Vec<Option<ToWorker>>,
    ctl_in: &mut mpsc::UnboundedReceiver<Option<ToWorker>>,
) -> Result<Option<Assignment>> {
    // What a message means while rolled back: `None` to keep waiting.
    let decide = |msg: Option<ToWorker>| match msg {
        Some(ToWorker::Assign(a)) => Some(Ok(Some(*a))),
        Some(ToWorker::Shutdown) => Some(Ok(None)),
        None => Some(Err("supervisor connection lost".into())),
        // The old attempt's last messages.
        Some(other) => {
            tracing::debug!(?other, "ignored while rolled back");
            None
        }
    };
    if let Some(decided) = unread.into_iter().find_map(decide) {
        return decided;
    }
    let deadline = tokio::time::sleep(ROLLBACK_WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Err(format!("no new assignment within {ROLLBACK_WAIT:?} after a rollback").into()),
            msg = ctl_in.recv() => if let Some(decided) = decide(msg.flatten()) {
                return decided;
            },
        }
    }
}

/// Runs the workers this process takes over (active-active: a failed
/// instance's share restored into a surviving instance's process), each a
/// worker of its own toward the supervisor, until this worker ends.
async fn run_guests(
    registry: Arc<Registry>,
    env: Arc<WorkerEnv>,
    mut adopt: mpsc::UnboundedReceiver<Adoption>,
) {
    let mut guests = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(a) = adopt.recv() => {
                tracing::info!(worker = %a.worker, attempt = a.attempt, host = %env.worker, "taking over a worker into this process");
                let guest = WorkerEnv {
                    supervisor: a.supervisor,
                    worker: a.worker,
                    attempt: a.attempt,
                    bind_ip: env.bind_ip,
                    standby: false,
                    token: Some(a.token),
                    ca: env.ca.clone(),
                    // A taken-over worker does not outlive its supervisor:
                    // a new leader starts its share again.
                    rejoin_file: None,
                };
                guests.spawn(run_guest(registry.clone(), guest));
            }
            Some(_) = guests.join_next() => {}
            else => return,
        }
    }
}

/// One taken-over worker's life (boxed: it is [`main_loop`] again).
fn run_guest(
    registry: Arc<Registry>,
    env: WorkerEnv,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let worker = env.worker.clone();
        match main_loop(registry, env).await {
            Ok(()) => tracing::info!(%worker, "taken-over worker stopped"),
            Err(e) => tracing::warn!(%worker, error = %e, "taken-over worker ended"),
        }
    })
}

/// An operator instance built before its assignment (a hot standby's),
/// and the checkpoint it holds restored, if any.
struct Prepared {
    role: Role,
    restored: Option<Manifest>,
    /// The records `restored` holds in flight to this worker.
    in_flight: Vec<Record>,
}

/// A hot standby's life before promotion: restore every checkpoint the
/// supervisor names into the local cache (downloading only the chunks it does
/// not have yet, and checking them), so that promotion restores from local
/// disk; with `ahead`, also into the prepared instance (decoding only the
/// parts that changed), so that promotion reads and decodes nothing.
/// Returns the assignment that promotes it and the instance, or `None` on
/// shutdown.
async fn follow(
    standby: Assignment,
    mut prepared: Option<Prepared>,
    ahead: bool,
    decoded: &DecodedParts,
    ctl_in: &mut mpsc::UnboundedReceiver<Option<ToWorker>>,
    to_sup: &mpsc::UnboundedSender<ToSupervisor>,
    link: &LinkState,
) -> Result<Option<(Assignment, Option<Prepared>)>> {
    let store = CheckpointStore::open(&standby.store)?;
    let js = store.job(standby.job.clone());
    let cache = LocalCache::new(&standby.cache_dir)?;
    link.following(true);
    let mut next = standby.restore;
    loop {
        if let Some(n) = next.take() {
            let span =
                tracing::info_span!("standby_follow", checkpoint = %n, worker = %standby.worker);
            let into = prepared.as_mut().filter(|_| ahead);
            match follow_one(&js, &cache, &standby.worker, n, into, decoded)
                .instrument(span)
                .await
            {
                Ok(fetched_bytes) => {
                    link.followed(n);
                    to_sup.send(ToSupervisor::Followed {
                        checkpoint: n,
                        fetched_bytes,
                    })?;
                }
                // Retention removed it (or a chunk of it) while this
                // standby was busy: a newer checkpoint is announced.
                Err(e) if removed(&e) => {
                    tracing::warn!(checkpoint = %n, error = %e, "checkpoint gone before it was followed; following the next one");
                }
                Err(e) => return Err(e),
            }
        }
        let mut msg = ctl_in.recv().await.flatten();
        // Only the newest of the checkpoints announced meanwhile is
        // followed: one follow can outlast several checkpoint intervals
        // (a new standby's first, which decodes everything), and retention
        // removes the ones in between.
        while let Some(ToWorker::Follow { checkpoint }) = msg {
            next = next.max(Some(checkpoint));
            match ctl_in.try_recv() {
                Ok(m) => msg = m,
                Err(_) => break,
            }
        }
        match msg {
            Some(ToWorker::Follow { .. }) => {}
            Some(ToWorker::Assign(a)) => {
                link.following(false);
                if a.worker != standby.worker {
                    return Err(
                        format!("standby of {} promoted as {}", standby.worker, a.worker).into(),
                    );
                }
                return Ok(Some((*a, prepared)));
            }
            Some(ToWorker::Shutdown) | None => return Ok(None),
            Some(other) => tracing::debug!(?other, "ignored by a standby"),
        }
    }
}

/// Whether a follow failed because what it read is no longer in the store
/// (its manifest or a chunk: removed by retention), not because the store
/// failed.
fn removed(e: &BoxError) -> bool {
    e.downcast_ref::<lazarus_storage::StorageError>()
        .is_some_and(|e| e.kind() == lazarus_storage::ErrorKind::NotFound)
}

/// Follows checkpoint `n`: its chunks into the cache and, given an
/// instance, its state into the instance. Returns the bytes fetched.
async fn follow_one(
    js: &lazarus_storage::JobStore,
    cache: &LocalCache,
    worker: &WorkerId,
    n: CheckpointId,
    into: Option<&mut Prepared>,
    decoded: &DecodedParts,
) -> Result<u64> {
    // Announced as committed by the supervisor: read alone.
    let manifest = js.manifest_only(n).await?;
    if !manifest.workers.contains_key(worker) {
        return Ok(0);
    }
    let Some(prepared) = into else {
        let fetched = js
            .cache_worker(&manifest, worker, cache)
            .await?
            .fetched_bytes;
        tracing::info!(fetched, "standby follows");
        return Ok(fetched);
    };
    let started = crate::clock::Stopwatch::start();
    // Restored ahead (`cache_all`): each chunk's pages were dropped once
    // checked, so memory holds one chunk at a time while it decodes.
    let (mut restored, r) = restore_parts(js, &manifest, worker, cache, decoded, true).await?;
    prepared.in_flight = restored.take_in_flight().into_records()?;
    restore_role(&mut prepared.role, &restored)?;
    prepared.restored = Some(manifest);
    tracing::info!(
        fetched = r.fetched_bytes,
        decoded_parts = r.chunks,
        held_parts = r.held,
        ms = started.elapsed().as_millis() as u64,
        "standby follows, state decoded"
    );
    Ok(r.fetched_bytes)
}

/// What a restore read.
struct RestoreStats {
    /// Bytes read from the store (downloaded, or mapped in place).
    fetched_bytes: u64,
    /// Parts mapped (to be decoded).
    chunks: usize,
    /// Parts held decoded in this process (neither read nor decoded).
    held: usize,
}

/// `worker`'s state of `manifest`: the parts this process holds decoded
/// are taken from memory (neither read nor mapped), the others mapped from
/// the local cache or the store (with `cache_all`, always through the
/// cache, as a standby does so that a promotion reads nothing remote).
async fn restore_parts(
    js: &lazarus_storage::JobStore,
    manifest: &Manifest,
    worker: &WorkerId,
    cache: &LocalCache,
    decoded: &DecodedParts,
    cache_all: bool,
) -> Result<(Restored, RestoreStats)> {
    let snapshot = manifest.workers.get(worker).ok_or_else(|| {
        format!(
            "checkpoint {} holds no state of {worker}",
            manifest.checkpoint
        )
    })?;
    let held: BTreeMap<String, crate::Decoded> = snapshot
        .chunks
        .iter()
        .filter_map(|c| decoded.get(c).map(|v| (c.name().to_string(), v)))
        .collect();
    let r = js
        .restore_worker_except(manifest, worker, cache, cache_all, &|c| {
            held.contains_key(c.name())
        })
        .await?;
    // Parts of key groups this worker no longer has are not kept.
    decoded.retain(snapshot.chunks.iter().map(|c| c.name()));
    let stats = RestoreStats {
        fetched_bytes: r.read_from_store(),
        chunks: r.chunks.len(),
        held: held.len(),
    };
    let parts: BTreeMap<String, _> = snapshot
        .chunks
        .iter()
        .filter(|c| !held.contains_key(c.name()))
        .map(|c| c.name().to_string())
        .zip(r.chunks)
        .collect();
    let chunks = snapshot
        .chunks
        .iter()
        .map(|c| (c.name().to_string(), c.clone()))
        .collect();
    let restored = Restored::new(manifest.checkpoint, parts, r.metadata).with_decoded(
        held,
        chunks,
        decoded.clone(),
    );
    Ok((restored, stats))
}

/// Restores an instance (sinks recover separately).
fn restore_role(role: &mut Role, restored: &Restored) -> Result<()> {
    match role {
        Role::Source(s) => s.restore(restored),
        Role::Operator(o) => o.restore(restored),
        Role::Sink(_) => Ok(()),
    }
}

/// The instances of `operator` that wrote state in `manifest` (workers are
/// named `<operator>-<index>`).
fn instances_in(manifest: &Manifest, operator: &str) -> Vec<WorkerId> {
    manifest
        .workers
        .keys()
        .filter(|w| instance_index(w, operator).is_some())
        .cloned()
        .collect()
}

/// The index of `w` if it is an instance of `operator` (`<operator>-<index>`).
fn instance_index(w: &WorkerId, operator: &str) -> Option<u32> {
    w.as_str()
        .strip_prefix(operator)?
        .strip_prefix('-')
        .filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

/// Restore after a rescale: the operator ran with another parallelism when
/// the checkpoint was taken, so this instance's key groups are spread over
/// the parts of every old instance. Their parts are merged by name (keyed
/// state names a part per key group, so names never collide); state that
/// is not partitioned by key group (the same part name from two instances,
/// or different metadata) cannot be split and is refused as fatal.
async fn restore_rescaled(
    js: &lazarus_storage::JobStore,
    manifest: &Manifest,
    writers: &[WorkerId],
    a: &Assignment,
    cache: &LocalCache,
) -> Result<(Restored, u64, Vec<Record>)> {
    let mut parts = BTreeMap::new();
    let mut metadata: Option<(&WorkerId, Vec<u8>)> = None;
    let mut fetched = 0;
    let mut in_flight = Vec::new();
    for w in writers {
        let snapshot = &manifest.workers[w];
        let r = js.restore_worker(manifest, w, cache).await?;
        fetched += r.read_from_store();
        for (c, chunk) in snapshot.chunks.iter().zip(r.chunks) {
            if c.name() == crate::in_flight::PART {
                // Each record in flight to an old instance goes to the new
                // instance its key (or its old instance) maps to.
                let records = crate::in_flight::decode(chunk.bytes())
                    .map_err(|e| format!("{w} in checkpoint {}: {e}", manifest.checkpoint))?;
                let old_index = instance_index(w, &a.operator).expect("listed by instances_in");
                in_flight.extend(crate::in_flight::rescaled(
                    records,
                    old_index,
                    a.key_groups,
                    a.index,
                    a.parallelism,
                ));
                continue;
            }
            if parts.insert(c.name().to_string(), chunk).is_some() {
                return Err(crate::operator::Fatal::new(format!(
                    "cannot rescale operator {} from {} to {} instances: state part {:?} was written by more than one instance (only keyed state, one part per key group, can be redistributed)",
                    a.operator,
                    writers.len(),
                    a.parallelism,
                    c.name()
                ))
                .into());
            }
        }
        if !snapshot.metadata.is_empty() {
            match &metadata {
                Some((other, m)) if *m != snapshot.metadata => {
                    return Err(crate::operator::Fatal::new(format!(
                        "cannot rescale operator {} from {} to {} instances: {other} and {w} stored different metadata (per-instance positions cannot be redistributed)",
                        a.operator,
                        writers.len(),
                        a.parallelism
                    ))
                    .into())
                }
                _ => metadata = Some((w, snapshot.metadata.clone())),
            }
        }
    }
    tracing::info!(
        checkpoint = %manifest.checkpoint,
        from = writers.len(),
        to = a.parallelism,
        fetched,
        "restored after a rescale"
    );
    Ok((
        Restored::new(
            manifest.checkpoint,
            parts,
            metadata.map(|(_, m)| m).unwrap_or_default(),
        ),
        fetched,
        in_flight,
    ))
}

/// What an assignment tells the operator instance about itself.
fn context(a: &Assignment) -> Context {
    Context {
        job: a.job.clone(),
        worker: a.worker.clone(),
        operator: a.operator.clone(),
        index: a.index,
        parallelism: a.parallelism,
        key_groups: a.key_groups,
        params: a.params.clone(),
    }
}

/// Waits until the supervisor says checkpoint `n` (restored while its
/// commit was not yet durable) is committed: `Ok(true)`. `Ok(false)`: told
/// to shut down (or the connection closed) first; a halt is an error.
async fn until_durable(
    n: CheckpointId,
    ctl_in: &mut mpsc::UnboundedReceiver<Option<ToWorker>>,
) -> Result<bool> {
    loop {
        match ctl_in.recv().await.flatten() {
            Some(ToWorker::Committed { checkpoint }) if checkpoint >= n => return Ok(true),
            Some(ToWorker::Shutdown) | None => return Ok(false),
            Some(ToWorker::Halt) => return Err(Box::new(Halted)),
            Some(other) => tracing::debug!(?other, "ignored before the sink recovers"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_assignment(
    registry: &Registry,
    early: Option<Prepared>,
    last_role: &mut Option<Role>,
    decoded: &DecodedParts,
    env: &WorkerEnv,
    a: Assignment,
    to_sup: &mpsc::UnboundedSender<ToSupervisor>,
    ctl_in: &mut mpsc::UnboundedReceiver<Option<ToWorker>>,
    link: &LinkState,
    writers: &Writers,
) -> Result<()> {
    if !registry.restores_ahead(&a.kind) {
        // An instance of another kind may hold what its successor needs
        // (a listener, a program): it goes before the new one is built.
        *last_role = None;
    }
    let (mut role, prepared_at, prepared_in_flight) = match early {
        Some(p) => (p.role, p.restored, p.in_flight),
        None => (registry.build(&a.kind, &context(&a))?, None, Vec::new()),
    };
    let store = CheckpointStore::open(&a.store)?;
    let js = store.job(a.job.clone());
    let cache = LocalCache::new(&a.cache_dir)?;

    // Restore.
    let mut base: HashMap<String, ChunkRef> = HashMap::new();
    let mut fetched_bytes = 0;
    // Records the restored checkpoint holds in flight to this worker.
    let mut in_flight = InFlight::default();
    match (a.restore, prepared_at) {
        (Some(n), Some(manifest))
            if manifest.checkpoint == n && manifest.workers.contains_key(&a.worker) =>
        {
            // A hot standby that followed this very checkpoint holds its
            // state decoded already.
            tracing::info!(checkpoint = %n, "promoted with the state of the checkpoint it followed");
            for c in &manifest.workers[&a.worker].chunks {
                base.insert(c.name().to_string(), c.clone());
            }
            in_flight = InFlight::Records(prepared_in_flight);
        }
        (Some(n), _) => {
            // Named by the supervisor (committed): read alone.
            let manifest = js.manifest_only(n).await?;
            let writers = instances_in(&manifest, &a.operator);
            let rescaled = !writers.is_empty() && writers.len() != a.parallelism as usize;
            let restored = if rescaled {
                let r = restore_rescaled(&js, &manifest, &writers, &a, &cache).await?;
                for c in writers.iter().flat_map(|w| &manifest.workers[w].chunks) {
                    base.insert(c.name().to_string(), c.clone());
                }
                fetched_bytes = r.1;
                in_flight = InFlight::Records(r.2);
                r.0
            } else if manifest.workers.contains_key(&a.worker) {
                let (mut restored, r) =
                    restore_parts(&js, &manifest, &a.worker, &cache, decoded, false).await?;
                in_flight = restored.take_in_flight();
                tracing::info!(checkpoint = %n, fetched = r.fetched_bytes, mapped = r.chunks, held = r.held, "restored");
                fetched_bytes = r.fetched_bytes;
                for c in &manifest.workers[&a.worker].chunks {
                    base.insert(c.name().to_string(), c.clone());
                }
                restored
            } else {
                Restored::default()
            };
            restore_role(&mut role, &restored)?;
        }
        (None, _) => {}
    }
    // Restored: the previous instance (whose untouched key groups the new
    // one may share) can go.
    let role = last_role.insert(role);
    if let Role::Sink(s) = role {
        if let (true, Some(n)) = (a.restore_pending, a.restore) {
            tracing::info!(checkpoint = %n, "waiting for the restored checkpoint's commit to be durable before recovering the sink");
            if !until_durable(n, ctl_in).await? {
                return Ok(());
            }
        }
        s.recover(a.restore)?;
    }

    // Data plane: listen, report, wait for everyone's address, connect.
    let listener = {
        let addr = SocketAddr::new(env.bind_ip, 0);
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_recv_buffer_size(SOCKET_BUFFER)?;
        socket.bind(addr)?;
        socket.listen(64)?
    };
    to_sup.send(ToSupervisor::Listening {
        addr: listener.local_addr()?,
        fetched_bytes,
        in_flight_records: in_flight.len(),
        epoch: Some(a.epoch),
    })?;
    let addrs = loop {
        match ctl_in.recv().await.flatten() {
            Some(ToWorker::Start { addrs }) => break addrs,
            Some(ToWorker::Shutdown) | None => return Ok(()),
            Some(ToWorker::Halt) => return Err(Box::new(Halted)),
            Some(other) => tracing::debug!(?other, "ignored before start"),
        }
    };
    let expected = a.inputs.clone();
    let key = match &a.channel_key {
        Some(hex) => {
            Some(protocol::decode_key(hex).ok_or("the assignment's channel key is not hex")?)
        }
        None => None,
    };
    let accept = tokio::spawn(accept_inputs(
        listener,
        expected,
        a.worker.clone(),
        key.clone(),
    ));
    let mut outputs = Vec::new();
    for edge in &a.outputs {
        let mut senders = Vec::new();
        for target in &edge.targets {
            let addr = addrs
                .get(target)
                .ok_or_else(|| format!("no address for output {target}"))?;
            senders.push(connect_output(&a.worker, target, *addr, key.as_deref(), writers).await?);
        }
        outputs.push(EdgeOut {
            partition: edge.partition,
            senders,
            next: 0,
            key_groups: a.key_groups,
        });
    }
    let mut inputs = tokio::time::timeout(Duration::from_secs(30), accept)
        .await
        .map_err(|_| "inputs did not all connect within 30 s")???;
    to_sup.send(ToSupervisor::Running {
        epoch: Some(a.epoch),
    })?;
    link.running();

    // Progress and liveness.
    let records_in = Arc::new(AtomicU64::new(0));
    let _heartbeat = {
        let (to_sup, records_in) = (to_sup.clone(), records_in.clone());
        let every = Duration::from_millis(a.heartbeat_ms.max(10));
        TaskGuard(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let msg = ToSupervisor::Heartbeat {
                    records_in: records_in.load(Ordering::Relaxed),
                };
                if to_sup.send(msg).is_err() {
                    break;
                }
            }
        }))
    };

    // The uploader: serializes and writes frozen parts in checkpoint order,
    // off the processing path, then acks. A failure ends the worker.
    let (upload_tx, upload_rx) = mpsc::unbounded_channel::<UploadJob>();
    let snapper = Snapshotter {
        upload_tx,
        records: records_in.clone(),
    };
    // A source rolled back after a failure reports once it has emitted
    // again what it had emitted since the restored checkpoint.
    let mut replay = a
        .replay_records
        .filter(|_| matches!(&*role, Role::Source(_)));
    if replay == Some(0) {
        replay = None;
        to_sup.send(ToSupervisor::Replayed)?;
    }
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel::<BoxError>();
    // Ends with the assignment: a halted one acks nothing more.
    let _uploader = TaskGuard(tokio::spawn(uploader(
        UploadTarget {
            js: js.clone(),
            cache,
            decoded: decoded.clone(),
        },
        a.clone(),
        base,
        upload_rx,
        to_sup.clone(),
        fatal_tx,
    )));

    let mut emitter = Emitter::default();
    let in_flight = in_flight.into_records()?;
    if !in_flight.is_empty() {
        // The records the checkpoint holds in flight go first.
        tracing::info!(
            records = in_flight.len(),
            "processing the records in flight at the checkpoint"
        );
        process(role, in_flight, &mut outputs, &mut emitter).await?;
    }
    let n_in = inputs.len();
    let mut aligner = BarrierAligner::new(n_in);
    let mut ahead = ReadAhead::new(n_in);
    // The newest checkpoint announced, the newest snapshotted here, and
    // one for which reading ahead gave up.
    let (mut announced, mut last_snap, mut gave_up) = (None, None, None);
    let mut next_pop = 0;
    let mut exhausted = false;
    let mut control = ControlWindow::new();

    loop {
        if matches!(role, Role::Source(_)) {
            // Control first (a trigger puts the barrier at a record boundary).
            loop {
                match ctl_in.try_recv() {
                    Ok(msg) => {
                        if !handle_control(msg, role, &mut outputs, &snapper, link, &mut announced)
                            .await?
                        {
                            return Ok(());
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        return Err("control channel closed".into())
                    }
                }
            }
            if let Ok(e) = fatal_rx.try_recv() {
                return Err(e);
            }
            if !exhausted {
                let Role::Source(source) = &mut *role else {
                    unreachable!("checked above")
                };
                let status = source.poll(&mut emitter, SOURCE_BATCH)?;
                let emitted = records_in.fetch_add(emitter.len() as u64, Ordering::Relaxed)
                    + emitter.len() as u64;
                if replay.is_some_and(|target| emitted >= target) {
                    replay = None;
                    to_sup.send(ToSupervisor::Replayed)?;
                }
                route(&mut outputs, &mut emitter).await?;
                match status {
                    crate::SourcePoll::Ready => tokio::task::yield_now().await,
                    crate::SourcePoll::Idle => {
                        tokio::select! {
                            msg = ctl_in.recv() => {
                                if !handle_control(msg.flatten(), role, &mut outputs, &snapper, link, &mut announced).await? {
                                    return Ok(());
                                }
                            }
                            Some(e) = fatal_rx.recv() => return Err(e),
                            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                        }
                    }
                    crate::SourcePoll::Exhausted => {
                        if replay.take().is_some() {
                            // Nothing more to emit: it is as far as it gets.
                            to_sup.send(ToSupervisor::Replayed)?;
                        }
                        exhausted = true;
                        link.exhausted();
                        to_sup.send(ToSupervisor::SourceExhausted)?;
                    }
                }
            } else {
                tokio::select! {
                    msg = ctl_in.recv() => {
                        if !handle_control(msg.flatten(), role, &mut outputs, &snapper, link, &mut announced).await? {
                            return Ok(());
                        }
                    }
                    Some(e) = fatal_rx.recv() => return Err(e),
                }
            }
            continue;
        }

        control.open().await;
        // Reading ahead for an announced checkpoint (see `in_flight`): no
        // record is processed until the next barrier is found on every
        // open input, or reading ahead gives up.
        let reading_ahead =
            announced.is_some_and(|n| last_snap.is_none_or(|s| n > s)) && gave_up != announced;
        if reading_ahead {
            if let Some(n) = ahead.cut(&aligner) {
                aligner.cut(n)?;
                let in_flight = ahead.take_cut(n);
                tracing::debug!(checkpoint = %n, in_flight_bytes = in_flight.len(), "barrier found on every input by reading ahead");
                snapshot_now(n, role, &mut outputs, &snapper, link, in_flight).await?;
                last_snap = Some(n);
                continue;
            }
        } else if let Some(i) = (0..n_in)
            .map(|k| (next_pop + k) % n_in)
            .find(|&i| !aligner.skip(i) && ahead.has(i))
        {
            // What was read ahead is processed first, input by input in order.
            next_pop = (i + 1) % n_in;
            let item = ahead.pop(i).expect("has one");
            if let Some(n) = on_input(
                i,
                item,
                role,
                &mut aligner,
                &mut outputs,
                &mut emitter,
                &records_in,
            )
            .await?
            {
                snapshot_now(n, role, &mut outputs, &snapper, link, Vec::new()).await?;
                last_snap = Some(n);
            }
            continue;
        }
        let skip: Vec<bool> = (0..n_in)
            .map(|i| {
                aligner.skip(i)
                    || if reading_ahead {
                        ahead.found(i)
                    } else {
                        ahead.has(i)
                    }
            })
            .collect();
        if reading_ahead && skip.iter().all(|s| *s) {
            // Nothing left to read ahead, and no cut: align in order.
            tracing::debug!(checkpoint = ?announced, "reading ahead found no cut");
            gave_up = announced;
            continue;
        }
        tokio::select! {
            biased;
            msg = ctl_in.recv() => {
                if !handle_control(msg.flatten(), role, &mut outputs, &snapper, link, &mut announced).await? {
                    return Ok(());
                }
            }
            Some(e) = fatal_rx.recv() => return Err(e),
            (i, item) = next_input(&mut inputs, &skip) => {
                if reading_ahead {
                    if let crate::in_flight::Ahead::GiveUp(why) = ahead.push(i, item) {
                        tracing::debug!(checkpoint = ?announced, why, "reading ahead given up");
                        gave_up = announced;
                    }
                } else if let Some(n) = on_input(i, item, role, &mut aligner, &mut outputs, &mut emitter, &records_in).await? {
                    snapshot_now(n, role, &mut outputs, &snapper, link, Vec::new()).await?;
                    last_snap = Some(n);
                }
            }
        }
    }
}

/// Processes one message of input `i`; returns the checkpoint to snapshot
/// when it completes an alignment.
async fn on_input(
    i: usize,
    item: InputItem,
    role: &mut Role,
    aligner: &mut BarrierAligner,
    outputs: &mut [EdgeOut],
    emitter: &mut Emitter,
    records_in: &AtomicU64,
) -> Result<Option<CheckpointId>> {
    match item {
        Some(Ok(DataMsg::Batch(records))) => {
            records_in.fetch_add(records.len() as u64, Ordering::Relaxed);
            process(role, records, outputs, emitter).await?;
            Ok(None)
        }
        Some(Ok(DataMsg::Barrier(n))) => Ok(aligner.on_barrier(i, n)?),
        Some(Ok(DataMsg::End)) | None => Ok(aligner.on_closed(i)),
        Some(Ok(DataMsg::Hello(w))) => {
            Err(format!("unexpected hello from {w} on input {i}").into())
        }
        Some(Err(e)) => Err(e.into()),
    }
}

/// Hands records to the operator (and routes what it emits) or the sink.
async fn process(
    role: &mut Role,
    records: Vec<Record>,
    outputs: &mut [EdgeOut],
    emitter: &mut Emitter,
) -> Result<()> {
    match role {
        Role::Operator(op) => {
            for r in records {
                op.process(r, emitter)?;
            }
            route(outputs, emitter).await
        }
        Role::Sink(sink) => {
            for r in records {
                sink.write(r)?;
            }
            Ok(())
        }
        Role::Source(_) => Err("a source has no inputs".into()),
    }
}

/// Handles one control message; `false` means stop.
async fn handle_control(
    msg: Option<ToWorker>,
    role: &mut Role,
    outputs: &mut [EdgeOut],
    snapper: &Snapshotter,
    link: &LinkState,
    announced: &mut Option<CheckpointId>,
) -> Result<bool> {
    match msg {
        None => Err("supervisor connection lost".into()),
        Some(ToWorker::Shutdown) => Ok(false),
        Some(ToWorker::Halt) => Err(Box::new(Halted)),
        Some(ToWorker::Trigger { checkpoint }) => {
            if matches!(role, Role::Source(_)) {
                // Sources snapshot right here, between two polls.
                snapshot_now(checkpoint, role, outputs, snapper, link, Vec::new()).await?;
            } else {
                // Others learn that its barriers are on their way.
                *announced = (*announced).max(Some(checkpoint));
            }
            Ok(true)
        }
        Some(ToWorker::Committed { checkpoint }) => {
            match role {
                Role::Sink(sink) => sink.commit(checkpoint)?,
                Role::Source(source) => source.committed(checkpoint)?,
                Role::Operator(_) => {}
            }
            Ok(true)
        }
        Some(ToWorker::Abort { checkpoint }) => {
            // Staged sink output stays: the next committed checkpoint covers it.
            tracing::debug!(%checkpoint, "checkpoint aborted");
            Ok(true)
        }
        Some(other) => Err(format!("unexpected control message {other:?}").into()),
    }
}

/// The synchronous part of a snapshot: pre-commit sinks, freeze state,
/// forward the barrier. Serialization and upload happen in the uploader.
async fn snapshot_now(
    n: CheckpointId,
    role: &mut Role,
    outputs: &mut [EdgeOut],
    snapper: &Snapshotter,
    link: &LinkState,
    in_flight: Vec<u8>,
) -> Result<()> {
    link.snapshotted(n);
    let records = snapper.records.load(Ordering::Relaxed);
    let started = crate::clock::Stopwatch::start();
    let snapshot = match role {
        Role::Source(s) => {
            s.prepare_snapshot(n);
            s.snapshot()
        }
        Role::Operator(o) => o.snapshot(),
        Role::Sink(s) => {
            s.pre_commit(n)?;
            Snapshot::default()
        }
    };
    // The barrier goes behind the records already queued on each channel,
    // as it must; a full channel makes it wait (backpressure).
    for edge in outputs.iter_mut() {
        for tx in &edge.senders {
            tx.send(Frame::of(&DataMsg::Barrier(n)))
                .await
                .map_err(|_| "output channel closed")?;
        }
    }
    tracing::debug!(checkpoint = %n, took_us = started.elapsed().as_micros() as u64, "snapshot taken, barrier forwarded");
    let (mut parts, metadata) = snapshot.into_parts();
    crate::in_flight::check_part_names(parts.iter().map(|(name, _)| name.as_str()))?;
    if !in_flight.is_empty() {
        let bytes = Bytes::from(in_flight);
        parts.push((
            crate::in_flight::PART.to_string(),
            PartContent::Fresh {
                serialize: Box::new(move || Ok(bytes)),
                revive: None,
            },
        ));
    }
    snapper
        .upload_tx
        .send(UploadJob {
            records,
            checkpoint: n,
            parts,
            metadata,
            // The longest stall this checkpointing caused processing: the
            // synchronous part, or a copy-on-write copy of keyed state
            // since the previous snapshot.
            pause: started.elapsed().max(crate::state::take_cow_stall()),
        })
        .map_err(|_| "uploader stopped")?;
    Ok(())
}

/// Where the uploader puts a snapshot: the store, the local cache, and
/// the decoded parts it keeps beside the chunks.
#[derive(Clone)]
struct UploadTarget {
    js: JobStore,
    cache: LocalCache,
    decoded: DecodedParts,
}

async fn uploader(
    to: UploadTarget,
    a: Assignment,
    mut base: HashMap<String, ChunkRef>,
    mut jobs: mpsc::UnboundedReceiver<UploadJob>,
    to_sup: mpsc::UnboundedSender<ToSupervisor>,
    fatal: mpsc::UnboundedSender<BoxError>,
) {
    // Parts written at once, for the uploader's life: one large part per
    // core (at most four), many small ones (see `part_cost`).
    let at_once = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    let limit = Arc::new(tokio::sync::Semaphore::new(
        at_once * LARGE_PART_COST as usize,
    ));
    while let Some(job) = jobs.recv().await {
        let span = tracing::info_span!("snapshot_upload", checkpoint = %job.checkpoint, worker = %a.worker);
        let (checkpoint, pause, records) = (job.checkpoint, job.pause, job.records);
        let started = crate::clock::Stopwatch::start();
        let result = upload(&to, &a, &base, &limit, job).instrument(span).await;
        tracing::debug!(%checkpoint, took_us = started.elapsed().as_micros() as u64, "snapshot uploaded");
        match result {
            Ok(snapshot) => {
                base = snapshot
                    .chunks
                    .iter()
                    .map(|c| (c.name().to_string(), c.clone()))
                    .collect();
                let ack = ToSupervisor::Ack {
                    checkpoint,
                    snapshot,
                    pause_us: pause.as_micros() as u64,
                    records,
                };
                if to_sup.send(ack).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = fatal.send(e);
                return;
            }
        }
    }
}

/// What writing one part costs of the uploader's budget (`LARGE_PART_COST`
/// per core, at most four cores): a part whose chunk held less than
/// `SMALL_PART` last time costs one unit, any other (and one never
/// written) the most, so large parts go one per core, end to end
/// (serialize, write, fsync). More at once added memory and took the
/// processing thread's cores: with a unit per MiB, 1 GiB of keyed state
/// wrote 16 parts of 8 MiB at once, and a write's pause grew from 4 to
/// 40 ms. Small parts go many at once: their time is waits (thread
/// hand-offs, an fsync), not CPU, and one at a time a checkpoint of 16
/// parts of 13 KiB took 25-33 ms of its latency (wordcount's counters).
const LARGE_PART_COST: u32 = 64;
/// Below this (raw bytes, last time), a part is small.
const SMALL_PART: u64 = 1 << 20;

fn part_cost(prior: Option<&ChunkRef>) -> u32 {
    match prior {
        Some(c) if c.raw_len < SMALL_PART => 1,
        _ => LARGE_PART_COST,
    }
}

/// Resolves unchanged parts to the chunks already written (incremental
/// checkpoints) and writes the fresh ones within `limit` (see
/// [`part_cost`]).
async fn upload(
    to: &UploadTarget,
    a: &Assignment,
    base: &HashMap<String, ChunkRef>,
    limit: &Arc<tokio::sync::Semaphore>,
    job: UploadJob,
) -> Result<WorkerSnapshot> {
    let mut chunks: Vec<Option<ChunkRef>> = Vec::with_capacity(job.parts.len());
    let mut handles = Vec::new();
    for (name, content) in job.parts {
        match content {
            PartContent::Unchanged => {
                let prior = base.get(&name).ok_or_else(|| {
                    format!("state part {name:?} is marked unchanged but was never written")
                })?;
                chunks.push(Some(prior.clone()));
            }
            PartContent::Fresh { serialize, revive } => {
                chunks.push(None);
                let slot = chunks.len() - 1;
                let (UploadTarget { js, cache, decoded }, worker, job_id, codec, limit) = (
                    to.clone(),
                    a.worker.clone(),
                    a.job.clone(),
                    a.codec,
                    limit.clone(),
                );
                let checkpoint = job.checkpoint;
                // Records in flight are read once, on a restore, and
                // written every checkpoint: not worth compressing.
                let codec = if name == crate::in_flight::PART {
                    Codec::None
                } else {
                    codec
                };
                let cost = part_cost(base.get(&name));
                handles.push(tokio::spawn(async move {
                    let _permit = limit.acquire_many_owned(cost).await?;
                    let local_directory = js.is_local_directory();
                    let (bytes, chunk) = if local_directory {
                        // One blocking step from the state to a durable
                        // file: each hand-off between threads waits for a
                        // core on a saturated machine.
                        let js = js.clone();
                        let queued = crate::clock::Stopwatch::start();
                        tokio::task::spawn_blocking(move || {
                            let waited = queued.elapsed();
                            let cpu_at_start = crate::clock::thread_cpu();
                            let bytes: Bytes = serialize()?;
                            let cpu_serialized = crate::clock::thread_cpu();
                            let serialized = queued.elapsed();
                            let chunk = js.write_chunk_here(
                                checkpoint,
                                &worker,
                                &name,
                                bytes.clone(),
                                codec,
                            )?;
                            tracing::debug!(
                                %checkpoint,
                                part = %name,
                                bytes = bytes.len(),
                                waited_us = waited.as_micros() as u64,
                                serialize_us = (serialized - waited).as_micros() as u64,
                                write_us = (queued.elapsed() - serialized).as_micros() as u64,
                                serialize_cpu_us = cpu_serialized.saturating_sub(cpu_at_start).as_micros() as u64,
                                write_cpu_us = crate::clock::thread_cpu().saturating_sub(cpu_serialized).as_micros() as u64,
                                "part written"
                            );
                            Ok::<_, BoxError>((bytes, chunk))
                        })
                        .await??
                    } else {
                        let bytes: Bytes = tokio::task::spawn_blocking(serialize).await??;
                        let chunk = js
                            .write_chunk(checkpoint, &worker, &name, bytes.clone(), codec)
                            .await?;
                        (bytes, chunk)
                    };
                    if let Some(revive) = revive {
                        decoded.keep(&chunk, revive);
                    }
                    // The local copy (for restarts on this host) is written
                    // without holding up the ack: it is an optimisation, and
                    // a missing one only means a restore downloads the chunk.
                    // The task reports its own failure; nothing waits for it.
                    // An uncompressed chunk in a local directory is mapped
                    // where it lies: a copy would only double the writes.
                    if !(local_directory && codec == Codec::None) {
                        let (c2, local) = (chunk.clone(), bytes);
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = cache.insert(&job_id, &c2, &local) {
                                tracing::warn!(error = %e, "local cache copy failed");
                            }
                        });
                    }
                    Ok::<_, BoxError>((slot, chunk))
                }));
            }
        }
    }
    for handle in handles {
        let (slot, chunk) = handle.await??;
        chunks[slot] = Some(chunk);
    }
    Ok(WorkerSnapshot {
        chunks: chunks
            .into_iter()
            .map(|c| c.expect("every slot filled"))
            .collect(),
        metadata: job.metadata,
    })
}

/// Sends everything the emitter holds over the output edges.
async fn route(outputs: &mut [EdgeOut], emitter: &mut Emitter) -> Result<()> {
    if emitter.records.is_empty() {
        return Ok(());
    }
    let mut records = std::mem::take(&mut emitter.records);
    let n_edges = outputs.len();
    for (e, edge) in outputs.iter_mut().enumerate() {
        // The last edge takes the records; earlier ones get copies.
        let records = if e + 1 == n_edges {
            std::mem::take(&mut records)
        } else {
            records.clone()
        };
        if edge.partition == Partition::Rebalance {
            rebalance(edge, records).await?;
            continue;
        }
        let n = edge.senders.len() as u32;
        let mut per_target: Vec<Vec<Record>> = vec![Vec::new(); n as usize];
        for r in records {
            let t = match edge.partition {
                // Forward edges pair instance i with i; the supervisor checks
                // equal parallelism, so this worker's edge has one target.
                // (Rebalance edges were sent above.)
                Partition::Forward | Partition::Rebalance => 0,
                // The targets list is in instance order, and instance i owns
                // the key groups `group_owner` assigns it: the same rule as
                // KeyedState, so a key always reaches the state that holds it.
                Partition::Hash => {
                    group_owner(key_group(&r.key, edge.key_groups), edge.key_groups, n) as usize
                }
            };
            per_target[t].push(r);
        }
        for (t, batch) in per_target.into_iter().enumerate() {
            // The records move into the frames: a copy here (`to_vec` of
            // each chunk) cloned every key and value, the allocator's work
            // being the largest part of a wordcount run's CPU.
            let mut records = batch.into_iter();
            loop {
                let piece: Vec<Record> = records.by_ref().take(BATCH).collect();
                if piece.is_empty() {
                    break;
                }
                edge.senders[t]
                    .send(Frame::of(&DataMsg::Batch(piece)))
                    .await
                    .map_err(|_| "output channel closed")?;
            }
        }
    }
    Ok(())
}

/// Sends `records` over a rebalance edge, a frame at a time, each to the
/// first target from the round-robin position that has room; only when
/// none has does it wait, for the one whose turn it is. Strict round-robin
/// paced every target by the slowest: the sender waited on its full
/// channel while the others ran dry (wordcount's second tokenizer was
/// 15-25 ms behind the first at every barrier, the first idle). Which
/// target gets which records is free on a rebalance edge: a checkpoint
/// holds whatever each target processed before its barrier.
async fn rebalance(edge: &mut EdgeOut, mut records: Vec<Record>) -> Result<()> {
    let n = edge.senders.len();
    while !records.is_empty() {
        let rest = records.split_off(records.len().min(BATCH));
        let mut msg = Some(Frame::of(&DataMsg::Batch(std::mem::replace(
            &mut records,
            rest,
        ))));
        for k in 0..n {
            let t = (edge.next + k) % n;
            match edge.senders[t].try_send(msg.take().expect("held until sent")) {
                Ok(()) => {
                    edge.next = (t + 1) % n;
                    break;
                }
                Err(mpsc::error::TrySendError::Full(back)) => msg = Some(back),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err("output channel closed".into())
                }
            }
        }
        if let Some(msg) = msg {
            let t = edge.next;
            edge.next = (t + 1) % n;
            edge.senders[t]
                .send(msg)
                .await
                .map_err(|_| "output channel closed")?;
        }
    }
    Ok(())
}

/// How long a data channel's handshake may take, on either side.
const DATA_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `target` at `addr`: answers its nonce with this attempt's
/// proof (when the attempt has a channel key), then streams messages.
async fn connect_output(
    me: &WorkerId,
    target: &WorkerId,
    addr: SocketAddr,
    key: Option<&[u8]>,
    writers: &Writers,
) -> Result<mpsc::Sender<Frame>> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_send_buffer_size(SOCKET_BUFFER)?;
    let mut stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect output {addr}: {e}"))?;
    stream.set_nodelay(true)?;
    let mut hello = Vec::new();
    DataMsg::Hello(me.clone()).encode(&mut hello);
    if let Some(key) = key {
        let mut nonce = [0u8; protocol::DATA_NONCE_LEN];
        tokio::time::timeout(DATA_HANDSHAKE_TIMEOUT, stream.read_exact(&mut nonce))
            .await
            .map_err(|_| {
                format!("output {target} at {addr}: no handshake within {DATA_HANDSHAKE_TIMEOUT:?}")
            })??;
        hello.extend_from_slice(&protocol::data_proof(key, &nonce, me, target));
    }
    stream.write_all(&hello).await?;
    let (tx, mut rx) = mpsc::channel::<Frame>(CHANNEL_DEPTH);
    let writer = tokio::spawn(async move {
        while let Some(Frame(buf)) = rx.recv().await {
            if stream.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    writers.add(&writer);
    Ok(tx)
}

/// One input's frames, read but not decoded: the processing thread decodes
/// them, so the records are allocated on the thread that frees them (see
/// [`Frame`]).
type InputRx = mpsc::Receiver<Result<Vec<u8>, protocol::ProtocolError>>;

/// What an [`InputRx`] gave, decoded.
fn decoded(
    body: Option<Result<Vec<u8>, protocol::ProtocolError>>,
) -> Option<Result<DataMsg, protocol::ProtocolError>> {
    body.map(|b| b.and_then(|b| DataMsg::decode(&b)))
}

/// One incoming data connection's handshake: a fresh nonce out, the
/// sender's name and (with a key) its proof back. Returns who it is.
async fn data_handshake(
    stream: &mut tokio::net::TcpStream,
    me: &WorkerId,
    key: Option<&[u8]>,
) -> Result<WorkerId> {
    let mut nonce = [0u8; protocol::DATA_NONCE_LEN];
    if key.is_some() {
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| "no secure random source")?;
        stream.write_all(&nonce).await?;
    }
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 1024 {
        return Err(format!("data hello of {len} bytes").into());
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    let DataMsg::Hello(from) = DataMsg::decode(&body)? else {
        return Err("first data frame was not a hello".into());
    };
    if let Some(key) = key {
        let mut proof = [0u8; protocol::DATA_PROOF_LEN];
        stream.read_exact(&mut proof).await?;
        if !protocol::verify_data_proof(key, &nonce, &from, me, &proof) {
            return Err(
                format!("a connection claiming to be {from} failed the channel proof").into(),
            );
        }
    }
    Ok(from)
}

/// Accepts one authenticated connection per expected input. A connection
/// that fails its handshake (no proof, a wrong one, garbage, too slow) is
/// dropped and waiting goes on: a stranger on the network can neither
/// inject records nor stop the worker from starting.
async fn accept_inputs(
    listener: TcpListener,
    expected: Vec<WorkerId>,
    me: WorkerId,
    key: Option<Vec<u8>>,
) -> Result<Vec<InputRx>> {
    let mut slots: Vec<Option<InputRx>> = (0..expected.len()).map(|_| None).collect();
    let mut missing = expected.len();
    let (done_tx, mut done) = mpsc::channel::<(WorkerId, tokio::net::TcpStream)>(16);
    let mut handshakes = tokio::task::JoinSet::new();
    while missing > 0 {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut stream, peer) = accepted?;
                stream.set_nodelay(true)?;
                let (me, key, done_tx) = (me.clone(), key.clone(), done_tx.clone());
                handshakes.spawn(async move {
                    let shake = tokio::time::timeout(
                        DATA_HANDSHAKE_TIMEOUT,
                        data_handshake(&mut stream, &me, key.as_deref()),
                    )
                    .await;
                    match shake {
                        Ok(Ok(from)) => {
                            let _ = done_tx.send((from, stream)).await;
                        }
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "data connection refused"),
                        Err(_) => tracing::warn!(%peer, "data connection refused: no handshake within the bound"),
                    }
                });
            }
            Some((from, mut stream)) = done.recv() => {
                let Some(idx) = expected
                    .iter()
                    .enumerate()
                    .position(|(i, w)| *w == from && slots[i].is_none())
                else {
                    tracing::warn!(%from, "data connection refused: not an expected input, or already connected");
                    continue;
                };
                let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
                tokio::spawn(async move {
                    loop {
                        match protocol::read_data_body(&mut stream).await {
                            Ok(Some(body)) => {
                                if tx.send(Ok(body)).await.is_err() {
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                break;
                            }
                        }
                    }
                });
                slots[idx] = Some(rx);
                missing -= 1;
            }
        }
    }
    handshakes.abort_all();
    Ok(slots.into_iter().map(|s| s.expect("all filled")).collect())
}

async fn next_input(
    inputs: &mut [InputRx],
    skip: &[bool],
) -> (usize, Option<Result<DataMsg, protocol::ProtocolError>>) {
    let futures: Vec<_> = inputs
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| !skip[*i])
        .map(|(i, rx)| Box::pin(async move { (i, decoded(rx.recv().await)) }))
        .collect();
    if futures.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(futures).await.0
}

#[cfg(test)]
mod data_port_tests {
    use super::*;

    fn id(s: &str) -> WorkerId {
        WorkerId::new(s).expect("worker id")
    }

    /// A data port takes only the input that proves the attempt's key;
    /// garbage, a silent peer and a stranger with a wrong key neither fill
    /// the slot nor end the wait, and their bytes never reach the operator.
    #[tokio::test]
    async fn test_data_port_accepts_only_proven_inputs_and_survives_strangers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (me, up) = (id("sink-0"), id("count-0"));
        let key = vec![5u8; 32];
        let accept = tokio::spawn(accept_inputs(
            listener,
            vec![up.clone()],
            me.clone(),
            Some(key.clone()),
        ));
        let mut garbage = tokio::net::TcpStream::connect(addr).await.expect("connect");
        garbage
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let _silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let writers = Writers::default();
        let stranger = connect_output(&up, &me, addr, Some(&[9u8; 32]), &writers)
            .await
            .expect("the stranger's side cannot tell");
        let _ = stranger
            .send(Frame::of(&DataMsg::Barrier(CheckpointId(99))))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !accept.is_finished(),
            "strangers neither fill the slot nor end the wait"
        );

        let real = connect_output(&up, &me, addr, Some(&key), &writers)
            .await
            .expect("connect");
        let mut inputs = tokio::time::timeout(Duration::from_secs(5), accept)
            .await
            .expect("the real input is accepted")
            .expect("task")
            .expect("accept");
        real.send(Frame::of(&DataMsg::End)).await.expect("send");
        let first = decoded(
            tokio::time::timeout(Duration::from_secs(5), inputs[0].recv())
                .await
                .expect("a message"),
        );
        assert!(
            matches!(first, Some(Ok(DataMsg::End))),
            "only the real sender's bytes: {first:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazarus_storage::{Codec, Epoch, JobId};

    /// A writer blocked on a peer that accepts but never reads keeps
    /// running after its sender is gone (it would until TCP gives up);
    /// aborting the ended assignment's writers ends it and closes the
    /// connection.
    #[tokio::test]
    async fn test_a_writer_blocked_on_a_silent_peer_is_ended_with_its_assignment() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (me, up) = (
            WorkerId::new("sink-0").expect("id"),
            WorkerId::new("count-0").expect("id"),
        );
        let writers = Writers::default();
        let peer = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let tx = connect_output(&up, &me, addr, None, &writers)
            .await
            .expect("connect");
        let mut silent = peer.await.expect("task").expect("accept");
        // Fill the socket buffers and the channel: 64 KiB records, at most
        // 4096 of them (256 MiB), until a send finds no room for 1 s.
        let record = Record::new("k", vec![7u8; 64 << 10]);
        let mut sent = 0;
        for _ in 0..4096 {
            let send = tx.send(Frame::of(&DataMsg::Batch(vec![record.clone()])));
            match tokio::time::timeout(Duration::from_secs(1), send).await {
                Ok(result) => {
                    result.expect("the writer holds the channel");
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        assert!(sent < 4096, "the silent peer never filled the connection");
        drop(tx);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let running = |w: &Writers| {
            w.0.lock()
                .expect("lock")
                .iter()
                .filter(|t| !t.is_finished())
                .count()
        };
        assert_eq!(
            running(&writers),
            1,
            "blocked in a write, the writer outlives its sender"
        );
        assert_eq!(writers.abort_all(), 1);
        // The aborted writer's connection closes: reading drains what was
        // sent and then ends, within a bounded time.
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0usize;
            loop {
                match silent.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        })
        .await
        .expect("the connection closes once its writer is aborted");
        // What the kernel held was delivered (the handshake and whole
        // frames, then part of the one being written); the frames still
        // queued for the writer (the channel was full) were not: without
        // the abort, reading would have unblocked the writer and every
        // byte would have arrived.
        let mut frame = Vec::new();
        DataMsg::Batch(vec![record]).encode(&mut frame);
        let total = sent * frame.len();
        assert!(
            drained > 0 && drained < total - (CHANNEL_DEPTH - 1) * frame.len(),
            "read {drained} of {total} bytes sent"
        );
    }

    /// A halt ends an assignment that waits forever (a send to a peer on a
    /// lost host); the messages before it reach the assignment in order,
    /// and a closed control link reaches it as a close.
    #[tokio::test]
    async fn test_a_halt_ends_an_assignment_wherever_it_waits() {
        let (ctl_tx, mut ctl_in) = mpsc::unbounded_channel();
        let (fwd_tx, mut fwd_rx) = mpsc::unbounded_channel();
        for c in [1, 2] {
            let msg = ToWorker::Trigger {
                checkpoint: CheckpointId(c),
            };
            ctl_tx.send(Some(msg)).expect("send");
        }
        ctl_tx.send(Some(ToWorker::Halt)).expect("send");
        let stuck = std::future::pending::<Result<()>>();
        let e = tokio::time::timeout(
            Duration::from_secs(5),
            until_halted(stuck, &mut ctl_in, fwd_tx),
        )
        .await
        .expect("ended by the halt")
        .expect_err("halted");
        assert!(e.is::<Halted>(), "{e}");
        let mut seen = Vec::new();
        while let Ok(Some(ToWorker::Trigger { checkpoint })) = fwd_rx.try_recv() {
            seen.push(checkpoint.0);
        }
        assert_eq!(seen, [1, 2], "passed on in order");

        // A closed link: the assignment sees its channel close and ends.
        drop(ctl_tx);
        let (fwd_tx, mut fwd_rx) = mpsc::unbounded_channel();
        let run = async move {
            match fwd_rx.recv().await {
                None => Err::<(), BoxError>("control channel closed".into()),
                Some(other) => panic!("unexpected {other:?}"),
            }
        };
        let e = until_halted(run, &mut ctl_in, fwd_tx)
            .await
            .expect_err("closed");
        assert!(e.to_string().contains("closed"), "{e}");
    }

    /// A sink that restored a checkpoint not yet durable waits for its
    /// `Committed`, and only for that one (or a newer); a shutdown or a
    /// halt ends the wait.
    #[tokio::test]
    async fn test_a_sink_waits_for_its_restored_checkpoint_to_be_durable() {
        let (ctl_tx, mut ctl_in) = mpsc::unbounded_channel();
        let committed = |c| {
            Some(ToWorker::Committed {
                checkpoint: CheckpointId(c),
            })
        };
        ctl_tx.send(committed(6)).expect("send");
        {
            let waiting = until_durable(CheckpointId(7), &mut ctl_in);
            tokio::pin!(waiting);
            assert!(
                tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                    .await
                    .is_err(),
                "an older checkpoint's commit does not end the wait"
            );
            ctl_tx.send(committed(7)).expect("send");
            assert!(waiting.await.expect("durable"), "its own commit does");
        }
        ctl_tx.send(committed(9)).expect("send");
        assert!(until_durable(CheckpointId(8), &mut ctl_in)
            .await
            .expect("newer"));
        ctl_tx.send(Some(ToWorker::Shutdown)).expect("send");
        assert!(!until_durable(CheckpointId(10), &mut ctl_in)
            .await
            .expect("shut down"));
        ctl_tx.send(Some(ToWorker::Halt)).expect("send");
        let e = until_durable(CheckpointId(10), &mut ctl_in)
            .await
            .expect_err("halted");
        assert!(e.is::<Halted>(), "{e}");
        drop(ctl_tx);
        assert!(!until_durable(CheckpointId(10), &mut ctl_in)
            .await
            .expect("closed"));
    }

    /// Works `steps` steps of 50 µs each without ever waiting (inputs that
    /// are always ready), opening a [`ControlWindow`] before each step;
    /// `until(step)` ends it early. Returns the steps it took.
    async fn busy(steps: u32, mut until: impl FnMut(u32) -> bool) -> u32 {
        let mut control = ControlWindow::new();
        for step in 0..steps {
            control.open().await;
            if until(step) {
                return step;
            }
            let work = crate::clock::Stopwatch::start();
            while work.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            }
        }
        steps
    }

    /// A busy assignment still hears the control messages that arrive
    /// while it works, within a few steps (a window opens every 500 µs, 10
    /// steps here): a trigger reaches it, and a halt ends it, long before
    /// its second of work would. Without the windows both wait for all
    /// 20,000 steps.
    #[tokio::test]
    async fn test_a_busy_assignment_hears_its_control_messages() {
        let (ctl_tx, mut ctl_in) = mpsc::unbounded_channel();
        let (fwd_tx, mut fwd_rx) = mpsc::unbounded_channel();
        let (sent_at, heard_at) = (100, Arc::new(AtomicU64::new(u64::MAX)));
        let (heard, tx) = (heard_at.clone(), ctl_tx.clone());
        let run = async move {
            let steps = busy(20_000, |step| {
                if step == sent_at {
                    let trigger = ToWorker::Trigger {
                        checkpoint: CheckpointId(7),
                    };
                    tx.send(Some(trigger)).expect("send");
                }
                matches!(fwd_rx.try_recv(), Ok(Some(ToWorker::Trigger { .. })))
            })
            .await;
            heard.store(steps as u64, Ordering::Relaxed);
            Ok(())
        };
        until_halted(run, &mut ctl_in, fwd_tx)
            .await
            .expect("ran to its end");
        let step = heard_at.load(Ordering::Relaxed);
        assert!(
            (sent_at as u64..sent_at as u64 + 100).contains(&step),
            "a trigger sent at step {sent_at} was heard at step {step} of 20,000"
        );

        let (fwd_tx, _fwd_rx) = mpsc::unbounded_channel();
        let done = Arc::new(AtomicU64::new(0));
        let steps = done.clone();
        let run = async move {
            let n = busy(20_000, |step| {
                if step == sent_at {
                    ctl_tx.send(Some(ToWorker::Halt)).expect("send");
                }
                steps.store(step as u64, Ordering::Relaxed);
                false
            })
            .await;
            Err::<(), BoxError>(format!("worked all {n} steps: the halt was not heard").into())
        };
        let e = until_halted(run, &mut ctl_in, fwd_tx)
            .await
            .expect_err("halted");
        assert!(e.is::<Halted>(), "{e}");
        let step = done.load(Ordering::Relaxed);
        assert!(
            step < sent_at as u64 + 100,
            "a halt sent at step {sent_at} was heard at step {step} of 20,000"
        );
    }

    /// A shutdown that reached an assignment which then failed without
    /// reading it (its peer exited first) still ends the process: it is
    /// read before anything newer, not waited for again.
    #[tokio::test]
    async fn test_a_shutdown_the_failed_assignment_did_not_read_still_counts() {
        let (_ctl_tx, mut ctl_in) = mpsc::unbounded_channel();
        let unread = vec![
            Some(ToWorker::Committed {
                checkpoint: CheckpointId(3),
            }),
            Some(ToWorker::Shutdown),
        ];
        let next =
            tokio::time::timeout(Duration::from_secs(5), next_assignment(unread, &mut ctl_in))
                .await
                .expect("not waited for")
                .expect("no error");
        assert!(next.is_none(), "shut down");
    }

    fn records(n: usize) -> Vec<Record> {
        (0..n).map(|i| Record::new(i.to_string(), "")).collect()
    }

    fn frames(rx: &mut mpsc::Receiver<Frame>) -> Vec<usize> {
        let mut sizes = Vec::new();
        while let Ok(Frame(frame)) = rx.try_recv() {
            match DataMsg::decode(&frame[4..]).expect("a frame") {
                DataMsg::Batch(b) => sizes.push(b.len()),
                other => panic!("not a batch: {other:?}"),
            }
        }
        sizes
    }

    #[tokio::test]
    async fn test_rebalance_sends_to_a_target_with_room_and_waits_only_when_all_are_full() {
        let (tx0, mut rx0) = mpsc::channel(1);
        let (tx1, mut rx1) = mpsc::channel(2);
        tx0.try_send(Frame::of(&DataMsg::Batch(records(1))))
            .expect("room");
        let mut edge = EdgeOut {
            partition: Partition::Rebalance,
            senders: vec![tx0, tx1],
            next: 0,
            key_groups: 8,
        };
        // Target 0 is full and its turn: both frames go to target 1.
        rebalance(&mut edge, records(BATCH + 10))
            .await
            .expect("sent");
        assert_eq!(frames(&mut rx1), vec![BATCH, 10]);
        assert_eq!(frames(&mut rx0), vec![1], "nothing more to the full target");
        // Both full: it waits for the one whose turn it is, then sends.
        edge.senders[0]
            .try_send(Frame::of(&DataMsg::Batch(records(1))))
            .expect("room");
        edge.senders[1]
            .try_send(Frame::of(&DataMsg::Batch(records(1))))
            .expect("room");
        edge.senders[1]
            .try_send(Frame::of(&DataMsg::Batch(records(1))))
            .expect("room");
        let turn = edge.next;
        let send =
            tokio::spawn(async move { rebalance(&mut edge, records(3)).await.map(|()| edge.next) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!send.is_finished(), "waits while every target is full");
        let rx = if turn == 0 { &mut rx0 } else { &mut rx1 };
        assert!(rx.recv().await.is_some());
        let next = tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .expect("sent once its target had room")
            .expect("task")
            .expect("sent");
        assert_eq!(next, (turn + 1) % 2, "the turn moves on");
        let rx = if turn == 0 { &mut rx0 } else { &mut rx1 };
        assert_eq!(frames(rx).last(), Some(&3));
    }

    #[test]
    fn test_small_parts_cost_one_unit_and_others_a_cores_share() {
        let chunk = |raw_len: u64| ChunkRef {
            key: "chunks/1/w/p.chunk".into(),
            codec: Codec::None,
            stored_len: raw_len,
            stored_crc: 0,
            raw_len,
            raw_crc: 0,
        };
        assert_eq!(part_cost(None), LARGE_PART_COST, "never written: the most");
        assert_eq!(part_cost(Some(&chunk(13_000))), 1);
        assert_eq!(part_cost(Some(&chunk((1 << 20) - 1))), 1);
        assert_eq!(part_cost(Some(&chunk(1 << 20))), LARGE_PART_COST);
        assert_eq!(part_cost(Some(&chunk(8 << 20))), LARGE_PART_COST);
    }

    fn standby_assignment(store: &str, cache_dir: std::path::PathBuf) -> Assignment {
        Assignment {
            job: JobId::new("j").expect("job id"),
            worker: WorkerId::new("kv-0").expect("worker id"),
            operator: "kv".into(),
            kind: "kv".into(),
            index: 0,
            parallelism: 1,
            key_groups: 4,
            params: BTreeMap::new(),
            store: store.into(),
            epoch: Epoch(1),
            restore: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            cache_dir,
            heartbeat_ms: 100,
            codec: Codec::None,
            channel_key: None,
            replay_records: None,
            restore_pending: false,
        }
    }

    #[tokio::test]
    async fn test_a_busy_standby_follows_the_newest_checkpoint_and_skips_removed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store_url = format!("file://{}", dir.path().join("store").display());
        let js = CheckpointStore::open(&store_url)
            .expect("store")
            .job(JobId::new("j").expect("job id"));
        js.claim_epoch(Epoch(1)).await.expect("claim");
        // Checkpoints 5 and 7 are committed; 6 was, and retention removed
        // it before the standby got to it.
        for n in [5, 7] {
            let m = Manifest::new(JobId::new("j").expect("job id"), CheckpointId(n), Epoch(1));
            js.commit(&m).await.expect("commit");
        }
        let a = standby_assignment(&store_url, dir.path().join("cache"));
        let (ctl_tx, mut ctl_in) = mpsc::unbounded_channel();
        let (to_sup, mut from_standby) = mpsc::unbounded_channel();
        // Announced while the standby was busy: only the newest (6) is
        // followed, and it is gone; then 7 is announced.
        for n in [5, 6] {
            ctl_tx
                .send(Some(ToWorker::Follow {
                    checkpoint: CheckpointId(n),
                }))
                .expect("send");
        }
        let link = LinkState::default();
        let decoded = DecodedParts::default();
        let standby = follow(a, None, false, &decoded, &mut ctl_in, &to_sup, &link);
        let driver = async {
            // Nothing is reported for 5 (skipped) or 6 (removed).
            let early = tokio::time::timeout(Duration::from_millis(300), from_standby.recv()).await;
            assert!(early.is_err(), "no follow reported yet: {early:?}");
            ctl_tx
                .send(Some(ToWorker::Follow {
                    checkpoint: CheckpointId(7),
                }))
                .expect("send");
            let followed = tokio::time::timeout(Duration::from_secs(10), from_standby.recv())
                .await
                .expect("reported in time");
            ctl_tx.send(Some(ToWorker::Shutdown)).expect("send");
            followed
        };
        let (ended, followed) = tokio::join!(standby, driver);
        match ended {
            Ok(None) => {}
            Ok(Some(_)) => panic!("promoted, not shut down"),
            Err(e) => panic!("the standby ended with an error: {e}"),
        }
        assert!(
            matches!(
                followed,
                Some(ToSupervisor::Followed {
                    checkpoint: CheckpointId(7),
                    ..
                })
            ),
            "{followed:?}"
        );
    }
}
