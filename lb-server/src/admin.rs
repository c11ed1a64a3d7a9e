//! Admin HTTP endpoint (axum): health, readiness, Prometheus metrics and a
//! read-only JSON view of services, backends and connected clients.
//!
//! Handlers read snapshots of the catalog and session table; no lock is held
//! across an await, so the admin port can never slow down BalanceLoad.
//! Errors are JSON `{"error": …, "detail": …}` with a 4xx status.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::catalog::{Catalog, ServiceEntry};
use crate::metrics::Metrics;
use crate::sessions::Sessions;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// Connected streams.
    pub sessions: Arc<Sessions>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The `--registry` value, shown in readiness answers.
    pub registry: String,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}", get(service))
        .route("/api/v1/clients", get(clients))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(state)
}

/// A JSON error answer.
pub fn error(status: StatusCode, error: &str, detail: &str) -> Response {
    (status, Json(json!({ "error": error, "detail": detail }))).into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.catalog.is_synced() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        let detail = format!("registry {} has not been listed yet", s.registry);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "detail": detail})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

fn service_json(entry: &ServiceEntry, sessions: &Sessions, detail: bool) -> Value {
    let list = entry.current_list();
    let backends = entry.backends();
    let mut v = json!({
        "name": entry.name(),
        "backends": backends.len(),
        "listed": list.servers.len(),
        "list_version": list.version,
        "clients": sessions.count_for(entry.name()),
    });
    if detail {
        let total = list.servers.len().max(1) as f64;
        v["panic"] = json!(list.panic);
        v["shed_fraction"] = json!(list.shed_fraction);
        v["backends"] = backends
            .iter()
            .map(|b| {
                let entries = list
                    .servers
                    .iter()
                    .filter(|s| s.load_balance_token == b.token)
                    .count();
                let mut row = serde_json::to_value(b).unwrap_or_default();
                row["address"] = json!(b.addr.to_string());
                row["list_entries"] = json!(entries);
                row["list_share"] = json!(entries as f64 / total);
                row
            })
            .collect();
        v["calls"] = json!({
            "started": entry.calls.started.load(Ordering::Relaxed),
            "finished": entry.calls.finished.load(Ordering::Relaxed),
            "failed_to_send": entry.calls.failed_to_send.load(Ordering::Relaxed),
            "known_received": entry.calls.known_received.load(Ordering::Relaxed),
            "dropped": entry.calls.dropped.load(Ordering::Relaxed),
            "dropped_by_token": *entry.calls.dropped_by_token.lock().expect("drops lock"),
        });
    }
    v
}

async fn services(State(s): State<AdminState>) -> Json<Value> {
    let all: Vec<Value> = s
        .catalog
        .services()
        .iter()
        .map(|e| service_json(e, &s.sessions, false))
        .collect();
    Json(json!({ "services": all }))
}

async fn service(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match s.catalog.service(&name) {
        Some(e) => Json(service_json(&e, &s.sessions, true)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "unknown_service",
            &format!("no service named {name:?}"),
        ),
    }
}

async fn clients(State(s): State<AdminState>) -> Json<Value> {
    let all: Vec<Value> = s
        .sessions
        .list()
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "peer": c.peer.map(|p| p.to_string()),
                "name": c.name,
                "service": c.service,
                "since": humantime::format_rfc3339_millis(c.since).to_string(),
                "lists_sent": c.lists_sent.load(Ordering::Relaxed),
                "list_version": c.list_version.load(Ordering::Relaxed),
                "last_stats": c.last_stats.lock().expect("stats lock").clone(),
            })
        })
        .collect();
    Json(json!({ "clients": all }))
}
