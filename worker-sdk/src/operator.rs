//! The traits a worker author implements, the context they are built with,
//! and the registry that maps a job spec's operator `kind` to a constructor.

use std::collections::BTreeMap;

use lazarus_storage::{CheckpointId, JobId, WorkerId};

use crate::record::{Emitter, Record};
use crate::state::{Restored, Snapshot};

/// Errors from operator code: anything displayable.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error that restarting cannot fix: a bad configuration, an input that
/// cannot be opened, data that will never parse. A worker that returns it
/// (from a constructor, `poll`, `process`, `restore`, ...) ends the whole
/// job with its message instead of being restarted again and again. Every
/// other error is retryable: the job rolls back to its last checkpoint.
///
/// ```
/// use lazarus_sdk::{BoxError, Fatal};
///
/// fn open_input(path: &str) -> Result<std::fs::File, BoxError> {
///     // A missing input file will not appear by restarting: fatal.
///     std::fs::File::open(path).map_err(|e| Fatal::new(format!("input {path}: {e}")).into())
/// }
///
/// let err = open_input("/no/such/file").unwrap_err();
/// assert!(Fatal::is_fatal(&err));
/// assert!(err.to_string().starts_with("input /no/such/file: "));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    message: String,
}

impl Fatal {
    /// A fatal error with this message.
    ///
    /// ```
    /// let e = lazarus_sdk::Fatal::new("threshold must be a number");
    /// assert_eq!(e.to_string(), "threshold must be a number");
    /// ```
    pub fn new(message: impl std::fmt::Display) -> Fatal {
        Fatal {
            message: message.to_string(),
        }
    }

    /// Whether `error` (or an error it wraps) is [`Fatal`].
    ///
    /// ```
    /// use lazarus_sdk::{BoxError, Fatal};
    /// let retryable: BoxError = "connection reset".into();
    /// assert!(!Fatal::is_fatal(&retryable));
    /// let fatal: BoxError = Fatal::new("bad config").into();
    /// assert!(Fatal::is_fatal(&fatal));
    /// ```
    pub fn is_fatal(error: &BoxError) -> bool {
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
        while let Some(cur) = e {
            if cur.is::<Fatal>() {
                return true;
            }
            e = cur.source();
        }
        false
    }
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

/// Who an operator instance is and what the job gave it.
#[derive(Debug, Clone)]
pub struct Context {
    /// The job.
    pub job: JobId,
    /// This worker.
    pub worker: WorkerId,
    /// The operator's name in the job spec.
    pub operator: String,
    /// Instance index, `0..parallelism`.
    pub index: u32,
    /// The operator's parallelism.
    pub parallelism: u32,
    /// The job's key groups.
    pub key_groups: u32,
    /// The job's `[params]`.
    pub params: BTreeMap<String, String>,
}

impl Context {
    /// A required parameter, or a [`Fatal`] error that names it (a job
    /// spec without it will not run by restarting).
    ///
    /// ```
    /// # let ctx = lazarus_sdk::Context::for_test("op", 0, 1);
    /// assert!(ctx.param("input").unwrap_err().to_string().contains("missing parameter \"input\""));
    /// ```
    pub fn param(&self, name: &str) -> Result<&str, BoxError> {
        self.params.get(name).map(String::as_str).ok_or_else(|| {
            Fatal::new(format!(
                "operator {}: missing parameter {name:?} in [params]",
                self.operator
            ))
            .into()
        })
    }

    /// A context for unit tests of operators.
    ///
    /// ```
    /// let ctx = lazarus_sdk::Context::for_test("counter", 1, 2);
    /// assert_eq!(ctx.worker.as_str(), "counter-1");
    /// ```
    pub fn for_test(operator: &str, index: u32, parallelism: u32) -> Context {
        Context {
            job: JobId::new("test").expect("valid"),
            worker: WorkerId::new(format!("{operator}-{index}")).expect("valid operator name"),
            operator: operator.to_string(),
            index,
            parallelism,
            key_groups: 128,
            params: BTreeMap::new(),
        }
    }
}

/// What a source's poll produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePoll {
    /// It emitted records; poll again at once.
    Ready,
    /// Nothing to do right now (for example a service waiting for
    /// requests): the worker handles control messages and polls again
    /// within a millisecond, instead of spinning a core.
    Idle,
    /// There is no more input; the job finishes after a final checkpoint.
    Exhausted,
}

