//! Object key layout. Everything of a job lives under `jobs/<job>/`:
//!
//! ```text
//! jobs/<job>/manifests/<checkpoint:020>.manifest   commits checkpoint n (create-if-absent)
//! jobs/<job>/chunks/<checkpoint:020>/<worker>/<name>.chunk
//!                                                  state written by checkpoint n; any later
//!                                                  manifest may reference it (incremental)
//! jobs/<job>/epochs/<epoch:020>.epoch              an epoch that has claimed the job (fencing)
//! jobs/<job>/savepoints/<name>.savepoint           pins a committed checkpoint against retention
//! ```
//!
//! Ids are zero-padded so lexical order is numeric order on every backend.
//! Chunk keys carry the id of the checkpoint that wrote them: retention uses
//! it to tell garbage from chunks a checkpoint still in progress may commit.

use crate::error::{Result, StorageError};
use crate::ids::{CheckpointId, Epoch, WorkerId};

/// Directory of manifests, relative to the job root.
pub(crate) const MANIFESTS: &str = "manifests";
/// Directory of chunks, relative to the job root.
pub(crate) const CHUNKS: &str = "chunks";
/// Directory of epoch markers, relative to the job root.
pub(crate) const EPOCHS: &str = "epochs";
/// Directory of savepoints, relative to the job root.
pub(crate) const SAVEPOINTS: &str = "savepoints";

pub(crate) fn manifest(id: CheckpointId) -> String {
    format!("{MANIFESTS}/{:020}.manifest", id.0)
}

pub(crate) fn epoch_marker(epoch: Epoch) -> String {
    format!("{EPOCHS}/{:020}.epoch", epoch.0)
}

pub(crate) fn chunk_dir(id: CheckpointId) -> String {
    format!("{CHUNKS}/{:020}", id.0)
}

pub(crate) fn chunk(id: CheckpointId, worker: &WorkerId, name: &str) -> Result<String> {
    validate_chunk_name(name)?;
    Ok(format!("{CHUNKS}/{:020}/{worker}/{name}.chunk", id.0))
}

pub(crate) fn savepoint(name: &str) -> Result<String> {
    validate_savepoint_name(name)?;
    Ok(format!("{SAVEPOINTS}/{name}.savepoint"))
}

/// The savepoint name of a savepoint key (relative to the job root).
pub(crate) fn parse_savepoint(key: &str) -> Option<&str> {
    let name = key
        .strip_prefix(SAVEPOINTS)?
        .strip_prefix('/')?
        .strip_suffix(".savepoint")?;
    validate_savepoint_name(name).ok().map(|_| name)
}

pub(crate) fn validate_savepoint_name(name: &str) -> Result<()> {
    // Savepoint names follow the same rules as worker names; an all-digit
    // name would read as a checkpoint id in `--from`.
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StorageError::InvalidName {
            what: "savepoint name",
            value: name.to_string(),
            reason: "is all digits, which `--from` reads as a checkpoint id".into(),
        });
    }
    WorkerId::new(name).map(|_| ()).map_err(|e| match e {
        StorageError::InvalidName { value, reason, .. } => StorageError::InvalidName {
            what: "savepoint name",
            value,
            reason,
        },
        other => other,
    })
}

fn validate_chunk_name(name: &str) -> Result<()> {
    // Chunk names follow the same rules as worker names.
    WorkerId::new(name).map(|_| ()).map_err(|e| match e {
        StorageError::InvalidName { value, reason, .. } => StorageError::InvalidName {
            what: "chunk name",
            value,
            reason,
        },
        other => other,
    })
}

fn parse_padded(s: &str) -> Option<u64> {
    if s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// The checkpoint id of a manifest key (relative to the job root).
pub(crate) fn parse_manifest(key: &str) -> Option<CheckpointId> {
    let name = key.strip_prefix(MANIFESTS)?.strip_prefix('/')?;
    parse_padded(name.strip_suffix(".manifest")?).map(CheckpointId)
}

/// The epoch of an epoch marker key (relative to the job root).
pub(crate) fn parse_epoch_marker(key: &str) -> Option<Epoch> {
    let name = key.strip_prefix(EPOCHS)?.strip_prefix('/')?;
    parse_padded(name.strip_suffix(".epoch")?).map(Epoch)
}

/// Parses a chunk key (relative to the job root) into the id of the
/// checkpoint that wrote it, refusing anything that is not exactly
/// `chunks/<20 digits>/<worker>/<name>.chunk`. Manifests come from storage,
/// so this also keeps a hostile manifest from naming a path outside the job
/// (or outside the local cache directory).
pub(crate) fn parse_chunk(key: &str) -> Option<CheckpointId> {
    let rest = key.strip_prefix(CHUNKS)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let id = parse_padded(parts.next()?)?;
    let worker = parts.next()?;
    let name = parts.next()?.strip_suffix(".chunk")?;
    if parts.next().is_some()
        || WorkerId::new(worker).is_err()
        || validate_chunk_name(name).is_err()
    {
        return None;
    }
    Some(CheckpointId(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keys_round_trip() {
        let w = WorkerId::new("counter-1").expect("worker");
        let k = chunk(CheckpointId(42), &w, "kg-7").expect("chunk");
        assert_eq!(k, "chunks/00000000000000000042/counter-1/kg-7.chunk");
        assert_eq!(parse_chunk(&k), Some(CheckpointId(42)));
        assert_eq!(
            parse_manifest(&manifest(CheckpointId(7))),
            Some(CheckpointId(7))
        );
        assert_eq!(parse_epoch_marker(&epoch_marker(Epoch(3))), Some(Epoch(3)));
    }

    #[test]
    fn test_hostile_chunk_keys_are_refused() {
        for bad in [
            "chunks/00000000000000000001/../../etc/passwd.chunk",
            "chunks/00000000000000000001/w/../x.chunk",
            "chunks/1/w/x.chunk",
            "/chunks/00000000000000000001/w/x.chunk",
            "chunks/00000000000000000001/w/x",
            "chunks/00000000000000000001/w/a/b.chunk",
            "manifests/00000000000000000001.manifest",
        ] {
            assert_eq!(parse_chunk(bad), None, "{bad}");
        }
    }
}
