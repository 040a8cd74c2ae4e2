//! Opening a store from a URL. This is the only module that knows which
//! object_store backend is behind a [`CheckpointStore`].
//!
//! | URL | backend |
//! | --- | --- |
//! | `file:///abs/dir` | local directory; objects are fsynced before a put returns |
//! | `s3://bucket/prefix` | any S3-compatible store; endpoint, region, credentials and `allow_http` from the `AWS_*` environment or [`StoreOptions::s3`] |
//! | `memory://` | in-process memory, for unit tests |

use std::collections::{BTreeMap, HashSet};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::ObjectStore;

use crate::error::{Result, StorageError};

/// Tunables of a store connection. Components (the object store itself) are
/// passed to [`CheckpointStore::from_object_store`], not through here.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// S3 settings by object_store config key (`endpoint`, `region`,
    /// `access_key_id`, `secret_access_key`, `allow_http`, …). They override
    /// the `AWS_*` environment variables.
    pub s3: BTreeMap<String, String>,
    /// Objects larger than this (bytes) are uploaded with multipart upload.
    /// Default 16 MiB: below it one PUT is faster, above it parts upload in
    /// parallel and a failed part is retried alone.
    pub multipart_threshold: u64,
    /// Size of one multipart part in bytes. Default 16 MiB; S3 needs at least
    /// 5 MiB for every part but the last.
    pub part_size: usize,
    /// Parts (and objects) in flight at once. Default 4: enough to fill a
    /// link to one endpoint without holding many parts in memory.
    pub upload_concurrency: usize,
    /// Chunks a restore fetches at once, and ranged GETs in flight for one
    /// large object (`range_size` each). Default 8: a restore is on the
    /// recovery path, so it uses the link and both cores' CRC/decode.
    pub download_concurrency: usize,
    /// Remote objects larger than this (bytes) are read with parallel
    /// ranged GETs of this size. Default 8 MiB.
    pub range_size: u64,
    /// zstd level for [`Codec::Zstd`](crate::Codec). Default 1: the fastest,
    /// since checkpoint latency matters more than a few percent of size.
    pub zstd_level: i32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            s3: BTreeMap::new(),
            multipart_threshold: 16 << 20,
            part_size: 16 << 20,
            upload_concurrency: 4,
            download_concurrency: 8,
            range_size: 8 << 20,
            zstd_level: 1,
        }
    }
}

