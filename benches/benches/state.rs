//! Keyed-state benchmarks, in one process (no workers, no store), each
//! figure beside its baseline from the same run.
//!
//!     cargo bench -p lazarus-benches --bench state
//!
//! The state is one of wordcount's two counters on the long-tail corpus:
//! a `KeyedState<ShortString, u64>` of the words the instance owns
//! (`LAZARUS_BENCH_KEYS` distinct words in all, default 720,000, split
//! over 2 instances; `LAZARUS_BENCH_KEY_GROUPS`, default 32 as in
//! `examples/wordcount/job.toml`), every group dirty.
//!
//! 1. serialization: every part of a snapshot archived on this thread, in
//!    ns per entry and MB/s of archive, beside a plain copy of the same
//!    bytes (memcpy) and a lookup of every entry; and the snapshot itself
//!    (the synchronous part, on the processing thread).
//! 2. archive-on-write: after a snapshot, the first write to each shard
//!    archives it for the snapshot (the processing thread's share of a
//!    checkpoint when it writes everywhere before the serialization comes
//!    by): ns per write beside the same writes with no snapshot pending,
//!    rounds interleaved; once with the keys ordered shard by shard (each
//!    shard in cache after its first key: the difference is the archive
//!    work) and once in arrival order (random shards, as a job writes).
//!
//! Best of `LAZARUS_BENCH_ROUNDS` (default 5) rounds each. Under `cargo
//! test` (no `--bench`): one round.

use std::time::{Duration, Instant};

use lazarus_sdk::{
    group_owner, key_group, CheckpointId, Context, KeyedState, PartContent, Restored, ShortString,
    Snapshot,
};

/// A count of at least 1 from the environment, `default` when unset.
fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => match v.parse() {
            Ok(0) => panic!("{name}={v:?}: must be at least 1"),
            Ok(n) => n,
            Err(e) => panic!("{name}={v:?} is not a count: {e}"),
        },
        Err(_) => default,
    }
}

struct Setup {
    ctx: Context,
    keys: Vec<ShortString>,
}

fn setup() -> Setup {
    let total = env_or("LAZARUS_BENCH_KEYS", 720_000);
    let mut ctx = Context::for_test("count", 0, 2);
    ctx.key_groups = env_or("LAZARUS_BENCH_KEY_GROUPS", 32) as u32;
    let keys = (20_000..20_000 + total)
        .map(|id| wordcount::word_syllables(id).collect::<String>())
        .filter(|w| {
            let g = key_group(w.as_bytes(), ctx.key_groups);
            group_owner(g, ctx.key_groups, ctx.parallelism) == ctx.index
        })
        .map(ShortString::from)
        .collect();
    Setup { ctx, keys }
}

/// `keys` ordered shard by shard: a key's group and shard are its CRC-32
/// modulo the groups and, above that, modulo the shards (a power of two
/// up to 2^16), so the CRC modulo `key_groups << 16` sorts each shard's
/// keys together. A pass in this order finds each shard in cache after
/// its first key: what is left to measure is the work per shard.
fn shard_by_shard(keys: &[ShortString], key_groups: u32) -> Vec<ShortString> {
    let modulus = u64::from(key_groups) << 16;
    let mut sorted = keys.to_vec();
    sorted.sort_by_key(|k| u64::from(crc32fast::hash(k.as_bytes())) % modulus);
    sorted
}

fn filled(s: &Setup) -> KeyedState<ShortString, u64> {
    let mut state = KeyedState::new("counts", &s.ctx);
    for (i, k) in s.keys.iter().enumerate() {
        state.insert(k.clone(), i as u64);
    }
    state
}

/// A write to every 64th key: every group dirty, as in a checkpoint after
/// a second of the long tail.
fn dirty_every_group(state: &mut KeyedState<ShortString, u64>, keys: &[ShortString]) {
    for k in keys.iter().step_by(64) {
        *state.get_mut(k).expect("held") += 1;
    }
}

fn best_of<T>(rounds: u64, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..rounds.max(1) {
        let (took, out) = f();
        if best.as_ref().is_none_or(|(b, _)| took < *b) {
            best = Some((took, out));
        }
    }
    best.expect("at least one round")
}

fn ns_per(took: Duration, n: usize) -> f64 {
    took.as_nanos() as f64 / n.max(1) as f64
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
}

/// The figures are of a real archive: a snapshot of every group restores
/// every entry as it is.
fn check_round_trip(s: &Setup, state: &mut KeyedState<ShortString, u64>) {
    dirty_every_group(state, &s.keys);
    let (parts, _) = Snapshot::serialize_for_test(state.snapshot()).expect("serializes");
    let mut back: KeyedState<ShortString, u64> = KeyedState::new("counts", &s.ctx);
    back.restore(&Restored::from_parts(CheckpointId(1), parts, Vec::new()))
        .expect("the archive restores");
    assert_eq!(back.len(), s.keys.len(), "the archive restores every entry");
    let differ = s
        .keys
        .iter()
        .filter(|k| back.get(k) != state.get(k))
        .count();
    assert_eq!(differ, 0, "restored values differ from the state's");
}

