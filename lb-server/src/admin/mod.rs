//! Admin HTTP endpoint (axum): what the LB knows, in the forms operators use.
//!
//! | method and path | answer |
//! | --- | --- |
//! | `GET /` | the dashboard page (static, polls the JSON API) |
//! | `GET /healthz` | process up |
//! | `GET /readyz` | registry listed at least once (503 with why otherwise) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /api/v1/services` | every service, summarised |
//! | `GET /api/v1/services/{name}` | one service: backends, health, load, weights, reasons |
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
//! Handlers read snapshots of the catalog and session table; no lock is held
//! across an await, so the admin port can never slow down BalanceLoad.

pub mod serve;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::catalog::{Catalog, ServiceEntry};
use crate::metrics::{Metrics, ReasonLabels};
use crate::model::HealthState;
use crate::streams::sessions::Sessions;

/// The dashboard page, served as is (no build step).
const DASHBOARD: &str = include_str!("../../assets/dashboard.html");

/// Longest weight override accepted.
const MAX_OVERRIDE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// Connected streams.
    pub sessions: Arc<Sessions>,
    /// Per-client subsets.
    pub subsets: Arc<crate::streams::subsets::Subsets>,
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
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}", get(service))
        .route("/api/v1/clients", get(clients))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/services/{name}/backends/{addr}/drain", post(drain))
        .route(
            "/api/v1/services/{name}/backends/{addr}/undrain",
            post(undrain),
        )
        .route(
            "/api/v1/services/{name}/backends/{addr}/weight",
            put(set_weight).delete(clear_weight),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            json_errors,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Largest request body accepted (weight overrides are a few bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// Turns the refusals axum writes itself in plain text (a path that is not
/// valid percent-encoded UTF-8, a body over the limit, …) into the JSON
/// errors every other refusal uses, and counts them.
async fn json_errors(
    State(s): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    let reason = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    refuse(&s, status, reason, &String::from_utf8_lossy(&text))
}

/// A JSON error answer.
pub fn error(status: StatusCode, error: &str, detail: &str) -> Response {
    (status, Json(json!({ "error": error, "detail": detail }))).into_response()
}

/// A refused request: counted, then answered with a JSON error.
fn refuse(s: &AdminState, status: StatusCode, reason: &str, detail: &str) -> Response {
    s.metrics
        .admin_errors
        .get_or_create(&ReasonLabels {
            reason: reason.into(),
        })
        .inc();
    let mut response = error(status, reason, detail);
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.catalog.is_synced() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        let waiting = s.catalog.unsynced();
        let detail = format!(
            "registry {} has not been listed yet (waiting for: {})",
            s.registry,
            waiting.join(", ")
        );
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

fn service_json(entry: &ServiceEntry, s: &AdminState, detail: bool) -> Value {
    let sessions = &s.sessions;
    let list = entry.current_list();
    let backends = entry.backends();
    let mut v = json!({
        "name": entry.name(),
        "backends": backends.len(),
        "healthy": backends
            .iter()
            .filter(|b| matches!(b.health, HealthState::Serving | HealthState::Unchecked))
            .count(),
        "listed": backends.iter().filter(|b| b.decision.listed).count(),
        "list_version": list.version,
        "panic": list.panic,
        "conflict": entry.conflict(),
        "clients": sessions.count_for(entry.name()),
    });
    if detail {
        let total = list.servers.len().max(1) as f64;
        v["shed_fraction"] = json!(list.shed_fraction);
        v["subset_size"] = json!(s.subsets.size());
        let subset_counts = s.subsets.counts(entry.name());
        let view = s.cluster.as_ref().map(|c| c.view());
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
                if s.subsets.enabled() {
                    row["subset_clients"] = json!(subset_counts.get(&b.addr).copied().unwrap_or(0));
                }
                if let Some(view) = &view {
                    row["checked_by"] =
                        json!(view.owner(entry.name(), b.addr).unwrap_or(&view.replica_id));
                }
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
        .map(|e| service_json(e, &s, false))
        .collect();
    Json(json!({ "services": all }))
}

async fn service(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match s.catalog.service(&name) {
        Some(e) => Json(service_json(&e, &s, true)).into_response(),
        None => refuse(
            &s,
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
                "client_id": c.client_id,
                "subset": c.subset.lock().expect("subset lock").clone(),
            })
        })
        .collect();
    Json(json!({ "clients": all }))
}

/// `/api/v1/cluster`: this replica's view of the cluster.
async fn cluster(State(s): State<AdminState>) -> Json<Value> {
    match &s.cluster {
        Some(c) => Json(json!({ "clustered": true, "view": c.view() })),
        None => Json(json!({ "clustered": false })),
    }
}

/// A refused admin request: status, machine-readable reason, detail.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    detail: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            detail: detail.into(),
        }
    }
}

