//! Barriers found by reading ahead, and the records in flight they cut.
//!
//! Aligned barriers travel behind every record queued before them: under
//! backpressure a barrier waits for the whole queue of every channel on
//! its way to be *processed* (wordcount measured 100 ms of its 130 ms
//! checkpoint latency there). When the supervisor announces checkpoint
//! `n` (a `Trigger` reaches every worker, not only the sources), a worker
//! with inputs stops processing and reads its inputs ahead, without
//! processing, until it has found the next barrier on every open input.
//! Reading is memory speed, so the barrier wave crosses the job in
//! milliseconds. The worker then snapshots its state as it stands, and the
//! records it read ahead of each barrier become part of the checkpoint
//! (the channel state of Chandy–Lamport, as in Flink's unaligned
//! checkpoints): they are processed right after the snapshot and, after a
//! restore, before any new input. The barrier still never overtakes a
//! record on its own channel, so a cut is consistent for the same reason
//! as an aligned one.
//!
//! This module is the pure part: the read-ahead queues, when they make a
//! cut, and the encoding of the records in flight in a checkpoint.

use std::collections::VecDeque;

use lazarus_storage::CheckpointId;

use crate::align::{BarrierAligner, InputState};
use crate::protocol::{DataMsg, ProtocolError};
use crate::record::{group_owner, key_group, Record};

/// The name of the state part that holds a worker's records in flight.
/// Operators cannot use it: their parts are refused under this prefix.
pub(crate) const PART: &str = crate::protocol::IN_FLIGHT_PART;

/// Part names reserved for the runtime.
pub(crate) const RESERVED_PREFIX: &str = "_lazarus.";

/// Refuses an operator's snapshot that names a part in the runtime's
/// space, as fatal: restarting would not rename it.
pub(crate) fn check_part_names<'a>(
    mut names: impl Iterator<Item = &'a str>,
) -> Result<(), crate::operator::Fatal> {
    match names.find(|name| name.starts_with(RESERVED_PREFIX)) {
        Some(name) => Err(crate::operator::Fatal::new(format!(
            "state part {name:?}: names starting with {RESERVED_PREFIX:?} are the runtime's"
        ))),
        None => Ok(()),
    }
}

/// Bytes of records read ahead (over all inputs) after which a worker
/// gives up reading ahead for this checkpoint and aligns as before: a
/// barrier that does not come (a source that stopped emitting them) must
/// not make a worker buffer its inputs without end.
pub(crate) const AHEAD_LIMIT: usize = 32 << 20;

/// What an input yields: a message, its end (`None`), or a broken frame.
pub(crate) type InputItem = Option<Result<DataMsg, ProtocolError>>;

/// What reading one item ahead did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ahead {
    /// Keep reading.
    More,
    /// Reading ahead for this checkpoint is over (an input ended or broke,
    /// barriers disagree, or the limit is reached): process in order.
    GiveUp(&'static str),
}

/// Messages read from each input but not yet processed.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    queues: Vec<VecDeque<InputItem>>,
    /// The first barrier in each queue.
    barrier: Vec<Option<CheckpointId>>,
    /// The queue ends with the input's end (or a broken frame).
    ended: Vec<bool>,
    bytes: usize,
}

fn record_bytes(records: &[Record]) -> usize {
    records
        .iter()
        .map(|r| r.key.len() + r.value.len() + 8)
        .sum()
}

impl ReadAhead {
    pub(crate) fn new(inputs: usize) -> ReadAhead {
        ReadAhead {
            queues: (0..inputs).map(|_| VecDeque::new()).collect(),
            barrier: vec![None; inputs],
            ended: vec![false; inputs],
            bytes: 0,
        }
    }

    /// Whether input `i` has messages waiting here (its channel must not
    /// be read before they are processed).
    pub(crate) fn has(&self, i: usize) -> bool {
        !self.queues[i].is_empty()
    }

    /// Whether reading ahead must not read input `i` now: its next barrier
    /// (or its end) is already here.
    pub(crate) fn found(&self, i: usize) -> bool {
        self.barrier[i].is_some() || self.ended[i]
    }

    /// The next message of input `i` to process, if one is waiting.
    pub(crate) fn pop(&mut self, i: usize) -> Option<InputItem> {
        let item = self.queues[i].pop_front()?;
        match &item {
            Some(Ok(DataMsg::Batch(records))) => self.bytes -= record_bytes(records),
            Some(Ok(DataMsg::Barrier(_))) => {
                // The next barrier, if any, is further back.
                self.barrier[i] = self.queues[i].iter().find_map(|m| match m {
                    Some(Ok(DataMsg::Barrier(n))) => Some(*n),
                    _ => None,
                });
            }
            _ => {}
        }
        if self.queues[i].is_empty() {
            self.ended[i] = false;
        }
        Some(item)
    }

