//! A stand-in for the Kubernetes API server's EndpointSlice endpoints, for
//! the Kubernetes registry tests.
//!
//! No API server can be installed here, so the tests run against this one,
//! written from the API documentation ("API Concepts": efficient detection
//! of changes, resource versions, bookmarks, 410 Gone, chunked lists), not
//! checked against a live cluster. It serves
//! `GET /apis/discovery.k8s.io/v1/[namespaces/{ns}/]endpointslices` as
//! - a **list**: `labelSelector` (`key`, `key=value`), `limit` and
//!   `continue` (a continue token from before a compaction answers 410),
//!   the list's `metadata.resourceVersion`;
//! - a **watch** (`watch=true`): every change after `resourceVersion` as
//!   JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object"}`,
//!   `BOOKMARK`s carrying the current version when `allowWatchBookmarks`,
//!   closed after `timeoutSeconds`; a version older than the compaction
//!   horizon gets an `ERROR` event with a `Status` of code 410 (Expired),
//!   as the real server answers.
//!
//! Every request must carry the bearer token of the kubeconfig it writes.
//! Tests drive it directly: put and delete slices, compact the history,
//! close open watches, stop and restart it on the same port, and read the
//! request log (lists and watches with their resource versions).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::standin::StandIn;

/// The bearer token the kubeconfig carries.
pub const TOKEN: &str = "stand-in-service-account-token";

/// One endpoint of a slice.
#[derive(Debug, Clone)]
pub struct Ep {
    /// Its address.
    pub ip: String,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// `zone`.
    pub zone: String,
}

impl Ep {
    /// A ready endpoint in `zone`.
    pub fn ready(ip: &str, zone: &str) -> Ep {
        Ep {
            ip: ip.into(),
            ready: true,
            terminating: false,
            zone: zone.into(),
        }
    }
}

/// What a request asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A list (page), with its `continue` token if any.
    List {
        /// `continue`.
        continue_token: Option<String>,
    },
    /// A watch from a resource version.
    Watch {
        /// `resourceVersion`.
        from: Option<u64>,
        /// `allowWatchBookmarks`.
        bookmarks: bool,
    },
}

#[derive(Default)]
struct Inner {
    rv: u64,
    slices: BTreeMap<(String, String), Value>,
    /// Changes by resource version: (rv, type, object).
    history: VecDeque<(u64, &'static str, Value)>,
    /// Versions at or below this are compacted away.
    compacted: u64,
    requests: Vec<Request>,
}

struct Shared {
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
    /// Bumped to close every open watch.
    kick: watch::Sender<u64>,
    bookmark_every: Duration,
}

/// The stand-in API server.
pub struct KubeApi {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: StandIn,
}

impl KubeApi {
    /// Starts it on a free loopback port; watches get a bookmark every
    /// `bookmark_every`.
    pub async fn start(bookmark_every: Duration) -> KubeApi {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1000,
                ..Default::default()
            }),
            changes: watch::channel(1000).0,
            kick: watch::channel(0).0,
            bookmark_every,
        });
        let app = Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(all_namespaces),
            )
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                get(one_namespace),
            )
            .with_state(shared.clone());
        let server = StandIn::start(app, None).await;
        KubeApi {
            addr: server.addr,
            shared,
            server,
        }
    }

    /// Writes a kubeconfig pointing at this server into `dir`; returns its path.
    pub fn kubeconfig(&self, dir: &FsPath) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: standin\n\
             clusters:\n- name: standin\n  cluster:\n    server: http://{}\n\
             users:\n- name: lb\n  user:\n    token: {TOKEN}\n\
             contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: lb\n    namespace: default\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Stops answering: the port is closed and open connections dropped.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts again on the same port, with the same data.
    pub async fn restart(&mut self) {
        self.server.restart().await;
    }

    /// Creates or replaces the slice `ns/name` of Service `service`.
    pub fn put_slice(
        &self,
        ns: &str,
        name: &str,
        service: &str,
        endpoints: &[Ep],
        ports: &[(&str, u16)],
    ) {
        let object = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": format!("uid-{ns}-{name}"),
                "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            },
            "addressType": "IPv4",
            "endpoints": endpoints.iter().enumerate().map(|(i, e)| json!({
                "addresses": [e.ip],
                "conditions": {"ready": e.ready, "serving": e.ready || e.terminating, "terminating": e.terminating},
                "zone": e.zone,
                "nodeName": format!("node-{}", e.zone),
                "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("{service}-{i}")},
            })).collect::<Vec<_>>(),
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
        });
        self.put_raw(ns, name, object);
    }

    /// Puts a slice with a body given as is (for malformed ones); its name,
    /// namespace and resource version are set here.
    pub fn put_raw(&self, ns: &str, name: &str, mut object: Value) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["name"] = json!(name);
        object["metadata"]["namespace"] = json!(ns);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (ns.to_string(), name.to_string());
        let kind = if inner.slices.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner.slices.insert(key, object.clone());
        inner.history.push_back((rv, kind, object));
        drop(inner);
        self.shared.changes.send_replace(rv);
    }

    /// Deletes the slice `ns/name`.
    pub fn delete_slice(&self, ns: &str, name: &str) {
        let mut inner = self.shared.inner.lock().unwrap();
        let Some(mut object) = inner.slices.remove(&(ns.to_string(), name.to_string())) else {
            return;
        };
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.history.push_back((rv, "DELETED", object));
        drop(inner);
        self.shared.changes.send_replace(rv);
    }

    /// Forgets the change history up to now, as etcd compaction does: a
    /// watch or continue token from before answers 410 Gone.
    pub fn compact(&self) {
        // Open watches go on receiving changes, as on a real server; only
        // new watches and continue tokens from before are refused.
        let mut inner = self.shared.inner.lock().unwrap();
        inner.compacted = inner.rv;
    }

    /// Closes every open watch (as an API server restart or a load
    /// balancer in front of it does).
    pub fn close_watches(&self) {
        self.shared.kick.send_modify(|k| *k += 1);
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.inner.lock().unwrap().requests.clone()
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.inner.lock().unwrap().rv
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn refuse(code: StatusCode, reason: &str, message: &str) -> Response {
    (code, Json(status(code.as_u16(), reason, message))).into_response()
}

async fn all_namespaces(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    answer(s, headers, None, q).await
}

async fn one_namespace(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(ns): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    answer(s, headers, Some(ns), q).await
}

/// Whether `object` is in `ns` (all when `None`) and matches `selector`.
fn matches(object: &Value, ns: Option<&str>, selector: Option<&str>) -> bool {
    if ns.is_some_and(|ns| object["metadata"]["namespace"] != ns) {
        return false;
    }
    let labels = &object["metadata"]["labels"];
    selector
        .unwrap_or("")
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => labels[k.trim()] == v.trim(),
            None => labels.get(term.trim()).is_some(),
        })
}

