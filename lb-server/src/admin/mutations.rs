//! The endpoints that change what the LB lists: drain, undrain and weight
//! overrides, behind one bearer-token layer.
//!
//! [`require_token`] guards the whole sub-router, so a handler here never
//! runs unauthorized; without a configured token every mutation is refused
//! (403). Each applied mutation is logged with who made it and counted.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::refusal::Refusal;
use super::AdminState;
use crate::metrics::ReasonLabels;

/// Longest weight override accepted.
const MAX_OVERRIDE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Override time to live when the request names none.
const DEFAULT_OVERRIDE_TTL: Duration = Duration::from_secs(300);

/// The layer in front of every mutation: the configured bearer token, compared in constant time.
pub async fn require_token(
    State(s): State<AdminState>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, Refusal> {
    let Some(expected) = &s.token else {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "mutations_disabled",
            "admin mutations are disabled: start the LB with --admin-token-file (or LB_ADMIN_TOKEN)",
        ));
    };
    let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    crate::net::auth::check_bearer(given, expected)
        .map_err(|e| Refusal::new(StatusCode::UNAUTHORIZED, "unauthorized", e.message()))?;
    Ok(next.run(request).await)
}

/// `{service}/backends/{addr}` of a mutation's path.
type BackendPath = Path<(String, String)>;

/// A backend a mutation names, checked to exist.
struct Target {
    service: String,
    addr: SocketAddr,
}

impl Target {
    fn find(s: &AdminState, (service, addr): (String, String)) -> Result<Target, Refusal> {
        let addr: SocketAddr = addr.parse().map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_address",
                format!("{addr:?} is not ip:port (IPv6 as [::1]:80)"),
            )
        })?;
        let entry = s
            .catalog
            .service(&service)
            .ok_or_else(|| Refusal::unknown_service(&service))?;
        if !entry.backends().iter().any(|b| b.addr == addr) {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_backend",
                format!("{service:?} has no backend {addr}"),
            ));
        }
        Ok(Target { service, addr })
    }
}

/// The answer to an applied mutation.
#[derive(Serialize)]
struct Applied {
    ok: bool,
    action: &'static str,
    service: String,
    backend: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_seconds: Option<u64>,
}

/// Logs, counts and answers an applied mutation.
fn applied(
    s: &AdminState,
    peer: SocketAddr,
    action: &'static str,
    target: Target,
    weight: Option<(u32, Duration)>,
) -> Response {
    let answer = Applied {
        ok: true,
        action,
        service: target.service,
        backend: target.addr.to_string(),
        weight: weight.map(|w| w.0),
        ttl_seconds: weight.map(|w| w.1.as_secs()),
    };
    tracing::info!(%peer, action, service = %answer.service, backend = %answer.backend,
        weight = ?answer.weight, ttl_seconds = ?answer.ttl_seconds, "admin mutation");
    s.metrics
        .admin_mutations
        .get_or_create(&ReasonLabels {
            reason: action.into(),
        })
        .inc();
    Json(answer).into_response()
}

/// `POST …/drain`: out of every list, still registered and checked.
pub async fn drain(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(path): BackendPath,
) -> Result<Response, Refusal> {
    let target = Target::find(&s, path)?;
    s.catalog.set_drained(&target.service, target.addr, true);
    Ok(applied(&s, peer, "drain", target, None))
}

/// `POST …/undrain`: back in the lists (if healthy).
pub async fn undrain(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(path): BackendPath,
) -> Result<Response, Refusal> {
    let target = Target::find(&s, path)?;
    s.catalog.set_drained(&target.service, target.addr, false);
    Ok(applied(&s, peer, "undrain", target, None))
}

/// The body of `PUT …/weight`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightRequest {
    weight: u32,
    ttl_seconds: Option<u64>,
}

impl WeightRequest {
    /// Parses and checks a body: the weight and how long it holds.
    fn parse(body: &[u8]) -> Result<(u32, Duration), Refusal> {
        let request: WeightRequest = serde_json::from_slice(body).map_err(|e| {
            let detail =
                format!("expected {{\"weight\": 1-10000, \"ttl_seconds\": optional}}: {e}");
            Refusal::new(StatusCode::BAD_REQUEST, "bad_json", detail)
        })?;
        if !(1..=10_000).contains(&request.weight) {
            let detail = "weight must be 1 to 10000 (drain to take a backend out)";
            return Err(Refusal::new(StatusCode::BAD_REQUEST, "bad_weight", detail));
        }
        let ttl = request
            .ttl_seconds
            .map_or(DEFAULT_OVERRIDE_TTL, Duration::from_secs);
        if ttl.is_zero() || ttl > MAX_OVERRIDE_TTL {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_ttl",
                "ttl_seconds must be 1 to 604800",
            ));
        }
        Ok((request.weight, ttl))
    }
}

/// `PUT …/weight`: `{"weight": n, "ttl_seconds": s}` overrides the
/// registry weight until it expires.
pub async fn set_weight(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(path): BackendPath,
    body: Bytes,
) -> Result<Response, Refusal> {
    let target = Target::find(&s, path)?;
    let (weight, ttl) = WeightRequest::parse(&body)?;
    s.catalog
        .set_weight_override(&target.service, target.addr, Some((weight, ttl)));
    Ok(applied(
        &s,
        peer,
        "weight_override",
        target,
        Some((weight, ttl)),
    ))
}

/// `DELETE …/weight`: the registry weight again.
pub async fn clear_weight(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(path): BackendPath,
) -> Result<Response, Refusal> {
    let target = Target::find(&s, path)?;
    s.catalog
        .set_weight_override(&target.service, target.addr, None);
    Ok(applied(&s, peer, "weight_override_cleared", target, None))
}
