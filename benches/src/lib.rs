//! Helpers shared by the benchmarks under `benches/`.

use std::time::Duration;

/// The `p` quantile (0.0 to 1.0, nearest rank) of `v`; zero when empty.
pub fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}
