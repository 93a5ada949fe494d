//! Background garbage collection, and the admin endpoint that runs it on demand.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use blockrep_store::{GcOptions, GcReport};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::shared::Shared;

/// Runs GC every `gc_interval` (the task is aborted when the server stops).
pub(crate) async fn run_gc(shared: Arc<Shared>) {
    let Some(every) = shared.config.gc_interval else {
        return;
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; wait a whole interval
    loop {
        ticker.tick().await;
        if let Err(e) = collect(&shared, GcOptions::default()).await {
            warn!(error = %e, "garbage collection failed");
        }
    }
}

/// One collection on the blocking pool; counted and logged.
async fn collect(shared: &Arc<Shared>, options: GcOptions) -> Result<GcReport, String> {
    let collecting = Arc::clone(shared);
    let report = tokio::task::spawn_blocking(move || crate::leases::collect(&collecting, &options))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if !options.dry_run {
        shared.ledger.gc_ran();
    }
    info!(
        dry_run = report.dry_run,
        packs_compacted = report.packs_compacted,
        bytes_freed = report.bytes_freed,
        bytes_live = report.bytes_live,
        bytes_dead = report.bytes_dead,
        "garbage collection"
    );
    Ok(report)
}

/// The report as JSON.
pub fn report_json(report: &GcReport) -> serde_json::Value {
    json!({
        "dry_run": report.dry_run,
        "roots_marked": report.roots_marked,
        "packs_total": report.packs_total,
        "blobs_live": report.blobs_live,
        "blobs_dead": report.blobs_dead,
        "bytes_live": report.bytes_live,
        "bytes_dead": report.bytes_dead,
        "packs_compacted": report.packs_compacted,
        "blobs_copied": report.blobs_copied,
        "bytes_copied": report.bytes_copied,
        "blobs_removed": report.blobs_removed,
        "bytes_freed": report.bytes_freed,
        "packs_kept_damaged": report.packs_kept_damaged,
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct GcQuery {
    dry_run: Option<bool>,
}

/// `POST /v1/gc[?dry_run=true]`: collects now and answers with the report.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<GcQuery>,
) -> Response {
    let options = GcOptions {
        dry_run: query.dry_run.unwrap_or(false),
        ..GcOptions::default()
    };
    match collect(&shared, options).await {
        Ok(report) => Json(report_json(&report)).into_response(),
        Err(e) => crate::api_error::error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
