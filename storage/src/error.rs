//! Errors, in two tiers: [`StorageError`] carries structured detail for logs
//! and people; [`ErrorKind`] tells a caller what to do about it.

use std::path::PathBuf;

use crate::ids::{CheckpointId, Epoch};

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input (URL, name, option) is wrong; retrying will not help.
    InvalidInput,
    /// The object or checkpoint does not exist.
    NotFound,
    /// Stored bytes failed a check; the object must not be used.
    Corrupt,
    /// A writer with a higher epoch exists; this writer must stop.
    Fenced,
    /// Another writer committed the same checkpoint first.
    Conflict,
    /// The store or the local disk failed; retrying may help.
    Unavailable,
}

/// Why an object failed a check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptReason {
    /// The object ends before its header does.
    #[error("object is {len} bytes, shorter than the {header}-byte frame header")]
    ShortHeader {
        /// Bytes present.
        len: u64,
        /// Bytes needed.
        header: usize,
    },
    /// The first bytes are not the frame magic.
    #[error("wrong magic {found:02x?}, expected {expected:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
        /// The magic of a Lazarus frame.
        expected: [u8; 4],
    },
    /// The header's own CRC does not match.
    #[error("header CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the header bytes.
        computed: u32,
    },
    /// The format version is not one this build reads.
    #[error("unknown frame format version {0}; this build reads version 1")]
    UnknownVersion(u16),
    /// The codec byte is not a known codec.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// The kind byte does not match what the reader expected.
    #[error("frame holds a {found}, expected a {expected}")]
    WrongKind {
        /// The kind found.
        found: &'static str,
        /// The kind expected.
        expected: &'static str,
    },
    /// The object is shorter or longer than its header says.
    #[error("payload is {actual} bytes, header says {expected}")]
    Length {
        /// Length per header (or manifest).
        expected: u64,
        /// Length found.
        actual: u64,
    },
    /// The payload CRC does not match.
    #[error("payload CRC mismatch: expected {expected:#010x}, computed {computed:#010x}")]
    PayloadCrc {
        /// The CRC the header (or manifest) records.
        expected: u32,
        /// The CRC of the bytes read.
        computed: u32,
    },
    /// The frame is intact but does not match what the manifest recorded.
    #[error("{field} is {actual}, manifest says {expected}")]
    ManifestMismatch {
        /// Which property differs.
        field: &'static str,
        /// The value the manifest records.
        expected: u64,
        /// The value found.
        actual: u64,
    },
    /// Decompression failed.
    #[error("zstd payload does not decode: {0}")]
    Decode(String),
    /// The payload is not a valid manifest.
    #[error("manifest is invalid: {0}")]
    Manifest(String),
    /// The payload is not a valid savepoint record.
    #[error("savepoint is invalid: {0}")]
    Savepoint(String),
    /// rkyv validation of the payload failed.
    #[error("payload is not a valid archive of the requested type: {0}")]
    Archive(String),
}

