//! Write latencies in a log-scale histogram of atomic counters: recording is
//! one `fetch_add`, and reading a window swaps every bucket back to zero.
//!
//! A value `v` in nanoseconds falls in bucket `v` below 16; above, in one of
//! 8 buckets per power of two (an error of at most 1/8).

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two, as a shift.
const SUB_BITS: u32 = 3;
const LINEAR: u64 = 1 << (SUB_BITS + 1);
const BUCKETS: usize = LINEAR as usize + (64 - (SUB_BITS as usize + 1)) * (1 << SUB_BITS);

pub(super) struct Latency {
    buckets: Vec<AtomicU64>,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latency").finish_non_exhaustive()
    }
}

fn bucket_of(nanos: u64) -> usize {
    if nanos < LINEAR {
        return nanos as usize;
    }
    let octave = 63 - nanos.leading_zeros(); // >= SUB_BITS + 1
    let sub = (nanos >> (octave - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + ((octave - SUB_BITS - 1) as usize) * (1 << SUB_BITS) + sub as usize
}

/// The largest value in `bucket`.
fn upper_of(bucket: usize) -> u64 {
    if (bucket as u64) < LINEAR {
        return bucket as u64;
    }
    let rest = bucket - LINEAR as usize;
    let octave = (rest >> SUB_BITS) as u32 + SUB_BITS + 1;
    let sub = (rest & ((1 << SUB_BITS) - 1)) as u64;
    let low = ((1u64 << SUB_BITS) + sub) << (octave - SUB_BITS);
    low.saturating_add((1u64 << (octave - SUB_BITS)) - 1)
}

impl Latency {
    pub(super) fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(super) fn record(&self, nanos: u64) {
        if let Some(bucket) = self.buckets.get(bucket_of(nanos)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// p50 and p99 in µs (rounded up) of the values recorded since the
    /// previous call, which starts a new window; zeros for an empty window.
    pub(super) fn take_p50_p99_us(&self) -> (u64, u64) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return (0, 0);
        }
        let quantile = |q_per_mille: u64| {
            // The smallest value with at least q of the samples at or below.
            let rank = (total * q_per_mille).div_ceil(1000).max(1);
            let mut seen = 0;
            for (bucket, count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return upper_of(bucket).div_ceil(1000);
                }
            }
            upper_of(BUCKETS - 1).div_ceil(1000)
        };
        (quantile(500), quantile(990))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        for nanos in [0, 1, 15, 16, 17, 100, 999, 4096, 123_456, 1 << 40, u64::MAX] {
            let bucket = bucket_of(nanos);
            assert!(bucket < BUCKETS);
            assert!(upper_of(bucket) >= nanos, "{nanos}");
            assert!(upper_of(bucket) - nanos <= nanos / 8 + 1, "{nanos}");
        }
    }

    #[test]
    fn quantiles_of_a_window_then_reset() {
        let latency = Latency::new();
        for _ in 0..98 {
            latency.record(10_000);
        }
        latency.record(2_000_000);
        latency.record(2_000_000);
        let (p50, p99) = latency.take_p50_p99_us();
        assert!((10..=12).contains(&p50), "{p50}");
        assert!((2000..=2300).contains(&p99), "{p99}");
        assert_eq!(latency.take_p50_p99_us(), (0, 0));
    }
}
