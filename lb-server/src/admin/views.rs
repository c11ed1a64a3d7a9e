//! What the JSON API answers, as types: one struct per view, built from the
//! catalog's and the session table's snapshots and serialized by serde.
//!
//! The field names are the API (the dashboard and `lbctl`-style scripts read
//! them); a field added here is an addition to the API, a field renamed is a
//! break.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::AdminState;
use crate::catalog::{Backend, OutcomesView, ServiceEntry};
use crate::snapshot::PublishedList;
use crate::streams::sessions::{Session, StatsReport, XdsNode, XdsSession, XdsTypeStatus};
use crate::zones::ZoneReport;

/// What both views of a service say about it.
#[derive(Serialize)]
struct ServiceFigures<'a> {
    name: &'a str,
    /// Backends serving or not yet checked.
    healthy: usize,
    /// Backends the policy listed.
    listed: usize,
    list_version: u64,
    panic: bool,
    /// Sources disagreeing about the service, when they do.
    conflict: Option<String>,
    /// BalanceLoad streams on the service.
    clients: usize,
}

/// One service in `GET /api/v1/services`.
#[derive(Serialize)]
pub struct ServiceSummary<'a> {
    #[serde(flatten)]
    figures: ServiceFigures<'a>,
    /// Backends known (listed or not).
    backends: usize,
}

/// `GET /api/v1/services/{name}`: the summary's figures, each backend with
/// the policy's decision, and the calls clients reported.
#[derive(Serialize)]
pub struct ServiceDetail<'a> {
    #[serde(flatten)]
    figures: ServiceFigures<'a>,
    shed_fraction: f64,
    subset_size: usize,
    backends: Vec<BackendRow>,
    calls: CallsView,
    /// Per zone: clients, demand, capacity, local share and where the rest
    /// goes (the spill matrix); absent until a client connected with zone
    /// lists on.
    #[serde(skip_serializing_if = "Option::is_none")]
    zones: Option<ZoneReport>,
}

/// One backend of a service's detail.
#[derive(Serialize)]
pub struct BackendRow {
    /// What the catalog knows: source, health, load, weight, decision.
    #[serde(flatten)]
    backend: Backend,
    address: String,
    /// Entries of the published list that are this backend.
    list_entries: usize,
    /// Its fraction of the published list.
    list_share: f64,
    /// Clients whose subset holds it (only with per-client subsets).
    #[serde(skip_serializing_if = "Option::is_none")]
    subset_clients: Option<usize>,
    /// The replica that health-checks it (only in a cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    checked_by: Option<String>,
    /// What clients reported of its calls (LRS), pooled over them; absent
    /// until one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcomes: Option<OutcomesView>,
}

/// Calls clients reported for a service (sums of grpclb client stats).
#[derive(Serialize)]
pub struct CallsView {
    started: i64,
    finished: i64,
    failed_to_send: i64,
    known_received: i64,
    dropped: i64,
    dropped_by_token: BTreeMap<String, i64>,
}

/// One connected BalanceLoad stream in `GET /api/v1/clients`.
#[derive(Serialize)]
pub struct ClientView {
    id: u64,
    peer: Option<String>,
    /// The name the client asked for.
    name: String,
    /// The service it resolved to.
    service: String,
    since: String,
    lists_sent: u64,
    list_version: u64,
    last_stats: Option<StatsReport>,
    client_id: String,
    subset: Option<Vec<std::net::SocketAddr>>,
    /// The client's zone ("" = unknown: it gets the service's list).
    zone: String,
}

impl<'a> ServiceFigures<'a> {
    fn of(
        entry: &'a ServiceEntry,
        list: &PublishedList,
        backends: &[Backend],
        clients: usize,
    ) -> Self {
        ServiceFigures {
            name: entry.name(),
            healthy: backends.iter().filter(|b| b.health.is_healthy()).count(),
            listed: backends.iter().filter(|b| b.decision.listed).count(),
            list_version: list.version,
            panic: list.panic,
            conflict: entry.conflict(),
            clients,
        }
    }
}