fn serialization(s: &Setup, state: &mut KeyedState<ShortString, u64>, rounds: u64) {
    let n = s.keys.len();
    let mut froze = Duration::MAX;
    let (archived, parts) = best_of(rounds, || {
        dirty_every_group(state, &s.keys);
        let started = Instant::now();
        let snapshot = state.snapshot();
        froze = froze.min(started.elapsed());
        let started = Instant::now();
        let (parts, _) = Snapshot::serialize_for_test(snapshot).expect("serializes");
        (started.elapsed(), parts)
    });
    let bytes: usize = parts.values().map(|p| p.len()).sum();
    check_round_trip(s, state);
    let (copied, _) = best_of(rounds, || {
        let mut out = Vec::with_capacity(bytes);
        let started = Instant::now();
        for p in parts.values() {
            out.extend_from_slice(p);
        }
        (started.elapsed(), std::hint::black_box(out).len())
    });
    let (walked, _) = best_of(rounds, || {
        let started = Instant::now();
        let mut sum = 0u64;
        for k in &s.keys {
            sum = sum.wrapping_add(k.len() as u64 + state.get(k).copied().unwrap_or(0));
        }
        (started.elapsed(), std::hint::black_box(sum))
    });
    println!(
        "  serialize {n} entries ({} parts, {:.1} MB): {:.0} ns/entry, {:.0} MB/s ({:.1} ms)",
        parts.len(),
        bytes as f64 / 1e6,
        ns_per(archived, n),
        mb_per_s(bytes, archived),
        archived.as_secs_f64() * 1e3
    );
    println!(
        "    baseline: copy of the same bytes {:.0} MB/s; a lookup of every entry {:.0} ns/entry",
        mb_per_s(bytes, copied),
        ns_per(walked, n)
    );
    println!(
        "  the snapshot itself (the processing thread's synchronous part, every group dirty): {:.0} us",
        froze.as_secs_f64() * 1e6
    );
}

fn revives(snapshot: &Snapshot) -> Vec<lazarus_sdk::Revive> {
    snapshot
        .parts()
        .iter()
        .filter_map(|(_, part)| match part {
            PartContent::Fresh { revive, .. } => revive.clone(),
            PartContent::Unchanged => None,
        })
        .collect()
}

/// One pass of a write to every key in `order`, timed; with a snapshot
/// pending when `pending` (its revives kept, as the runtime keeps them
/// beside the chunks), serialized after the pass.
fn write_pass(
    state: &mut KeyedState<ShortString, u64>,
    order: &[ShortString],
    pending: bool,
) -> Duration {
    dirty_every_group(state, order);
    let snapshot = pending.then(|| state.snapshot());
    let revives = snapshot.as_ref().map(revives);
    let started = Instant::now();
    for k in order {
        *state.get_mut(k).expect("held") += 1;
    }
    let took = started.elapsed();
    drop(revives);
    if let Some(snapshot) = snapshot {
        // Every shard was archived on write: the serialization only copies.
        Snapshot::serialize_for_test(snapshot).expect("serializes");
    }
    took
}

fn archive_on_write(s: &Setup, state: &mut KeyedState<ShortString, u64>, rounds: u64) {
    let n = s.keys.len();
    let sorted = shard_by_shard(&s.keys, s.ctx.key_groups);
    for (label, order) in [
        ("shard by shard (each shard's keys together)", &sorted),
        ("in arrival order (random shards)", &s.keys),
    ] {
        // Interleaved, so a change in the machine's speed hits both alike.
        let (mut pending, mut plain) = (Duration::MAX, Duration::MAX);
        for _ in 0..rounds.max(1) {
            pending = pending.min(write_pass(state, order, true));
            plain = plain.min(write_pass(state, order, false));
        }
        println!(
            "  a write to every key, {label}: {:.0} ns/write with a snapshot pending (each shard archived on its first write), {:.0} ns/write without",
            ns_per(pending, n),
            ns_per(plain, n),
        );
        // Signed: below the noise the difference of two best-of times can
        // come out negative, and should show so rather than as zero.
        let extra_ms = (pending.as_secs_f64() - plain.as_secs_f64()) * 1e3;
        println!(
            "    archive-on-write: {:.0} ns per entry archived, {:.1} ms for all",
            extra_ms * 1e6 / n.max(1) as f64,
            extra_ms
        );
    }
}

fn main() {
    // `cargo test` runs benches with `--bench` absent: one round each.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        env_or("LAZARUS_BENCH_ROUNDS", 5)
    } else {
        1
    };
    let s = setup();
    println!(
        "keyed state: {} words of one instance (of 2), {} key groups in all",
        s.keys.len(),
        s.ctx.key_groups
    );
    let mut state = filled(&s);
    println!("1. serialization");
    serialization(&s, &mut state, rounds);
    println!("2. archive-on-write");
    archive_on_write(&s, &mut state, rounds);
}
