//! Restore: a worker's chunks are copied into a local cache directory and
//! handed out as memory-mapped, CRC-checked views that rkyv reads in place.
//!
//! A cache file is itself a frame with codec none and the raw payload, so a
//! zstd chunk is decoded once, on download, and every later access is a map.
//! Cache files are written under a temporary name and renamed into place only
//! after the downloaded frame passed every check; a cache hit is re-checked
//! against the manifest's raw CRC before it is used, so a damaged cache file
//! is fetched again, never handed out.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use memmap2::Mmap;
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::Portable;
use tracing::Instrument;

use crate::backend::BackendKind;
use crate::error::{CorruptReason, Result, StorageError};
use crate::frame::{Codec, FrameHeader, FrameKind, HEADER_LEN};
use crate::ids::WorkerId;
use crate::manifest::{ChunkRef, Manifest};
use crate::store::JobStore;

/// A local directory holding restored chunks, shared by restores of any job.
#[derive(Debug, Clone)]
pub struct LocalCache {
    dir: PathBuf,
}

impl LocalCache {
    /// A cache in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<LocalCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StorageError::io("create cache directory", &dir, e))?;
        Ok(LocalCache { dir })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Puts a chunk this host just wrote into the cache, so a restart on the
    /// same host restores from local disk. `raw` must be the chunk's raw
    /// payload; a later restore checks it against `chunk.raw_crc` anyway.
    pub fn insert(&self, job: &crate::JobId, chunk: &ChunkRef, raw: &[u8]) -> Result<()> {
        if crate::keys::parse_chunk(&chunk.key).is_none() {
            return Err(StorageError::InvalidArgument {
                what: "chunk reference",
                reason: format!("{:?} is not a chunk key", chunk.key),
            });
        }
        let path = self.path_of(job.as_str(), &chunk.key);
        let parent = path.parent().expect("cache paths have a parent");
        std::fs::create_dir_all(parent)
            .map_err(|e| StorageError::io("create cache directory", parent, e))?;
        let tmp = parent.join(format!(
            ".insert.tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let header = FrameHeader {
            codec: Codec::None,
            kind: FrameKind::Chunk,
            payload_len: raw.len() as u64,
            raw_len: raw.len() as u64,
            payload_crc: chunk.raw_crc,
        };
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&header.encode())?;
            f.write_all(raw)?;
            Ok(())
        };
        write().map_err(|e| StorageError::io("write cache file", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StorageError::io("rename cache file", &path, e))
    }

    /// Deletes cached chunks of `job` that no retained checkpoint references,
    /// by the rule of store retention: a chunk written by a checkpoint newer
    /// than `newest_committed` may belong to a checkpoint in progress and is
    /// kept. Returns how many files were deleted.
    pub fn prune(
        &self,
        job: &crate::JobId,
        referenced: &std::collections::HashSet<String>,
        newest_committed: crate::CheckpointId,
    ) -> Result<usize> {
        let root = self.dir.join(job.as_str());
        let chunks = root.join(crate::keys::CHUNKS);
        let mut deleted = 0;
        let mut stack = vec![chunks];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StorageError::io("list cache directory", &dir, e)),
            };
            for entry in entries {
                let path = entry
                    .map_err(|e| StorageError::io("list cache directory", &dir, e))?
                    .path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Some(rel) = path
                    .strip_prefix(&root)
                    .ok()
                    .and_then(|p| p.to_str())
                    .map(str::to_string)
                else {
                    continue;
                };
                let Some(writer) = crate::keys::parse_chunk(&rel) else {
                    continue; // temporary files and strangers are left alone
                };
                if writer <= newest_committed && !referenced.contains(&rel) {
                    std::fs::remove_file(&path)
                        .map_err(|e| StorageError::io("delete cache file", &path, e))?;
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }

    /// Where the chunk `rel` of `job` lives in the cache. `rel` was validated
    /// as a chunk key (`keys::parse_chunk`), so it cannot leave the directory.
    fn path_of(&self, job: &str, rel: &str) -> PathBuf {
        self.dir.join(job).join(rel)
    }
}

/// Whether a cache file's payload was CRC-checked as it was written.
#[derive(Debug, Clone, Copy)]
enum Payload {
    Checked,
    Unchecked,
}

/// One restored chunk: a read-only map of a CRC-checked cache file.
#[derive(Debug)]
pub struct MappedChunk {
    key: String,
    map: Mmap,
}

impl MappedChunk {
    /// Maps the cache file at `path` and checks it: a codec-none chunk frame
    /// whose payload has length `raw_len` and CRC `raw_crc`.
    fn open(path: &Path, key: &str, raw_len: u64, raw_crc: u32) -> Result<MappedChunk> {
        Self::open_with(path, key, raw_len, raw_crc, Payload::Unchecked)
    }