impl<'a> ServiceSummary<'a> {
    /// The summary of `entry`, with `clients` streams open for it.
    pub fn of(entry: &'a ServiceEntry, clients: usize) -> Self {
        let backends = entry.backends();
        ServiceSummary {
            figures: ServiceFigures::of(entry, &entry.current_list(), &backends, clients),
            backends: backends.len(),
        }
    }
}

impl<'a> ServiceDetail<'a> {
    /// The detail of `entry`.
    pub fn of(entry: &'a ServiceEntry, s: &AdminState) -> Self {
        let list = entry.current_list();
        let backends = entry.backends();
        let figures = ServiceFigures::of(
            entry,
            &list,
            &backends,
            s.sessions.stream_counts().of(entry.name()),
        );
        let total = list.servers.len().max(1) as f64;
        let subset_counts = s.subsets.enabled().then(|| s.subsets.counts(entry.name()));
        let view = s.cluster.as_ref().map(|c| c.view());
        let now = std::time::Instant::now();
        entry
            .outcomes
            .retain(|a| backends.iter().any(|b| b.addr == *a));
        let rows = backends
            .into_iter()
            .map(|b| {
                let entries = list
                    .servers
                    .iter()
                    .filter(|s| s.load_balance_token == b.token)
                    .count();
                BackendRow {
                    address: b.addr.to_string(),
                    list_entries: entries,
                    list_share: entries as f64 / total,
                    subset_clients: subset_counts
                        .as_ref()
                        .map(|c| c.get(&b.addr).copied().unwrap_or(0)),
                    checked_by: view.as_ref().map(|v| {
                        v.owner(entry.name(), b.addr)
                            .unwrap_or(&v.replica_id)
                            .to_string()
                    }),
                    outcomes: entry.outcomes.view(b.addr, now),
                    backend: b,
                }
            })
            .collect();
        let calls = &entry.calls;
        ServiceDetail {
            figures,
            shed_fraction: list.shed_fraction,
            subset_size: s.subsets.size(),
            backends: rows,
            calls: CallsView {
                started: calls.started.load(Ordering::Relaxed),
                finished: calls.finished.load(Ordering::Relaxed),
                failed_to_send: calls.failed_to_send.load(Ordering::Relaxed),
                known_received: calls.known_received.load(Ordering::Relaxed),
                dropped: calls.dropped.load(Ordering::Relaxed),
                dropped_by_token: calls.dropped_by_token.lock().expect("drops lock").clone(),
            },
            zones: s.zones.report(entry.name()),
        }
    }
}

impl From<&Session> for ClientView {
    fn from(c: &Session) -> Self {
        ClientView {
            id: c.id,
            peer: c.peer.map(|p| p.to_string()),
            name: c.name.clone(),
            service: c.service.clone(),
            since: humantime::format_rfc3339_millis(c.since).to_string(),
            lists_sent: c.lists_sent.load(Ordering::Relaxed),
            list_version: c.list_version.load(Ordering::Relaxed),
            last_stats: c.last_stats.lock().expect("stats lock").clone(),
            client_id: c.client_id.clone(),
            subset: c.subset.lock().expect("subset lock").clone(),
            zone: c.zone.lock().expect("zone lock").clone(),
        }
    }
}

/// One ADS stream, as `/api/v1/clients` shows it.
#[derive(Serialize)]
pub struct XdsClientView {
    id: u64,
    peer: Option<String>,
    since: String,
    node: XdsNode,
    responses_sent: u64,
    /// Per type (`lds`, `rds`, `cds`, `eds`): subscribed names, versions
    /// sent and accepted, the last rejection.
    types: std::collections::BTreeMap<&'static str, XdsTypeStatus>,
}

impl From<&XdsSession> for XdsClientView {
    fn from(c: &XdsSession) -> Self {
        XdsClientView {
            id: c.id,
            peer: c.peer.map(|p| p.to_string()),
            since: humantime::format_rfc3339_millis(c.since).to_string(),
            node: c.node.lock().expect("node lock").clone(),
            responses_sent: c.responses_sent.load(Ordering::Relaxed),
            types: c.types.lock().expect("types lock").clone(),
        }
    }
}
