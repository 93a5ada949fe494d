//! The admin HTTP API: JSON under `/v1/`, `/health`. Listens on its own address,
//! by default 127.0.0.1 only.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::listener::Shared;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/sources", get(list_sources))
        .route("/v1/sources/{source}", get(get_source))
        .fallback(not_found)
        .with_state(shared)
}

/// A JSON error body with a status code.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn health() -> Response {
    Json(json!({ "status": "ok", "availability": 1 })).into_response()
}

async fn list_sources(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.sources.views(shared.thresholds())).into_response()
}

async fn get_source(State(shared): State<Arc<Shared>>, Path(source): Path<String>) -> Response {
    shared
        .sources
        .views(shared.thresholds())
        .into_iter()
        .find(|view| view.source == source)
        .map_or_else(
            || error(StatusCode::NOT_FOUND, format!("no source {source:?}")),
            |view| Json(view).into_response(),
        )
}
