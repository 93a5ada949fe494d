//! Whether compression pays, decided from measurements while sending.
//!
//! Compressing costs CPU that, on a fast link, the TLS stream needs: on loopback
//! zstd at level 1 makes replication slower, on a slow WAN link it makes it
//! faster. With the chunks compressed on `W` workers at `c` bytes per second
//! each and a ratio `r`, and the link carrying `L` wire bytes per second, the
//! pipeline runs at `min(W·c, L / r)` raw bytes per second compressed and `L`
//! uncompressed; compression pays when `W·c > L` (with a margin) and `r` is
//! clearly below 1. Both sides are measured as data goes by: workers time their
//! compression (and keep sampling a chunk per [`SAMPLE_EVERY_BYTES`] while it is
//! off), the writer times its writes.
//!
//! A disk is a mix of regions (zeros, text, random bytes) and each window of
//! [`DECIDE_EVERY_BYTES`] sees only one or two of them, so a choice made from
//! one window alone flips every few windows. The controller therefore smooths
//! its estimates over windows (an exponential moving average), changes its
//! choice only when the other one wins by a margin ([`HYSTERESIS`]), and keeps
//! a choice for at least [`MIN_WINDOWS_BETWEEN_CHANGES`] windows and, after
//! its first change (the starting choice is a guess), for at least
//! [`MIN_SEND_TIME_BETWEEN_CHANGES`] of sending: on a fast link windows pass
//! in milliseconds, and a count of windows alone let the choice change
//! several times a second on a disk of mixed regions.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// While compression is off, one chunk in every this many bytes is still
/// compressed (and discarded) to keep the estimates current: four a window
/// of [`DECIDE_EVERY_BYTES`] whatever the chunk size (one chunk in 64 of
/// 64 KiB), which the smoothing over windows makes enough. One 64 KiB chunk
/// in 16 cost a loopback first sync 6% of the agent's CPU in discarded
/// samples.
pub(crate) const SAMPLE_EVERY_BYTES: u64 = 4 << 20;
/// Raw bytes sent between two decisions.
const DECIDE_EVERY_BYTES: u64 = 16 << 20;
/// Weight of the newest window in the smoothed estimates.
const SMOOTHING: f64 = 0.3;
/// How much better the other choice must look before the controller takes
/// it: compression is turned on when it would beat the link by this share,
/// and off when it falls behind the link by this share.
const HYSTERESIS: f64 = 0.15;
/// Windows a choice is kept at least, whatever the estimates say.
const MIN_WINDOWS_BETWEEN_CHANGES: u32 = 4;
/// Time spent sending (in writes, or a window's wall time when longer,
/// see [`WINDOW_WALL_TIME_MAX`]) that a choice is kept at least after the
/// first change: at most about six changes a minute under a steady load.
const MIN_SEND_TIME_BETWEEN_CHANGES: Duration = Duration::from_secs(10);
/// The most wall time one window counts as sending.
const WINDOW_WALL_TIME_MAX: Duration = Duration::from_secs(2);
/// Below this ratio compression is worth turning on; above
/// [`RATIO_OFF`], worth turning off (the gap is the ratio's hysteresis).
const RATIO_ON: f64 = 0.85;
const RATIO_OFF: f64 = 0.95;

/// The smoothed estimates behind the choice.
#[derive(Debug, Default, Clone, Copy)]
struct Estimates {
    /// Raw bytes per second the workers compress, all together.
    compress_rate: f64,
    /// Wire bytes per second the link carries.
    link_rate: f64,
    /// Compressed size over raw size.
    ratio: f64,
    /// Windows measured so far (0: no estimate yet).
    windows: u64,
    /// Windows since the choice last changed.
    since_change: u32,
    /// Time spent sending since the choice last changed.
    sent_since_change: Duration,
    /// Whether the choice has changed at all (the first change, away from
    /// the starting guess, waits only for the windows).
    changed: bool,
    /// When the last window ended.
    last_window: Option<Instant>,
}

impl Estimates {
    fn update(&mut self, compress_rate: f64, link_rate: f64, ratio: f64, sending: Duration) {
        let blend = |old: f64, new: f64| {
            if self.windows == 0 {
                new
            } else {
                old + SMOOTHING * (new - old)
            }
        };
        self.compress_rate = blend(self.compress_rate, compress_rate);
        self.link_rate = blend(self.link_rate, link_rate);
        self.ratio = blend(self.ratio, ratio);
        self.windows += 1;
        self.since_change = self.since_change.saturating_add(1);
        self.sent_since_change += sending;
    }

