//! The storage integration suite, run twice: against `file://` and against a
//! real S3-compatible server over HTTP (see `common`).

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{state_bytes, Env};
use lazarus_storage::rkyv;
use lazarus_storage::*;

fn job(name: &str) -> JobId {
    JobId::new(name).expect("job")
}

fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).expect("worker")
}

/// Writes one chunk per (worker, name, data) and commits checkpoint `id`.
async fn commit_checkpoint(
    js: &JobStore,
    id: u64,
    epoch: u64,
    parts: &[(&str, &str, Vec<u8>, Codec)],
    reuse: &[(&str, ChunkRef)],
) -> Manifest {
    let mut manifest = Manifest::new(js.job().clone(), CheckpointId(id), Epoch(epoch));
    for (w, name, data, codec) in parts {
        let chunk = js
            .write_chunk(
                CheckpointId(id),
                &worker(w),
                name,
                data.clone().into(),
                *codec,
            )
            .await
            .expect("write chunk");
        let snapshot = manifest.workers.entry(worker(w)).or_default();
        snapshot.chunks.push(chunk);
        snapshot.metadata = format!("pos-{id}").into_bytes();
    }
    for (w, chunk) in reuse {
        manifest
            .workers
            .entry(worker(w))
            .or_default()
            .chunks
            .push(chunk.clone());
    }
    js.commit(&manifest).await.expect("commit");
    manifest
}

async fn test_round_trip_and_restore_both_codecs(env: &Env) {
    let js = env.store.job(job("roundtrip"));
    let counts: Vec<u64> = (0..10_000).collect();
    let archived = rkyv::to_bytes::<rkyv::rancor::Error>(&counts)
        .expect("archive")
        .to_vec();
    let text = state_bytes(300_000, 1);
    let m = commit_checkpoint(
        &js,
        1,
        1,
        &[
            ("counter-0", "kg-0", archived.clone(), Codec::None),
            ("counter-0", "kg-1", text.clone(), Codec::Zstd),
            ("source-0", "pos", vec![], Codec::Zstd),
        ],
        &[],
    )
    .await;
    let zstd_chunk = &m.workers[&worker("counter-0")].chunks[1];
    assert!(
        zstd_chunk.stored_len < zstd_chunk.raw_len * 6 / 10,
        "zstd should compress: {zstd_chunk:?}"
    );

    let latest = js.latest().await.expect("latest");
    assert_eq!(latest, m);
    assert_eq!(js.manifest(CheckpointId(1)).await.expect("by id"), m);
    assert!(js.verify(&latest).await.expect("verify").is_ok());

    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let restored = js
        .restore_worker(&latest, &worker("counter-0"), &cache)
        .await
        .expect("restore");
    assert_eq!(restored.cache_hits, 0);
    assert!(restored.fetched_bytes > 0);
    // A local directory's uncompressed chunk is mapped where it lies.
    let in_place = usize::from(!env.is_s3);
    assert_eq!(restored.in_place, in_place);
    assert_eq!(restored.metadata, b"pos-1");
    let view = restored.chunks[0]
        .access::<rkyv::Archived<Vec<u64>>>()
        .expect("rkyv access in place");
    assert_eq!(view.len(), 10_000);
    assert_eq!(view[9_999], 9_999);
    assert_eq!(restored.chunks[1].bytes(), &text[..]);
    // Read in place: the view points into the map, which starts page-aligned.
    assert_eq!(restored.chunks[0].bytes().as_ptr() as usize % 16, 0);
    // Released pages read back the same bytes (from the file).
    restored.chunks[1].release();
    assert_eq!(restored.chunks[1].bytes(), &text[..]);

    // Again: everything comes from the cache.
    let again = js
        .restore_worker(&latest, &worker("counter-0"), &cache)
        .await
        .expect("restore again");
    assert_eq!(
        (again.cache_hits + again.in_place, again.fetched_bytes),
        (2, 0)
    );
    assert_eq!(again.in_place, in_place);
    let empty = js
        .restore_worker(&latest, &worker("source-0"), &cache)
        .await
        .expect("empty state");
    assert_eq!(empty.chunks[0].bytes(), b"");

    let err = js
        .restore_worker(&latest, &worker("nobody"), &cache)
        .await
        .expect_err("unknown worker");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = js.manifest(CheckpointId(9)).await.expect_err("missing id");
    assert!(
        err.to_string().contains("checkpoint 9 is not committed"),
        "{err}"
    );
    let err = env
        .store
        .job(job("nothing-here"))
        .latest()
        .await
        .expect_err("no checkpoints");
    assert!(
        err.to_string().contains("has no committed checkpoint"),
        "{err}"
    );
}

