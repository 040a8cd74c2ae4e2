//! State: what a snapshot hands the runtime, what a restore hands back, and
//! keyed state partitioned into key groups.
//!
//! A snapshot must not stop the world: [`Snapshot`] parts carry either a
//! closure that serializes *frozen* data later, on a blocking thread, or a
//! note that the part is unchanged since the previous checkpoint (the
//! runtime then references the chunk it already wrote: incremental
//! checkpoints). [`KeyedState`] freezes each dirty key group whole: a
//! snapshot clones one `Arc` per dirty group (its vector of shards); the
//! group's first write after it moves the shards into the snapshot's
//! slots, one per shard, and the first write to a frozen shard the
//! serialization has not reached archives that shard for the snapshot,
//! then changes it in place (archive-on-write).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use lazarus_storage::rkyv::util::AlignedVec;
use lazarus_storage::rkyv::{self, rancor};
use lazarus_storage::{CheckpointId, ChunkRef, MappedChunk};

use crate::decoded::DecodedParts;
pub use crate::decoded::{Decoded, Revive};
use crate::operator::{BoxError, Context};
use crate::record::group_owner;

type Serializer = Box<dyn FnOnce() -> Result<bytes::Bytes, BoxError> + Send>;

/// One named part of a snapshot.
pub enum PartContent {
    /// Serialize this later, off the processing thread; `revive`, if set,
    /// is kept beside the written chunk (see [`Snapshot::add_fresh_decoded`]).
    Fresh {
        /// Turns the frozen part into bytes.
        serialize: Serializer,
        /// The decoded part, while it lasts.
        revive: Option<Revive>,
    },
    /// Same bytes as the part of this name in the previous checkpoint.
    Unchanged,
}

/// What an operator's `snapshot` returns. Part names follow the rules of
/// worker names; names starting with `_lazarus.` are the runtime's (a
/// snapshot using one fails the worker, naming the part).
///
/// ```
/// use lazarus_sdk::Snapshot;
/// let mut s = Snapshot::with_metadata(b"offset=42".to_vec());
/// let frozen = std::sync::Arc::new(vec![1u8, 2, 3]);
/// s.add_fresh("buffer", move || Ok(frozen.as_ref().clone()));
/// s.add_unchanged("big-table");
/// assert_eq!(s.parts().len(), 2);
/// ```
#[derive(Default)]
pub struct Snapshot {
    parts: Vec<(String, PartContent)>,
    metadata: Vec<u8>,
}

impl Snapshot {
    /// A snapshot holding only metadata (for example a source position).
    pub fn with_metadata(metadata: Vec<u8>) -> Snapshot {
        Snapshot {
            parts: Vec::new(),
            metadata,
        }
    }

    /// Adds a part that `serialize` turns into bytes later, on a blocking thread.
    pub fn add_fresh<B: Into<bytes::Bytes>>(
        &mut self,
        name: impl Into<String>,
        serialize: impl FnOnce() -> Result<B, BoxError> + Send + 'static,
    ) {
        self.parts.push((
            name.into(),
            PartContent::Fresh {
                serialize: Box::new(move || serialize().map(Into::into)),
                revive: None,
            },
        ));
    }

    /// As [`Snapshot::add_fresh`], and the runtime keeps `revive` beside
    /// the chunk it writes: a later restore of that very chunk in this
    /// process (a rollback in place) asks `revive` for the decoded part
    /// and, if it gets it, neither reads nor decodes the chunk (see
    /// [`Restored::decoded`]). `revive` should hold weak pointers, so the
    /// runtime keeps nothing alive, and answer `None` once the part changed.
    ///
    /// ```
    /// use std::sync::{Arc, Weak};
    /// use lazarus_sdk::Snapshot;
    /// let table = Arc::new(vec![1u8, 2, 3]);
    /// let (frozen, weak): (_, Weak<Vec<u8>>) = (table.clone(), Arc::downgrade(&table));
    /// let mut s = Snapshot::default();
    /// s.add_fresh_decoded(
    ///     "table",
    ///     move || Ok(frozen.as_ref().clone()),
    ///     move || weak.upgrade().map(|t| t as lazarus_sdk::Decoded),
    /// );
    /// assert_eq!(s.parts().len(), 1);
    /// ```
    pub fn add_fresh_decoded<B: Into<bytes::Bytes>>(
        &mut self,
        name: impl Into<String>,
        serialize: impl FnOnce() -> Result<B, BoxError> + Send + 'static,
        revive: impl Fn() -> Option<Decoded> + Send + Sync + 'static,
    ) {
        self.parts.push((
            name.into(),
            PartContent::Fresh {
                serialize: Box::new(move || serialize().map(Into::into)),
                revive: Some(Arc::new(revive)),
            },
        ));
    }

    /// Adds a part unchanged since the previous checkpoint.
    pub fn add_unchanged(&mut self, name: impl Into<String>) {
        self.parts.push((name.into(), PartContent::Unchanged));
    }

    /// Sets the metadata.
    pub fn set_metadata(&mut self, metadata: Vec<u8>) {
        self.metadata = metadata;
    }

    /// Appends another snapshot's parts (metadata of `other` is ignored).
    pub fn extend(&mut self, other: Snapshot) {
        self.parts.extend(other.parts);
    }

    /// The parts.
    pub fn parts(&self) -> &[(String, PartContent)] {
        &self.parts
    }

    pub(crate) fn into_parts(self) -> (Vec<(String, PartContent)>, Vec<u8>) {
        (self.parts, self.metadata)
    }

    /// Serializes every fresh part now, on this thread, and returns the
    /// parts by name with the metadata (unchanged parts are left out): for
    /// testing an operator's snapshot and restore (see
    /// [`Restored::from_parts`]).
    ///
    /// ```
    /// use lazarus_sdk::Snapshot;
    /// let mut s = Snapshot::with_metadata(b"pos".to_vec());
    /// s.add_fresh("buffer", || Ok(vec![1u8, 2]));
    /// let (parts, metadata) = Snapshot::serialize_for_test(s)?;
    /// assert_eq!(&parts["buffer"][..], &[1, 2]);
    /// assert_eq!(metadata, b"pos");
    /// # Ok::<(), lazarus_sdk::BoxError>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn serialize_for_test(
        snapshot: Snapshot,
    ) -> Result<(BTreeMap<String, bytes::Bytes>, Vec<u8>), BoxError> {
        let mut parts = BTreeMap::new();
        for (name, content) in snapshot.parts {
            if let PartContent::Fresh { serialize, .. } = content {
                parts.insert(name, serialize()?);
            }
        }
        Ok((parts, snapshot.metadata))
    }
}

/// A restored part's bytes: mapped from a chunk file, or given (tests).
enum PartBytes {
    Mapped(MappedChunk),
    Owned(bytes::Bytes),
}

impl PartBytes {
    fn bytes(&self) -> &[u8] {
        match self {
            PartBytes::Mapped(m) => m.bytes(),
            PartBytes::Owned(b) => b,
        }
    }
}

/// A worker's restored state: named parts mapped from the local cache (or
/// held decoded in memory, see [`Restored::decoded`]), and the metadata.
#[derive(Default)]
pub struct Restored {
    checkpoint: Option<CheckpointId>,
    parts: BTreeMap<String, PartBytes>,
    held: BTreeMap<String, Decoded>,
    chunks: BTreeMap<String, ChunkRef>,
    decoded: Option<DecodedParts>,
    metadata: Vec<u8>,
}

impl std::fmt::Debug for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restored")
            .field("checkpoint", &self.checkpoint)
            .field("parts", &self.parts.keys().collect::<Vec<_>>())
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .field("metadata_len", &self.metadata.len())
            .finish()
    }
}

impl Restored {
    pub(crate) fn new(
        checkpoint: CheckpointId,
        parts: BTreeMap<String, MappedChunk>,
        metadata: Vec<u8>,
    ) -> Restored {
        let parts = parts.into_iter().map(|(n, c)| (n, PartBytes::Mapped(c)));
        Restored::of(checkpoint, parts.collect(), metadata)
    }

    fn of(
        checkpoint: CheckpointId,
        parts: BTreeMap<String, PartBytes>,
        metadata: Vec<u8>,
    ) -> Restored {
        Restored {
            checkpoint: Some(checkpoint),
            parts,
            metadata,
            ..Restored::default()
        }
    }

    /// Restored state made of given parts: for testing an operator's
    /// `restore` against what its `snapshot` wrote.
    ///
    /// ```
    /// use lazarus_sdk::*;
    /// let ctx = Context::for_test("counter", 0, 1);
    /// let mut counts: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
    /// *counts.entry("word".to_string()).or_insert(0) += 3;
    /// let (parts, metadata) = Snapshot::serialize_for_test(counts.snapshot())?;
    /// let restored = Restored::from_parts(CheckpointId(1), parts, metadata);
    /// let mut again: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
    /// again.restore(&restored)?;
    /// assert_eq!(again.get(&"word".to_string()), Some(&3));
    /// # Ok::<(), BoxError>(())
    /// ```
    pub fn from_parts(
        checkpoint: CheckpointId,
        parts: BTreeMap<String, bytes::Bytes>,
        metadata: Vec<u8>,
    ) -> Restored {
        let parts = parts.into_iter().map(|(n, b)| (n, PartBytes::Owned(b)));
        Restored::of(checkpoint, parts.collect(), metadata)
    }

    /// The same, with the parts held decoded (`held`, not mapped), the
    /// chunk of every part, and where a decoded part is kept for later.
    pub(crate) fn with_decoded(
        mut self,
        held: BTreeMap<String, Decoded>,
        chunks: BTreeMap<String, ChunkRef>,
        decoded: DecodedParts,
    ) -> Restored {
        self.held = held;
        self.chunks = chunks;
        self.decoded = Some(decoded);
        self
    }

