//! RPO breach state: which sources are past their RPO target, and how often
//! each crossed it. Evaluated against the per-source records on every alert
//! tick (see `alerts`); a crossing is reported once each way.

use std::collections::BTreeMap;
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

    /// Stops watching the sources of `records` (another server serves
    /// them): a breach open here is closed with a
    /// [`BreachEvent::ServedElsewhere`] event, so that whoever the hook told
    /// of it hears that it is watched elsewhere now, and the source starts
    /// afresh if this server serves it again. Counts stay.
    pub(crate) fn forget(
        &self,
        records: &[(SourceId, SourceRecord)],
        thresholds: StateThresholds,
        now_unix_ms: u64,
    ) -> Vec<Transition> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = Vec::new();
        for (source, record) in records {
            if let Some(state) = states.get_mut(source)
                && std::mem::take(&mut state.in_breach)
            {
                closed.push(Transition {
                    source: source.clone(),
                    event: BreachEvent::ServedElsewhere,
                    lag_seconds: record.lag_ms(now_unix_ms).unwrap_or(0) as f64 / 1000.0,
                    rpo_target_seconds: record.rpo_target(thresholds).as_secs_f64(),
                });
            }
        }
        closed
    }

    /// Compares every source's lag with its target and returns the crossings
    /// since the last evaluation.
    pub(crate) fn evaluate(
        &self,
        records: &[(SourceId, SourceRecord)],
        thresholds: StateThresholds,
        now_unix_ms: u64,
    ) -> Vec<Transition> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut transitions = Vec::new();
        for (source, record) in records {
            let target = record.rpo_target(thresholds);
            // `None` during the initial sync: no consistent replica, no breach.
            let Some(lag_ms) = record.lag_ms(now_unix_ms) else {
                continue;
            };
            // A cut-over source no longer replicates by design: its lag is not a
            // breach (a breach still open at cutover is closed as recovered).
            let breached = record.lifecycle.is_none() && lag_ms > target.as_millis() as u64;
            let state = states.entry(source.clone()).or_default();
            if breached == state.in_breach {
                continue;
            }
            state.in_breach = breached;
            let event = if breached {
                state.breaches_total += 1;
                BreachEvent::Breach
            } else {
                BreachEvent::Recovered
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
        assert!(breaches.evaluate(&records, thresholds(), now).is_empty());
        // Lag grows past the target with no commit: one breach, then quiet.
        let later = now + 6_000;
        let transitions = breaches.evaluate(&records, thresholds(), later);
        assert_eq!(transitions.len(), 1);
        assert_eq!(transitions[0].event, BreachEvent::Breach);
        assert_eq!(transitions[0].lag_seconds, 11.0);
        assert_eq!(transitions[0].rpo_target_seconds, 10.0);
        assert!(
            breaches
                .evaluate(&records, thresholds(), later + 500)
                .is_empty()
        );
        assert!(
            breaches
                .evaluate(&records, thresholds(), later + 60_000)
                .is_empty()
        );
        // A fresh commit: one recovery.
        let records = vec![(source.clone(), record(later + 60_000))];
        let transitions = breaches.evaluate(&records, thresholds(), later + 61_000);
        assert_eq!(transitions.len(), 1);
        assert_eq!(transitions[0].event, BreachEvent::Recovered);
        assert!(
            breaches
                .evaluate(&records, thresholds(), later + 61_500)
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
        assert_eq!(breaches.evaluate(&records, thresholds(), now).len(), 1);
        let closed = breaches.forget(&records, thresholds(), now + 50);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].event, BreachEvent::ServedElsewhere);
        assert_eq!(closed[0].lag_seconds, 20.05);
        // Closed once.
        assert!(breaches.forget(&records, thresholds(), now + 60).is_empty());
        let transitions = breaches.evaluate(&records, thresholds(), now + 100);
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
                .evaluate(&[syncing, relaxed], thresholds(), now)
                .is_empty()
        );
    }
}
