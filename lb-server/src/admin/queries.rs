//! The read-only endpoints: readiness, metrics, services, clients, cluster.
//!
//! Each reads snapshots (the catalog's published lists and backend copies,
//! the session table) and holds no lock across an await.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::refusal::Refusal;
use super::views::{ClientView, ServiceDetail, ServiceSummary, XdsClientView};
use super::AdminState;

/// `GET /readyz`: 200 once every registry source has been listed. A
/// clustered replica without its etcd session stays ready (it serves the
/// lists its own probes back, DESIGN §8) and says it is degraded.
pub async fn readyz(State(s): State<AdminState>) -> Response {
    let degraded = s.cluster.as_ref().and_then(|c| c.degraded());
    if s.catalog.is_synced() {
        return match degraded {
            None => Json(json!({"ready": true})).into_response(),
            Some(d) => Json(json!({
                "ready": true,
                "degraded": true,
                "detail": d.detail(),
            }))
            .into_response(),
        };
    }
    let mut detail = format!(
        "registry {} has not been listed yet (waiting for: {})",
        s.registry,
        s.catalog.unsynced().join(", ")
    );
    if let Some(d) = &degraded {
        detail = format!("{detail}; {}", d.detail());
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"ready": false, "degraded": degraded.is_some(), "detail": detail})),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// `GET /api/v1/services`: every service, summarised.
pub async fn services(State(s): State<AdminState>) -> Json<Value> {
    let entries = s.catalog.services();
    let counts = s.sessions.stream_counts();
    let all: Vec<ServiceSummary> = entries
        .iter()
        .map(|e| ServiceSummary::of(e, counts.of(e.name())))
        .collect();
    Json(json!({ "services": all }))
}

/// `GET /api/v1/services/{name}`: one service in detail.
pub async fn service(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Response, Refusal> {
    let entry = s
        .catalog
        .service(&name)
        .ok_or_else(|| Refusal::unknown_service(&name))?;
    Ok(Json(ServiceDetail::of(&entry, &s)).into_response())
}

/// `GET /api/v1/services/{name}/history`: the service's samples and event
/// timeline; 404 for an unknown service, and for one past the history's
/// service cap (saying so).
pub async fn history(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Response, Refusal> {
    if s.catalog.service(&name).is_none() {
        return Err(Refusal::unknown_service(&name));
    }
    let view = s.history.view(&name).ok_or_else(|| {
        Refusal::new(
            axum::http::StatusCode::NOT_FOUND,
            "no_history",
            format!("{name:?} has no history yet (it is sampled every --history-interval; past --history-max-services, services have none)"),
        )
    })?;
    let (services, backends, events) = s.history.untracked();
    let mut json = serde_json::to_value(view).unwrap_or_default();
    json["untracked"] = serde_json::json!({
        "services": services,
        "backends": backends,
        "events_lost": events,
        "budget_bytes": s.history.budget_bytes(),
    });
    Ok(Json(json).into_response())
}

/// `GET /api/v1/clients`: connected BalanceLoad streams (`clients`) and
/// ADS streams (`xds_clients`).
pub async fn clients(State(s): State<AdminState>) -> Json<Value> {
    let all: Vec<ClientView> = s
        .sessions
        .list()
        .iter()
        .map(|c| c.as_ref().into())
        .collect();
    let xds: Vec<XdsClientView> = s
        .sessions
        .list_xds()
        .iter()
        .map(|c| c.as_ref().into())
        .collect();
    Json(json!({ "clients": all, "xds_clients": xds }))
}

/// `GET /api/v1/cluster`: this replica's view of the cluster.
pub async fn cluster(State(s): State<AdminState>) -> Json<Value> {
    match &s.cluster {
        Some(c) => Json(json!({
            "clustered": true,
            "view": c.view(),
            "degraded": c.degraded(),
        })),
        None => Json(json!({ "clustered": false })),
    }
}