/// A replayable source: its read position is part of its state, and after
/// a restore it continues from the restored position.
///
/// ```
/// use lazarus_sdk::*;
/// struct Numbers { next: u64, end: u64 }
/// impl Source for Numbers {
///     fn poll(&mut self, out: &mut Emitter, max: usize) -> Result<SourcePoll, BoxError> {
///         for _ in 0..max {
///             if self.next == self.end { return Ok(SourcePoll::Exhausted); }
///             out.emit(Record::new("", self.next.to_string()));
///             self.next += 1;
///         }
///         Ok(SourcePoll::Ready)
///     }
///     fn snapshot(&mut self) -> Snapshot { Snapshot::with_metadata(self.next.to_le_bytes().to_vec()) }
///     fn restore(&mut self, state: &Restored) -> Result<(), BoxError> {
///         self.next = u64::from_le_bytes(state.metadata().try_into()?);
///         Ok(())
///     }
/// }
/// ```
pub trait Source: Send + 'static {
    /// Emits up to `max` records.
    fn poll(&mut self, out: &mut Emitter, max: usize) -> Result<SourcePoll, BoxError>;
    /// Captures the position (and any state); must be quick.
    fn snapshot(&mut self) -> Snapshot;
    /// Called right before [`Source::snapshot`] with the checkpoint it is
    /// for, so that a source can tie what it staged to that checkpoint and
    /// release it in [`Source::committed`]. The default does nothing.
    ///
    /// ```
    /// use lazarus_sdk::*;
    /// struct Staging { current: Vec<String>, staged: Vec<(CheckpointId, Vec<String>)> }
    /// impl Staging {
    ///     fn on_prepare(&mut self, n: CheckpointId) {
    ///         let batch = std::mem::take(&mut self.current);
    ///         self.staged.push((n, batch));
    ///     }
    /// }
    /// ```
    fn prepare_snapshot(&mut self, checkpoint: CheckpointId) {
        let _ = checkpoint;
    }
    /// Seeks to a restored position.
    fn restore(&mut self, state: &Restored) -> Result<(), BoxError>;
    /// Checkpoint `checkpoint` committed: everything this source did before
    /// its snapshot for it survives any failure from now on. A service
    /// acknowledges writes here (see `examples/kv-service`). The default
    /// does nothing.
    ///
    /// ```
    /// use lazarus_sdk::*;
    /// struct Acks { pending: Vec<(CheckpointId, String)> }
    /// impl Acks {
    ///     fn on_committed(&mut self, n: CheckpointId) {
    ///         // Everything staged at or before `n` is now durable.
    ///         self.pending.retain(|(at, _)| *at > n);
    ///     }
    /// }
    /// ```
    fn committed(&mut self, checkpoint: CheckpointId) -> Result<(), BoxError> {
        let _ = checkpoint;
        Ok(())
    }
}

/// An operator: takes records, emits records, may keep state.
///
/// ```
/// use lazarus_sdk::*;
/// struct Upper;
/// impl Operator for Upper {
///     fn process(&mut self, r: Record, out: &mut Emitter) -> Result<(), BoxError> {
///         out.emit(Record::new(r.key, r.value.to_ascii_uppercase()));
///         Ok(())
///     }
/// }
/// ```
pub trait Operator: Send + 'static {
    /// Handles one record.
    fn process(&mut self, record: Record, out: &mut Emitter) -> Result<(), BoxError>;
    /// Captures state at a barrier; must be quick (freeze, don't serialize).
    fn snapshot(&mut self) -> Snapshot {
        Snapshot::default()
    }
    /// Restores state: replaces the instance's state with the restored
    /// one. A hot standby calls it on one instance for every checkpoint it
    /// follows (and a promotion may call it once more), so it must not add
    /// to what an earlier call restored.
    fn restore(&mut self, _state: &Restored) -> Result<(), BoxError> {
        Ok(())
    }
}

