//! The table of connected streams ("clients"), for the admin API and
//! metrics: BalanceLoad streams ([`Session`]) and ADS streams
//! ([`XdsSession`]). Each stream holds a guard that removes its row when the
//! stream ends, however it ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use lb_proto::grpc::lb::v1::ClientStats;

use crate::metrics::Metrics;

/// The last client-stats report of a stream, flattened.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StatsReport {
    /// Calls started since the previous report.
    pub started: i64,
    /// Calls finished.
    pub finished: i64,
    /// Calls that failed before being sent.
    pub failed_to_send: i64,
    /// Calls whose response was received.
    pub known_received: i64,
    /// Calls dropped on drop entries.
    pub dropped: i64,
}

impl From<&ClientStats> for StatsReport {
    /// The report as the client sent it, but for what no client can mean:
    /// negative counts read as 0, and drops add up saturating.
    fn from(s: &ClientStats) -> Self {
        StatsReport {
            started: s.num_calls_started.max(0),
            finished: s.num_calls_finished.max(0),
            failed_to_send: s.num_calls_finished_with_client_failed_to_send.max(0),
            known_received: s.num_calls_finished_known_received.max(0),
            dropped: s
                .calls_finished_with_drop
                .iter()
                .map(|d| d.num_calls.max(0))
                .fold(0, i64::saturating_add),
        }
    }
}

/// One connected stream.
#[derive(Debug)]
pub struct Session {
    /// Unique within this process.
    pub id: u64,
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
    /// The name the client asked for.
    pub name: String,
    /// The service it was mapped to.
    pub service: String,
    /// The id that seeds its subset (`lb-client-id` metadata, else the peer).
    pub client_id: String,
    /// Its subset of backends, when subsetting is on.
    pub subset: Mutex<Option<Vec<SocketAddr>>>,
    /// When the stream was accepted.
    pub since: SystemTime,
    /// Server lists written to it.
    pub lists_sent: AtomicU64,
    /// Version of the last list written.
    pub list_version: AtomicU64,
    /// Its latest client-stats report.
    pub last_stats: Mutex<Option<StatsReport>>,
    /// The client's zone, as it said or as its address maps to ("" = unknown).
    pub zone: Mutex<String>,
}

/// Who an ADS client says it is (the `node` of its first request).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct XdsNode {
    /// `node.id` from the bootstrap.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// The locality's region (`node.locality`).
    pub region: String,
    /// The locality's zone.
    pub zone: String,
    /// The locality's sub-zone.
    pub sub_zone: String,
    /// `user_agent_name` and `user_agent_version`.
    pub user_agent: String,
}

/// What one resource type of an ADS stream stands at.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct XdsTypeStatus {
    /// The names subscribed to (`["*"]` for a wildcard).
    pub subscribed: Vec<String>,
    /// The version last sent.
    pub sent_version: String,
    /// The version the client last accepted.
    pub acked_version: Option<String>,
    /// The version the client last rejected, and its error.
    pub last_nack: Option<XdsNack>,
}

/// A rejected xDS response.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct XdsNack {
    /// The version rejected.
    pub version: String,
    /// The client's `error_detail` message.
    pub error: String,
}

/// One connected ADS stream.
#[derive(Debug)]
pub struct XdsSession {
    /// Unique within this process (shared with BalanceLoad sessions).
    pub id: u64,
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
    /// When the stream was accepted.
    pub since: SystemTime,
    /// Its node, once its first request has arrived.
    pub node: Mutex<XdsNode>,
    /// Per resource type (`lds`, `rds`, `cds`, `eds`).
    pub types: Mutex<std::collections::BTreeMap<&'static str, XdsTypeStatus>>,
    /// Responses written to it.
    pub responses_sent: AtomicU64,
}

/// All connected streams.
#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    open: DashMap<u64, Arc<Session>>,
    xds: DashMap<u64, Arc<XdsSession>>,
}

