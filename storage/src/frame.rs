//! The frame: how every stored object is laid out (see `docs/format.md`).
//!
//! ```text
//! offset  size  field
//!      0     4  magic "LZRF"
//!      4     2  format version (1), little-endian
//!      6     1  codec: 0 none, 1 zstd
//!      7     1  kind: 1 chunk, 2 manifest, 3 epoch marker
//!      8     8  payload length as stored
//!     16     8  raw (uncompressed) payload length
//!     24     4  CRC-32 (IEEE) of the stored payload
//!     28     4  CRC-32 of bytes 0..28 (the header itself)
//!     32     …  payload
//! ```
//!
//! The header is 32 bytes so that a payload in a page-aligned memory map starts
//! 32-byte aligned, which is what rkyv needs to read it in place.
//!
//! Two ways to read a frame, both of which refuse to hand out a byte before
//! every check passed:
//! - [`decode`] for small objects held in memory (manifests, markers);
//! - [`FrameReader`] for chunks streamed from the store into a sink (a cache
//!   file or nothing, for `verify`), checking as the bytes pass.

use std::io::{self, Write};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{CorruptReason, Result, StorageError};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"LZRF";
/// The frame format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the fixed header; the payload starts here.
pub const HEADER_LEN: usize = 32;

/// How a frame's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Stored as is.
    None,
    /// Compressed with zstd at the given level (the level is not stored: any
    /// level decodes the same).
    Zstd,
}

impl Codec {
    fn to_byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Codec> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Codec> {
        match s {
            "none" => Ok(Codec::None),
            "zstd" => Ok(Codec::Zstd),
            other => Err(StorageError::InvalidArgument {
                what: "codec",
                reason: format!("{other:?} is not a codec; expected \"none\" or \"zstd\""),
            }),
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Codec::None => "none",
            Codec::Zstd => "zstd",
        })
    }
}

/// What a frame holds; a reader names the kind it expects, so a manifest can
/// never be mistaken for a chunk or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Worker state.
    Chunk,
    /// A checkpoint manifest.
    Manifest,
    /// An epoch marker (fencing).
    EpochMarker,
    /// A savepoint: a name pinning a committed checkpoint against retention.
    Savepoint,
}

impl FrameKind {
    fn to_byte(self) -> u8 {
        match self {
            FrameKind::Chunk => 1,
            FrameKind::Manifest => 2,
            FrameKind::EpochMarker => 3,
            FrameKind::Savepoint => 4,
        }
    }

    fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Chunk),
            2 => Some(FrameKind::Manifest),
            3 => Some(FrameKind::EpochMarker),
            4 => Some(FrameKind::Savepoint),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FrameKind::Chunk => "chunk",
            FrameKind::Manifest => "manifest",
            FrameKind::EpochMarker => "epoch marker",
            FrameKind::Savepoint => "savepoint",
        }
    }
}

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload encoding.
    pub codec: Codec,
    /// What the frame holds.
    pub kind: FrameKind,
    /// Payload length as stored.
    pub payload_len: u64,
    /// Payload length after decoding.
    pub raw_len: u64,
    /// CRC-32 of the stored payload.
    pub payload_crc: u32,
}

impl FrameHeader {
    /// The 32 header bytes, header CRC included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[6] = self.codec.to_byte();
        h[7] = self.kind.to_byte();
        h[8..16].copy_from_slice(&self.payload_len.to_le_bytes());
        h[16..24].copy_from_slice(&self.raw_len.to_le_bytes());
        h[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a header: magic, version, header CRC, codec, kind.
    /// `key` names the object in errors.
    pub fn decode(key: &str, expected: FrameKind, bytes: &[u8]) -> Result<FrameHeader> {
        let corrupt = |reason| StorageError::corrupt(key, reason);
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(CorruptReason::ShortHeader {
                len: bytes.len() as u64,
                header: HEADER_LEN,
            }));
        }
        let h = &bytes[..HEADER_LEN];
        let magic: [u8; 4] = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(corrupt(CorruptReason::BadMagic {
                found: magic,
                expected: MAGIC,
            }));
        }
        let le_u64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let le_u32 = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        // The header CRC is checked before any field is trusted, so a flipped
        // version or codec byte reads as corruption, not as "unknown version".
        let stored = le_u32(28);
        let computed = crc32fast::hash(&h[0..28]);
        if stored != computed {
            return Err(corrupt(CorruptReason::HeaderCrc { stored, computed }));
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != FORMAT_VERSION {
            return Err(corrupt(CorruptReason::UnknownVersion(version)));
        }
        let codec = Codec::from_byte(h[6]).ok_or(corrupt(CorruptReason::UnknownCodec(h[6])))?;
        let kind = FrameKind::from_byte(h[7]).ok_or(corrupt(CorruptReason::WrongKind {
            found: "frame of unknown kind",
            expected: expected.name(),
        }))?;
        if kind != expected {
            return Err(corrupt(CorruptReason::WrongKind {
                found: kind.name(),
                expected: expected.name(),
            }));
        }
        let header = FrameHeader {
            codec,
            kind,
            payload_len: le_u64(8),
            raw_len: le_u64(16),
            payload_crc: le_u32(24),
        };
        if codec == Codec::None && header.raw_len != header.payload_len {
            return Err(corrupt(CorruptReason::Length {
                expected: header.payload_len,
                actual: header.raw_len,
            }));
        }
        Ok(header)
    }
}

