//! The migration workflow of each source: which step may follow which, who
//! asked, and the record of it.
//!
//! ```text
//! not_ready -> ready_for_test -> testing -> ready_for_cutover -> cutting_over -> cut_over
//!   (initial     (a test launch    (mark-ready, or      (cutover)        (final commit)
//!    sync)        was made)         checks passed)                           |
//!                                                                finalize -> finalized -> archived
//! ```
//!
//! The server makes the automatic steps (initial sync committed, a test
//! launch made, its checks passed, the cutover's final commit); the operator
//! the others. A step the state does not allow is refused with the state
//! named; `--force` passes the gates a migration team may knowingly skip (a
//! cutover without a test, a mark-ready with failing checks) and is recorded
//! as such. Every step is one durable event (`blockrep_store`'s migration
//! history), mirrored in the status table. Steps are serialized by one lock:
//! they are operator-paced, and each is decided on the state it changes.
//!
//! `disconnected` is not a step: it is how a source before cutover is shown
//! while its agent has been silent past the stall threshold, and it ends by
//! itself when the agent is back.

use std::sync::Arc;

use blockrep_core::SourceId;
use blockrep_core::clock::now_unix_ms;
use blockrep_store::{MigrationChange, MigrationEvent, MigrationState};
use tracing::{info, warn};

use crate::shared::Shared;

/// A step of the workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// A complete pass over the disk committed (the server).
    InitialSyncCommitted,
    /// A test launch was made (the server).
    TestLaunched { launch: String },
    /// The operator confirmed the test.
    MarkReady,
    /// Every check of a test launch passed (the server).
    ChecksPassed { launch: String },
    /// The operator asked for the cutover.
    CutoverRequested,
    /// The cutover's final epoch committed and its launch exists (the server).
    CutoverDone { epoch: u64, launch: String },
    /// The operator lifted the cutover fence: replication resumes.
    Reset,
    /// The operator released the replication resources.
    Finalize,
    /// The operator hid a finalized source.
    Archive,
}

impl Step {
    /// What the history says of it.
    fn note(&self) -> String {
        match self {
            Step::InitialSyncCommitted => "initial sync committed".into(),
            Step::TestLaunched { launch } => format!("test launch {launch} made"),
            Step::MarkReady => "test confirmed by the operator".into(),
            Step::ChecksPassed { launch } => format!("every check of launch {launch} passed"),
            Step::CutoverRequested => "cutover requested".into(),
            Step::CutoverDone { epoch, launch } => {
                format!("final epoch {epoch} committed; cutover launch {launch}")
            }
            Step::Reset => "cutover fence lifted: replication resumes".into(),
            Step::Finalize => "snapshots and test launches released; agent told to stop".into(),
            Step::Archive => "archived".into(),
        }
    }
}

/// What deciding a step found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Move to this state (`forced`: only because the operator forced it).
    Move { to: MigrationState, forced: bool },
    /// Nothing to record: the step does not change this state.
    Stay,
    /// Refused, and why.
    Refuse(String),
}