impl Sessions {
    /// Registers a new stream; the returned guard unregisters it on drop.
    pub fn open(
        self: &Arc<Self>,
        metrics: Arc<Metrics>,
        peer: Option<SocketAddr>,
        name: String,
        service: String,
        client_id: Option<String>,
    ) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(Session {
            id,
            peer,
            name,
            service,
            client_id: client_id
                .or_else(|| peer.map(|p| p.to_string()))
                .unwrap_or_else(|| format!("session-{id}")),
            subset: Mutex::new(None),
            since: SystemTime::now(),
            lists_sent: AtomicU64::new(0),
            list_version: AtomicU64::new(0),
            last_stats: Mutex::new(None),
            zone: Mutex::new(String::new()),
        });
        self.open.insert(id, session.clone());
        metrics.streams_open.inc();
        metrics.streams_total.inc();
        SessionGuard {
            sessions: self.clone(),
            session,
            metrics,
        }
    }

    /// Registers a new ADS stream; the returned guard unregisters it on drop.
    pub fn open_xds(
        self: &Arc<Self>,
        metrics: Arc<Metrics>,
        peer: Option<SocketAddr>,
    ) -> XdsSessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(XdsSession {
            id,
            peer,
            since: SystemTime::now(),
            node: Mutex::new(XdsNode::default()),
            types: Mutex::new(Default::default()),
            responses_sent: AtomicU64::new(0),
        });
        self.xds.insert(id, session.clone());
        metrics.xds.streams_open.inc();
        metrics.xds.streams_total.inc();
        XdsSessionGuard {
            sessions: self.clone(),
            session,
            metrics,
        }
    }

    /// Every open ADS stream, oldest first.
    pub fn list_xds(&self) -> Vec<Arc<XdsSession>> {
        let mut all: Vec<_> = self.xds.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// Every open BalanceLoad stream, oldest first.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut all: Vec<_> = self.open.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// Open streams per service, counted in one pass over the streams (a
    /// listing of every service must not walk every stream per service).
    pub fn stream_counts(&self) -> StreamCounts {
        let mut counts = StreamCounts::default();
        for e in self.open.iter() {
            *counts
                .per_service
                .entry(e.value().service.clone())
                .or_default() += 1;
        }
        for e in self.xds.iter() {
            let types = e.value().types.lock().expect("types lock");
            let Some(eds) = types.get("eds") else {
                continue;
            };
            if eds.subscribed.iter().any(|n| n == "*") {
                counts.wildcard += 1;
                continue;
            }
            let mut names: Vec<&String> = eds.subscribed.iter().collect();
            names.sort();
            names.dedup();
            for name in names {
                *counts.per_service.entry(name.clone()).or_default() += 1;
            }
        }
        counts
    }
}

/// Open streams per service, as [`Sessions::stream_counts`] found them.
#[derive(Debug, Default)]
pub struct StreamCounts {
    /// BalanceLoad streams mapped to a service, plus ADS streams that
    /// subscribed to its assignment by name.
    per_service: std::collections::HashMap<String, usize>,
    /// ADS streams subscribed to every assignment (`*`).
    wildcard: usize,
}

impl StreamCounts {
    /// Open streams for `service`: BalanceLoad streams mapped to it and
    /// ADS streams subscribed to its assignment.
    pub fn of(&self, service: &str) -> usize {
        self.per_service.get(service).copied().unwrap_or(0) + self.wildcard
    }
}

/// Keeps a session row alive for as long as its stream runs.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    session: Arc<Session>,
    metrics: Arc<Metrics>,
}

impl SessionGuard {
    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.open.remove(&self.session.id);
        self.metrics.streams_open.dec();
    }
}

/// Keeps an ADS session row alive for as long as its stream runs.
pub struct XdsSessionGuard {
    sessions: Arc<Sessions>,
    session: Arc<XdsSession>,
    metrics: Arc<Metrics>,
}

impl XdsSessionGuard {
    /// The session.
    pub fn session(&self) -> &XdsSession {
        &self.session
    }
}

impl Drop for XdsSessionGuard {
    fn drop(&mut self) {
        self.sessions.xds.remove(&self.session.id);
        self.metrics.xds.streams_open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pass counts what the old per-service walk counted: BalanceLoad
    /// streams by service, ADS streams by the assignments they subscribed
    /// to (once each, however often named), wildcard ADS streams for every
    /// service.
    #[test]
    fn stream_counts_per_service_in_one_pass() {
        let sessions = Arc::new(Sessions::default());
        let metrics = Arc::new(Metrics::new());
        let open = |service: &str| {
            sessions.open(metrics.clone(), None, service.into(), service.into(), None)
        };
        let _a = [open("a"), open("a"), open("b")];
        let subscribe = |names: &[&str]| {
            let guard = sessions.open_xds(metrics.clone(), None);
            guard.session().types.lock().unwrap().insert(
                "eds",
                XdsTypeStatus {
                    subscribed: names.iter().map(|n| n.to_string()).collect(),
                    ..Default::default()
                },
            );
            guard
        };
        let _x = [
            subscribe(&["b", "c", "b"]),
            subscribe(&["*", "c"]),
            sessions.open_xds(metrics.clone(), None),
        ];
        let counts = sessions.stream_counts();
        assert_eq!(
            ["a", "b", "c", "d"].map(|s| counts.of(s)),
            [3, 3, 2, 1],
            "{counts:?}"
        );
    }
}