    /// Keeps `item`, read ahead from input `i`, which had not shown its
    /// next barrier yet.
    pub(crate) fn push(&mut self, i: usize, item: InputItem) -> Ahead {
        let verdict = match &item {
            Some(Ok(DataMsg::Batch(records))) => {
                self.bytes += record_bytes(records);
                if self.bytes > AHEAD_LIMIT {
                    Ahead::GiveUp("read-ahead limit reached")
                } else {
                    Ahead::More
                }
            }
            Some(Ok(DataMsg::Barrier(n))) => {
                let other = self.barrier.iter().flatten().any(|m| m != n);
                self.barrier[i] = Some(*n);
                if other {
                    Ahead::GiveUp("inputs show different barriers")
                } else {
                    Ahead::More
                }
            }
            Some(Ok(DataMsg::Hello(_))) | Some(Ok(DataMsg::End)) | Some(Err(_)) | None => {
                self.ended[i] = true;
                Ahead::GiveUp("an input ended")
            }
        };
        self.queues[i].push_back(item);
        verdict
    }

    /// The checkpoint to snapshot now, if every open input has shown the
    /// same next barrier: here, or processed already (the aligner holds
    /// that input). `None` while an input has not.
    pub(crate) fn cut(&self, aligner: &BarrierAligner) -> Option<CheckpointId> {
        let mut at = aligner.aligning();
        let mut here = false;
        for i in 0..self.queues.len() {
            let n = match aligner.input(i) {
                InputState::Closed => continue,
                InputState::Held => aligner.aligning()?,
                InputState::Open => {
                    here = true;
                    self.barrier[i]?
                }
            };
            if *at.get_or_insert(n) != n {
                return None;
            }
        }
        // Without a barrier read ahead there is nothing to cut here: the
        // aligner completes on its own.
        at.filter(|_| here)
    }

    /// Cuts at barrier `n` (every open input shows it, see
    /// [`ReadAhead::cut`]): removes those barriers and returns the records
    /// ahead of them, encoded as the checkpoint's in-flight part (empty when
    /// there are none). The records stay queued, to be processed next.
    pub(crate) fn take_cut(&mut self, n: CheckpointId) -> Vec<u8> {
        let mut part = Vec::new();
        for i in 0..self.queues.len() {
            if self.barrier[i] != Some(n) {
                continue;
            }
            let at = self.queues[i]
                .iter()
                .position(|m| matches!(m, Some(Ok(DataMsg::Barrier(b))) if *b == n))
                .expect("the barrier was read ahead");
            for m in self.queues[i].range(..at) {
                if let Some(Ok(msg @ DataMsg::Batch(_))) = m {
                    msg.encode(&mut part);
                }
            }
            self.queues[i].remove(at);
            self.barrier[i] = self.queues[i].iter().skip(at).find_map(|m| match m {
                Some(Ok(DataMsg::Barrier(b))) => Some(*b),
                _ => None,
            });
        }
        part
    }
}

/// The records in flight a restore hands to a worker: decoded already (a
/// rescale sorts them by owner, a standby decodes while it follows), or
/// the part's bytes, decoded only when the worker processes them, after it
/// reports running: a recovery's restore does not wait for them.
#[derive(Debug)]
pub(crate) enum InFlight {
    Records(Vec<Record>),
    /// The part of checkpoint `checkpoint` (named by a decoding error).
    Part {
        checkpoint: u64,
        bytes: bytes::Bytes,
    },
}

impl Default for InFlight {
    fn default() -> InFlight {
        InFlight::Records(Vec::new())
    }
}

impl InFlight {
    /// How many records (a part's frames are counted, not decoded).
    pub(crate) fn len(&self) -> u64 {
        match self {
            InFlight::Records(r) => r.len() as u64,
            InFlight::Part { bytes, .. } => frames(bytes)
                .filter_map(|body| DataMsg::batch_len(body.ok()?))
                .map(u64::from)
                .sum(),
        }
    }

    /// The records, decoded now if they were not.
    pub(crate) fn into_records(self) -> Result<Vec<Record>, String> {
        match self {
            InFlight::Records(r) => Ok(r),
            InFlight::Part { checkpoint, bytes } => {
                decode(&bytes).map_err(|e| format!("checkpoint {checkpoint}: {e}"))
            }
        }
    }
}

