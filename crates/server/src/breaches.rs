//! RPO breach state: which sources are past their RPO target, and how often
//! each crossed it. Evaluated against the per-source records on every alert
//! tick (see `alerts`); a crossing is reported once each way.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use blockrep_core::SourceId;

use crate::status::{SourceRecord, StateThresholds};

/// What happened to a source's lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreachEvent {
    /// The lag crossed above the RPO target.
    Breach,
    /// The lag is back at or below the target.
    Recovered,
    /// Another server of the shared bucket serves the source now and
    /// watches its RPO: a breach raised here is closed here, its lag as this
    /// server last saw it.
    ServedElsewhere,
}

impl BreachEvent {
    /// The event's name, as the hook sees it in `BLOCKREP_EVENT`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BreachEvent::Breach => "breach",
            BreachEvent::Recovered => "recovered",
            BreachEvent::ServedElsewhere => "served_elsewhere",
        }
    }
}

/// One crossing, as logged and passed to the hook.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transition {
    pub source: SourceId,
    pub event: BreachEvent,
    pub lag_seconds: f64,
    pub rpo_target_seconds: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct BreachState {
    in_breach: bool,
    breaches_total: u64,
}

/// Which sources are past their RPO target now, and how many times each has
/// crossed above it since the server started. The RPO target is the only
/// threshold watched here: `lagging` and `stalled` are read off the records
/// when asked for, with no state of their own.
#[derive(Debug, Default)]
pub(crate) struct RpoBreaches {
    states: Mutex<BTreeMap<SourceId, BreachState>>,
}

impl RpoBreaches {
    /// Breaches counted per source since the server started.
    pub(crate) fn breaches_total(&self) -> BTreeMap<SourceId, u64> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .iter()
            .map(|(source, state)| (source.clone(), state.breaches_total))
            .collect()
    }

    /// Compares every source's lag with its target and returns the crossings
    /// since the last evaluation. The sources in `elsewhere` are served by
    /// another server of the shared bucket, which watches them: a breach
    /// open here for one is closed with a [`BreachEvent::ServedElsewhere`]
    /// event (its lag as this server last saw it), so that whoever the hook
    /// told of it hears that it is watched elsewhere now, and the source
    /// starts afresh if this server serves it again. Counts stay.
    pub(crate) fn evaluate(
        &self,
        records: &[(SourceId, SourceRecord)],
        elsewhere: &HashSet<SourceId>,
        thresholds: StateThresholds,
        now_unix_ms: u64,
    ) -> Vec<Transition> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut transitions = Vec::new();
        for (source, record) in records {
            let watched_here = !elsewhere.contains(source);
            let target = record.rpo_target(thresholds);
            // `None` during the initial sync: no consistent replica, no breach.
            let lag_ms = match record.lag_ms(now_unix_ms) {
                Some(lag_ms) => lag_ms,
                None if watched_here => continue,
                None => 0,
            };
            let state = if watched_here {
                states.entry(source.clone()).or_default()
            } else if let Some(state) = states.get_mut(source) {
                state
            } else {
                continue;
            };
            // A cut-over source no longer replicates by design: its lag is not a
            // breach (a breach still open at cutover is closed as recovered).
            let breached =
                watched_here && record.lifecycle.is_none() && lag_ms > target.as_millis() as u64;
            if breached == state.in_breach {
                continue;
            }
            state.in_breach = breached;
            let event = if breached {
                state.breaches_total += 1;
                BreachEvent::Breach
            } else if watched_here {
                BreachEvent::Recovered
            } else {
                BreachEvent::ServedElsewhere
            };
            transitions.push(Transition {
                source: source.clone(),
                event,
                lag_seconds: lag_ms as f64 / 1000.0,
                rpo_target_seconds: target.as_secs_f64(),
            });
        }
        transitions
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn thresholds() -> StateThresholds {
        StateThresholds {
            rpo_target: Duration::from_secs(10),
            stall_after: Duration::from_secs(60),
        }
    }

    fn record(synced_scan_started_unix_ms: u64) -> SourceRecord {
        SourceRecord {
            synced_scan_started_unix_ms,
            ..SourceRecord::default()
        }
    }

    #[test]
    fn each_crossing_is_reported_once() {
        let breaches = RpoBreaches::default();
        let source = SourceId::new("web").unwrap();
        let now = 1_000_000;
        let records = vec![(source.clone(), record(now - 5_000))];
        assert!(
            breaches
                .evaluate(&records, &HashSet::new(), thresholds(), now)
                .is_empty()
        );
        // Lag grows past the target with no commit: one breach, then quiet.
        let later = now + 6_000;
        let transitions = breaches.evaluate(&records, &HashSet::new(), thresholds(), later);
        assert_eq!(transitions.len(), 1);
        assert_eq!(transitions[0].event, BreachEvent::Breach);
        assert_eq!(transitions[0].lag_seconds, 11.0);
        assert_eq!(transitions[0].rpo_target_seconds, 10.0);
        assert!(
            breaches
                .evaluate(&records, &HashSet::new(), thresholds(), later + 500)
                .is_empty()
        );
        assert!(
            breaches
                .evaluate(&records, &HashSet::new(), thresholds(), later + 60_000)
                .is_empty()
        );
        // A fresh commit: one recovery.
        let records = vec![(source.clone(), record(later + 60_000))];
        let transitions =
            breaches.evaluate(&records, &HashSet::new(), thresholds(), later + 61_000);
        assert_eq!(transitions.len(), 1);
        assert_eq!(transitions[0].event, BreachEvent::Recovered);
        assert!(
            breaches
                .evaluate(&records, &HashSet::new(), thresholds(), later + 61_500)
                .is_empty()
        );
        assert_eq!(breaches.breaches_total()[&source], 1);
    }

    /// A source another server took over closes its breach here once, with
    /// its own event; if this server serves it again, an old lag is a new
    /// breach.
    #[test]
    fn a_forgotten_breach_is_reported_afresh() {
        let breaches = RpoBreaches::default();
        let source = SourceId::new("web").unwrap();
        let now = 1_000_000;
        let records = vec![(source.clone(), record(now - 20_000))];
        let elsewhere = HashSet::from([source.clone()]);
        assert_eq!(
            breaches
                .evaluate(&records, &HashSet::new(), thresholds(), now)
                .len(),
            1
        );
        let closed = breaches.evaluate(&records, &elsewhere, thresholds(), now + 50);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].event, BreachEvent::ServedElsewhere);
        assert_eq!(closed[0].lag_seconds, 20.05);
        // Closed once.
        assert!(
            breaches
                .evaluate(&records, &elsewhere, thresholds(), now + 60)
                .is_empty()
        );
        let transitions = breaches.evaluate(&records, &HashSet::new(), thresholds(), now + 100);
        assert_eq!(transitions.len(), 1);
        assert_eq!(transitions[0].event, BreachEvent::Breach);
        assert_eq!(breaches.breaches_total()[&source], 2);
    }

    #[test]
    fn initial_sync_never_breaches_and_overrides_apply() {
        let breaches = RpoBreaches::default();
        let now = 10_000_000;
        let syncing = (SourceId::new("new").unwrap(), record(0));
        let mut relaxed = record(now - 20_000);
        relaxed.rpo_target_override = Some(Duration::from_secs(3600));
        let relaxed = (SourceId::new("relaxed").unwrap(), relaxed);
        assert!(
            breaches
                .evaluate(&[syncing, relaxed], &HashSet::new(), thresholds(), now)
                .is_empty()
        );
    }
}