/// An exactly-once sink (two-phase commit): output is staged per checkpoint
/// and published only after that checkpoint commits.
///
/// The runtime calls `pre_commit(n)` at barrier `n` (make the output staged
/// since the previous barrier durable under `n`), `commit(n)` when
/// checkpoint `n` has committed (publish everything staged up to `n`;
/// idempotent), and on start `recover(restored)`: publish what is staged up
/// to the restored checkpoint and drop everything staged after it.
///
/// ```
/// use lazarus_sdk::*;
/// use lazarus_storage::CheckpointId;
/// #[derive(Default)]
/// struct Collect { staged: Vec<(CheckpointId, Vec<Record>)>, open: Vec<Record>, published: Vec<Record> }
/// impl Sink for Collect {
///     fn write(&mut self, r: Record) -> Result<(), BoxError> { self.open.push(r); Ok(()) }
///     fn pre_commit(&mut self, n: CheckpointId) -> Result<(), BoxError> {
///         self.staged.push((n, std::mem::take(&mut self.open)));
///         Ok(())
///     }
///     fn commit(&mut self, n: CheckpointId) -> Result<(), BoxError> {
///         let (done, keep) = std::mem::take(&mut self.staged).into_iter().partition(|(id, _)| *id <= n);
///         self.staged = keep;
///         self.published.extend(done.into_iter().flat_map(|(_, r): (CheckpointId, Vec<Record>)| r));
///         Ok(())
///     }
///     fn recover(&mut self, _restored: Option<CheckpointId>) -> Result<(), BoxError> { Ok(()) }
/// }
/// ```
pub trait Sink: Send + 'static {
    /// Stages one record for the checkpoint in progress.
    fn write(&mut self, record: Record) -> Result<(), BoxError>;
    /// Barrier `checkpoint`: make the staged output durable under it.
    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<(), BoxError>;
    /// Checkpoint committed: publish staged output up to it.
    fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), BoxError>;
    /// On start: publish staged output up to `restored`, drop the rest.
    fn recover(&mut self, restored: Option<CheckpointId>) -> Result<(), BoxError>;
}

/// A constructed operator instance.
pub enum Role {
    /// A source.
    Source(Box<dyn Source>),
    /// An operator.
    Operator(Box<dyn Operator>),
    /// A sink.
    Sink(Box<dyn Sink>),
}

type Ctor = Box<dyn Fn(&Context) -> Result<Role, BoxError> + Send + Sync>;

/// Maps operator kinds (the job spec's `kind`) to constructors. A worker
/// binary builds one and hands it to [`crate::run_worker`].
///
/// ```no_run
/// use lazarus_sdk::*;
/// # struct Upper;
/// # impl Operator for Upper { fn process(&mut self, r: Record, o: &mut Emitter) -> Result<(), BoxError> { o.emit(r); Ok(()) } }
/// fn main() -> std::process::ExitCode {
///     let registry = Registry::new().operator("upper", |_ctx| Ok(Upper));
///     lazarus_sdk::run_worker(registry)
/// }
/// ```
#[derive(Default)]
pub struct Registry {
    ctors: BTreeMap<String, Ctor>,
    /// Kinds a hot standby builds when it starts following.
    early: std::collections::BTreeSet<String>,
    /// Kinds a hot standby builds when it starts following and keeps
    /// restored to each checkpoint it follows.
    ahead: std::collections::BTreeSet<String>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers a source kind.
    pub fn source<S: Source>(
        mut self,
        kind: &str,
        f: impl Fn(&Context) -> Result<S, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.ahead.remove(kind);
        self.ctors.insert(
            kind.to_string(),
            Box::new(move |ctx| Ok(Role::Source(Box::new(f(ctx)?)))),
        );
        self
    }

    /// Registers a source kind that a hot standby builds as soon as it
    /// starts following, not at its promotion: a service whose program or
    /// listener must already run on the standby's host, so that a failover
    /// only moves the VIP. The instance is restored and polled only once
    /// promoted; until then it must not serve anything that changes state.
    ///
    /// ```no_run
    /// use lazarus_sdk::*;
    /// struct Warm;
    /// impl Source for Warm {
    ///     fn poll(&mut self, _out: &mut Emitter, _max: usize) -> Result<SourcePoll, BoxError> { Ok(SourcePoll::Idle) }
    ///     fn snapshot(&mut self) -> Snapshot { Snapshot::default() }
    ///     fn restore(&mut self, _state: &Restored) -> Result<(), BoxError> { Ok(()) }
    /// }
    /// fn main() -> std::process::ExitCode {
    ///     lazarus_sdk::run_worker(Registry::new().early_source("warm", |_ctx| Ok(Warm)))
    /// }
    /// ```
    pub fn early_source<S: Source>(
        mut self,
        kind: &str,
        f: impl Fn(&Context) -> Result<S, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.early.insert(kind.to_string());
        self.source(kind, f)
    }