/// Everything the storage crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A store URL that cannot be used.
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A job, worker or chunk name that cannot be used in a key.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// What the name is for.
        what: &'static str,
        /// The name given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value that breaks an invariant of the API (for example a manifest for
    /// another job).
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// What was passed.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A stored object failed a check. Its bytes are never handed out.
    #[error("corrupt object {key}: {reason}")]
    Corrupt {
        /// The object's key in the store.
        key: String,
        /// What failed.
        reason: CorruptReason,
    },
    /// An object that should exist does not.
    #[error("object {key} not found")]
    ObjectNotFound {
        /// The missing key.
        key: String,
    },
    /// No committed checkpoint with this id.
    #[error("job {job}: checkpoint {id} is not committed")]
    CheckpointNotFound {
        /// The job.
        job: String,
        /// The id asked for.
        id: CheckpointId,
    },
    /// The job has no committed checkpoint at all.
    #[error("job {job} has no committed checkpoint in {store}")]
    NoCheckpoints {
        /// The job.
        job: String,
        /// The store, as a URL.
        store: String,
    },
    /// No savepoint of this name.
    #[error("job {job} has no savepoint named {name:?}")]
    SavepointNotFound {
        /// The job.
        job: String,
        /// The name asked for.
        name: String,
    },
    /// The manifest names no such worker.
    #[error("checkpoint {id} of job {job} has no worker {worker}")]
    WorkerNotFound {
        /// The job.
        job: String,
        /// The checkpoint.
        id: CheckpointId,
        /// The worker asked for.
        worker: String,
    },
    /// A writer with a lower epoch than the job's current one tried to commit.
    #[error("fenced: job {job} is at epoch {current}, a commit with epoch {attempted} is refused")]
    Fenced {
        /// The job.
        job: String,
        /// The epoch of the refused commit.
        attempted: Epoch,
        /// The highest epoch the job has seen.
        current: Epoch,
    },
    /// Another writer committed this checkpoint id first.
    #[error("checkpoint {id} of job {job} is already committed (by epoch {winner})")]
    AlreadyCommitted {
        /// The job.
        job: String,
        /// The checkpoint id.
        id: CheckpointId,
        /// The epoch of the manifest that won.
        winner: Epoch,
    },
    /// A checkpoint's manifest was put but could not be made durable (a
    /// local disk's fsync failed). Such a manifest may vanish in a crash or
    /// hold bytes the disk never took (a later fsync reports success: the
    /// kernel drops the error), so the commit withdraws it: it is removed,
    /// and the store this process opened never lists it again, also when the
    /// removal fails.
    #[error("checkpoint {id} of job {job}: its manifest {key} was written but could not be made durable ({cause}); {withdrawal}")]
    NotDurable {
        /// The job.
        job: String,
        /// The checkpoint.
        id: CheckpointId,
        /// The manifest's key.
        key: String,
        /// The failed sync.
        cause: String,
        /// What became of the manifest: removed, or why not.
        withdrawal: String,
    },
    /// The object store failed.
    /// (The cause is in the message, not a `source`: printed once in an
    /// error chain.)
    #[error("store {op} of {key} failed: {error}")]
    Backend {
        /// What was attempted.
        op: &'static str,
        /// The key (or prefix) involved.
        key: String,
        /// The object_store error.
        error: object_store::Error,
    },
    /// A local file operation (cache, fsync) failed.
    #[error("{op} {path}: {error}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The local path.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
}

impl StorageError {
    /// What the caller should do about this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StorageError::InvalidUrl { .. }
            | StorageError::InvalidName { .. }
            | StorageError::InvalidArgument { .. } => ErrorKind::InvalidInput,
            StorageError::Corrupt { .. } => ErrorKind::Corrupt,
            StorageError::ObjectNotFound { .. }
            | StorageError::CheckpointNotFound { .. }
            | StorageError::NoCheckpoints { .. }
            | StorageError::SavepointNotFound { .. }
            | StorageError::WorkerNotFound { .. } => ErrorKind::NotFound,
            StorageError::Fenced { .. } => ErrorKind::Fenced,
            StorageError::AlreadyCommitted { .. } => ErrorKind::Conflict,
            StorageError::Backend { error, .. } => match error {
                object_store::Error::NotFound { .. } => ErrorKind::NotFound,
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. } => ErrorKind::Conflict,
                _ => ErrorKind::Unavailable,
            },
            StorageError::Io { .. } | StorageError::NotDurable { .. } => ErrorKind::Unavailable,
        }
    }

    pub(crate) fn backend(
        op: &'static str,
        key: impl ToString,
        source: object_store::Error,
    ) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StorageError::ObjectNotFound {
                key: key.to_string(),
            },
            error => StorageError::Backend {
                op,
                key: key.to_string(),
                error,
            },
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn corrupt(key: impl ToString, reason: CorruptReason) -> Self {
        StorageError::Corrupt {
            key: key.to_string(),
            reason,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
