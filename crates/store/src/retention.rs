//! Retention of automatic snapshots: a list of tiers, each "one snapshot every
//! `every`, kept for `keep_for`". Pure functions of the snapshots' creation times
//! and an explicit `now`, so they are tested with a fake clock.
//!
//! # Rules
//!
//! - Time is cut into slots of each tier's `every`, aligned to the Unix epoch (so
//!   hourly slots start on the hour and daily slots are UTC days).
//! - A tier **wants** an automatic snapshot when it is the earliest of its slot
//!   (ties broken by position in the input) and younger than the tier's `keep_for`
//!   (age `now - created < keep_for`).
//! - A snapshot is **retained** while any tier wants it; otherwise it has expired.
//!   Being the earliest of a slot never changes as later snapshots arrive, so a
//!   decision to drop a snapshot never has to be revisited.
//! - An automatic snapshot is **due** when some tier's current slot holds none yet.
//!
//! Manual and cutover snapshots are outside the policy: they expire only by their
//! own TTL.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// Most tiers a policy may have.
pub const RETENTION_TIERS_MAX: usize = 16;

/// One tier of a [`RetentionPolicy`]: keep one snapshot per `every`, for `keep_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionTier {
    /// Slot length: the tier wants the earliest snapshot of each slot.
    pub every: Duration,
    /// How long the tier keeps a snapshot after its creation.
    pub keep_for: Duration,
}

/// When to take automatic snapshots and how long to keep them.
///
/// ```
/// use std::time::Duration;
/// use blockrep_store::RetentionPolicy;
///
/// let policy = RetentionPolicy::default(); // 10 min for 1 h, hourly for 24 h, daily for 7 d
/// let minute_ms = 60_000;
/// assert!(policy.auto_snapshot_due(&[], 0));
/// assert!(!policy.auto_snapshot_due(&[0], 9 * minute_ms));
/// assert!(policy.auto_snapshot_due(&[0], 10 * minute_ms));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Each tier's slot and keep time in milliseconds.
    tiers_ms: Vec<(u64, u64)>,
}

impl Default for RetentionPolicy {
    /// The default after AWS Elastic Disaster Recovery: every 10 minutes kept for an
    /// hour, hourly kept for a day, daily kept for a week.
    fn default() -> Self {
        const MINUTE_MS: u64 = 60_000;
        const HOUR_MS: u64 = 60 * MINUTE_MS;
        const DAY_MS: u64 = 24 * HOUR_MS;
        Self {
            tiers_ms: vec![
                (10 * MINUTE_MS, HOUR_MS),
                (HOUR_MS, DAY_MS),
                (DAY_MS, 7 * DAY_MS),
            ],
        }
    }
}

impl RetentionPolicy {
    /// Validates and builds a policy. Every tier needs `every` and `keep_for` of at
    /// least a millisecond; at most [`RETENTION_TIERS_MAX`] tiers. No tiers at all
    /// means no automatic snapshots: none is ever due and every one has expired.
    pub fn new(tiers: &[RetentionTier]) -> Result<Self, Error> {
        if tiers.len() > RETENTION_TIERS_MAX {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "retention policy has {} tiers, at most {RETENTION_TIERS_MAX} are allowed",
                    tiers.len()
                ),
            ));
        }
        let mut tiers_ms = Vec::with_capacity(tiers.len());
        for tier in tiers {
            let every_ms = duration_ms(tier.every);
            let keep_for_ms = duration_ms(tier.keep_for);
            if every_ms == 0 || keep_for_ms == 0 {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!(
                        "retention tier (every {:?}, keep for {:?}) needs both of at least 1 ms",
                        tier.every, tier.keep_for
                    ),
                ));
            }
            tiers_ms.push((every_ms, keep_for_ms));
        }
        Ok(Self { tiers_ms })
    }

    /// The policy's tiers.
    pub fn tiers(&self) -> Vec<RetentionTier> {
        self.tiers_ms
            .iter()
            .map(|&(every_ms, keep_for_ms)| RetentionTier {
                every: Duration::from_millis(every_ms),
                keep_for: Duration::from_millis(keep_for_ms),
            })
            .collect()
    }

    /// Whether an automatic snapshot is due at `now_unix_ms`, given the creation
    /// times of the source's existing automatic snapshots: true when some tier's
    /// current slot holds none of them.
    pub fn auto_snapshot_due(&self, created_unix_ms: &[u64], now_unix_ms: u64) -> bool {
        self.tiers_ms.iter().any(|&(every_ms, _)| {
            let slot_now = now_unix_ms / every_ms;
            !created_unix_ms
                .iter()
                .any(|&created| created / every_ms == slot_now)
        })
    }

    /// For each automatic snapshot (by creation time), whether the policy still
    /// keeps it at `now_unix_ms`. The result has one entry per input, in order.
    pub fn retained(&self, created_unix_ms: &[u64], now_unix_ms: u64) -> Vec<bool> {
        let mut keep = vec![false; created_unix_ms.len()];
        let mut earliest_of_slot: HashMap<u64, usize> = HashMap::new();
        for &(every_ms, keep_for_ms) in &self.tiers_ms {
            earliest_of_slot.clear();
            for (position, &created) in created_unix_ms.iter().enumerate() {
                earliest_of_slot
                    .entry(created / every_ms)
                    .and_modify(|best| {
                        if created < created_unix_ms[*best] {
                            *best = position;
                        }
                    })
                    .or_insert(position);
            }
            for &position in earliest_of_slot.values() {
                let age_ms = now_unix_ms.saturating_sub(created_unix_ms[position]);
                if age_ms < keep_for_ms {
                    keep[position] = true;
                }
            }
        }
        keep
    }
}

