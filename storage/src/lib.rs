//! Lazarus checkpoint storage.
//!
//! Every stored object is a *frame* (a fixed, CRC-protected header and a
//! payload aligned for rkyv; see `docs/format.md`). A worker writes its state
//! as chunks; a *manifest* written last, with a create-if-absent put carrying
//! the writer's epoch, commits the checkpoint. Restore maps chunks from a
//! local cache and reads them in place.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | `ids` | typed identities: [`JobId`], [`WorkerId`], [`CheckpointId`], [`Epoch`] |
//! | `error` | [`StorageError`] and the caller-facing [`ErrorKind`] |
//! | `frame` | the frame format: header, encode, streaming check and decode |
//! | `keys` | object key layout and parsing (incremental-friendly chunk keys) |
//! | `manifest` | [`Manifest`], [`ChunkRef`], [`WorkerSnapshot`] and their validation |
//! | `backend` | URL → object_store backend (`file://`, `s3://`, `memory://`), [`StoreOptions`] |
//! | `store` | [`CheckpointStore`] and [`JobStore`]: one store, one job in it |
//! | `writer` | writing chunks (single put or multipart) |
//! | `commit` | committing manifests, epoch claims, fencing |
//! | `reader` | listing, latest, by id, newest that verifies, verify |
//! | `cache` | restore into a local cache, [`MappedChunk`] with rkyv access |
//! | `retention` | keep-N garbage collection (savepoints excepted) |
//! | `savepoint` | [`Savepoint`]: named checkpoints retention never deletes; `--from` resolution |
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), lazarus_storage::StorageError> {
//! use lazarus_storage::*;
//! let job = CheckpointStore::open("memory://")?.job(JobId::new("wordcount")?);
//! let worker = WorkerId::new("counter-0")?;
//! let chunk = job
//!     .write_chunk(CheckpointId(1), &worker, "kg-0", b"counts".to_vec().into(), Codec::Zstd)
//!     .await?;
//! let mut manifest = Manifest::new(job.job().clone(), CheckpointId(1), Epoch(1));
//! manifest.workers.insert(worker.clone(), WorkerSnapshot { chunks: vec![chunk], metadata: b"offset=42".to_vec() });
//! job.commit(&manifest).await?;
//!
//! let latest = job.latest().await?;
//! assert!(job.verify(&latest).await?.is_ok());
//! let cache = LocalCache::new(tempfile::tempdir().expect("dir").keep())?;
//! let restored = job.restore_worker(&latest, &worker, &cache).await?;
//! assert_eq!(restored.chunks[0].bytes(), b"counts");
//! assert_eq!(restored.metadata, b"offset=42");
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod backend;
mod cache;
mod commit;
mod error;
pub mod frame;
mod ids;
mod keys;
mod manifest;
mod reader;
mod retention;
mod savepoint;
mod store;
mod writer;

pub use backend::StoreOptions;
pub use cache::{LocalCache, MappedChunk, RestoredWorker};
pub use commit::Claim;
pub use error::{CorruptReason, ErrorKind, Result, StorageError};
pub use frame::Codec;
pub use ids::{CheckpointId, Epoch, JobId, WorkerId};
pub use manifest::{ChunkRef, Manifest, WorkerSnapshot, MANIFEST_FORMAT};
pub use reader::{CheckpointEntry, CheckpointStatus, ObjectCheck, Skipped, VerifyReport};
pub use retention::GcReport;
pub use savepoint::Savepoint;
pub use store::{CheckpointStore, JobStore};
pub use writer::start_writeback;

/// Re-exported so worker code and tests use the same rkyv as the store.
pub use rkyv;
