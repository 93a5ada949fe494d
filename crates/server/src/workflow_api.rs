//! The admin API of the migration workflow: a source's steps (mark-ready,
//! finalize, archive), its history, launch workflow settings at creation,
//! and launch check reports.
//!
//! Checks run where the operator runs them (`blockrep launch create
//! --check ...`), with the operator's tools and privileges, and report
//! here: the server never runs a command it was sent, so the admin API is
//! no way to execute code on the replication server. What the server owns
//! is the record and the gate.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use blockrep_core::SourceId;
use blockrep_core::clock::now_unix_ms;
use blockrep_store::{LaunchCheck, LaunchKind, LaunchWorkflow, MigrationEvent, MigrationState};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::api_error::{ApiError, blocking, error, parse_source};
use crate::migration::{Refused, Step};
use crate::shared::Shared;
use crate::views::{CheckView, CreateLaunch};

/// The header an admin client may name its operator with (`alice`), kept in
/// the history beside the identity that authenticated the request.
pub const OPERATOR_HEADER: &str = "x-blockrep-operator";

/// Longest operator name kept.
const OPERATOR_MAX_BYTES: usize = 64;

/// Who asked, as the history records it: the admin identity that
/// authenticated the request, and the operator name the client gave.
pub(crate) fn who(shared: &Shared, headers: &HeaderMap) -> String {
    let identity = if shared.config.admin_tls {
        "admin certificate"
    } else {
        "admin token"
    };
    let operator = headers
        .get(OPERATOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|name| {
            !name.is_empty()
                && name.len() <= OPERATOR_MAX_BYTES
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
        });
    match operator {
        Some(name) => format!("{name} ({identity})"),
        None => identity.to_owned(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct StepBody {
    #[serde(default)]
    force: bool,
}

/// `force` from an optional JSON body (`{"force": true}`).
pub(crate) fn force_of(body: &[u8]) -> Result<bool, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    serde_json::from_slice::<StepBody>(body)
        .map(|b| b.force)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")).into())
}

/// Applies an operator's step: 409 naming the state when refused.
pub(crate) async fn step(
    shared: &Arc<Shared>,
    source: &SourceId,
    step: Step,
    by: &str,
    force: bool,
) -> Result<Option<MigrationEvent>, ApiError> {
    crate::migration::apply(shared, source, step, by, force)
        .await
        .map_err(refused)
}

/// A refused step as the API answers it: 409 naming the state, or 500.
pub(crate) fn refused(e: Refused) -> ApiError {
    match e {
        Refused::Rule(why) => error(StatusCode::CONFLICT, why).into(),
        Refused::Store(why) => error(StatusCode::INTERNAL_SERVER_ERROR, why).into(),
    }
}

/// Whether `name` may name a check: letters, digits and `._-`, at most 64
/// bytes (it is a key of the launch's record and shown in every listing).
fn valid_check_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Before an operator's step on `source`: in a shared bucket, only the
/// server that serves the source records its steps, from its records as the
/// bucket has them (taking its lease reads them again). Another server's
/// copy may be old, and the agent it would tell of a cutover is not
/// connected to it: it refuses with 409, naming the server that serves it.
pub(crate) async fn serve_for_step(
    shared: &Arc<Shared>,
    source: &SourceId,
) -> Result<(), ApiError> {
    crate::leases::claim(shared, source)
        .await
        .map_err(|reject| {
            let status = match reject.code {
                blockrep_proto::ErrorCode::ServedElsewhere | blockrep_proto::ErrorCode::Busy => {
                    StatusCode::CONFLICT
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            ApiError::from(error(status, reject.message))
        })
}

/// [`serve_for_step`] for a step on the launch `name` (fold, delete,
/// materialize, a check's report): its source's server makes it, as it
/// serves the launch's exports. Nothing to claim for a launch unknown here
/// or a local store.
pub(crate) async fn serve_for_launch(shared: &Arc<Shared>, name: &str) -> Result<(), ApiError> {
    if shared.config.bucket.is_none() {
        return Ok(());
    }
    let launch = name.to_owned();
    let info = blocking(shared, move |store| store.launch(&launch)).await?;
    match info {
        Some(info) => serve_for_step(shared, &info.source).await,
        None => Ok(()),
    }
}

/// [`serve_for_step`] for a source this server knows of (its figures, or
/// any record of it, such as a snapshot a listing read from the bucket);
/// one it knows nothing of is left to the step's own answer (404), so that
/// no lease is taken for a source that does not exist.
pub(crate) async fn serve_if_known(
    shared: &Arc<Shared>,
    source: &SourceId,
) -> Result<(), ApiError> {
    if in_ledger(shared, source) || shared.store.has_records_of(source) {
        serve_for_step(shared, source).await?;
    }
    Ok(())
}

/// A known source that this server serves for a step: `404` for one it
/// does not know, `409` naming the server that serves it (see
/// [`serve_for_step`]).
pub(crate) async fn known_for_step(
    shared: &Arc<Shared>,
    source: &str,
) -> Result<SourceId, ApiError> {
    let id = known(shared, source)?;
    serve_for_step(shared, &id).await?;
    Ok(id)
}

/// A known source, or 404.
pub(crate) fn known(shared: &Shared, source: &str) -> Result<SourceId, ApiError> {
    let id = parse_source(source)?;
    match in_ledger(shared, &id) {
        true => Ok(id),
        false => Err(error(StatusCode::NOT_FOUND, format!("no source {source}")).into()),
    }
}

/// Whether this server has figures of `source`.
fn in_ledger(shared: &Shared, source: &SourceId) -> bool {
    shared.ledger.sources.update_known(source, |_| ()).is_some()
}

/// The answer to a step: the source's state and the event (if it moved).
fn stepped(source: &SourceId, shared: &Shared, event: Option<MigrationEvent>) -> Response {
    Json(json!({
        "source": source.as_str(),
        "migration_state": crate::migration::current(shared, source).as_str(),
        "event": event.as_ref().map(EventView::from),
    }))
    .into_response()
}

/// `POST /v1/sources/{source}/mark-ready` (`{"force": true}` optional).
pub(crate) async fn mark_ready(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let force = force_of(&body)?;
    operator_step(&shared, &source, &headers, Step::MarkReady, force).await
}

/// An operator's step on a known source, answered with its state and event.
async fn operator_step(
    shared: &Arc<Shared>,
    source: &str,
    headers: &HeaderMap,
    operator: Step,
    force: bool,
) -> Result<Response, ApiError> {
    let source = known_for_step(shared, source).await?;
    let event = step(shared, &source, operator, &who(shared, headers), force).await?;
    Ok(stepped(&source, shared, event))
}

/// `POST /v1/sources/{source}/finalize`: releases the source's snapshots
/// and test launches (their NBD exports closed first), keeps its cutover and
/// standby launches (a standby may hold a failover's data), and records
/// `finalized`; the agent is refused from then on, told to stop. The whole
/// step holds the workflow's lock, so a reset cannot slip in between its
/// check and its record.
pub(crate) async fn finalize(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let source = known_for_step(&shared, &source).await?;
    let serial = shared.migration_lock.lock().await;
    // And the lifecycle's, in the order a reset takes them: a failback
    // cannot start between the check of the fence below and the record.
    let _fence = shared.lifecycle_lock.lock().await;
    let state = crate::migration::current(&shared, &source);
    if let crate::migration::Decision::Refuse(why) =
        crate::migration::decide(&source, state, &Step::Finalize, &[], false)
    {
        return Err(error(StatusCode::CONFLICT, why).into());
    }
    let stage = shared
        .ledger
        .sources
        .update_known(&source, |r| r.lifecycle.as_ref().map(|l| l.stage))
        .flatten();
    let refusal = match stage {
        None => Some("it has no cutover fence (was it reset?)"),
        Some(blockrep_store::LifecycleStage::FailingBack) => {
            Some("it is failing back: complete the failback first")
        }
        Some(_) => None,
    };
    if let Some(why) = refusal {
        return Err(error(
            StatusCode::CONFLICT,
            format!("source {source} cannot be finalized: {why}"),
        )
        .into());
    }
    let id = source.clone();
    let (snapshots, launches) = blocking(&shared, move |store| {
        let all = store.list_launches(Some(&id))?;
        // The launches kept (the cutover launch, standbys) hold the
        // source's disk from now on: what clients wrote to them goes into
        // the store, so their heads name it.
        for kept in all.iter().filter(|l| l.kind != LaunchKind::Test) {
            store.fold_launch(&kept.name, blockrep_core::clock::now_unix_ms())?;
        }
        let launches: Vec<String> = all
            .into_iter()
            .filter(|l| l.kind == LaunchKind::Test)
            .map(|l| l.name)
            .collect();
        let mut snapshots = 0;
        for snapshot in store.list_snapshots(Some(&id))? {
            match store.delete_snapshot(&id, &snapshot.name) {
                Ok(_) => snapshots += 1,
                Err(e) if e.kind() == blockrep_store::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok((snapshots, launches))
    })
    .await?;
    for launch in &launches {
        crate::drills::release(&shared, launch).await.map_err(|e| {
            ApiError::from(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot release launch {launch}: {e}"),
            ))
        })?;
    }
    let by = who(&shared, &headers);
    crate::migration::apply_locked(&shared, &serial, &source, Step::Finalize, &by, false)
        .await
        .map_err(refused)?;
    drop(serial);
    info!(source = %source, snapshots, launches = launches.len(), "source finalized");
    Ok(Json(json!({
        "source": source.as_str(),
        "migration_state": MigrationState::Finalized.as_str(),
        "snapshots_released": snapshots,
        "launches_released": launches,
    }))
    .into_response())
}

/// `POST /v1/sources/{source}/archive`.
pub(crate) async fn archive(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    operator_step(&shared, &source, &headers, Step::Archive, false).await
}

/// One transition, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: u64,
    pub unix_ms: u64,
    pub from: String,
    pub to: String,
    pub forced: bool,
    pub by: String,
    pub note: String,
}

impl From<&MigrationEvent> for EventView {
    fn from(e: &MigrationEvent) -> Self {
        Self {
            seq: e.seq,
            unix_ms: e.unix_ms,
            from: e.from.as_str().to_owned(),
            to: e.to.as_str().to_owned(),
            forced: e.forced,
            by: e.by.clone(),
            note: e.note.clone(),
        }
    }
}

/// `GET /v1/sources/{source}/history`: every recorded transition, oldest first.
pub(crate) async fn history(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
) -> Result<Response, ApiError> {
    let source = known(&shared, &source)?;
    // Of a source another server serves: as the bucket has it.
    crate::leases::refresh_elsewhere(&shared).await;
    let events = blocking(&shared, move |store| store.migration_history(&source)).await?;
    Ok(Json(events.iter().map(EventView::from).collect::<Vec<_>>()).into_response())
}

/// The workflow record of a launch about to be made from `body`.
pub(crate) fn launch_workflow(
    shared: &Shared,
    body: &CreateLaunch,
    kind: LaunchKind,
) -> Result<LaunchWorkflow, ApiError> {
    let ttl = match body.ttl_seconds {
        Some(seconds) => Some(
            Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ApiError::from(error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid ttl_seconds {seconds}: give a positive number"),
                    ))
                })?,
        ),
        None if kind == LaunchKind::Test => shared.config.test_launch_ttl,
        None => None,
    };
    if ttl.is_some() && kind == LaunchKind::Cutover {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "a cutover launch never expires: it is the migrated workload's disk",
        )
        .into());
    }
    if let Some(bad) = body.checks.iter().find(|name| !valid_check_name(name)) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("invalid check name {bad:?}: letters, digits and ._- only, at most 64 bytes"),
        )
        .into());
    }
    let mut names = body.checks.clone();
    names.sort();
    names.dedup();
    if names.len() != body.checks.len() {
        return Err(error(StatusCode::BAD_REQUEST, "a check is named twice").into());
    }
    if body.checks.len() > blockrep_store::LAUNCH_CHECKS_MAX {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "at most {} checks per launch",
                blockrep_store::LAUNCH_CHECKS_MAX
            ),
        )
        .into());
    }
    if body.follow && kind != LaunchKind::Standby {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "only a standby launch follows its source (kind standby)",
        )
        .into());
    }
    let ttl_ms = ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    Ok(LaunchWorkflow {
        expires_unix_ms: ttl_ms.map(|ms| now_unix_ms().saturating_add(ms)),
        must_succeed: body.must_succeed,
        expected_checks: body.checks.clone(),
        follow: body.follow,
        checks: Vec::new(),
        followed: None,
        following_to: None,
    })
}

