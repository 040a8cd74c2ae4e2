//! State: what a snapshot hands the runtime, what a restore hands back, and
//! keyed state partitioned into key groups.
//!
//! A snapshot must not stop the world: [`Snapshot`] parts carry either a
//! closure that serializes *frozen* data later, on a blocking thread, or a
//! note that the part is unchanged since the previous checkpoint (the
//! runtime then references the chunk it already wrote: incremental
//! checkpoints). [`KeyedState`] freezes its key groups copy-on-write: a
//! snapshot clones one `Arc` per group, and the first write to a frozen
//! group after the snapshot copies that group only.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

use lazarus_storage::rkyv::{self, rancor};
use lazarus_storage::{CheckpointId, MappedChunk};

use crate::operator::{BoxError, Context};
use crate::record::{group_owner, key_group};

type Serializer = Box<dyn FnOnce() -> Result<bytes::Bytes, BoxError> + Send>;

/// One named part of a snapshot.
pub enum PartContent {
    /// Serialize this later, off the processing thread.
    Fresh(Serializer),
    /// Same bytes as the part of this name in the previous checkpoint.
    Unchanged,
}

/// What an operator's `snapshot` returns.
///
/// ```
/// use lazarus_sdk::Snapshot;
/// let mut s = Snapshot::with_metadata(b"offset=42".to_vec());
/// let frozen = std::sync::Arc::new(vec![1u8, 2, 3]);
/// s.add_fresh("buffer", move || Ok(frozen.as_ref().clone()));
/// s.add_unchanged("big-table");
/// assert_eq!(s.parts().len(), 2);
/// ```
#[derive(Default)]
pub struct Snapshot {
    parts: Vec<(String, PartContent)>,
    metadata: Vec<u8>,
}

impl Snapshot {
    /// A snapshot holding only metadata (for example a source position).
    pub fn with_metadata(metadata: Vec<u8>) -> Snapshot {
        Snapshot {
            parts: Vec::new(),
            metadata,
        }
    }

    /// Adds a part that `serialize` turns into bytes later, on a blocking thread.
    pub fn add_fresh<B: Into<bytes::Bytes>>(
        &mut self,
        name: impl Into<String>,
        serialize: impl FnOnce() -> Result<B, BoxError> + Send + 'static,
    ) {
        self.parts.push((
            name.into(),
            PartContent::Fresh(Box::new(move || serialize().map(Into::into))),
        ));
    }

    /// Adds a part unchanged since the previous checkpoint.
    pub fn add_unchanged(&mut self, name: impl Into<String>) {
        self.parts.push((name.into(), PartContent::Unchanged));
    }

    /// Sets the metadata.
    pub fn set_metadata(&mut self, metadata: Vec<u8>) {
        self.metadata = metadata;
    }

    /// Appends another snapshot's parts (metadata of `other` is ignored).
    pub fn extend(&mut self, other: Snapshot) {
        self.parts.extend(other.parts);
    }

    /// The parts.
    pub fn parts(&self) -> &[(String, PartContent)] {
        &self.parts
    }

    pub(crate) fn into_parts(self) -> (Vec<(String, PartContent)>, Vec<u8>) {
        (self.parts, self.metadata)
    }
}

/// A worker's restored state: named parts mapped from the local cache, and
/// the metadata.
#[derive(Debug, Default)]
pub struct Restored {
    checkpoint: Option<CheckpointId>,
    parts: BTreeMap<String, MappedChunk>,
    metadata: Vec<u8>,
}

impl Restored {
    pub(crate) fn new(
        checkpoint: CheckpointId,
        parts: BTreeMap<String, MappedChunk>,
        metadata: Vec<u8>,
    ) -> Restored {
        Restored {
            checkpoint: Some(checkpoint),
            parts,
            metadata,
        }
    }

    /// The checkpoint restored.
    pub fn checkpoint(&self) -> Option<CheckpointId> {
        self.checkpoint
    }

