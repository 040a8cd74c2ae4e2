//! Writing chunks: a worker's state, framed and uploaded. A chunk's bytes
//! are held once: the frame header is a separate 32-byte buffer, codec none
//! shares the caller's buffer, and multipart parts are slices of it.

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use tracing::Instrument;

use crate::backend::BackendKind;
use crate::error::{Result, StorageError};
use crate::frame::{self, Codec, FrameKind};
use crate::ids::{CheckpointId, WorkerId};
use crate::keys;
use crate::manifest::ChunkRef;
use crate::store::JobStore;

impl JobStore {
    /// Writes one chunk of `worker`'s state for checkpoint `id` and returns
    /// the reference to put in the manifest. `name` tells the worker's chunks
    /// apart (for example a key-group range). Framing (CRC, compression) runs
    /// on a blocking thread; objects over the multipart threshold are uploaded
    /// in parts, [`StoreOptions::upload_concurrency`](crate::StoreOptions) at a time.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), lazarus_storage::StorageError> {
    /// use lazarus_storage::{CheckpointId, CheckpointStore, Codec, JobId, WorkerId};
    /// let job = CheckpointStore::open("memory://")?.job(JobId::new("wordcount")?);
    /// let worker = WorkerId::new("counter-0")?;
    /// let chunk = job
    ///     .write_chunk(CheckpointId(1), &worker, "kg-0", b"state".to_vec().into(), Codec::Zstd)
    ///     .await?;
    /// assert_eq!(chunk.raw_len, 5);
    /// # Ok(()) }
    /// ```
    pub async fn write_chunk(
        &self,
        id: CheckpointId,
        worker: &WorkerId,
        name: &str,
        data: Bytes,
        codec: Codec,
    ) -> Result<ChunkRef> {
        let rel = keys::chunk(id, worker, name)?;
        let span = tracing::debug_span!("write_chunk", job = %self.job, checkpoint = %id, key = %rel, bytes = data.len());
        async {
            let level = self.store.options.zstd_level;
            let encoded = tokio::task::spawn_blocking(move || {
                frame::encode(FrameKind::Chunk, codec, level, data)
            })
            .await
            .map_err(|e| StorageError::io("encode task", &rel, std::io::Error::other(e)))??;
            let total = encoded.len();
            let header = Bytes::copy_from_slice(&encoded.header);
            if total <= self.store.options.multipart_threshold {
                let payload = PutPayload::from_iter(
                    std::iter::once(header).chain(segments(encoded.payload.clone())),
                );
                self.put_small(&rel, payload, false)
                    .await
                    .map_err(|e| StorageError::backend("put", self.full_key(&rel), e))?;
            } else {
                self.put_multipart(&rel, header, encoded.payload.clone())
                    .await?;
            }
            // Data now; the directory entries are synced once per directory
            // when the manifest that references this chunk is committed.
            self.make_durable(&rel, false).await?;
            tracing::debug!(stored = total, "chunk written");
            Ok(chunk_ref(rel.clone(), codec, &encoded))
        }
        .instrument(span)
        .await
    }