    /// The choice the estimates make, given the current one: compression
    /// pays while the workers (with a 20% margin for the rest of the
    /// pipeline) outrun the link and the data shrinks clearly.
    fn choose(&self, enabled: bool) -> bool {
        if self.since_change < MIN_WINDOWS_BETWEEN_CHANGES && self.windows > 1 {
            return enabled;
        }
        if self.changed && self.sent_since_change < MIN_SEND_TIME_BETWEEN_CHANGES {
            return enabled;
        }
        let workers = self.compress_rate * 0.8;
        if enabled {
            !(self.ratio > RATIO_OFF || workers < self.link_rate * (1.0 - HYSTERESIS))
        } else {
            self.ratio < RATIO_ON && workers > self.link_rate * (1.0 + HYSTERESIS)
        }
    }
}

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
    bytes_seen: AtomicU64,
    estimates: Mutex<Estimates>,
    changes: AtomicU64,
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
            bytes_seen: AtomicU64::new(0),
            estimates: Mutex::new(Estimates::default()),
            changes: AtomicU64::new(0),
        }
    }
}

impl AdaptiveCompression {
    /// Whether chunks are being compressed now.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// How many times the choice has changed since the agent started.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Whether a worker should compress this chunk of `len` bytes: always
    /// while enabled; while not (to measure), a chunk whose bytes, counted
    /// from the agent's start, cross a multiple of [`SAMPLE_EVERY_BYTES`].
    pub(crate) fn should_try(&self, len: usize) -> bool {
        if self.enabled() {
            return true;
        }
        let len = len as u64;
        let seen = self.bytes_seen.fetch_add(len, Ordering::Relaxed);
        seen.div_ceil(SAMPLE_EVERY_BYTES) * SAMPLE_EVERY_BYTES < seen + len
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
        self.record_write_at(wire, raw, took, workers, Instant::now());
    }

    /// [`AdaptiveCompression::record_write`] at `now`.
    fn record_write_at(&self, wire: usize, raw: u64, took: Duration, workers: usize, now: Instant) {
        self.write_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.write_bytes.fetch_add(wire as u64, Ordering::Relaxed);
        if self.raw_since_decision.fetch_add(raw, Ordering::Relaxed) + raw >= DECIDE_EVERY_BYTES {
            self.raw_since_decision.store(0, Ordering::Relaxed);
            self.decide(workers, now);
        }
    }

