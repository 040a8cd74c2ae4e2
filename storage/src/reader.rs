//! Reading checkpoints: listing manifests (with the zombie rule of
//! `commit`), the latest one, one by id, the newest one that verifies, and
//! verifying every object of a checkpoint. Chunks are checked as they stream
//! past, on a blocking thread, so a large chunk is never held in memory.

use std::io::{Read, Write};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use tracing::Instrument;

use crate::backend::BackendKind;
use crate::error::{CorruptReason, ErrorKind, Result, StorageError};
use crate::frame::{
    self, CountingSink, FrameHeader, FrameKind, FrameReader, RawSummary, HEADER_LEN,
};
use crate::ids::{CheckpointId, Epoch};
use crate::keys;
use crate::manifest::{ChunkRef, Manifest};
use crate::store::JobStore;

/// What a listed manifest turned out to be.
#[derive(Debug, Clone)]
pub enum CheckpointStatus {
    /// A committed checkpoint that may be restored.
    Committed(Manifest),
    /// Committed by a writer whose epoch had been superseded (a zombie); never
    /// restored.
    Fenced {
        /// The manifest.
        manifest: Manifest,
        /// The higher epoch of an earlier checkpoint that fences it.
        by: Epoch,
    },
    /// The manifest object failed a check.
    Corrupt(CorruptReason),
}

/// One manifest found in the store.
#[derive(Debug, Clone)]
pub struct CheckpointEntry {
    /// The checkpoint id (from the key).
    pub id: CheckpointId,
    /// The manifest's full object key.
    pub key: String,
    /// Size of the manifest object.
    pub manifest_bytes: u64,
    /// What it is.
    pub status: CheckpointStatus,
}

impl CheckpointEntry {
    /// The manifest, if it could be read (committed or fenced).
    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.status {
            CheckpointStatus::Committed(m) | CheckpointStatus::Fenced { manifest: m, .. } => {
                Some(m)
            }
            CheckpointStatus::Corrupt(_) => None,
        }
    }
}

/// The result of checking one object.
#[derive(Debug, Clone)]
pub struct ObjectCheck {
    /// Full object key.
    pub key: String,
    /// Bytes read.
    pub bytes: u64,
    /// What is wrong, or `None` when the object is good.
    pub problem: Option<String>,
}

/// The result of verifying a checkpoint: every object, good or bad.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The checkpoint.
    pub checkpoint: CheckpointId,
    /// Each object checked, manifest first.
    pub objects: Vec<ObjectCheck>,
}

impl VerifyReport {
    /// True when every object is good.
    pub fn is_ok(&self) -> bool {
        self.objects.iter().all(|o| o.problem.is_none())
    }

    /// The bad objects.
    pub fn bad(&self) -> impl Iterator<Item = &ObjectCheck> {
        self.objects.iter().filter(|o| o.problem.is_some())
    }
}

/// A checkpoint passed over while looking for one that verifies.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// Its id.
    pub id: CheckpointId,
    /// Why it was passed over.
    pub reason: String,
}

impl JobStore {
    /// Every manifest of the job, oldest first, each marked committed, fenced
    /// or corrupt. Store failures are errors; corrupt manifests are not.
    pub async fn list(&self) -> Result<Vec<CheckpointEntry>> {
        let mut found: Vec<(CheckpointId, String, u64)> = self
            .list_rel(keys::MANIFESTS)
            .await?
            .into_iter()
            .filter(|(rel, _)| !self.is_withdrawn(rel))
            .filter_map(|(rel, size)| match keys::parse_manifest(&rel) {
                Some(id) => Some((id, rel, size)),
                None => {
                    tracing::warn!(key = %self.full_key(&rel), "ignoring unexpected object among manifests");
                    None
                }
            })
            .collect();
        found.sort_by_key(|(id, _, _)| *id);
        let fetched: Vec<Option<CheckpointEntry>> = futures::stream::iter(found)
            .map(|(id, rel, size)| async move {
                let key = self.full_key(&rel);
                let status = match self.read_manifest(&rel, id).await {
                    Ok(m) => CheckpointStatus::Committed(m),
                    Err(StorageError::Corrupt { reason, .. }) => CheckpointStatus::Corrupt(reason),
                    // Deleted between list and get (retention): not there.
                    Err(StorageError::ObjectNotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e),
                };
                Ok(Some(CheckpointEntry {
                    id,
                    key,
                    manifest_bytes: size,
                    status,
                }))
            })
            .buffered(8)
            .try_collect()
            .await?;
        let mut entries: Vec<CheckpointEntry> = fetched.into_iter().flatten().collect();
        // The zombie rule: epochs never go down along checkpoint ids.
        let mut highest = Epoch(0);
        for entry in &mut entries {
            if let CheckpointStatus::Committed(m) = &entry.status {
                if m.epoch < highest {
                    entry.status = CheckpointStatus::Fenced {
                        manifest: m.clone(),
                        by: highest,
                    };
                } else {
                    highest = m.epoch;
                }
            }
        }
        Ok(entries)
    }