/// A frame ready to be stored: header plus payload, and the CRC of the raw
/// (decoded) payload, which manifests record so a restored cache file can be
/// checked without the stored object.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// The header bytes.
    pub header: [u8; HEADER_LEN],
    /// The stored payload. For [`Codec::None`] this shares the caller's buffer.
    pub payload: Bytes,
    /// Length of the raw payload.
    pub raw_len: u64,
    /// CRC-32 of the raw payload.
    pub raw_crc: u32,
    /// CRC-32 of the stored payload.
    pub payload_crc: u32,
}

impl EncodedFrame {
    /// Total object length: header plus stored payload.
    pub fn len(&self) -> u64 {
        HEADER_LEN as u64 + self.payload.len() as u64
    }

    /// Whether the frame is empty (never: it always has a header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The frame as one contiguous buffer (for small objects and tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len() as usize);
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&self.payload);
        v
    }
}

/// Encodes `raw` as a frame. CPU-heavy for large inputs (CRC, compression):
/// call it from a blocking thread.
pub fn encode(kind: FrameKind, codec: Codec, zstd_level: i32, raw: Bytes) -> Result<EncodedFrame> {
    encode_with(kind, codec, zstd_level, raw, || {})
}

/// [`encode`], calling `between` after every 256 KiB the CRC has covered
/// (background work offers its core there).
pub fn encode_with(
    kind: FrameKind,
    codec: Codec,
    zstd_level: i32,
    raw: Bytes,
    mut between: impl FnMut(),
) -> Result<EncodedFrame> {
    let mut hasher = crc32fast::Hasher::new();
    for piece in raw.chunks(256 << 10) {
        hasher.update(piece);
        between();
    }
    let raw_crc = hasher.finalize();
    let raw_len = raw.len() as u64;
    let (payload, payload_crc) = match codec {
        Codec::None => (raw, raw_crc),
        Codec::Zstd => {
            let compressed = zstd::bulk::compress(&raw, zstd_level).map_err(|e| {
                StorageError::InvalidArgument {
                    what: "zstd level",
                    reason: format!("compression at level {zstd_level} failed: {e}"),
                }
            })?;
            let crc = crc32fast::hash(&compressed);
            (Bytes::from(compressed), crc)
        }
    };
    let header = FrameHeader {
        codec,
        kind,
        payload_len: payload.len() as u64,
        raw_len,
        payload_crc,
    }
    .encode();
    Ok(EncodedFrame {
        header,
        payload,
        raw_len,
        raw_crc,
        payload_crc,
    })
}

/// Checks a whole frame held in memory and returns its raw payload. Used for
/// small objects; chunks go through [`FrameReader`].
pub fn decode(key: &str, expected: FrameKind, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut reader = FrameReader::new(key, expected, Vec::new());
    reader.update(bytes)?;
    let (_, raw) = reader.finish()?;
    Ok(raw.into_inner())
}

/// What a [`FrameReader`] learned about the raw payload it passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSummary {
    /// Raw payload length.
    pub raw_len: u64,
    /// CRC-32 of the raw payload.
    pub raw_crc: u32,
}

/// A sink wrapper that counts and CRCs what passes through, and refuses to
/// grow past the length the header promised (a zstd bomb stops there).
#[derive(Debug)]
pub struct CountingSink<W> {
    inner: W,
    limit: u64,
    written: u64,
    crc: crc32fast::Hasher,
    /// Whether `write` feeds `crc`: not for a raw payload, whose bytes are
    /// the stored ones (the frame's payload CRC, taken over once at the
    /// end, is theirs).
    hashing: bool,
    /// The wrapped sink refused a write: an error of the sink, not of the
    /// bytes being decoded.
    sink_failed: bool,
}

