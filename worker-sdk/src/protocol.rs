//! The wire protocol between supervisor, agents and workers: the one module
//! both sides import (DESIGN.md). Two kinds of connection:
//!
//! - **control** (worker ↔ supervisor, TCP): frames of `u32` little-endian
//!   length + JSON of [`ToSupervisor`] / [`ToWorker`]. Rare and small, so
//!   readable and self-describing beats compact.
//! - **data** (worker → worker, TCP): frames of `u32` length + `u8` tag +
//!   body, carrying record batches, barriers (in-band) and end of stream.
//!   Binary, because this is the hot path.
//!
//! Every decoder checks lengths before it allocates and names what is wrong.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use lazarus_storage::{CheckpointId, Epoch, JobId, WorkerId, WorkerSnapshot};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::record::Record;

/// Largest control frame accepted (acks list chunk references).
pub const MAX_CONTROL_FRAME: usize = 64 << 20;
/// Largest data frame accepted.
pub const MAX_DATA_FRAME: usize = 64 << 20;

/// The state part in which a worker's snapshot keeps the records it read
/// ahead of a barrier (in flight at the checkpoint), as data frames. Part
/// names starting with `_lazarus.` are the runtime's.
pub const IN_FLIGHT_PART: &str = "_lazarus.in-flight";

/// A protocol failure.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame is longer than allowed.
    #[error("{kind} frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Control or data.
        kind: &'static str,
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A frame does not decode.
    #[error("malformed {kind} frame: {reason}")]
    Malformed {
        /// Control or data.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// How records on an edge are spread over the downstream instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Partition {
    /// Instance i sends to instance i (equal parallelism).
    Forward,
    /// By key group of the record key: the instance that owns the key's
    /// group gets it, so keyed state and routing agree.
    Hash,
    /// Each frame to the next downstream instance, in turn, that has room
    /// for it; a sender waits only when all are full.
    Rebalance,
}

/// One output edge of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEdge {
    /// Partitioning.
    pub partition: Partition,
    /// Downstream workers, in instance order.
    pub targets: Vec<WorkerId>,
}

/// What a worker is told to be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The job.
    pub job: JobId,
    /// This worker.
    pub worker: WorkerId,
    /// The operator's name in the job spec.
    pub operator: String,
    /// The operator's kind: which registered constructor builds it.
    pub kind: String,
    /// Instance index within the operator, `0..parallelism`.
    pub index: u32,
    /// The operator's parallelism.
    pub parallelism: u32,
    /// Key groups of the job (fixed for its lifetime).
    pub key_groups: u32,
    /// The job's `[params]`.
    pub params: BTreeMap<String, String>,
    /// Store URL for checkpoints.
    pub store: String,
    /// The supervisor's epoch.
    pub epoch: Epoch,
    /// The checkpoint to restore, if any.
    pub restore: Option<CheckpointId>,
    /// Upstream workers, one per input channel.
    pub inputs: Vec<WorkerId>,
    /// Output edges.
    pub outputs: Vec<OutputEdge>,
    /// Local cache directory for restores (kept by the agent across restarts).
    pub cache_dir: PathBuf,
    /// Heartbeat interval in milliseconds.
    pub heartbeat_ms: u64,
    /// Codec for state chunks.
    pub codec: lazarus_storage::Codec,
    /// The attempt's data-channel key (hex): every data connection between
    /// this attempt's workers proves it ([`data_proof`]). `None` only from
    /// a supervisor that predates it; then channels are not authenticated.
    #[serde(default)]
    pub channel_key: Option<String>,
    /// A source rolled back after a failure: how many records it emitted
    /// after the restored checkpoint before the failure. It reports
    /// [`ToSupervisor::Replayed`] once it has emitted that many again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_records: Option<u64>,
    /// `restore` is visible in the store but its commit is not durable yet
    /// (a recovery that did not wait for the failed attempt's last commit):
    /// a sink recovers it only when [`ToWorker::Committed`] names it, so no
    /// output is published from a checkpoint a power loss could undo.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore_pending: bool,
}