    /// Writes one chunk as [`write_chunk`](Self::write_chunk) does, in one
    /// step on the calling thread, which must be one that may block: frame,
    /// write into a staging file, fsync it, rename it into place. Only a
    /// local-directory store ([`is_local_directory`](Self::is_local_directory))
    /// writes this way; another store is refused (use `write_chunk`).
    ///
    /// `write_chunk` hands each of those steps to a blocking thread of its
    /// own, and on saturated cores each hand-off waits for a core: measured
    /// here, small chunks took 10 to 25 ms that way. This takes one. It
    /// offers its core to other threads (`sched_yield`) after every
    /// [`WRITE_SEGMENT`] it checksums or writes of a chunk of 1 MiB or more
    /// (see [`PACED_FROM`]), so a large chunk does not keep a runnable
    /// processing thread waiting.
    ///
    /// ```
    /// # fn main() -> Result<(), lazarus_storage::StorageError> {
    /// use lazarus_storage::{CheckpointId, CheckpointStore, Codec, JobId, WorkerId};
    /// let dir = std::env::temp_dir().join(format!("lazarus-doc-{}", std::process::id()));
    /// let url = format!("file://{}", dir.display());
    /// let job = CheckpointStore::open(&url)?.job(JobId::new("wordcount")?);
    /// let worker = WorkerId::new("counter-0")?;
    /// let chunk = job.write_chunk_here(CheckpointId(1), &worker, "kg-0", b"state".to_vec().into(), Codec::None)?;
    /// assert_eq!(chunk.raw_len, 5);
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok(()) }
    /// ```
    pub fn write_chunk_here(
        &self,
        id: CheckpointId,
        worker: &WorkerId,
        name: &str,
        data: Bytes,
        codec: Codec,
    ) -> Result<ChunkRef> {
        let BackendKind::File { root } = &self.store.kind else {
            return Err(StorageError::InvalidArgument {
                what: "store",
                reason: format!(
                    "{} is not a local directory: write its chunks with write_chunk",
                    self.store.url
                ),
            });
        };
        let rel = keys::chunk(id, worker, name)?;
        let _span = tracing::debug_span!("write_chunk", job = %self.job, checkpoint = %id, key = %rel, bytes = data.len()).entered();
        let level = self.store.options.zstd_level;
        let paced = data.len() >= PACED_FROM;
        let encoded =
            frame::encode_with(FrameKind::Chunk, codec, level, data, || offer_core(paced))?;
        let path = root.join(self.full_key(&rel));
        write_durably(&path, &encoded.header, encoded.payload.clone(), paced)?;
        tracing::debug!(stored = encoded.len(), "chunk written");
        Ok(chunk_ref(rel, codec, &encoded))
    }

    async fn put_multipart(&self, rel: &str, header: Bytes, mut payload: Bytes) -> Result<()> {
        let options = &self.store.options;
        let upload = self
            .store
            .object_store
            .put_multipart(&self.path(rel))
            .await
            .map_err(|e| StorageError::backend("start multipart upload", self.full_key(rel), e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, options.part_size);
        writer.put(header);
        // Feed one part at a time, waiting for a free slot first, so at most
        // `upload_concurrency` parts are in flight. Slices share `payload`.
        while !payload.is_empty() {
            if let Err(e) = writer.wait_for_capacity(options.upload_concurrency).await {
                // Best effort: the upload failed already; report that error.
                let _ = writer.abort().await;
                return Err(StorageError::backend(
                    "upload part of",
                    self.full_key(rel),
                    e,
                ));
            }
            let take = payload.len().min(options.part_size);
            for piece in segments(payload.split_to(take)) {
                writer.put(piece);
            }
        }
        writer.finish().await.map_err(|e| {
            StorageError::backend("complete multipart upload", self.full_key(rel), e)
        })?;
        Ok(())
    }
}

/// Chunks this large (raw bytes) or larger offer their core
/// (`sched_yield`) between the steps of their write (every
/// [`WRITE_SEGMENT`] checksummed or written). A kernel without preemption
/// otherwise lets the writing thread run to the end of its slice while a
/// runnable processing thread waits. A smaller chunk never offers: its
/// whole write is a few hundred microseconds, and on a saturated machine
/// each offer gives the core away for others' whole slices (a 13 KB part
/// took 13-20 ms to write when it offered after every step, 7-19 ms
/// without; wordcount's counters write 16 such parts per checkpoint).
/// Offering only after 200 µs of work instead, large chunks too, doubled
/// the 1 GiB keyed-state bench's pause maximum (1.2 and 2.1 ms to 4.2 and
/// 4.0 ms). At 512 KiB, wordcount's long-tail parts (560-580 KB) offered
/// three times each and its checkpoint latency p50 was 61-84 ms; at 1 MiB
/// (the worker's threshold for a large part) 56-80 ms, with the
/// serialization's offers limited the same way 50-63 ms (4 runs each).
const PACED_FROM: usize = 1 << 20;

/// Between two steps of a write: offers the core if the chunk is `paced`.
fn offer_core(paced: bool) {
    if paced {
        std::thread::yield_now();
    }
}

