//! The job's storage work, off the decision loop: manifest commits and epoch
//! claims in order in one task, retention passes in a task of their own.
//! Each result comes back to the shell as a controller [`Fact`], so a slow
//! store never delays handling a worker's exit or heartbeat.
//!
//! Commits run in order in a task of their own; a claim runs beside them,
//! so a recovery does not wait for a commit's sync. The store orders the
//! two (`JobStore`'s fence, rule 5 in `lazarus_storage::commit`): a claim
//! finds each commit of the failed attempt decided, its manifest visible
//! (the newest the claim reports, perhaps not yet durable: the controller
//! then holds the sinks until [`Fact::CommitDone`]) or fenced.
//! Retention may overlap a commit: it never deletes a chunk newer than the
//! newest committed checkpoint nor one a retained manifest references
//! (`lazarus_storage::retention`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use lazarus_storage::{ErrorKind, JobStore, LocalCache, Manifest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::controller::Fact;
use lazarus_storage::Epoch;

/// A piece of storage work.
#[derive(Debug)]
pub enum StorageRequest {
    /// Commit this manifest.
    Commit(Box<Manifest>),
    /// Claim this epoch, then read the newest committed checkpoint.
    ClaimEpoch(Epoch),
    /// Run retention keeping this many committed checkpoints.
    Retention(usize),
}

/// Handle to the job's storage tasks.
#[derive(Debug, Clone)]
pub struct StorageWorker {
    queue: mpsc::UnboundedSender<StorageRequest>,
}

impl StorageWorker {
    /// Starts the storage tasks for `js` in `tracker`; results go to `facts`.
    /// `local_cache` is this process's cache directory (pruned after each
    /// retention pass), if workers run here.
    pub fn start(
        js: JobStore,
        local_cache: Option<PathBuf>,
        facts: mpsc::UnboundedSender<Fact>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> StorageWorker {
        let (queue, mut rx) = mpsc::unbounded_channel::<StorageRequest>();
        let (commits, mut commit_rx) = mpsc::unbounded_channel::<Box<Manifest>>();
        {
            let (js, facts, cancel) = (js.clone(), facts.clone(), cancel.clone());
            tracker.spawn(async move {
                while let Some(manifest) = next(&mut commit_rx, &cancel).await {
                    let _ = facts.send(commit(&js, &manifest).await);
                }
            });
        }
        let inner = tracker.clone();
        tracker.spawn(async move {
            while let Some(req) = next(&mut rx, &cancel).await {
                match req {
                    StorageRequest::Commit(manifest) => {
                        let _ = commits.send(manifest);
                    }
                    StorageRequest::ClaimEpoch(epoch) => {
                        let fact = claim(&js, epoch).await;
                        let claimed = matches!(fact, Fact::EpochClaimed { .. });
                        let _ = facts.send(fact);
                        // Made durable now, while the recovery restores; a
                        // commit under it syncs it first if this has not
                        // (or failed: that commit then fails with the reason).
                        if claimed {
                            let watch = crate::clock::Stopwatch::start();
                            match js.make_claim_durable(epoch).await {
                                Ok(()) => tracing::debug!(%epoch, us = watch.elapsed().as_micros() as u64, "epoch claim durable"),
                                Err(e) => tracing::warn!(%epoch, error = %e, "making the epoch claim durable failed; the next commit tries again"),
                            }
                        }
                    }
                    StorageRequest::Retention(keep) => {
                        let (js, facts, cache) = (js.clone(), facts.clone(), local_cache.clone());
                        inner.spawn(async move {
                            let retained = retention(&js, keep, cache).await;
                            let _ = facts.send(Fact::RetentionDone { retained });
                        });
                    }
                }
            }
        });
        StorageWorker { queue }
    }

    /// Queues `req`.
    pub fn send(&self, req: StorageRequest) {
        let _ = self.queue.send(req);
    }
}

/// The next item of `rx`; `None` once it is closed or `cancel` fires.
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, cancel: &CancellationToken) -> Option<T> {
    tokio::select! {
        item = rx.recv() => item,
        _ = cancel.cancelled() => None,
    }
}

async fn commit(js: &JobStore, manifest: &Manifest) -> Fact {
    let checkpoint = manifest.checkpoint;
    let epoch = manifest.epoch;
    let span = tracing::info_span!("checkpoint", %checkpoint, %epoch);
    match js.commit(manifest).instrument(span).await {
        Ok(()) => Fact::CommitDone {
            checkpoint,
            epoch,
            stored_bytes: manifest.stored_bytes(),
        },
        Err(e) if e.kind() == ErrorKind::Fenced => Fact::CommitFenced {
            checkpoint,
            epoch,
            error: e.to_string(),
        },
        Err(e) => Fact::CommitFailed {
            checkpoint,
            epoch,
            error: e.to_string(),
        },
    }
}

/// Claims `epoch` and reads the newest committed checkpoint. The claim is
/// visible (it fences) when this returns, not yet durable: the caller makes
/// it durable next, while the recovery restores (the first commit under it
/// waits for that).
async fn claim(js: &JobStore, epoch: Epoch) -> Fact {
    let span = tracing::info_span!("claim_epoch", %epoch);
    async {
        let watch = crate::clock::Stopwatch::start();
        let claim = match js.claim_epoch_visible(epoch).await {
            Ok(claim) => claim,
            Err(e) if e.kind() == ErrorKind::Fenced => {
                return Fact::EpochFenced {
                    error: e.to_string(),
                }
            }
            Err(e) => {
                return Fact::StorageFailed {
                    error: e.to_string(),
                }
            }
        };
        let claimed = watch.elapsed();
        let latest = js.latest_after_claim(&claim).await;
        tracing::info!(
            claim_us = claimed.as_micros() as u64,
            latest_us = (watch.elapsed() - claimed).as_micros() as u64,
            "epoch claimed"
        );
        match latest {
            Ok(latest) => Fact::EpochClaimed { epoch, latest },
            Err(e) => Fact::StorageFailed {
                error: format!("reading the latest checkpoint: {e}"),
            },
        }
    }
    .instrument(span)
    .await
}