    pub(crate) async fn read_manifest(&self, rel: &str, id: CheckpointId) -> Result<Manifest> {
        let key = self.full_key(rel);
        let bytes = self.get_bytes(rel).await?;
        let json = frame::decode(&key, FrameKind::Manifest, &bytes)?;
        Manifest::from_json(&key, &self.job, id, &json)
    }

    /// The newest committed checkpoint (its manifest only: chunks are checked
    /// when restored or verified).
    pub async fn latest(&self) -> Result<Manifest> {
        self.list()
            .await?
            .into_iter()
            .rev()
            .find_map(|e| match e.status {
                CheckpointStatus::Committed(m) => Some(m),
                _ => None,
            })
            .ok_or_else(|| StorageError::NoCheckpoints {
                job: self.job.to_string(),
                store: self.store.url.clone(),
            })
    }

    /// Manifest `id` alone: checked (frame, checksum, job and id) but
    /// without the zombie rule, which reads every manifest. For a checkpoint
    /// its supervisor announced as committed (a standby following it, a
    /// worker restoring it); [`JobStore::manifest`] decides that itself.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), lazarus_storage::StorageError> {
    /// use lazarus_storage::*;
    /// let job = CheckpointStore::open("memory://")?.job(JobId::new("j")?);
    /// job.commit(&Manifest::new(job.job().clone(), CheckpointId(1), Epoch(1))).await?;
    /// assert_eq!(job.manifest_only(CheckpointId(1)).await?.checkpoint, CheckpointId(1));
    /// assert!(job.manifest_only(CheckpointId(2)).await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn manifest_only(&self, id: CheckpointId) -> Result<Manifest> {
        match self.read_manifest(&keys::manifest(id), id).await {
            Err(StorageError::ObjectNotFound { .. }) => Err(StorageError::CheckpointNotFound {
                job: self.job.to_string(),
                id,
            }),
            r => r,
        }
    }

    /// The committed checkpoint `id`.
    pub async fn manifest(&self, id: CheckpointId) -> Result<Manifest> {
        let entry = self
            .list()
            .await?
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| StorageError::CheckpointNotFound {
                job: self.job.to_string(),
                id,
            })?;
        match entry.status {
            CheckpointStatus::Committed(m) => Ok(m),
            CheckpointStatus::Fenced { manifest, by } => Err(StorageError::Fenced {
                job: self.job.to_string(),
                attempted: manifest.epoch,
                current: by,
            }),
            CheckpointStatus::Corrupt(reason) => Err(StorageError::Corrupt {
                key: entry.key,
                reason,
            }),
        }
    }

    /// The newest checkpoint whose every object verifies, and the newer ones
    /// passed over with the reason for each.
    pub async fn newest_verified(&self) -> Result<(Manifest, Vec<Skipped>)> {
        let mut skipped = Vec::new();
        for entry in self.list().await?.into_iter().rev() {
            match entry.status {
                CheckpointStatus::Committed(m) => {
                    let report = self.verify(&m).await?;
                    if report.is_ok() {
                        for s in &skipped {
                            tracing::warn!(job = %self.job, skipped = ?s, "fell back past a bad checkpoint");
                        }
                        return Ok((m, skipped));
                    }
                    let reason = report
                        .bad()
                        .map(|o| format!("{}: {}", o.key, o.problem.as_deref().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join("; ");
                    skipped.push(Skipped {
                        id: entry.id,
                        reason,
                    });
                }
                CheckpointStatus::Fenced { by, .. } => skipped.push(Skipped {
                    id: entry.id,
                    reason: format!("fenced by epoch {by}"),
                }),
                CheckpointStatus::Corrupt(reason) => skipped.push(Skipped {
                    id: entry.id,
                    reason: format!("{}: {reason}", entry.key),
                }),
            }
        }
        Err(StorageError::NoCheckpoints {
            job: self.job.to_string(),
            store: self.store.url.clone(),
        })
    }

    /// Reads every object of `manifest` and checks it: frame, CRCs, and that
    /// it matches what the manifest recorded. Store failures are errors;
    /// bad objects are reported, not raised.
    pub async fn verify(&self, manifest: &Manifest) -> Result<VerifyReport> {
        let span =
            tracing::info_span!("verify", job = %self.job, checkpoint = %manifest.checkpoint);
        self.verify_objects(manifest).instrument(span).await
    }

    async fn verify_objects(&self, manifest: &Manifest) -> Result<VerifyReport> {
        let manifest_rel = keys::manifest(manifest.checkpoint);
        let mut objects = vec![ObjectCheck {
            key: self.full_key(&manifest_rel),
            bytes: manifest.to_json().len() as u64,
            problem: None,
        }];
        let checks: Vec<ObjectCheck> = futures::stream::iter(manifest.chunks().cloned())
            .map(|chunk| async move {
                let key = self.full_key(&chunk.key);
                match self.read_chunk_into(&chunk, std::io::sink()).await {
                    Ok(_) => Ok(ObjectCheck {
                        key,
                        bytes: chunk.stored_len,
                        problem: None,
                    }),
                    Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound) => {
                        Ok(ObjectCheck {
                            key,
                            bytes: 0,
                            problem: Some(match e {
                                StorageError::Corrupt { reason, .. } => reason.to_string(),
                                other => other.to_string(),
                            }),
                        })
                    }
                    Err(e) => Err(e),
                }
            })
            .buffered(self.store.options.upload_concurrency)
            .try_collect()
            .await?;
        objects.extend(checks);
        Ok(VerifyReport {
            checkpoint: manifest.checkpoint,
            objects,
        })
    }

    /// Streams the chunk from the store through a [`FrameReader`] into
    /// `sink`, then checks it against the manifest's record. The sink's bytes
    /// are usable only if this returns `Ok`.
    pub(crate) async fn read_chunk_into<W: Write + Send + 'static>(
        &self,
        chunk: &ChunkRef,
        sink: W,
    ) -> Result<(W, RawSummary)> {
        let key = self.full_key(&chunk.key);
        let checked = match &self.store.kind {
            BackendKind::File { root } => {
                // A local directory is read directly in large blocks: the
                // generic object_store stream hands out 8 KiB pieces, each
                // behind its own blocking task, which caps restore at a few
                // hundred MiB/s.
                let path = root.join(&key);
                let key = key.clone();
                tokio::task::spawn_blocking(move || check_file(&path, &key, sink))
                    .await
                    .map_err(|e| {
                        StorageError::io("check task", &chunk.key, std::io::Error::other(e))
                    })??
            }
            BackendKind::Remote => {
                self.check_stream(&key, &chunk.key, chunk.stored_len, sink)
                    .await?
            }
        };
        let (header, sink) = checked;
        let mismatch = |field, expected: u64, actual: u64| {
            Err(StorageError::corrupt(
                &key,
                CorruptReason::ManifestMismatch {
                    field,
                    expected,
                    actual,
                },
            ))
        };
        if header.payload_len + HEADER_LEN as u64 != chunk.stored_len {
            return mismatch(
                "object length",
                chunk.stored_len,
                header.payload_len + HEADER_LEN as u64,
            );
        }
        if header.payload_crc != chunk.stored_crc {
            return mismatch(
                "stored CRC",
                chunk.stored_crc.into(),
                header.payload_crc.into(),
            );
        }
        if header.codec != chunk.codec {
            return Err(StorageError::corrupt(
                &key,
                CorruptReason::Manifest(format!(
                    "codec is {}, manifest says {}",
                    header.codec, chunk.codec
                )),
            ));
        }
        let summary = sink.summary();
        if summary.raw_len != chunk.raw_len {
            return mismatch("raw length", chunk.raw_len, summary.raw_len);
        }
        if summary.raw_crc != chunk.raw_crc {
            return mismatch("raw CRC", chunk.raw_crc.into(), summary.raw_crc.into());
        }
        Ok((sink.into_inner(), summary))
    }

    /// Streams an object from a remote store through a [`FrameReader`] on a
    /// blocking thread; the channel bound keeps a few buffers in memory.
    /// The object `rel` (expected `len` bytes) as a stream of buffers in
    /// order. Larger than `range_size`: `download_concurrency` ranged GETs
    /// in flight (one GET stream is bound by one connection's window); a
    /// shorter object fails its range, a longer one is read only up to
    /// `len` (the frame check then names what is wrong).
    async fn object_stream(
        &self,
        rel: &str,
        len: u64,
    ) -> Result<futures::stream::BoxStream<'static, Result<bytes::Bytes>>> {
        let key = self.full_key(rel);
        let path = self.path(rel);
        let store = self.store.object_store.clone();
        let (range, parallel) = (
            self.store.options.range_size,
            self.store.options.download_concurrency,
        );
        if len <= range || parallel < 2 {
            let result = store
                .get(&path)
                .await
                .map_err(|e| StorageError::backend("get", &key, e))?;
            return Ok(result
                .into_stream()
                .map(move |b| b.map_err(|e| StorageError::backend("read", &key, e)))
                .boxed());
        }
        let ranges = (0..len.div_ceil(range)).map(move |i| i * range..((i + 1) * range).min(len));
        Ok(futures::stream::iter(ranges)
            .map(move |r| {
                let (store, path, key) = (store.clone(), path.clone(), key.clone());
                async move {
                    let first = r.start == 0;
                    let opts = object_store::GetOptions::new().with_range(Some(r));
                    let got = store
                        .get_opts(&path, opts)
                        .await
                        .map_err(|e| StorageError::backend("get range", &key, e))?;
                    // The first range (yielded first) says the object's size:
                    // one cut short or grown is named as such, not as a
                    // failed range request further on.
                    if first && got.meta.size != len {
                        return Err(StorageError::corrupt(
                            &key,
                            CorruptReason::ManifestMismatch {
                                field: "object length",
                                expected: len,
                                actual: got.meta.size,
                            },
                        ));
                    }
                    got.bytes()
                        .await
                        .map_err(|e| StorageError::backend("read range", &key, e))
                }
            })
            .buffered(parallel)
            .boxed())
    }

    /// Reads a chunk's stored object with no frame check: the baseline a
    /// restore is measured against (`lazarus storage bench`). A local
    /// directory's file is read and CRC'd in 1 MiB blocks; a remote object
    /// is fetched as a restore fetches it (parallel ranged GETs). Returns
    /// the bytes read.
    pub async fn read_raw(&self, chunk: &ChunkRef) -> Result<u64> {
        let key = self.full_key(&chunk.key);
        match &self.store.kind {
            BackendKind::File { root } => {
                let path = root.join(&key);
                tokio::task::spawn_blocking(move || {
                    let mut f = std::fs::File::open(&path)
                        .map_err(|e| StorageError::io("open", &path, e))?;
                    let mut buf = vec![0u8; 1 << 20];
                    let (mut n, mut crc) = (0u64, crc32fast::Hasher::new());
                    loop {
                        let got = f
                            .read(&mut buf)
                            .map_err(|e| StorageError::io("read", &path, e))?;
                        if got == 0 {
                            break;
                        }
                        crc.update(&buf[..got]);
                        n += got as u64;
                    }
                    std::hint::black_box(crc.finalize());
                    Ok(n)
                })
                .await
                .map_err(|e| StorageError::io("read task", &key, std::io::Error::other(e)))?
            }
            BackendKind::Remote => {
                let mut stream = self.object_stream(&chunk.key, chunk.stored_len).await?;
                let mut n = 0;
                while let Some(buf) = stream.next().await {
                    n += buf?.len() as u64;
                }
                Ok(n)
            }
        }
    }

    async fn check_stream<W: Write + Send + 'static>(
        &self,
        key: &str,
        rel: &str,
        len: u64,
        sink: W,
    ) -> Result<(FrameHeader, CountingSink<W>)> {
        let mut stream = self.object_stream(rel, len).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let checker_key = key.to_string();
        let checker = tokio::task::spawn_blocking(move || {
            let mut reader = FrameReader::new(&checker_key, FrameKind::Chunk, sink);
            while let Some(buf) = rx.blocking_recv() {
                reader.update(&buf)?;
            }
            reader.finish()
        });
        let mut stream_error = None;
        while let Some(next) = stream.next().await {
            match next {
                Ok(buf) => {
                    if tx.send(buf).await.is_err() {
                        break; // the checker failed; its error is the one to report
                    }
                }
                Err(e) => {
                    stream_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let checked = checker
            .await
            .map_err(|e| StorageError::io("check task", key, std::io::Error::other(e)))?;
        if let Some(e) = stream_error {
            return Err(e);
        }
        checked
    }
}

/// Reads a local object file through a [`FrameReader`] in 1 MiB blocks.
fn check_file<W: Write>(
    path: &std::path::Path,
    key: &str,
    sink: W,
) -> Result<(FrameHeader, CountingSink<W>)> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StorageError::ObjectNotFound {
                key: key.to_string(),
            })
        }
        Err(e) => return Err(StorageError::io("open", path, e)),
    };
    let mut reader = FrameReader::new(key, FrameKind::Chunk, sink);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| StorageError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        reader.update(&buf[..n])?;
    }
    reader.finish()
}