/// A duration in whole milliseconds, saturating at `u64::MAX`.
pub(crate) fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const MINUTE_MS: u64 = 60_000;
    const HOUR_MS: u64 = 60 * MINUTE_MS;
    const DAY_MS: u64 = 24 * HOUR_MS;
    /// Some midnight (UTC), so slots of every tier start here.
    const T0_MS: u64 = 19_000 * DAY_MS;

    /// Runs the policy like the server would: each tick, take an auto snapshot if
    /// due, then drop what the policy no longer keeps. Returns what is kept at the end.
    fn simulate(policy: &RetentionPolicy, start_ms: u64, end_ms: u64, tick_ms: u64) -> Vec<u64> {
        let mut kept: Vec<u64> = Vec::new();
        let mut now = start_ms;
        while now <= end_ms {
            if policy.auto_snapshot_due(&kept, now) {
                kept.push(now);
            }
            let retained = policy.retained(&kept, now);
            let mut flags = retained.iter();
            kept.retain(|_| *flags.next().expect("one flag per snapshot"));
            assert!(kept.contains(&now) || !policy.auto_snapshot_due(&kept, now));
            assert!(
                kept.len() <= 6 + 24 + 7,
                "never more than the tiers can want"
            );
            now += tick_ms;
        }
        kept
    }

    #[test]
    fn default_policy_is_the_drs_one() {
        let tiers = RetentionPolicy::default().tiers();
        assert_eq!(
            tiers,
            vec![
                RetentionTier {
                    every: Duration::from_secs(600),
                    keep_for: Duration::from_secs(3600)
                },
                RetentionTier {
                    every: Duration::from_secs(3600),
                    keep_for: Duration::from_secs(86_400)
                },
                RetentionTier {
                    every: Duration::from_secs(86_400),
                    keep_for: Duration::from_secs(7 * 86_400)
                },
            ]
        );
        assert_eq!(
            RetentionPolicy::new(&tiers).unwrap(),
            RetentionPolicy::default()
        );
    }

    #[test]
    fn rejects_empty_durations_and_too_many_tiers() {
        let tier = |every_ms, keep_ms| RetentionTier {
            every: Duration::from_millis(every_ms),
            keep_for: Duration::from_millis(keep_ms),
        };
        for bad in [tier(0, 1), tier(1, 0)] {
            assert_eq!(
                RetentionPolicy::new(&[bad]).unwrap_err().kind(),
                ErrorKind::Invalid
            );
        }
        let many = vec![tier(1, 1); RETENTION_TIERS_MAX + 1];
        assert!(RetentionPolicy::new(&many).is_err());
        assert!(RetentionPolicy::new(&many[..RETENTION_TIERS_MAX]).is_ok());
    }

    #[test]
    fn no_tiers_means_no_auto_snapshots() {
        let policy = RetentionPolicy::new(&[]).unwrap();
        assert!(!policy.auto_snapshot_due(&[], T0_MS));
        assert_eq!(policy.retained(&[T0_MS], T0_MS), vec![false]);
    }

    #[test]
    fn due_once_per_ten_minute_slot() {
        let policy = RetentionPolicy::default();
        assert!(policy.auto_snapshot_due(&[], T0_MS));
        let taken = [T0_MS + 3 * MINUTE_MS];
        assert!(!policy.auto_snapshot_due(&taken, T0_MS + 3 * MINUTE_MS));
        assert!(!policy.auto_snapshot_due(&taken, T0_MS + 10 * MINUTE_MS - 1));
        assert!(policy.auto_snapshot_due(&taken, T0_MS + 10 * MINUTE_MS));
        // A snapshot from an earlier day does not satisfy today's slots.
        assert!(policy.auto_snapshot_due(&[T0_MS - DAY_MS], T0_MS + MINUTE_MS));
    }

    #[test]
    fn eight_days_every_ten_minutes_keeps_what_the_tiers_want() {
        let policy = RetentionPolicy::default();
        let end = T0_MS + 8 * DAY_MS;
        // Ticks of one minute: the policy itself spaces the snapshots 10 minutes apart.
        let kept = simulate(&policy, T0_MS, end, MINUTE_MS);
        let kept: BTreeSet<u64> = kept.into_iter().collect();
        let mut expected = BTreeSet::new();
        expected.extend((0..6).map(|i| end - i * 10 * MINUTE_MS));
        expected.extend((0..24).map(|i| end - i * HOUR_MS));
        expected.extend((0..7).map(|i| end - i * DAY_MS));
        assert_eq!(kept, expected);
        // 6 ten-minute + 23 more hourly + 6 more daily (the newest counts once).
        assert_eq!(kept.len(), 35);
        assert_eq!(kept.first(), Some(&(T0_MS + 2 * DAY_MS)));
    }

    #[test]
    fn ticks_off_the_slot_grid_keep_the_first_of_each_slot() {
        // The server started at 10:07 and checks every 4 minutes.
        let policy = RetentionPolicy::default();
        let start = T0_MS + 10 * HOUR_MS + 7 * MINUTE_MS;
        let end = start + 3 * HOUR_MS;
        let kept = simulate(&policy, start, end, 4 * MINUTE_MS);
        // Snapshots are taken at 10:07, 10:11, 10:23, 10:31, ...: the first tick of
        // every 10-minute slot. Hourly keeps the first of each hour.
        for hour in 10..=13 {
            let hour_start = T0_MS + hour * HOUR_MS;
            let first = kept
                .iter()
                .find(|&&t| t >= hour_start && t < hour_start + HOUR_MS);
            let expected_first = if hour == 10 {
                start
            } else {
                // Ticks are start + 4 min * k; the first at or after the hour.
                start + (hour_start - start).div_ceil(4 * MINUTE_MS) * 4 * MINUTE_MS
            };
            assert_eq!(first, Some(&expected_first), "hour {hour}");
        }
        let recent = kept.iter().filter(|&&t| end - t < HOUR_MS).count();
        assert_eq!(
            recent, 6,
            "one per 10-minute slot of the last hour: {kept:?}"
        );
    }

    #[test]
    fn ties_keep_the_first_listed() {
        let policy = RetentionPolicy::default();
        assert_eq!(policy.retained(&[T0_MS, T0_MS], T0_MS), vec![true, false]);
    }

    proptest! {
        #[test]
        fn retention_is_stable_and_monotone(
            offsets in proptest::collection::vec(0u64..10 * DAY_MS, 0..60),
            now_offset in 10 * DAY_MS..12 * DAY_MS,
            later_ms in 0u64..2 * DAY_MS,
        ) {
            let policy = RetentionPolicy::default();
            let created: Vec<u64> = offsets.iter().map(|o| T0_MS + o).collect();
            let now = T0_MS + now_offset;
            let keep = policy.retained(&created, now);
            // Dropping what expired does not change the verdict on what stays.
            let survivors: Vec<u64> = created
                .iter()
                .zip(&keep)
                .filter_map(|(&c, &k)| k.then_some(c))
                .collect();
            prop_assert!(policy.retained(&survivors, now).iter().all(|&k| k));
            // Nothing expired comes back later.
            let keep_later = policy.retained(&created, now + later_ms);
            for (before, after) in keep.iter().zip(&keep_later) {
                prop_assert!(*before || !*after);
            }
            // The tiers bound how many are kept (no snapshot is from the future
            // here; a slot may be cut by the window at both ends).
            prop_assert!(keep.iter().filter(|&&k| k).count() <= 6 + 1 + 24 + 1 + 7 + 1);
        }
    }
}
