//! Refused admin requests: one type, answered as JSON, counted in one place.
//!
//! A handler or layer that refuses returns a [`Refusal`]; its
//! [`IntoResponse`] writes `{"error": reason, "detail": …}` with the status
//! and tags the response with the reason. The [`count`] layer, which every
//! request passes through, counts tagged responses by reason and turns the
//! plain-text refusals axum writes itself (a path that is not UTF-8 once
//! decoded, a body over the limit, …) into refusals too, so that every error
//! an operator sees has the same shape.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AdminState;
use crate::metrics::ReasonLabels;

/// A refused admin request: status, machine-readable reason, detail.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    reason: &'static str,
    detail: String,
}

/// The reason a response carries when it is a refusal (a response extension).
#[derive(Clone, Copy)]
struct Refused(&'static str);

impl Refusal {
    /// A refusal with `status`, `reason` (stable, for scripts) and `detail`
    /// (for people).
    pub fn new(status: StatusCode, reason: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            detail: detail.into(),
        }
    }

    /// No service of that name.
    pub fn unknown_service(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_service",
            format!("no service named {name:?}"),
        )
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.reason, "detail": self.detail });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(Refused(self.reason));
        response
    }
}

/// The layer around every route: counts refusals by reason, and turns
/// axum's own plain-text refusals into JSON ones.
pub async fn count(
    State(s): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    if response.extensions().get::<Refused>().is_none() {
        let reason = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            s if s.is_server_error() => "internal",
            _ => "bad_request",
        };
        let text = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap_or_default();
        response = Refusal::new(status, reason, String::from_utf8_lossy(&text)).into_response();
    }
    if let Some(Refused(reason)) = response.extensions().get::<Refused>() {
        s.metrics
            .admin_errors
            .get_or_create(&ReasonLabels {
                reason: (*reason).into(),
            })
            .inc();
    }
    response
}