    fn decide(&self, workers: usize, now: Instant) {
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
        // A poisoned lock only means another writer panicked mid-update: the
        // estimates are plain numbers, still usable.
        let mut estimates = self
            .estimates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The window's sending time: time in writes, or the wall time since
        // the last window when longer (compression, not the link, may be
        // what the sender waits for), at most a few seconds so that an idle
        // gap between epochs does not count.
        let wall = estimates
            .last_window
            .map_or(Duration::ZERO, |last| now.duration_since(last))
            .min(WINDOW_WALL_TIME_MAX);
        estimates.last_window = Some(now);
        let sending = Duration::from_nanos(w_ns).max(wall);
        estimates.update(compress_rate, link_rate, ratio, sending);
        let was = self.enabled.load(Ordering::Relaxed);
        let pays = estimates.choose(was);
        if was != pays {
            self.enabled.store(pays, Ordering::Relaxed);
            self.changes.fetch_add(1, Ordering::Relaxed);
            estimates.since_change = 0;
            estimates.sent_since_change = Duration::ZERO;
            estimates.changed = true;
            tracing::debug!(
                compress = pays,
                compress_mib_per_s = estimates.compress_rate / 1048576.0,
                link_mib_per_s = estimates.link_rate / 1048576.0,
                ratio = estimates.ratio,
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

    /// `windows` decision windows of the same measurements.
    fn feed_for(
        state: &AdaptiveCompression,
        windows: usize,
        compress_mib_s: f64,
        ratio: f64,
        link_mib_s: f64,
    ) {
        for _ in 0..windows {
            feed(state, compress_mib_s, ratio, link_mib_s);
        }
    }

    #[test]
    fn compression_turns_off_on_a_fast_link_and_on_on_a_slow_one() {
        let state = AdaptiveCompression::default();
        assert!(state.enabled());
        feed_for(&state, 8, 450.0, 0.3, 1100.0); // loopback
        assert!(!state.enabled());
        // After the first change a choice holds for 10 s of sending: 32 MiB
        // windows at 100 MiB/s take 0.32 s each.
        feed_for(&state, 24, 450.0, 0.3, 100.0); // a WAN link
        assert!(!state.enabled(), "changed again within 10 s of sending");
        feed_for(&state, 16, 450.0, 0.3, 100.0);
        assert!(state.enabled());
        feed_for(&state, 40, 2000.0, 0.99, 100.0); // incompressible data
        assert!(!state.enabled());
        assert_eq!(state.changes(), 3);
    }

    /// A fast link's windows pass in milliseconds: however the estimates
    /// swing, the choice changes at most once a 10 s of sending. Here a
    /// minute of sending at 1 GiB/s, the measurements flipping every 5
    /// windows (160 MiB).
    #[test]
    fn on_a_fast_link_the_choice_changes_a_few_times_a_minute_at_most() {
        let state = AdaptiveCompression::default();
        for _ in 0..(60 * 32 / 10) {
            feed_for(&state, 5, 450.0, 0.3, 1024.0); // the link wins
            feed_for(&state, 5, 4000.0, 0.3, 1024.0); // compression wins
        }
        assert!(
            (2..=7).contains(&state.changes()),
            "{} changes",
            state.changes()
        );
    }

    /// A choice that makes the sender wait for compression spends little
    /// time in writes: its hold ends after 10 s of the windows' wall time,
    /// not after 10 s of writes (here 30 ms a window: 333 windows).
    #[test]
    fn a_hold_counts_wall_time_when_writes_are_short() {
        let state = AdaptiveCompression::default();
        feed_for(&state, 8, 450.0, 0.3, 1100.0); // loopback: off
        feed_for(&state, 40, 450.0, 0.3, 100.0); // WAN, 12.8 s of writes: on
        assert!(state.enabled());
        assert_eq!(state.changes(), 2);
        let mut now = Instant::now();
        for _ in 0..15 {
            now += Duration::from_secs(1);
            let mib = 1048576.0;
            let input = 64 << 20;
            state.record_compression(
                input,
                (input as f64 * 0.3) as usize,
                Duration::from_secs_f64(input as f64 / (450.0 * mib)),
            );
            let wire = 32 << 20;
            let took = Duration::from_secs_f64(wire as f64 / (1100.0 * mib));
            state.record_write_at(wire, DECIDE_EVERY_BYTES, took, 1, now);
        }
        assert!(!state.enabled(), "the hold outlived 15 s of wall time");
    }

    /// Windows alternating between data that compresses fast and data that
    /// does not, around a link of about the same speed: a controller deciding
    /// from each window alone flips at every one; this one settles.
    #[test]
    fn a_mixed_disk_does_not_make_the_choice_oscillate() {
        let state = AdaptiveCompression::default();
        for _ in 0..40 {
            feed(&state, 1400.0, 0.3, 700.0); // text: compression wins
            feed(&state, 500.0, 0.5, 700.0); // mixed: the link wins
        }
        assert!(state.changes() <= 2, "{} changes", state.changes());
    }

    /// One odd window does not turn compression off, nor does a change
    /// come before the choice has been kept for its minimum.
    #[test]
    fn one_odd_window_changes_nothing() {
        let state = AdaptiveCompression::default();
        feed_for(&state, 6, 450.0, 0.3, 100.0);
        assert!(state.enabled());
        feed(&state, 450.0, 0.3, 900.0); // twice what the workers manage
        assert!(state.enabled());
        assert_eq!(state.changes(), 0);
    }

    #[test]
    fn sampling_continues_while_off() {
        let state = AdaptiveCompression::default();
        state.enabled.store(false, Ordering::Relaxed);
        // Four samples per 16 MiB whatever the chunk size; every chunk when
        // one chunk is larger than the sampling interval.
        for (chunk, chunks, samples) in [(65_536, 256, 4), (1 << 20, 16, 4), (16 << 20, 3, 3)] {
            let tried = (0..chunks).filter(|_| state.should_try(chunk)).count();
            assert_eq!(tried, samples, "chunks of {chunk}");
        }
    }
}
