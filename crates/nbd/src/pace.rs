//! Which requests run on the connection's own task, and which go to a thread.
//!
//! Handing a request to tokio's blocking pool costs two thread wake-ups (the
//! pool thread, then the runtime worker that sends the reply), and in a VM
//! those wake-ups cost more CPU than a 4 KiB `pread`/`pwrite` through the
//! page cache. So a small read or write runs inline, on the task that read
//! it, as long as the export answers such requests in microseconds. Whatever
//! may wait on a device (a flush, `FUA`, zeroing or trimming a range, a large
//! transfer) always goes to the pool.
//!
//! An export that turns out slow inline (reading a cold disk, decompressing)
//! must not hold up the connection, whose other requests would otherwise run
//! side by side on the pool, nor the runtime worker. A request now and then
//! is slow for no fault of the export (the thread was preempted), so one slow
//! request proves nothing: when [`SLOW_IN_WINDOW`] of the last
//! [`INLINE_WINDOW`] inline requests took longer than [`INLINE_SLOW`], every
//! request goes to the pool for [`OFFLOAD_PERIOD`], a period that doubles (up
//! to [`OFFLOAD_PERIOD_MAX`]) each time the export is still slow when the
//! connection tries inline again. The runtime is thus held up by a slow
//! export for at most [`SLOW_IN_WINDOW`] requests per period.

use std::time::{Duration, Instant};

use crate::wire::{COMMAND_FLAG_FUA, Command, Request};

/// An inline request that took longer than this was not served from memory.
/// Page-cache reads and writes of up to 64 KiB take a few microseconds to a
/// few tens of them; a device read, at least about a hundred.
pub const INLINE_SLOW: Duration = Duration::from_micros(200);
/// Inline requests over which slow ones are counted.
pub const INLINE_WINDOW: u32 = 8;
/// Slow requests among the last [`INLINE_WINDOW`] that send the connection's
/// requests to the pool.
pub const SLOW_IN_WINDOW: u32 = 4;
/// How long a connection first keeps every request off its task once its
/// export was found slow.
pub const OFFLOAD_PERIOD: Duration = Duration::from_secs(1);
/// The longest such period, reached by doubling while the export stays slow.
pub const OFFLOAD_PERIOD_MAX: Duration = Duration::from_secs(32);

/// One connection's choice between running requests inline and offloading.
#[derive(Debug)]
pub(crate) struct Pace {
    inline_bytes_max: u32,
    /// One bit per recent inline request, newest lowest: set when it was slow.
    slow_history: u8,
    /// Inline requests since the connection last (re)started running inline.
    inline_count: u32,
    /// Whether the export was found slow and has not been fast for long since.
    offloaded_before: bool,
    offload_until: Option<Instant>,
    offload_period: Duration,
}

impl Pace {
    /// Reads and writes of up to `inline_bytes_max` bytes may run inline; 0
    /// sends every request to the blocking pool.
    pub(crate) fn new(inline_bytes_max: u32) -> Self {
        Self {
            inline_bytes_max,
            slow_history: 0,
            inline_count: 0,
            offloaded_before: false,
            offload_until: None,
            offload_period: OFFLOAD_PERIOD,
        }
    }

    /// Whether `request` (already checked) should run inline at `now`.
    pub(crate) fn inline(&mut self, request: &Request, now: Instant) -> bool {
        let small_transfer = matches!(request.command, Command::Read | Command::Write)
            && request.flags & COMMAND_FLAG_FUA == 0
            && request.length <= self.inline_bytes_max;
        if !small_transfer {
            return false;
        }
        match self.offload_until {
            Some(until) if now < until => false,
            _ => {
                self.offload_until = None;
                true
            }
        }
    }

