//! Checkpoint storage throughput beside the raw disk, measured in one run.
//!
//!     cargo bench -p lazarus-benches --bench storage
//!
//! Environment: `LAZARUS_BENCH_SIZE` (default 1GiB), `LAZARUS_BENCH_DIR`
//! (default `target/bench-storage`, so the same disk as the build),
//! `LAZARUS_BENCH_ROUNDS` (default 3; the median is printed).
//!
//! Figures:
//! - write: a checkpoint of SIZE generated state (64 MiB chunks, 4 in flight,
//!   every object fsynced, then the manifest commit) to `file://`, with codec
//!   none and zstd level 1, beside one sequential `write` + `fdatasync` of the
//!   same bytes to a file in the same directory;
//! - restore, beside `read` into a reused buffer + CRC of the same stored
//!   files: the codec-none checkpoint from the store (a local directory's
//!   uncompressed chunks are mapped where they lie: map + CRC check + rkyv
//!   validated access), the zstd one from the store (read, check, decode,
//!   write the cache file, map; 8 chunks at once), and the zstd one again
//!   from the local cache (map + CRC check + rkyv access).
//!
//! Buffers are generated once and reused: on this machine first-touching
//! fresh memory costs more than the copy being measured.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use lazarus_storage::rkyv;
use lazarus_storage::*;

const CHUNK: usize = 64 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

/// State chunks as rkyv archives of `Vec<u64>`, so restore can validate and
/// read them in place.
fn generate(size: u64) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    let mut left = size as usize;
    let mut seed = 1u64;
    while left > 0 {
        let len = left.min(CHUNK);
        let mut raw = vec![0u8; len / 8 * 8];
        lazarus::cli::bench::generate_state(&mut raw, seed);
        let words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let archived = rkyv::to_bytes::<rkyv::rancor::Error>(&words).expect("archive");
        chunks.push(Bytes::from(archived.to_vec()));
        left -= len;
        seed += 1;
    }
    chunks
}

fn raw_write(dir: &Path, chunks: &[Bytes]) -> f64 {
    let path = dir.join("raw-write.bin");
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).expect("create");
    for c in chunks {
        f.write_all(c).expect("write");
    }
    f.sync_data().expect("fdatasync");
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path).expect("remove");
    secs
}

async fn checkpoint_write(
    url: &str,
    round: u64,
    chunks: &[Bytes],
    codec: Codec,
) -> (f64, Manifest, JobStore) {
    let store = CheckpointStore::open(url).expect("open");
    let js = store.job(JobId::new(format!("bench-{codec}-{round}")).expect("job"));
    let worker = WorkerId::new("w").expect("worker");
    let start = Instant::now();
    let refs: Vec<ChunkRef> = futures::stream::iter(chunks.iter().enumerate())
        .map(|(i, c)| {
            let (js, worker) = (js.clone(), worker.clone());
            let c = c.clone();
            async move {
                js.write_chunk(CheckpointId(1), &worker, &format!("c{i}"), c, codec)
                    .await
            }
        })
        .buffered(4)
        .try_collect()
        .await
        .expect("write chunks");
    let mut m = Manifest::new(js.job().clone(), CheckpointId(1), Epoch(1));
    m.workers.insert(
        worker,
        WorkerSnapshot {
            chunks: refs,
            metadata: vec![],
        },
    );
    js.commit(&m).await.expect("commit");
    (start.elapsed().as_secs_f64(), m, js)
}

fn read_and_crc(files: &[PathBuf], buf: &mut Vec<u8>) -> (f64, u32) {
    let start = Instant::now();
    let mut x = 0;
    for p in files {
        buf.clear();
        std::fs::File::open(p)
            .expect("open")
            .read_to_end(buf)
            .expect("read");
        x ^= crc32fast::hash(buf);
    }
    (start.elapsed().as_secs_f64(), x)
}