/// The rule table: what `step` does from `from`. `blocking` names the
/// must-succeed checks that fail or have not run (they gate mark-ready and
/// cutover like a missing test); `force` passes those gates.
pub(crate) fn decide(
    source: &SourceId,
    from: MigrationState,
    step: &Step,
    blocking: &[String],
    force: bool,
) -> Decision {
    use MigrationState::*;
    let gated = |to: MigrationState, why: Option<String>| match why {
        None => Decision::Move { to, forced: false },
        Some(_) if force => Decision::Move { to, forced: true },
        Some(why) => Decision::Refuse(format!("{why}; pass --force to go on anyway (recorded)")),
    };
    let checks = (!blocking.is_empty()).then(|| {
        format!(
            "source {source} has launch checks that must succeed and have not: {}",
            blocking.join(", ")
        )
    });
    match (step, from) {
        (Step::InitialSyncCommitted, NotReady) => Decision::Move {
            to: ReadyForTest,
            forced: false,
        },
        (Step::TestLaunched { .. }, ReadyForTest) => Decision::Move {
            to: Testing,
            forced: false,
        },
        (Step::ChecksPassed { .. }, Testing) => Decision::Move {
            to: ReadyForCutover,
            forced: false,
        },
        (Step::InitialSyncCommitted | Step::TestLaunched { .. } | Step::ChecksPassed { .. }, _) => {
            Decision::Stay
        }
        (Step::MarkReady, Testing) => gated(ReadyForCutover, checks),
        (Step::MarkReady, ReadyForTest) => gated(
            ReadyForCutover,
            Some(checks.unwrap_or_else(|| {
                format!(
                    "source {source} is ready_for_test: it has not been tested (no test launch)"
                )
            })),
        ),
        (Step::MarkReady, ReadyForCutover) => Decision::Stay,
        (Step::CutoverRequested, ReadyForCutover) => gated(CuttingOver, checks),
        (Step::CutoverRequested, ReadyForTest | Testing) => gated(
            CuttingOver,
            Some(format!(
                "source {source} is {from}: a cutover needs a passed test (mark-ready)"
            )),
        ),
        (Step::CutoverDone { .. }, CutOver | Finalized | Archived) => Decision::Stay,
        // A retried request changes nothing.
        (Step::CutoverRequested, CuttingOver) => Decision::Stay,
        (Step::CutoverDone { .. }, CuttingOver) => Decision::Move {
            to: CutOver,
            forced: false,
        },
        // The final commit is a fact, whatever the record said before: an
        // agent run with `--cutover` on the source machine cuts over without
        // asking the workflow, and is recorded as forced past the state.
        (Step::CutoverDone { .. }, _) => Decision::Move {
            to: CutOver,
            forced: true,
        },
        (Step::Reset, CuttingOver | CutOver) => Decision::Move {
            to: ReadyForCutover,
            forced: false,
        },
        (Step::Reset, Finalized | Archived) => Decision::Refuse(format!(
            "source {source} is {from}: its replication was released; it cannot resume"
        )),
        (Step::Reset, _) => Decision::Stay,
        (Step::Finalize, CutOver) => Decision::Move {
            to: Finalized,
            forced: false,
        },
        (Step::Archive, Finalized) => Decision::Move {
            to: Archived,
            forced: false,
        },
        (Step::MarkReady | Step::CutoverRequested | Step::Finalize | Step::Archive, _) => {
            let needs = match step {
                Step::MarkReady => "mark-ready needs a source in testing",
                Step::CutoverRequested => "a cutover needs a source ready_for_cutover",
                Step::Finalize => "finalize needs a source that is cut_over",
                _ => "archive needs a finalized source",
            };
            Decision::Refuse(format!("source {source} is {from}: {needs}"))
        }
    }
}

/// Why a step was not recorded.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The rules refuse it (answered 409).
    Rule(String),
    /// The store failed (answered 500).
    Store(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Rule(why) | Refused::Store(why) => f.write_str(why),
        }
    }
}

/// The source's state as the status table mirrors it.
pub(crate) fn current(shared: &Shared, source: &SourceId) -> MigrationState {
    shared
        .ledger
        .sources
        .update_known(source, |r| r.migration_recorded())
        .unwrap_or(MigrationState::NotReady)
}

/// The lock that serializes steps, held by a caller that must decide and
/// act between its check and its step (finalize, reset).
pub(crate) type Serial<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Decides `step` on the source's current state and records the move, if
/// any; `None` when the step changes nothing. `blocking` is consulted only
/// for the gated steps (mark-ready, cutover).
pub(crate) async fn apply(
    shared: &Arc<Shared>,
    source: &SourceId,
    step: Step,
    by: &str,
    force: bool,
) -> Result<Option<MigrationEvent>, Refused> {
    let serial = shared.migration_lock.lock().await;
    apply_locked(shared, &serial, source, step, by, force).await
}

