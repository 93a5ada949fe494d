//! A source's place in the migration workflow, and how it got there: the
//! history of its transitions, each with its time, who asked and why.
//!
//! File `DATA/sources/ID/migration`, a text record (`textrec.rs`) of at most
//! [`MIGRATION_EVENTS_KEPT`] events, newest last; an event's `seq` counts
//! every transition ever made, so a history cut at the front says so. The
//! current state is the last event's `to`; a source without the file (one
//! from before the workflow existed, or one whose initial sync is running) is
//! derived from its head and lifecycle record instead
//! ([`MigrationState::implied`]). Each transition rewrites the file
//! atomically: transitions are operator-paced, a few per source.
//!
//! What transitions are allowed is the server's policy; this module only keeps
//! them durable and checks that each one starts where the last one ended.

use blockrep_core::SourceId;

use crate::error::{Error, ErrorKind};
use crate::source_record::SourceRecord;
use crate::store::Store;
use crate::textrec;

/// Events kept per source; older ones are dropped (their count is not).
pub const MIGRATION_EVENTS_KEPT: usize = 256;

/// Longest `by` kept, in bytes.
pub const MIGRATION_BY_MAX_BYTES: usize = 200;

/// Longest `note` kept, in bytes.
pub const MIGRATION_NOTE_MAX_BYTES: usize = 500;

const HISTORY: SourceRecord = SourceRecord {
    name: "migration",
    magic: "blockrep migration v1",
    title: "migration history",
    // Largest file a valid history can be (every event at its longest, escaped).
    max_bytes: 64
        + MIGRATION_EVENTS_KEPT * (96 + 12 * (MIGRATION_BY_MAX_BYTES + MIGRATION_NOTE_MAX_BYTES)),
};

/// Where a source stands in the migration workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MigrationState {
    /// The initial sync has not committed yet.
    NotReady,
    /// A full replica is committed: it may be launched for a test.
    ReadyForTest,
    /// A test launch was made.
    Testing,
    /// The test is confirmed (by the operator, or by passing launch checks).
    ReadyForCutover,
    /// A cutover was requested; its final epoch has not committed yet.
    CuttingOver,
    /// The final epoch is committed and the cutover launch exists.
    CutOver,
    /// Replication resources are released; the cutover launch is kept.
    Finalized,
    /// Finalized and hidden from default listings.
    Archived,
}

impl MigrationState {
    /// Every state, in workflow order (for metrics with one series per state).
    pub const ALL: [MigrationState; 8] = [
        MigrationState::NotReady,
        MigrationState::ReadyForTest,
        MigrationState::Testing,
        MigrationState::ReadyForCutover,
        MigrationState::CuttingOver,
        MigrationState::CutOver,
        MigrationState::Finalized,
        MigrationState::Archived,
    ];

    /// The state's name, as status, the API, metrics and the file spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::NotReady => "not_ready",
            MigrationState::ReadyForTest => "ready_for_test",
            MigrationState::Testing => "testing",
            MigrationState::ReadyForCutover => "ready_for_cutover",
            MigrationState::CuttingOver => "cutting_over",
            MigrationState::CutOver => "cut_over",
            MigrationState::Finalized => "finalized",
            MigrationState::Archived => "archived",
        }
    }

    /// The state named `name` ([`MigrationState::as_str`]).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The state of a source with no history: what its head (whether a
    /// complete pass committed) and lifecycle record say (a store from
    /// before the workflow existed).
    pub fn implied(complete_pass: bool, cut_over: bool) -> Self {
        match (complete_pass, cut_over) {
            (_, true) => MigrationState::CutOver,
            (true, false) => MigrationState::ReadyForTest,
            (false, false) => MigrationState::NotReady,
        }
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationEvent {
    /// 1 for the source's first transition, counting every one since.
    pub seq: u64,
    /// When it was made, Unix ms.
    pub unix_ms: u64,
    pub from: MigrationState,
    pub to: MigrationState,
    /// Whether the operator overrode a gate (`--force`).
    pub forced: bool,
    /// Who asked: the admin identity, or `server` for what the server did.
    pub by: String,
    /// Why, in words.
    pub note: String,
}

impl MigrationEvent {
    fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {} {}",
            self.seq,
            self.unix_ms,
            self.from,
            self.to,
            u8::from(self.forced),
            textrec::escape(&self.by),
            textrec::escape(&self.note)
        )
    }

    fn decode(line: &str) -> Option<Self> {
        let mut fields = line.split(' ');
        let event = MigrationEvent {
            seq: fields.next()?.parse().ok()?,
            unix_ms: fields.next()?.parse().ok()?,
            from: MigrationState::parse(fields.next()?)?,
            to: MigrationState::parse(fields.next()?)?,
            forced: match fields.next()? {
                "0" => false,
                "1" => true,
                _ => return None,
            },
            by: textrec::unescape(fields.next()?)?,
            note: textrec::unescape(fields.next()?)?,
        };
        fields.next().is_none().then_some(event)
    }
}

