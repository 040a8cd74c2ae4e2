//! Records, the emitter operators write them to, and key-group routing.

/// One record: a key (used for hash partitioning and keyed state) and a value.
///
/// ```
/// use lazarus_sdk::Record;
/// let r = Record::new("word", "1");
/// assert_eq!(r.key_str(), Some("word"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Record {
    /// The key; empty when the record has none.
    pub key: Vec<u8>,
    /// The payload.
    pub value: Vec<u8>,
}

impl Record {
    /// A record from anything that turns into bytes.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Record {
        Record {
            key: key.into(),
            value: value.into(),
        }
    }

    /// The key as UTF-8, if it is.
    pub fn key_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.key).ok()
    }

    /// The value as UTF-8, if it is.
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

/// Where an operator or source puts the records it produces. The runtime
/// routes them over the output edges after the call returns.
///
/// ```
/// use lazarus_sdk::{Emitter, Record};
/// let mut out = Emitter::default();
/// out.emit(Record::new("k", "v"));
/// assert_eq!(out.len(), 1);
/// ```
#[derive(Debug, Default)]
pub struct Emitter {
    pub(crate) records: Vec<Record>,
}

impl Emitter {
    /// Emits one record.
    pub fn emit(&mut self, record: Record) {
        self.records.push(record);
    }

    /// Records emitted and not yet routed.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing is waiting to be routed.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records emitted and not yet routed, in order: for testing what
    /// an operator emits.
    ///
    /// ```
    /// use lazarus_sdk::{Emitter, Record};
    /// let mut out = Emitter::default();
    /// out.emit(Record::new("word", "word\t1"));
    /// assert_eq!(out.records()[0].value_str(), Some("word\t1"));
    /// ```
    pub fn records(&self) -> &[Record] {
        &self.records
    }
}

/// The key group of `key`: CRC-32 of the key modulo the job's key groups.
/// Deterministic across processes and hosts (unlike std's hasher).
///
/// ```
/// assert_eq!(lazarus_sdk::key_group(b"word", 128), lazarus_sdk::key_group(b"word", 128));
/// assert!(lazarus_sdk::key_group(b"word", 128) < 128);
/// ```
pub fn key_group(key: &[u8], key_groups: u32) -> u32 {
    crc32fast::hash(key) % key_groups.max(1)
}

/// The instance (of `parallelism`) that owns key group `group`: contiguous
/// ranges of key groups per instance, so state can later be redistributed by
/// moving whole groups.
///
/// ```
/// assert_eq!(lazarus_sdk::group_owner(0, 128, 2), 0);
/// assert_eq!(lazarus_sdk::group_owner(127, 128, 2), 1);
/// ```
pub fn group_owner(group: u32, key_groups: u32, parallelism: u32) -> u32 {
    (u64::from(group) * u64::from(parallelism) / u64::from(key_groups.max(1))) as u32
}