    /// As [`Registry::early_source`], and the hot standby keeps the
    /// instance restored to every checkpoint it follows (only the key
    /// groups that changed are decoded), so that a promotion finds the
    /// state decoded in memory and reads nothing. For a service whose
    /// `restore` only replaces in-memory state (`restore` is then called
    /// once per followed checkpoint, and again if the promotion restores
    /// another one).
    ///
    /// ```no_run
    /// use lazarus_sdk::*;
    /// struct Kv { state: KeyedState<String, Vec<u8>> }
    /// impl Source for Kv {
    ///     fn poll(&mut self, _out: &mut Emitter, _max: usize) -> Result<SourcePoll, BoxError> { Ok(SourcePoll::Idle) }
    ///     fn snapshot(&mut self) -> Snapshot { self.state.snapshot() }
    ///     fn restore(&mut self, s: &Restored) -> Result<(), BoxError> { self.state.restore(s) }
    /// }
    /// fn main() -> std::process::ExitCode {
    ///     lazarus_sdk::run_worker(Registry::new().following_source("kv", |ctx| {
    ///         Ok(Kv { state: KeyedState::new("kv", ctx) })
    ///     }))
    /// }
    /// ```
    pub fn following_source<S: Source>(
        self,
        kind: &str,
        f: impl Fn(&Context) -> Result<S, BoxError> + Send + Sync + 'static,
    ) -> Self {
        let mut this = self.early_source(kind, f);
        this.ahead.insert(kind.to_string());
        this
    }

    /// Whether a hot standby keeps an instance of `kind` restored to each
    /// checkpoint it follows: operators, and sources registered with
    /// [`Registry::following_source`].
    pub(crate) fn restores_ahead(&self, kind: &str) -> bool {
        self.ahead.contains(kind)
    }

    /// Whether a hot standby of `kind` is built before its promotion (see
    /// [`Registry::early_source`]).
    ///
    /// ```
    /// # use lazarus_sdk::*;
    /// # struct S;
    /// # impl Source for S {
    /// #     fn poll(&mut self, _o: &mut Emitter, _m: usize) -> Result<SourcePoll, BoxError> { Ok(SourcePoll::Idle) }
    /// #     fn snapshot(&mut self) -> Snapshot { Snapshot::default() }
    /// #     fn restore(&mut self, _s: &Restored) -> Result<(), BoxError> { Ok(()) }
    /// # }
    /// let r = Registry::new().early_source("svc", |_| Ok(S));
    /// assert!(r.builds_early("svc") && !r.builds_early("other"));
    /// ```
    pub fn builds_early(&self, kind: &str) -> bool {
        self.early.contains(kind)
    }

    /// Registers an operator kind.
    pub fn operator<O: Operator>(
        mut self,
        kind: &str,
        f: impl Fn(&Context) -> Result<O, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.ahead.insert(kind.to_string());
        self.ctors.insert(
            kind.to_string(),
            Box::new(move |ctx| Ok(Role::Operator(Box::new(f(ctx)?)))),
        );
        self
    }

    /// Registers a sink kind.
    pub fn sink<S: Sink>(
        mut self,
        kind: &str,
        f: impl Fn(&Context) -> Result<S, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.ahead.remove(kind);
        self.ctors.insert(
            kind.to_string(),
            Box::new(move |ctx| Ok(Role::Sink(Box::new(f(ctx)?)))),
        );
        self
    }

    /// Builds an instance of `kind`.
    pub fn build(&self, kind: &str, ctx: &Context) -> Result<Role, BoxError> {
        let ctor = self.ctors.get(kind).ok_or_else(|| {
            Fatal::new(format!(
                "unknown operator kind {kind:?}; this worker binary provides: {}",
                self.ctors.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        ctor(ctx)
    }
}