async fn test_large_chunk_uses_multipart(env: &Env) {
    let js = env.store.job(job("large"));
    let size = (64 << 20) + 12_345;
    let data = state_bytes(size, 7);
    let m = commit_checkpoint(&js, 1, 1, &[("w", "big", data.clone(), Codec::None)], &[]).await;
    let chunk = &m.workers[&worker("w")].chunks[0];
    assert_eq!(chunk.raw_len, size as u64);
    if env.is_s3 {
        // S3 marks objects assembled from parts with an ETag of the form
        // "<md5 of part md5s>-<number of parts>".
        let etag = env.raw_etag(&js.full_key(&chunk.key)).await.expect("etag");
        assert!(
            etag.trim_matches('"').ends_with("-5"),
            "expected a 5-part upload, ETag {etag}"
        );
    }
    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let restored = js
        .restore_worker(&m, &worker("w"), &cache)
        .await
        .expect("restore");
    assert!(
        restored.chunks[0].bytes() == &data[..],
        "64 MiB chunk differs after restore"
    );
    // S3: downloaded once, as eight 8 MiB ranged GETs in parallel; a local
    // directory: mapped where it lies, nothing copied to the cache.
    if env.is_s3 {
        assert_eq!(restored.fetched_bytes, chunk.stored_len);
    } else {
        assert_eq!((restored.fetched_bytes, restored.in_place), (0, 1));
        assert!(
            walk(cache_dir.path()).is_empty(),
            "an uncompressed local chunk is not copied into the cache"
        );
    }
    assert_eq!(js.read_raw(chunk).await.expect("raw"), chunk.stored_len);
    assert!(js.verify(&m).await.expect("verify").is_ok());
    drop(restored);

    // A byte damaged in the fifth range, then the object cut short: each
    // restore fails with what is wrong, nothing is restored.
    let key = js.full_key(&chunk.key);
    env.flip_byte(&key, (33 << 20) + 5).await;
    let fresh = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(fresh.path()).expect("cache");
    let e = js
        .restore_worker(&m, &worker("w"), &cache)
        .await
        .expect_err("damaged");
    assert!(e.to_string().contains("CRC"), "{e}");
    let mut cut = env.raw_get(&key).await;
    cut.truncate((20 << 20) + 7);
    env.raw_put(&key, cut).await;
    let e = js
        .restore_worker(&m, &worker("w"), &cache)
        .await
        .expect_err("cut short");
    assert_eq!(e.kind(), lazarus_storage::ErrorKind::Corrupt, "{e}");
    assert!(walk(fresh.path()).is_empty(), "nothing left in the cache");
}

