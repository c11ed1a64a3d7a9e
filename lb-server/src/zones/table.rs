//! One service's zone table: who calls from which zone and how much, the
//! plan in force, and the list published for each client zone.
//!
//! Streams join the table with their client's zone (unknown zones too:
//! their calls take capacity everywhere) and leave it when they end; their
//! client stats (grpclb) and load reports (LRS) add calls to their zone.
//! A task per table, running while any client of known zone is connected,
//! re-plans on every change of the service's list (health, weight,
//! membership: published at once) and once per tick for demand (published
//! only when some zone's row moved by more than [`DAMPING`]), so lists do
//! not follow every wobble of the measured rates.
//!
//! Zones are whatever clients say, and a new zone re-plans every zone's
//! list under the table's lock: a table plans for at most
//! `--zone-max-client-zones` client zones, and clients of further zones
//! count as of unknown zone (they get the service's list).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::plan::{self, Origin, Plan};
use super::{views, ZoneSettings};
use crate::catalog::ServiceEntry;
use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, ServiceLabels};
use crate::model::Locality;
use crate::snapshot::PublishedList;

/// A demand-driven plan is published only when some client zone's row
/// moved by more than this (the sum of its fractions' changes).
pub const DAMPING: f64 = 0.05;

/// How often demand is measured and the plan reconsidered.
pub const TICK: Duration = Duration::from_secs(1);

/// One service's zone table.
pub struct ZoneTable {
    service: Arc<ServiceEntry>,
    settings: Arc<ZoneSettings>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Lines about zones over the cap: one a minute.
    log: LogLimiter,
}

#[derive(Default)]
struct State {
    /// Per client zone ("" = unknown).
    demand: BTreeMap<String, ZoneDemand>,
    /// The list published for each client zone with clients.
    views: BTreeMap<String, watch::Sender<Arc<PublishedList>>>,
    /// The plan in force and the demand it was made for.
    plan: Plan,
    planned_for: BTreeMap<String, f64>,
    /// Version of the service list the views were built from.
    list_version: Option<u64>,
    /// Whether the planner task runs.
    running: bool,
}

#[derive(Default)]
struct ZoneDemand {
    region: String,
    /// Streams counted as clients.
    clients: usize,
    /// Streams (or LRS reporters) that have reported calls.
    reporters: usize,
    /// Calls started, as reported, since the zone was first seen.
    calls: u64,
    /// `(when, calls)` at report arrivals within the rate window (reports
    /// closer than [`COALESCE`] share one sample).
    samples: VecDeque<(Instant, u64)>,
    /// Whether any report ever arrived.
    reported: bool,
}

/// Reports arriving this close together are one sample.
const COALESCE: Duration = Duration::from_millis(100);

impl ZoneDemand {
    fn record(&mut self, started: u64, now: Instant) {
        self.calls = self.calls.saturating_add(started);
        self.reported = true;
        match self.samples.back_mut() {
            Some((t, c)) if now.saturating_duration_since(*t) < COALESCE => *c = self.calls,
            _ => self.samples.push_back((now, self.calls)),
        }
    }

    /// Calls per second between the first and last report of the window
    /// (the calls of the first report were made before it): exact for
    /// periodic reports, whatever their phase. Zero when reports stopped;
    /// unknown until they span `min_span`.
    fn rate(&self, min_span: Duration) -> Option<f64> {
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, c0)), Some((t1, c1))) if t1.saturating_duration_since(*t0) >= min_span => {
                Some((c1 - c0) as f64 / t1.saturating_duration_since(*t0).as_secs_f64())
            }
            (None, None) if self.reported && self.reporters > 0 => Some(0.0),
            _ => None,
        }
    }
}

/// A stream's place in a table; leaves it when dropped.
pub struct ZoneMember {
    table: Arc<ZoneTable>,
    zone: String,
    counted: bool,
    reported: AtomicBool,
    view: Option<watch::Receiver<Arc<PublishedList>>>,
}

impl ZoneMember {
    /// The client zone ("" = unknown).
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The zone's lists (the current one marked unseen), or `None` when the
    /// zone is unknown: such a client gets the service's list.
    pub fn lists(&self) -> Option<watch::Receiver<Arc<PublishedList>>> {
        self.view.as_ref().map(|v| {
            let mut rx = v.clone();
            rx.mark_changed();
            rx
        })
    }

    /// The zone's list now, if the zone is known.
    pub fn current(&self) -> Option<Arc<PublishedList>> {
        self.view.as_ref().map(|v| v.borrow().clone())
    }

