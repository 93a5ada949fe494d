//! Throttling: a token bucket on the bytes the agent sends, whose rate can be
//! changed while replication runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Idle time the bucket may bank as credit: bursts stay short.
const BURST: Duration = Duration::from_millis(100);

/// A token bucket kept as "the time at which the bucket is empty": each send
/// pushes that time forward by `bytes / rate`, and a send that would push it
/// more than `BURST` past now waits.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_second: AtomicU64,
    empty_at: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter that never waits.
    pub fn unlimited() -> Self {
        Self::new(0)
    }

    /// A limiter at `bytes_per_second` (0 = unlimited).
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            bytes_per_second: AtomicU64::new(bytes_per_second),
            empty_at: Mutex::new(None),
        }
    }

    /// The current rate in bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.bytes_per_second.load(Ordering::Relaxed)
    }

    /// Changes the rate; takes effect at the next send.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.bytes_per_second
            .store(bytes_per_second, Ordering::Relaxed);
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let rate = self.rate();
        if rate == 0 {
            return;
        }
        let wait = {
            let mut empty_at = self.empty_at.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let earliest = now.checked_sub(BURST).unwrap_or(now);
            let start = empty_at.map_or(earliest, |t| t.max(earliest));
            let end = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            *empty_at = Some(end);
            end.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Parses a rate such as `100MiB/s`, `800Mbit/s`, `10MB/s`, `5000000` (bytes per
/// second) or `unlimited`. Returns bytes per second, 0 for unlimited.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("unlimited") || text == "0" {
        return Ok(0);
    }
    let body = text.strip_suffix("/s").unwrap_or(text);
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, unit) = body.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid rate {text:?}: expected e.g. 100MiB/s or 800Mbit/s"))?;
    let multiplier = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "Kbit" | "kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        other => {
            return Err(format!(
                "invalid rate unit {other:?} in {text:?}: use B, KiB, MiB, GiB, KB, MB, GB, kbit, Mbit or Gbit, per second"
            ));
        }
    };
    let bytes = number * multiplier;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!(
            "invalid rate {text:?}: must be at least 1 byte per second"
        ));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("100MiB/s").unwrap(), 100 << 20);
        assert_eq!(parse_rate("800Mbit/s").unwrap(), 100_000_000);
        assert_eq!(parse_rate("10MB/s").unwrap(), 10_000_000);
        assert_eq!(parse_rate("4096").unwrap(), 4096);
        assert_eq!(parse_rate("unlimited").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 parsecs/s").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_spaces_sends_at_the_rate() {
        let limiter = RateLimiter::new(1000);
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            limiter.acquire(500).await;
        }
        // 5000 bytes at 1000 B/s, minus the 100 ms burst credit.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(4800), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(5100), "{elapsed:?}");
        limiter.set_rate(0);
        let before = tokio::time::Instant::now();
        limiter.acquire(1 << 30).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