    /// As [`MappedChunk::open`]; a payload this process `Checked` as it
    /// wrote the file (a fetch: every byte went through the CRC on its way
    /// in) is not read again for its CRC, only its frame is checked.
    fn open_with(
        path: &Path,
        key: &str,
        raw_len: u64,
        raw_crc: u32,
        check: Payload,
    ) -> Result<MappedChunk> {
        let file = File::open(path).map_err(|e| StorageError::io("open chunk file", path, e))?;
        // SAFETY: cache files (and a local store's objects) are only ever
        // created by rename and never modified in place, so the mapped bytes
        // do not change under us.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| StorageError::io("map chunk file", path, e))?;
        let corrupt =
            |reason| StorageError::corrupt(format!("{key} (file {})", path.display()), reason);
        let header = FrameHeader::decode(key, FrameKind::Chunk, &map)?;
        if header.codec != Codec::None {
            return Err(corrupt(CorruptReason::UnknownCodec(1)));
        }
        let payload = &map[HEADER_LEN..];
        if payload.len() as u64 != header.payload_len || header.payload_len != raw_len {
            return Err(corrupt(CorruptReason::Length {
                expected: raw_len,
                actual: payload.len() as u64,
            }));
        }
        let computed = match check {
            Payload::Checked => raw_crc,
            Payload::Unchecked => crc32fast::hash(payload),
        };
        if computed != raw_crc || header.payload_crc != raw_crc {
            return Err(corrupt(CorruptReason::PayloadCrc {
                expected: raw_crc,
                computed,
            }));
        }
        Ok(MappedChunk {
            key: key.to_string(),
            map,
        })
    }

    /// The full key of the chunk in the store.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The raw payload, CRC-checked. It starts 32-byte aligned.
    pub fn bytes(&self) -> &[u8] {
        &self.map[HEADER_LEN..]
    }