    /// Adds `started` calls reported by this client.
    pub fn record_calls(&self, started: i64) {
        let first = !self.reported.swap(true, Ordering::Relaxed);
        let mut st = self.table.state.lock().expect("zone lock");
        let d = st.demand.entry(self.zone.clone()).or_default();
        d.record(started.max(0) as u64, Instant::now());
        if first {
            d.reporters += 1;
        }
    }
}

impl Drop for ZoneMember {
    fn drop(&mut self) {
        let mut st = self.table.state.lock().expect("zone lock");
        let Some(d) = st.demand.get_mut(&self.zone) else {
            return;
        };
        if self.counted {
            d.clients = d.clients.saturating_sub(1);
        }
        if self.reported.load(Ordering::Relaxed) {
            d.reporters = d.reporters.saturating_sub(1);
        }
        let (clients, reporters) = (d.clients, d.reporters);
        if clients == 0 {
            st.views.remove(&self.zone);
        }
        if clients == 0 && reporters == 0 {
            st.demand.remove(&self.zone);
        }
    }
}

impl ZoneTable {
    pub(super) fn new(
        service: Arc<ServiceEntry>,
        settings: Arc<ZoneSettings>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ZoneTable {
            service,
            settings,
            metrics,
            state: Mutex::new(State::default()),
            log: LogLimiter::default(),
        }
    }

    /// Whether this is the table of `entry` (not of an earlier entry of
    /// the same name).
    pub(super) fn serves(&self, entry: &Arc<ServiceEntry>) -> bool {
        Arc::ptr_eq(&self.service, entry)
    }

    /// Adds a client of `locality` (`counted`: a stream that calls; an LRS
    /// stream only reports). A zone beyond the first
    /// `--zone-max-client-zones` counts as unknown.
    pub(super) fn join(self: &Arc<Self>, locality: &Locality, counted: bool) -> ZoneMember {
        let mut st = self.state.lock().expect("zone lock");
        let zone = self.admit(&st, &locality.zone);
        let d = st.demand.entry(zone.clone()).or_default();
        if counted {
            d.clients += 1;
        }
        if !zone.is_empty() && !locality.region.is_empty() {
            d.region.clone_from(&locality.region);
        }
        let view = if zone.is_empty() || !counted {
            None
        } else {
            let new_zone = !st.views.contains_key(&zone);
            if new_zone {
                let list = self.service.current_list();
                st.views.insert(zone.clone(), watch::channel(list).0);
                // New demand: re-plan now, so the newcomer's first list is its own.
                self.replan(&mut st, true);
            }
            if !st.running {
                st.running = true;
                tokio::spawn(self.clone().run());
            }
            Some(st.views[&zone].subscribe())
        };
        ZoneMember {
            table: self.clone(),
            zone,
            counted,
            reported: AtomicBool::new(false),
            view,
        }
    }

    /// The zone a client of `zone` is counted in: its own, unless the
    /// service already has `--zone-max-client-zones` client zones (every
    /// new zone costs a re-plan of every zone's list, under this lock), in
    /// which case unknown (""), counted and logged.
    fn admit(&self, st: &State, zone: &str) -> String {
        if zone.is_empty() || st.demand.contains_key(zone) {
            return zone.to_string();
        }
        let zones = st.demand.len() - usize::from(st.demand.contains_key(""));
        let cap = self.settings.max_client_zones;
        if zones < cap {
            return zone.to_string();
        }
        let labels = ServiceLabels {
            service: self.service.name().to_string(),
        };
        self.metrics
            .zone_clients_over_cap
            .get_or_create(&labels)
            .inc();
        if let Some(held) = self.log.allow("over_cap") {
            tracing::warn!(
                service = self.service.name(),
                zone = %zone.chars().take(64).collect::<String>(),
                max_client_zones = cap,
                not_logged = held,
                "client zone beyond --zone-max-client-zones; its clients get the service's list"
            );
        }
        String::new()
    }