/// Turns a handler's result into a response, counting refusals.
fn answer(s: &AdminState, result: Result<Response, Refusal>) -> Response {
    result.unwrap_or_else(|r| refuse(s, r.status, r.reason, &r.detail))
}

/// Checks the bearer token of a mutation.
fn authorize(s: &AdminState, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(expected) = &s.token else {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "mutations_disabled",
            "admin mutations are disabled: start the LB with --admin-token-file (or LB_ADMIN_TOKEN)",
        ));
    };
    let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    crate::net::auth::check_bearer(given, expected)
        .map_err(|e| Refusal::new(StatusCode::UNAUTHORIZED, "unauthorized", e.message()))
}

/// Parses the backend address of a mutation path and checks it exists.
fn backend(s: &AdminState, name: &str, addr: &str) -> Result<SocketAddr, Refusal> {
    let addr: SocketAddr = addr.parse().map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_address",
            format!("{addr:?} is not ip:port (IPv6 as [::1]:80)"),
        )
    })?;
    let entry = s.catalog.service(name).ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "unknown_service",
            format!("no service named {name:?}"),
        )
    })?;
    if !entry.backends().iter().any(|b| b.addr == addr) {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "unknown_backend",
            format!("{name:?} has no backend {addr}"),
        ));
    }
    Ok(addr)
}

/// Logs, counts and answers an applied mutation.
fn applied(
    s: &AdminState,
    peer: SocketAddr,
    action: &str,
    name: &str,
    addr: SocketAddr,
    detail: Value,
) -> Response {
    tracing::info!(%peer, action, service = name, backend = %addr, %detail, "admin mutation");
    s.metrics
        .admin_mutations
        .get_or_create(&ReasonLabels {
            reason: action.into(),
        })
        .inc();
    let mut body =
        json!({"ok": true, "action": action, "service": name, "backend": addr.to_string()});
    if let (Some(b), Some(d)) = (body.as_object_mut(), detail.as_object()) {
        b.extend(d.clone());
    }
    Json(body).into_response()
}

type MutationPath = Path<(String, String)>;

async fn drain(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((name, addr)): MutationPath,
    headers: HeaderMap,
) -> Response {
    answer(&s, set_drained(&s, peer, &headers, &name, &addr, true))
}

async fn undrain(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((name, addr)): MutationPath,
    headers: HeaderMap,
) -> Response {
    answer(&s, set_drained(&s, peer, &headers, &name, &addr, false))
}

fn set_drained(
    s: &AdminState,
    peer: SocketAddr,
    headers: &HeaderMap,
    name: &str,
    addr: &str,
    drained: bool,
) -> Result<Response, Refusal> {
    authorize(s, headers)?;
    let addr = backend(s, name, addr)?;
    s.catalog.set_drained(name, addr, drained);
    Ok(applied(
        s,
        peer,
        if drained { "drain" } else { "undrain" },
        name,
        addr,
        json!({}),
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightRequest {
    weight: u32,
    ttl_seconds: Option<u64>,
}

async fn set_weight(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((name, addr)): MutationPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = (|| {
        authorize(&s, &headers)?;
        let addr = backend(&s, &name, &addr)?;
        let request: WeightRequest = serde_json::from_slice(&body).map_err(|e| {
            let detail =
                format!("expected {{\"weight\": 1-10000, \"ttl_seconds\": optional}}: {e}");
            Refusal::new(StatusCode::BAD_REQUEST, "bad_json", detail)
        })?;
        if !(1..=10_000).contains(&request.weight) {
            let detail = "weight must be 1 to 10000 (drain to take a backend out)";
            return Err(Refusal::new(StatusCode::BAD_REQUEST, "bad_weight", detail));
        }
        let ttl = Duration::from_secs(request.ttl_seconds.unwrap_or(300));
        if ttl.is_zero() || ttl > MAX_OVERRIDE_TTL {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_ttl",
                "ttl_seconds must be 1 to 604800",
            ));
        }
        s.catalog
            .set_weight_override(&name, addr, Some((request.weight, ttl)));
        let detail = json!({"weight": request.weight, "ttl_seconds": ttl.as_secs()});
        Ok(applied(&s, peer, "weight_override", &name, addr, detail))
    })();
    answer(&s, result)
}

async fn clear_weight(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((name, addr)): MutationPath,
    headers: HeaderMap,
) -> Response {
    let result = (|| {
        authorize(&s, &headers)?;
        let addr = backend(&s, &name, &addr)?;
        s.catalog.set_weight_override(&name, addr, None);
        Ok(applied(
            &s,
            peer,
            "weight_override_cleared",
            &name,
            addr,
            json!({}),
        ))
    })();
    answer(&s, result)
}
