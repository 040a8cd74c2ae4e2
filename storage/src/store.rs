//! [`CheckpointStore`] (one per store URL) and [`JobStore`] (one job within
//! it). The operations on a job live in their own modules: `writer` (chunks),
//! `commit` (manifests and fencing), `reader` (listing, verify), `cache`
//! (restore) and `retention` (gc).

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::backend::{self, Backend, BackendKind, StoreOptions};
use crate::error::{Result, StorageError};
use crate::ids::JobId;

/// A connection to one checkpoint store. Cheap to clone.
#[derive(Clone)]
pub struct CheckpointStore {
    inner: Arc<StoreInner>,
}

pub(crate) struct StoreInner {
    /// The backend; nothing outside `backend` looks at which one it is.
    pub(crate) object_store: Arc<dyn ObjectStore>,
    /// Key prefix under which this store's objects live (from the URL path).
    pub(crate) prefix: String,
    /// Durability steps needed after a put.
    pub(crate) kind: BackendKind,
    /// The URL it was opened from, for messages.
    pub(crate) url: String,
    /// Upload and codec tunables.
    pub(crate) options: StoreOptions,
    /// Local directories whose entry in their parent this process made
    /// durable: the store never removes a directory, so such an entry stays
    /// durable, and later syncs stop below it (`backend::fsync_dirs`).
    pub(crate) durable_dirs: std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>,
    /// Manifests (full keys) whose commit failed to make them durable:
    /// withdrawn, and never listed again by this process, even where the
    /// removal failed (`commit`).
    pub(crate) withdrawn: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("url", &self.inner.url)
            .finish()
    }
}

impl CheckpointStore {
    /// Opens the store at `url` with default options.
    ///
    /// ```
    /// # fn main() -> Result<(), lazarus_storage::StorageError> {
    /// let store = lazarus_storage::CheckpointStore::open("memory://")?;
    /// assert_eq!(store.url(), "memory://");
    /// # Ok(()) }
    /// ```
    pub fn open(url: &str) -> Result<CheckpointStore> {
        Self::open_with(url, StoreOptions::default())
    }

    /// Opens the store at `url` with `options`.
    pub fn open_with(url: &str, options: StoreOptions) -> Result<CheckpointStore> {
        let Backend {
            object_store,
            prefix,
            kind,
        } = backend::open(url, &options)?;
        Ok(CheckpointStore {
            inner: Arc::new(StoreInner {
                object_store,
                prefix,
                kind,
                url: url.to_string(),
                options,
                durable_dirs: Default::default(),
                withdrawn: Default::default(),
            }),
        })
    }

    /// Wraps an object store built elsewhere (for fault-injection tests).
    /// `description` stands for the URL in messages.
    pub fn from_object_store(
        object_store: Arc<dyn ObjectStore>,
        description: &str,
        options: StoreOptions,
    ) -> Result<CheckpointStore> {
        options.validate()?;
        Ok(CheckpointStore {
            inner: Arc::new(StoreInner {
                object_store,
                prefix: String::new(),
                kind: BackendKind::Remote,
                url: description.to_string(),
                options,
                durable_dirs: Default::default(),
                withdrawn: Default::default(),
            }),
        })
    }

    /// The URL this store was opened from.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The options in force.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// The part of the store that belongs to `job`.
    pub fn job(&self, job: JobId) -> JobStore {
        let root = if self.inner.prefix.is_empty() {
            format!("jobs/{job}")
        } else {
            format!("{}/jobs/{job}", self.inner.prefix)
        };
        JobStore {
            store: self.inner.clone(),
            job,
            root,
            claims_durable: Arc::default(),
            fence: Arc::default(),
        }
    }

    /// Names of the jobs that have objects in this store.
    pub async fn jobs(&self) -> Result<Vec<JobId>> {
        let base = if self.inner.prefix.is_empty() {
            "jobs".to_string()
        } else {
            format!("{}/jobs", self.inner.prefix)
        };
        let listing = self
            .inner
            .object_store
            .list_with_delimiter(Some(&Path::from(base.as_str())))
            .await
            .map_err(|e| StorageError::backend("list", &base, e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|n| JobId::new(n).ok()))
            .collect())
    }
}

