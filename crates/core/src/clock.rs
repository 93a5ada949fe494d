//! The wall clock as blockrep records it: milliseconds since the Unix epoch.
//! One helper, so that every layer records times the same way and a clock
//! set before 1970 reads as 0 instead of panicking.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch (0 if the clock reads earlier).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_2020() {
        // 2020-01-01T00:00:00Z: a clock helper that returned seconds, or 0,
        // would fail this.
        assert!(super::now_unix_ms() > 1_577_836_800_000);
    }
}
