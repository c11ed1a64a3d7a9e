//! A stand-in for a Consul agent's HTTP API, for the Consul registry tests.
//!
//! No Consul server can be installed here, so the tests run against this
//! server, which answers as Consul's documentation describes: verified
//! against the documented API, not a live agent. It serves
//! - `GET /v1/catalog/services` and `GET /v1/health/service/<name>[?passing]`
//!   as blocking queries (`index`, `wait`, `X-Consul-Index`);
//! - `PUT /v1/agent/service/register`, `PUT /v1/agent/service/deregister/<id>`
//!   and `GET /v1/agent/service/<id>` for the registration helper;
//! - an ACL token check (`X-Consul-Token`, 403 without it);
//! - optionally over TLS, as an agent with `verify_incoming` does.
//!
//! Tests drive it directly: add or remove instances, mark them critical,
//! make it answer 500, make its index go backwards, stop and restart it on
//! the same port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::standin::StandIn;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::watch;

/// One service instance as the agent knows it.
#[derive(Debug, Clone)]
pub struct ConsulInstance {
    /// Service name.
    pub service: String,
    /// Service ID.
    pub id: String,
    /// `Service.Address` (may be empty: the node's address is used).
    pub address: String,
    /// `Service.Port` (junk allowed, to test rejection).
    pub port: i64,
    /// Tags.
    pub tags: Vec<String>,
    /// `Weights.Passing`.
    pub weight: i64,
    /// Whether its checks pass.
    pub passing: bool,
}

#[derive(Default)]
struct Inner {
    index: u64,
    instances: BTreeMap<String, ConsulInstance>,
    fail: bool,
    malformed: bool,
    requests: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
    token: Option<String>,
}

impl Shared {
    /// Applies a change to the data and moves the index on, waking the
    /// blocking queries.
    fn change<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut inner = self.inner.lock().unwrap();
        let r = f(&mut inner);
        inner.index += 1;
        self.changes.send_replace(inner.index);
        r
    }
}

/// The fake agent.
pub struct FakeConsul {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: StandIn,
}

impl FakeConsul {
    /// Starts it on a free loopback port; with `token`, every request must
    /// carry it in `X-Consul-Token`.
    pub async fn start(token: Option<&str>) -> FakeConsul {
        Self::start_with(token, None).await
    }

    /// Like [`FakeConsul::start`], serving HTTPS with `tls`.
    pub async fn start_tls(token: Option<&str>, tls: tokio_rustls::TlsAcceptor) -> FakeConsul {
        Self::start_with(token, Some(tls)).await
    }

    async fn start_with(token: Option<&str>, tls: Option<tokio_rustls::TlsAcceptor>) -> FakeConsul {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                index: 10,
                ..Default::default()
            }),
            changes: watch::channel(10).0,
            token: token.map(str::to_string),
        });
        let app = Router::new()
            .route("/v1/catalog/services", get(catalog))
            .route("/v1/health/service/{name}", get(health))
            .route("/v1/agent/service/register", put(register))
            .route("/v1/agent/service/deregister/{id}", put(deregister))
            .route("/v1/agent/service/{id}", get(agent_service))
            .route_layer(axum::middleware::from_fn_with_state(shared.clone(), acl))
            .with_state(shared.clone());
        let server = StandIn::start(app, tls).await;
        FakeConsul {
            addr: server.addr,
            shared,
            server,
        }
    }

    /// `consul://host:port` of this agent (`consul+https://` over TLS).
    pub fn url(&self) -> String {
        if self.server.is_tls() {
            format!("consul+https://localhost:{}", self.addr.port())
        } else {
            format!("consul://{}", self.addr)
        }
    }

    /// Stops answering: the port is closed and open connections dropped.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts again on the same port, with the same data.
    pub async fn restart(&mut self) {
        self.server.restart().await;
    }

    fn change(&self, f: impl FnOnce(&mut Inner)) {
        self.shared.change(f);
    }

    /// Adds (or replaces) an instance, passing.
    pub fn add(&self, service: &str, id: &str, addr: SocketAddr) {
        self.add_instance(ConsulInstance {
            service: service.into(),
            id: id.into(),
            address: addr.ip().to_string(),
            port: addr.port() as i64,
            tags: vec!["grpc".into()],
            weight: 1,
            passing: true,
        });
    }

    /// Adds (or replaces) an instance as given.
    pub fn add_instance(&self, i: ConsulInstance) {
        self.change(|inner| {
            inner.instances.insert(i.id.clone(), i);
        });
    }

    /// Removes an instance.
    pub fn remove(&self, id: &str) {
        self.change(|inner| {
            inner.instances.remove(id);
        });
    }

    /// Marks an instance's checks passing or critical.
    pub fn set_passing(&self, id: &str, passing: bool) {
        self.change(|inner| {
            if let Some(i) = inner.instances.get_mut(id) {
                i.passing = passing;
            }
        });
    }

    /// Makes every query answer 500 (as a server without a leader does).
    pub fn fail(&self, fail: bool) {
        self.change(|inner| inner.fail = fail);
    }

    /// Makes health answers unparsable JSON.
    pub fn malformed(&self, malformed: bool) {
        self.change(|inner| inner.malformed = malformed);
    }

    /// Moves the index back to `to` (as after a snapshot restore), with a
    /// change in the data at the same time.
    pub fn reset_index(&self, to: u64, f: impl FnOnce(&Self)) {
        {
            let mut inner = self.shared.inner.lock().unwrap();
            inner.index = to;
        }
        f(self);
    }

    /// Instance IDs registered now.
    pub fn ids(&self) -> Vec<String> {
        self.shared
            .inner
            .lock()
            .unwrap()
            .instances
            .keys()
            .cloned()
            .collect()
    }

    /// Queries answered so far.
    pub fn requests(&self) -> u64 {
        self.shared.inner.lock().unwrap().requests
    }
}

