//! Retention: keep the newest N committed checkpoints and delete what no
//! retained checkpoint needs.
//!
//! Invariants:
//! - A chunk referenced by any retained manifest is never deleted (chunks
//!   may be shared across checkpoints: incremental checkpoints).
//! - A chunk written by a checkpoint newer than the newest committed one is
//!   never deleted: that checkpoint may still be in progress and commit it.
//!   The runtime bases an in-progress checkpoint's incremental references on
//!   the newest committed manifest, which is always retained (N >= 1), so
//!   every chunk an in-progress checkpoint can reference survives.
//! - Corrupt manifests are left where they are (an operator may want them);
//!   their chunks are garbage once older than the newest committed checkpoint.
//! - Manifests are deleted before the chunks they reference, so a reader never
//!   finds a manifest whose chunks are gone because of retention.
//! - A checkpoint pinned by a savepoint is never deleted, nor any chunk it
//!   references. A savepoint that cannot be read fails the pass (nothing is
//!   deleted): retention must not guess what it pinned.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use tracing::Instrument;

use crate::error::{Result, StorageError};
use crate::ids::CheckpointId;
use crate::keys;
use crate::reader::CheckpointStatus;
use crate::store::JobStore;

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Checkpoints kept, oldest first.
    pub retained: Vec<CheckpointId>,
    /// Older checkpoints kept because a savepoint pins them, oldest first.
    pub pinned: Vec<CheckpointId>,
    /// Manifests deleted (committed ones past retention, and fenced ones).
    pub deleted_manifests: Vec<CheckpointId>,
    /// Chunk objects deleted.
    pub deleted_chunks: usize,
    /// Bytes of chunk objects deleted.
    pub deleted_bytes: u64,
    /// Chunk objects kept because a newer checkpoint may be in progress.
    pub kept_in_progress: usize,
    /// Keys (relative to the job root) of every chunk the retained
    /// checkpoints reference, for pruning local caches by the same rule.
    pub referenced: HashSet<String>,
}

impl JobStore {
    /// Keeps the newest `keep` committed checkpoints and deletes older
    /// manifests and every chunk no retained manifest references.
    pub async fn gc(&self, keep: usize) -> Result<GcReport> {
        if keep == 0 {
            return Err(StorageError::InvalidArgument {
                what: "keep",
                reason: "must be at least 1: the newest checkpoint is what recovery restores"
                    .into(),
            });
        }
        let span = tracing::info_span!("gc", job = %self.job, keep);
        self.gc_pass(keep).instrument(span).await
    }

    async fn gc_pass(&self, keep: usize) -> Result<GcReport> {
        let pins: HashSet<CheckpointId> = self
            .savepoints()
            .await?
            .into_iter()
            .map(|s| s.checkpoint)
            .collect();
        let entries = self.list().await?;
        let committed: Vec<_> = entries
            .iter()
            .filter_map(|e| match &e.status {
                CheckpointStatus::Committed(m) => Some(m),
                _ => None,
            })
            .collect();
        let Some(newest) = committed.last().map(|m| m.checkpoint) else {
            // Nothing committed: nothing is known to be garbage.
            return Ok(GcReport::default());
        };
        let retained = &committed[committed.len().saturating_sub(keep)..];
        let oldest_retained = retained[0].checkpoint;
        let pinned: Vec<&&crate::Manifest> = committed
            .iter()
            .filter(|m| m.checkpoint < oldest_retained && pins.contains(&m.checkpoint))
            .collect();
        let referenced: HashSet<&str> = retained
            .iter()
            .chain(pinned.iter().copied())
            .flat_map(|m| m.chunks())
            .map(|c| c.key.as_str())
            .collect();

        let mut report = GcReport {
            retained: retained.iter().map(|m| m.checkpoint).collect(),
            pinned: pinned.iter().map(|m| m.checkpoint).collect(),
            referenced: referenced.iter().map(|k| k.to_string()).collect(),
            ..GcReport::default()
        };
        // 1. Manifests older than the oldest retained one (committed past
        //    retention, or fenced zombies); corrupt ones stay.
        for entry in &entries {
            let deletable = entry.id < oldest_retained
                && match entry.status {
                    CheckpointStatus::Committed(_) => !pins.contains(&entry.id),
                    CheckpointStatus::Fenced { .. } => true,
                    CheckpointStatus::Corrupt(_) => false,
                };
            let zombie_newer = entry.id > oldest_retained
                && matches!(entry.status, CheckpointStatus::Fenced { .. });
            if deletable || zombie_newer {
                self.delete_rel(&keys::manifest(entry.id)).await?;
                report.deleted_manifests.push(entry.id);
            }
        }
        // 2. Chunks nobody retained references, written by checkpoints no
        //    newer than the newest committed one.
        let mut doomed = Vec::new();
        for (rel, size) in self.list_rel(keys::CHUNKS).await? {
            if referenced.contains(rel.as_str()) {
                continue;
            }
            match keys::parse_chunk(&rel) {
                Some(writer) if writer > newest => report.kept_in_progress += 1,
                Some(_) => {
                    report.deleted_bytes += size;
                    doomed.push(rel);
                }
                None => {
                    tracing::warn!(key = %self.full_key(&rel), "leaving unexpected object among chunks")
                }
            }
        }
        report.deleted_chunks = doomed.len();
        futures::stream::iter(doomed)
            .map(|rel| async move { self.delete_rel(&rel).await })
            .buffer_unordered(self.store.options.upload_concurrency.max(4))
            .try_collect::<Vec<()>>()
            .await?;
        tracing::info!(?report, "retention pass done");
        Ok(report)
    }

    /// Deletes checkpoint `id`: its manifest, then the chunks it wrote that
    /// no other manifest references. For throwaway checkpoints (benchmarks).
    pub async fn delete_checkpoint(&self, id: CheckpointId) -> Result<()> {
        let entries = self.list().await?;
        self.delete_rel(&keys::manifest(id)).await?;
        let others: HashSet<String> = entries
            .iter()
            .filter(|e| e.id != id)
            .filter_map(|e| e.manifest())
            .flat_map(|m| m.chunks().map(|c| c.key.clone()))
            .collect();
        for (rel, _) in self.list_rel(&keys::chunk_dir(id)).await? {
            if !others.contains(&rel) {
                self.delete_rel(&rel).await?;
            }
        }
        Ok(())
    }
}