async fn test_commit_race_has_one_winner(env: &Env) {
    let js = env.store.job(job("race"));
    let chunk = js
        .write_chunk(
            CheckpointId(1),
            &worker("w"),
            "s",
            b"state".to_vec().into(),
            Codec::None,
        )
        .await
        .expect("chunk");
    // 16 committers, each with its own connection, all on checkpoint 1.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let store =
            CheckpointStore::open_with(&env.url, env.store.options().clone()).expect("open");
        let js = store.job(job("race"));
        let mut m = Manifest::new(job("race"), CheckpointId(1), Epoch(1));
        m.workers.insert(
            worker("w"),
            WorkerSnapshot {
                chunks: vec![chunk.clone()],
                metadata: format!("writer-{i}").into_bytes(),
            },
        );
        tasks.push(tokio::spawn(async move { (i, js.commit(&m).await) }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, result) = t.await.expect("task");
        match result {
            Ok(()) => winners.push(i),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
                assert!(e.to_string().contains("already committed"), "{e}");
            }
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let committed = js.latest().await.expect("latest");
    assert_eq!(
        committed.workers[&worker("w")].metadata,
        format!("writer-{}", winners[0]).into_bytes()
    );
}

async fn test_fencing_refuses_lower_epochs(env: &Env) {
    let js = env.store.job(job("fence"));
    commit_checkpoint(&js, 1, 2, &[("w", "s", b"a".to_vec(), Codec::None)], &[]).await;
    // A writer from epoch 1 (an older supervisor) tries to commit checkpoint 2.
    let chunk = js
        .write_chunk(
            CheckpointId(2),
            &worker("w"),
            "s",
            b"b".to_vec().into(),
            Codec::None,
        )
        .await
        .expect("chunk");
    let mut m = Manifest::new(job("fence"), CheckpointId(2), Epoch(1));
    m.workers.insert(
        worker("w"),
        WorkerSnapshot {
            chunks: vec![chunk],
            metadata: vec![],
        },
    );
    let err = js.commit(&m).await.expect_err("fenced");
    assert_eq!(err.kind(), ErrorKind::Fenced);
    assert!(err.to_string().starts_with("fenced:"), "{err}");
    // A new supervisor claims epoch 5 before committing anything: epoch 2 is now fenced too.
    js.claim_epoch(Epoch(5)).await.expect("claim");
    assert_eq!(js.current_epoch().await.expect("epoch"), Epoch(5));
    m.epoch = Epoch(2);
    let err = js.commit(&m).await.expect_err("fenced by claim");
    assert!(err.to_string().contains("is at epoch 5"), "{err}");
    let err = js.claim_epoch(Epoch(3)).await.expect_err("claim below");
    assert_eq!(err.kind(), ErrorKind::Fenced);
    // The same epoch commits; so does a higher one.
    m.epoch = Epoch(5);
    js.commit(&m).await.expect("epoch 5 commits");
    // Racing a lower epoch against a committed id reports fencing, not a plain conflict.
    let mut late = m.clone();
    late.epoch = Epoch(4);
    let err = js
        .commit(&late)
        .await
        .expect_err("lower epoch on committed id");
    assert_eq!(err.kind(), ErrorKind::Fenced);
    // This handle has claimed epoch 5 and made it durable, so its commits
    // no longer put the marker; another handle (another supervisor) claims
    // epoch 6, and the listing still fences this one.
    env.store
        .job(job("fence"))
        .claim_epoch(Epoch(6))
        .await
        .expect("claim by another handle");
    let next = Manifest::new(job("fence"), CheckpointId(3), Epoch(5));
    let err = js
        .commit(&next)
        .await
        .expect_err("fenced by another handle");
    assert_eq!(err.kind(), ErrorKind::Fenced);
    assert!(err.to_string().contains("is at epoch 6"), "{err}");
}

/// A claim made only visible fences at once; the newest checkpoint read
/// right after it (one manifest when nothing can fence that one) agrees
/// with a full `latest`, zombies included.
async fn test_latest_after_a_visible_claim_agrees_with_latest(env: &Env) {
    let js = env.store.job(job("claim"));
    let part = |id: &str| vec![("w", "s", id.as_bytes().to_vec(), Codec::None)];
    let newest = |m: Option<CheckpointId>| m.map(|m| m.0);
    let claim = |e: u64| {
        let js = js.clone();
        async move { js.claim_epoch_visible(Epoch(e)).await }
    };
    let c = claim(1).await.expect("claim 1");
    assert!(c.created);
    assert_eq!(c.highest_other, Epoch(0), "no other epoch");
    let l = js.latest_after_claim(&c).await.expect("none");
    assert_eq!(newest(l), None, "no checkpoint yet");
    commit_checkpoint(&js, 1, 1, &part("1"), &[]).await;
    commit_checkpoint(&js, 2, 1, &part("2"), &[]).await;
    let c = claim(2).await.expect("claim 2");
    assert_eq!((c.created, c.highest_other), (true, Epoch(1)));
    let l = js.latest_after_claim(&c).await.expect("latest");
    assert_eq!(newest(l), Some(2));
    // Id 4 under epoch 2, then id 3 under epoch 3: 4 is a zombie's.
    commit_checkpoint(&js, 4, 2, &part("4"), &[]).await;
    assert!(claim(3).await.expect("claim 3").created);
    commit_checkpoint(&js, 3, 3, &part("3"), &[]).await;
    assert_eq!(
        js.latest().await.expect("latest").checkpoint,
        CheckpointId(3)
    );
    let c = claim(4).await.expect("claim 4");
    assert_eq!((c.created, c.highest_other), (true, Epoch(3)));
    let l = js.latest_after_claim(&c).await.expect("latest");
    assert_eq!(
        newest(l),
        Some(3),
        "the zombie's newer id is not the newest"
    );
    // Claimed again (a retry): not created, read in full.
    let c = claim(4).await.expect("again");
    assert!(!c.created);
    let l = js.latest_after_claim(&c).await.expect("latest");
    assert_eq!(newest(l), Some(3));
    // The visible claim fences a lower epoch at once, and the epoch commits.
    let err = claim(2).await.expect_err("below the claim");
    assert_eq!(err.kind(), ErrorKind::Fenced);
    commit_checkpoint(&js, 5, 4, &part("5"), &[]).await;
    js.make_claim_durable(Epoch(4)).await.expect("durable");
    let c = claim(5).await.expect("claim 5");
    assert!(c.created);
    let l = js.latest_after_claim(&c).await.expect("latest");
    assert_eq!(newest(l), Some(5));
}

/// Right after a claim, the newest manifest this very handle put is known
/// without reading it: damaged after its commit, it is still named by the
/// claim (a restore would then refuse it, and the next recovery reads it
/// and falls back past it). A handle that did not put it reads it.
async fn test_a_claim_knows_the_manifest_its_handle_put_last(env: &Env) {
    let js = env.store.job(job("put-here"));
    let part = |id: &str| vec![("w", "s", id.as_bytes().to_vec(), Codec::None)];
    commit_checkpoint(&js, 1, 1, &part("1"), &[]).await;
    commit_checkpoint(&js, 2, 1, &part("2"), &[]).await;
    env.flip_byte(&js.full_key("manifests/00000000000000000002.manifest"), 40)
        .await;
    let claim = js.claim_epoch_visible(Epoch(2)).await.expect("claim 2");
    assert_eq!(
        js.latest_after_claim(&claim).await.expect("latest"),
        Some(CheckpointId(2)),
        "the handle that put it knows its epoch without reading it"
    );
    let claim = js.claim_epoch_visible(Epoch(3)).await.expect("claim 3");
    assert_eq!(
        js.latest_after_claim(&claim).await.expect("latest"),
        Some(CheckpointId(1)),
        "a later claim (an epoch above the manifest's was claimed since) reads in full and falls back past it"
    );
    let other = env.store.job(job("put-here"));
    let claim = other.claim_epoch_visible(Epoch(4)).await.expect("claim 4");
    assert_eq!(
        other.latest_after_claim(&claim).await.expect("latest"),
        Some(CheckpointId(1)),
        "another handle reads it"
    );
}

/// A claim racing a commit of the same handle (a recovery while its
/// supervisor's last commit is in flight) finds the commit decided: either
/// its manifest is the newest the claim reads, or the commit is fenced.
/// Never both missed by the claim and committed: a recovery would restore
/// the older checkpoint, and the one it missed could be restored later.
async fn test_a_claim_finds_a_racing_commit_decided(env: &Env) {
    let trials = 48u64;
    let (mut landed, mut fenced) = (0, 0);
    for trial in 0..trials {
        let js = env.store.job(job(&format!("race-{trial}")));
        commit_checkpoint(&js, 1, 1, &[("w", "s", b"one".to_vec(), Codec::None)], &[]).await;
        let chunk = js
            .write_chunk(
                CheckpointId(2),
                &worker("w"),
                "s",
                b"two".to_vec().into(),
                Codec::None,
            )
            .await
            .expect("chunk");
        let mut m = Manifest::new(js.job().clone(), CheckpointId(2), Epoch(1));
        m.workers.entry(worker("w")).or_default().chunks.push(chunk);
        let committing = {
            let js = js.clone();
            tokio::spawn(async move { js.commit(&m).await })
        };
        // The claim starts at a different point of the commit each trial
        // (a commit takes a few hundred microseconds on a local disk).
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_micros(15 * trial) {
            std::hint::spin_loop();
        }
        let claim = js.claim_epoch_visible(Epoch(2)).await.expect("claim");
        let latest = js
            .latest_after_claim(&claim)
            .await
            .expect("latest")
            .map(|m| m.0);
        match committing.await.expect("commit task") {
            Ok(()) => {
                landed += 1;
                assert_eq!(
                    latest,
                    Some(2),
                    "trial {trial}: the claim missed a commit that landed"
                );
            }
            Err(e) if e.kind() == ErrorKind::Fenced => {
                fenced += 1;
                assert_eq!(latest, Some(1), "trial {trial}: fenced, yet read");
            }
            Err(e) => panic!("trial {trial}: commit failed: {e}"),
        }
        assert_eq!(
            js.latest().await.expect("latest").checkpoint.0,
            latest.expect("a checkpoint"),
            "trial {trial}: the full read agrees"
        );
    }
    eprintln!("{trials} races: {landed} commits landed before the claim, {fenced} fenced by it");
}

async fn test_retention_keeps_shared_and_in_progress_chunks(env: &Env) {
    let js = env.store.job(job("retain"));
    // Checkpoint 1 writes a base chunk; 2..=5 each write a delta and reference base.
    let m1 = commit_checkpoint(
        &js,
        1,
        1,
        &[("w", "base", state_bytes(1000, 1), Codec::Zstd)],
        &[],
    )
    .await;
    let base = m1.workers[&worker("w")].chunks[0].clone();
    let mut manifests = vec![m1];
    for id in 2..=5 {
        let m = commit_checkpoint(
            &js,
            id,
            1,
            &[("w", "delta", state_bytes(500, id), Codec::None)],
            &[("w", base.clone())],
        )
        .await;
        manifests.push(m);
    }
    // Garbage of an aborted checkpoint 3b (same id range as committed ones)...
    let aborted = js
        .write_chunk(
            CheckpointId(3),
            &worker("w"),
            "aborted",
            b"x".to_vec().into(),
            Codec::None,
        )
        .await
        .expect("aborted chunk");
    // ...and checkpoint 6, still in progress: its chunk must survive.
    let in_progress = js
        .write_chunk(
            CheckpointId(6),
            &worker("w"),
            "delta",
            b"y".to_vec().into(),
            Codec::None,
        )
        .await
        .expect("in-progress chunk");

    let report = js.gc(2).await.expect("gc");
    assert_eq!(report.retained, vec![CheckpointId(4), CheckpointId(5)]);
    assert_eq!(
        report.deleted_manifests,
        vec![CheckpointId(1), CheckpointId(2), CheckpointId(3)]
    );
    assert_eq!(report.kept_in_progress, 1);
    // Deltas of 1..=3 are not shared (3 of them) plus the aborted chunk; base is shared.
    assert_eq!(report.deleted_chunks, 3);
    // What the kept checkpoints reference (used to prune local caches): base and the deltas of 4 and 5.
    let expected: HashSet<String> = manifests[3..]
        .iter()
        .flat_map(|m| m.chunks().map(|c| c.key.clone()))
        .collect();
    assert_eq!(report.referenced, expected);
    assert!(report.referenced.contains(&base.key));

    let remaining: HashSet<String> = js
        .list()
        .await
        .expect("list")
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(remaining, HashSet::from(["4".to_string(), "5".to_string()]));
    for m in &manifests[3..] {
        assert!(
            js.verify(m).await.expect("verify").is_ok(),
            "retained checkpoint {} broken",
            m.checkpoint
        );
    }
    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let restored = js
        .restore_worker(&manifests[3], &worker("w"), &cache)
        .await
        .expect("restore 4");
    assert_eq!(restored.chunks.len(), 2);
    assert_eq!(restored.chunks[1].bytes(), &state_bytes(1000, 1)[..]);
    // The in-progress chunk is still there and can be committed.
    let mut m6 = Manifest::new(job("retain"), CheckpointId(6), Epoch(1));
    m6.workers.insert(
        worker("w"),
        WorkerSnapshot {
            chunks: vec![in_progress, base],
            metadata: vec![],
        },
    );
    js.commit(&m6).await.expect("commit in-progress checkpoint");
    assert!(js.verify(&m6).await.expect("verify 6").is_ok());
    // The aborted chunk, though, is gone.
    let mut ghost = Manifest::new(job("retain"), CheckpointId(7), Epoch(1));
    ghost.workers.insert(
        worker("w"),
        WorkerSnapshot {
            chunks: vec![aborted],
            metadata: vec![],
        },
    );
    js.commit(&ghost).await.expect("commit references garbage");
    let report = js.verify(&ghost).await.expect("verify ghost");
    assert!(!report.is_ok());
    let err = js.gc(0).await.expect_err("keep 0");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

async fn test_falls_back_past_corrupt_and_incomplete(env: &Env) {
    let js = env.store.job(job("fallback"));
    let m1 = commit_checkpoint(
        &js,
        1,
        1,
        &[("w", "s", state_bytes(4000, 1), Codec::Zstd)],
        &[],
    )
    .await;
    let m2 = commit_checkpoint(
        &js,
        2,
        1,
        &[("w", "s", state_bytes(4000, 2), Codec::None)],
        &[],
    )
    .await;
    let m3 = commit_checkpoint(
        &js,
        3,
        1,
        &[("w", "s", state_bytes(4000, 3), Codec::Zstd)],
        &[],
    )
    .await;
    commit_checkpoint(
        &js,
        4,
        1,
        &[("w", "s", state_bytes(10, 4), Codec::None)],
        &[],
    )
    .await;
    // 4: the manifest itself is damaged. 3: a chunk byte flipped. 2: a chunk missing.
    env.flip_byte(&js.full_key("manifests/00000000000000000004.manifest"), 40)
        .await;
    let bad3 = js.full_key(&m3.workers[&worker("w")].chunks[0].key);
    env.flip_byte(&bad3, 100).await;
    let gone2 = js.full_key(&m2.workers[&worker("w")].chunks[0].key);
    env.raw_delete(&gone2).await;

    let entries = js.list().await.expect("list");
    assert!(
        matches!(entries[3].status, CheckpointStatus::Corrupt(_)),
        "{:?}",
        entries[3]
    );
    assert_eq!(
        js.latest().await.expect("latest").checkpoint,
        CheckpointId(3)
    );

    let (good, skipped) = js.newest_verified().await.expect("newest verified");
    assert_eq!(good, m1);
    let ids: Vec<u64> = skipped.iter().map(|s| s.id.0).collect();
    assert_eq!(ids, vec![4, 3, 2]);
    assert!(
        skipped[0]
            .reason
            .contains("manifests/00000000000000000004.manifest"),
        "{:?}",
        skipped[0]
    );
    assert!(
        skipped[1].reason.contains(&bad3) && skipped[1].reason.contains("CRC"),
        "{:?}",
        skipped[1]
    );
    assert!(
        skipped[2].reason.contains(&gone2) && skipped[2].reason.contains("not found"),
        "{:?}",
        skipped[2]
    );

    // Restoring the corrupt checkpoint fails, names the object, and leaves no cache file.
    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let err = js
        .restore_worker(&m3, &worker("w"), &cache)
        .await
        .expect_err("corrupt restore");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains(&bad3), "{err}");
    let leftovers: Vec<_> = walk(cache_dir.path());
    assert!(leftovers.is_empty(), "cache holds {leftovers:?}");
    let err = js
        .manifest(CheckpointId(4))
        .await
        .expect_err("corrupt manifest");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `write_chunk_here` (one blocking step, local directories only) writes
/// chunks a restore reads like any other, in segments, leaving no staging
/// file, also when it fails; a remote store refuses it by name.
async fn test_chunks_written_here_restore_like_any_other(env: &Env) {
    let js = env.store.job(job("here"));
    let w = worker("counter-0");
    let big = state_bytes(3 << 20, 7); // many write segments
    let small = state_bytes(1_000, 8);
    let write = |name: &'static str, data: Vec<u8>, codec| {
        let (js, w) = (js.clone(), w.clone());
        tokio::task::spawn_blocking(move || {
            js.write_chunk_here(CheckpointId(1), &w, name, data.into(), codec)
        })
    };
    let written = write("kg-0", big.clone(), Codec::None).await.expect("task");
    if env.is_s3 {
        let err = written.expect_err("a remote store writes with write_chunk");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("not a local directory"), "{err}");
        return;
    }
    let a = written.expect("write here, codec none");
    let b = write("kg-1", small.clone(), Codec::Zstd)
        .await
        .expect("task")
        .expect("write here, zstd");
    assert_eq!(
        (a.raw_len, b.raw_len),
        (big.len() as u64, small.len() as u64)
    );
    let mut m = Manifest::new(js.job().clone(), CheckpointId(1), Epoch(1));
    m.workers.entry(w.clone()).or_default().chunks = vec![a, b];
    js.commit(&m).await.expect("commit");
    assert!(js.verify(&m).await.expect("verify").is_ok());
    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let restored = js.restore_worker(&m, &w, &cache).await.expect("restore");
    assert_eq!(restored.chunks[0].bytes(), &big[..]);
    assert_eq!(restored.chunks[1].bytes(), &small[..]);
    let root = env.url.strip_prefix("file://").expect("a file URL");
    // A write that cannot be placed (a directory is in the way of the
    // chunk's name) fails naming the step and the path, and leaves no
    // staging file behind.
    let first = walk(std::path::Path::new(root))
        .into_iter()
        .find(|p| p.ends_with("kg-0.chunk"))
        .expect("kg-0 lies in the store");
    let blocked = first.with_file_name("kg-2.chunk");
    std::fs::create_dir_all(blocked.join("in-the-way")).expect("block the name");
    let err = write("kg-2", small.clone(), Codec::None)
        .await
        .expect("task")
        .expect_err("the rename cannot replace a directory");
    assert!(
        err.to_string().contains("rename chunk file") && err.to_string().contains("kg-2.chunk"),
        "{err}"
    );
    let staging: Vec<_> = walk(std::path::Path::new(root))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains('#'))
        .collect();
    assert!(staging.is_empty(), "staging files left: {staging:?}");

    // Staging names already taken (what a crashed process with this pid
    // left) are skipped, not overwritten: nextest runs this test in a
    // process of its own, whose next staging number is 3.
    let pid = std::process::id();
    let stale: Vec<_> = (0..64)
        .map(|n| first.with_file_name(format!("kg-3.chunk#{pid}{n:08}")))
        .collect();
    for p in &stale {
        std::fs::write(p, b"stale").expect("a stale staging file");
    }
    let c = write("kg-3", small.clone(), Codec::None)
        .await
        .expect("task")
        .expect("written under a free staging name");
    let mut m2 = Manifest::new(js.job().clone(), CheckpointId(2), Epoch(1));
    m2.workers.entry(w.clone()).or_default().chunks = vec![c];
    assert!(js.verify(&m2).await.expect("verify").is_ok());
    for p in &stale {
        assert_eq!(std::fs::read(p).expect("still there"), b"stale");
    }
}