/// Retention in the store, then in this host's local cache. Failures are
/// logged and retried at the next pass: they cost space, not data.
async fn retention(
    js: &JobStore,
    keep: usize,
    cache: Option<PathBuf>,
) -> Option<(lazarus_storage::CheckpointId, Arc<HashSet<String>>)> {
    let span = tracing::info_span!("retention", keep);
    let report = match js.gc(keep).instrument(span).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "retention pass failed; will retry at the next pass");
            return None;
        }
    };
    let newest = report.retained.last().copied()?;
    let referenced = Arc::new(report.referenced);
    if let Some(dir) = cache {
        let (job, refs) = (js.job().clone(), referenced.clone());
        let pruned = tokio::task::spawn_blocking(move || {
            LocalCache::new(&dir).and_then(|c| c.prune(&job, &refs, newest))
        })
        .await;
        match pruned {
            Ok(Ok(n)) => tracing::debug!(deleted = n, "local cache pruned"),
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning the local cache failed"),
            Err(e) => tracing::warn!(error = %e, "cache pruning task failed"),
        }
    }
    Some((newest, referenced))
}

/// Makes `from` (a savepoint's name or a committed checkpoint's id) what a
/// new run restores: if it is not the newest committed checkpoint, a copy
/// of its manifest (the same chunk references, this run's `epoch`) is
/// committed as the next id, so recovery, retention and fencing keep
/// working on "the newest committed checkpoint". Returns the checkpoint the
/// run restores.
pub async fn start_from(
    js: &JobStore,
    from: &str,
    epoch: Epoch,
) -> anyhow::Result<lazarus_storage::CheckpointId> {
    use anyhow::Context as _;
    let span = tracing::info_span!("start_from", from, %epoch);
    async {
        let source = js
            .resolve_start(from)
            .await
            .with_context(|| format!("--from {from}"))?;
        let latest = js.latest().await.context("reading the latest checkpoint")?;
        if latest.checkpoint == source.checkpoint {
            tracing::info!(checkpoint = %source.checkpoint, "starting from the newest checkpoint");
            return Ok(source.checkpoint);
        }
        let mut copy = Manifest::new(js.job().clone(), latest.checkpoint.next(), epoch);
        copy.workers = source.workers;
        js.commit(&copy).await.with_context(|| {
            format!(
                "committing checkpoint {} as a copy of {} (--from {from})",
                copy.checkpoint, source.checkpoint
            )
        })?;
        tracing::info!(source = %source.checkpoint, copy = %copy.checkpoint, "starting from an older checkpoint: committed a copy of it");
        Ok(copy.checkpoint)
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazarus_storage::{CheckpointId, CheckpointStore, Codec, JobId, WorkerId, WorkerSnapshot};

    async fn commit(js: &JobStore, id: u64, epoch: u64, data: &[u8]) -> Manifest {
        let w = WorkerId::new("counter-0").expect("worker");
        let chunk = js
            .write_chunk(
                CheckpointId(id),
                &w,
                "kg-0",
                data.to_vec().into(),
                Codec::None,
            )
            .await
            .expect("chunk");
        let mut m = Manifest::new(js.job().clone(), CheckpointId(id), Epoch(epoch));
        m.workers.insert(
            w,
            WorkerSnapshot {
                chunks: vec![chunk],
                metadata: format!("pos-{id}").into_bytes(),
            },
        );
        js.commit(&m).await.expect("commit");
        m
    }

    #[tokio::test]
    async fn test_start_from_an_older_savepoint_commits_a_copy_as_the_newest() {
        let js = CheckpointStore::open("memory://")
            .expect("store")
            .job(JobId::new("j").expect("job"));
        let first = commit(&js, 1, 1, b"one").await;
        commit(&js, 2, 1, b"two").await;
        commit(&js, 3, 1, b"three").await;
        js.create_savepoint("sp", CheckpointId(1))
            .await
            .expect("savepoint");
        // The newest: nothing copied.
        assert_eq!(
            start_from(&js, "3", Epoch(2)).await.expect("newest"),
            CheckpointId(3)
        );
        // An older one: a copy, with the new epoch, becomes the newest.
        js.claim_epoch(Epoch(2)).await.expect("claim");
        let id = start_from(&js, "sp", Epoch(2))
            .await
            .expect("from savepoint");
        assert_eq!(id, CheckpointId(4));
        let latest = js.latest().await.expect("latest");
        assert_eq!(latest.checkpoint, CheckpointId(4));
        assert_eq!(latest.epoch, Epoch(2));
        assert_eq!(
            latest.workers, first.workers,
            "the savepoint's state, by reference"
        );
        assert!(js.verify(&latest).await.expect("verify").is_ok());
        // Unknown names and ids are refused, naming them.
        let e = start_from(&js, "nope", Epoch(2))
            .await
            .expect_err("unknown");
        assert!(
            format!("{e:#}").contains("no savepoint named \"nope\""),
            "{e:#}"
        );
        let e = start_from(&js, "99", Epoch(2))
            .await
            .expect_err("unknown id");
        assert!(
            format!("{e:#}").contains("checkpoint 99 is not committed"),
            "{e:#}"
        );
        let e = start_from(&js, "a/b", Epoch(2))
            .await
            .expect_err("bad name");
        assert!(
            format!("{e:#}").contains("neither a checkpoint id nor a savepoint name"),
            "{e:#}"
        );
    }
}
