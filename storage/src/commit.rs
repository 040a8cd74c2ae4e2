//! Committing a checkpoint, and fencing.
//!
//! The rules (also in `docs/format.md`):
//! 1. A writer claims its epoch by creating `epochs/<epoch>` (create-if-absent;
//!    finding it already there is fine: the same supervisor, a retry).
//! 2. Before writing a manifest it lists the epoch markers; if any is higher
//!    than its own it is **fenced** and writes nothing.
//! 3. The manifest is written with a create-if-absent put. Of writers racing
//!    on one checkpoint id exactly one wins; a loser learns whether it lost to
//!    a higher epoch (fenced) or to a peer (already committed).
//! 4. Steps 2 and 3 are not one atomic step, so a writer that checked before a
//!    newer epoch claimed the job can still land a manifest afterwards.
//!    Readers close that gap: a manifest whose epoch is lower than the epoch
//!    of a manifest with a smaller id is a zombie's and is never restored
//!    (see `reader`).
//! 5. Within one handle (and its clones) the gap is closed: a claim's marker
//!    put and each commit's final check and manifest put hold one lock, so
//!    a claim finds every commit of the handle decided: its manifest visible
//!    (perhaps not yet durable) or about to be fenced. A recovery in the
//!    same supervisor therefore claims without waiting for a commit's sync.

use object_store::PutPayload;
use tracing::Instrument;

use crate::error::{ErrorKind, Result, StorageError};
use crate::frame::{self, Codec, FrameKind};
use crate::ids::{CheckpointId, Epoch};
use crate::keys;
use crate::manifest::Manifest;
use crate::store::JobStore;

/// What a handle's claims and commits share (rule 5).
#[derive(Debug, Default)]
pub(crate) struct Fence {
    /// The highest epoch claimed through the handle.
    claimed: u64,
    /// The last manifest the handle put (id, epoch).
    last_put: Option<(CheckpointId, Epoch)>,
}

/// What a claim found ([`JobStore::claim_epoch_visible`]); hand it to
/// [`JobStore::latest_after_claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The epoch claimed.
    pub epoch: Epoch,
    /// This call created the marker (`false`: it was there already, a
    /// retry or a writer that claimed the same epoch).
    pub created: bool,
    /// The highest other epoch listed right after the marker was put
    /// (`Epoch(0)`: none); below `epoch`, or the claim was fenced.
    pub highest_other: Epoch,
}

impl JobStore {
    /// Claims `epoch` for this job: from now on commits with a lower epoch
    /// are fenced. Fails with [`StorageError::Fenced`] if a higher epoch has
    /// claimed the job already. A supervisor calls this when it takes over.
    /// The claim is durable when this returns.
    pub async fn claim_epoch(&self, epoch: Epoch) -> Result<()> {
        self.claim_epoch_visible(epoch).await?;
        self.make_claim_durable(epoch).await
    }