/// [`apply`] under the lock the caller holds.
pub(crate) async fn apply_locked(
    shared: &Arc<Shared>,
    _serial: &Serial<'_>,
    source: &SourceId,
    step: Step,
    by: &str,
    force: bool,
) -> Result<Option<MigrationEvent>, Refused> {
    let mut from = current(shared, source);
    // A complete pass committed whose step the server has not recorded yet
    // (it is recorded off the session's path): recorded first, so that a
    // test launch made right after the first commit counts.
    if from == MigrationState::NotReady
        && step != Step::InitialSyncCommitted
        && complete_pass(shared, source)
    {
        let note = Step::InitialSyncCommitted.note();
        record(
            shared,
            source,
            (from, MigrationState::ReadyForTest),
            false,
            SERVER,
            note,
        )
        .await?;
        from = MigrationState::ReadyForTest;
    }
    // A cutover is recorded only while the fence it records stands: a
    // reset made since (its step came first) must not be undone by it.
    if let Step::CutoverDone { epoch, launch } = &step {
        let standing = shared
            .ledger
            .sources
            .update_known(source, |r| {
                r.lifecycle
                    .as_ref()
                    .is_some_and(|l| l.epoch == *epoch && l.launch == *launch)
            })
            .unwrap_or(false);
        if !standing {
            return Ok(None);
        }
    }
    let gated = matches!(step, Step::MarkReady | Step::CutoverRequested);
    let blocking = match gated {
        true => blocking_checks(shared, source).await?,
        false => Vec::new(),
    };
    let (to, forced) = match decide(source, from, &step, &blocking, force) {
        Decision::Stay => return Ok(None),
        Decision::Refuse(why) => return Err(Refused::Rule(why)),
        Decision::Move { to, forced } => (to, forced),
    };
    let mut note = step.note();
    if forced {
        note.push_str(" (forced past: ");
        note.push_str(&if blocking.is_empty() {
            format!("{from}")
        } else {
            blocking.join(", ")
        });
        note.push(')');
    }
    let event = record(shared, source, (from, to), forced, by, note).await?;
    // Forced past failed checks: they are answered for now.
    if forced && gated && !blocking.is_empty() {
        clear_failed_checks(shared, source).await;
    }
    Ok(Some(event))
}

/// Whether a complete pass of the source has committed.
fn complete_pass(shared: &Shared, source: &SourceId) -> bool {
    shared
        .ledger
        .sources
        .update_known(source, |r| r.synced_scan_started_unix_ms != 0)
        .unwrap_or(false)
}

/// Durably records one transition and mirrors it in the status table.
async fn record(
    shared: &Arc<Shared>,
    source: &SourceId,
    (from, to): (MigrationState, MigrationState),
    forced: bool,
    by: &str,
    note: String,
) -> Result<MigrationEvent, Refused> {
    let change = MigrationChange {
        from,
        to,
        forced,
        by: by.to_owned(),
        note,
        unix_ms: now_unix_ms(),
    };
    let store = Arc::clone(&shared.store);
    let id = source.clone();
    let event = tokio::task::spawn_blocking(move || store.record_migration(&id, change))
        .await
        .map_err(|e| Refused::Store(e.to_string()))?
        .map_err(|e| Refused::Store(e.to_string()))?;
    shared.ledger.sources.update(source, |r| {
        r.migration = Some(event.to);
        r.migration_since_unix_ms = event.unix_ms;
    });
    shared
        .workflow
        .transitions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    info!(source = %source, from = %event.from, to = %event.to, forced = event.forced,
          by = %event.by, note = %event.note, "migration state changed");
    Ok(event)
}

