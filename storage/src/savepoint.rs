//! Savepoints: a name that pins one committed checkpoint. Retention never
//! deletes a pinned manifest or the chunks it references; a job can be
//! started from a savepoint (or any committed checkpoint id) with `--from`.
//!
//! A savepoint is a small frame of kind savepoint at
//! `jobs/<job>/savepoints/<name>.savepoint` holding JSON
//! (`{"name", "checkpoint", "created_at_ms"}`), written create-if-absent, so
//! a name never silently moves to another checkpoint.

use object_store::PutPayload;
use serde::{Deserialize, Serialize};

use crate::error::{CorruptReason, ErrorKind, Result, StorageError};
use crate::frame::{self, Codec, FrameKind};
use crate::ids::CheckpointId;
use crate::keys;
use crate::manifest::Manifest;
use crate::store::JobStore;

/// A named, retained checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Savepoint {
    /// Its name (the rules of worker names; not all digits).
    pub name: String,
    /// The committed checkpoint it pins.
    pub checkpoint: CheckpointId,
    /// When it was taken, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

impl Savepoint {
    /// Checks a savepoint name before anything is done with it (the rules
    /// of worker names; not all digits, which `--from` reads as an id).
    ///
    /// ```
    /// assert!(lazarus_storage::Savepoint::check_name("nightly-1").is_ok());
    /// assert!(lazarus_storage::Savepoint::check_name("42").is_err());
    /// ```
    pub fn check_name(name: &str) -> Result<()> {
        keys::validate_savepoint_name(name)
    }
}

impl JobStore {
    /// Pins committed checkpoint `checkpoint` under `name`. Taking the same
    /// name for the same checkpoint again is a no-op (a retried request);
    /// for another checkpoint it is refused.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), lazarus_storage::StorageError> {
    /// use lazarus_storage::*;
    /// let job = CheckpointStore::open("memory://")?.job(JobId::new("wc")?);
    /// job.commit(&Manifest::new(job.job().clone(), CheckpointId(1), Epoch(1))).await?;
    /// job.create_savepoint("before-upgrade", CheckpointId(1)).await?;
    /// assert_eq!(job.savepoints().await?[0].checkpoint, CheckpointId(1));
    /// job.gc(1).await?; // a savepoint survives any retention
    /// assert_eq!(job.resolve_start("before-upgrade").await?.checkpoint, CheckpointId(1));
    /// # Ok(()) }
    /// ```
    pub async fn create_savepoint(
        &self,
        name: &str,
        checkpoint: CheckpointId,
    ) -> Result<Savepoint> {
        let rel = keys::savepoint(name)?;
        // Only a committed, unfenced checkpoint may be pinned.
        self.manifest(checkpoint).await?;
        let savepoint = Savepoint {
            name: name.to_string(),
            checkpoint,
            created_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let body = serde_json::to_vec(&savepoint).expect("a savepoint always serializes");
        let encoded = frame::encode(FrameKind::Savepoint, Codec::None, 1, body.into())?;
        match self
            .put_small(&rel, PutPayload::from(encoded.to_vec()), true)
            .await
        {
            Ok(()) => {
                self.make_durable(&rel, true).await?;
                tracing::info!(job = %self.job, name, %checkpoint, "savepoint taken");
                Ok(savepoint)
            }
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                let existing = self.savepoint(name).await?;
                if existing.checkpoint == checkpoint {
                    Ok(existing)
                } else {
                    Err(StorageError::InvalidArgument {
                        what: "savepoint name",
                        reason: format!(
                            "{name:?} already names checkpoint {} of job {}; pick another name",
                            existing.checkpoint, self.job
                        ),
                    })
                }
            }
            Err(e) => Err(StorageError::backend("put", self.full_key(&rel), e)),
        }
    }

    /// The savepoint called `name`.
    pub async fn savepoint(&self, name: &str) -> Result<Savepoint> {
        let rel = keys::savepoint(name)?;
        match self.read_savepoint(&rel).await {
            Err(StorageError::ObjectNotFound { .. }) => Err(StorageError::SavepointNotFound {
                job: self.job.to_string(),
                name: name.to_string(),
            }),
            other => other,
        }
    }

    async fn read_savepoint(&self, rel: &str) -> Result<Savepoint> {
        let key = self.full_key(rel);
        let bytes = self.get_bytes(rel).await?;
        let json = frame::decode(&key, FrameKind::Savepoint, &bytes)?;
        let corrupt = |why: String| StorageError::corrupt(&key, CorruptReason::Savepoint(why));
        let savepoint: Savepoint =
            serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))?;
        if keys::savepoint(&savepoint.name).ok().as_deref() != Some(rel) {
            return Err(corrupt(format!(
                "names itself {:?}, stored as {rel}",
                savepoint.name
            )));
        }
        Ok(savepoint)
    }

    /// Every savepoint of the job, oldest checkpoint first. A damaged
    /// savepoint object is an error naming it: retention must not guess
    /// which checkpoint it pinned.
    pub async fn savepoints(&self) -> Result<Vec<Savepoint>> {
        let mut out = Vec::new();
        for (rel, _) in self.list_rel(keys::SAVEPOINTS).await? {
            if keys::parse_savepoint(&rel).is_none() {
                tracing::warn!(key = %self.full_key(&rel), "ignoring unexpected object among savepoints");
                continue;
            }
            match self.read_savepoint(&rel).await {
                Ok(s) => out.push(s),
                // Deleted between list and get.
                Err(StorageError::ObjectNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.checkpoint, &a.name).cmp(&(b.checkpoint, &b.name)));
        Ok(out)
    }

    /// Deletes the savepoint `name` (its checkpoint then ages out under
    /// retention like any other).
    pub async fn delete_savepoint(&self, name: &str) -> Result<()> {
        self.savepoint(name).await?;
        self.delete_rel(&keys::savepoint(name)?).await
    }

    /// What `--from FROM` starts a job from: a savepoint's name, or a
    /// committed checkpoint's id.
    pub async fn resolve_start(&self, from: &str) -> Result<Manifest> {
        if !from.is_empty() && from.bytes().all(|b| b.is_ascii_digit()) {
            let id = from
                .parse::<u64>()
                .map_err(|e| StorageError::InvalidArgument {
                    what: "checkpoint id",
                    reason: format!("{from:?}: {e}"),
                })?;
            return self.manifest(CheckpointId(id)).await;
        }
        let savepoint = match self.savepoint(from).await {
            Err(e) if e.kind() == ErrorKind::InvalidInput => {
                return Err(StorageError::InvalidArgument {
                    what: "--from",
                    reason: format!(
                        "{from:?} is neither a checkpoint id nor a savepoint name ({e})"
                    ),
                })
            }
            other => other?,
        };
        self.manifest(savepoint.checkpoint).await
    }
}
