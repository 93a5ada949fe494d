//! The admin HTTP API: JSON under `/v1/`, `/health`, `/metrics`. Listens on its
//! own address, by default 127.0.0.1 only.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use blockrep_core::clock::now_unix_ms;
use blockrep_core::{Consistency, SourceId};
use blockrep_store::{ErrorKind, LaunchKind};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::api_error::{ApiError, blocking, error, parse_source, store_error};
use crate::shared::Shared;
use crate::views::{CreateLaunch, CreateSnapshot, LaunchView, SnapshotView};

/// The admin routes behind the admin guard (Host, Origin, identity, JSON).
pub(crate) fn router(shared: Arc<Shared>, guard: Arc<crate::admin_guard::AdminGuard>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(crate::metrics::handler))
        .route("/v1/sources", get(list_sources))
        .route("/v1/sources/{source}", get(get_source))
        .route("/v1/sources/{source}/cutover", post(request_cutover))
        .route("/v1/sources/{source}/reset", post(reset_source))
        .route(
            "/v1/sources/{source}/mark-ready",
            post(crate::workflow_api::mark_ready),
        )
        .route(
            "/v1/sources/{source}/finalize",
            post(crate::workflow_api::finalize),
        )
        .route(
            "/v1/sources/{source}/archive",
            post(crate::workflow_api::archive),
        )
        .route(
            "/v1/sources/{source}/history",
            get(crate::workflow_api::history),
        )
        .route(
            "/v1/launches/{name}/checks",
            post(crate::workflow_api::record_check),
        )
        .route(
            "/v1/sources/{source}/failback/complete",
            post(complete_failback),
        )
        .route(
            "/v1/sources/{source}/rpo-target",
            put(crate::alerts::set_rpo_target).delete(crate::alerts::clear_rpo_target),
        )
        .route("/v1/gc", post(crate::maintenance::handler))
        .route("/v1/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/v1/snapshots/{source}/{name}", delete(delete_snapshot))
        .route("/v1/launches", get(list_launches).post(create_launch))
        .route("/v1/launches/{name}", delete(delete_launch))
        .route("/v1/launches/{name}/fold", post(fold_launch))
        .route("/v1/launches/{name}/materialize", post(materialize))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            (Arc::clone(&shared), guard),
            crate::admin_guard::guard,
        ))
        .with_state(shared)
}

/// `GET /health`.
async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let report = shared
        .health
        .check(&shared.config.data_dir, &shared.store)
        .await;
    let status = if report.available() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = report.to_json();
    body["backend"] = crate::health::backend_json(&shared.store);
    (status, Json(body)).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

#[derive(Debug, Deserialize)]
struct SourceListing {
    /// Also archived sources (hidden by default).
    #[serde(default)]
    all: bool,
}

async fn list_sources(
    State(shared): State<Arc<Shared>>,
    Query(listing): Query<SourceListing>,
) -> Response {
    crate::leases::refresh_elsewhere(&shared).await;
    let mut views = source_views(&shared);
    if !listing.all {
        views.retain(|view| view.migration_recorded != "archived");
    }
    Json(views).into_response()
}

/// Every source's view, with the leases this server holds.
pub(crate) fn source_views(shared: &Shared) -> Vec<crate::SourceView> {
    let mut views = shared.ledger.sources.views(shared.thresholds());
    // This server's own leases first (current), then the bucket's as last read.
    let mut leases = shared.store.leases();
    leases.extend(
        shared
            .bucket_leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .cloned(),
    );
    let elsewhere = shared.served_elsewhere(now_unix_ms());
    for view in &mut views {
        if SourceId::new(&view.source).is_ok_and(|source| elsewhere.contains(&source)) {
            // Its figures here are as this server last saw them.
            view.state = crate::status::SourceState::ServedElsewhere;
            view.lag_seconds = None;
            view.migration_state = view.migration_recorded.clone();
        }
        if let (Some(keys), Ok(source)) = (&shared.keys, SourceId::new(&view.source))
            && let Some(sealer) = shared.store.sealer_of(&source)
        {
            view.encryption = Some(crate::status::EncryptionView {
                key: sealer.reference().to_string(),
                kek_id: keys.kek_id().to_owned(),
            });
        }
        view.lease = leases
            .iter()
            .find(|(source, _)| source.as_str() == view.source)
            .map(|(_, lease)| crate::status::LeaseView {
                holder: lease.holder.clone(),
                expires_unix_ms: lease.expires_unix_ms,
                generation: lease.generation,
            });
    }
    views
}

