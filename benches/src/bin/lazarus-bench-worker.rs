//! Worker binary for the streaming benchmarks: wordcount's operator kinds
//! plus a keyed-state holder whose state size and dirty fraction are set by
//! parameters.
//!
//! - `key-source`: emits keys for `duration_ms`, each drawn from a window of
//!   `dirty_percent` % of the key groups that moves every `window_ms`, at most
//!   `rate` records/s;
//! - `state-holder`: on start fills keyed state with `state_bytes` of values
//!   (1 KiB each) over all key groups, then rewrites the value of every key it
//!   receives.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use lazarus_sdk::*;

const VALUE: usize = 1024;

struct KeySource {
    key_groups: u32,
    dirty_percent: u32,
    window: Duration,
    until: Instant,
    started: Instant,
    rate: u64,
    sent: u64,
    x: u64,
}

impl KeySource {
    fn new(ctx: &Context) -> Result<KeySource, BoxError> {
        let num = |k: &str, d: u64| -> Result<u64, BoxError> {
            ctx.params.get(k).map_or(Ok(d), |v| {
                v.parse().map_err(|e| format!("param {k}: {e}").into())
            })
        };
        Ok(KeySource {
            key_groups: ctx.key_groups,
            dirty_percent: num("dirty_percent", 10)? as u32,
            window: Duration::from_millis(num("window_ms", 1000)?),
            until: Instant::now() + Duration::from_millis(num("duration_ms", 8000)?),
            started: Instant::now(),
            rate: num("rate", 20_000)?,
            sent: 0,
            x: 0x9E37_79B9_7F4A_7C15,
        })
    }
}

impl Source for KeySource {
    fn poll(&mut self, out: &mut Emitter, max: usize) -> Result<SourcePoll, BoxError> {
        if Instant::now() > self.until {
            return Ok(SourcePoll::Exhausted);
        }
        let allowed = (self.started.elapsed().as_secs_f64() * self.rate as f64) as u64;
        if self.sent >= allowed {
            std::thread::sleep(Duration::from_millis(1));
            return Ok(SourcePoll::Ready);
        }
        let groups = (self.key_groups * self.dirty_percent / 100).max(1);
        let phase = (self.started.elapsed().as_millis() / self.window.as_millis().max(1)) as u32;
        let first = (phase * groups) % self.key_groups;
        let mut emitted = 0;
        while emitted < max.min(64) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let key = (self.x % 1_000_000_000).to_le_bytes();
            let g = key_group(&key, self.key_groups);
            if (g + self.key_groups - first) % self.key_groups < groups {
                out.emit(Record::new(key.to_vec(), Vec::new()));
                emitted += 1;
            }
        }
        self.sent += emitted as u64;
        Ok(SourcePoll::Ready)
    }
    fn snapshot(&mut self) -> Snapshot {
        Snapshot::with_metadata(self.sent.to_le_bytes().to_vec())
    }
    fn restore(&mut self, _state: &Restored) -> Result<(), BoxError> {
        Ok(())
    }
}

struct StateHolder {
    state: KeyedState<Vec<u8>, Vec<u8>>,
    touched: u64,
}

impl StateHolder {
    fn new(ctx: &Context) -> Result<StateHolder, BoxError> {
        let bytes: u64 = ctx.param("state_bytes")?.parse()?;
        let mut state = KeyedState::new("kv", ctx);
        // Fill with keys this instance owns, across all of its key groups.
        let mut k = 0u64;
        let mut filled = 0u64;
        while filled < bytes {
            let key = (1_000_000_000 + k).to_le_bytes().to_vec();
            k += 1;
            if group_owner(
                key_group(&key, ctx.key_groups),
                ctx.key_groups,
                ctx.parallelism,
            ) != ctx.index
            {
                continue;
            }
            state
                .entry(key)
                .or_insert_with(|| vec![(k % 251) as u8; VALUE]);
            filled += VALUE as u64;
        }
        Ok(StateHolder { state, touched: 0 })
    }
}

impl Operator for StateHolder {
    fn process(&mut self, r: Record, _out: &mut Emitter) -> Result<(), BoxError> {
        self.touched += 1;
        let v = self.state.entry(r.key).or_insert_with(|| vec![0; VALUE]);
        v[0] = v[0].wrapping_add(1);
        Ok(())
    }
    fn snapshot(&mut self) -> Snapshot {
        self.state.snapshot()
    }
    fn restore(&mut self, state: &Restored) -> Result<(), BoxError> {
        self.state.restore(state)
    }
}

fn main() -> ExitCode {
    run_worker(
        wordcount::registry()
            .source("key-source", KeySource::new)
            .operator("state-holder", StateHolder::new),
    )
}
