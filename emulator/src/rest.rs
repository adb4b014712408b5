//! The service REST API used by the official server SDKs.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;

use crate::hub::Server;

/// The `/api` routes.
pub(crate) fn router(_server: &Arc<Server>) -> Router<Arc<Server>> {
    Router::new()
}

/// Any unknown route: 404 with a JSON error.
pub(crate) async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"code": "NotFound", "message": format!("No route for {}", uri.path())})),
    )
        .into_response()
}
