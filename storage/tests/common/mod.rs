//! The test environment shared by the integration suite: one store per test,
//! on a fresh local directory or under a fresh prefix of a real S3-compatible
//! server, plus raw access to the same objects for corrupting them.
//!
//! The S3 side needs a server: `scripts/test.sh` starts one (moto) and sets
//! `LAZARUS_TEST_S3_ENDPOINT`, `LAZARUS_TEST_S3_BUCKET` and the `AWS_*`
//! credentials. Set them yourself to run the suite against MinIO or AWS.
//! Without them the S3 tests fail, loudly: they never skip.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lazarus_storage::{CheckpointStore, StoreOptions};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub struct Env {
    pub store: CheckpointStore,
    pub url: String,
    /// The same objects, without Lazarus in between.
    pub raw: Arc<dyn ObjectStore>,
    /// Key prefix of the store inside `raw`.
    pub prefix: String,
    pub is_s3: bool,
    _dir: Option<tempfile::TempDir>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn options() -> StoreOptions {
    StoreOptions {
        // Small parts so a 64 MiB chunk is a real multipart upload of several parts.
        part_size: 16 << 20,
        multipart_threshold: 16 << 20,
        ..StoreOptions::default()
    }
}

impl Env {
    pub fn file() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("file://{}", dir.path().display());
        let store = CheckpointStore::open_with(&url, options()).expect("open file store");
        let raw = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("raw fs"));
        Env {
            store,
            url,
            raw,
            prefix: String::new(),
            is_s3: false,
            _dir: Some(dir),
        }
    }

    pub fn s3(test: &str) -> Env {
        let endpoint = std::env::var("LAZARUS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
            panic!(
                "S3 suite: LAZARUS_TEST_S3_ENDPOINT is not set. Run the suite with scripts/test.sh, \
                 which starts an S3-compatible server, or point LAZARUS_TEST_S3_ENDPOINT, \
                 LAZARUS_TEST_S3_BUCKET and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY at one."
            )
        });
        let bucket =
            std::env::var("LAZARUS_TEST_S3_BUCKET").unwrap_or_else(|_| "lazarus-test".into());
        let prefix = format!(
            "t-{test}-{}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let url = format!("s3://{bucket}/{prefix}");
        let mut opts = options();
        opts.s3.insert("endpoint".into(), endpoint.clone());
        if endpoint.starts_with("http://") {
            opts.s3.insert("allow_http".into(), "true".into());
        }
        let store = CheckpointStore::open_with(&url, opts).expect("open s3 store");
        let raw = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_endpoint(&endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            .build()
            .expect("raw s3");
        Env {
            store,
            url,
            raw: Arc::new(raw),
            prefix,
            is_s3: true,
            _dir: None,
        }
    }

    fn raw_path(&self, full_key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(full_key)
        } else {
            // full keys from JobStore::full_key already include the prefix.
            Path::from(full_key)
        }
    }

    pub async fn raw_get(&self, full_key: &str) -> Vec<u8> {
        self.raw
            .get(&self.raw_path(full_key))
            .await
            .expect("raw get")
            .bytes()
            .await
            .expect("raw bytes")
            .to_vec()
    }

    pub async fn raw_put(&self, full_key: &str, bytes: Vec<u8>) {
        self.raw
            .put(&self.raw_path(full_key), PutPayload::from(bytes))
            .await
            .expect("raw put");
    }

    pub async fn raw_delete(&self, full_key: &str) {
        self.raw
            .delete(&self.raw_path(full_key))
            .await
            .expect("raw delete");
    }

    /// Flips one byte of a stored object.
    pub async fn flip_byte(&self, full_key: &str, at: usize) {
        let mut bytes = self.raw_get(full_key).await;
        bytes[at] ^= 0x5a;
        self.raw_put(full_key, bytes).await;
    }

    pub async fn raw_etag(&self, full_key: &str) -> Option<String> {
        self.raw
            .head(&self.raw_path(full_key))
            .await
            .expect("raw head")
            .e_tag
    }
}

/// Deterministic, moderately compressible bytes.
pub fn state_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Low-entropy bytes: letters from a small alphabet.
        let b = x.to_le_bytes();
        for v in b {
            if out.len() < len {
                out.push(b'a' + (v % 16));
            }
        }
    }
    out
}