async fn test_damaged_cache_file_is_fetched_again(env: &Env) {
    let js = env.store.job(job("cache"));
    let data = state_bytes(100_000, 9);
    let m = commit_checkpoint(&js, 1, 1, &[("w", "s", data.clone(), Codec::Zstd)], &[]).await;
    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let first = js
        .restore_worker(&m, &worker("w"), &cache)
        .await
        .expect("restore");
    drop(first);
    let files = walk(cache_dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let mut bytes = std::fs::read(&files[0]).expect("read cache file");
    bytes[5000] ^= 1;
    std::fs::write(&files[0], bytes).expect("damage cache file");
    let again = js
        .restore_worker(&m, &worker("w"), &cache)
        .await
        .expect("restore again");
    assert_eq!(
        again.cache_hits, 0,
        "a damaged cache file must not count as a hit"
    );
    assert_eq!(again.chunks[0].bytes(), &data[..]);
}

/// An uncompressed chunk damaged in the store is refused by a restore
/// (its CRC is checked once, as it streams in, or where it lies in a local
/// directory) and leaves no cache file behind: a later restore of a good
/// copy is not served the damaged bytes.
async fn test_damaged_uncompressed_chunk_is_refused_and_not_cached(env: &Env) {
    let js = env.store.job(job("plain-damage"));
    let data = state_bytes(3 << 20, 5);
    let m = commit_checkpoint(&js, 1, 1, &[("w", "s", data.clone(), Codec::None)], &[]).await;
    let key = js.full_key(&m.workers[&worker("w")].chunks[0].key);
    env.flip_byte(&key, 2 << 20).await;
    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let e = js
        .restore_worker(&m, &worker("w"), &cache)
        .await
        .expect_err("a damaged payload is refused");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("CRC"), "names the CRC: {e}");
    let files = walk(cache_dir.path());
    assert!(files.is_empty(), "nothing cached: {files:?}");
    // The byte flipped back: the same restore now succeeds, byte for byte.
    env.flip_byte(&key, 2 << 20).await;
    let good = js
        .restore_worker(&m, &worker("w"), &cache)
        .await
        .expect("restore");
    assert_eq!(good.chunks[0].bytes(), &data[..]);
}