/// The environment variable naming the file descriptor of a worker's exit
/// word: a 4-byte word in a page of shared memory (a memfd named
/// [`EXIT_WORD_NAME`]) the agent maps too. The worker parks a thread that
/// registers the word with `set_tid_address` and writes its thread id
/// there; the kernel zeroes the word and wakes its futex the moment the
/// process starts to die, before it frees the process's memory (about
/// 100 ms per GiB) and long before the exit can be waited for. The agent
/// then reads the exit status from `/proc` and reports the exit at once.
pub const EXIT_WORD_ENV: &str = "LAZARUS_EXIT_WORD_FD";
/// The name of an exit word's memfd (`/proc/self/fd/N` links to
/// `/memfd:lazarus-exit-word (deleted)`): a worker arms only a descriptor
/// that is one.
pub const EXIT_WORD_NAME: &str = "lazarus-exit-word";

/// Bytes of the nonce a data receiver sends first.
pub const DATA_NONCE_LEN: usize = 16;
/// Bytes of a data sender's proof.
pub const DATA_PROOF_LEN: usize = 32;

/// A data sender's proof that it belongs to the attempt: HMAC-SHA256 under
/// the attempt's channel key over the receiver's fresh nonce and both
/// workers' names, so it cannot be replayed to another receiver or later.
pub fn data_proof(
    key: &[u8],
    nonce: &[u8],
    from: &WorkerId,
    to: &WorkerId,
) -> [u8; DATA_PROOF_LEN] {
    use aws_lc_rs::hmac;
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(b"lazarus-data-v1\0");
    ctx.update(nonce);
    ctx.update(from.as_str().as_bytes());
    ctx.update(b"\0");
    ctx.update(to.as_str().as_bytes());
    let mut out = [0u8; DATA_PROOF_LEN];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// Checks a proof in constant time.
pub fn verify_data_proof(
    key: &[u8],
    nonce: &[u8],
    from: &WorkerId,
    to: &WorkerId,
    proof: &[u8],
) -> bool {
    let expected = data_proof(key, nonce, from, to);
    proof.len() == expected.len()
        && proof
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Decodes a hex channel key; `None` if it is not hex.
pub fn decode_key(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a worker that reconnects to a new leader reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejoin {
    /// A primary past its handshake (processing).
    pub running: bool,
    /// The newest checkpoint it snapshotted (committed or not): the new
    /// leader's ids start above it.
    pub checkpoint: Option<CheckpointId>,
    /// A hot standby: the newest checkpoint it followed.
    pub followed: Option<CheckpointId>,
    /// A source that has no more input (it said so to the old leader).
    #[serde(default)]
    pub exhausted: bool,
}

/// What the agent writes to a worker's `LAZARUS_REJOIN_FILE` when a new
/// leader adopts the job: where to reconnect and with which credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinTicket {
    /// The new leader's control address for the job.
    pub supervisor: SocketAddr,
    /// A one-time credential for this process.
    pub token: String,
    /// The attempt the process now belongs to (a promoted standby's
    /// differs from the one it was started for).
    pub attempt: u64,
    /// Whether the process is (still) a hot standby.
    pub standby: bool,
}

/// Worker → supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToSupervisor {
    /// First message on a control connection.
    Hello {
        /// Who is speaking.
        worker: WorkerId,
        /// The restart attempt the worker was started for; stale workers are refused.
        attempt: u64,
        /// Started as a hot standby: it follows commits until promoted.
        #[serde(default)]
        standby: bool,
        /// The credential the supervisor issued for this one process (from
        /// `LAZARUS_TOKEN`); a hello without the right one is refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Set when a running worker reconnects to a new supervisor (a new
        /// HA leader adopting the job): where it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rejoin: Option<Rejoin>,
    },
    /// The worker restored its state and listens for inputs here.
    Listening {
        /// Data address.
        addr: SocketAddr,
        /// Bytes the restore read from the store: downloaded, or mapped in
        /// place from a local directory (0 when the local cache had every
        /// chunk, as for a promoted hot standby).
        #[serde(default)]
        fetched_bytes: u64,
        /// Records the restored checkpoint held in flight to this worker
        /// (processed before any new input).
        #[serde(default)]
        in_flight_records: u64,
        /// The epoch of the assignment this answers (see
        /// [`ToSupervisor::epoch`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
    },
    /// A hot standby restored checkpoint `checkpoint` into its local cache.
    Followed {
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// Bytes it downloaded for it (chunks it did not have yet).
        fetched_bytes: u64,
    },
    /// All channels are connected; processing.
    Running {
        /// The epoch of the assignment this answers (see
        /// [`ToSupervisor::epoch`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
    },
    /// Checkpoint `checkpoint` is snapshotted and uploaded.
    Ack {
        /// The checkpoint.
        checkpoint: CheckpointId,
        /// What the worker wrote (and reused).
        snapshot: WorkerSnapshot,
        /// How long processing was paused for the synchronous part, in µs.
        pause_us: u64,
        /// Records the worker had taken in (a source: emitted) when it
        /// snapshotted, counted from its assignment: what a source must
        /// emit again after a rollback to this checkpoint is its count at
        /// the failure minus this.
        #[serde(default)]
        records: u64,
    },
    /// A source emitted again everything it had emitted after the restored
    /// checkpoint before the failure (its assignment's `replay_records`):
    /// the job is back where it was.
    Replayed,
    /// A source has no more input.
    SourceExhausted,
    /// Liveness and progress.
    Heartbeat {
        /// Records taken in (sources: produced) since start.
        records_in: u64,
    },
    /// The worker cannot go on.
    Failed {
        /// Why.
        error: String,
        /// Restarting cannot help (a [`crate::Fatal`] error): the job ends.
        #[serde(default)]
        fatal: bool,
        /// The epoch of the assignment that failed (see
        /// [`ToSupervisor::epoch`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
    },
}

impl ToSupervisor {
    /// The epoch of the assignment a message answers, for the messages
    /// that say where an attempt stands (listening, running, failed).
    ///
    /// A process rolled back in place keeps its control connection across
    /// attempts, and what it sent before it read its `Halt` can arrive
    /// after the next attempt's assignment: the supervisor drops such a
    /// message when its epoch is not the one it last assigned. `None` from
    /// a worker that predates the field (nothing is dropped then).
    pub fn epoch(&self) -> Option<Epoch> {
        match self {
            ToSupervisor::Listening { epoch, .. }
            | ToSupervisor::Running { epoch }
            | ToSupervisor::Failed { epoch, .. } => *epoch,
            _ => None,
        }
    }
}

/// Supervisor → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// The worker's role.
    Assign(Box<Assignment>),
    /// Be a hot standby for this assignment: restore each checkpoint named
    /// by [`ToWorker::Follow`] into the local cache, and start processing
    /// when an [`ToWorker::Assign`] promotes this process.
    Standby(Box<Assignment>),
    /// Standbys: checkpoint `checkpoint` committed; fetch what it adds.
    Follow {
        /// The checkpoint.
        checkpoint: CheckpointId,
    },
    /// Data addresses of every worker: connect outputs and go.
    Start {
        /// Address of each worker.
        addrs: BTreeMap<WorkerId, SocketAddr>,
    },
    /// Sources: take checkpoint `checkpoint` now.
    Trigger {
        /// The checkpoint.
        checkpoint: CheckpointId,
    },
    /// Checkpoint committed: sinks publish output up to it.
    Committed {
        /// The checkpoint.
        checkpoint: CheckpointId,
    },
    /// Checkpoint abandoned.
    Abort {
        /// The checkpoint.
        checkpoint: CheckpointId,
    },
    /// Stop now.
    Shutdown,
    /// Stop the current assignment (drop its channels, its in-flight
    /// checkpoints and its state) and wait: a recovery that keeps this
    /// process sends the next attempt's [`ToWorker::Assign`] on this
    /// connection, and the worker restores and starts again in place.
    Halt,
    /// Take over another worker in this process (active-active takeover):
    /// start it beside this one, as a worker of its own toward the
    /// supervisor (its own hello with `token`, its own assignment, restore
    /// and VIP), while this worker goes on untouched. It ends when its
    /// control connection does; this process ending ends it too.
    Adopt {
        /// The worker taken over.
        worker: WorkerId,
        /// The attempt it starts for.
        attempt: u64,
        /// Its one-time credential.
        token: String,
    },
}