async fn get_source(State(shared): State<Arc<Shared>>, Path(source): Path<String>) -> Response {
    crate::leases::refresh_elsewhere(&shared).await;
    source_views(&shared)
        .into_iter()
        .find(|view| view.source == source)
        .map_or_else(
            || error(StatusCode::NOT_FOUND, format!("no source {source:?}")),
            |view| Json(view).into_response(),
        )
}

/// Asks the source's agent to cut over at its next commit: a step of the
/// migration workflow (gated on a passed test unless `force`).
async fn request_cutover(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let source = parse_source(&source)?;
    let force = crate::workflow_api::force_of(&body)?;
    let known = blocking(&shared, {
        let source = source.clone();
        move |store| store.head(&source)
    })
    .await?
    .is_some();
    if !known {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("source {source} has no replica to cut over"),
        )
        .into());
    }
    // Its lifecycle as the bucket has it, if it is in one.
    crate::workflow_api::serve_for_step(&shared, &source).await?;
    let fenced = shared
        .ledger
        .sources
        .update_known(&source, |r| r.lifecycle.is_some());
    let Some(fenced) = fenced else {
        return Err(error(StatusCode::NOT_FOUND, format!("no source {source}")).into());
    };
    if fenced {
        return Err(error(
            StatusCode::CONFLICT,
            format!("source {source} is already cut over"),
        )
        .into());
    }
    let by = crate::workflow_api::who(&shared, &headers);
    crate::workflow_api::step(
        &shared,
        &source,
        crate::migration::Step::CutoverRequested,
        &by,
        force,
    )
    .await?;
    shared.ledger.sources.update_known(&source, |r| {
        if r.lifecycle.is_none() {
            r.cutover_requested = true;
        }
    });
    info!(source = %source, "cutover requested; the agent runs it at its next commit");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "source": source.as_str(), "cutover_requested": true })),
    )
        .into_response())
}

/// Lifts the fence of a cut-over source: replication may start again.
async fn reset_source(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let source = crate::workflow_api::known(&shared, &source)?;
    crate::workflow_api::serve_for_step(&shared, &source).await?;
    // Under the workflow's lock: a finalize cannot slip in between.
    let serial = shared.migration_lock.lock().await;
    // Decided before the fence is touched (a finalized source's replication
    // is released for good); recorded after it is lifted.
    let state = crate::migration::current(&shared, &source);
    let step = crate::migration::Step::Reset;
    if let crate::migration::Decision::Refuse(why) =
        crate::migration::decide(&source, state, &step, &[], false)
    {
        return Err(error(StatusCode::CONFLICT, why).into());
    }
    // Serialized with the lifecycle writes of sessions (cutover, failback).
    match crate::lifecycle::reset(&shared, &source).await {
        Ok(crate::lifecycle::Reset::Done) => {}
        Ok(crate::lifecycle::Reset::UnknownSource) => {
            return Err(error(StatusCode::NOT_FOUND, format!("no source {source}")).into());
        }
        Err(crate::lifecycle::ResetFailed::Store(e)) => return Err(store_error(&e).into()),
        Err(crate::lifecycle::ResetFailed::Task(e)) => {
            return Err(error(StatusCode::INTERNAL_SERVER_ERROR, e).into());
        }
    }
    let by = crate::workflow_api::who(&shared, &headers);
    crate::migration::apply_locked(&shared, &serial, &source, step, &by, false)
        .await
        .map_err(crate::workflow_api::refused)?;
    drop(serial);
    info!(source = %source, "source reset: replication allowed again");
    Ok(Json(json!({ "source": source.as_str(), "reset": true })).into_response())
}