/// The records of an in-flight part, in the order they were read (input
/// by input). A part that does not decode is refused, naming what is
/// wrong: a restore never processes half a channel.
pub(crate) fn decode(part: &[u8]) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    for body in frames(part) {
        match DataMsg::decode(body?) {
            Ok(DataMsg::Batch(batch)) => records.extend(batch),
            Ok(other) => {
                return Err(format!(
                    "in-flight records: a {} frame where only records belong",
                    match other {
                        DataMsg::Hello(_) => "hello",
                        DataMsg::Barrier(_) => "barrier",
                        _ => "end",
                    }
                ))
            }
            Err(e) => return Err(format!("in-flight records: {e}")),
        }
    }
    Ok(records)
}

/// The bodies of the length-prefixed frames of an in-flight part; a
/// truncated one ends it with an error naming what is wrong.
fn frames(part: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> {
    let mut rest = part;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(len) = rest.get(..4) else {
            let stray = rest.len();
            rest = &[];
            return Some(Err(format!(
                "in-flight records: {stray} stray bytes at the end"
            )));
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        match rest[4..].get(..len) {
            Some(body) => {
                rest = &rest[4 + len..];
                Some(Ok(body))
            }
            None => {
                let left = rest.len() - 4;
                rest = &[];
                Some(Err(format!(
                    "in-flight records: a frame of {len} bytes with {left} left"
                )))
            }
        }
    })
}