impl StoreOptions {
    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, reason: String| {
            Err(StorageError::InvalidArgument { what, reason })
        };
        if self.part_size < 5 << 20 {
            return bad(
                "part_size",
                format!("{} bytes is below the 5 MiB S3 minimum", self.part_size),
            );
        }
        if self.upload_concurrency == 0 {
            return bad("upload_concurrency", "must be at least 1".into());
        }
        if self.download_concurrency == 0 {
            return bad("download_concurrency", "must be at least 1".into());
        }
        if self.range_size < 1 << 20 {
            return bad(
                "range_size",
                format!("{} bytes is below the 1 MiB minimum", self.range_size),
            );
        }
        if !(1..=22).contains(&self.zstd_level) {
            return bad(
                "zstd_level",
                format!("{} is outside 1..=22", self.zstd_level),
            );
        }
        for key in self.s3.keys() {
            if key.parse::<AmazonS3ConfigKey>().is_err() {
                return bad(
                    "s3",
                    format!(
                        "{key:?} is not an S3 option (for example endpoint, region, allow_http)"
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Which kind of backend a store is; decides durability steps.
#[derive(Debug, Clone)]
pub(crate) enum BackendKind {
    /// A local directory: object_store writes files without fsync, so the
    /// store fsyncs each object and its directories itself.
    File { root: PathBuf },
    /// S3 or anything else remote: a successful PUT is durable.
    Remote,
}

/// An opened backend: the object store, the key prefix all objects live
/// under, and what kind it is.
pub(crate) struct Backend {
    pub(crate) object_store: Arc<dyn ObjectStore>,
    pub(crate) prefix: String,
    pub(crate) kind: BackendKind,
}

fn invalid(url: &str, reason: impl Into<String>) -> StorageError {
    StorageError::InvalidUrl {
        url: url.to_string(),
        reason: reason.into(),
    }
}

pub(crate) fn open(url_str: &str, options: &StoreOptions) -> Result<Backend> {
    options.validate()?;
    let url = url::Url::parse(url_str).map_err(|e| {
        invalid(
            url_str,
            format!("{e}; expected file:///abs/dir, s3://bucket/prefix or memory://"),
        )
    })?;
    match url.scheme() {
        "file" => {
            if url
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(invalid(
                    url_str,
                    "a file:// URL takes no host; write file:///abs/dir",
                ));
            }
            let root = url
                .to_file_path()
                .map_err(|()| invalid(url_str, "not an absolute local path"))?;
            std::fs::create_dir_all(&root)
                .map_err(|e| StorageError::io("create store directory", &root, e))?;
            let fs = LocalFileSystem::new_with_prefix(&root)
                .map_err(|e| invalid(url_str, format!("cannot open directory: {e}")))?;
            Ok(Backend {
                object_store: Arc::new(fs),
                prefix: String::new(),
                kind: BackendKind::File { root },
            })
        }
        "s3" => {
            let bucket = url
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| invalid(url_str, "missing bucket; write s3://bucket/prefix"))?;
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            for (key, value) in &options.s3 {
                let key: AmazonS3ConfigKey = key
                    .parse()
                    .map_err(|e| invalid(url_str, format!("S3 option {key:?}: {e}")))?;
                builder = builder.with_config(key, value);
            }
            check_s3_credentials(&builder).map_err(|reason| invalid(url_str, reason))?;
            let s3 = builder
                .build()
                .map_err(|e| invalid(url_str, format!("S3 configuration: {e}")))?;
            Ok(Backend {
                object_store: Arc::new(s3),
                prefix: url.path().trim_matches('/').to_string(),
                kind: BackendKind::Remote,
            })
        }
        "memory" => Ok(Backend {
            object_store: Arc::new(InMemory::new()),
            prefix: String::new(),
            kind: BackendKind::Remote,
        }),
        other => Err(invalid(
            url_str,
            format!("unsupported scheme {other:?}; expected file://, s3:// or memory://"),
        )),
    }
}

/// Makes a file written by object_store durable: its data (fsync of the
/// file). Its directory entry is made durable by [`fsync_dirs`], which the
/// commit calls once per directory before it writes the manifest, so a
/// checkpoint of many chunks costs one fsync per chunk, not one per
/// directory level per chunk.
pub(crate) fn fsync_file(root: &FsPath, key: &str) -> Result<()> {
    let path = root.join(key);
    let file =
        std::fs::File::open(&path).map_err(|e| StorageError::io("open for fsync", &path, e))?;
    file.sync_all()
        .map_err(|e| StorageError::io("fsync", &path, e))
}

/// Fsyncs the directories holding `keys` (their new entries), deepest
/// first, and each ancestor up to the store root whose child on the way is
/// not in `durable` yet: a directory whose entry in its parent was synced
/// once (by this process) needs no sync of the parent again, as the store
/// never removes directories. A commit syncs its manifest's directory, not
/// the chain to the root each time: every directory sync is a device flush.
pub(crate) fn fsync_dirs<'a>(
    root: &FsPath,
    keys: impl IntoIterator<Item = &'a str>,
    durable: &Mutex<HashSet<PathBuf>>,
) -> Result<()> {
    let (dirs, learned) = {
        let known = durable.lock().unwrap_or_else(|e| e.into_inner());
        dirs_to_sync(root, keys, &known)
    };
    for d in dirs.iter().rev() {
        let handle = std::fs::File::open(d)
            .map_err(|e| StorageError::io("open directory for fsync", d, e))?;
        handle
            .sync_all()
            .map_err(|e| StorageError::io("fsync directory", d, e))?;
    }
    durable
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(learned);
    Ok(())
}

/// The directories [`fsync_dirs`] syncs (in path order: reversed, the
/// deepest come first), and the directories whose entries that makes
/// durable.
fn dirs_to_sync<'a>(
    root: &FsPath,
    keys: impl IntoIterator<Item = &'a str>,
    durable: &HashSet<PathBuf>,
) -> (std::collections::BTreeSet<PathBuf>, Vec<PathBuf>) {
    let mut dirs = std::collections::BTreeSet::new();
    let mut learned = Vec::new();
    for key in keys {
        let path = root.join(key);
        let Some(parent) = path.parent() else {
            continue;
        };
        dirs.insert(parent.to_path_buf());
        let mut child = parent;
        while child != root && child.starts_with(root) && !durable.contains(child) {
            let Some(up) = child.parent() else {
                break;
            };
            dirs.insert(up.to_path_buf());
            learned.push(child.to_path_buf());
            child = up;
        }
    }
    (dirs, learned)
}

/// Opts in to the cloud instance's metadata credentials (an HTTP request to
/// the instance metadata address when no other credentials are set).
pub const INSTANCE_CREDENTIALS_ENV: &str = "LAZARUS_S3_INSTANCE_CREDENTIALS";

/// Refuses an S3 store that has no credentials, before any request leaves
/// the machine. object_store would otherwise fall back to the instance
/// metadata service (169.254.169.254), which a user who did not ask for it
/// should neither wait for nor see in errors; that fallback is opt-in
/// through [`INSTANCE_CREDENTIALS_ENV`].
fn check_s3_credentials(builder: &AmazonS3Builder) -> std::result::Result<(), String> {
    let set = |k: AmazonS3ConfigKey| builder.get_config_value(&k).is_some_and(|v| !v.is_empty());
    let env = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
    let (key, secret) = (
        set(AmazonS3ConfigKey::AccessKeyId),
        set(AmazonS3ConfigKey::SecretAccessKey),
    );
    match (key, secret) {
        (true, true) => return Ok(()),
        (true, false) => {
            return Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into())
        }
        (false, true) => {
            return Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into())
        }
        (false, false) => {}
    }
    let other_source = builder
        .get_config_value(&AmazonS3ConfigKey::SkipSignature)
        .is_some_and(|v| v == "true")
        || set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || set(AmazonS3ConfigKey::ContainerCredentialsFullUri)
        || env("AWS_WEB_IDENTITY_TOKEN_FILE")
        || std::env::var(INSTANCE_CREDENTIALS_ENV).is_ok_and(|v| v == "1" || v == "true");
    if other_source {
        return Ok(());
    }
    Err(format!(
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_ENDPOINT and \
         AWS_REGION for a store other than AWS, and AWS_ALLOW_HTTP=true for a plain-HTTP endpoint), \
         or {INSTANCE_CREDENTIALS_ENV}=true to use the cloud instance's credentials"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first sync of a key's directory goes up to the root; later ones
    /// stop below the first directory whose entry is durable already.
    #[test]
    fn test_directory_syncs_stop_below_entries_made_durable() {
        let root = FsPath::new("/store");
        let mut durable = HashSet::new();
        let mut sync = |keys: &[&str]| {
            let (dirs, learned) = dirs_to_sync(root, keys.iter().copied(), &durable);
            durable.extend(learned);
            dirs.iter()
                .rev()
                .map(|d| {
                    d.strip_prefix(root)
                        .expect("under root")
                        .display()
                        .to_string()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            sync(&["jobs/j/manifests/1.manifest"]),
            ["jobs/j/manifests", "jobs/j", "jobs", ""],
            "first: the whole chain, deepest first"
        );
        assert_eq!(sync(&["jobs/j/manifests/2.manifest"]), ["jobs/j/manifests"]);
        assert_eq!(
            sync(&["jobs/j/chunks/3/w/a.chunk", "jobs/j/chunks/3/w/b.chunk"]),
            [
                "jobs/j/chunks/3/w",
                "jobs/j/chunks/3",
                "jobs/j/chunks",
                "jobs/j"
            ],
            "a new branch: up to the first durable entry"
        );
        assert_eq!(
            sync(&["jobs/j/chunks/4/w/a.chunk"]),
            ["jobs/j/chunks/4/w", "jobs/j/chunks/4", "jobs/j/chunks"]
        );
        assert!(sync(&[]).is_empty(), "no keys, nothing synced");
    }

    /// Makes one field of the options bad.
    type Break = fn(&mut StoreOptions);

    #[test]
    fn test_bad_options_are_refused_naming_the_field() {
        StoreOptions::default()
            .validate()
            .expect("defaults are valid");
        let cases: [(&str, Break); 6] = [
            ("part_size", |o| o.part_size = 1 << 20),
            ("upload_concurrency", |o| o.upload_concurrency = 0),
            ("download_concurrency", |o| o.download_concurrency = 0),
            ("range_size", |o| o.range_size = 4096),
            ("zstd_level", |o| o.zstd_level = 23),
            ("s3", |o| {
                o.s3.insert("nope".into(), "1".into());
            }),
        ];
        for (field, break_it) in cases {
            let mut o = StoreOptions::default();
            break_it(&mut o);
            match o.validate() {
                Err(StorageError::InvalidArgument { what, .. }) => assert_eq!(what, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