    /// [`JobStore::claim_epoch`] without waiting for the claim to be
    /// durable: the marker is visible to every writer (so it fences them)
    /// when this returns, and durable against a power loss only after
    /// [`JobStore::make_claim_durable`]. A recovery restores meanwhile;
    /// this handle's first commit under `epoch` makes the claim durable
    /// before its manifest, so no checkpoint of the epoch outlives its
    /// claim.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), lazarus_storage::StorageError> {
    /// use lazarus_storage::*;
    /// let job = CheckpointStore::open("memory://")?.job(JobId::new("j")?);
    /// let claim = job.claim_epoch_visible(Epoch(2)).await?;
    /// assert!(claim.created);
    /// assert_eq!(job.latest_after_claim(&claim).await?, None, "nothing committed yet");
    /// job.make_claim_durable(Epoch(2)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn claim_epoch_visible(&self, epoch: Epoch) -> Result<Claim> {
        let rel = keys::epoch_marker(epoch);
        let body = serde_json::to_vec(&serde_json::json!({ "epoch": epoch.0 }))
            .expect("a json value always serializes");
        let encoded = frame::encode(FrameKind::EpochMarker, Codec::None, 1, body.into())?;
        let created = {
            // Rule 5: no commit of this handle is between its check and its put.
            let mut fence = self.fence.lock().await;
            let created = match self
                .put_small(&rel, PutPayload::from(encoded.to_vec()), true)
                .await
            {
                Ok(()) => true,
                Err(object_store::Error::AlreadyExists { .. }) => false,
                Err(e) => return Err(StorageError::backend("put", self.full_key(&rel), e)),
            };
            fence.claimed = fence.claimed.max(epoch.0);
            created
        };
        let highest_other = self.unfenced(epoch).await?;
        Ok(Claim {
            epoch,
            created,
            highest_other,
        })
    }

    /// Makes the claim of `epoch` durable (local directories: its marker
    /// and directory entry synced), once per handle and epoch.
    pub async fn make_claim_durable(&self, epoch: Epoch) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.claims_durable.load(Ordering::Acquire) >= epoch.0 {
            return Ok(());
        }
        self.make_durable(&keys::epoch_marker(epoch), true).await?;
        self.claims_durable.fetch_max(epoch.0, Ordering::AcqRel);
        Ok(())
    }

    /// The newest committed checkpoint, right after `claim`
    /// ([`JobStore::claim_epoch_visible`]). When the claim created its
    /// marker and no epoch above the newest manifest's was claimed but the
    /// claim's own, that manifest is the newest (no manifest with a smaller
    /// id can fence it, see the zombie rule in `reader`; an epoch claimed
    /// after the listing in `claim` is fenced by it and lands nothing). Its
    /// epoch is read from it, or known without a read when this handle put
    /// it last. Otherwise it is
    /// [`JobStore::latest`]. `None`: no checkpoint yet.
    pub async fn latest_after_claim(&self, claim: &Claim) -> Result<Option<CheckpointId>> {
        let newest = self
            .list_rel(keys::MANIFESTS)
            .await?
            .iter()
            .filter(|(key, _)| !self.is_withdrawn(key))
            .filter_map(|(key, _)| keys::parse_manifest(key))
            .max();
        let Some(newest) = newest else {
            return Ok(None);
        };
        if claim.created {
            let put_here = self.fence.lock().await.last_put;
            let epoch = match put_here.filter(|(id, _)| *id == newest) {
                Some((_, epoch)) => Some(epoch),
                None => self
                    .read_manifest(&keys::manifest(newest), newest)
                    .await
                    .ok()
                    .map(|m| m.epoch),
            };
            if let Some(epoch) = epoch {
                if claim.highest_other <= epoch && epoch < claim.epoch {
                    return Ok(Some(newest));
                }
            }
        }
        match self.latest().await {
            Ok(m) => Ok(Some(m.checkpoint)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The highest epoch that has claimed this job (0 if none has).
    pub async fn current_epoch(&self) -> Result<Epoch> {
        self.highest_epoch_except(None).await
    }

    /// The highest claimed epoch other than `except` (0 if none).
    async fn highest_epoch_except(&self, except: Option<Epoch>) -> Result<Epoch> {
        Ok(self
            .list_rel(keys::EPOCHS)
            .await?
            .iter()
            .filter_map(|(key, _)| keys::parse_epoch_marker(key))
            .filter(|e| Some(*e) != except)
            .max()
            .unwrap_or(Epoch(0)))
    }

    /// Commits `manifest`: after this returns `Ok`, the checkpoint is
    /// committed and durable. Errors: [`StorageError::Fenced`] if a higher
    /// epoch claimed the job, [`StorageError::AlreadyCommitted`] if another
    /// writer committed this id first, `InvalidArgument` if the manifest is
    /// not for this job or references chunks it may not,
    /// [`StorageError::NotDurable`] if the manifest was put but its sync
    /// failed (it is withdrawn: removed, and never listed again by this
    /// process).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), lazarus_storage::StorageError> {
    /// use lazarus_storage::*;
    /// let job = CheckpointStore::open("memory://")?.job(JobId::new("j")?);
    /// let worker = WorkerId::new("w")?;
    /// let chunk = job.write_chunk(CheckpointId(1), &worker, "s", b"x".to_vec().into(), Codec::None).await?;
    /// let mut manifest = Manifest::new(job.job().clone(), CheckpointId(1), Epoch(1));
    /// manifest.workers.insert(worker, WorkerSnapshot { chunks: vec![chunk], metadata: vec![] });
    /// job.commit(&manifest).await?;
    /// assert_eq!(job.latest().await?.checkpoint, CheckpointId(1));
    /// # Ok(()) }
    /// ```
    pub async fn commit(&self, manifest: &Manifest) -> Result<()> {
        let span = tracing::info_span!("commit", job = %self.job, checkpoint = %manifest.checkpoint, epoch = %manifest.epoch);
        async {
            let started = std::time::Instant::now();
            manifest
                .validate(&self.job, manifest.checkpoint)
                .map_err(|reason| StorageError::InvalidArgument {
                    what: "manifest",
                    reason,
                })?;
            // Rules 1 and 2, and the claim durable before anything committed
            // under it.
            self.claim_for_commit(manifest.epoch).await?;
            // The directory entries of the chunks this checkpoint wrote must be
            // durable before the manifest that makes them reachable.
            let written: Vec<String> = manifest
                .chunks()
                .filter(|c| c.written_by() == Some(manifest.checkpoint))
                .map(|c| c.key.clone())
                .collect();
            self.make_dirs_durable(written).await?;
            let rel = keys::manifest(manifest.checkpoint);
            let encoded = frame::encode(
                FrameKind::Manifest,
                Codec::None,
                1,
                manifest.to_json().into(),
            )?;
            // Rule 5: checked again, with the put, under the claims' lock.
            let put = {
                let mut fence = self.fence.lock().await;
                if fence.claimed > manifest.epoch.0 {
                    return Err(StorageError::Fenced {
                        job: self.job.to_string(),
                        attempted: manifest.epoch,
                        current: Epoch(fence.claimed),
                    });
                }
                let put = self
                    .put_small(&rel, PutPayload::from(encoded.to_vec()), true)
                    .await;
                if put.is_ok() {
                    fence.last_put = Some((manifest.checkpoint, manifest.epoch));
                }
                put
            };
            match put {
                Ok(()) => {
                    if let Err(cause) = self.make_durable(&rel, true).await {
                        return Err(self.withdraw(&rel, manifest.checkpoint, cause).await);
                    }
                    tracing::info!(
                        bytes = manifest.stored_bytes(),
                        us = started.elapsed().as_micros() as u64,
                        "checkpoint committed"
                    );
                    Ok(())
                }
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {
                    // Lost the race. Say to whom: a higher epoch means we are
                    // fenced, anything else is a peer that got there first.
                    let winner = match self.manifest(manifest.checkpoint).await {
                        Ok(m) => m.epoch,
                        Err(e) if e.kind() == ErrorKind::Fenced => manifest.epoch,
                        Err(e) => return Err(e),
                    };
                    tracing::warn!(%winner, "lost commit race");
                    if winner > manifest.epoch {
                        Err(StorageError::Fenced {
                            job: self.job.to_string(),
                            attempted: manifest.epoch,
                            current: winner,
                        })
                    } else {
                        Err(StorageError::AlreadyCommitted {
                            job: self.job.to_string(),
                            id: manifest.checkpoint,
                            winner,
                        })
                    }
                }
                Err(e) => Err(StorageError::backend("put", self.full_key(&rel), e)),
            }
        }
        .instrument(span)
        .await
    }

    /// Rules 1 and 2 for a commit under `epoch`: its claim, and the check
    /// that no higher epoch has claimed the job. The marker is put (and
    /// made durable) unless this handle claimed exactly `epoch` and made
    /// that claim durable already: markers are never removed, so the put
    /// would find it there, and on S3 it is a conditional PUT per
    /// checkpoint on the commit's path. The listing stays: it is the check.
    async fn claim_for_commit(&self, epoch: Epoch) -> Result<()> {
        use std::sync::atomic::Ordering;
        let claimed_here = self.fence.lock().await.claimed == epoch.0
            && self.claims_durable.load(Ordering::Acquire) >= epoch.0;
        if !claimed_here {
            return self.claim_epoch(epoch).await;
        }
        self.unfenced(epoch).await.map(|_| ())
    }

    /// Rule 2: the highest epoch claimed other than `epoch` (`Epoch(0)`:
    /// none), or [`StorageError::Fenced`] if it is above `epoch`.
    async fn unfenced(&self, epoch: Epoch) -> Result<Epoch> {
        let highest_other = self.highest_epoch_except(Some(epoch)).await?;
        if highest_other > epoch {
            return Err(StorageError::Fenced {
                job: self.job.to_string(),
                attempted: epoch,
                current: highest_other,
            });
        }
        Ok(highest_other)
    }

    /// Withdraws the manifest at `rel`, put but not made durable (`cause`):
    /// no reader of this process lists it from now on, the handle forgets
    /// it put it, and it is removed (with its directory entry synced) if the
    /// disk lets us. A recovery that restored it meanwhile learns from the
    /// commit's error that it is not durable.
    async fn withdraw(&self, rel: &str, id: CheckpointId, cause: StorageError) -> StorageError {
        let key = self.full_key(rel);
        self.withdrawn().insert(key.clone());
        {
            let mut fence = self.fence.lock().await;
            if fence.last_put.is_some_and(|(put, _)| put == id) {
                fence.last_put = None;
            }
        }
        let removed = match self.delete_rel(rel).await {
            Ok(()) => self.make_dirs_durable(vec![rel.to_string()]).await,
            Err(e) => Err(e),
        };
        let withdrawal = match removed {
            Ok(()) => {
                // Gone: a listing that still names it finds nothing to read.
                // Only manifests the disk would not let go stay in the set.
                self.withdrawn().remove(&key);
                "it was removed".to_string()
            }
            Err(e) => format!("removing it failed too ({e}); this process no longer lists it"),
        };
        tracing::error!(checkpoint = %id, %key, %cause, %withdrawal, "manifest not durable: withdrawn");
        StorageError::NotDurable {
            job: self.job.to_string(),
            id,
            key,
            cause: cause.to_string(),
            withdrawal,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{CheckpointId, CheckpointStore, Epoch, JobId, Manifest};

    /// A manifest withdrawn but not removed (the disk refused the removal
    /// too) is passed over by every reader of the store that withdrew it.
    /// (`storage/tests/failing_disk.rs` fails a real disk under a commit.)
    #[tokio::test]
    async fn test_a_withdrawn_manifest_is_never_listed() {
        let store = CheckpointStore::open("memory://").expect("memory store");
        let job = store.job(JobId::new("j").expect("job"));
        for id in [1, 2] {
            let m = Manifest::new(job.job().clone(), CheckpointId(id), Epoch(1));
            job.commit(&m).await.expect("commit");
        }
        assert_eq!(
            job.latest().await.expect("latest").checkpoint,
            CheckpointId(2)
        );
        job.withdrawn()
            .insert(job.full_key(&crate::keys::manifest(CheckpointId(2))));
        job.fence.lock().await.last_put = None;
        let other = store.job(JobId::new("j").expect("job"));
        for handle in [&job, &other] {
            assert_eq!(
                handle.latest().await.expect("latest").checkpoint,
                CheckpointId(1)
            );
            assert_eq!(handle.list().await.expect("list").len(), 1);
        }
        let claim = job.claim_epoch_visible(Epoch(2)).await.expect("claim");
        assert!(claim.created);
        assert_eq!(
            job.latest_after_claim(&claim)
                .await
                .expect("latest after claim"),
            Some(CheckpointId(1))
        );
    }
}