async fn test_concurrent_writers_of_many_chunks(env: &Env) {
    // Four workers write eight chunks each at once, then one manifest commits them all.
    let js = Arc::new(env.store.job(job("parallel")));
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        for c in 0..8u64 {
            let js = js.clone();
            tasks.push(tokio::spawn(async move {
                let data = state_bytes(50_000, w * 100 + c);
                let chunk = js
                    .write_chunk(
                        CheckpointId(1),
                        &worker(&format!("w{w}")),
                        &format!("c{c}"),
                        data.into(),
                        Codec::Zstd,
                    )
                    .await
                    .expect("write");
                (w, chunk)
            }));
        }
    }
    let mut m = Manifest::new(job("parallel"), CheckpointId(1), Epoch(1));
    for t in tasks {
        let (w, chunk) = t.await.expect("task");
        m.workers
            .entry(worker(&format!("w{w}")))
            .or_default()
            .chunks
            .push(chunk);
    }
    js.commit(&m).await.expect("commit");
    let report = js.verify(&m).await.expect("verify");
    assert!(report.is_ok());
    assert_eq!(report.objects.len(), 1 + 32);
}

/// Chunks the caller holds (decoded, in memory) are neither fetched nor
/// mapped nor cached: a damaged copy of one in the store goes unnoticed,
/// and the others restore in the order the worker wrote them.
async fn test_restore_except_skips_held_chunks(env: &Env) {
    let js = env.store.job(job("held"));
    let (a, b, c) = (
        state_bytes(200_000, 1),
        state_bytes(300_000, 2),
        state_bytes(100_000, 3),
    );
    let m = commit_checkpoint(
        &js,
        1,
        1,
        &[
            ("w", "kg-0", a.clone(), Codec::None),
            ("w", "kg-1", b, Codec::Zstd),
            ("w", "kg-2", c.clone(), Codec::None),
        ],
        &[],
    )
    .await;
    let chunks = &m.workers[&worker("w")].chunks;
    let held_key = chunks[1].key.clone();
    let others: u64 = chunks[0].stored_len + chunks[2].stored_len;
    env.flip_byte(&js.full_key(&held_key), 50).await;
    let held = |chunk: &ChunkRef| chunk.key == held_key;

    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let r = js
        .restore_worker_except(&m, &worker("w"), &cache, false, &held)
        .await
        .expect("the held chunk is not read");
    assert_eq!(r.chunks.len(), 2);
    assert_eq!(r.chunks[0].bytes(), &a[..]);
    assert_eq!(r.chunks[1].bytes(), &c[..]);
    assert_eq!(r.metadata, b"pos-1");
    if env.is_s3 {
        assert_eq!((r.fetched_bytes, r.in_place), (others, 0));
    } else {
        assert_eq!(
            (r.in_place, r.in_place_bytes, r.fetched_bytes),
            (2, others, 0)
        );
    }

    // Everything it reads goes into the cache, and only that.
    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(cache_dir.path()).expect("cache");
    let r = js
        .restore_worker_except(&m, &worker("w"), &cache, true, &held)
        .await
        .expect("cached");
    assert_eq!(
        (r.chunks.len(), r.in_place, r.fetched_bytes),
        (2, 0, others)
    );
    let e = js
        .restore_worker(&m, &worker("w"), &cache)
        .await
        .expect_err("the damaged chunk was never cached");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&held_key), "{e}");

    // All held: nothing read, the metadata still there.
    let r = js
        .restore_worker_except(&m, &worker("w"), &cache, false, &|_| true)
        .await
        .expect("all held");
    assert!(r.chunks.is_empty());
    assert_eq!((r.fetched_bytes, r.in_place, r.cache_hits), (0, 0, 0));
    assert_eq!(r.metadata, b"pos-1");
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Env::file()).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Env::s3(stringify!($name))).await
                }
            )*
        }
    };
}

