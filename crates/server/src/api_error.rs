//! The admin API's error answer: a status code and a JSON body
//! `{"error": "..."}`, the same from every handler and guard; and the
//! helpers handlers share to produce it.

use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use blockrep_core::SourceId;
use blockrep_store::{ErrorKind, Store};
use serde_json::json;

use crate::shared::Shared;

/// A JSON error body with a status code.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// An error answer: kept small (a boxed response) so `Result`s stay cheap.
pub(crate) struct ApiError(Box<Response>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<Response> for ApiError {
    fn from(response: Response) -> Self {
        ApiError(Box::new(response))
    }
}

pub(crate) fn store_error(e: &blockrep_store::Error) -> Response {
    let status = match e.kind() {
        ErrorKind::NotFound | ErrorKind::Missing => StatusCode::NOT_FOUND,
        // Leased: the source is served by another server of the bucket.
        ErrorKind::AlreadyExists | ErrorKind::Busy | ErrorKind::Leased => StatusCode::CONFLICT,
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

pub(crate) fn parse_source(text: &str) -> Result<SourceId, ApiError> {
    SourceId::new(text).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()).into())
}

/// Runs blocking store work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    work: impl FnOnce(&Arc<Store>) -> Result<T, blockrep_store::Error> + Send + 'static,
) -> Result<T, ApiError> {
    let store = Arc::clone(&shared.store);
    match tokio::task::spawn_blocking(move || work(&store)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(store_error(&e).into()),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into()),
    }
}