/// Asks a running failback to finish: its agent makes a final pass.
async fn complete_failback(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
) -> Result<Response, ApiError> {
    let source = parse_source(&source)?;
    // The failback's session is on the server that serves the source.
    crate::workflow_api::serve_if_known(&shared, &source).await?;
    // `update_known`: asking about a source never seen must not create it.
    let failing_back = shared.ledger.sources.update_known(&source, |r| {
        let active = r
            .lifecycle
            .as_ref()
            .is_some_and(|l| l.stage == blockrep_store::LifecycleStage::FailingBack);
        if active {
            r.failback_finalize_requested = true;
        }
        active
    });
    let Some(failing_back) = failing_back else {
        return Err(error(StatusCode::NOT_FOUND, format!("no source {source}")).into());
    };
    if !failing_back {
        return Err(error(
            StatusCode::CONFLICT,
            format!("source {source} is not failing back"),
        )
        .into());
    }
    info!(source = %source, "failback completion requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "source": source.as_str(), "finalize_requested": true })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct SourceFilter {
    source: Option<String>,
}

async fn list_snapshots(
    State(shared): State<Arc<Shared>>,
    Query(filter): Query<SourceFilter>,
) -> Result<Response, ApiError> {
    let source = filter.source.as_deref().map(parse_source).transpose()?;
    let list = blocking(&shared, move |store| {
        // Sources another server of the bucket serves: their snapshots as
        // the bucket holds them, not as this server last read them. A bucket
        // that does not answer leaves the copy here (nothing can be changed
        // through it meanwhile: a change takes the source's lease).
        if let Err(e) = store.refresh_snapshots(source.as_ref(), now_unix_ms()) {
            warn!(error = %e, "snapshots listed as last read: cannot read the bucket's");
        }
        store.list_snapshots(source.as_ref())
    })
    .await?;
    Ok(Json(list.iter().map(SnapshotView::from).collect::<Vec<_>>()).into_response())
}

async fn create_snapshot(
    State(shared): State<Arc<Shared>>,
    Json(body): Json<CreateSnapshot>,
) -> Result<Response, ApiError> {
    let ttl = match body.ttl_seconds {
        None => None,
        Some(seconds) => Some(Duration::try_from_secs_f64(seconds).map_err(|_| {
            ApiError::from(error(
                StatusCode::BAD_REQUEST,
                format!("invalid ttl_seconds {seconds}"),
            ))
        })?),
    };
    let name = body.name.clone();
    let snapshot = match body.launch.clone() {
        Some(launch) => {
            // The source may be left out: the launch's.
            let source = (!body.source.is_empty())
                .then(|| parse_source(&body.source))
                .transpose()?;
            // As every other change to a launch: in a bucket, made by the
            // server that serves its source (409 naming it here), before
            // the launch is opened and folded.
            crate::workflow_api::serve_for_launch(&shared, &launch).await?;
            blocking(&shared, move |store| {
                store.snapshot_launch(
                    &launch,
                    source.as_ref(),
                    name.as_deref(),
                    ttl,
                    now_unix_ms(),
                )
            })
            .await?
        }
        None => {
            let source = parse_source(&body.source)?;
            // In a bucket, only the server serving the source snapshots its
            // head: taking the lease reads the head as the bucket has it, where
            // this server's copy may be old.
            let lease = shared
                .config
                .bucket
                .as_ref()
                .map(|b| (b.holder.clone(), b.lease_ttl.as_millis() as u64));
            blocking(&shared, move |store| {
                if let Some((holder, ttl_ms)) = &lease {
                    store.claim_source(&source, holder, *ttl_ms, now_unix_ms())?;
                }
                store.create_snapshot(&source, name.as_deref(), ttl, now_unix_ms())
            })
            .await?
        }
    };
    info!(source = %snapshot.source, snapshot = %snapshot.name, epoch = snapshot.epoch, root = %snapshot.root, "snapshot created");
    Ok((StatusCode::CREATED, Json(SnapshotView::from(&snapshot))).into_response())
}

async fn delete_snapshot(
    State(shared): State<Arc<Shared>>,
    Path((source, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let source = parse_source(&source)?;
    // Like its creation, by the server that serves the source.
    crate::workflow_api::serve_if_known(&shared, &source).await?;
    let snapshot = blocking(&shared, move |store| store.delete_snapshot(&source, &name)).await?;
    info!(source = %snapshot.source, snapshot = %snapshot.name, "snapshot deleted");
    Ok(Json(SnapshotView::from(&snapshot)).into_response())
}

async fn list_launches(
    State(shared): State<Arc<Shared>>,
    Query(filter): Query<SourceFilter>,
) -> Result<Response, ApiError> {
    let source = filter.source.as_deref().map(parse_source).transpose()?;
    let nbd = shared.nbd_addr();
    let (list, overlaid, materializing) = blocking(&shared, move |store| {
        // Launches of sources another server of the bucket serves: as the
        // bucket holds them (or as last read, as for snapshots).
        if let Err(e) = store.refresh_launches(now_unix_ms()) {
            warn!(error = %e, "launches listed as last read: cannot read the bucket's");
        }
        // Launches a client wrote to since their last fold.
        let overlaid: std::collections::HashSet<String> = store
            .launches_with_overlays()?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let materializing = store.launch_materializations()?;
        let list = store
            .list_launches(source.as_ref())?
            .into_iter()
            .filter_map(|l| match store.launch_workflow(&l.name) {
                Ok(workflow) => Some(Ok((store.launch_volumes(&l), workflow, l))),
                // Deleted since the listing (an expired drill).
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => Some(Err(e)),
            })
            .map(|found| found.and_then(|(volumes, workflow, l)| Ok((volumes?, workflow, l))))
            .collect::<Result<Vec<_>, blockrep_store::Error>>()?;
        Ok((list, overlaid, materializing))
    })
    .await?;
    Ok(Json(
        list.iter()
            .map(|(volumes, workflow, l)| {
                let mut view =
                    LaunchView::new(l, volumes, workflow, nbd, overlaid.contains(&l.name));
                view.materialize = materializing
                    .iter()
                    .filter(|m| m.launch == l.name)
                    .map(Into::into)
                    .collect();
                view
            })
            .collect::<Vec<_>>(),
    )
    .into_response())
}

async fn create_launch(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    Json(body): Json<CreateLaunch>,
) -> Result<Response, ApiError> {
    let source = parse_source(&body.source)?;
    let kind = match body.kind.as_deref() {
        None | Some("test") => LaunchKind::Test,
        Some("cutover") => LaunchKind::Cutover,
        Some("standby") => LaunchKind::Standby,
        Some(other) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("unknown launch kind {other:?}: use test, cutover or standby"),
            )
            .into());
        }
    };
    let workflow = crate::workflow_api::launch_workflow(&shared, &body, kind)?;
    // In a bucket, the server that serves the source makes its launches: it
    // serves them over NBD and records the workflow's step.
    crate::workflow_api::serve_if_known(&shared, &source).await?;
    let nbd = shared.nbd_addr();
    let (snapshot, name) = (body.snapshot.clone(), body.name.clone());
    let allow_live = body.allow_live;
    let made = workflow.clone();
    let (launch, volumes) = blocking(&shared, move |store| {
        let created =
            crate::launch_gate::create(store, &source, &snapshot, &name, kind, allow_live, &made)?;
        Ok(match created {
            Ok(launch) => Ok((store.launch_volumes(&launch)?, launch)),
            Err(why) => Err(why),
        })
    })
    .await?
    .map(|(volumes, launch)| (launch, volumes))
    .map_err(|why| ApiError::from(error(StatusCode::CONFLICT, why)))?;
    if workflow.follow {
        shared.followed.insert(launch.source.clone());
    }
    if kind == LaunchKind::Test {
        let by = crate::workflow_api::who(&shared, &headers);
        let step = crate::migration::Step::TestLaunched {
            launch: launch.name.clone(),
        };
        if let Err(e) = crate::migration::apply(&shared, &launch.source, step, &by, false).await {
            warn!(launch = %launch.name, error = %e, "cannot record the migration step");
        }
    }
    info!(source = %launch.source, launch = %launch.name, snapshot = %launch.snapshot,
        consistency = %launch.consistency, "launch created");
    if launch.consistency == Consistency::Live {
        warn!(launch = %launch.name, "launch made from a live snapshot (allow_live): its file system may be torn");
    }
    Ok((
        StatusCode::CREATED,
        Json(LaunchView::new(&launch, &volumes, &workflow, nbd, false)),
    )
        .into_response())
}