async fn test_savepoints_pin_checkpoints_against_retention(env: &Env) {
    let js = env.store.job(job("savepoints"));
    // Checkpoint 1 writes a chunk every later one shares, 2 writes its own.
    let m1 = commit_checkpoint(
        &js,
        1,
        1,
        &[("w", "shared", state_bytes(1000, 1), Codec::None)],
        &[],
    )
    .await;
    let shared = m1.workers[&worker("w")].chunks[0].clone();
    let m2 = commit_checkpoint(
        &js,
        2,
        1,
        &[("w", "own", state_bytes(1000, 2), Codec::Zstd)],
        &[("w", shared.clone())],
    )
    .await;
    let own2 = m2.workers[&worker("w")].chunks[0].clone();
    // Bad names and uncommitted checkpoints are refused, naming why.
    let e = js
        .create_savepoint("12", CheckpointId(2))
        .await
        .expect_err("digits");
    assert!(e.to_string().contains("all digits"), "{e}");
    let e = js
        .create_savepoint("a/b", CheckpointId(2))
        .await
        .expect_err("slash");
    assert!(e.to_string().contains("savepoint name"), "{e}");
    let e = js
        .create_savepoint("x", CheckpointId(9))
        .await
        .expect_err("missing");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    js.create_savepoint("before-upgrade", CheckpointId(2))
        .await
        .expect("savepoint");
    // Idempotent for the same checkpoint; another checkpoint is refused.
    js.create_savepoint("before-upgrade", CheckpointId(2))
        .await
        .expect("same again");
    let e = js
        .create_savepoint("before-upgrade", CheckpointId(1))
        .await
        .expect_err("moved name");
    assert!(e.to_string().contains("already names checkpoint 2"), "{e}");
    for id in 3..=6u64 {
        commit_checkpoint(
            &js,
            id,
            1,
            &[("w", "own", state_bytes(1000, id), Codec::None)],
            &[("w", shared.clone())],
        )
        .await;
    }
    let report = js.gc(2).await.expect("gc");
    assert_eq!(report.retained, vec![CheckpointId(5), CheckpointId(6)]);
    assert_eq!(report.pinned, vec![CheckpointId(2)]);
    let ids: Vec<CheckpointId> = js
        .list()
        .await
        .expect("list")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec![CheckpointId(2), CheckpointId(5), CheckpointId(6)]);
    // The pinned checkpoint still restores, byte for byte, and verifies.
    let from = js.resolve_start("before-upgrade").await.expect("resolve");
    assert_eq!(from.checkpoint, CheckpointId(2));
    assert!(js.verify(&from).await.expect("verify").is_ok());
    assert_eq!(
        from.workers[&worker("w")].chunks,
        vec![own2.clone(), shared.clone()]
    );
    assert_eq!(
        js.resolve_start("6").await.expect("by id").checkpoint,
        CheckpointId(6)
    );
    let e = js.resolve_start("nope").await.expect_err("unknown");
    assert!(e.to_string().contains("no savepoint named \"nope\""), "{e}");
    let e = js
        .resolve_start("3")
        .await
        .expect_err("deleted by retention");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(
        js.savepoints().await.expect("list")[0].name,
        "before-upgrade"
    );
    // A damaged savepoint fails retention instead of unpinning anything.
    let sp_key = js.full_key("savepoints/before-upgrade.savepoint");
    let len = env.raw_get(&sp_key).await.len();
    env.flip_byte(&sp_key, len - 3).await;
    let e = js.gc(1).await.expect_err("damaged savepoint");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(js.list().await.expect("list").len(), 3, "nothing deleted");
    // Once deleted, the checkpoint ages out like any other.
    env.raw_delete(&sp_key).await;
    js.create_savepoint("before-upgrade", CheckpointId(2))
        .await
        .expect("retaken");
    js.delete_savepoint("before-upgrade").await.expect("delete");
    let e = js
        .delete_savepoint("before-upgrade")
        .await
        .expect_err("gone");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let report = js.gc(2).await.expect("gc");
    assert!(report.pinned.is_empty());
    assert_eq!(report.deleted_manifests, vec![CheckpointId(2)]);
    let e = js
        .resolve_start("before-upgrade")
        .await
        .expect_err("unpinned");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