/// Forgets the source's failed must-succeed checks (a forced step past
/// them, or a test launch whose checks all passed since).
pub(crate) async fn clear_failed_checks(shared: &Arc<Shared>, source: &SourceId) {
    let store = Arc::clone(&shared.store);
    let id = source.clone();
    match tokio::task::spawn_blocking(move || store.update_failed_checks(&id, Vec::clear)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(source = %source, error = %e, "cannot clear the failed checks"),
        Err(e) => warn!(source = %source, error = %e, "cannot clear the failed checks"),
    }
}

/// Records a step the server makes on its own, logging (not failing on) a
/// store error: the fact it records already happened.
pub(crate) async fn apply_by_server(shared: &Arc<Shared>, source: &SourceId, step: Step) {
    if let Err(e) = apply(shared, source, step, SERVER, false).await {
        warn!(source = %source, error = %e, "cannot record the migration step");
    }
}

/// Who the server's own steps are by.
pub(crate) const SERVER: &str = "server";

/// At start: brings the record in line with the lifecycle fence where a
/// crash fell between the two (a cutover's final commit recorded only in
/// the fence, or a reset that lifted the fence before its step was
/// recorded).
pub(crate) async fn reconcile(shared: Arc<Shared>) {
    use MigrationState::*;
    // In a shared bucket another server may hold a source and be between
    // the two writes right now: its records are its own to mend.
    if shared.config.bucket.is_some() {
        return;
    }
    for (source, record) in shared.ledger.sources.records() {
        let state = record.migration_recorded();
        let step = match (&record.lifecycle, state) {
            (Some(fence), NotReady | ReadyForTest | Testing | ReadyForCutover | CuttingOver) => {
                Step::CutoverDone {
                    epoch: fence.epoch,
                    launch: fence.launch.clone(),
                }
            }
            (None, CutOver) => Step::Reset,
            _ => continue,
        };
        warn!(source = %source, state = %state, step = ?step,
              "the migration record lags the cutover fence: recording the step");
        apply_by_server(&shared, &source, step).await;
    }
}

/// After a commit of a complete pass: the first one makes the source ready
/// for testing. Cheap when it is not the first (the mirror says so).
pub(crate) fn complete_pass_committed(shared: &Arc<Shared>, source: &SourceId) {
    if current(shared, source) != MigrationState::NotReady {
        return;
    }
    let (shared, source) = (Arc::clone(shared), source.clone());
    tokio::spawn(async move {
        apply_by_server(&shared, &source, Step::InitialSyncCommitted).await;
    });
}