fn main() {
    let size = std::env::var("LAZARUS_BENCH_SIZE")
        .ok()
        .map(|s| lazarus::units::parse_size(&s).expect("LAZARUS_BENCH_SIZE"))
        .unwrap_or(1 << 30);
    let rounds: u64 = std::env::var("LAZARUS_BENCH_ROUNDS")
        .ok()
        .map(|s| s.parse().expect("LAZARUS_BENCH_ROUNDS"))
        .unwrap_or(3);
    let base = std::env::var("LAZARUS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-storage")
        });
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("bench dir");
    let base = base.canonicalize().expect("canonical");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!(
        "storage bench: {} of state in 64 MiB chunks, {rounds} rounds (median), dir {}",
        lazarus::units::format_bytes(size),
        base.display()
    );
    let chunks = generate(size);
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();

    let mut raw = Vec::new();
    let mut none = Vec::new();
    let mut zstd = Vec::new();
    let mut zstd_stored = 0;
    let mut restore_fetch = Vec::new();
    let mut restore_zstd = Vec::new();
    let mut restore_cached = Vec::new();
    let mut read_crc = Vec::new();
    let mut buf = Vec::with_capacity(CHUNK + 64);
    for round in 0..rounds {
        let store_dir = base.join(format!("store-{round}"));
        let url = format!("file://{}", store_dir.display());
        raw.push(raw_write(&base, &chunks));
        let (secs, m_none, js) = rt.block_on(checkpoint_write(&url, round, &chunks, Codec::None));
        none.push(secs);
        let (secs, m_zstd, js_zstd) =
            rt.block_on(checkpoint_write(&url, round, &chunks, Codec::Zstd));
        zstd.push(secs);
        zstd_stored = m_zstd.stored_bytes();

        // Restore: codec none from the store (mapped in place), zstd from
        // the store into an empty cache, then zstd again from the cache.
        let cache_dir = base.join(format!("cache-{round}"));
        let cache = LocalCache::new(&cache_dir).expect("cache");
        let worker = WorkerId::new("w").expect("worker");
        let start = Instant::now();
        let restored = rt
            .block_on(js.restore_worker(&m_none, &worker, &cache))
            .expect("restore");
        restore_fetch.push(start.elapsed().as_secs_f64());
        assert_eq!(restored.in_place, chunks.len());
        drop(restored);
        let start = Instant::now();
        let restored = rt
            .block_on(js_zstd.restore_worker(&m_zstd, &worker, &cache))
            .expect("restore zstd");
        restore_zstd.push(start.elapsed().as_secs_f64());
        assert_eq!(restored.fetched_bytes, m_zstd.stored_bytes());
        drop(restored);
        let start = Instant::now();
        let restored = rt
            .block_on(js_zstd.restore_worker(&m_zstd, &worker, &cache))
            .expect("restore cached");
        let mut check = 0u64;
        for chunk in &restored.chunks {
            let words = chunk.access::<rkyv::Archived<Vec<u64>>>().expect("access");
            check ^= words
                .get(words.len() / 2)
                .map(|w| w.to_native())
                .unwrap_or(0);
        }
        restore_cached.push(start.elapsed().as_secs_f64());
        assert_eq!(restored.cache_hits, chunks.len());
        std::hint::black_box(check);
        drop(restored);
        let files: Vec<PathBuf> = m_none.workers[&worker]
            .chunks
            .iter()
            .map(|c| store_dir.join(js.full_key(&c.key)))
            .collect();
        let (secs, crc) = read_and_crc(&files, &mut buf);
        read_crc.push(secs);
        std::hint::black_box(crc);
        std::fs::remove_dir_all(&store_dir).expect("cleanup");
        std::fs::remove_dir_all(&cache_dir).expect("cleanup");
    }
    let raw_mibs = mib_s(total, median(raw));
    let none_mibs = mib_s(total, median(none));
    let zstd_mibs = mib_s(total, median(zstd));
    let read_mibs = mib_s(total, median(read_crc));
    let cached_mibs = mib_s(total, median(restore_cached));
    let fetch_mibs = mib_s(total, median(restore_fetch));
    let zstd_restore_mibs = mib_s(total, median(restore_zstd));
    println!();
    println!("{:<58} {:>10}  {:>8}", "figure", "MiB/s", "ratio");
    println!(
        "{:<58} {:>10.0}  {:>8}",
        "baseline: raw sequential write + fdatasync", raw_mibs, "1.00"
    );
    println!(
        "{:<58} {:>10.0}  {:>8.2}",
        "checkpoint write, codec none (chunks + fsync + commit)",
        none_mibs,
        none_mibs / raw_mibs
    );
    println!(
        "{:<58} {:>10.0}  {:>8.2}",
        format!(
            "checkpoint write, zstd-1 (stored {:.0}% of raw)",
            100.0 * zstd_stored as f64 / total as f64
        ),
        zstd_mibs,
        zstd_mibs / raw_mibs
    );
    println!(
        "{:<58} {:>10.0}  {:>8}",
        "baseline: read + CRC-32 of the same files (page cache)", read_mibs, "1.00"
    );
    println!(
        "{:<58} {:>10.0}  {:>8.2}",
        "restore from store, codec none (map in place + CRC check)",
        fetch_mibs,
        fetch_mibs / read_mibs
    );
    println!(
        "{:<58} {:>10.0}  {:>8.2}",
        "restore from store, zstd-1 (read + decode + cache file)",
        zstd_restore_mibs,
        zstd_restore_mibs / read_mibs
    );
    println!(
        "{:<58} {:>10.0}  {:>8.2}",
        "restore from cache (map + CRC check + rkyv access)",
        cached_mibs,
        cached_mibs / read_mibs
    );
    let _ = std::fs::remove_dir_all(&base);
}
