//! The manifest: the object that commits a checkpoint. It lists, per worker,
//! the chunks that hold its state (by key, with sizes and CRCs) and opaque
//! metadata such as source positions. Stored as a frame of kind manifest
//! whose payload is JSON, so an operator can read it with `inspect --json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{CorruptReason, Result, StorageError};
use crate::frame::Codec;
use crate::ids::{CheckpointId, Epoch, JobId, WorkerId};
use crate::keys;

/// Manifest format version this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// A reference from a manifest to one stored chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Key relative to the job root: `chunks/<writer checkpoint>/<worker>/<name>.chunk`.
    pub key: String,
    /// Payload codec of the stored frame.
    pub codec: Codec,
    /// Length of the stored object (header plus stored payload).
    pub stored_len: u64,
    /// CRC-32 of the stored payload (as in the frame header).
    pub stored_crc: u32,
    /// Length of the decoded payload.
    pub raw_len: u64,
    /// CRC-32 of the decoded payload; a restored cache file is checked against it.
    pub raw_crc: u32,
}

impl ChunkRef {
    /// The id of the checkpoint that wrote this chunk (the manifest may be a
    /// later one: incremental checkpoints reference unchanged chunks).
    pub fn written_by(&self) -> Option<CheckpointId> {
        keys::parse_chunk(&self.key)
    }

    /// The chunk's name (the last key segment without `.chunk`), which
    /// workers use to tell their state parts apart.
    pub fn name(&self) -> &str {
        let last = self.key.rsplit('/').next().unwrap_or(&self.key);
        last.strip_suffix(".chunk").unwrap_or(last)
    }
}

/// One worker's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkerSnapshot {
    /// The chunks holding the worker's state, in the order the worker wrote them.
    pub chunks: Vec<ChunkRef>,
    /// Opaque bytes the worker asked to store beside its state (for example
    /// source positions), hex-encoded in JSON.
    #[serde(with = "hex_bytes", default)]
    pub metadata: Vec<u8>,
}

impl WorkerSnapshot {
    /// Sum of the raw lengths of the worker's chunks.
    pub fn state_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.raw_len).sum()
    }
}

/// The manifest of one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// The job.
    pub job: JobId,
    /// The checkpoint this manifest commits.
    pub checkpoint: CheckpointId,
    /// The epoch of the writer that committed it.
    pub epoch: Epoch,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Each worker's snapshot, by worker name.
    pub workers: BTreeMap<WorkerId, WorkerSnapshot>,
}

impl Manifest {
    /// An empty manifest for `checkpoint` of `job`, stamped now.
    pub fn new(job: JobId, checkpoint: CheckpointId, epoch: Epoch) -> Manifest {
        let created_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Manifest {
            format: MANIFEST_FORMAT,
            job,
            checkpoint,
            epoch,
            created_at_ms,
            workers: BTreeMap::new(),
        }
    }

    /// Every chunk referenced, across workers.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.workers.values().flat_map(|w| w.chunks.iter())
    }

    /// Total stored bytes of the chunks referenced.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks().map(|c| c.stored_len).sum()
    }

    /// Total raw state bytes.
    pub fn state_bytes(&self) -> u64 {
        self.chunks().map(|c| c.raw_len).sum()
    }

    /// Checks the invariants a manifest must hold before it is written or
    /// after it is read: the format, the job and id it is stored under, and
    /// that each chunk key is well-formed and written by this checkpoint or an
    /// earlier one.
    pub fn validate(&self, job: &JobId, id: CheckpointId) -> std::result::Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "format is {}, this build reads {MANIFEST_FORMAT}",
                self.format
            ));
        }
        if &self.job != job {
            return Err(format!(
                "job is {:?}, stored under job {:?}",
                self.job.as_str(),
                job.as_str()
            ));
        }
        if self.checkpoint != id {
            return Err(format!(
                "checkpoint is {}, stored as checkpoint {id}",
                self.checkpoint
            ));
        }
        for (worker, snapshot) in &self.workers {
            for chunk in &snapshot.chunks {
                let Some(writer) = chunk.written_by() else {
                    return Err(format!(
                        "worker {worker}: chunk key {:?} is not a chunk key",
                        chunk.key
                    ));
                };
                if writer > id {
                    return Err(format!(
                        "worker {worker}: chunk {} was written by later checkpoint {writer}",
                        chunk.key
                    ));
                }
                if chunk.codec == Codec::None
                    && chunk.stored_len != chunk.raw_len + crate::frame::HEADER_LEN as u64
                {
                    return Err(format!(
                        "worker {worker}: chunk {} has stored_len {} but raw_len {} with codec none",
                        chunk.key, chunk.stored_len, chunk.raw_len
                    ));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serializes")
    }

    /// Parses and validates a manifest payload read from `key`.
    pub(crate) fn from_json(
        key: &str,
        job: &JobId,
        id: CheckpointId,
        bytes: &[u8],
    ) -> Result<Manifest> {
        let corrupt = |why: String| StorageError::corrupt(key, CorruptReason::Manifest(why));
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        manifest.validate(job, id).map_err(corrupt)?;
        Ok(manifest)
    }
}

mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("metadata: odd number of hex digits"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16)
                    .map_err(|_| D::Error::custom(format!("metadata: bad hex at offset {i}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let job = JobId::new("j").expect("job");
        let mut m = Manifest::new(job, CheckpointId(3), Epoch(1));
        m.workers.insert(
            WorkerId::new("w").expect("worker"),
            WorkerSnapshot {
                chunks: vec![ChunkRef {
                    key: "chunks/00000000000000000002/w/c0.chunk".into(),
                    codec: Codec::Zstd,
                    stored_len: 50,
                    stored_crc: 1,
                    raw_len: 100,
                    raw_crc: 2,
                }],
                metadata: vec![0, 1, 0xfe],
            },
        );
        m
    }

    #[test]
    fn test_manifest_json_round_trip() {
        let m = sample();
        let job = m.job.clone();
        let back = Manifest::from_json("k", &job, CheckpointId(3), &m.to_json()).expect("parse");
        assert_eq!(back, m);
    }

    #[test]
    fn test_manifest_errors_name_the_field() {
        let job = JobId::new("j").expect("job");
        let err = Manifest::from_json("k", &job, CheckpointId(3), br#"{"format":1}"#)
            .expect_err("missing");
        assert!(err.to_string().contains("missing field `job`"), "{err}");
        let mut m = sample();
        m.checkpoint = CheckpointId(1);
        let err = Manifest::from_json("k", &job, CheckpointId(1), &m.to_json())
            .expect_err("future chunk");
        assert!(
            err.to_string().contains("written by later checkpoint 2"),
            "{err}"
        );
        let err = Manifest::from_json("k", &job, CheckpointId(4), &sample().to_json())
            .expect_err("wrong id");
        assert!(err.to_string().contains("stored as checkpoint 4"), "{err}");
    }
}