/// After a rescale: which of the records in flight to old instance
/// `old_index` instance `index` of `parallelism` takes. A keyed record goes
/// to the owner of its key group (as a hash edge would send it); one
/// without a key to instance `old_index % parallelism`.
pub(crate) fn rescaled(
    records: Vec<Record>,
    old_index: u32,
    key_groups: u32,
    index: u32,
    parallelism: u32,
) -> Vec<Record> {
    records
        .into_iter()
        .filter(|r| {
            let owner = if r.key.is_empty() {
                old_index % parallelism.max(1)
            } else {
                group_owner(key_group(&r.key, key_groups), key_groups, parallelism)
            };
            owner == index
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(words: &[&str]) -> InputItem {
        Some(Ok(DataMsg::Batch(
            words.iter().map(|w| Record::new(*w, "")).collect(),
        )))
    }

    fn barrier(n: u64) -> InputItem {
        Some(Ok(DataMsg::Barrier(CheckpointId(n))))
    }

    fn keys(records: &[Record]) -> Vec<&str> {
        records
            .iter()
            .map(|r| r.key_str().expect("utf-8"))
            .collect()
    }

    #[test]
    fn test_a_cut_needs_the_same_barrier_on_every_open_input() {
        let aligner = BarrierAligner::new(2);
        let mut ra = ReadAhead::new(2);
        assert_eq!(ra.push(0, batch(&["a", "b"])), Ahead::More);
        assert_eq!(ra.push(0, barrier(3)), Ahead::More);
        assert!(ra.found(0) && !ra.found(1));
        assert_eq!(ra.cut(&aligner), None, "input 1 has not shown it");
        assert_eq!(ra.push(1, batch(&["c"])), Ahead::More);
        assert_eq!(ra.cut(&aligner), None);
        assert_eq!(ra.push(1, barrier(3)), Ahead::More);
        assert_eq!(ra.cut(&aligner), Some(CheckpointId(3)));

        let part = ra.take_cut(CheckpointId(3));
        assert_eq!(
            keys(&decode(&part).expect("decodes")),
            ["a", "b", "c"],
            "what was ahead of each barrier, input by input"
        );
        assert!(!ra.found(0) && !ra.found(1), "the barriers are gone");
        // The records stay, to be processed next, in order.
        let Some(Some(Ok(DataMsg::Batch(first)))) = ra.pop(0) else {
            panic!("records stay queued")
        };
        assert_eq!(keys(&first), ["a", "b"]);
        assert!(ra.pop(0).is_none(), "nothing behind the barrier was read");
        assert!(ra.has(1));
    }

    #[test]
    fn test_an_input_the_aligner_holds_counts_as_at_its_barrier() {
        let mut aligner = BarrierAligner::new(3);
        assert_eq!(aligner.on_barrier(0, CheckpointId(5)), Ok(None));
        aligner.on_closed(2);
        let mut ra = ReadAhead::new(3);
        assert_eq!(ra.cut(&aligner), None, "nothing read ahead: no cut here");
        ra.push(1, batch(&["x"]));
        ra.push(1, barrier(5));
        assert_eq!(ra.cut(&aligner), Some(CheckpointId(5)));

        let mut other = ReadAhead::new(3);
        other.push(1, barrier(6));
        assert_eq!(other.cut(&aligner), None, "held at 5, found 6: no cut");
    }

    #[test]
    fn test_reading_ahead_gives_up_on_an_end_a_mismatch_or_the_limit() {
        let mut ra = ReadAhead::new(2);
        ra.push(0, barrier(1));
        assert!(matches!(ra.push(1, barrier(2)), Ahead::GiveUp(_)));

        let mut ra = ReadAhead::new(1);
        assert!(matches!(
            ra.push(0, Some(Ok(DataMsg::End))),
            Ahead::GiveUp(_)
        ));
        assert!(ra.found(0), "an ended input is not read further");
        assert!(matches!(ra.pop(0), Some(Some(Ok(DataMsg::End)))));
        assert!(!ra.found(0));

        let mut ra = ReadAhead::new(1);
        let big = Record::new(Vec::new(), vec![0u8; 1 << 20]);
        let mut verdict = Ahead::More;
        for _ in 0..64 {
            verdict = ra.push(0, Some(Ok(DataMsg::Batch(vec![big.clone()]))));
            if verdict != Ahead::More {
                break;
            }
        }
        assert_eq!(verdict, Ahead::GiveUp("read-ahead limit reached"));
        while ra.pop(0).is_some() {}
        assert_eq!(ra.bytes, 0, "popping gives the budget back");
    }

    #[test]
    fn test_a_later_barrier_read_ahead_is_found_again_after_the_cut() {
        let aligner = BarrierAligner::new(1);
        let mut ra = ReadAhead::new(1);
        ra.push(0, batch(&["a"]));
        ra.push(0, barrier(1));
        assert_eq!(ra.cut(&aligner), Some(CheckpointId(1)));
        ra.take_cut(CheckpointId(1));
        ra.push(0, batch(&["b"]));
        ra.push(0, barrier(2));
        assert_eq!(ra.cut(&aligner), Some(CheckpointId(2)));
        assert_eq!(
            keys(&decode(&ra.take_cut(CheckpointId(2))).expect("decodes")),
            ["a", "b"],
            "records not yet processed are in flight for the next cut too"
        );
    }

    #[test]
    fn test_an_operator_part_in_the_runtimes_names_is_refused_as_fatal() {
        assert!(check_part_names(["counts-kg0", "buffer"].into_iter()).is_ok());
        let err =
            check_part_names(["counts-kg0", "_lazarus.mine"].into_iter()).expect_err("reserved");
        assert!(err.to_string().contains("\"_lazarus.mine\""), "{err}");
        assert!(err.to_string().contains("the runtime's"), "{err}");
    }

    #[test]
    fn test_a_damaged_in_flight_part_is_refused_by_name() {
        let mut part = Vec::new();
        DataMsg::Batch(vec![Record::new("k", "v")]).encode(&mut part);
        assert_eq!(decode(&part).expect("decodes").len(), 1);
        assert!(decode(&part[..part.len() - 1])
            .expect_err("truncated")
            .contains("in-flight records"));
        let mut barrier = Vec::new();
        DataMsg::Barrier(CheckpointId(1)).encode(&mut barrier);
        assert!(decode(&barrier)
            .expect_err("a barrier")
            .contains("barrier frame"));
        assert!(decode(&[1, 0]).expect_err("stray").contains("stray"));
        assert_eq!(decode(&[]).expect("empty"), Vec::<Record>::new());
    }

    #[test]
    fn test_a_part_counts_its_records_without_decoding_them() {
        let mut part = Vec::new();
        DataMsg::Batch(vec![Record::new("a", ""), Record::new("b", "")]).encode(&mut part);
        DataMsg::Batch(vec![Record::new("c", "x")]).encode(&mut part);
        let held = InFlight::Part {
            checkpoint: 4,
            bytes: bytes::Bytes::from(part.clone()),
        };
        assert_eq!(held.len(), 3);
        assert_eq!(
            keys(&held.into_records().expect("decodes")),
            ["a", "b", "c"]
        );
        assert_eq!(InFlight::default().len(), 0);
        // Damaged, it is refused when decoded, naming its checkpoint.
        part.truncate(part.len() - 1);
        let damaged = InFlight::Part {
            checkpoint: 4,
            bytes: bytes::Bytes::from(part),
        };
        let e = damaged.into_records().expect_err("truncated");
        assert!(e.starts_with("checkpoint 4: in-flight records:"), "{e}");
    }

    #[test]
    fn test_after_a_rescale_each_record_goes_to_one_new_instance() {
        let records: Vec<Record> = (0..200)
            .map(|i| Record::new(format!("k{i}"), ""))
            .chain((0..3).map(|_| Record::new(Vec::new(), "keyless")))
            .collect();
        let (kg, p) = (128, 3);
        let mut taken = 0;
        for index in 0..p {
            let mine = rescaled(records.clone(), 4, kg, index, p);
            for r in &mine {
                if !r.key.is_empty() {
                    assert_eq!(group_owner(key_group(&r.key, kg), kg, p), index);
                } else {
                    assert_eq!(index, 4 % p);
                }
            }
            taken += mine.len();
        }
        assert_eq!(taken, records.len(), "every record exactly once");
    }
}