/// `POST /v1/launches/NAME/fold`: what clients wrote goes into the store
/// and the launch's head.
async fn fold_launch(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    crate::workflow_api::serve_for_launch(&shared, &name).await?;
    let target = name.clone();
    let info = blocking(&shared, move |store| {
        store.fold_launch(&target, now_unix_ms())
    })
    .await?;
    info!(launch = %name, generation = info.generation, "launch folded");
    Ok(Json(json!({
        "launch": name,
        "generation": info.generation,
        "root": info.root.to_string(),
    }))
    .into_response())
}

async fn delete_launch(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    crate::workflow_api::serve_for_launch(&shared, &name).await?;
    let target = name.clone();
    // A copier holds its volume open.
    shared.copiers.stop(&name).await;
    blocking(&shared, move |store| store.delete_launch(&target)).await?;
    info!(launch = %name, "launch deleted");
    Ok(Json(json!({ "deleted": name })).into_response())
}

/// The body of `POST /v1/launches/NAME/materialize`.
#[derive(Debug, Deserialize)]
struct MaterializeBody {
    /// An absolute path on the server: a new file, or a block device at
    /// least the volume's size.
    to: String,
    /// The volume of a machine's launch (none: its only volume).
    #[serde(default)]
    volume: Option<String>,
}

