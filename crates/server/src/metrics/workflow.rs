//! The migration workflow's metrics: each source's migration state, and the
//! counters of steps, expired drills and launch checks.

use std::sync::atomic::Ordering;

use blockrep_store::MigrationState;

use super::exposition::{Exposition, Value};
use crate::shared::Shared;

/// The `blockrep_source_migration_state` family and the workflow counters.
pub(super) fn workflow_text(shared: &Shared) -> String {
    let mut x = Exposition::default();
    x.family(
        "blockrep_source_migration_state",
        "gauge",
        "Migration workflow state of the source: 1 for the current state, 0 for the others \
         (disconnected: a source not yet cut over whose agent is silent past the stall threshold).",
    );
    let thresholds = shared.thresholds();
    let now = blockrep_core::clock::now_unix_ms();
    let states: Vec<&str> = MigrationState::ALL
        .iter()
        .map(|s| s.as_str())
        .chain(["disconnected"])
        .collect();
    for (source, record) in shared.watched_records() {
        let current = record.migration_shown(thresholds, now);
        for state in &states {
            x.sample(
                "blockrep_source_migration_state",
                &[("source", source.as_str()), ("state", state)],
                Value::Int(u64::from(*state == current)),
            );
        }
    }
    let counters = &shared.workflow;
    let families = [
        (
            "blockrep_migration_transitions_total",
            "Migration workflow steps recorded (every source).",
            &counters.transitions,
        ),
        (
            "blockrep_launches_expired_total",
            "Test launches deleted at the end of their TTL (their NBD clients disconnected first).",
            &counters.launches_expired,
        ),
        (
            "blockrep_standby_moves_total",
            "Standby launches moved to a new committed point of their source.",
            &counters.standby_moves,
        ),
        (
            "blockrep_launch_checks_total",
            "Launch check results reported.",
            &counters.checks_recorded,
        ),
        (
            "blockrep_launch_checks_failed_total",
            "Launch check results reported that failed.",
            &counters.checks_failed,
        ),
    ];
    for (name, help, counter) in families {
        x.scalar(
            name,
            "counter",
            help,
            Value::Int(counter.load(Ordering::Relaxed)),
        );
    }
    x.finish()
}