suite!(
    test_chunks_written_here_restore_like_any_other,
    test_round_trip_and_restore_both_codecs,
    test_large_chunk_uses_multipart,
    test_commit_race_has_one_winner,
    test_fencing_refuses_lower_epochs,
    test_latest_after_a_visible_claim_agrees_with_latest,
    test_a_claim_finds_a_racing_commit_decided,
    test_a_claim_knows_the_manifest_its_handle_put_last,
    test_retention_keeps_shared_and_in_progress_chunks,
    test_falls_back_past_corrupt_and_incomplete,
    test_damaged_cache_file_is_fetched_again,
    test_damaged_uncompressed_chunk_is_refused_and_not_cached,
    test_concurrent_writers_of_many_chunks,
    test_savepoints_pin_checkpoints_against_retention,
    test_restore_except_skips_held_chunks,
);

#[tokio::test]
async fn test_cache_prune_keeps_referenced_and_in_progress_chunks() {
    let env = Env::file();
    let js = env.store.job(job("prune"));
    let dir = tempfile::tempdir().expect("cache");
    let cache = LocalCache::new(dir.path()).expect("cache");
    let mut keys = Vec::new();
    for id in 1..=3u64 {
        let data = state_bytes(100, id);
        let c = js
            .write_chunk(
                CheckpointId(id),
                &worker("w"),
                "s",
                data.clone().into(),
                Codec::None,
            )
            .await
            .expect("write");
        cache.insert(js.job(), &c, &data).expect("insert");
        keys.push(c.key);
    }
    // Checkpoint 2 is the newest committed and references its own chunk;
    // checkpoint 3 may be in progress.
    let referenced = HashSet::from([keys[1].clone()]);
    let deleted = cache
        .prune(js.job(), &referenced, CheckpointId(2))
        .expect("prune");
    assert_eq!(deleted, 1);
    let left: Vec<String> = walk(dir.path())
        .iter()
        .map(|p| {
            p.strip_prefix(dir.path().join("prune"))
                .expect("in job dir")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.contains(&keys[1]) && left.contains(&keys[2]),
        "{left:?}"
    );
}
