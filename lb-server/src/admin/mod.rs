//! Admin HTTP endpoint (axum): what the LB knows, in the forms operators use.
//!
//! | method and path | answer |
//! | --- | --- |
//! | `GET /` | the dashboard page (static, polls the JSON API) |
//! | `GET /healthz` | process up |
//! | `GET /readyz` | registry listed at least once (503 with why otherwise); `degraded` and why while a clustered replica has no etcd session |
//! | `GET /metrics` | Prometheus text |
//! | `GET /api/v1/services` | every service, summarised |
//! | `GET /api/v1/services/{name}` | one service: backends, health, load, weights, reasons |
//! | `GET /api/v1/services/{name}/history` | its last hour: samples and the event timeline |
//! | `GET /api/v1/clients` | connected BalanceLoad streams |
//! | `POST /api/v1/services/{name}/backends/{addr}/drain` | take out of lists, keep registered |
//! | `POST /api/v1/services/{name}/backends/{addr}/undrain` | put back |
//! | `PUT /api/v1/services/{name}/backends/{addr}/weight` | `{"weight": n, "ttl_seconds": s}` override |
//! | `DELETE /api/v1/services/{name}/backends/{addr}/weight` | clear the override |
//!
//! Mutations need `Authorization: Bearer <token>` (compared in constant
//! time); without a configured token they are disabled (403). Every
//! mutation is logged. Errors are JSON `{"error": …, "detail": …}`.
//!
//! | module | job |
//! | --- | --- |
//! | [`queries`] | the read-only endpoints |
//! | [`mutations`] | drain, undrain, weight overrides, behind one token layer |
//! | [`views`] | the JSON answers, as types |
//! | [`refusal`] | refused requests: one type, answered as JSON, counted in one layer |
//! | [`serve`] | HTTP/1.1 and HTTP/2 serving, guarded, with or without TLS |
//!
//! Handlers read snapshots of the catalog and session table; no lock is held
//! across an await, so the admin port can never slow down BalanceLoad.

mod mutations;
mod queries;
mod refusal;
pub mod serve;
mod views;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::{get, post, put};
use axum::Router;

use crate::catalog::Catalog;
use crate::metrics::Metrics;
use crate::streams::sessions::Sessions;
use refusal::Refusal;

/// The dashboard page, served as is (no build step).
const DASHBOARD: &str = include_str!("../../assets/dashboard.html");

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// Connected streams.
    pub sessions: Arc<Sessions>,
    /// Per-client subsets.
    pub subsets: Arc<crate::streams::subsets::Subsets>,
    /// Per-client-zone lists.
    pub zones: Arc<crate::zones::Zones>,
    /// The last hour of samples and events.
    pub history: Arc<crate::history::History>,
    /// Cluster membership, when replicas share health checks.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The `--registry` value, shown in readiness answers.
    pub registry: String,
    /// Bearer token required by mutations; `None` disables them.
    pub token: Option<Arc<str>>,
}

/// The admin router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`
/// so that mutations can log who made them.
pub fn router(state: AdminState) -> Router {
    let mutations = Router::new()
        .route(
            "/api/v1/services/{name}/backends/{addr}/drain",
            post(mutations::drain),
        )
        .route(
            "/api/v1/services/{name}/backends/{addr}/undrain",
            post(mutations::undrain),
        )
        .route(
            "/api/v1/services/{name}/backends/{addr}/weight",
            put(mutations::set_weight).delete(mutations::clear_weight),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            mutations::require_token,
        ));
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(queries::readyz))
        .route("/metrics", get(queries::metrics))
        .route("/api/v1/services", get(queries::services))
        .route("/api/v1/services/{name}", get(queries::service))
        .route("/api/v1/services/{name}/history", get(queries::history))
        .route("/api/v1/clients", get(queries::clients))
        .route("/api/v1/cluster", get(queries::cluster))
        .merge(mutations)
        .fallback(|| async { Refusal::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            refusal::count,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Largest request body accepted (weight overrides are a few bytes).
pub const MAX_BODY: usize = 64 * 1024;