/// The must-succeed checks of the source's launches that fail or have not
/// run, each named with its launch.
async fn blocking_checks(shared: &Arc<Shared>, source: &SourceId) -> Result<Vec<String>, Refused> {
    let store = Arc::clone(&shared.store);
    let id = source.clone();
    tokio::task::spawn_blocking(move || -> Result<Vec<String>, blockrep_store::Error> {
        let mut out = Vec::new();
        let launches = store.list_launches(Some(&id))?;
        for launch in &launches {
            let workflow = match store.launch_workflow(&launch.name) {
                Ok(workflow) => workflow,
                // Deleted since the listing.
                Err(e) if e.kind() == blockrep_store::ErrorKind::NotFound => continue,
                // A record that cannot be read cannot say its checks passed.
                Err(e) => {
                    out.push(format!(
                        "launch {}: its record cannot be read ({e})",
                        launch.name
                    ));
                    continue;
                }
            };
            for check in workflow.blocking_checks() {
                out.push(format!("launch {}: {check}", launch.name));
            }
        }
        // Failures of launches deleted since (by hand, or at their expiry)
        // still stand until a later test passes or a step is forced.
        for failed in store.failed_checks(&id)? {
            let same = |l: &&blockrep_store::LaunchInfo| {
                l.name == failed.launch && l.created_unix_ms == failed.launch_created_unix_ms
            };
            if !launches.iter().any(|l| same(&l)) {
                out.push(format!(
                    "launch {} (deleted): {} failed",
                    failed.launch, failed.check
                ));
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| Refused::Store(e.to_string()))?
    .map_err(|e| Refused::Store(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationState::*;

    fn source() -> SourceId {
        SourceId::new("web").unwrap()
    }

    fn moves(from: MigrationState, step: Step) -> Decision {
        decide(&source(), from, &step, &[], false)
    }

    #[test]
    fn the_happy_path_moves_one_state_at_a_time() {
        let path = [
            (NotReady, Step::InitialSyncCommitted, ReadyForTest),
            (
                ReadyForTest,
                Step::TestLaunched { launch: "t".into() },
                Testing,
            ),
            (Testing, Step::MarkReady, ReadyForCutover),
            (ReadyForCutover, Step::CutoverRequested, CuttingOver),
            (
                CuttingOver,
                Step::CutoverDone {
                    epoch: 9,
                    launch: "c".into(),
                },
                CutOver,
            ),
            (CutOver, Step::Finalize, Finalized),
            (Finalized, Step::Archive, Archived),
        ];
        for (from, step, to) in path {
            assert_eq!(
                moves(from, step.clone()),
                Decision::Move { to, forced: false },
                "{step:?}"
            );
        }
        assert_eq!(
            moves(Testing, Step::ChecksPassed { launch: "t".into() }),
            Decision::Move {
                to: ReadyForCutover,
                forced: false
            }
        );
        assert_eq!(
            moves(CutOver, Step::Reset),
            Decision::Move {
                to: ReadyForCutover,
                forced: false
            }
        );
    }

    #[test]
    fn gates_refuse_with_the_state_named_and_force_is_recorded() {
        let refused = |d: Decision| match d {
            Decision::Refuse(why) => why,
            other => panic!("not refused: {other:?}"),
        };
        let why = refused(moves(ReadyForTest, Step::CutoverRequested));
        assert!(
            why.contains("ready_for_test") && why.contains("--force"),
            "{why}"
        );
        assert_eq!(
            decide(&source(), ReadyForTest, &Step::CutoverRequested, &[], true),
            Decision::Move {
                to: CuttingOver,
                forced: true
            }
        );
        let why = refused(moves(ReadyForTest, Step::Finalize));
        assert!(
            why.contains("ready_for_test") && why.contains("cut_over"),
            "{why}"
        );
        // Finalize and archive cannot be forced.
        assert!(matches!(
            decide(&source(), Testing, &Step::Finalize, &[], true),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            moves(NotReady, Step::CutoverRequested),
            Decision::Refuse(_)
        ));
        assert!(matches!(moves(Finalized, Step::Reset), Decision::Refuse(_)));
        // A failing must-succeed check blocks mark-ready and cutover.
        let blocking = vec!["launch t: boot failed".to_owned()];
        let why = match decide(&source(), Testing, &Step::MarkReady, &blocking, false) {
            Decision::Refuse(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(why.contains("boot failed"), "{why}");
        assert!(matches!(
            decide(
                &source(),
                ReadyForCutover,
                &Step::CutoverRequested,
                &blocking,
                false
            ),
            Decision::Refuse(_)
        ));
        assert_eq!(
            decide(&source(), Testing, &Step::MarkReady, &blocking, true),
            Decision::Move {
                to: ReadyForCutover,
                forced: true
            }
        );
        // The server's steps never refuse: they record a fact or stay.
        assert_eq!(moves(CutOver, Step::InitialSyncCommitted), Decision::Stay);
        assert_eq!(
            moves(
                Testing,
                Step::TestLaunched {
                    launch: "t2".into()
                }
            ),
            Decision::Stay
        );
        assert_eq!(
            moves(
                ReadyForTest,
                Step::CutoverDone {
                    epoch: 1,
                    launch: "c".into()
                }
            ),
            Decision::Move {
                to: CutOver,
                forced: true
            }
        );
    }
}
