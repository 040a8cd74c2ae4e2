//! State held decoded in memory beside the chunks it was stored as, so that
//! a restore of the same chunk needs no read and no decode.
//!
//! The runtime keeps one entry per state part: the chunk it equals (key,
//! length and CRC of the decoded bytes) and what the state handed it, an
//! `Arc<dyn Any>` that is usually a handful of `Weak` pointers to the
//! state's own copy-on-write parts. Whether such a value still stands for
//! the chunk is the state's call: a weak pointer that no longer upgrades
//! means the part was changed (copy-on-write moved it) or dropped.
//!
//! Who fills it: the uploader after writing a fresh part (the state as of
//! that checkpoint), and a restore that decoded a part (the state as of the
//! restored checkpoint). Who reads it: a restore, through
//! [`crate::Restored::decoded`]; the runtime does not even map a part that
//! an entry covers.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lazarus_storage::ChunkRef;

/// A decoded state part as the state itself holds it (see
/// [`crate::Snapshot::add_fresh_decoded`] and [`crate::Restored::decoded`]).
pub type Decoded = Arc<dyn Any + Send + Sync>;

/// Gives back a state part's decoded value while it still equals the chunk
/// it was written as or restored from, `None` once it does not (see
/// [`crate::Snapshot::add_fresh_decoded`]).
pub type Revive = Arc<dyn Fn() -> Option<Decoded> + Send + Sync>;

/// What identifies a stored chunk's content: its key (which names the
/// checkpoint that wrote it, and keys are written once), its decoded length
/// and its CRC.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    key: String,
    raw_len: u64,
    raw_crc: u32,
}

impl Identity {
    fn of(chunk: &ChunkRef) -> Identity {
        Identity {
            key: chunk.key.clone(),
            raw_len: chunk.raw_len,
            raw_crc: chunk.raw_crc,
        }
    }
}

/// The decoded parts of one worker (shared by its assignments in one
/// process: a rollback in place restores from it).
#[derive(Clone, Default)]
pub(crate) struct DecodedParts {
    parts: Arc<Mutex<HashMap<String, (Identity, Revive)>>>,
}

impl std::fmt::Debug for DecodedParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.parts.lock().map_or(0, |p| p.len());
        write!(f, "DecodedParts({n} parts)")
    }
}

impl DecodedParts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Identity, Revive)>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The decoded content of exactly this chunk, if this process still
    /// holds it.
    pub(crate) fn get(&self, chunk: &ChunkRef) -> Option<Decoded> {
        let revive = {
            let parts = self.lock();
            let (identity, revive) = parts.get(chunk.name())?;
            if *identity != Identity::of(chunk) {
                return None;
            }
            revive.clone()
        };
        revive()
    }

    /// Keeps `value` as the way back to the decoded content of `chunk`
    /// (replacing what was kept for its part).
    pub(crate) fn keep(&self, chunk: &ChunkRef, value: Revive) {
        self.lock()
            .insert(chunk.name().to_string(), (Identity::of(chunk), value));
    }

    /// Forgets every part not named in `names` (the parts of the state
    /// restored now; others belong to key groups this worker no longer has).
    pub(crate) fn retain<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let keep: std::collections::HashSet<&str> = names.into_iter().collect();
        self.lock().retain(|name, _| keep.contains(name.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazarus_storage::Codec;

    fn chunk(key: &str, crc: u32) -> ChunkRef {
        ChunkRef {
            key: key.into(),
            codec: Codec::None,
            stored_len: 10,
            stored_crc: 0,
            raw_len: 4,
            raw_crc: crc,
        }
    }

    #[test]
    fn test_a_part_is_found_only_for_the_same_chunk() {
        let d = DecodedParts::default();
        let c5 = chunk("chunks/5/w/s-kg1.chunk", 7);
        let one: Decoded = Arc::new(1u32);
        d.keep(&c5, Arc::new(move || Some(one.clone())));
        assert!(d.get(&c5).is_some());
        // Another checkpoint's chunk of the same part, or other bytes.
        assert!(d.get(&chunk("chunks/6/w/s-kg1.chunk", 7)).is_none());
        assert!(d.get(&chunk("chunks/5/w/s-kg1.chunk", 8)).is_none());
        // A newer write of the part replaces the entry.
        let c6 = chunk("chunks/6/w/s-kg1.chunk", 9);
        let two: Decoded = Arc::new(2u32);
        d.keep(&c6, Arc::new(move || Some(two.clone())));
        assert!(d.get(&c5).is_none());
        assert!(d.get(&c6).is_some());
        // A part whose revive gives nothing is not held.
        let c7 = chunk("chunks/7/w/s-kg3.chunk", 1);
        d.keep(&c7, Arc::new(|| None));
        assert!(d.get(&c7).is_none());
        d.retain(["s-kg2"]);
        assert!(d.get(&c6).is_none());
    }
}