    /// The checkpoint restored.
    pub fn checkpoint(&self) -> Option<CheckpointId> {
        self.checkpoint
    }

    /// The metadata stored with the snapshot.
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }

    /// A part's bytes (CRC-checked, memory-mapped), if the snapshot had it
    /// and it is not held decoded (parts held decoded are not mapped: see
    /// [`Restored::decoded`]).
    pub fn part(&self, name: &str) -> Option<&[u8]> {
        self.parts.get(name).map(PartBytes::bytes)
    }

    /// The decoded value this process holds for part `name`, when it equals
    /// the restored chunk: what a state passed to
    /// [`Snapshot::add_fresh_decoded`] or [`Restored::keep_decoded`] and
    /// its `revive` still gave back. The part's bytes are then not mapped.
    ///
    /// ```
    /// use lazarus_sdk::Restored;
    /// let r = Restored::default();
    /// assert!(r.decoded("counts-kg7").is_none() && r.part("counts-kg7").is_none());
    /// ```
    pub fn decoded(&self, name: &str) -> Option<&Decoded> {
        self.held.get(name)
    }

    /// After decoding part `name` from its bytes: the runtime keeps
    /// `revive` beside the part's chunk, so that restoring the same chunk
    /// again in this process (a hot standby following the next checkpoint,
    /// a rollback in place) gets the decoded part from it.
    ///
    /// ```
    /// use lazarus_sdk::Restored;
    /// let r = Restored::default();
    /// r.keep_decoded("counts-kg7", || None); // no chunk restored: ignored
    /// ```
    pub fn keep_decoded(
        &self,
        name: &str,
        revive: impl Fn() -> Option<Decoded> + Send + Sync + 'static,
    ) {
        if let (Some(decoded), Some(chunk)) = (&self.decoded, self.chunks.get(name)) {
            decoded.keep(chunk, Arc::new(revive));
        }
    }

    /// Done with part `name`'s bytes (decoded them): their pages leave this
    /// process's resident memory, so a restore holds the decoded state, not
    /// the state twice. [`Restored::part`] still gives the same bytes
    /// afterwards (read again from the file).
    ///
    /// ```
    /// use lazarus_sdk::Restored;
    /// Restored::default().release("counts-kg7"); // no such part: nothing to do
    /// ```
    pub fn release(&self, name: &str) {
        if let Some(PartBytes::Mapped(m)) = self.parts.get(name) {
            m.release();
        }
    }

    /// Takes out the records the checkpoint holds in flight to this
    /// worker (its reserved part, which an operator never sees), not yet
    /// decoded.
    pub(crate) fn take_in_flight(&mut self) -> crate::in_flight::InFlight {
        match self.parts.remove(crate::in_flight::PART) {
            Some(part) => crate::in_flight::InFlight::Part {
                checkpoint: self.checkpoint.map_or(0, |c| c.0),
                bytes: bytes::Bytes::copy_from_slice(part.bytes()),
            },
            None => crate::in_flight::InFlight::default(),
        }
    }

    /// Names of the parts (mapped or held decoded).
    pub fn part_names(&self) -> impl Iterator<Item = &str> {
        let mut names: Vec<&str> = self
            .parts
            .keys()
            .chain(self.held.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names.into_iter()
    }
}

/// Serializes with rkyv (what [`KeyedState`] stores).
pub fn to_rkyv<T>(value: &T) -> Result<Vec<u8>, BoxError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    Ok(rkyv::to_bytes::<rancor::Error>(value)?.to_vec())
}

/// At most this many shards per key group: a write after a snapshot
/// archives (or, where a restore still holds it, copies) one shard, so the
/// processing thread never stalls for long however large a group grows.
/// At 64, a shard of 1 GiB of keyed state in 128 groups was about 140
/// KiB: its archive buffer was above glibc's mmap threshold (fixed at 128
/// KiB, see `tuning`), so every archive-on-write mapped fresh pages and
/// faulted them in on the processing thread (37 faults, 186 µs of CPU at
/// the median, 458 µs at p99, against 5 µs into a warm buffer). At 256 a
/// shard is about 35 KiB and its buffer comes from the heap, reused: 30 /
/// 182 µs, no faults at the median. A snapshot freezes a group whole (see
/// [`Frozen`]), and the group's first write after it pays the clones.
const MAX_SHARDS: usize = 256;

/// A group grows one shard at a time (linear hashing, see [`shard_of`])
/// while a write finds its shard holding entries of about this many
/// archived bytes. A group starts with one shard: at 256 always, a
/// 20,000-word count spent 14 % more CPU with 1 s checkpoints than
/// without, its maps spread over 16,384 allocations of one or two words
/// each, all archived or copied one by one after every checkpoint, and it
/// ran 5 % slower even with checkpoints off. Growing the whole group at
/// once (doubling, every entry moved) was as fast, but one write paid for
/// the group: 0.9-2.9 ms pauses at the median for a fast-growing 10 MiB
/// state; a split moves about half of one shard's entries. At 32 KiB the
/// 1 GiB state bench's groups stopped short of [`MAX_SHARDS`] with shards
/// up to twice that (checkpoint latency p50 0.64-1.0 s against 0.19-0.5
/// s); at 4 KiB the long-tail wordcount paid 10 % CPU for its 1 s
/// checkpoints; at 16 KiB wordcount's overhead was -3 to 6 % (3-18 % at
/// 256 shards) and the state bench about as at 256 (10 MiB pause p50
/// 48-85 µs against 37-50; see docs/performance.md).
const SHARD_BYTES: usize = 16 << 10;

/// A group's first shard this long has one entry archived to learn the
/// bytes per entry, until an archive of the whole group tells better.
const SAMPLE_AT: usize = 16;

/// The largest power of two not above `n` (1 for 0): with `n` shards,
/// shard `n - low_of(n)` is the next to split (see [`shard_of`]).
fn low_of(n: usize) -> usize {
    1 << n.max(1).ilog2()
}

/// The shard of shard hash `h` in a group of `n` shards (`n` ≥ 1): linear
/// hashing. With `low` the largest power of two not above `n`, shards
/// below `n - low` were split already and address by one bit more, so
/// growing from `n` to `n + 1` shards moves keys only out of shard
/// `n - low`, into the new shard `n`. At a power of two this is `h % n`
/// (the layout of parts written with 256 shards always).
fn shard_of(h: usize, n: usize) -> usize {
    let low = low_of(n);
    let i = h & (low - 1);
    if i < n - low {
        h & (2 * low - 1)
    } else {
        i
    }
}

/// The longest stall of a write on a frozen shard (archive-on-write or
/// copy-on-write) since it was last taken (nanoseconds).
static COW_STALL_NS: AtomicU64 = AtomicU64::new(0);

/// The longest stall of a write on a frozen shard of any keyed state in
/// this process since the last call: the processing time a snapshot costs
/// after it returns.
pub(crate) fn take_cow_stall() -> Duration {
    Duration::from_nanos(COW_STALL_NS.swap(0, Ordering::Relaxed))
}

/// A shard's map: foldhash rather than SipHash (std's default).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

type Shard<K, V> = Arc<Map<K, V>>;

/// A key group's shards, shared with a pending snapshot until the group's
/// next write.
type Shards<K, V> = Arc<Vec<Shard<K, V>>>;

/// Shard `i` of `group` for writing. A snapshot whose serialization has
/// not reached the shard yet gets its archive first, written by this call
/// (archive-on-write: the entries' bytes, no copy of the keys and values
/// as objects); the shard is then changed in place. It is copied only if
/// something else still holds it (a restore's reference).
fn writable<K, V>(group: &mut Group<K, V>, i: usize) -> &mut Map<K, V>
where
    K: Clone + Eq + Hash + rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
    V: Clone + rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
{
    if group.owns(i) {
        let shards = Arc::get_mut(&mut group.shards).expect("no other pointer: checked above");
        return Arc::make_mut(&mut shards[i]);
    }
    let started = crate::clock::Stopwatch::start();
    let usage = tracing::enabled!(tracing::Level::DEBUG).then(crate::clock::ThreadUsage::now);
    group.unshare();
    group.archive_for_pending(i);
    let shards = Arc::get_mut(&mut group.shards).expect("unshared above");
    let copied = Arc::strong_count(&shards[i]) > 1;
    let map = Arc::make_mut(&mut shards[i]);
    let stall = started.elapsed();
    COW_STALL_NS.fetch_max(stall.as_nanos() as u64, Ordering::Relaxed);
    if let Some(before) = usage.filter(|_| stall >= LONG_STALL) {
        log_long_stall(
            stall,
            copied,
            crate::clock::ThreadUsage::now().since(&before),
        );
    }
    map
}

/// A write's stall on a frozen shard this long or longer is logged (at
/// debug level) with where its time went.
const LONG_STALL: Duration = Duration::from_micros(250);

/// Logs a long stall of a write on a frozen shard with what the thread
/// used meanwhile (the usage is read only while debug logging is on):
/// time off the CPU with no context switch is time the machine did not
/// run the thread at all.
/// Measured at 1 GiB on the project's 2-vCPU machine (three runs, 24
/// stalls of 0.5 ms or more): 10 were 0.5-1.9 ms of wall time with 20-60
/// µs of CPU and no context switch at all (the virtual CPU was not
/// running: the host's scheduling, which nothing in the process can
/// shorten); 14 had one involuntary switch (another thread on the core
/// until the next tick); a few used their time on CPU, faulting in 10
/// fresh pages of an archive buffer at up to 80 µs each.
fn log_long_stall(stall: Duration, copied: bool, used: crate::clock::ThreadUsage) {
    let on_cpu = used.cpu.min(stall);
    tracing::debug!(
        stall_us = stall.as_micros() as u64,
        on_cpu_us = on_cpu.as_micros() as u64,
        off_cpu_us = (stall - on_cpu).as_micros() as u64,
        page_faults = used.page_faults,
        voluntary_switches = used.voluntary_switches,
        involuntary_switches = used.involuntary_switches,
        copied,
        "long write stall on a frozen shard"
    );
}

