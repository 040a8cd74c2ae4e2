//! [`ShortString`]: a string key held inline when it is short.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

use lazarus_storage::rkyv::{self, rancor, string::ArchivedString};

/// The longest string kept inline (bytes).
const INLINE: usize = 22;

/// A string that holds up to 22 bytes inline, with no heap allocation
/// and no pointer to follow, and longer ones on the heap. As a
/// [`KeyedState`](crate::KeyedState) key it saves what a `String` key
/// costs per entry: an allocation when the key is inserted, and a
/// cache miss on the key's bytes at every lookup and every checkpoint
/// (wordcount's words are almost all this short).
///
/// It is archived exactly as a `String` is (an `ArchivedString`), so
/// state written with `String` keys restores into `ShortString` keys and
/// the other way round. It hashes, compares and orders as its `&str`.
///
/// ```
/// use lazarus_sdk::{Context, KeyedState, ShortString};
/// let ctx = Context::for_test("counter", 0, 1);
/// let mut counts: KeyedState<ShortString, u64> = KeyedState::new("counts", &ctx);
/// let word = ShortString::from("checkpoint");
/// assert!(word.is_inline());
/// *counts.entry(word.clone()).or_insert(0) += 1;
/// assert_eq!(counts.get(&word), Some(&1));
/// let long = ShortString::from("a-word-longer-than-twenty-two-bytes");
/// assert!(!long.is_inline() && long.as_str().len() == 35);
/// ```
#[derive(Clone)]
pub struct ShortString(Repr);

#[derive(Clone)]
enum Repr {
    /// `len` bytes of UTF-8, then zeros: equal strings are equal arrays.
    Inline { len: u8, bytes: [u8; INLINE] },
    /// Longer than [`INLINE`] bytes (a string that short is never here).
    Heap(Box<str>),
}

impl ShortString {
    /// The string of `bytes`, if they are UTF-8.
    ///
    /// ```
    /// use lazarus_sdk::ShortString;
    /// assert_eq!(ShortString::from_utf8(b"word").unwrap().as_str(), "word");
    /// assert!(ShortString::from_utf8(&[0xff, 0xfe]).is_err());
    /// ```
    pub fn from_utf8(bytes: &[u8]) -> Result<ShortString, std::str::Utf8Error> {
        std::str::from_utf8(bytes).map(ShortString::from)
    }

    /// The string.
    ///
    /// ```
    /// use lazarus_sdk::ShortString;
    /// assert_eq!(ShortString::from("word").as_str(), "word");
    /// ```
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                let bytes = &bytes[..usize::from(*len)];
                // SAFETY: an inline string is only made by `From<&str>`,
                // which copies the bytes of a `&str`: valid UTF-8.
                unsafe { std::str::from_utf8_unchecked(bytes) }
            }
            Repr::Heap(s) => s,
        }
    }

    /// Whether the string is held inline (22 bytes or shorter).
    ///
    /// ```
    /// use lazarus_sdk::ShortString;
    /// assert!(ShortString::from("").is_inline());
    /// assert!(!ShortString::from("x".repeat(23).as_str()).is_inline());
    /// ```
    pub fn is_inline(&self) -> bool {
        matches!(self.0, Repr::Inline { .. })
    }
}

impl From<&str> for ShortString {
    fn from(s: &str) -> ShortString {
        if s.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            ShortString(Repr::Inline {
                len: s.len() as u8,
                bytes,
            })
        } else {
            ShortString(Repr::Heap(s.into()))
        }
    }
}

impl From<String> for ShortString {
    fn from(s: String) -> ShortString {
        if s.len() <= INLINE {
            ShortString::from(s.as_str())
        } else {
            ShortString(Repr::Heap(s.into_boxed_str()))
        }
    }
}

impl Default for ShortString {
    fn default() -> ShortString {
        ShortString::from("")
    }
}

impl std::ops::Deref for ShortString {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ShortString {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ShortString {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for ShortString {
    fn eq(&self, other: &ShortString) -> bool {
        match (&self.0, &other.0) {
            // Zero-padded: a fixed-size compare, no length-dependent loop.
            (Repr::Inline { len: a, bytes: x }, Repr::Inline { len: b, bytes: y }) => {
                a == b && x == y
            }
            (Repr::Heap(x), Repr::Heap(y)) => x == y,
            // A short string is always inline and a long one never is.
            _ => false,
        }
    }
}

impl Eq for ShortString {}

impl Hash for ShortString {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, which `Borrow<str>` requires.
        self.as_str().hash(state);
    }
}

impl PartialOrd for ShortString {
    fn partial_cmp(&self, other: &ShortString) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ShortString {
    fn cmp(&self, other: &ShortString) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::fmt::Debug for ShortString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for ShortString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl crate::state::StateKey for ShortString {
    fn key_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl rkyv::Archive for ShortString {
    type Archived = ArchivedString;
    type Resolver = rkyv::string::StringResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        ArchivedString::resolve_from_str(self.as_str(), resolver, out);
    }
}

impl<S> rkyv::Serialize<S> for ShortString
where
    S: rancor::Fallible + ?Sized,
    S::Error: rancor::Source,
    str: rkyv::SerializeUnsized<S>,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        ArchivedString::serialize_from_str(self.as_str(), serializer)
    }
}

impl<D: rancor::Fallible + ?Sized> rkyv::Deserialize<ShortString, D> for ArchivedString {
    fn deserialize(&self, _: &mut D) -> Result<ShortString, D::Error> {
        Ok(ShortString::from(self.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn test_short_and_long_strings_keep_their_text_and_compare_as_str() {
        for s in [
            "",
            "a",
            "twenty-two bytes long.",
            "twenty-three bytes long",
            "ünïcödé wörds ärë fïnë hërë",
        ] {
            let k = ShortString::from(s);
            assert_eq!(k.as_str(), s);
            assert_eq!(k.is_inline(), s.len() <= INLINE, "{s:?}");
            assert_eq!(k, ShortString::from(s.to_string()));
            assert_eq!(format!("{k}"), s);
        }
        assert_ne!(ShortString::from("ab"), ShortString::from("abc"));
        assert_ne!(ShortString::from("a\0"), ShortString::from("a"));
        assert!(ShortString::from("apple") < ShortString::from("banana"));
        // Hashes as str: a map keyed by it is looked up by &str.
        let mut map = HashMap::new();
        map.insert(ShortString::from("word"), 1);
        map.insert(ShortString::from("x".repeat(40)), 2);
        assert_eq!(map.get("word"), Some(&1));
        assert_eq!(map.get("x".repeat(40).as_str()), Some(&2));
    }

    #[test]
    fn test_it_archives_as_a_string_does_and_restores_from_one() {
        for s in ["word", "a-word-much-longer-than-the-inline-limit"] {
            let ours = rkyv::to_bytes::<rancor::Error>(&ShortString::from(s)).expect("archive");
            let theirs = rkyv::to_bytes::<rancor::Error>(&s.to_string()).expect("archive");
            assert_eq!(ours.as_slice(), theirs.as_slice());
            let back: ShortString =
                rkyv::from_bytes::<ShortString, rancor::Error>(&theirs).expect("restore");
            assert_eq!(back.as_str(), s);
        }
    }
}
