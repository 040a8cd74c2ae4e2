//! `lazarus storage bench`: writes a checkpoint of generated state through
//! the same code path workers use, restores it into a fresh local cache,
//! checks every byte, and prints throughput. With `--keep` the checkpoint
//! stays committed (so `checkpoints verify` can be run on it).

use crate::clock::Stopwatch;
use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use lazarus_storage::{
    CheckpointId, CheckpointStore, Epoch, JobId, LocalCache, Manifest, WorkerId, WorkerSnapshot,
};

use super::BenchArgs;
use crate::units::format_bytes;

/// Fills `buf` with state-like bytes: a 16-letter alphabet, so zstd has
/// something to do (about 2:1) without the data being trivially constant.
pub fn generate_state(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = (x & 0x0f0f_0f0f_0f0f_0f0f) | 0x6060_6060_6060_6060;
        word.copy_from_slice(&v.to_le_bytes());
    }
    for b in words.into_remainder() {
        *b = b'a';
    }
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9)
}

/// Runs the bench.
pub async fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if args.size == 0 {
        anyhow::bail!("--size must be more than 0 bytes");
    }
    if args.chunk_size == 0 {
        anyhow::bail!("--chunk-size must be more than 0 bytes");
    }
    let store = CheckpointStore::open(&args.store)?;
    let job = JobId::new(args.job.clone())?;
    let js = store.job(job.clone());

    // Generated state: per worker, chunks of at most --chunk-size.
    let workers = u64::from(args.workers);
    let mut plan: Vec<(WorkerId, String, Bytes)> = Vec::new();
    for w in 0..workers {
        let worker = WorkerId::new(format!("bench-{w}"))?;
        let share = args.size / workers + u64::from(w < args.size % workers);
        let mut left = share;
        let mut n = 0;
        while left > 0 {
            let len = left.min(args.chunk_size);
            let mut buf = vec![0u8; len as usize];
            generate_state(&mut buf, w * 1_000_003 + n);
            plan.push((worker.clone(), format!("part-{n}"), Bytes::from(buf)));
            left -= len;
            n += 1;
        }
    }

    let id = match js.latest().await {
        Ok(m) => m.checkpoint.next(),
        Err(e) if e.kind() == lazarus_storage::ErrorKind::NotFound => CheckpointId(1),
        Err(e) => return Err(e).context("reading the job's latest checkpoint"),
    };
    let epoch = Epoch(js.current_epoch().await?.0.max(1));
    let concurrency = store.options().upload_concurrency;

    let started = Stopwatch::start();
    let written: Vec<_> = futures::stream::iter(plan.iter().cloned())
        .map(|(worker, name, data)| {
            let js = js.clone();
            async move {
                let chunk = js.write_chunk(id, &worker, &name, data, args.codec).await?;
                Ok::<_, lazarus_storage::StorageError>((worker, chunk))
            }
        })
        .buffered(concurrency)
        .try_collect()
        .await
        .context("writing chunks")?;
    let mut manifest = Manifest::new(job.clone(), id, epoch);
    for (worker, chunk) in written {
        let snapshot: &mut WorkerSnapshot = manifest.workers.entry(worker).or_default();
        snapshot.chunks.push(chunk);
        snapshot.metadata = b"bench".to_vec();
    }
    js.commit(&manifest)
        .await
        .context("committing the checkpoint")?;
    let write_secs = started.elapsed().as_secs_f64();
    println!(
        "write:   checkpoint {id} of job {job} to {}: {} state in {} chunks over {} workers, codec {}, {} stored",
        store.url(),
        format_bytes(args.size),
        plan.len(),
        workers,
        args.codec,
        format_bytes(manifest.stored_bytes())
    );
    println!(
        "         {:.3} s, {:.1} MiB/s of state (chunks + commit, durable)",
        write_secs,
        mib_per_s(args.size, write_secs)
    );

    let temp = tempfile::tempdir().context("creating a temporary cache directory")?;
    let cache = LocalCache::new(
        args.cache
            .clone()
            .unwrap_or_else(|| temp.path().to_path_buf()),
    )?;
    // The baseline: the same objects read with no check or decode, as
    // fast as the store gives them (a local directory: read + CRC; a
    // remote store: the same parallel ranged GETs a restore makes).
    let stored = manifest.stored_bytes();
    let chunks: Vec<_> = manifest.workers.values().flat_map(|w| &w.chunks).collect();
    let started = Stopwatch::start();
    let raw: u64 = futures::stream::iter(chunks)
        .map(|c| js.read_raw(c))
        .buffered(store.options().download_concurrency)
        .try_fold(0, |n, got| async move { Ok(n + got) })
        .await
        .context("reading the objects raw")?;
    let raw_secs = started.elapsed().as_secs_f64();
    let baseline = if store.url().starts_with("file://") {
        "read + CRC of the same files"
    } else {
        "parallel GETs of the same objects, no check"
    };
    println!(
        "raw:     {:.3} s, {:.1} MiB/s of stored bytes ({baseline}, {})",
        raw_secs,
        mib_per_s(raw, raw_secs),
        format_bytes(raw)
    );

    // Every worker restores at once, as a job's recovery does (each worker
    // is a process of its own), with the same chunks in flight as the raw
    // read above.
    let started = Stopwatch::start();
    let restored = futures::future::try_join_all(
        manifest
            .workers
            .keys()
            .map(|worker| js.restore_worker(&manifest, worker, &cache)),
    )
    .await?;
    let fetched: u64 = restored.iter().map(|r| r.fetched_bytes).sum();
    let restore_secs = started.elapsed().as_secs_f64();
    println!(
        "restore: {:.3} s, {:.1} MiB/s of state, {:.1} MiB/s of stored bytes (downloaded {}; check + decode + map); {:.2}x the raw read",
        restore_secs,
        mib_per_s(args.size, restore_secs),
        mib_per_s(stored, restore_secs),
        format_bytes(fetched),
        raw_secs / restore_secs.max(1e-9)
    );

    // Every restored byte must equal what was written.
    let mut expected = plan.iter();
    for r in &restored {
        for chunk in &r.chunks {
            let (_, name, data) = expected
                .next()
                .context("more restored chunks than written")?;
            if chunk.bytes() != &data[..] {
                anyhow::bail!(
                    "restored chunk {} ({name}) differs from what was written",
                    chunk.key()
                );
            }
        }
    }
    drop(restored);
    let started = Stopwatch::start();
    let (mut hits, mut in_place) = (0, 0);
    for worker in manifest.workers.keys() {
        let r = js.restore_worker(&manifest, worker, &cache).await?;
        hits += r.cache_hits;
        in_place += r.in_place;
    }
    let cached_secs = started.elapsed().as_secs_f64();
    println!(
        "cached:  {:.3} s, {:.1} MiB/s (restore again: {hits} chunks from the local cache, {in_place} mapped in place in the store; map + CRC check)",
        cached_secs,
        mib_per_s(args.size, cached_secs)
    );
    println!(
        "check:   restored state equals written state ({} bytes)",
        args.size
    );

    if args.keep {
        println!(
            "kept:    checkpoint {id} stays committed in {}",
            store.url()
        );
    } else {
        js.delete_checkpoint(id)
            .await
            .context("deleting the bench checkpoint")?;
        println!("deleted: checkpoint {id} (use --keep to keep it)");
    }
    Ok(ExitCode::SUCCESS)
}