/// One shard of a snapshot's key group, between the snapshot and its
/// serialization.
enum Slot<K, V> {
    /// Frozen and not archived yet: the shard as it was at the snapshot.
    Held(Shard<K, V>),
    /// Archived by a writer before it changed the shard (shared by every
    /// pending snapshot that held the same shard).
    Archived(Arc<Result<AlignedVec<16>, String>>),
    /// Taken by the serialization.
    Taken,
}

/// The shards of one key group in one snapshot.
type Slots<K, V> = Vec<std::sync::Mutex<Slot<K, V>>>;

/// A dirty key group as a snapshot froze it: the group's vector of shards
/// (one `Arc` clone at the snapshot, whatever the shard count), turned
/// into one slot per shard by whichever comes first: the group's first
/// write after the snapshot (which moves the shards into the slots) or
/// the serialization (which clones them).
struct Frozen<K, V> {
    /// The vector, until the slots are made (under this lock).
    shards: std::sync::Mutex<Option<Shards<K, V>>>,
    slots: OnceLock<Slots<K, V>>,
}

impl<K, V> Frozen<K, V> {
    fn new(shards: Shards<K, V>) -> Frozen<K, V> {
        Frozen {
            shards: std::sync::Mutex::new(Some(shards)),
            slots: OnceLock::new(),
        }
    }

    /// The slots, made now from the frozen vector if the group's writes
    /// have not made them (the serialization's way in).
    fn slots(&self) -> &Slots<K, V> {
        if let Some(slots) = self.slots.get() {
            return slots;
        }
        let mut held = lock(&self.shards);
        if let Some(shards) = held.take() {
            let _ = self.slots.set(held_slots(shards));
        }
        drop(held);
        self.slots
            .get()
            .expect("made by whoever took the frozen vector")
    }
}

/// One slot per shard of `shards`: the shards moved in when nothing else
/// holds the vector, cloned otherwise.
fn held_slots<K, V>(shards: Shards<K, V>) -> Slots<K, V> {
    match Arc::try_unwrap(shards) {
        Ok(shards) => shards
            .into_iter()
            .map(|s| std::sync::Mutex::new(Slot::Held(s)))
            .collect(),
        Err(shared) => shared
            .iter()
            .map(|s| std::sync::Mutex::new(Slot::Held(s.clone())))
            .collect(),
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `m` locked if no one holds it now (a write never waits for the
/// serialization).
fn try_lock<T>(m: &std::sync::Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// A key group's part: `PART_MAGIC`, the shard count (u32 LE) and 4
/// reserved bytes, then per shard its archive's start and end (u64 LE
/// each, offsets in the part), then the shards' archives, each aligned to
/// 16 bytes: the archive of a `Vec<(K, V)>`, so every shard validates and
/// decodes on its own. Parts written before this layout are one such
/// archive for the whole group, and still decode.
const PART_MAGIC: [u8; 8] = *b"LZKGSH\x00\x01";

fn part_header_len(shards: usize) -> usize {
    16 + 16 * shards
}

/// The shard archives of a part in the sharded layout; `None` for a part
/// in the earlier one-archive layout.
fn part_shards(bytes: &[u8]) -> Result<Option<Vec<&[u8]>>, String> {
    if bytes.len() < 16 || bytes[..8] != PART_MAGIC {
        return Ok(None);
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    if count == 0 || count > 1 << 16 || bytes.len() < part_header_len(count) {
        return Err(format!(
            "sharded part header names {count} shards in {} bytes",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let (start, end) = (word(16 + 16 * i), word(24 + 16 * i));
        let fits = start as usize >= part_header_len(count)
            && start % 16 == 0
            && start <= end
            && end <= bytes.len() as u64;
        if !fits {
            return Err(format!(
                "shard {i} of a sharded part spans {start}..{end} of {} bytes",
                bytes.len()
            ));
        }
        out.push(&bytes[start as usize..end as usize]);
    }
    Ok(Some(out))
}

/// One shard's entries archived on their own, appended to `buffer` (the
/// archive starts at its current length, which must be 16-aligned).
fn archive_shard<K, V>(
    shard: &Shard<K, V>,
    buffer: AlignedVec<16>,
) -> Result<AlignedVec<16>, rancor::Error>
where
    K: rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
    V: rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
{
    let entries = Entries {
        shards: std::slice::from_ref(shard),
        len: shard.len(),
    };
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(&entries, buffer)
}

/// A revive function for a group's vector of shards: a weak pointer, so
/// it keeps nothing alive; it gives the vector back while the group or a
/// snapshot still holds it as it was (a write first moves or copies a
/// vector a weak pointer reaches, and never changes one of its shards in
/// place while another vector holds that shard).
fn revive_of<K, V>(shards: &Shards<K, V>) -> impl Fn() -> Option<Decoded> + Send + Sync + 'static
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    let weak = Arc::downgrade(shards);
    move || weak.upgrade().map(|s| s as Decoded)
}

/// The archived layout of a key group: `ArchivedVec<ArchivedTuple2<K, V>>`,
/// the archive of a `Vec<(K, V)>`, written straight from the frozen shards
/// (no intermediate list of cloned entries).
type ArchivedGroup<K, V> =
    rkyv::vec::ArchivedVec<rkyv::tuple::ArchivedTuple2<rkyv::Archived<K>, rkyv::Archived<V>>>;

/// One entry by reference, archived as the tuple `(K, V)` is.
struct PairRef<'a, K, V>(&'a K, &'a V);

impl<K: rkyv::Archive, V: rkyv::Archive> rkyv::Archive for PairRef<'_, K, V> {
    type Archived = rkyv::tuple::ArchivedTuple2<K::Archived, V::Archived>;
    type Resolver = (K::Resolver, V::Resolver);

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::munge::munge!(let rkyv::tuple::ArchivedTuple2(k, v) = out);
        self.0.resolve(resolver.0, k);
        self.1.resolve(resolver.1, v);
    }
}

impl<K, V, S> rkyv::Serialize<S> for PairRef<'_, K, V>
where
    K: rkyv::Serialize<S>,
    V: rkyv::Serialize<S>,
    S: rancor::Fallible + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        Ok((self.0.serialize(serializer)?, self.1.serialize(serializer)?))
    }
}

/// Every entry of the frozen shards, as one list.
struct Entries<'a, K, V> {
    shards: &'a [Shard<K, V>],
    len: usize,
}

struct EntriesIter<'a, K, V> {
    shards: std::slice::Iter<'a, Shard<K, V>>,
    current: Option<std::collections::hash_map::Iter<'a, K, V>>,
    left: usize,
}

// Not derived: the derive would ask `K: Clone` and `V: Clone` of references.
impl<K, V> Clone for EntriesIter<'_, K, V> {
    fn clone(&self) -> Self {
        EntriesIter {
            shards: self.shards.clone(),
            current: self.current.clone(),
            left: self.left,
        }
    }
}

impl<'a, K, V> Iterator for EntriesIter<'a, K, V> {
    type Item = PairRef<'a, K, V>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((k, v)) = self.current.as_mut().and_then(Iterator::next) {
                self.left -= 1;
                return Some(PairRef(k, v));
            }
            self.current = Some(self.shards.next()?.iter());
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<K, V> ExactSizeIterator for EntriesIter<'_, K, V> {}

impl<K: rkyv::Archive, V: rkyv::Archive> rkyv::Archive for Entries<'_, K, V> {
    type Archived = ArchivedGroup<K, V>;
    type Resolver = rkyv::vec::VecResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_len(self.len, resolver, out);
    }
}

impl<K, V, S> rkyv::Serialize<S> for Entries<'_, K, V>
where
    K: rkyv::Serialize<S>,
    V: rkyv::Serialize<S>,
    S: rancor::Fallible + rkyv::ser::Allocator + rkyv::ser::Writer + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        let iter = EntriesIter {
            shards: self.shards.iter(),
            current: None,
            left: self.len,
        };
        rkyv::vec::ArchivedVec::serialize_from_iter::<PairRef<'_, K, V>, _, _>(iter, serializer)
    }
}

type HighSerializer<'a> = rkyv::api::high::HighSerializer<
    rkyv::util::AlignedVec,
    rkyv::ser::allocator::ArenaHandle<'a>,
    rancor::Error,
>;
type Decoder = rkyv::rancor::Strategy<rkyv::de::Pool, rancor::Error>;

/// Keyed state: a map from key to `V`, partitioned into the job's key
/// groups; an instance holds only the groups it owns. Snapshots freeze
/// shards, and a write archives a frozen shard for its snapshot before it
/// changes it (archive-on-write); they are incremental (groups untouched
/// since the previous checkpoint are not written again); a restore of a
/// checkpoint whose groups this process still holds decoded (a rollback
/// in place, a hot standby's promotion) neither reads nor decodes them.
///
/// ```
/// use lazarus_sdk::{Context, KeyedState};
/// let ctx = Context::for_test("counter", 0, 1);
/// let mut counts: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
/// *counts.entry("word".to_string()).or_insert(0) += 1;
/// assert_eq!(counts.get(&"word".to_string()), Some(&1));
/// let snapshot = counts.snapshot();           // freezes; serializes later
/// assert_eq!(snapshot.parts().len(), 128);    // one part per owned key group
/// ```
pub struct KeyedState<K, V> {
    name: String,
    key_groups: u32,
    groups: BTreeMap<u32, Group<K, V>>,
}