impl<W> CountingSink<W> {
    /// The wrapped sink.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for CountingSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "decoded payload exceeds the {} bytes the header declares",
                    self.limit
                ),
            ));
        }
        let n = self
            .inner
            .write(buf)
            .inspect_err(|_| self.sink_failed = true)?;
        if self.hashing {
            self.crc.update(&buf[..n]);
        }
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Decoding<W: Write> {
    /// Waiting for the header; the sink is parked here.
    Header(Option<W>),
    /// Raw payload: stored bytes go straight to the sink.
    Plain(CountingSink<W>),
    /// zstd payload: stored bytes go through the decoder into the sink.
    Zstd(Box<zstd::stream::write::Decoder<'static, CountingSink<W>>>),
}

/// Checks a frame as it streams past and writes the decoded payload to a
/// sink. The caller must not use what the sink received unless
/// [`FrameReader::finish`] returns `Ok`: until then the bytes are unchecked.
pub struct FrameReader<W: Write> {
    key: String,
    expected: FrameKind,
    header_buf: Vec<u8>,
    header: Option<FrameHeader>,
    payload_seen: u64,
    payload_crc: crc32fast::Hasher,
    decoding: Decoding<W>,
}

impl<W: Write> FrameReader<W> {
    /// A reader for the object `key`, which must be a frame of kind
    /// `expected`; the decoded payload goes to `sink`.
    pub fn new(key: &str, expected: FrameKind, sink: W) -> Self {
        FrameReader {
            key: key.to_string(),
            expected,
            header_buf: Vec::with_capacity(HEADER_LEN),
            header: None,
            payload_seen: 0,
            payload_crc: crc32fast::Hasher::new(),
            decoding: Decoding::Header(Some(sink)),
        }
    }

    /// The header, once enough bytes have arrived.
    pub fn header(&self) -> Option<&FrameHeader> {
        self.header.as_ref()
    }

    fn corrupt(&self, reason: CorruptReason) -> StorageError {
        StorageError::corrupt(&self.key, reason)
    }

    fn sink_error(&self, e: io::Error) -> StorageError {
        // zstd reports damaged input as a plain I/O error: whatever the
        // decoder says that the sink did not is about the stored bytes.
        let from_decoder = match &self.decoding {
            Decoding::Zstd(decoder) => !decoder.get_ref().sink_failed,
            _ => false,
        };
        if e.kind() == io::ErrorKind::InvalidData || from_decoder {
            self.corrupt(CorruptReason::Decode(e.to_string()))
        } else {
            StorageError::io("write decoded payload of", &self.key, e)
        }
    }

    /// Feeds the next bytes of the object.
    pub fn update(&mut self, mut data: &[u8]) -> Result<()> {
        if self.header.is_none() {
            let need = HEADER_LEN - self.header_buf.len();
            let take = need.min(data.len());
            self.header_buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.header_buf.len() < HEADER_LEN {
                return Ok(());
            }
            let header = FrameHeader::decode(&self.key, self.expected, &self.header_buf)?;
            let Decoding::Header(sink) = &mut self.decoding else {
                unreachable!("decoding starts once, after the header")
            };
            let sink = CountingSink {
                inner: sink.take().expect("sink parked until the header is read"),
                limit: header.raw_len,
                written: 0,
                crc: crc32fast::Hasher::new(),
                hashing: header.codec != Codec::None,
                sink_failed: false,
            };
            self.decoding = match header.codec {
                Codec::None => Decoding::Plain(sink),
                Codec::Zstd => Decoding::Zstd(Box::new(
                    zstd::stream::write::Decoder::new(sink)
                        .map_err(|e| StorageError::io("start zstd decoder for", &self.key, e))?,
                )),
            };
            self.header = Some(header);
        }
        if data.is_empty() {
            return Ok(());
        }
        let header = self.header.expect("header decoded above");
        if self.payload_seen + data.len() as u64 > header.payload_len {
            return Err(self.corrupt(CorruptReason::Length {
                expected: header.payload_len,
                actual: self.payload_seen + data.len() as u64,
            }));
        }
        self.payload_seen += data.len() as u64;
        self.payload_crc.update(data);
        let written = match &mut self.decoding {
            Decoding::Plain(sink) => sink.write_all(data),
            Decoding::Zstd(decoder) => decoder.write_all(data),
            Decoding::Header(_) => unreachable!("header decoded above"),
        };
        written.map_err(|e| self.sink_error(e))
    }

    /// Ends the object: checks length, payload CRC and decoded length, and
    /// returns the header and the sink. Only now may the sink's bytes be used.
    pub fn finish(self) -> Result<(FrameHeader, CountingSink<W>)> {
        let Some(header) = self.header else {
            return Err(self.corrupt(CorruptReason::ShortHeader {
                len: self.header_buf.len() as u64,
                header: HEADER_LEN,
            }));
        };
        if self.payload_seen != header.payload_len {
            return Err(self.corrupt(CorruptReason::Length {
                expected: header.payload_len,
                actual: self.payload_seen,
            }));
        }
        let computed = self.payload_crc.clone().finalize();
        if computed != header.payload_crc {
            return Err(self.corrupt(CorruptReason::PayloadCrc {
                expected: header.payload_crc,
                computed,
            }));
        }
        let key = self.key;
        let sink = match self.decoding {
            // Every payload byte went to the sink (`write_all`): the raw
            // CRC is the payload's, computed once.
            Decoding::Plain(mut sink) => {
                sink.crc = self.payload_crc;
                sink
            }
            Decoding::Zstd(mut decoder) => {
                decoder.flush().map_err(|e| {
                    StorageError::corrupt(&key, CorruptReason::Decode(e.to_string()))
                })?;
                decoder.into_inner()
            }
            Decoding::Header(_) => unreachable!("header was decoded"),
        };
        if sink.written != header.raw_len {
            return Err(StorageError::corrupt(
                &key,
                CorruptReason::Length {
                    expected: header.raw_len,
                    actual: sink.written,
                },
            ));
        }
        Ok((header, sink))
    }
}

impl<W> CountingSink<W> {
    /// What passed through: length and CRC of the raw payload.
    pub fn summary(&self) -> RawSummary {
        RawSummary {
            raw_len: self.written,
            raw_crc: self.crc.clone().finalize(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(codec: Codec, raw: &[u8]) -> Vec<u8> {
        encode(FrameKind::Chunk, codec, 1, Bytes::copy_from_slice(raw))
            .expect("encode")
            .to_vec()
    }

    #[test]
    fn test_header_is_32_bytes_and_payload_follows() {
        let f = frame(Codec::None, b"hello");
        assert_eq!(f.len(), HEADER_LEN + 5);
        assert_eq!(&f[HEADER_LEN..], b"hello");
        assert_eq!(&f[..4], b"LZRF");
    }

    #[test]
    fn test_wrong_kind_is_refused() {
        let f = frame(Codec::None, b"x");
        let err = decode("k", FrameKind::Manifest, &f).expect_err("kind");
        assert!(
            err.to_string()
                .contains("holds a chunk, expected a manifest"),
            "{err}"
        );
    }

    #[test]
    fn test_short_object_names_key() {
        let err = decode("jobs/j/chunk", FrameKind::Chunk, b"LZRF").expect_err("short");
        assert!(err.to_string().contains("jobs/j/chunk"), "{err}");
        assert!(
            err.to_string().contains("shorter than the 32-byte"),
            "{err}"
        );
    }

    #[test]
    fn test_wrong_magic() {
        let mut f = frame(Codec::None, b"x");
        f[0] = b'X';
        let err = decode("k", FrameKind::Chunk, &f).expect_err("magic");
        assert!(err.to_string().contains("wrong magic"), "{err}");
    }

    #[test]
    fn test_unknown_version_with_valid_header_crc() {
        let mut f = frame(Codec::None, b"x");
        f[4] = 9;
        let crc = crc32fast::hash(&f[0..28]);
        f[28..32].copy_from_slice(&crc.to_le_bytes());
        let err = decode("k", FrameKind::Chunk, &f).expect_err("version");
        assert!(
            err.to_string().contains("unknown frame format version 9"),
            "{err}"
        );
    }

    #[test]
    fn test_truncated_and_extended_objects_are_refused() {
        let f = frame(Codec::Zstd, &[7u8; 1000]);
        assert!(decode("k", FrameKind::Chunk, &f[..f.len() - 1]).is_err());
        let mut longer = f.clone();
        longer.push(0);
        assert!(decode("k", FrameKind::Chunk, &longer).is_err());
    }

    #[test]
    fn test_zstd_bomb_stops_at_declared_length() {
        // A valid zstd stream whose decoded size exceeds the header's raw_len.
        let raw = vec![0u8; 1 << 20];
        let compressed = zstd::bulk::compress(&raw, 1).expect("compress");
        let header = FrameHeader {
            codec: Codec::Zstd,
            kind: FrameKind::Chunk,
            payload_len: compressed.len() as u64,
            raw_len: 10,
            payload_crc: crc32fast::hash(&compressed),
        }
        .encode();
        let mut f = header.to_vec();
        f.extend_from_slice(&compressed);
        let err = decode("k", FrameKind::Chunk, &f).expect_err("bomb");
        assert!(err.to_string().contains("exceeds the 10 bytes"), "{err}");
    }

    /// A zstd payload damaged so that the decoder fails midway is corrupt
    /// (a restore falls back past it), not an unavailable store; a sink
    /// that refuses a write is not corruption.
    #[test]
    fn test_damaged_zstd_is_corrupt_and_a_failing_sink_is_not() {
        let raw: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let f = frame(Codec::Zstd, &raw);
        let mut failed_midway = 0;
        for i in HEADER_LEN..f.len() {
            let mut bad = f.clone();
            bad[i] ^= 0x5a;
            let mut r = FrameReader::new("k", FrameKind::Chunk, Vec::new());
            let err = match r.update(&bad) {
                Err(e) => {
                    failed_midway += 1;
                    e
                }
                Ok(()) => r.finish().map(|_| ()).expect_err("damaged"),
            };
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "byte {i}: {err}");
        }
        assert!(failed_midway > 0, "no damage stopped the decoder midway");

        struct Refusing;
        impl Write for Refusing {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut r = FrameReader::new("k", FrameKind::Chunk, Refusing);
        let err = r.update(&f).expect_err("the sink refuses");
        assert_ne!(err.kind(), crate::ErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    proptest! {
        #[test]
        fn prop_round_trip(raw in proptest::collection::vec(any::<u8>(), 0..4096), zstd in any::<bool>(), split in any::<prop::sample::Index>()) {
            let codec = if zstd { Codec::Zstd } else { Codec::None };
            let f = frame(codec, &raw);
            // In one piece ...
            prop_assert_eq!(decode("k", FrameKind::Chunk, &f)?, raw.clone());
            // ... and streamed in two, split anywhere.
            let at = split.index(f.len() + 1);
            let mut r = FrameReader::new("k", FrameKind::Chunk, Vec::new());
            r.update(&f[..at])?;
            r.update(&f[at..])?;
            let (h, sink) = r.finish()?;
            prop_assert_eq!(h.raw_len, raw.len() as u64);
            prop_assert_eq!(sink.summary().raw_crc, crc32fast::hash(&raw));
            prop_assert_eq!(sink.into_inner(), raw);
        }

        #[test]
        fn prop_every_single_byte_change_is_detected(raw in proptest::collection::vec(any::<u8>(), 0..512), zstd in any::<bool>(), xor in 1u8..=255) {
            let codec = if zstd { Codec::Zstd } else { Codec::None };
            let f = frame(codec, &raw);
            for i in 0..f.len() {
                let mut bad = f.clone();
                bad[i] ^= xor;
                prop_assert!(decode("k", FrameKind::Chunk, &bad).is_err(), "byte {} xor {:#x} not detected", i, xor);
            }
        }
    }
}

#[cfg(test)]
mod fuzz_like {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Arbitrary bytes, and arbitrary bytes behind a valid-looking
        // header, never panic a reader: they are errors or valid frames.
        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), codec in 0u8..3, kind in 0u8..4, raw_len in 0u64..4096) {
            let _ = decode("k", FrameKind::Chunk, &bytes);
            let mut h = [0u8; HEADER_LEN];
            h[0..4].copy_from_slice(&MAGIC);
            h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            h[6] = codec;
            h[7] = kind;
            h[8..16].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            h[16..24].copy_from_slice(&raw_len.to_le_bytes());
            h[24..28].copy_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
            let crc = crc32fast::hash(&h[0..28]);
            h[28..32].copy_from_slice(&crc.to_le_bytes());
            let mut f = h.to_vec();
            f.extend_from_slice(&bytes);
            if let Ok(raw) = decode("k", FrameKind::Chunk, &f) {
                prop_assert_eq!(raw.len() as u64, raw_len);
            }
        }

        #[test]
        fn prop_arbitrary_manifest_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let job = crate::JobId::new("j").expect("job");
            let _ = crate::manifest::Manifest::from_json("k", &job, crate::CheckpointId(1), &bytes);
        }
    }
}