/// A transition to record: [`Store::record_migration`] numbers it.
#[derive(Debug, Clone)]
pub struct MigrationChange {
    /// The state the caller saw: the change is refused if the history moved.
    pub from: MigrationState,
    pub to: MigrationState,
    pub forced: bool,
    pub by: String,
    pub note: String,
    pub unix_ms: u64,
}

fn decode(what: &str, lines: Vec<&str>) -> Result<Vec<MigrationEvent>, Error> {
    let mut events = Vec::with_capacity(lines.len());
    for line in lines {
        let event = MigrationEvent::decode(line)
            .ok_or_else(|| Error::new(ErrorKind::Corrupt, format!("{what}: bad event {line:?}")))?;
        if let Some(last) = events.last() {
            let last: &MigrationEvent = last;
            if event.seq != last.seq + 1 || event.from != last.to {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{what}: event {} does not follow event {}",
                        event.seq, last.seq
                    ),
                ));
            }
        }
        events.push(event);
    }
    Ok(events)
}

impl Store {
    /// The source's migration history, oldest first (at most
    /// [`MIGRATION_EVENTS_KEPT`] events); empty when it has none.
    pub fn migration_history(&self, source: &SourceId) -> Result<Vec<MigrationEvent>, Error> {
        Ok(HISTORY.read(self, source, decode)?.unwrap_or_default())
    }

    /// The source's migration state: its last transition's, else implied by
    /// its head and lifecycle record.
    pub fn migration_state(&self, source: &SourceId) -> Result<MigrationState, Error> {
        match self.migration_history(source)?.last() {
            Some(last) => Ok(last.to),
            None => Ok(MigrationState::implied(
                self.head(source)?
                    .is_some_and(|head| head.synced_scan_started_unix_ms != 0),
                self.lifecycle(source)?.is_some(),
            )),
        }
    }

    /// Durably records a transition and returns it numbered. Refused
    /// (`Busy`) when the source's state is no longer `change.from`: the
    /// caller decided on a state that moved. The caller serializes its
    /// transitions; this check makes a race visible instead of silent.
    pub fn record_migration(
        &self,
        source: &SourceId,
        change: MigrationChange,
    ) -> Result<MigrationEvent, Error> {
        self.check_writable()?;
        let mut events = self.migration_history(source)?;
        // The first step has no record to disagree with: the caller's
        // state (implied from the head, or `not_ready` while the first
        // commit is being recorded) is the start.
        if let Some(current) = events.last().map(|last| last.to)
            && current != change.from
        {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "source {source} is {current}, not {}: its state changed meanwhile",
                    change.from
                ),
            ));
        }
        let event = MigrationEvent {
            seq: events.last().map_or(1, |last| last.seq + 1),
            unix_ms: change.unix_ms,
            from: change.from,
            to: change.to,
            forced: change.forced,
            by: textrec::truncate(&change.by, MIGRATION_BY_MAX_BYTES),
            note: textrec::truncate(&change.note, MIGRATION_NOTE_MAX_BYTES),
        };
        events.push(event.clone());
        let drop = events.len().saturating_sub(MIGRATION_EVENTS_KEPT);
        events.drain(..drop);
        let lines: Vec<String> = events.iter().map(MigrationEvent::encode).collect();
        HISTORY.write(self, source, &lines)?;
        Ok(event)
    }
}

/// Most failed must-succeed checks a source keeps; past it, new failures
/// are not added (those kept still gate the source).
pub const FAILED_CHECKS_MAX: usize = 256;

const FAILED: SourceRecord = SourceRecord {
    name: "failed-checks",
    magic: "blockrep failed-checks v2",
    title: "failed checks",
    // Every check kept at its longest, escaped.
    max_bytes: 64 + FAILED_CHECKS_MAX * (40 + 3 * 2 * 1024),
};

/// A must-succeed check that failed: the launch (by name and creation
/// time, so a launch made again under the name is another one) and the
/// check's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedCheck {
    pub launch: String,
    pub launch_created_unix_ms: u64,
    pub check: String,
}

impl Store {
    /// The must-succeed checks of the source's launches that failed and have
    /// not been cleared (by a later passing test launch, or a forced step);
    /// they gate the workflow even once their launch is gone. File
    /// `DATA/sources/ID/failed-checks`.
    pub fn failed_checks(&self, source: &SourceId) -> Result<Vec<FailedCheck>, Error> {
        let parse = |what: &str, lines: Vec<&str>| {
            lines
                .into_iter()
                .map(|line| {
                    let parsed = match line.split(' ').collect::<Vec<_>>().as_slice() {
                        ["failed", launch, created, check] => (|| {
                            Some(FailedCheck {
                                launch: textrec::unescape(launch)?,
                                launch_created_unix_ms: created.parse().ok()?,
                                check: textrec::unescape(check)?,
                            })
                        })(),
                        _ => None,
                    };
                    parsed.ok_or_else(|| {
                        Error::new(ErrorKind::Corrupt, format!("{what}: bad line {line:?}"))
                    })
                })
                .collect()
        };
        Ok(FAILED.read(self, source, parse)?.unwrap_or_default())
    }