/// Writes one control frame.
pub async fn write_control<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(msg).map_err(|e| ProtocolError::Malformed {
        kind: "control",
        reason: e.to_string(),
    })?;
    if body.len() > MAX_CONTROL_FRAME {
        return Err(ProtocolError::TooLarge {
            kind: "control",
            len: body.len(),
            max: MAX_CONTROL_FRAME,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one length-prefixed frame body of at most `max` bytes; `None` on
/// a clean end of stream. The length is checked before anything is allocated.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    kind: &'static str,
    max: usize,
) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(ProtocolError::TooLarge { kind, len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Reads one control frame; `None` on a clean end of stream.
pub async fn read_control<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Option<T>, ProtocolError> {
    let Some(body) = read_frame(r, "control", MAX_CONTROL_FRAME).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ProtocolError::Malformed {
            kind: "control",
            reason: e.to_string(),
        })
}

/// A message on a data channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataMsg {
    /// First frame: who the sender is.
    Hello(WorkerId),
    /// Records.
    Batch(Vec<Record>),
    /// Checkpoint barrier, in-band after every record before the cut.
    Barrier(CheckpointId),
    /// The sender will send nothing more.
    End,
}

const TAG_HELLO: u8 = 0;
const TAG_BATCH: u8 = 1;
const TAG_BARRIER: u8 = 2;
const TAG_END: u8 = 3;

impl DataMsg {
    /// The length of this message's frame, length prefix included: what
    /// [`DataMsg::encode`] appends.
    pub(crate) fn encoded_len(&self) -> usize {
        4 + match self {
            DataMsg::Hello(w) => 1 + w.as_str().len(),
            DataMsg::Batch(records) => {
                5 + records
                    .iter()
                    .map(|r| 8 + r.key.len() + r.value.len())
                    .sum::<usize>()
            }
            DataMsg::Barrier(_) => 9,
            DataMsg::End => 1,
        }
    }

    /// Appends the frame of this message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 4]);
        match self {
            DataMsg::Hello(w) => {
                out.push(TAG_HELLO);
                out.extend_from_slice(w.as_str().as_bytes());
            }
            DataMsg::Batch(records) => {
                out.push(TAG_BATCH);
                out.extend_from_slice(&(records.len() as u32).to_le_bytes());
                for r in records {
                    out.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
                    out.extend_from_slice(&r.key);
                    out.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
                    out.extend_from_slice(&r.value);
                }
            }
            DataMsg::Barrier(id) => {
                out.push(TAG_BARRIER);
                out.extend_from_slice(&id.0.to_le_bytes());
            }
            DataMsg::End => out.push(TAG_END),
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The record count of a batch frame's body, without decoding it
    /// (`None` for any other frame).
    ///
    /// ```
    /// use lazarus_sdk::{protocol::DataMsg, Record};
    /// let mut frame = Vec::new();
    /// DataMsg::Batch(vec![Record::new("k", "v")]).encode(&mut frame);
    /// assert_eq!(DataMsg::batch_len(&frame[4..]), Some(1));
    /// ```
    pub fn batch_len(body: &[u8]) -> Option<u32> {
        match body {
            [TAG_BATCH, c0, c1, c2, c3, ..] => Some(u32::from_le_bytes([*c0, *c1, *c2, *c3])),
            _ => None,
        }
    }

    /// Decodes a frame body (after the length prefix).
    pub fn decode(body: &[u8]) -> Result<DataMsg, ProtocolError> {
        let bad = |reason: String| ProtocolError::Malformed {
            kind: "data",
            reason,
        };
        let (&tag, mut rest) = body
            .split_first()
            .ok_or_else(|| bad("empty frame".into()))?;
        // `what` is formatted only for an error: a `format!` per record
        // here was 6 % of a wordcount run's CPU.
        let mut take = |n: usize, what: &dyn std::fmt::Display| -> Result<&[u8], ProtocolError> {
            if rest.len() < n {
                return Err(bad(format!("{what}: needs {n} bytes, {} left", rest.len())));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let msg = match tag {
            TAG_HELLO => {
                let name = std::str::from_utf8(take(body.len() - 1, &"worker name")?)
                    .map_err(|_| bad("worker name is not UTF-8".into()))?;
                DataMsg::Hello(WorkerId::new(name).map_err(|e| bad(e.to_string()))?)
            }
            TAG_BATCH => {
                let count =
                    u32::from_le_bytes(take(4, &"record count")?.try_into().expect("4 bytes"))
                        as usize;
                // Each record needs at least 8 bytes of lengths: bound the
                // allocation by what the frame can actually hold.
                if count > body.len() / 8 {
                    return Err(bad(format!(
                        "batch claims {count} records in {} bytes",
                        body.len()
                    )));
                }
                let mut records = Vec::with_capacity(count);
                for i in 0..count {
                    let klen =
                        u32::from_le_bytes(take(4, &"key length")?.try_into().expect("4 bytes"))
                            as usize;
                    let key = take(klen, &format_args!("key of record {i}"))?.to_vec();
                    let vlen =
                        u32::from_le_bytes(take(4, &"value length")?.try_into().expect("4 bytes"))
                            as usize;
                    let value = take(vlen, &format_args!("value of record {i}"))?.to_vec();
                    records.push(Record { key, value });
                }
                DataMsg::Batch(records)
            }
            TAG_BARRIER => DataMsg::Barrier(CheckpointId(u64::from_le_bytes(
                take(8, &"checkpoint id")?.try_into().expect("8 bytes"),
            ))),
            TAG_END => DataMsg::End,
            other => return Err(bad(format!("unknown tag {other}"))),
        };
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        Ok(msg)
    }
}

/// Reads one data frame's body, not yet decoded ([`DataMsg::decode`]);
/// `None` on a clean end of stream.
pub(crate) async fn read_data_body<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, ProtocolError> {
    read_frame(r, "data", MAX_DATA_FRAME).await
}

/// Reads one data frame; `None` on a clean end of stream.
pub async fn read_data<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<DataMsg>, ProtocolError> {
    read_data_body(r)
        .await?
        .map(|body| DataMsg::decode(&body))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(msg: DataMsg) -> DataMsg {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        assert_eq!(buf.len(), msg.encoded_len(), "{msg:?}");
        let len = u32::from_le_bytes(buf[..4].try_into().expect("4")) as usize;
        assert_eq!(len, buf.len() - 4);
        DataMsg::decode(&buf[4..]).expect("decode")
    }

    #[test]
    fn test_data_messages_round_trip() {
        let w = WorkerId::new("tok-1").expect("w");
        assert_eq!(round_trip(DataMsg::Hello(w.clone())), DataMsg::Hello(w));
    }

    #[test]
    fn test_data_proof_binds_key_nonce_and_both_names() {
        let (a, b) = (
            WorkerId::new("a-0").expect("id"),
            WorkerId::new("b-0").expect("id"),
        );
        let key = decode_key(&"ab".repeat(32)).expect("hex");
        let nonce = [7u8; DATA_NONCE_LEN];
        let p = data_proof(&key, &nonce, &a, &b);
        assert!(verify_data_proof(&key, &nonce, &a, &b, &p));
        assert!(
            !verify_data_proof(&key, &[8u8; DATA_NONCE_LEN], &a, &b, &p),
            "another nonce"
        );
        assert!(
            !verify_data_proof(&key, &nonce, &b, &a, &p),
            "names swapped"
        );
        assert!(
            !verify_data_proof(&[1u8; 32], &nonce, &a, &b, &p),
            "another key"
        );
        assert!(
            !verify_data_proof(&key, &nonce, &a, &b, &p[..31]),
            "truncated"
        );
        assert_eq!(decode_key("zz"), None);
        assert_eq!(decode_key("abc"), None);
        assert_eq!(
            round_trip(DataMsg::Barrier(CheckpointId(9))),
            DataMsg::Barrier(CheckpointId(9))
        );
        assert_eq!(round_trip(DataMsg::End), DataMsg::End);
        let batch = DataMsg::Batch(vec![Record::new("k", "v"), Record::new("", "")]);
        assert_eq!(round_trip(batch.clone()), batch);
    }

    #[test]
    fn test_malformed_data_frames_are_named() {
        let err = DataMsg::decode(&[TAG_BATCH, 255, 255, 255, 255]).expect_err("huge count");
        assert!(err.to_string().contains("batch claims"), "{err}");
        let err = DataMsg::decode(&[9]).expect_err("tag");
        assert!(err.to_string().contains("unknown tag 9"), "{err}");
        let err = DataMsg::decode(&[TAG_BARRIER, 1, 2]).expect_err("short");
        assert!(err.to_string().contains("checkpoint id"), "{err}");
    }

    #[tokio::test]
    async fn test_control_frames_round_trip_and_reject_garbage() {
        let msg = ToSupervisor::Heartbeat { records_in: 5 };
        let mut buf = Vec::new();
        write_control(&mut buf, &msg).await.expect("write");
        let back: Option<ToSupervisor> = read_control(&mut buf.as_slice()).await.expect("read");
        assert_eq!(back, Some(msg));
        let mut garbage = 3u32.to_le_bytes().to_vec();
        garbage.extend_from_slice(b"{x}");
        let err = read_control::<_, ToSupervisor>(&mut garbage.as_slice())
            .await
            .expect_err("garbage");
        assert!(err.to_string().contains("malformed control frame"), "{err}");
        let huge = u32::MAX.to_le_bytes().to_vec();
        let err = read_control::<_, ToSupervisor>(&mut huge.as_slice())
            .await
            .expect_err("huge");
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    proptest! {
        #[test]
        fn prop_data_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = DataMsg::decode(&bytes);
        }
    }
}