/// `POST /v1/launches/{name}/checks`: a check's result. When every check of
/// a test launch has passed, the source moves to `ready_for_cutover`.
pub(crate) async fn record_check(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(report): Json<CheckView>,
) -> Result<Response, ApiError> {
    serve_for_launch(&shared, &name).await?;
    if !valid_check_name(&report.name) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid check name {:?}: letters, digits and ._- only, at most 64 bytes",
                report.name
            ),
        )
        .into());
    }
    let check = LaunchCheck {
        name: report.name,
        command: report.command,
        passed: report.passed,
        exit_code: report.exit_code,
        duration_ms: report.duration_ms,
        finished_unix_ms: now_unix_ms(),
        output_tail: report.output_tail,
    };
    let launch = name.clone();
    let recorded = check.clone();
    let (info, workflow) = blocking(&shared, move |store| {
        let Some(info) = store.launch(&launch)? else {
            return Ok(None);
        };
        let (name, passed) = (recorded.name.clone(), recorded.passed);
        let workflow = store.update_launch_workflow(&launch, |w| w.record(recorded))?;
        // A failed must-succeed check gates the source even once its launch
        // is gone; a pass of the same check answers it.
        let entry = blockrep_store::FailedCheck {
            launch: launch.clone(),
            launch_created_unix_ms: info.created_unix_ms,
            check: name,
        };
        let must_succeed = workflow.must_succeed;
        store.update_failed_checks(&info.source, |failed| {
            let known = failed.contains(&entry);
            if must_succeed && !passed && !known {
                failed.push(entry);
            } else if passed {
                failed.retain(|f| *f != entry);
            }
        })?;
        Ok(Some((info, workflow)))
    })
    .await?
    .ok_or_else(|| {
        ApiError::from(error(
            StatusCode::NOT_FOUND,
            format!("no launch named {name}"),
        ))
    })?;
    shared
        .workflow
        .checks_recorded
        .fetch_add(1, Ordering::Relaxed);
    if check.passed {
        info!(launch = %name, check = %check.name, duration_ms = check.duration_ms, "launch check passed");
    } else {
        shared
            .workflow
            .checks_failed
            .fetch_add(1, Ordering::Relaxed);
        warn!(launch = %name, check = %check.name, exit_code = ?check.exit_code,
              must_succeed = workflow.must_succeed, "launch check failed");
    }
    let awaited = workflow
        .expected_checks
        .iter()
        .all(|expected| workflow.checks.iter().any(|c| &c.name == expected));
    if info.kind == LaunchKind::Test && awaited && workflow.checks_passed() {
        // A test that passes answers earlier failures.
        crate::migration::clear_failed_checks(&shared, &info.source).await;
        let step = Step::ChecksPassed {
            launch: name.clone(),
        };
        if let Err(e) =
            crate::migration::apply(&shared, &info.source, step, &who(&shared, &headers), false)
                .await
        {
            warn!(launch = %name, error = %e, "cannot record the migration step");
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "launch": name,
            "check": CheckView::from(&check),
            "checks_passed": workflow.checks_passed(),
            "blocking": workflow.blocking_checks(),
            "migration_state": crate::migration::current(&shared, &info.source).as_str(),
        })),
    )
        .into_response())
}