/// The largest single write a chunk's bytes are handed to the backend in.
/// A local directory writes each segment with one `write(2)`, and a kernel
/// without preemption finishes a syscall before it runs anything else: a
/// whole chunk in one call (8 MiB: about 5 ms of page-cache copying here)
/// held a core away from a waking processing thread for that long.
const WRITE_SEGMENT: usize = 256 << 10;

/// `payload` as slices of at most [`WRITE_SEGMENT`] bytes (no copy).
fn segments(mut payload: Bytes) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(move || {
        (!payload.is_empty()).then(|| payload.split_to(payload.len().min(WRITE_SEGMENT)))
    })
}

/// The manifest's reference to a chunk stored at `key` as `encoded`.
fn chunk_ref(key: String, codec: Codec, encoded: &frame::EncodedFrame) -> ChunkRef {
    ChunkRef {
        key,
        codec,
        stored_len: encoded.len(),
        stored_crc: encoded.payload_crc,
        raw_len: encoded.raw_len,
        raw_crc: encoded.raw_crc,
    }
}

/// Starts the disk write of `len` bytes of `file` at `at` without waiting
/// for it (`sync_file_range(2)`, `SYNC_FILE_RANGE_WRITE`; nothing on other
/// systems), so the final fsync finds them under way or done: a kernel
/// without preemption submits a whole chunk's pages inside that one system
/// call otherwise, and a sink that fsyncs a second of output at a barrier
/// waits for all of it there. Advisory: the fsync that follows reports any
/// error.
///
/// ```
/// use std::io::Write;
/// let path = std::env::temp_dir().join(format!("lazarus-wb-{}", std::process::id()));
/// let mut file = std::fs::File::create(&path)?;
/// file.write_all(&[7u8; 4096])?;
/// lazarus_storage::start_writeback(&file, 0, 4096); // returns at once
/// file.sync_data()?; // durable: finds the write under way
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn start_writeback(file: &std::fs::File, at: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on an open descriptor; no memory is
        // passed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                at as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, at, len);
}

/// Writes `header` and `payload` to a file at `path` that appears whole or
/// not at all, with its data durable: a staging file beside it (named
/// `<name>#<digits>`, which listings skip, as object_store's own staging
/// files), fsynced, then renamed into place. Its directory entry is made
/// durable at the commit, as for every chunk. Between segments a `paced`
/// write offers its core (`sched_yield`): a kernel without preemption
/// otherwise runs the writes back to back until its next tick, 4 ms here.
fn write_durably(path: &std::path::Path, header: &[u8], payload: Bytes, paced: bool) -> Result<()> {
    use std::io::Write;
    static STAGING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| {
            StorageError::io(
                "name a chunk file",
                path,
                std::io::ErrorKind::InvalidInput.into(),
            )
        })?
        .to_string_lossy()
        .into_owned();
    // A name taken (a staging file a crashed process of the same id left)
    // gets the next number; a missing directory is made once.
    let mut made_dir = false;
    let (file, staging) = loop {
        let n = STAGING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging = path.with_file_name(format!("{name}#{}{n:08}", std::process::id()));
        match std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(file) => break (file, staging),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !made_dir => {
                let dir = path.parent().unwrap_or(path);
                std::fs::create_dir_all(dir)
                    .map_err(|e| StorageError::io("create chunk directory", dir, e))?;
                made_dir = true;
            }
            Err(e) => return Err(StorageError::io("create chunk file", &staging, e)),
        }
    };
    let written = (|| {
        let mut file = file;
        file.write_all(header)?;
        let mut at = header.len() as u64;
        for segment in segments(payload) {
            file.write_all(&segment)?;
            start_writeback(&file, at, segment.len() as u64);
            at += segment.len() as u64;
            offer_core(paced);
        }
        file.sync_all()
    })();
    let placed = written
        .map_err(|e| StorageError::io("write chunk file", &staging, e))
        .and_then(|()| {
            std::fs::rename(&staging, path)
                .map_err(|e| StorageError::io("rename chunk file", path, e))
        });
    if placed.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    placed
}