async fn answer(
    s: Arc<Shared>,
    headers: HeaderMap,
    ns: Option<String>,
    q: BTreeMap<String, String>,
) -> Response {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return refuse(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let selector = q.get("labelSelector").cloned();
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch_answer(s, ns, selector, &q);
    }
    let mut inner = s.inner.lock().unwrap();
    let continue_token = q.get("continue").cloned().filter(|c| !c.is_empty());
    inner.requests.push(Request::List {
        continue_token: continue_token.clone(),
    });
    // A continue token is "<offset>:<version of the first page>".
    let (offset, rv) = match &continue_token {
        None => (0, inner.rv),
        Some(t) => match t
            .split_once(':')
            .and_then(|(o, r)| Some((o.parse().ok()?, r.parse().ok()?)))
        {
            Some((o, r)) => (o, r),
            None => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continue token",
                )
            }
        },
    };
    if rv <= inner.compacted && continue_token.is_some() {
        return refuse(
            StatusCode::GONE,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result.",
        );
    }
    let items: Vec<Value> = inner
        .slices
        .values()
        .filter(|o| matches(o, ns.as_deref(), selector.as_deref()))
        .cloned()
        .collect();
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<Value> = items.iter().skip(offset).take(limit).cloned().collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if offset + page.len() < items.len() {
        metadata["continue"] = json!(format!("{}:{rv}", offset + page.len()));
        metadata["remainingItemCount"] = json!(items.len() - offset - page.len());
    }
    Json(json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": metadata, "items": page}))
        .into_response()
}

fn watch_answer(
    s: Arc<Shared>,
    ns: Option<String>,
    selector: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response {
    let from: Option<u64> = q.get("resourceVersion").and_then(|v| v.parse().ok());
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
    {
        let mut inner = s.inner.lock().unwrap();
        inner.requests.push(Request::Watch { from, bookmarks });
        if from.is_some_and(|f| f < inner.compacted) {
            let gone = status(
                410,
                "Expired",
                &format!(
                    "too old resource version: {} ({})",
                    from.unwrap(),
                    inner.compacted + 1
                ),
            );
            let _ = tx.try_send(line(json!({"type": "ERROR", "object": gone})));
            drop(tx);
            return Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .into_response();
        }
    }
    let mut changes = s.changes.subscribe();
    let mut kick = s.kick.subscribe();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = from.unwrap_or_else(|| s.inner.lock().unwrap().rv);
        let mut tick = tokio::time::interval(s.bookmark_every);
        tick.tick().await;
        loop {
            // Every change up to `upto` is in `pending`: once they are sent,
            // `upto` is what this watch has seen (what a bookmark says).
            let (pending, upto): (Vec<(u64, &'static str, Value)>, u64) = {
                let inner = s.inner.lock().unwrap();
                let pending = inner
                    .history
                    .iter()
                    .filter(|(rv, _, _)| *rv > sent)
                    .cloned()
                    .collect();
                (pending, inner.rv)
            };
            for (_, kind, object) in pending {
                if matches(&object, ns.as_deref(), selector.as_deref())
                    && tx
                        .send(line(json!({"type": kind, "object": object})))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            sent = sent.max(upto);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = kick.changed() => return,
                r = changes.changed() => if r.is_err() { return },
                _ = tick.tick(), if bookmarks => {
                    let rv = sent;
                    let bookmark = json!({"type": "BOOKMARK", "object": {"kind": "EndpointSlice",
                        "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(bookmark)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    (
        [("content-type", "application/json")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}