    /// The metadata stored with the snapshot.
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }

    /// A part's bytes (CRC-checked, memory-mapped), if the snapshot had it.
    pub fn part(&self, name: &str) -> Option<&[u8]> {
        self.parts.get(name).map(|c| c.bytes())
    }

    /// Names of the parts.
    pub fn part_names(&self) -> impl Iterator<Item = &str> {
        self.parts.keys().map(String::as_str)
    }
}

/// Serializes with rkyv (what [`KeyedState`] stores).
pub fn to_rkyv<T>(value: &T) -> Result<Vec<u8>, BoxError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    Ok(rkyv::to_bytes::<rancor::Error>(value)?.to_vec())
}

/// Keyed state: a map from key to `V`, partitioned into the job's key
/// groups; an instance holds only the groups it owns. Snapshots are
/// copy-on-write per group and incremental (groups untouched since the
/// previous checkpoint are not written again).
///
/// ```
/// use lazarus_sdk::{Context, KeyedState};
/// let ctx = Context::for_test("counter", 0, 1);
/// let mut counts: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
/// *counts.entry("word".to_string()).or_insert(0) += 1;
/// assert_eq!(counts.get(&"word".to_string()), Some(&1));
/// let snapshot = counts.snapshot();           // freezes; serializes later
/// assert_eq!(snapshot.parts().len(), 128);    // one part per owned key group
/// ```
pub struct KeyedState<K, V> {
    name: String,
    key_groups: u32,
    groups: BTreeMap<u32, Group<K, V>>,
}

struct Group<K, V> {
    map: Arc<HashMap<K, V>>,
    dirty: bool,
}

/// Keys of keyed state: their bytes decide the key group.
pub trait StateKey: Eq + Hash + Clone + Send + Sync + 'static {
    /// The bytes hashed for the key group (must match the record key).
    fn key_bytes(&self) -> &[u8];
}