    /// The planner: re-plans on list changes and on ticks, while clients of
    /// known zone are connected.
    async fn run(self: Arc<Self>) {
        let mut lists = self.service.watch();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = lists.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let mut st = self.state.lock().expect("zone lock");
                    self.replan(&mut st, true);
                }
                _ = tick.tick() => {
                    let mut st = self.state.lock().expect("zone lock");
                    if st.views.is_empty() {
                        st.running = false;
                        return;
                    }
                    let now = Instant::now();
                    let window = self.settings.rate_window();
                    for d in st.demand.values_mut() {
                        while d.samples.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > window) {
                            d.samples.pop_front();
                        }
                    }
                    self.replan(&mut st, false);
                }
            }
        }
    }

    /// Demand per client zone now: measured rates, and clients that have
    /// not reported yet counted at the mean rate per reporting client of
    /// their zone (of the service, when nobody in their zone reports; 1
    /// call/s when nobody reports at all).
    fn demand(&self, st: &State) -> (BTreeMap<String, f64>, f64) {
        let min_span = self.settings.stats_interval.max(TICK) * 2;
        let mut reporting = 0usize;
        let mut rate_sum = 0.0;
        for d in st.demand.values() {
            if let Some(r) = d.rate(min_span) {
                rate_sum += r;
                reporting += d.reporters;
            }
        }
        let mean = if reporting > 0 {
            (rate_sum / reporting as f64).max(1e-3)
        } else {
            1.0
        };
        let mut out = BTreeMap::new();
        for (zone, d) in &st.demand {
            let demand = match d.rate(min_span) {
                Some(r) if d.reporters > 0 => {
                    let zone_mean = r / d.reporters as f64;
                    r + d.clients.saturating_sub(d.reporters) as f64 * zone_mean
                }
                _ => d.clients as f64 * mean,
            };
            out.insert(zone.clone(), demand);
        }
        let unzoned = out.remove("").unwrap_or(0.0);
        (out, unzoned)
    }

    /// Computes the plan; publishes it (and the views) when forced (a new
    /// list or a new zone) or when it moved past [`DAMPING`].
    fn replan(&self, st: &mut State, force: bool) {
        let list = self.service.current_list();
        let dests = views::destinations(&list);
        let (demand, unzoned) = self.demand(st);
        let origins: Vec<Origin> = demand
            .iter()
            .filter(|(zone, _)| st.views.contains_key(*zone))
            .map(|(zone, d)| Origin {
                zone: zone.clone(),
                region: match st.demand.get(zone).map(|z| z.region.as_str()) {
                    Some(r) if !r.is_empty() => r.to_string(),
                    _ => dests
                        .iter()
                        .find(|x| x.zone == *zone)
                        .map(|x| x.region.clone())
                        .unwrap_or_default(),
                },
                demand: *d,
            })
            .collect();
        let new = plan::plan(&origins, unzoned, &dests, &self.settings.plan);
        let new_list = st.list_version != Some(list.version);
        if !(force || new_list || new.distance(&st.plan) > DAMPING) {
            return;
        }
        let labels = ServiceLabels {
            service: self.service.name().to_string(),
        };
        self.metrics
            .zone_cross_fraction
            .get_or_create(&labels)
            .set(new.cross_zone);
        self.metrics.zone_plans.get_or_create(&labels).inc();
        let mut planned_for = demand;
        planned_for.insert(String::new(), unzoned);
        st.plan = new;
        st.planned_for = planned_for;
        st.list_version = Some(list.version);
        let empty = BTreeMap::new();
        for (zone, tx) in &st.views {
            let row = st.plan.rows.get(zone).unwrap_or(&empty);
            let (servers, failover) = views::view(&list, row, self.settings.max_list_len);
            tx.send_if_modified(|current| {
                if current.servers == servers
                    && current.failover == failover
                    && current.panic == list.panic
                    && current.localities == list.localities
                    && (current.decided() || !list.decided())
                {
                    return false;
                }
                let mut next = PublishedList::new(
                    current.version + 1,
                    servers,
                    list.panic,
                    list.shed_fraction,
                )
                .with_localities(list.localities.clone())
                .with_failover(failover);
                if new_list {
                    // The change came from the service's list: its age counts.
                    next.changed_at = list.changed_at;
                }
                *current = Arc::new(next);
                true
            });
        }
    }

    /// What the table holds now, for operators.
    pub fn report(&self) -> ZoneReport {
        let st = self.state.lock().expect("zone lock");
        let list = self.service.current_list();
        let dests = views::destinations(&list);
        let total_capacity: f64 = dests.iter().map(|d| d.capacity).sum();
        let total_demand: f64 = st.planned_for.values().sum();
        let mut zones: BTreeMap<String, ZoneRow> = BTreeMap::new();
        for d in &dests {
            let row = zones.entry(d.zone.clone()).or_default();
            row.region.clone_from(&d.region);
            row.backends = d.healthy;
            row.capacity_share = d.capacity / total_capacity.max(1e-9);
            row.planned_load = st.plan.loads.get(&d.zone).copied();
        }
        for (zone, d) in &st.demand {
            let row = zones.entry(zone.clone()).or_default();
            row.clients = d.clients;
            if row.region.is_empty() {
                row.region.clone_from(&d.region);
            }
        }
        for (zone, demand) in &st.planned_for {
            let row = zones.entry(zone.clone()).or_default();
            row.demand = *demand;
            row.demand_share = demand / total_demand.max(1e-9);
        }
        for (zone, spill) in &st.plan.rows {
            let row = zones.entry(zone.clone()).or_default();
            row.local_share = spill.get(zone).copied();
            row.spill.clone_from(spill);
        }
        ZoneReport {
            cross_zone_fraction: st.plan.cross_zone,
            tolerance: self.settings.plan.tolerance,
            min_healthy: self.settings.plan.min_healthy,
            zones: zones
                .into_iter()
                .map(|(zone, mut r)| {
                    r.zone = zone;
                    r
                })
                .collect(),
        }
    }
}