struct Group<K, V> {
    shards: Shards<K, V>,
    dirty: bool,
    /// Bytes of the group's last archive: the next one's buffer size.
    archived_len: Arc<AtomicUsize>,
    /// Snapshots of this group not serialized yet.
    pending: Vec<Weak<Frozen<K, V>>>,
    /// A write that finds its shard this long splits one (see
    /// [`Group::split`]).
    split_at: usize,
    /// Whether `split_at` was set from an entry's or the group's archive.
    sized: bool,
    /// Archived bytes per entry in the group's last archive (0: none yet).
    entry_bytes: Arc<AtomicUsize>,
}

impl<K, V> Group<K, V> {
    fn empty() -> Group<K, V> {
        Group {
            shards: Arc::new(vec![Arc::new(Map::default())]),
            dirty: true,
            archived_len: Arc::default(),
            pending: Vec::new(),
            split_at: SAMPLE_AT,
            sized: false,
            entry_bytes: Arc::default(),
        }
    }

    /// At a snapshot (once per dirty group; nothing but the group is
    /// read): the last archive's bytes per entry set the shard length
    /// that splits.
    fn size_shards(&mut self) {
        let e = self.entry_bytes.load(Ordering::Relaxed);
        if e > 0 {
            self.split_at = split_at(e);
            self.sized = true;
        }
    }

    /// True when nothing but the group holds its vector and shard `i`
    /// (the usual case between checkpoints): a write changes it in place.
    fn owns(&self, i: usize) -> bool {
        Arc::strong_count(&self.shards) == 1
            && Arc::weak_count(&self.shards) == 0
            && Arc::strong_count(&self.shards[i]) == 1
    }

    /// Makes the vector of shards the group's alone. A pending snapshot
    /// that shares it gets it as its slots, the shards moved in (the group
    /// clones one `Arc` per shard for its new vector: the work a snapshot
    /// no longer does up front). A vector only weak pointers (revives)
    /// reach is moved, so they no longer reach it.
    fn unshare(&mut self) {
        if Arc::strong_count(&self.shards) == 1 {
            Arc::make_mut(&mut self.shards);
            return;
        }
        let own: Vec<Shard<K, V>> = self.shards.iter().cloned().collect();
        // At most one pending snapshot holds the vector: a group is
        // snapshotted again only after a write, and every write unshares.
        let mut frozen = Some(std::mem::replace(&mut self.shards, Arc::new(own)));
        self.pending.retain(|p| p.strong_count() > 0);
        for pending in self.pending.iter().filter_map(Weak::upgrade) {
            let Some(old) = frozen.as_ref() else {
                break;
            };
            // A serialization making the slots now clones the shards itself.
            let Some(mut held) = try_lock(&pending.shards) else {
                continue;
            };
            if held.as_ref().is_some_and(|s| Arc::ptr_eq(s, old)) {
                let shards = held.take().expect("checked above");
                drop(frozen.take());
                let _ = pending.slots.set(held_slots(shards));
            }
        }
    }

    /// Archives shard `i` for every pending snapshot that still holds it
    /// frozen, and lets go of it there, so a write can change it in place.
    /// A serialization busy with the shard is not waited for: it archives
    /// from its own reference, and the write copies the shard instead
    /// (waiting measured up to 5 ms at 1 GiB: the serialization holds the
    /// slot while it archives, and grows its part buffer there).
    fn archive_for_pending(&mut self, i: usize)
    where
        K: rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
        V: rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
    {
        self.pending.retain(|p| p.strong_count() > 0);
        // A shard's share of the group's last part, and some room.
        let hint = self.archived_len.load(Ordering::Relaxed) / self.shards.len().max(1);
        let hint = hint + hint / 4 + 64;
        let mut archived = None;
        for pending in &self.pending {
            let Some(frozen) = pending.upgrade() else {
                continue;
            };
            let Some(slots) = frozen.slots.get() else {
                // The serialization is making them: it holds the shard,
                // and the write copies it.
                continue;
            };
            // A shard split off after the snapshot is not in it.
            let Some(mut slot) = slots.get(i).and_then(try_lock) else {
                continue;
            };
            if matches!(&*slot, Slot::Held(frozen) if Arc::ptr_eq(frozen, &self.shards[i])) {
                let bytes = archived.get_or_insert_with(|| {
                    let buffer = AlignedVec::with_capacity(hint);
                    Arc::new(archive_shard(&self.shards[i], buffer).map_err(|e| e.to_string()))
                });
                *slot = Slot::Archived(bytes.clone());
            }
        }
    }
}

/// The shard length that splits for entries of `entry_bytes` archived.
fn split_at(entry_bytes: usize) -> usize {
    (SHARD_BYTES / entry_bytes.max(1)).max(SAMPLE_AT)
}