/// One job's checkpoints in a store. Cheap to clone.
#[derive(Clone)]
pub struct JobStore {
    pub(crate) store: Arc<StoreInner>,
    pub(crate) job: JobId,
    /// `[prefix/]jobs/<job>`: every key of the job starts with it.
    pub(crate) root: String,
    /// The highest epoch whose marker this handle (and its clones) made
    /// durable: a commit under a claim made only visible syncs it first.
    pub(crate) claims_durable: Arc<std::sync::atomic::AtomicU64>,
    /// Serializes this handle's claims against its commits' last check and
    /// manifest put, and holds the highest epoch claimed through it and the
    /// last manifest it put: a claim finds each of the handle's commits
    /// decided (its manifest visible, or it will be fenced), so a recovery
    /// need not wait for a commit's sync.
    pub(crate) fence: Arc<tokio::sync::Mutex<crate::commit::Fence>>,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore")
            .field("url", &self.store.url)
            .field("job", &self.job)
            .finish()
    }
}

impl JobStore {
    /// The job.
    pub fn job(&self) -> &JobId {
        &self.job
    }

    /// The URL of the store.
    pub fn url(&self) -> &str {
        &self.store.url
    }

    /// Whether the store is a local directory, where a restore maps an
    /// uncompressed chunk in place: a local cache copy of such a chunk
    /// would only duplicate it.
    pub fn is_local_directory(&self) -> bool {
        matches!(self.store.kind, BackendKind::File { .. })
    }

    /// The full object key of `rel` (a key relative to the job root), as
    /// shown to people: `[prefix/]jobs/<job>/<rel>`.
    pub fn full_key(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root)
    }

    pub(crate) fn path(&self, rel: &str) -> Path {
        Path::from(self.full_key(rel).as_str())
    }

    /// Lists keys (relative to the job root) under `dir`, with sizes.
    pub(crate) async fn list_rel(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let prefix = self.path(dir);
        let strip = format!("{}/", self.root);
        let metas: Vec<_> = self
            .store
            .object_store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| StorageError::backend("list", self.full_key(dir), e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                full.strip_prefix(&strip).map(|r| (r.to_string(), m.size))
            })
            .collect())
    }

    /// Reads a whole (small) object.
    pub(crate) async fn get_bytes(&self, rel: &str) -> Result<Bytes> {
        let result = self
            .store
            .object_store
            .get(&self.path(rel))
            .await
            .map_err(|e| StorageError::backend("get", self.full_key(rel), e))?;
        result
            .bytes()
            .await
            .map_err(|e| StorageError::backend("read", self.full_key(rel), e))
    }

    /// Writes a small object in one put; with `create_only` it fails with
    /// `AlreadyExists` if the key exists (the atomic create-if-absent that
    /// commits and epoch claims rely on). Durable when it returns.
    pub(crate) async fn put_small(
        &self,
        rel: &str,
        payload: PutPayload,
        create_only: bool,
    ) -> Result<(), object_store::Error> {
        let mode = if create_only {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        self.store
            .object_store
            .put_opts(&self.path(rel), payload, PutOptions::from(mode))
            .await?;
        Ok(())
    }

    /// Makes a just-written object's data durable where the backend needs
    /// help (local directories); `dirs_too` also syncs its directory chain.
    pub(crate) async fn make_durable(&self, rel: &str, dirs_too: bool) -> Result<()> {
        self.sync_local(vec![rel.to_string()], true, dirs_too).await
    }

    /// Syncs the directory entries of `rels` (local directories only).
    pub(crate) async fn make_dirs_durable(&self, rels: Vec<String>) -> Result<()> {
        self.sync_local(rels, false, true).await
    }

    async fn sync_local(&self, rels: Vec<String>, files: bool, dirs: bool) -> Result<()> {
        if let BackendKind::File { root } = &self.store.kind {
            let root = root.clone();
            let keys: Vec<String> = rels.iter().map(|r| self.full_key(r)).collect();
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                if files {
                    for k in &keys {
                        backend::fsync_file(&root, k)?;
                    }
                }
                if dirs {
                    backend::fsync_dirs(
                        &root,
                        keys.iter().map(String::as_str),
                        &store.durable_dirs,
                    )?;
                }
                Ok::<_, StorageError>(())
            })
            .await
            .map_err(|e| StorageError::io("fsync task", "", std::io::Error::other(e)))??;
        }
        Ok(())
    }

    /// Whether the object at `rel` is a manifest this process withdrew
    /// (its commit could not make it durable).
    pub(crate) fn is_withdrawn(&self, rel: &str) -> bool {
        let withdrawn = self.withdrawn();
        !withdrawn.is_empty() && withdrawn.contains(&self.full_key(rel))
    }

    /// The store's withdrawn manifests (full keys).
    pub(crate) fn withdrawn(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.store
            .withdrawn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes objects by relative key; a key already gone is not an error.
    pub(crate) async fn delete_rel(&self, rel: &str) -> Result<()> {
        match self.store.object_store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StorageError::backend("delete", self.full_key(rel), e)),
        }
    }
}