    /// Drops the chunk's pages from this process's resident memory (they
    /// stay in the page cache, and [`MappedChunk::bytes`] still reads the
    /// same bytes: a later access faults them back in from the file). For
    /// a caller done with the bytes, say after decoding them, that keeps
    /// the map: a restore then holds the decoded state, not the state
    /// twice. Best effort: a failure only leaves the pages resident.
    pub fn release(&self) {
        // SAFETY: a read-only shared map of a file that is never modified
        // in place (see `open`): dropping its pages loses nothing, a later
        // access reads the same bytes from the file.
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    /// The payload read in place as an rkyv archive of type `T`, validated
    /// first: no deserialization pass, and no access to bytes that fail
    /// validation.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), lazarus_storage::StorageError> {
    /// use lazarus_storage::*;
    /// let job = CheckpointStore::open("memory://")?.job(JobId::new("j")?);
    /// let worker = WorkerId::new("w")?;
    /// let state: Vec<u64> = vec![1, 2, 3];
    /// let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&state).expect("serialize");
    /// let chunk = job.write_chunk(CheckpointId(1), &worker, "s", bytes.to_vec().into(), Codec::None).await?;
    /// let mut manifest = Manifest::new(job.job().clone(), CheckpointId(1), Epoch(1));
    /// manifest.workers.insert(worker.clone(), WorkerSnapshot { chunks: vec![chunk], metadata: vec![] });
    /// job.commit(&manifest).await?;
    ///
    /// let cache = LocalCache::new(tempfile::tempdir().expect("dir").keep())?;
    /// let restored = job.restore_worker(&job.latest().await?, &worker, &cache).await?;
    /// let archived = restored.chunks[0].access::<rkyv::Archived<Vec<u64>>>()?;
    /// assert_eq!(archived.len(), 3);
    /// assert_eq!(archived[2], 3);
    /// # Ok(()) }
    /// ```
    pub fn access<T>(&self) -> Result<&T>
    where
        T: Portable + for<'a> CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>,
    {
        rkyv::access::<T, rancor::Error>(self.bytes())
            .map_err(|e| StorageError::corrupt(&self.key, CorruptReason::Archive(e.to_string())))
    }
}

/// A worker's state restored from a checkpoint.
#[derive(Debug)]
pub struct RestoredWorker {
    /// The checkpoint restored.
    pub checkpoint: crate::CheckpointId,
    /// The worker.
    pub worker: WorkerId,
    /// The metadata stored beside the state (for example source positions).
    pub metadata: Vec<u8>,
    /// The chunks, in the order the worker wrote them.
    pub chunks: Vec<MappedChunk>,
    /// Bytes downloaded from the store into the cache (0 when everything
    /// was cached or mapped in place).
    pub fetched_bytes: u64,
    /// Chunks served from the cache without download.
    pub cache_hits: usize,
    /// Chunks mapped where they lie in a local-directory store (codec none:
    /// the stored object is a cache file already), neither downloaded nor
    /// cached.
    pub in_place: usize,
    /// Stored bytes of those chunks.
    pub in_place_bytes: u64,
}

impl RestoredWorker {
    /// Bytes this restore read from the store: downloaded into the cache,
    /// or mapped in place (0 when everything came from the cache).
    pub fn read_from_store(&self) -> u64 {
        self.fetched_bytes + self.in_place_bytes
    }
}

/// Where one restored chunk came from.
enum ChunkSource {
    /// The local cache.
    Cache,
    /// The store's own file (this many stored bytes), mapped where it lies.
    InPlace(u64),
    /// Downloaded (this many stored bytes) into the cache.
    Fetched(u64),
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl JobStore {
    /// Restores `worker`'s state of `manifest` into `cache` and maps it.
    /// Chunks already cached with the right CRC are not fetched again; an
    /// uncompressed chunk of a local-directory store is mapped where it
    /// lies (no copy).
    pub async fn restore_worker(
        &self,
        manifest: &Manifest,
        worker: &WorkerId,
        cache: &LocalCache,
    ) -> Result<RestoredWorker> {
        self.restore_into(manifest, worker, cache, true, &|_| false)
            .await
    }

    /// As [`JobStore::restore_worker`], but the chunks for which `held`
    /// says true are neither fetched nor mapped: the caller holds their
    /// content already (decoded, in memory). [`RestoredWorker::chunks`]
    /// then lists only the others, in the order the worker wrote them.
    /// With `cache_all`, every chunk fetched ends up in `cache` (none is
    /// mapped in place, as [`JobStore::cache_worker`]), and each chunk's
    /// pages are dropped from memory once it is checked
    /// ([`MappedChunk::release`]): what a standby restoring ahead wants.
    pub async fn restore_worker_except(
        &self,
        manifest: &Manifest,
        worker: &WorkerId,
        cache: &LocalCache,
        cache_all: bool,
        held: &(dyn Fn(&ChunkRef) -> bool + Sync),
    ) -> Result<RestoredWorker> {
        self.restore_into(manifest, worker, cache, !cache_all, held)
            .await
    }

    /// As [`JobStore::restore_worker`], but every chunk ends up in `cache`
    /// (none is mapped in place): what a hot standby does ahead of its
    /// promotion, so that the promotion reads nothing from the store.
    pub async fn cache_worker(
        &self,
        manifest: &Manifest,
        worker: &WorkerId,
        cache: &LocalCache,
    ) -> Result<RestoredWorker> {
        self.restore_into(manifest, worker, cache, false, &|_| false)
            .await
    }

    async fn restore_into(
        &self,
        manifest: &Manifest,
        worker: &WorkerId,
        cache: &LocalCache,
        in_place_ok: bool,
        held: &(dyn Fn(&ChunkRef) -> bool + Sync),
    ) -> Result<RestoredWorker> {
        let snapshot =
            manifest
                .workers
                .get(worker)
                .ok_or_else(|| StorageError::WorkerNotFound {
                    job: self.job.to_string(),
                    id: manifest.checkpoint,
                    worker: worker.to_string(),
                })?;
        let span = tracing::info_span!("restore", job = %self.job, checkpoint = %manifest.checkpoint, %worker);
        async {
            let mut chunks = Vec::with_capacity(snapshot.chunks.len());
            let mut fetched_bytes = 0;
            let (mut cache_hits, mut in_place, mut in_place_bytes) = (0, 0, 0);
            // `download_concurrency` chunks at once, in order; each streams
            // through a bounded channel (a large remote one as parallel
            // ranged GETs), so memory stays at a few buffers per chunk
            // however large the state.
            // (Owned clones in each future: a future borrowing through the
            // closure is not `Send` for every lifetime, which a spawned
            // worker needs.)
            let wanted: Vec<ChunkRef> = snapshot
                .chunks
                .iter()
                .filter(|c| !held(c))
                .cloned()
                .collect();
            let held_count = snapshot.chunks.len() - wanted.len();
            // Working ahead (a standby, `!in_place_ok`): two chunks at once,
            // and each one's pages dropped as soon as it is checked (the
            // check read them all), so memory holds about two chunks, not
            // every chunk of the checkpoint, until the caller decodes them
            // one by one.
            let ahead = !in_place_ok;
            let concurrency = if ahead {
                self.store.options.download_concurrency.min(2)
            } else {
                self.store.options.download_concurrency
            };
            let mut restored = futures::stream::iter(wanted)
                .map(|chunk| {
                    let (js, cache) = (self.clone(), cache.clone());
                    async move {
                        let restored = js.restore_chunk(&chunk, &cache, in_place_ok).await;
                        if let (true, Ok((mapped, _))) = (ahead, &restored) {
                            mapped.release();
                        }
                        restored
                    }
                })
                .buffered(concurrency);
            while let Some(next) = restored.next().await {
                let (mapped, source) = next?;
                match source {
                    ChunkSource::Cache => cache_hits += 1,
                    ChunkSource::InPlace(n) => {
                        in_place += 1;
                        in_place_bytes += n;
                    }
                    ChunkSource::Fetched(n) => fetched_bytes += n,
                }
                chunks.push(mapped);
            }
            tracing::info!(
                fetched_bytes,
                cache_hits,
                in_place,
                held = held_count,
                "restored"
            );
            Ok(RestoredWorker {
                checkpoint: manifest.checkpoint,
                worker: worker.clone(),
                metadata: snapshot.metadata.clone(),
                chunks,
                fetched_bytes,
                cache_hits,
                in_place,
                in_place_bytes,
            })
        }
        .instrument(span)
        .await
    }

    /// Returns the mapped chunk and how many bytes were downloaded for it.
    async fn restore_chunk(
        &self,
        chunk: &ChunkRef,
        cache: &LocalCache,
        in_place_ok: bool,
    ) -> Result<(MappedChunk, ChunkSource)> {
        let key = self.full_key(&chunk.key);
        let path = cache.path_of(self.job.as_str(), &chunk.key);
        let (raw_len, raw_crc) = (chunk.raw_len, chunk.raw_crc);
        if path.exists() {
            let (p, k) = (path.clone(), key.clone());
            match blocking(move || MappedChunk::open(&p, &k, raw_len, raw_crc)).await? {
                Ok(mapped) => return Ok((mapped, ChunkSource::Cache)),
                Err(e) => tracing::warn!(error = %e, "cached chunk is bad; fetching it again"),
            }
        }
        if let (BackendKind::File { root }, Codec::None, true) =
            (&self.store.kind, chunk.codec, in_place_ok)
        {
            // An uncompressed chunk in a local directory is already what a
            // cache file is (a codec-none frame, written once by rename and
            // never changed): mapped and checked where it lies, no copy.
            let (p, k) = (root.join(&key), key.clone());
            return blocking(move || MappedChunk::open(&p, &k, raw_len, raw_crc))
                .await?
                .map(|mapped| (mapped, ChunkSource::InPlace(chunk.stored_len)));
        }
        let parent = path
            .parent()
            .expect("cache paths have a parent")
            .to_path_buf();
        std::fs::create_dir_all(&parent)
            .map_err(|e| StorageError::io("create cache directory", &parent, e))?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("chunk"),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file =
            File::create(&tmp).map_err(|e| StorageError::io("create cache file", &tmp, e))?;
        // Room for the header, written once the payload is known good.
        file.write_all(&[0u8; HEADER_LEN])
            .map_err(|e| StorageError::io("write cache file", &tmp, e))?;
        let outcome = self
            .read_chunk_into(chunk, BufWriter::with_capacity(1 << 20, file))
            .await;
        let (writer, summary) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let (tmp2, path2, key2) = (tmp.clone(), path.clone(), key.clone());
        let finished = blocking(move || -> Result<MappedChunk> {
            let mut file = writer
                .into_inner()
                .map_err(|e| StorageError::io("write cache file", &tmp2, e.into_error()))?;
            let header = FrameHeader {
                codec: Codec::None,
                kind: FrameKind::Chunk,
                payload_len: summary.raw_len,
                raw_len: summary.raw_len,
                payload_crc: summary.raw_crc,
            };
            file.seek(SeekFrom::Start(0))
                .and_then(|_| file.write_all(&header.encode()))
                .map_err(|e| StorageError::io("write cache file header", &tmp2, e))?;
            drop(file);
            std::fs::rename(&tmp2, &path2)
                .map_err(|e| StorageError::io("rename cache file", &path2, e))?;
            // Every byte written went through the raw CRC on its way in
            // (checked against the manifest above): not read again for it.
            MappedChunk::open_with(&path2, &key2, raw_len, raw_crc, Payload::Checked)
        })
        .await?;
        if finished.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok((finished?, ChunkSource::Fetched(chunk.stored_len)))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::io("blocking task", "", std::io::Error::other(e)))
}