    /// Records that an inline request took `elapsed`, ending at `now`.
    pub(crate) fn ran_inline(&mut self, elapsed: Duration, now: Instant) {
        self.slow_history = (self.slow_history << 1) | u8::from(elapsed > INLINE_SLOW);
        self.inline_count = self.inline_count.saturating_add(1);
        if self.slow_history.count_ones() >= SLOW_IN_WINDOW {
            // Slow again within its first window back inline: it never got fast.
            if self.offloaded_before && self.inline_count <= INLINE_WINDOW {
                self.offload_period = (self.offload_period * 2).min(OFFLOAD_PERIOD_MAX);
            }
            self.offloaded_before = true;
            self.offload_until = Some(now + self.offload_period);
            self.slow_history = 0;
            self.inline_count = 0;
        } else if self.inline_count == INLINE_WINDOW * 8 {
            // Fast for many windows: a later slow spell starts from the shortest period.
            self.offloaded_before = false;
            self.offload_period = OFFLOAD_PERIOD;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: Command, flags: u16, length: u32) -> Request {
        Request {
            flags,
            command,
            handle: 1,
            offset: 0,
            length,
        }
    }

    #[test]
    fn only_small_reads_and_writes_without_fua_run_inline() {
        let now = Instant::now();
        let mut pace = Pace::new(64 * 1024);
        assert!(pace.inline(&request(Command::Read, 0, 4096), now));
        assert!(pace.inline(&request(Command::Write, 0, 64 * 1024), now));
        assert!(!pace.inline(&request(Command::Write, 0, 64 * 1024 + 1), now));
        assert!(!pace.inline(&request(Command::Write, COMMAND_FLAG_FUA, 4096), now));
        for command in [Command::Flush, Command::Trim, Command::WriteZeroes] {
            assert!(!pace.inline(&request(command, 0, 0), now), "{command:?}");
        }
        let mut never = Pace::new(0);
        assert!(!never.inline(&request(Command::Read, 0, 4096), now));
    }

    const SLOW: Duration = Duration::from_millis(5);
    const FAST: Duration = Duration::from_micros(3);

    #[test]
    fn a_few_slow_requests_are_forgiven_a_slow_export_is_not() {
        let start = Instant::now();
        let read = request(Command::Read, 0, 4096);
        let mut pace = Pace::new(64 * 1024);
        // Preempted now and then: fewer than SLOW_IN_WINDOW in any window.
        for i in 0..100 {
            pace.ran_inline(if i % 3 == 0 { SLOW } else { FAST }, start);
            assert!(pace.inline(&read, start), "offloaded after request {i}");
        }
        pace.ran_inline(INLINE_SLOW, start);
        assert!(
            pace.inline(&read, start),
            "a request at the threshold is not slow"
        );
        let mut pace = Pace::new(64 * 1024);
        for _ in 0..SLOW_IN_WINDOW - 1 {
            pace.ran_inline(SLOW, start);
        }
        assert!(pace.inline(&read, start));
        pace.ran_inline(SLOW, start);
        assert!(!pace.inline(&read, start));
        assert!(!pace.inline(&read, start + OFFLOAD_PERIOD - Duration::from_millis(1)));
        assert!(pace.inline(&read, start + OFFLOAD_PERIOD));
    }

    #[test]
    fn the_offload_period_doubles_while_the_export_stays_slow_and_resets_once_fast() {
        let mut now = Instant::now();
        let read = request(Command::Read, 0, 4096);
        let mut pace = Pace::new(64 * 1024);
        let mut periods = Vec::new();
        for _ in 0..8 {
            // Slow from its first inline request on, each time.
            while pace.inline(&read, now) {
                pace.ran_inline(SLOW, now);
            }
            let until = pace.offload_until.expect("offloaded");
            periods.push(until - now);
            now = until;
        }
        let expected: Vec<Duration> = [1, 2, 4, 8, 16, 32, 32, 32]
            .iter()
            .map(|&seconds| Duration::from_secs(seconds))
            .collect();
        assert_eq!(periods, expected);
        for _ in 0..INLINE_WINDOW * 8 {
            assert!(pace.inline(&read, now));
            pace.ran_inline(FAST, now);
        }
        for _ in 0..SLOW_IN_WINDOW {
            pace.ran_inline(SLOW, now);
        }
        assert_eq!(pace.offload_until, Some(now + OFFLOAD_PERIOD));
    }
}