impl StateKey for String {
    fn key_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl StateKey for Vec<u8> {
    fn key_bytes(&self) -> &[u8] {
        self
    }
}

impl<K, V> KeyedState<K, V>
where
    K: StateKey + rkyv::Archive,
    V: Clone + Send + Sync + 'static + rkyv::Archive,
    Vec<(K, V)>: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
    rkyv::Archived<Vec<(K, V)>>: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<Vec<(K, V)>, rkyv::rancor::Strategy<rkyv::de::Pool, rancor::Error>>,
{
    /// Empty state named `name` (part names derive from it), holding the key
    /// groups this instance owns.
    pub fn new(name: &str, ctx: &Context) -> KeyedState<K, V> {
        let groups = (0..ctx.key_groups)
            .filter(|g| group_owner(*g, ctx.key_groups, ctx.parallelism) == ctx.index)
            .map(|g| {
                (
                    g,
                    Group {
                        map: Arc::new(HashMap::new()),
                        dirty: true,
                    },
                )
            })
            .collect();
        KeyedState {
            name: name.to_string(),
            key_groups: ctx.key_groups,
            groups,
        }
    }

    fn part_name(&self, group: u32) -> String {
        format!("{}-kg{group}", self.name)
    }

    /// The owned key groups with their part names (collected, so the caller
    /// may mutate the groups while walking them).
    fn owned_parts(&self) -> Vec<(u32, String)> {
        self.groups
            .keys()
            .map(|g| (*g, self.part_name(*g)))
            .collect()
    }

    fn group_of(&self, key: &K) -> u32 {
        key_group(key.key_bytes(), self.key_groups)
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.groups
            .get(&self.group_of(key))
            .and_then(|g| g.map.get(key))
    }

    /// Mutable access to `key`'s slot; copies the key group first if a
    /// snapshot still holds it (copy-on-write).
    ///
    /// # Panics
    /// If this instance does not own the key's group: routing (hash edges)
    /// guarantees it does; a key arriving here otherwise is a bug in the job.
    pub fn entry(&mut self, key: K) -> std::collections::hash_map::Entry<'_, K, V> {
        let group = self.group_of(&key);
        let g = self.groups.get_mut(&group).unwrap_or_else(|| {
            panic!("key group {group} is not owned by this instance: is the input edge `hash`?")
        });
        g.dirty = true;
        Arc::make_mut(&mut g.map).entry(key)
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let group = self.group_of(key);
        let g = self.groups.get_mut(&group)?;
        g.dirty = true;
        Arc::make_mut(&mut g.map).remove(key)
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.groups.values().map(|g| g.map.len()).sum()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Freezes the state: O(key groups), independent of state size. Dirty
    /// groups are serialized later by the runtime, clean ones are referenced.
    pub fn snapshot(&mut self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (group, name) in self.owned_parts() {
            let g = self.groups.get_mut(&group).expect("listed above");
            if g.dirty {
                let frozen = Arc::clone(&g.map);
                g.dirty = false;
                snapshot.add_fresh(name, move || {
                    let entries: Vec<(K, V)> =
                        frozen.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    to_rkyv(&entries)
                });
            } else {
                snapshot.add_unchanged(name);
            }
        }
        snapshot
    }

    /// Restores the owned groups from `state` (validated rkyv archives).
    pub fn restore(&mut self, state: &Restored) -> Result<(), BoxError> {
        for (group, name) in self.owned_parts() {
            let Some(bytes) = state.part(&name) else {
                return Err(
                    format!("restored state has no part {name:?} for key group {group}").into(),
                );
            };
            let entries = rkyv::from_bytes::<Vec<(K, V)>, rancor::Error>(bytes)
                .map_err(|e| format!("state part {name:?} does not decode: {e}"))?;
            let g = self.groups.get_mut(&group).expect("listed above");
            g.map = Arc::new(entries.into_iter().collect());
            // Restored groups equal the stored chunks: reference them next time.
            g.dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize_all(s: Snapshot) -> BTreeMap<String, Option<bytes::Bytes>> {
        let (parts, _) = s.into_parts();
        parts
            .into_iter()
            .map(|(n, c)| {
                (
                    n,
                    match c {
                        PartContent::Fresh(f) => Some(f().expect("serialize")),
                        PartContent::Unchanged => None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn test_snapshot_is_copy_on_write_and_incremental() {
        let ctx = Context::for_test("c", 0, 1);
        let mut st: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        *st.entry("a".into()).or_insert(0) += 1;
        let first = st.snapshot();
        // Writes after the snapshot must not change what it serializes.
        *st.entry("a".into()).or_insert(0) += 10;
        let bytes = serialize_all(first);
        assert_eq!(
            bytes.values().filter(|b| b.is_some()).count(),
            128,
            "first snapshot writes every group"
        );
        let a_group = format!("counts-kg{}", key_group(b"a", 128));
        let entries = rkyv::from_bytes::<Vec<(String, u64)>, rancor::Error>(
            bytes[&a_group].as_ref().expect("fresh"),
        )
        .expect("decode");
        assert_eq!(entries, vec![("a".to_string(), 1)]);
        // Second snapshot: only the group of "a" is dirty.
        let second = serialize_all(st.snapshot());
        let fresh: Vec<_> = second
            .iter()
            .filter(|(_, b)| b.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(fresh, vec![a_group]);
    }

    #[test]
    fn test_instances_own_disjoint_groups() {
        let a: KeyedState<String, u64> = KeyedState::new("s", &Context::for_test("c", 0, 2));
        let b: KeyedState<String, u64> = KeyedState::new("s", &Context::for_test("c", 1, 2));
        assert_eq!(a.groups.len() + b.groups.len(), 128);
        assert!(a.groups.keys().all(|g| !b.groups.contains_key(g)));
    }
}
