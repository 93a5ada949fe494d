//! Parsing sizes like `64KiB`, `1GiB`, `4096` and durations like `1s`, `500ms`.

use std::time::Duration;

/// Parses a byte size: a number with an optional `B`, `K`/`KiB`, `M`/`MiB`,
/// `G`/`GiB`, `T`/`TiB` suffix (binary multiples).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected e.g. 64KiB, 1GiB or 4096"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {text:?}: use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// A duration that may be turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffOrDuration(pub Option<Duration>);

/// `off` (`None`), or a duration as [`parse_duration`] reads it.
pub(crate) fn parse_off_or_duration(text: &str) -> Result<OffOrDuration, String> {
    match text {
        "off" => Ok(OffOrDuration(None)),
        text => parse_duration(text).map(|d| OffOrDuration(Some(d))),
    }
}

/// A byte size that may be turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffOrSize(pub Option<u64>);

/// `off` (`None`), or a size as [`parse_size`] reads it.
pub(crate) fn parse_off_or_size(text: &str) -> Result<OffOrSize, String> {
    match text {
        "off" => Ok(OffOrSize(None)),
        text => parse_size(text).map(|n| OffOrSize(Some(n))),
    }
}

/// Parses a duration: a number with `ms`, `s`, `m`, `h` or `d` (default seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: f64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 1s, 500ms, 5m"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        "d" => number * 86_400.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {text:?}: use ms, s, m, h or d"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("invalid duration {text:?}"))
}

/// Parses a retention policy: `EVERY:KEEP` tiers separated by commas, e.g.
/// `10m:1h,1h:24h,1d:7d`; `off` for no automatic snapshots.
pub fn parse_retention(text: &str) -> Result<Option<blockrep_store::RetentionPolicy>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let mut tiers = Vec::new();
    for tier in text.split(',') {
        let (every, keep) = tier.split_once(':').ok_or_else(|| {
            format!("invalid retention tier {tier:?}: expected EVERY:KEEP, e.g. 1h:24h")
        })?;
        tiers.push(blockrep_store::RetentionTier {
            every: parse_duration(every)?,
            keep_for: parse_duration(keep)?,
        });
    }
    blockrep_store::RetentionPolicy::new(&tiers)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65_536);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("32M").unwrap(), 32 << 20);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn retention_policies() {
        let policy = parse_retention("10m:1h,1h:24h,1d:7d").unwrap().unwrap();
        assert_eq!(policy.tiers().len(), 3);
        assert!(parse_retention("off").unwrap().is_none());
        assert!(parse_retention("10m").is_err());
        assert!(parse_retention("x:1h").is_err());
    }
}