impl<K, V> Group<K, V>
where
    K: Clone + Eq + Hash + rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
    V: Clone + rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
{
    /// A write found shard `i` `split_at` long: the group grows by one
    /// shard (at most [`MAX_SHARDS`]). The first time, one of its entries
    /// is archived to learn the bytes per entry, and `split_at` set from
    /// it instead (no split if the shard is below that). Returns whether
    /// it split.
    fn grow(&mut self, i: usize, hash: impl Fn(&K) -> usize) -> bool {
        if self.shards.len() >= MAX_SHARDS {
            return false;
        }
        if !self.sized {
            self.sized = true;
            let sample = self.shards[i]
                .iter()
                .next()
                .map(|(k, v)| (k.clone(), v.clone()));
            if let Some(Ok(bytes)) = sample.map(|e| rkyv::to_bytes::<rancor::Error>(&e)) {
                self.split_at = split_at(bytes.len());
                if self.shards[i].len() < self.split_at {
                    return false;
                }
            }
        }
        self.split(hash);
        true
    }

    /// Linear hashing's split: with `n` shards, shard `n - low` (see
    /// [`shard_of`]) gives the keys that address the new shard `n` once
    /// there are `n + 1`. One shard's entries are looked at and about half
    /// of them moved (a pending snapshot gets that shard archived first,
    /// as for any write); the others stay where they are. Counted as a
    /// write stall.
    fn split(&mut self, hash: impl Fn(&K) -> usize) {
        let n = self.shards.len();
        let from = n - low_of(n);
        let started = crate::clock::Stopwatch::start();
        let src = writable(self, from);
        let moving: Vec<K> = src
            .keys()
            .filter(|k| shard_of(hash(k), n + 1) != from)
            .cloned()
            .collect();
        let mut new =
            Map::with_capacity_and_hasher(moving.len().max(src.len() / 2), Default::default());
        for k in moving {
            if let Some((k, v)) = src.remove_entry(&k) {
                new.insert(k, v);
            }
        }
        Arc::get_mut(&mut self.shards)
            .expect("made the group's own by `writable`")
            .push(Arc::new(new));
        COW_STALL_NS.fetch_max(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Keys of keyed state: their bytes decide the key group.
pub trait StateKey: Eq + Hash + Clone + Send + Sync + 'static {
    /// The bytes hashed for the key group (must match the record key).
    fn key_bytes(&self) -> &[u8];
}

impl StateKey for String {
    fn key_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl StateKey for Vec<u8> {
    fn key_bytes(&self) -> &[u8] {
        self
    }
}

impl<K, V> KeyedState<K, V>
where
    K: StateKey + rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
    K::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<K, Decoder>,
    V: Clone + Send + Sync + 'static + rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
    V::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<V, Decoder>,
{
    /// Empty state named `name` (part names derive from it), holding the key
    /// groups this instance owns.
    pub fn new(name: &str, ctx: &Context) -> KeyedState<K, V> {
        let groups = (0..ctx.key_groups)
            .filter(|g| group_owner(*g, ctx.key_groups, ctx.parallelism) == ctx.index)
            .map(|g| (g, Group::empty()))
            .collect();
        KeyedState {
            name: name.to_string(),
            key_groups: ctx.key_groups,
            groups,
        }
    }

    fn part_name(&self, group: u32) -> String {
        format!("{}-kg{group}", self.name)
    }

    /// The owned key groups with their part names (collected, so the caller
    /// may mutate the groups while walking them).
    fn owned_parts(&self) -> Vec<(u32, String)> {
        self.groups
            .keys()
            .map(|g| (*g, self.part_name(*g)))
            .collect()
    }

    /// The key group of `key` and the hash that picks its shard (see
    /// [`shard_of`]); one CRC: the group is the same as [`key_group`]'s.
    fn place(key_groups: u32, key: &K) -> (u32, usize) {
        let hash = crc32fast::hash(key.key_bytes());
        let groups = key_groups.max(1);
        (hash % groups, (hash / groups) as usize)
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        let (group, h) = Self::place(self.key_groups, key);
        self.groups
            .get(&group)
            .and_then(|g| g.shards[shard_of(h, g.shards.len())].get(key))
    }

    /// Mutable access to `key`'s slot; a snapshot still holding the key's
    /// shard gets it archived first (archive-on-write).
    ///
    /// # Panics
    /// If this instance does not own the key's group: routing (hash edges)
    /// guarantees it does; a key arriving here otherwise is a bug in the job.
    pub fn entry(&mut self, key: K) -> std::collections::hash_map::Entry<'_, K, V> {
        self.entry_slot(&key).entry(key)
    }

    /// The writable shard of `key`, its group marked dirty.
    fn entry_slot(&mut self, key: &K) -> &mut Map<K, V> {
        let (group, h) = Self::place(self.key_groups, key);
        let key_groups = self.key_groups;
        let g = self.groups.get_mut(&group).unwrap_or_else(|| {
            panic!("key group {group} is not owned by this instance: is the input edge `hash`?")
        });
        g.dirty = true;
        let mut shard = shard_of(h, g.shards.len());
        // A long shard grows the group by one (a write may add a key).
        if g.shards[shard].len() >= g.split_at && g.grow(shard, |k| Self::place(key_groups, k).1) {
            shard = shard_of(h, g.shards.len());
        }
        writable(g, shard)
    }

    /// Mutable access to the value of a key already held; a snapshot still
    /// holding the key's shard gets it archived first (archive-on-write). A
    /// miss archives and copies nothing. Unlike [`KeyedState::entry`] it needs no owned key,
    /// so a hot path that mostly updates existing keys allocates nothing:
    ///
    /// ```
    /// use lazarus_sdk::{Context, KeyedState};
    /// let ctx = Context::for_test("counter", 0, 1);
    /// let mut counts: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
    /// let word = "word".to_string();
    /// for _ in 0..3 {
    ///     match counts.get_mut(&word) {
    ///         Some(count) => *count += 1,
    ///         None => {
    ///             counts.insert(word.clone(), 1);
    ///         }
    ///     }
    /// }
    /// assert_eq!(counts.get(&word), Some(&3));
    /// ```
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.on_held(key, |map| map.get_mut(key))
    }

    /// Sets `key` to `value`, returning the value it replaced; a snapshot
    /// still holding the key's shard gets it archived first.
    ///
    /// ```
    /// use lazarus_sdk::{Context, KeyedState};
    /// let ctx = Context::for_test("latest", 0, 1);
    /// let mut latest: KeyedState<String, u64> = KeyedState::new("latest", &ctx);
    /// assert_eq!(latest.insert("sensor-7".to_string(), 20), None);
    /// assert_eq!(latest.insert("sensor-7".to_string(), 21), Some(20));
    /// ```
    ///
    /// # Panics
    /// As [`KeyedState::entry`], if this instance does not own the key's group.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.entry_slot(&key).insert(key, value)
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.on_held(key, |map| map.remove(key))
    }

    /// `op` on the shard of a key this instance holds, its group marked
    /// dirty when `op` finds the key; a miss copies and dirties nothing. A
    /// shard no snapshot or restore shares (the usual case between
    /// checkpoints) is looked up once; a shared one is checked first, so a
    /// miss neither archives nor copies it.
    fn on_held<'a, R>(
        &'a mut self,
        key: &K,
        op: impl FnOnce(&'a mut Map<K, V>) -> Option<R>,
    ) -> Option<R> {
        let (group, h) = Self::place(self.key_groups, key);
        let g = self.groups.get_mut(&group)?;
        let shard = shard_of(h, g.shards.len());
        if g.owns(shard) {
            let Group { shards, dirty, .. } = g;
            let shards = Arc::get_mut(shards).expect("no other pointer: checked above");
            let map = Arc::get_mut(&mut shards[shard]).expect("no other pointer: checked above");
            let found = op(map)?;
            *dirty = true;
            return Some(found);
        }
        if !g.shards[shard].contains_key(key) {
            return None;
        }
        g.dirty = true;
        op(writable(g, shard))
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.groups
            .values()
            .flat_map(|g| g.shards.iter())
            .map(|s| s.len())
            .sum()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Freezes the state: O(key groups), independent of state size and
    /// of the shard count. Dirty groups are serialized later by the
    /// runtime, straight from the frozen shards; clean ones are referenced.
    pub fn snapshot(&mut self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (group, name) in self.owned_parts() {
            let g = self.groups.get_mut(&group).expect("listed above");
            if g.dirty {
                g.dirty = false;
                g.size_shards();
                let frozen = Arc::new(Frozen::new(g.shards.clone()));
                g.pending.retain(|p| p.strong_count() > 0);
                g.pending.push(Arc::downgrade(&frozen));
                let revive = revive_of(&g.shards);
                let archived_len = g.archived_len.clone();
                let entry_bytes = g.entry_bytes.clone();
                snapshot.add_fresh_decoded(
                    name,
                    move || {
                        let slots = frozen.slots();
                        let (bytes, per_entry) =
                            archive(slots, archived_len.load(Ordering::Relaxed))?;
                        archived_len.store(bytes.len(), Ordering::Relaxed);
                        if let Some(e) = per_entry {
                            entry_bytes.store(e, Ordering::Relaxed);
                        }
                        Ok(bytes)
                    },
                    revive,
                );
            } else {
                snapshot.add_unchanged(name);
            }
        }
        snapshot
    }

    /// Restores the owned groups from `state`: a group held decoded in this
    /// process is taken as it is; others are decoded from their validated
    /// rkyv archives (and then held decoded for the next restore).
    pub fn restore(&mut self, state: &Restored) -> Result<(), BoxError> {
        for (group, name) in self.owned_parts() {
            let shards = match state.decoded(&name) {
                Some(held) => held
                    .clone()
                    .downcast::<Vec<Shard<K, V>>>()
                    .map_err(|_| {
                        format!("state part {name:?} is held decoded as another type (two states named {:?}?)", self.name)
                    })?,
                None => {
                    let Some(bytes) = state.part(&name) else {
                        return Err(format!(
                            "restored state has no part {name:?} for key group {group}"
                        )
                        .into());
                    };
                    let shards = Arc::new(self.decode(group, &name, bytes)?);
                    state.release(&name);
                    state.keep_decoded(&name, revive_of(&shards));
                    shards
                }
            };
            let g = self.groups.get_mut(&group).expect("listed above");
            g.shards = shards;
            // Restored groups equal the stored chunks: reference them next time.
            g.dirty = false;
        }
        Ok(())
    }

    /// One key group's shards from its archive, every key checked to
    /// belong to the group.
    fn decode(&self, group: u32, name: &str, bytes: &[u8]) -> Result<Vec<Shard<K, V>>, BoxError> {
        let (archives, sharded) = match part_shards(bytes)
            .map_err(|e| format!("state part {name:?} does not decode: {e}"))?
        {
            Some(archives) => (archives, true),
            None => (vec![bytes], false),
        };
        // A part of up to MAX_SHARDS shard archives fills one shard from
        // each, addressed as the group that wrote it did (see
        // [`shard_of`]); one of the earlier single-archive layout is spread
        // over as many shards as its size needs.
        let count = archives.len();
        let homes = sharded && count <= MAX_SHARDS;
        let count = if homes {
            count
        } else {
            (bytes.len() / SHARD_BYTES).clamp(1, MAX_SHARDS)
        };
        let mut shards: Vec<Map<K, V>> = (0..count).map(|_| Map::default()).collect();
        for (i, archive) in archives.into_iter().enumerate() {
            self.decode_into(group, name, archive, &mut shards, homes.then_some(i))?;
        }
        Ok(shards.into_iter().map(Arc::new).collect())
    }

    /// The entries of one archive of `Vec<(K, V)>` into their shards,
    /// room made first in shard `home` (the one they fill) or, without
    /// one, spread over all.
    fn decode_into(
        &self,
        group: u32,
        name: &str,
        bytes: &[u8],
        shards: &mut [Map<K, V>],
        home: Option<usize>,
    ) -> Result<(), BoxError> {
        let archived = rkyv::access::<ArchivedGroup<K, V>, rancor::Error>(bytes)
            .map_err(|e| format!("state part {name:?} does not decode: {e}"))?;
        match home {
            Some(i) => shards[i].reserve(archived.len()),
            None => {
                let each = archived.len() / shards.len().max(1) + 1;
                shards.iter_mut().for_each(|s| s.reserve(each));
            }
        }
        for entry in archived.iter() {
            let key: K = rkyv::deserialize::<K, rancor::Error>(&entry.0)
                .map_err(|e| format!("state part {name:?}: a key does not decode: {e}"))?;
            let value: V = rkyv::deserialize::<V, rancor::Error>(&entry.1)
                .map_err(|e| format!("state part {name:?}: a value does not decode: {e}"))?;
            let (g, h) = Self::place(self.key_groups, &key);
            let shard = shard_of(h, shards.len());
            if g != group {
                return Err(format!(
                    "state part {name:?} of key group {group} holds a key of group {g}"
                )
                .into());
            }
            shards[shard].insert(key, value);
        }
        Ok(())
    }
}

/// A part whose last archive was this large (or that was never archived)
/// offers its core while it is serialized (see
/// [`crate::tuning::yield_after`]); a smaller one is serialized in one go,
/// about a millisecond of work. On a saturated machine each offer gave the
/// core away for other threads' whole slices: wordcount's long-tail parts
/// (560-580 KB, three or four offers each) took 20-45 ms to serialize for
/// under 1 ms of CPU. The same threshold as the worker's large parts (one
/// per core) and the store's paced writes.
const PACED_PART: usize = 1 << 20;

/// A frozen key group's part (see [`PART_MAGIC`]), written into one buffer
/// of about the last part's size: each shard still held is archived
/// straight from its entries, each one a writer archived already is
/// copied in. A part last archived at [`PACED_PART`] or more offers its
/// core every 200 µs of work.
/// Returns the part and the archived bytes per entry of the shards it
/// archived itself (`None` if every one was archived on write, or empty).
fn archive<K, V>(
    slots: &Slots<K, V>,
    size_hint: usize,
) -> Result<(bytes::Bytes, Option<usize>), BoxError>
where
    K: rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
    V: rkyv::Archive + for<'a> rkyv::Serialize<HighSerializer<'a>>,
{
    let header = part_header_len(slots.len());
    let mut buffer = buffers::POOL.take(size_hint + size_hint / 8);
    buffer.extend_from_slice(&PART_MAGIC);
    buffer.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    buffer.resize(header, 0);
    let mut spans = Vec::with_capacity(slots.len());
    let (mut entries, mut archived) = (0usize, 0usize);
    let mut ran = crate::clock::Stopwatch::start();
    let paced = size_hint == 0 || size_hint >= PACED_PART;
    for slot in slots {
        if paced {
            crate::tuning::yield_after(&mut ran);
        }
        buffer.resize(buffer.len().next_multiple_of(16), 0);
        let start = buffer.len();
        // The slot stays locked while its shard is archived: a writer
        // that finds it so copies the shard rather than wait.
        let mut slot = lock(slot);
        match std::mem::replace(&mut *slot, Slot::Taken) {
            Slot::Held(frozen) => {
                buffer = archive_shard(&frozen, buffer)?;
                entries += frozen.len();
                archived += buffer.len() - start;
                drop(frozen);
            }
            Slot::Archived(archived) => match archived.as_ref() {
                Ok(bytes) => buffer.extend_from_slice(bytes),
                Err(e) => return Err(format!("a shard archived on write failed: {e}").into()),
            },
            Slot::Taken => return Err("a key group shard was serialized twice".into()),
        }
        drop(slot);
        spans.push((start as u64, buffer.len() as u64));
    }
    for (i, (start, end)) in spans.into_iter().enumerate() {
        buffer[16 + 16 * i..24 + 16 * i].copy_from_slice(&start.to_le_bytes());
        buffer[24 + 16 * i..32 + 16 * i].copy_from_slice(&end.to_le_bytes());
    }
    let part = bytes::Bytes::from_owner(buffers::Pooled(buffer, &buffers::POOL));
    Ok((part, (entries > 0).then(|| archived / entries)))
}

/// Archive buffers kept for the next checkpoint. A fresh buffer of many
/// MiB is a fresh mapping: the kernel zeroes its pages on first touch and
/// unmaps them when it is freed, taking the process's memory-map lock that
/// the processing thread's page faults wait on. Reused buffers do neither.
/// At most 64 MiB are kept, so a process with few large key groups
/// returns them (memory) rather than keeping them (speed).
mod buffers {
    use std::sync::Mutex;

    use lazarus_storage::rkyv::util::AlignedVec;

    /// Buffers kept between checkpoints, up to `keep` bytes in all.
    pub(super) struct Pool {
        buffers: Mutex<Vec<AlignedVec<16>>>,
        keep: usize,
    }

    /// The process's pool: 64 MiB at most.
    pub(super) static POOL: Pool = Pool::new(64 << 20);

    impl Pool {
        pub(super) const fn new(keep: usize) -> Pool {
            Pool {
                buffers: Mutex::new(Vec::new()),
                keep,
            }
        }

        /// A buffer of at least `capacity` bytes: a kept one when one is
        /// big enough, else a new one.
        pub(super) fn take(&self, capacity: usize) -> AlignedVec<16> {
            let mut buffers = super::lock(&self.buffers);
            match buffers.iter().position(|b| b.capacity() >= capacity) {
                Some(i) => buffers.swap_remove(i),
                None => AlignedVec::with_capacity(capacity),
            }
        }

        /// Keeps `buffer` (emptied) if the pool has room, else frees it.
        fn give(&self, mut buffer: AlignedVec<16>) {
            buffer.clear();
            let mut buffers = super::lock(&self.buffers);
            let kept: usize = buffers.iter().map(AlignedVec::capacity).sum();
            if kept + buffer.capacity() <= self.keep {
                buffers.push(buffer);
            }
        }
    }

    /// An archive handed to the store; its buffer goes back to its pool
    /// when the store is done with it.
    pub(super) struct Pooled(pub(super) AlignedVec<16>, pub(super) &'static Pool);

    impl AsRef<[u8]> for Pooled {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Pooled {
        fn drop(&mut self) {
            self.1
                .give(std::mem::replace(&mut self.0, AlignedVec::new()));
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn test_buffers_are_reused_and_ones_past_the_limit_are_freed() {
            static POOL: Pool = Pool::new(4 << 20);
            let mut a = POOL.take(1 << 20);
            a.extend_from_slice(b"archive");
            let at = a.as_ptr();
            drop(Pooled(a, &POOL));
            let again = POOL.take(512 << 10);
            assert_eq!(again.as_ptr(), at, "the kept buffer is handed out again");
            assert!(again.is_empty(), "emptied");
            let fresh = POOL.take(2 << 20);
            assert_ne!(fresh.as_ptr(), at, "a bigger one is new");
            drop(Pooled(again, &POOL));
            drop(Pooled(fresh, &POOL));
            assert_eq!(
                POOL.buffers.lock().expect("pool").len(),
                2,
                "3 MiB kept of 4"
            );
            let huge = POOL.take(4 << 20);
            drop(Pooled(huge, &POOL));
            assert_eq!(
                POOL.buffers.lock().expect("pool").len(),
                2,
                "a buffer past the limit is freed, not kept"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::key_group;

    #[test]
    fn test_get_mut_and_insert_leave_a_snapshot_as_it_was_and_a_miss_dirties_nothing() {
        let ctx = Context::for_test("c", 0, 1);
        let mut st: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        assert_eq!(st.insert("a".into(), 1), None);
        let group_of = |k: &str| format!("counts-kg{}", key_group(k.as_bytes(), 128));
        let decode = |b: &bytes::Bytes| part_entries(b);
        let first = st.snapshot();
        // Writes after the snapshot, through both calls, leave it as it was.
        *st.get_mut(&"a".to_string()).expect("held") += 10;
        assert_eq!(st.insert("a".into(), 20), Some(11));
        let bytes = serialize_all(first);
        assert_eq!(
            decode(bytes[&group_of("a")].as_ref().expect("fresh")),
            vec![("a".to_string(), 1)]
        );
        assert_eq!(st.get(&"a".to_string()), Some(&20));
        // The next snapshot writes the group of "a" and nothing else: a miss
        // of get_mut (key "zz", in another group) marks no group dirty.
        assert_ne!(group_of("a"), group_of("zz"));
        assert_eq!(st.get_mut(&"zz".to_string()), None);
        let second = serialize_all(st.snapshot());
        let fresh: Vec<_> = second.iter().filter(|(_, b)| b.is_some()).collect();
        assert_eq!(
            fresh.len(),
            1,
            "{:?}",
            fresh.iter().map(|f| f.0).collect::<Vec<_>>()
        );
        assert_eq!(fresh[0].0, &group_of("a"));
        assert_eq!(
            decode(fresh[0].1.as_ref().expect("fresh")),
            vec![("a".to_string(), 20)]
        );
        // Nothing written since: the third snapshot writes nothing.
        assert!(serialize_all(st.snapshot()).values().all(Option::is_none));
    }

    #[test]
    fn test_writes_racing_the_serialization_leave_each_snapshot_as_it_was() {
        let ctx = Context::for_test("c", 0, 1);
        let mut st: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        let keys: Vec<String> = (0..4_000).map(|i| format!("k{i}")).collect();
        for k in &keys {
            st.insert(k.clone(), 0);
        }
        for round in 1..=5u64 {
            // Two snapshots pending at once (the second taken before the
            // first is serialized), then writes to every key while both
            // serialize on other threads.
            let first = st.snapshot();
            for k in keys.iter().step_by(3) {
                *st.get_mut(k).expect("held") += 1000;
            }
            let second = st.snapshot();
            // Every key holds this at the round's start.
            let before = (round - 1) * 1001;
            let threads: Vec<_> = [first, second]
                .into_iter()
                .map(|snap| std::thread::spawn(move || serialize_all(snap)))
                .collect();
            for k in &keys {
                *st.get_mut(k).expect("held") += 1;
            }
            let mut done = threads.into_iter().map(|t| t.join().expect("serialized"));
            let (first, second) = (done.next().expect("first"), done.next().expect("second"));
            let all = |parts: &BTreeMap<String, Option<bytes::Bytes>>| -> BTreeMap<String, u64> {
                parts
                    .values()
                    .flatten()
                    .flat_map(|b| part_entries(b))
                    .collect()
            };
            let (first, second) = (all(&first), all(&second));
            assert_eq!(first.len(), keys.len(), "round {round}");
            for (i, k) in keys.iter().enumerate() {
                let bumped = if i % 3 == 0 { before + 1000 } else { before };
                assert_eq!(first[k], before, "round {round}: {k} in the first snapshot");
                assert_eq!(
                    second[k], bumped,
                    "round {round}: {k} in the second snapshot"
                );
                assert_eq!(st.get(k), Some(&(bumped + 1)), "round {round}: {k} live");
            }
            // Every key ends the round at round * 1001.
            for k in &keys {
                st.insert(k.clone(), round * 1001);
            }
        }
    }

    #[test]
    fn test_parts_of_both_layouts_restore_and_a_bad_shard_table_is_named() {
        let ctx = Context::for_test("c", 0, 1);
        let mut st: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        for i in 0..500u64 {
            st.insert(format!("k{i}"), i);
        }
        let (parts, _) = Snapshot::serialize_for_test(st.snapshot()).expect("serialize");
        // The sharded layout, as written now.
        let r = Restored::from_parts(CheckpointId(1), parts.clone(), Vec::new());
        let mut back: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        back.restore(&r).expect("restore");
        assert_eq!(back.len(), 500);
        assert_eq!(back.get(&"k77".to_string()), Some(&77));
        // The one-archive layout of earlier checkpoints.
        let old: BTreeMap<String, bytes::Bytes> = parts
            .iter()
            .map(|(n, b)| {
                (
                    n.clone(),
                    bytes::Bytes::from(to_rkyv(&part_entries(b)).expect("archive")),
                )
            })
            .collect();
        let mut back: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        back.restore(&Restored::from_parts(CheckpointId(1), old, Vec::new()))
            .expect("restore the earlier layout");
        assert_eq!(back.len(), 500);
        assert_eq!(back.get(&"k77".to_string()), Some(&77));
        // A part of more shard archives than a group has shards (not one
        // this code writes): its entries are spread by size, all kept.
        let many: BTreeMap<String, bytes::Bytes> = parts
            .iter()
            .map(|(n, b)| {
                (
                    n.clone(),
                    bytes::Bytes::from(sharded_part(&part_entries(b), 300)),
                )
            })
            .collect();
        let mut back: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        back.restore(&Restored::from_parts(CheckpointId(1), many, Vec::new()))
            .expect("restore a part of 300 shard archives");
        assert_eq!(back.len(), 500);
        assert_eq!(back.get(&"k77".to_string()), Some(&77));
        assert!(back.groups.values().all(|g| g.shards.len() <= MAX_SHARDS));
        // A shard table pointing outside the part, misaligned, or an
        // impossible shard count: named, not a panic.
        let name = "counts-kg0".to_string();
        let good = parts[&name].to_vec();
        let mut bad_end = good.clone();
        bad_end[24..32].copy_from_slice(&(good.len() as u64 + 1).to_le_bytes());
        let mut misaligned = good.clone();
        let start = u64::from_le_bytes(good[16..24].try_into().expect("8"));
        misaligned[16..24].copy_from_slice(&(start + 1).to_le_bytes());
        let mut no_shards = good.clone();
        no_shards[8..12].copy_from_slice(&0u32.to_le_bytes());
        // Cut inside the shard table (of one shard here: 16 bytes of
        // header, 16 of table).
        let mut truncated = good.clone();
        truncated.truncate(24);
        for (what, bytes) in [
            ("end past the part", bad_end),
            ("misaligned start", misaligned),
            ("no shards", no_shards),
            ("header cut short", truncated),
        ] {
            let mut parts = parts.clone();
            parts.insert(name.clone(), bytes::Bytes::from(bytes));
            let mut back: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
            let e = back
                .restore(&Restored::from_parts(CheckpointId(1), parts, Vec::new()))
                .expect_err(what)
                .to_string();
            assert!(
                e.contains("counts-kg0") && e.contains("does not decode"),
                "{what}: {e}"
            );
        }
    }

    /// A part in the sharded layout of `count` shard archives: every
    /// entry in the first, the others empty.
    fn sharded_part(entries: &[(String, u64)], count: usize) -> Vec<u8> {
        let mut out = vec![0u8; part_header_len(count)];
        out[..8].copy_from_slice(&PART_MAGIC);
        out[8..12].copy_from_slice(&(count as u32).to_le_bytes());
        for i in 0..count {
            out.resize(out.len().next_multiple_of(16), 0);
            let start = out.len() as u64;
            let shard: Vec<(String, u64)> = if i == 0 { entries.to_vec() } else { Vec::new() };
            out.extend_from_slice(&to_rkyv(&shard).expect("archive"));
            let end = out.len() as u64;
            out[16 + 16 * i..24 + 16 * i].copy_from_slice(&start.to_le_bytes());
            out[24 + 16 * i..32 + 16 * i].copy_from_slice(&end.to_le_bytes());
        }
        out
    }

    /// Every entry of a part, sorted.
    fn part_entries(bytes: &[u8]) -> Vec<(String, u64)> {
        let shards = part_shards(bytes).expect("header").expect("sharded layout");
        assert!((1..=MAX_SHARDS).contains(&shards.len()));
        let mut all = Vec::new();
        for shard in shards {
            let mut aligned = AlignedVec::<16>::new();
            aligned.extend_from_slice(shard);
            all.extend(
                rkyv::from_bytes::<Vec<(String, u64)>, rancor::Error>(&aligned).expect("decode"),
            );
        }
        all.sort();
        all
    }

    fn serialize_all(s: Snapshot) -> BTreeMap<String, Option<bytes::Bytes>> {
        let (parts, _) = s.into_parts();
        parts
            .into_iter()
            .map(|(n, c)| {
                (
                    n,
                    match c {
                        PartContent::Fresh { serialize, .. } => {
                            Some(serialize().expect("serialize"))
                        }
                        PartContent::Unchanged => None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn test_snapshot_is_copy_on_write_and_incremental() {
        let ctx = Context::for_test("c", 0, 1);
        let mut st: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        *st.entry("a".into()).or_insert(0) += 1;
        let first = st.snapshot();
        // Writes after the snapshot must not change what it serializes.
        *st.entry("a".into()).or_insert(0) += 10;
        let bytes = serialize_all(first);
        assert_eq!(
            bytes.values().filter(|b| b.is_some()).count(),
            128,
            "first snapshot writes every group"
        );
        let a_group = format!("counts-kg{}", key_group(b"a", 128));
        let entries = part_entries(bytes[&a_group].as_ref().expect("fresh"));
        assert_eq!(entries, vec![("a".to_string(), 1)]);
        // Second snapshot: only the group of "a" is dirty.
        let second = serialize_all(st.snapshot());
        let fresh: Vec<_> = second
            .iter()
            .filter(|(_, b)| b.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(fresh, vec![a_group]);
    }

    /// What the uploader does with a snapshot: serialize every fresh part
    /// and keep its revive beside a (made-up) chunk of checkpoint `n`.
    fn write(
        s: Snapshot,
        n: u64,
        decoded: &DecodedParts,
        chunks: &mut BTreeMap<String, ChunkRef>,
        bytes: &mut BTreeMap<String, bytes::Bytes>,
    ) {
        let (parts, _) = s.into_parts();
        for (name, content) in parts {
            if let PartContent::Fresh { serialize, revive } = content {
                let b = serialize().expect("serialize");
                let chunk = ChunkRef {
                    key: format!("chunks/{n}/w/{name}.chunk"),
                    codec: lazarus_storage::Codec::None,
                    stored_len: b.len() as u64,
                    stored_crc: 0,
                    raw_len: b.len() as u64,
                    raw_crc: crc32fast::hash(&b),
                };
                decoded.keep(&chunk, revive.expect("keyed state parts revive"));
                chunks.insert(name.clone(), chunk);
                bytes.insert(name, b);
            }
        }
    }

    /// A restore as the runtime makes it: parts held decoded are not given
    /// as bytes.
    fn restored(
        decoded: &DecodedParts,
        chunks: &BTreeMap<String, ChunkRef>,
        bytes: &BTreeMap<String, bytes::Bytes>,
    ) -> Restored {
        let held: BTreeMap<String, Decoded> = chunks
            .iter()
            .filter_map(|(n, c)| decoded.get(c).map(|v| (n.clone(), v)))
            .collect();
        let parts = bytes
            .iter()
            .filter(|(n, _)| !held.contains_key(*n))
            .map(|(n, b)| (n.clone(), b.clone()))
            .collect();
        Restored::from_parts(CheckpointId(1), parts, Vec::new()).with_decoded(
            held,
            chunks.clone(),
            decoded.clone(),
        )
    }

    #[test]
    fn test_restore_takes_untouched_groups_from_memory_and_decodes_changed_ones() {
        let ctx = Context::for_test("c", 0, 1);
        let mut a: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        for i in 0..5000u64 {
            a.entry(format!("k{i}")).or_insert(i);
        }
        let decoded = DecodedParts::default();
        let (mut chunks, mut bytes) = (BTreeMap::new(), BTreeMap::new());
        write(a.snapshot(), 1, &decoded, &mut chunks, &mut bytes);
        // After the checkpoint, one key changes: its shard is moved away
        // (copy-on-write with only weak pointers left), so its group is no
        // longer held; every other group still is.
        *a.entry("k7".into()).or_insert(0) += 1000;
        let changed = format!("counts-kg{}", key_group(b"k7", 128));
        let r = restored(&decoded, &chunks, &bytes);
        assert!(r.decoded(&changed).is_none() && r.part(&changed).is_some());
        assert_eq!(r.part_names().count(), 128);
        assert_eq!(
            chunks.keys().filter(|n| r.decoded(n).is_some()).count(),
            127
        );
        // Restored state is the checkpoint's, not the later write's.
        let mut b: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        b.restore(&r).expect("restore");
        assert_eq!(b.len(), 5000);
        assert_eq!(b.get(&"k7".to_string()), Some(&7));
        assert_eq!(b.get(&"k4999".to_string()), Some(&4999));
        // Held groups are shared, not copied: the same shards as `a`.
        let held_group = (0..128u32)
            .find(|g| format!("counts-kg{g}") != changed && !a.groups[g].shards[0].is_empty())
            .expect("a held group with keys");
        assert!(Arc::ptr_eq(
            &a.groups[&held_group].shards[0],
            &b.groups[&held_group].shards[0]
        ));
        // The changed group was decoded, and is now held for `b`.
        let again = restored(&decoded, &chunks, &bytes);
        assert!(again.decoded(&changed).is_some());
        // Writing to the restored copy never shows through the other one.
        *b.entry("k1".into()).or_insert(0) += 1;
        assert_eq!(a.get(&"k1".to_string()), Some(&1));
        assert_eq!(b.get(&"k1".to_string()), Some(&2));
    }

    #[test]
    fn test_restore_refuses_a_part_holding_a_key_of_another_group() {
        let ctx = Context::for_test("c", 0, 1);
        let k = "somekey".to_string();
        let own = key_group(k.as_bytes(), 128);
        let other = (own + 1) % 128;
        let mut parts = BTreeMap::new();
        for g in 0..128u32 {
            let entries: Vec<(String, u64)> = if g == other {
                vec![(k.clone(), 1)]
            } else {
                vec![]
            };
            parts.insert(
                format!("counts-kg{g}"),
                bytes::Bytes::from(to_rkyv(&entries).expect("archive")),
            );
        }
        let r = Restored::from_parts(CheckpointId(3), parts, Vec::new());
        let mut st: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        let e = st.restore(&r).expect_err("wrong group").to_string();
        assert!(
            e.contains(&format!("counts-kg{other}")) && e.contains(&format!("group {own}")),
            "{e}"
        );
        // Garbage is named too, not a panic.
        let mut parts = BTreeMap::new();
        for g in 0..128u32 {
            parts.insert(
                format!("counts-kg{g}"),
                bytes::Bytes::from_static(&[7u8; 13]),
            );
        }
        let r = Restored::from_parts(CheckpointId(3), parts, Vec::new());
        let e = st.restore(&r).expect_err("garbage").to_string();
        assert!(e.contains("does not decode"), "{e}");
    }

    /// Keyed state of 20,000 keys `k{i}` holding `i`, one instance, each
    /// group split to [`MAX_SHARDS`] shards (a group this small has one).
    fn twenty_thousand_keys() -> (Context, KeyedState<String, u64>) {
        let ctx = Context::for_test("c", 0, 1);
        let mut st: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        for i in 0..20_000u64 {
            st.entry(format!("k{i}")).or_insert(i);
        }
        split_to_max(&mut st);
        (ctx, st)
    }

    /// Splits every group of `st` to [`MAX_SHARDS`] shards.
    fn split_to_max(st: &mut KeyedState<String, u64>) {
        let key_groups = st.key_groups;
        for g in st.groups.values_mut() {
            while g.shards.len() < MAX_SHARDS {
                g.split(|k| KeyedState::<String, u64>::place(key_groups, k).1);
            }
        }
    }

    #[test]
    fn test_shard_of_is_linear_hashing() {
        for n in 1..=MAX_SHARDS {
            for h in 0..4096usize {
                let i = shard_of(h, n);
                assert!(i < n, "h {h} n {n} -> {i}");
                if n.is_power_of_two() {
                    assert_eq!(i, h % n);
                }
                // Growing to n + 1 moves a key only from the shard split
                // (n - low) into the new one (n).
                let j = shard_of(h, n + 1);
                let low = 1 << (usize::BITS - 1 - n.leading_zeros());
                assert!(
                    j == i || (i == n - low && j == n),
                    "h {h} n {n}: {i} -> {j}"
                );
            }
        }
    }

    /// A group starts with one shard and grows one shard at a time while a
    /// write finds its shard long (learning the bytes per entry from one
    /// entry first, then from its archives); every entry stays reachable
    /// through splits, snapshots pending over a split, and restores, which
    /// decode a part into as many shards as it has archives.
    #[test]
    fn test_a_group_grows_one_shard_at_a_time_and_keeps_its_entries() {
        let ctx = Context::for_test("c", 0, 1);
        let mut st: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        let counts = |st: &KeyedState<String, u64>| -> Vec<usize> {
            st.groups.values().map(|g| g.shards.len()).collect()
        };
        for i in 0..2_000u64 {
            st.insert(format!("k{i}"), i);
        }
        assert!(counts(&st).iter().all(|n| *n == 1), "{:?}", counts(&st));
        // A snapshot pending while the groups grow: it keeps what it froze.
        let frozen = st.snapshot();
        for i in 2_000..400_000u64 {
            st.insert(format!("k{i}"), i);
        }
        let grown = counts(&st);
        assert!(
            grown.iter().all(|n| *n > 1 && *n <= MAX_SHARDS),
            "{grown:?}"
        );
        let then = restored_from(frozen, &ctx);
        assert_eq!(then.len(), 2_000);
        assert_eq!(then.get(&"k1999".to_string()), Some(&1_999));
        assert_eq!(then.get(&"k2000".to_string()), None);
        // Each shard holds entries of about SHARD_BYTES archived (or fewer):
        // none is more than twice the split length.
        for g in st.groups.values() {
            let longest = g.shards.iter().map(|s| s.len()).max().unwrap_or(0);
            assert!(
                longest <= 2 * g.split_at + 1,
                "{longest} > 2 x {}",
                g.split_at
            );
        }
        assert_eq!(st.len(), 400_000);
        for i in (0..400_000u64).step_by(997) {
            assert_eq!(st.get(&format!("k{i}")), Some(&i), "k{i}");
        }
        let back = restored_from(st.snapshot(), &ctx);
        assert_eq!(
            counts(&back),
            grown,
            "restored with the shards it was written with"
        );
        assert_eq!(back.len(), 400_000);
        assert_eq!(back.get(&"k123456".to_string()), Some(&123_456));
        // The archive's bytes per entry size the next splits.
        let k1 = key_group(b"k1", ctx.key_groups);
        let e = st.groups[&k1].entry_bytes.load(Ordering::Relaxed);
        assert!(e > 8 && e < 64, "{e} bytes per entry");
        st.insert("k1".into(), 1);
        let _ = st.snapshot();
        assert_eq!(st.groups[&k1].split_at, split_at(e));
    }

    /// What `frozen` restores to, serialized as the uploader does.
    fn restored_from(frozen: Snapshot, ctx: &Context) -> KeyedState<String, u64> {
        let (parts, _) = Snapshot::serialize_for_test(frozen).expect("serialize");
        let r = Restored::from_parts(CheckpointId(1), parts, Vec::new());
        let mut back: KeyedState<String, u64> = KeyedState::new("counts", ctx);
        back.restore(&r).expect("restore");
        back
    }

    /// The snapshot `frozen` of `twenty_thousand_keys` restores all of
    /// them, `k1` at its value before the test's write.
    fn assert_kept_k1_before_the_write(frozen: Snapshot, ctx: &Context) {
        let back = restored_from(frozen, ctx);
        assert_eq!(
            back.get(&"k1".to_string()),
            Some(&1),
            "the snapshot's value"
        );
        assert_eq!(back.len(), 20_000);
    }

    #[test]
    fn test_a_write_after_a_snapshot_copies_one_shard_not_the_group() {
        let (ctx, mut st) = twenty_thousand_keys();
        let g = key_group(b"k1", 128);
        let before: Vec<Shard<String, u64>> = st.groups[&g].shards.to_vec();
        let frozen = st.snapshot();
        *st.entry("k1".into()).or_insert(0) += 1;
        let after = &st.groups[&g].shards;
        let copied = before
            .iter()
            .zip(after.iter())
            .filter(|(b, a)| !Arc::ptr_eq(b, a))
            .count();
        assert_eq!(copied, 1, "one shard of {MAX_SHARDS} copied");
        // ... and not as a copy of its entries: the write archived the
        // frozen shard for the snapshot and then changed it in place.
        let pending = st.groups[&g]
            .pending
            .last()
            .and_then(Weak::upgrade)
            .expect("the snapshot is pending");
        let archived = pending
            .slots
            .get()
            .expect("the write moved the group's shards into the snapshot's slots")
            .iter()
            .filter(|slot| matches!(&*lock(slot), Slot::Archived(_)))
            .count();
        assert_eq!(archived, 1, "the written shard archived on write");
        // The snapshot still serializes the value before the write.
        let back = restored_from(frozen, &ctx);
        assert_eq!(back.get(&"k1".to_string()), Some(&1));
        assert_eq!(back.len(), 20_000);
    }

    #[test]
    fn test_a_snapshot_clones_one_pointer_per_group_and_the_first_write_moves_the_shards() {
        let (ctx, mut st) = twenty_thousand_keys();
        let g = key_group(b"k1", 128);
        let frozen = st.snapshot();
        // The snapshot holds each dirty group's vector, not its shards.
        assert!(st
            .groups
            .values()
            .all(|grp| Arc::strong_count(&grp.shards) == 2));
        assert!(st.groups[&g]
            .shards
            .iter()
            .all(|s| Arc::strong_count(s) == 1));
        *st.entry("k1".into()).or_insert(0) += 1;
        let pending = st.groups[&g]
            .pending
            .last()
            .and_then(Weak::upgrade)
            .expect("the snapshot is pending");
        assert!(
            lock(&pending.shards).is_none(),
            "the write took the frozen vector"
        );
        assert_eq!(Arc::strong_count(&st.groups[&g].shards), 1);
        // Every shard moved into the snapshot's slots (held there and by
        // the group), but the written one: archived, then changed in place.
        let shared = st.groups[&g]
            .shards
            .iter()
            .filter(|s| Arc::strong_count(s) == 2)
            .count();
        assert_eq!(shared, MAX_SHARDS - 1);
        // Groups not written since still share their vector with it.
        assert!(st
            .groups
            .iter()
            .filter(|(other, _)| **other != g)
            .all(|(_, grp)| Arc::strong_count(&grp.shards) == 2));
        assert_kept_k1_before_the_write(frozen, &ctx);
        assert_eq!(st.get(&"k1".to_string()), Some(&2));
    }

    #[test]
    fn test_a_write_does_not_wait_for_a_serialization_busy_with_its_shard() {
        let (ctx, mut st) = twenty_thousand_keys();
        let g = key_group(b"k1", 128);
        let frozen = st.snapshot();
        let i = st.groups[&g]
            .shards
            .iter()
            .position(|s| s.contains_key("k1"))
            .expect("k1's shard");
        let pending = st.groups[&g]
            .pending
            .last()
            .and_then(Weak::upgrade)
            .expect("the snapshot is pending");
        // The serialization made the slots and holds the shard's (as while
        // it archives).
        let slots = pending.slots();
        let busy = lock(&slots[i]);
        let (done_tx, done) = std::sync::mpsc::channel();
        let waited = std::thread::scope(|scope| {
            scope.spawn(|| {
                *st.get_mut(&"k1".to_string()).expect("held") += 100;
                let _ = done_tx.send(());
            });
            let waited = done
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_err();
            drop(busy);
            waited
        });
        assert!(!waited, "the write waited for the busy slot");
        assert!(
            matches!(&*lock(&slots[i]), Slot::Held(_)),
            "the busy slot is the serialization's to archive"
        );
        assert_eq!(st.get(&"k1".to_string()), Some(&101));
        assert_kept_k1_before_the_write(frozen, &ctx);
    }

    #[test]
    fn test_instances_own_disjoint_groups() {
        let a: KeyedState<String, u64> = KeyedState::new("s", &Context::for_test("c", 0, 2));
        let b: KeyedState<String, u64> = KeyedState::new("s", &Context::for_test("c", 1, 2));
        assert_eq!(a.groups.len() + b.groups.len(), 128);
        assert!(a.groups.keys().all(|g| !b.groups.contains_key(g)));
    }
}
