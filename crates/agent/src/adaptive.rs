//! Whether compression pays, decided from measurements while sending.
//!
//! Compressing costs CPU that, on a fast link, the TLS stream needs: on loopback
//! zstd at level 1 makes replication slower, on a slow WAN link it makes it
//! faster. With the chunks compressed on `W` workers at `c` bytes per second
//! each and a ratio `r`, and the link carrying `L` wire bytes per second, the
//! pipeline runs at `min(W·c, L / r)` raw bytes per second compressed and `L`
//! uncompressed; compression pays when `W·c > L` (with a margin) and `r` is
//! clearly below 1. Both sides are measured as data goes by: workers time their
//! compression (and keep sampling one chunk in [`SAMPLE_EVERY`] while it is
//! off), the writer times its writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// While compression is off, one chunk in this many is still compressed (and
/// discarded) to keep the estimates current.
pub(crate) const SAMPLE_EVERY: u64 = 16;
/// Raw bytes sent between two decisions.
const DECIDE_EVERY_BYTES: u64 = 16 << 20;

/// Shared between the workers and the writer of every epoch of an agent.
#[derive(Debug)]
pub struct AdaptiveCompression {
    enabled: AtomicBool,
    compress_nanos: AtomicU64,
    compress_in_bytes: AtomicU64,
    compress_out_bytes: AtomicU64,
    write_nanos: AtomicU64,
    write_bytes: AtomicU64,
    raw_since_decision: AtomicU64,
    chunks_seen: AtomicU64,
}

impl Default for AdaptiveCompression {
    fn default() -> Self {
        Self {
            // Start compressing: the safe choice on an unknown (maybe slow) link.
            enabled: AtomicBool::new(true),
            compress_nanos: AtomicU64::new(0),
            compress_in_bytes: AtomicU64::new(0),
            compress_out_bytes: AtomicU64::new(0),
            write_nanos: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            raw_since_decision: AtomicU64::new(0),
            chunks_seen: AtomicU64::new(0),
        }
    }
}

impl AdaptiveCompression {
    /// Whether chunks are being compressed now.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether a worker should compress this chunk: always while enabled, one in
    /// [`SAMPLE_EVERY`] while not (to measure).
    pub(crate) fn should_try(&self) -> bool {
        self.enabled()
            || self
                .chunks_seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(SAMPLE_EVERY)
    }

    /// A worker compressed `input` bytes into `output` in `took`.
    pub(crate) fn record_compression(&self, input: usize, output: usize, took: Duration) {
        self.compress_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.compress_in_bytes
            .fetch_add(input as u64, Ordering::Relaxed);
        self.compress_out_bytes
            .fetch_add(output as u64, Ordering::Relaxed);
    }

    /// The writer wrote `wire` bytes of a frame carrying `raw` chunk bytes in
    /// `took`; every [`DECIDE_EVERY_BYTES`] the decision is revisited.
    pub(crate) fn record_write(&self, wire: usize, raw: u64, took: Duration, workers: usize) {
        self.write_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.write_bytes.fetch_add(wire as u64, Ordering::Relaxed);
        if self.raw_since_decision.fetch_add(raw, Ordering::Relaxed) + raw >= DECIDE_EVERY_BYTES {
            self.raw_since_decision.store(0, Ordering::Relaxed);
            self.decide(workers);
        }
    }

    fn decide(&self, workers: usize) {
        let (c_ns, c_in, c_out) = (
            self.compress_nanos.swap(0, Ordering::Relaxed),
            self.compress_in_bytes.swap(0, Ordering::Relaxed),
            self.compress_out_bytes.swap(0, Ordering::Relaxed),
        );
        let (w_ns, w_bytes) = (
            self.write_nanos.swap(0, Ordering::Relaxed),
            self.write_bytes.swap(0, Ordering::Relaxed),
        );
        if c_ns == 0 || c_in == 0 || w_ns == 0 || w_bytes == 0 {
            return; // not enough measured yet: keep the current choice
        }
        let compress_rate = c_in as f64 / (c_ns as f64 / 1e9) * workers as f64;
        let link_rate = w_bytes as f64 / (w_ns as f64 / 1e9);
        let ratio = c_out as f64 / c_in as f64;
        let pays = ratio < 0.9 && compress_rate * 0.8 > link_rate;
        let was = self.enabled.swap(pays, Ordering::Relaxed);
        if was != pays {
            tracing::info!(
                compress = pays,
                compress_mib_per_s = compress_rate / 1048576.0,
                link_mib_per_s = link_rate / 1048576.0,
                ratio,
                "compression choice changed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(state: &AdaptiveCompression, compress_mib_s: f64, ratio: f64, link_mib_s: f64) {
        let mib = 1048576.0;
        let input = 64 << 20;
        state.record_compression(
            input,
            (input as f64 * ratio) as usize,
            Duration::from_secs_f64(input as f64 / (compress_mib_s * mib)),
        );
        let wire = 32 << 20;
        state.record_write(
            wire,
            DECIDE_EVERY_BYTES,
            Duration::from_secs_f64(wire as f64 / (link_mib_s * mib)),
            1,
        );
    }

    #[test]
    fn compression_turns_off_on_a_fast_link_and_on_on_a_slow_one() {
        let state = AdaptiveCompression::default();
        assert!(state.enabled());
        feed(&state, 450.0, 0.3, 1100.0); // loopback
        assert!(!state.enabled());
        feed(&state, 450.0, 0.3, 100.0); // a WAN link
        assert!(state.enabled());
        feed(&state, 2000.0, 0.99, 100.0); // incompressible data
        assert!(!state.enabled());
    }

    #[test]
    fn sampling_continues_while_off() {
        let state = AdaptiveCompression::default();
        state.enabled.store(false, Ordering::Relaxed);
        let tried = (0..64).filter(|_| state.should_try()).count();
        assert_eq!(tried, 64 / SAMPLE_EVERY as usize);
    }
}