#[derive(serde::Deserialize)]
struct Blocking {
    index: Option<u64>,
    wait: Option<String>,
    passing: Option<String>,
}

fn parse_wait(w: Option<&str>) -> Duration {
    let w = w.unwrap_or("5m");
    let (n, unit) = w.split_at(w.find(|c: char| !c.is_ascii_digit()).unwrap_or(w.len()));
    let n: u64 = n.parse().unwrap_or(300);
    match unit {
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        _ => Duration::from_secs(n),
    }
}

/// Counts every request and, when the agent has a token, refuses those
/// without it (403, as Consul's ACL system does).
async fn acl(
    State(s): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    s.inner.lock().unwrap().requests += 1;
    if let Some(expected) = s.token.as_deref() {
        let given = request
            .headers()
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok());
        if given != Some(expected) {
            return (StatusCode::FORBIDDEN, "ACL not found").into_response();
        }
    }
    next.run(request).await
}

/// Waits while the index is at most `q.index` (Consul's rule) or until the
/// wait elapses; then the current index, or an error answer.
async fn block(s: &Shared, q: &Blocking) -> Result<u64, Response> {
    let mut changes = s.changes.subscribe();
    let wanted = q.index.unwrap_or(0);
    let wait = parse_wait(q.wait.as_deref());
    let _ = tokio::time::timeout(wait, async {
        loop {
            {
                let inner = s.inner.lock().unwrap();
                if inner.index > wanted || inner.fail {
                    return;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let inner = s.inner.lock().unwrap();
    if inner.fail {
        return Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "rpc error making call: No cluster leader",
        )
            .into_response());
    }
    Ok(inner.index)
}

fn with_index(index: u64, body: Value) -> Response {
    ([("X-Consul-Index", index.to_string())], Json(body)).into_response()
}

async fn catalog(State(s): State<Arc<Shared>>, Query(q): Query<Blocking>) -> Response {
    let index = match block(&s, &q).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let inner = s.inner.lock().unwrap();
    let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
    services.insert("consul".into(), Vec::new());
    for i in inner.instances.values() {
        let tags = services.entry(i.service.clone()).or_default();
        for t in &i.tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
    }
    with_index(index, json!(services))
}

async fn health(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(q): Query<Blocking>,
) -> Response {
    let index = match block(&s, &q).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let inner = s.inner.lock().unwrap();
    if inner.malformed {
        return ([("X-Consul-Index", index.to_string())], "[{\"Node\": oops").into_response();
    }
    let entries: Vec<Value> = inner
        .instances
        .values()
        .filter(|i| i.service == name && (q.passing.is_none() || i.passing))
        .map(|i| {
            json!({
                "Node": {"ID": "", "Node": format!("node-{}", i.id), "Address": "127.0.0.1", "Datacenter": "dc1"},
                "Service": {
                    "ID": i.id, "Service": i.service, "Tags": i.tags, "Address": i.address,
                    "Port": i.port, "Meta": {"version": "1"},
                    "Weights": {"Passing": i.weight, "Warning": 1},
                },
                "Checks": [{"CheckID": "serfHealth", "Status": if i.passing { "passing" } else { "critical" }}],
            })
        })
        .collect();
    with_index(index, json!(entries))
}

async fn register(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let name = body["Name"].as_str().unwrap_or_default().to_string();
    let id = body["ID"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| name.clone());
    if name.is_empty() || body["Check"]["GRPC"].as_str().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "Missing service name or gRPC check",
        )
            .into_response();
    }
    let instance = ConsulInstance {
        service: name,
        id: id.clone(),
        address: body["Address"].as_str().unwrap_or_default().to_string(),
        port: body["Port"].as_i64().unwrap_or(0),
        tags: Vec::new(),
        weight: body["Weights"]["Passing"].as_i64().unwrap_or(1),
        passing: true,
    };
    s.change(|inner| inner.instances.insert(id, instance));
    StatusCode::OK.into_response()
}

async fn deregister(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let known = s.inner.lock().unwrap().instances.contains_key(&id);
    if !known {
        return (StatusCode::NOT_FOUND, "Unknown service ID").into_response();
    }
    s.change(|inner| inner.instances.remove(&id));
    StatusCode::OK.into_response()
}

async fn agent_service(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let inner = s.inner.lock().unwrap();
    match inner.instances.get(&id) {
        Some(i) => {
            Json(json!({"ID": i.id, "Service": i.service, "Address": i.address, "Port": i.port}))
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "unknown service ID").into_response(),
    }
}