/// `POST /v1/launches/NAME/materialize`: starts copying the volume to the
/// target (asking again for the same target reports its progress).
async fn materialize(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(body): Json<MaterializeBody>,
) -> Result<Response, ApiError> {
    crate::workflow_api::serve_for_launch(&shared, &name).await?;
    let dir = match &shared.config.launch_materialize_dir {
        Some(dir) => dir.clone(),
        None => shared.config.data_dir.join("materialized"),
    };
    let target = crate::materializing::confine(&dir, &body.to)
        .map_err(|why| ApiError::from(error(StatusCode::BAD_REQUEST, why)))?;
    let (launch, asked) = (name.clone(), body.volume.clone());
    let (volume, progress) = blocking(&shared, move |store| {
        store.materialize_launch(
            &launch,
            asked.as_deref(),
            &target,
            blockrep_core::clock::now_unix_ms(),
        )
    })
    .await?;
    let volume_name = volume.volume_name().map(str::to_owned);
    if !progress.done {
        shared.copiers.start(
            &shared.closers,
            shared.config.launch_materialize_rate,
            &name,
            volume_name.as_deref(),
            volume,
        );
    }
    info!(launch = %name, volume = ?volume_name, target = %body.to,
        copied_bytes = progress.copied_bytes, "launch materialization started");
    let view = crate::views::MaterializeView::from(&blockrep_store::Materialization {
        launch: name,
        volume: volume_name,
        progress,
    });
    Ok(Json(view).into_response())
}