    /// Changes the source's failed checks with `change`, durably, under the
    /// catalog lock (reports of several checks may arrive at once); none
    /// left removes the file.
    pub fn update_failed_checks(
        &self,
        source: &SourceId,
        change: impl FnOnce(&mut Vec<FailedCheck>),
    ) -> Result<(), Error> {
        self.check_writable()?;
        let _guard = crate::mutex::lock(&self.catalog.lock);
        let mut failed = self.failed_checks(source)?;
        let before = failed.clone();
        change(&mut failed);
        failed.truncate(FAILED_CHECKS_MAX.max(before.len()));
        if failed == before {
            return Ok(());
        }
        if failed.is_empty() {
            return FAILED.remove(self, source);
        }
        let lines: Vec<String> = failed
            .iter()
            .map(|f| {
                format!(
                    "failed {} {} {}",
                    textrec::escape(&textrec::truncate(&f.launch, 1024)),
                    f.launch_created_unix_ms,
                    textrec::escape(&textrec::truncate(&f.check, 1024))
                )
            })
            .collect();
        FAILED.write(self, source, &lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::temp_store;

    fn change(from: MigrationState, to: MigrationState, note: &str) -> MigrationChange {
        MigrationChange {
            from,
            to,
            forced: false,
            by: "admin (token) from 127.0.0.1:5000".into(),
            note: note.into(),
            unix_ms: 1_000,
        }
    }

    #[test]
    fn history_is_durable_ordered_and_checked() {
        let (_dir, store) = temp_store();
        let source = SourceId::new("web").unwrap();
        assert!(store.migration_history(&source).unwrap().is_empty());
        assert_eq!(
            store.migration_state(&source).unwrap(),
            MigrationState::NotReady
        );
        use MigrationState::*;
        store
            .record_migration(&source, change(NotReady, ReadyForTest, "initial sync"))
            .unwrap();
        let second = store
            .record_migration(
                &source,
                change(ReadyForTest, Testing, "launch web-t1, with\ttabs"),
            )
            .unwrap();
        assert_eq!(second.seq, 2);
        // A change decided on a stale state is refused and writes nothing.
        let stale = store.record_migration(&source, change(ReadyForTest, Testing, "again"));
        assert_eq!(stale.unwrap_err().kind(), ErrorKind::Busy);
        let history = store.migration_history(&source).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1], second);
        assert_eq!(store.migration_state(&source).unwrap(), Testing);
        // Damage is an error, not a shorter history.
        let path = store.source_dir(&source).join("migration");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            store.migration_history(&source).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn failed_checks_are_kept_until_cleared() {
        let (_dir, store) = temp_store();
        let source = SourceId::new("web").unwrap();
        assert!(store.failed_checks(&source).unwrap().is_empty());
        let failed = FailedCheck {
            launch: "drill 1".into(),
            launch_created_unix_ms: 7,
            check: "boot".into(),
        };
        store
            .update_failed_checks(&source, |f| f.push(failed.clone()))
            .unwrap();
        assert_eq!(store.failed_checks(&source).unwrap(), vec![failed]);
        // Full: new failures are not added, the kept ones stay.
        store
            .update_failed_checks(&source, |f| {
                for n in 0..FAILED_CHECKS_MAX + 5 {
                    f.push(FailedCheck {
                        launch: format!("d{n}"),
                        launch_created_unix_ms: 1,
                        check: "cmd1".into(),
                    });
                }
            })
            .unwrap();
        let kept = store.failed_checks(&source).unwrap();
        assert_eq!(kept.len(), FAILED_CHECKS_MAX);
        assert_eq!(kept[0].launch, "drill 1");
        store.update_failed_checks(&source, Vec::clear).unwrap();
        assert!(store.failed_checks(&source).unwrap().is_empty());
        store.update_failed_checks(&source, Vec::clear).unwrap();
    }

    #[test]
    fn history_keeps_the_newest_events_and_their_numbers() {
        let (_dir, store) = temp_store();
        let source = SourceId::new("db").unwrap();
        use MigrationState::*;
        let mut state = NotReady;
        for i in 0..MIGRATION_EVENTS_KEPT + 10 {
            let to = if state == Testing {
                ReadyForTest
            } else {
                Testing
            };
            let mut c = change(state, to, &"x".repeat(MIGRATION_NOTE_MAX_BYTES + 9));
            c.by = " ".repeat(MIGRATION_BY_MAX_BYTES);
            c.unix_ms = i as u64;
            store.record_migration(&source, c).unwrap();
            state = to;
        }
        let history = store.migration_history(&source).unwrap();
        assert_eq!(history.len(), MIGRATION_EVENTS_KEPT);
        assert_eq!(history[0].seq, 11);
        assert_eq!(
            history.last().unwrap().seq,
            (MIGRATION_EVENTS_KEPT + 10) as u64
        );
        assert_eq!(history[0].note.len(), MIGRATION_NOTE_MAX_BYTES);
    }
}