/// A service's zones as operators see them (`/api/v1/services/{name}`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ZoneReport {
    /// Fraction of zoned clients' calls planned across zones.
    pub cross_zone_fraction: f64,
    /// `--zone-overload-tolerance`.
    pub tolerance: f64,
    /// `--zone-min-healthy`.
    pub min_healthy: usize,
    /// Every zone that has backends or clients ("" = unknown).
    pub zones: Vec<ZoneRow>,
}

/// One zone, as a source of calls and as a destination.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ZoneRow {
    /// The zone ("" = unknown).
    pub zone: String,
    /// Its region, if known.
    pub region: String,
    /// Streams of clients in it.
    pub clients: usize,
    /// Its clients' calls per second as planned (clients not reporting yet
    /// counted at the mean rate).
    pub demand: f64,
    /// Its share of all demand.
    pub demand_share: f64,
    /// Healthy backends in it.
    pub backends: usize,
    /// Its share of the service's capacity.
    pub capacity_share: f64,
    /// Planned load relative to its capacity share (1.0 = its fair share).
    pub planned_load: Option<f64>,
    /// Fraction of its clients' calls kept in it.
    pub local_share: Option<f64>,
    /// Where its clients' calls go: zone → fraction (a row of the matrix).
    pub spill: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::SystemTime;

    use super::*;
    use crate::catalog::Catalog;
    use crate::config::Config;
    use crate::model::Instance;
    use crate::policy::Policy;

    /// A service with one backend in each of zones a, b and c, and its
    /// zone table with the default settings.
    fn table() -> (Arc<Catalog>, Arc<ZoneTable>) {
        let metrics = Arc::new(Metrics::new());
        let catalog = Arc::new(Catalog::new(Policy::default(), metrics.clone(), 1, false));
        for (i, zone) in ["a", "b", "c"].into_iter().enumerate() {
            catalog
                .upsert(
                    "memory",
                    Instance {
                        service: "svc".into(),
                        key: zone.into(),
                        addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                        weight: 1,
                        metadata: Some(serde_json::json!({ "zone": zone })),
                        registered_at: SystemTime::now(),
                    },
                )
                .unwrap();
        }
        let cfg = Config::with_addrs(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        );
        let settings = cfg
            .zones
            .settings(cfg.policy.max_list_len, cfg.grpc.client_stats_interval)
            .unwrap();
        let entry = catalog.service("svc").unwrap();
        let table = Arc::new(ZoneTable::new(entry, Arc::new(settings), metrics));
        (catalog, table)
    }

    /// Clients of 2,000 made-up zones (through `lb-client-zone` or an xDS
    /// node's locality) on one service: the zones planned for stay capped,
    /// the rest share the unknown zone's list, and joining stays cheap.
    #[tokio::test]
    async fn client_zones_beyond_the_cap_are_treated_as_unknown() {
        let (_catalog, table) = table();
        let cap = table.settings.max_client_zones;
        assert_eq!(cap, 256, "the default");
        let started = Instant::now();
        let mut members = Vec::new();
        for i in 0..2_000 {
            let zone = format!("made-up-{i}");
            members.push(table.join(&Locality::new("", &zone), true));
            members.push(table.join(&Locality::new("", &format!("reporter-{i}")), false));
            let (views, demand) = {
                let st = table.state.lock().unwrap();
                (st.views.len(), st.demand.len())
            };
            assert!(
                views <= cap && demand <= cap + 1,
                "{views} zone views and {demand} zones of demand after {} client zones",
                i + 1
            );
        }
        let first = &members[0];
        assert!(
            first.current().is_some(),
            "zones within the cap get their view"
        );
        let last = &members[members.len() - 2];
        assert_eq!(last.zone(), "", "zones beyond the cap are unknown");
        assert!(last.current().is_none());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "2,000 client zones took {:?}",
            started.elapsed()
        );
        drop(members);
        let st = table.state.lock().unwrap();
        assert!(st.views.is_empty() && st.demand.is_empty());
    }
}
