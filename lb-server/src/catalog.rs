//! The catalog: everything the LB knows about services and their backends,
//! and the server list currently published for each service.
//!
//! Registry sources write into it through [`crate::registry::RegistrySink`].
//! Every change recomputes that service's list with the [`Policy`] and, when
//! the list differs, publishes it on a `tokio::sync::watch` channel: latest
//! wins, so a slow stream never holds up the registry or other streams.
//! Locks are per service, plain `std` mutexes never held across an await.
//!
//! Health checks and load reports are written here too ([`Catalog::set_health`],
//! [`Catalog::set_load`]); a health change republishes at once, load reports
//! are folded in by the periodic [`Catalog::refresh_all`]. Each backend keeps
//! the policy's last [`Decision`] about it, for the admin API.
//!
//! A service, once seen, stays known for the life of the process (with an
//! empty list when it has no backends), so that clients of a service whose
//! backends are all gone see "no servers" rather than "unknown service".

use std::collections::{BTreeMap, HashSet};
use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use dashmap::DashMap;

use tokio::sync::watch;

use crate::log_limit::LogLimiter;
use crate::metrics::{CallLabels, Metrics, ServiceLabels};
use crate::model::{HealthState, Instance, LoadSample, RejectReason, Rejected};
use crate::policy::{Candidate, Decision, Load, Policy};
use crate::snapshot::PublishedList;

/// A backend as the catalog knows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Backend {
    /// Registry source that reported it.
    pub source: &'static str,
    /// Its key in that source.
    pub key: String,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Registry weight.
    pub weight: u32,
    /// Load-balance token sent in lists (stable for a given service and address).
    pub token: String,
    /// Registry metadata.
    pub metadata: Option<serde_json::Value>,
    /// When it was first reported.
    #[serde(with = "humantime_serde_compat")]
    pub registered_at: SystemTime,
    /// Health as last checked.
    pub health: HealthState,
    /// Since when the health has been what it is.
    #[serde(with = "humantime_serde_compat")]
    pub health_since: SystemTime,
    /// Detail of the last health change (error text, status).
    pub health_detail: String,
    /// Health transitions in the last [`FLAP_WINDOW`] (the first check of a
    /// new backend not counted): a flapping backend shows here at a glance.
    #[serde(rename = "health_transitions_10m")]
    pub recent_transitions: RecentTransitions,
    /// Since when it has been serving (slow start).
    #[serde(skip)]
    pub serving_since: Option<Instant>,
    /// Load as weighting uses it.
    #[serde(skip)]
    pub load: Option<Load>,
    /// The last ORCA report, as received.
    pub load_report: Option<LoadReport>,
    /// Taken out of lists by an operator, kept registered.
    pub drained: bool,
    /// The policy's last decision about it.
    pub decision: Decision,
    /// Operator's weight override, replacing the registry weight until it expires.
    pub weight_override: Option<WeightOverride>,
}

/// The window of [`Backend::recent_transitions`].
pub const FLAP_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// When a backend's recent health transitions happened (bounded: at most
/// [`RecentTransitions::CAP`] are remembered). Serialized as their count
/// within [`FLAP_WINDOW`].
#[derive(Debug, Clone, Default)]
pub struct RecentTransitions(std::collections::VecDeque<Instant>);

impl RecentTransitions {
    /// Most transitions remembered per backend.
    pub const CAP: usize = 256;

    fn record(&mut self, now: Instant) {
        self.forget_before(now);
        if self.0.len() == Self::CAP {
            self.0.pop_front();
        }
        self.0.push_back(now);
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .0
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > FLAP_WINDOW)
        {
            self.0.pop_front();
        }
    }

    /// Transitions within the window ending now.
    pub fn count(&self) -> usize {
        let now = Instant::now();
        self.0
            .iter()
            .filter(|t| now.saturating_duration_since(**t) <= FLAP_WINDOW)
            .count()
    }
}

impl serde::Serialize for RecentTransitions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.count() as u64)
    }
}

/// An operator's weight override.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WeightOverride {
    /// The weight used instead of the registry weight.
    pub weight: u32,
    /// When it lapses.
    #[serde(with = "humantime_serde_compat")]
    pub until: SystemTime,
    #[serde(skip)]
    expires: Instant,
}

/// The last load report of a backend, as shown to operators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// What it said.
    #[serde(flatten)]
    pub sample: LoadSample,
    /// When it arrived.
    #[serde(with = "humantime_serde_compat")]
    pub received_at: SystemTime,
}

/// Call counters reported by clients for one service (sums of client stats).
#[derive(Debug, Default)]
pub struct CallTotals {
    /// Calls started.
    pub started: AtomicI64,
    /// Calls finished.
    pub finished: AtomicI64,
    /// Calls that failed before being sent.
    pub failed_to_send: AtomicI64,
    /// Calls whose response the client received.
    pub known_received: AtomicI64,
    /// Calls dropped on a drop entry.
    pub dropped: AtomicI64,
    /// Dropped calls per load-balance token.
    pub dropped_by_token: Mutex<BTreeMap<String, i64>>,
}

/// One service.
pub struct ServiceEntry {
    name: String,
    backends: Mutex<BTreeMap<(&'static str, String), Backend>>,
    list: watch::Sender<Arc<PublishedList>>,
    /// Sums of the client stats reported for this service.
    pub calls: CallTotals,
    /// Why some of its backends are ignored: two registry sources define it.
    conflict: Mutex<Option<String>>,
}

impl ServiceEntry {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The registry conflict over this service, if two sources define it.
    pub fn conflict(&self) -> Option<String> {
        self.conflict.lock().expect("conflict lock").clone()
    }

    /// The list published now.
    pub fn current_list(&self) -> Arc<PublishedList> {
        self.list.borrow().clone()
    }

    /// Subscribes to published lists (the current one is marked unseen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<PublishedList>> {
        let mut rx = self.list.subscribe();
        rx.mark_changed();
        rx
    }

    /// A copy of the backends now known.
    pub fn backends(&self) -> Vec<Backend> {
        self.backends
            .lock()
            .expect("catalog lock")
            .values()
            .cloned()
            .collect()
    }
}

/// All services.
pub struct Catalog {
    services: DashMap<String, Arc<ServiceEntry>>,
    policy: Policy,
    metrics: Arc<Metrics>,
    synced: Mutex<HashSet<&'static str>>,
    sources: usize,
    initial_health: HealthState,
    members: watch::Sender<u64>,
    synced_at: Mutex<Option<Instant>>,
    limits: CatalogLimits,
    log: LogLimiter,
    source_order: Vec<&'static str>,
    /// The services each (source, key) is in, so that a removal, which
    /// names only the key, touches those services and no other.
    index: DashMap<(&'static str, String), Vec<String>>,
}

/// Caps on what registries may put in the catalog.
#[derive(Debug, Clone, Copy)]
pub struct CatalogLimits {
    /// Most services tracked.
    pub max_services: usize,
    /// Most backends per service.
    pub max_backends_per_service: usize,
}

impl Default for CatalogLimits {
    fn default() -> Self {
        CatalogLimits {
            max_services: 10_000,
            max_backends_per_service: 10_000,
        }
    }
}

/// Membership and list changes of one subject are logged at most this often
/// (a key flapping a thousand times a second writes one line per interval).
const CHANGE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Backends that become healthy this soon after the registry was first
/// listed are the LB's starting state, not newcomers: no slow start for them.
const STARTUP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl Catalog {
    /// The metrics every part of the LB counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// An empty catalog fed by `sources` registry sources. With
    /// `health_checked`, new backends start as [`HealthState::Unknown`] until
    /// checked; without, as [`HealthState::Unchecked`] (treated as serving).
    pub fn new(
        policy: Policy,
        metrics: Arc<Metrics>,
        sources: usize,
        health_checked: bool,
    ) -> Self {
        Catalog {
            services: DashMap::new(),
            policy,
            metrics,
            synced: Mutex::new(HashSet::new()),
            sources,
            initial_health: if health_checked {
                HealthState::Unknown
            } else {
                HealthState::Unchecked
            },
            members: watch::channel(0).0,
            synced_at: Mutex::new(None),
            limits: CatalogLimits::default(),
            log: LogLimiter::new(CHANGE_LOG_INTERVAL),
            source_order: Vec::new(),
            index: DashMap::new(),
        }
    }

    /// The same catalog with caps on services and backends.
    pub fn with_limits(mut self, limits: CatalogLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Registry sources in priority order (`--registry` order): a service
    /// two sources define is served from the earlier one.
    pub fn with_source_order(mut self, names: Vec<&'static str>) -> Self {
        self.sources = names.len();
        self.source_order = names;
        self
    }

    /// Rank of a source: its place in the configured order (unknown
    /// sources after the known ones, by name).
    fn priority(&self, source: &str) -> (usize, String) {
        match self.source_order.iter().position(|s| *s == source) {
            Some(i) => (i, String::new()),
            None => (usize::MAX, source.to_string()),
        }
    }

    /// Records whether sources other than `owner` also define the service;
    /// returns the reason given to their ignored backends.
    fn note_conflict(
        &self,
        entry: &ServiceEntry,
        backends: &BTreeMap<(&'static str, String), Backend>,
        owner: Option<&'static str>,
    ) -> Option<String> {
        let mut others: Vec<&'static str> = backends
            .keys()
            .map(|(src, _)| *src)
            .filter(|src| Some(*src) != owner)
            .collect();
        others.sort();
        others.dedup();
        let labels = ServiceLabels {
            service: entry.name.clone(),
        };
        let text = (!others.is_empty()).then(|| {
            format!(
                "conflict: service {:?} is defined by registry source {} (first in --registry) and also by {}; only {}'s backends are used",
                entry.name,
                owner.unwrap_or("?"),
                others.join(", "),
                owner.unwrap_or("?"),
            )
        });
        let mut current = entry.conflict.lock().expect("conflict lock");
        if *current != text {
            match &text {
                Some(t) => {
                    tracing::warn!(service = %entry.name, "{t}");
                    self.metrics
                        .registry_conflicts
                        .get_or_create(&labels)
                        .set(others.len() as i64);
                }
                None => {
                    tracing::info!(service = %entry.name, "registry conflict resolved");
                    self.metrics.registry_conflicts.remove(&labels);
                }
            }
            current.clone_from(&text);
        }
        text
    }

    /// Whether a change line about `subject` may be logged now.
    fn log_change(&self, subject: std::fmt::Arguments<'_>) -> Option<u64> {
        self.log.allow(&subject.to_string())
    }

    /// Every (service, backend address) pair known now.
    pub fn members(&self) -> Vec<(String, SocketAddr)> {
        let mut out = Vec::new();
        for e in self.services.iter() {
            let backends = e.value().backends.lock().expect("catalog lock");
            out.extend(backends.values().map(|b| (e.key().clone(), b.addr)));
        }
        out.sort();
        out.dedup();
        out
    }

    /// Changes whenever a backend address appears or disappears.
    pub fn subscribe_members(&self) -> watch::Receiver<u64> {
        self.members.subscribe()
    }

    fn members_changed(&self) {
        self.members.send_modify(|g| *g += 1);
    }

    /// Applies `f` to every backend of `service` at `addr`; republishes if it
    /// returned true for any (then returns true), right away or (`defer`) at
    /// the next refresh.
    fn update_backends(
        &self,
        service: &str,
        addr: SocketAddr,
        defer: bool,
        mut f: impl FnMut(&mut Backend) -> bool,
    ) -> bool {
        let Some(entry) = self.service(service) else {
            return false;
        };
        let mut backends = entry.backends.lock().expect("catalog lock");
        let mut changed = false;
        for b in backends.values_mut().filter(|b| b.addr == addr) {
            changed |= f(b);
        }
        if changed && !defer {
            self.publish(&entry, &mut backends);
        }
        changed
    }

    /// Records a health check result; the list is republished at once.
    pub fn set_health(&self, service: &str, addr: SocketAddr, health: HealthState, detail: &str) {
        let metrics = &self.metrics;
        let now = Instant::now();
        let warm = self
            .synced_at
            .lock()
            .expect("synced lock")
            .is_some_and(|t| now.saturating_duration_since(t) > STARTUP_GRACE);
        self.update_backends(service, addr, false, |b| {
            if b.health == health {
                return false;
            }
            // One line per service and interval: 100,000 backends of a
            // zone going down write a line per service, not one each.
            if let Some(repeats) = self.log_change(format_args!("{service}|health")) {
                tracing::info!(service, %addr, from = ?b.health, to = ?health, detail, changes_not_logged = repeats, "health changed");
            }
            metrics.health_transition(service, health);
            if b.health != HealthState::Unknown {
                b.recent_transitions.record(now);
            }
            // Slow start applies to backends that become healthy once the LB
            // is warm; those found at startup are already carrying load.
            b.serving_since = (health == HealthState::Serving && warm).then_some(now);
            b.health = health;
            b.health_since = SystemTime::now();
            b.health_detail = detail.to_string();
            true
        });
    }

    /// Records a load report; weights follow at the next refresh.
    pub fn set_load(&self, service: &str, addr: SocketAddr, report: &LoadSample) {
        let now = Instant::now();
        let utilization = report.utilization();
        let penalty = self.policy.weights.error_penalty;
        let usable =
            crate::policy::raw_weight(report.qps, report.eps, utilization, penalty).is_some();
        let expiry = self.policy.weights.expiry;
        self.update_backends(service, addr, true, |b| {
            let previous = b
                .load
                .as_ref()
                .filter(|l| now.saturating_duration_since(l.at) <= expiry);
            let usable_since = if usable {
                previous.and_then(|l| l.usable_since).or(Some(now))
            } else {
                None
            };
            b.load = Some(Load {
                utilization,
                qps: report.qps,
                eps: report.eps,
                at: now,
                usable_since,
            });
            b.load_report = Some(LoadReport {
                sample: report.clone(),
                received_at: SystemTime::now(),
            });
            true
        });
    }

    /// Forgets a backend's load (its report stream ended).
    pub fn clear_load(&self, service: &str, addr: SocketAddr) {
        self.update_backends(service, addr, true, |b| {
            let had = b.load.is_some();
            b.load = None;
            had
        });
    }

    /// Takes a backend out of lists (or puts it back), keeping it registered.
    /// Returns false when no such backend exists.
    pub fn set_drained(&self, service: &str, addr: SocketAddr, drained: bool) -> bool {
        self.update_backends(service, addr, false, |b| {
            b.drained = drained;
            true
        })
    }

    /// Sets (or with `None` clears) an operator's weight override of a
    /// backend, lasting `ttl`. Returns false when no such backend exists.
    pub fn set_weight_override(
        &self,
        service: &str,
        addr: SocketAddr,
        over: Option<(u32, std::time::Duration)>,
    ) -> bool {
        self.update_backends(service, addr, false, |b| {
            b.weight_override = over.map(|(weight, ttl)| WeightOverride {
                weight: weight.max(1),
                until: SystemTime::now() + ttl,
                expires: Instant::now() + ttl,
            });
            true
        })
    }

    /// Recomputes every service's list (time-dependent inputs: load
    /// reports, blackout and expiry, slow start). Publishes only changes.
    pub fn refresh_all(&self) {
        for entry in self.services() {
            let mut backends = entry.backends.lock().expect("catalog lock");
            self.publish(&entry, &mut backends);
        }
    }

    /// The service named exactly `name`, if known.
    pub fn service(&self, name: &str) -> Option<Arc<ServiceEntry>> {
        self.services.get(name).map(|e| e.value().clone())
    }

    /// Whether a service named exactly `name` is known.
    pub fn contains(&self, name: &str) -> bool {
        self.services.contains_key(name)
    }

    /// Every known service, sorted by name.
    pub fn services(&self) -> Vec<Arc<ServiceEntry>> {
        let mut all: Vec<_> = self.services.iter().map(|e| e.value().clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Whether every registry source has listed its contents at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.lock().expect("synced lock").len() >= self.sources
    }

    /// The configured sources that have not listed their contents yet.
    pub fn unsynced(&self) -> Vec<&'static str> {
        let synced = self.synced.lock().expect("synced lock");
        self.source_order
            .iter()
            .copied()
            .filter(|s| !synced.contains(s))
            .collect()
    }

    /// Records that `source` has listed its contents.
    pub fn mark_synced(&self, source: &'static str) {
        if self.synced.lock().expect("synced lock").insert(source) {
            tracing::info!(source, "registry synced");
        }
        if self.is_synced() {
            self.synced_at
                .lock()
                .expect("synced lock")
                .get_or_insert_with(Instant::now);
        }
    }

    fn entry(&self, service: &str) -> Result<Arc<ServiceEntry>, Rejected> {
        if let Some(e) = self.services.get(service) {
            return Ok(e.value().clone());
        }
        if self.services.len() >= self.limits.max_services {
            return Err(Rejected::new(
                RejectReason::Limit,
                format!(
                    "service {service:?} would pass the limit of {} services (--max-services)",
                    self.limits.max_services
                ),
            ));
        }
        Ok(self
            .services
            .entry(service.to_string())
            .or_insert_with(|| {
                tracing::info!(service, "new service");
                let (list, _) = watch::channel(Arc::new(PublishedList::empty()));
                Arc::new(ServiceEntry {
                    name: service.to_string(),
                    backends: Mutex::new(BTreeMap::new()),
                    list,
                    calls: CallTotals::default(),
                    conflict: Mutex::new(None),
                })
            })
            .value()
            .clone())
    }

    /// Adds or updates one instance reported by `source`; refused when it
    /// would pass a limit.
    pub fn upsert(&self, source: &'static str, instance: Instance) -> Result<(), Rejected> {
        let entry = self.entry(&instance.service)?;
        let mut backends = entry.backends.lock().expect("catalog lock");
        self.check_room(&backends, source, &instance)?;
        if self.apply_upsert(&mut backends, source, instance) {
            self.publish(&entry, &mut backends);
            drop(backends);
            self.members_changed();
        }
        Ok(())
    }

    /// Refuses a new backend beyond the per-service cap.
    fn check_room(
        &self,
        backends: &BTreeMap<(&'static str, String), Backend>,
        source: &'static str,
        i: &Instance,
    ) -> Result<(), Rejected> {
        let max = self.limits.max_backends_per_service;
        if backends.len() >= max && !backends.contains_key(&(source, i.key.clone())) {
            return Err(Rejected::new(
                RejectReason::Limit,
                format!(
                    "service {:?} has {max} backends, the limit (--max-backends-per-service)",
                    i.service
                ),
            ));
        }
        Ok(())
    }

    /// Removes the instance `key` reported by `source`, wherever it is. Costs
    /// the same with 10 services or 10,000: only the services holding the
    /// key are touched.
    pub fn remove(&self, source: &'static str, key: &str) {
        let services = self
            .index
            .remove(&(source, key.to_string()))
            .map(|(_, s)| s)
            .unwrap_or_default();
        for entry in services.iter().filter_map(|s| self.service(s)) {
            let mut backends = entry.backends.lock().expect("catalog lock");
            if let Some(gone) = backends.remove(&(source, key.to_string())) {
                if !backends.values().any(|b| b.addr == gone.addr) {
                    self.metrics.forget_backend(&entry.name, gone.addr);
                }
                if let Some(repeats) = self.log_change(format_args!("{}|{key}|removed", entry.name))
                {
                    tracing::info!(service = %entry.name, key = ?key, addr = %gone.addr, repeats_not_logged = repeats, "backend removed");
                }
                self.publish(&entry, &mut backends);
                drop(backends);
                self.members_changed();
            }
        }
    }

    /// Notes that `service` holds (source, key).
    fn index_add(&self, source: &'static str, key: &str, service: &str) {
        let mut services = self.index.entry((source, key.to_string())).or_default();
        if !services.iter().any(|s| s == service) {
            services.push(service.to_string());
        }
    }

    /// Notes that `service` no longer holds (source, key).
    fn index_drop(&self, source: &'static str, key: &str, service: &str) {
        let slot = (source, key.to_string());
        if let Some(mut services) = self.index.get_mut(&slot) {
            services.retain(|s| s != service);
        }
        self.index
            .remove_if(&slot, |_, services| services.is_empty());
    }

    /// Replaces everything `source` reported with `instances`; returns the
    /// instances refused by a limit, with their keys.
    pub fn replace_source(
        &self,
        source: &'static str,
        instances: Vec<Instance>,
    ) -> Vec<(String, Rejected)> {
        self.replace(source, None, instances)
    }

    /// Replaces what `source` reported for `service` only with `instances`
    /// (instances of other services in the list are ignored).
    pub fn replace_source_service(
        &self,
        source: &'static str,
        service: &str,
        instances: Vec<Instance>,
    ) -> Vec<(String, Rejected)> {
        let only: Vec<Instance> = instances
            .into_iter()
            .filter(|i| i.service == service)
            .collect();
        self.replace(source, Some(service), only)
    }

    fn replace(
        &self,
        source: &'static str,
        only: Option<&str>,
        instances: Vec<Instance>,
    ) -> Vec<(String, Rejected)> {
        let mut refused = Vec::new();
        let mut by_service: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for i in instances {
            by_service.entry(i.service.clone()).or_default().push(i);
        }
        match only {
            Some(service) => {
                by_service.entry(service.to_string()).or_default();
            }
            None => {
                for entry in self.services() {
                    if !by_service.contains_key(&entry.name) {
                        by_service.insert(entry.name.clone(), Vec::new());
                    }
                }
            }
        }
        for (service, fresh) in by_service {
            if fresh.is_empty() && !self.contains(&service) {
                continue;
            }
            let entry = match self.entry(&service) {
                Ok(e) => e,
                Err(r) => {
                    refused.extend(fresh.into_iter().map(|i| (i.key, r.clone())));
                    continue;
                }
            };
            let mut backends = entry.backends.lock().expect("catalog lock");
            let keep: HashSet<String> = fresh.iter().map(|i| i.key.clone()).collect();
            let before = backends.len();
            backends.retain(|(src, key), b| {
                let retained = *src != source || keep.contains(key);
                if !retained {
                    tracing::info!(service = %service, key = ?key, addr = %b.addr, "backend removed (not in re-list)");
                    self.metrics.forget_backend(&service, b.addr);
                    self.index_drop(source, key, &service);
                }
                retained
            });
            let mut changed = backends.len() != before;
            for i in fresh {
                match self.check_room(&backends, source, &i) {
                    Ok(()) => changed |= self.apply_upsert(&mut backends, source, i),
                    Err(r) => refused.push((i.key, r)),
                }
            }
            if changed {
                self.publish(&entry, &mut backends);
                drop(backends);
                self.members_changed();
            }
        }
        refused
    }

    /// Adds one client-stats report to the service's totals.
    pub fn record_client_stats(
        &self,
        entry: &ServiceEntry,
        stats: &lb_proto::grpc::lb::v1::ClientStats,
    ) {
        let dropped: i64 = stats
            .calls_finished_with_drop
            .iter()
            .map(|d| d.num_calls.max(0))
            .sum();
        if dropped > 0 {
            let mut by_token = entry.calls.dropped_by_token.lock().expect("drops lock");
            for d in &stats.calls_finished_with_drop {
                // Bounded: tokens are the LB's own (< 50 bytes); junk is ignored.
                let known = by_token.contains_key(&d.load_balance_token);
                if d.load_balance_token.len() < 50 && (known || by_token.len() < 1024) {
                    *by_token.entry(d.load_balance_token.clone()).or_default() +=
                        d.num_calls.max(0);
                }
            }
        }
        for (counter, kind, n) in [
            (&entry.calls.started, "started", stats.num_calls_started),
            (&entry.calls.finished, "finished", stats.num_calls_finished),
            (
                &entry.calls.failed_to_send,
                "failed_to_send",
                stats.num_calls_finished_with_client_failed_to_send,
            ),
            (
                &entry.calls.known_received,
                "known_received",
                stats.num_calls_finished_known_received,
            ),
            (&entry.calls.dropped, "dropped", dropped),
        ] {
            let n = n.max(0);
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
                self.metrics
                    .client_calls
                    .get_or_create(&CallLabels {
                        service: entry.name.clone(),
                        kind: kind.into(),
                    })
                    .inc_by(n as u64);
            }
        }
    }

    /// Recomputes the service's list, records the decisions, and publishes
    /// the list if it changed.
    fn publish(
        &self,
        entry: &ServiceEntry,
        backends: &mut BTreeMap<(&'static str, String), Backend>,
    ) {
        let now = Instant::now();
        for b in backends.values_mut() {
            if b.weight_override.as_ref().is_some_and(|o| o.expires <= now) {
                tracing::info!(service = %entry.name, addr = %b.addr, "weight override expired");
                b.weight_override = None;
            }
        }
        // A service belongs to one source: the first (in --registry order)
        // that defines it. Another source defining it too is a conflict,
        // reported, and its backends are left out.
        let owner = backends
            .keys()
            .map(|(src, _)| *src)
            .min_by_key(|src| self.priority(src));
        let conflict = self.note_conflict(entry, backends, owner);
        let outcome = {
            let candidates: Vec<Candidate<'_>> = backends
                .values()
                .filter(|b| Some(b.source) == owner)
                .map(|b| Candidate {
                    addr: b.addr,
                    token: &b.token,
                    weight: b
                        .weight_override
                        .as_ref()
                        .map(|o| o.weight)
                        .unwrap_or(b.weight),
                    health: b.health,
                    serving_since: b.serving_since,
                    load: b.load.as_ref(),
                    drained: b.drained,
                })
                .collect();
            self.policy.build(&candidates, now)
        };
        let mut decisions = outcome.decisions.into_iter();
        for b in backends.values_mut() {
            let d = if Some(b.source) == owner {
                decisions.next().unwrap_or_default()
            } else {
                Decision {
                    listed: false,
                    weight: 0.0,
                    entries: 0,
                    reason: conflict.clone().unwrap_or_default(),
                }
            };
            self.metrics
                .set_backend(&entry.name, b.addr, d.weight, b.health);
            b.decision = d;
        }
        let labels = ServiceLabels {
            service: entry.name.clone(),
        };
        self.metrics
            .backends
            .get_or_create(&labels)
            .set(backends.len() as i64);
        let (servers, panic, shed_fraction) =
            (outcome.servers, outcome.panic, outcome.shed_fraction);
        entry.list.send_if_modified(|current| {
            if current.servers == servers && current.panic == panic {
                return false;
            }
            let version = current.version + 1;
            if let Some(repeats) = self.log_change(format_args!("{}|list", entry.name)) {
                tracing::info!(service = %entry.name, version, servers = servers.len(), panic, changes_not_logged = repeats, "list changed");
            }
            self.metrics.list_version.get_or_create(&labels).set(version as i64);
            *current = Arc::new(PublishedList::new(version, servers, panic, shed_fraction));
            true
        });
    }
}

impl Catalog {
    /// Applies one upsert; returns whether anything changed.
    fn apply_upsert(
        &self,
        backends: &mut BTreeMap<(&'static str, String), Backend>,
        source: &'static str,
        i: Instance,
    ) -> bool {
        let initial_health = self.initial_health;
        let slot = (source, i.key.clone());
        if let Some(b) = backends.get_mut(&slot) {
            if b.addr == i.addr {
                if b.weight == i.weight && b.metadata == i.metadata {
                    return false;
                }
                // Same backend, new registry data: keep its health and load.
                if let Some(repeats) =
                    self.log_change(format_args!("{}|{}|updated", i.service, i.key))
                {
                    tracing::info!(service = %i.service, key = ?i.key, weight = i.weight, repeats_not_logged = repeats, "backend updated");
                }
                b.weight = i.weight;
                b.metadata = i.metadata;
                return true;
            }
        }
        // A backend at an address already known in this service (another key)
        // shares that address's health.
        let sibling = backends.values().find(|b| b.addr == i.addr).cloned();
        let registered_at = backends
            .get(&slot)
            .map(|b| b.registered_at)
            .unwrap_or(i.registered_at);
        self.index_add(source, &i.key, &i.service);
        if let Some(repeats) = self.log_change(format_args!("{}|{}|registered", i.service, i.key)) {
            tracing::info!(service = %i.service, key = ?i.key, addr = %i.addr, weight = i.weight, repeats_not_logged = repeats, "backend registered");
        }
        backends.insert(
            slot,
            Backend {
                source,
                token: token_for(&i.service, i.addr),
                key: i.key,
                addr: i.addr,
                weight: i.weight,
                metadata: i.metadata,
                registered_at,
                health: sibling.as_ref().map(|b| b.health).unwrap_or(initial_health),
                health_since: sibling
                    .as_ref()
                    .map(|b| b.health_since)
                    .unwrap_or_else(SystemTime::now),
                health_detail: sibling
                    .as_ref()
                    .map(|b| b.health_detail.clone())
                    .unwrap_or_default(),
                recent_transitions: sibling
                    .as_ref()
                    .map(|b| b.recent_transitions.clone())
                    .unwrap_or_default(),
                serving_since: sibling.as_ref().and_then(|b| b.serving_since),
                load: sibling.as_ref().and_then(|b| b.load.clone()),
                load_report: sibling.as_ref().and_then(|b| b.load_report.clone()),
                drained: false,
                weight_override: None,
                decision: Decision::default(),
            },
        );
        true
    }
}

/// The load-balance token of a backend: a short hash of service and
/// address, so it is stable for as long as the address is listed, the same
/// on every LB replica, and well under the protocol's 50-byte limit.
pub fn token_for(service: &str, addr: SocketAddr) -> String {
    let mut h = fnv::FnvHasher::default();
    h.write(service.as_bytes());
    h.write(b"|");
    h.write(addr.to_string().as_bytes());
    format!("{:016x}", h.finish())
}

/// Serializes `SystemTime` as RFC 3339 text.
mod humantime_serde_compat {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::new(
            Policy {
                max_list_len: 64,
                ..Policy::default()
            },
            Arc::new(Metrics::new()),
            1,
            false,
        )
    }

    fn inst(service: &str, key: &str, port: u16) -> Instance {
        Instance {
            service: service.into(),
            key: key.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            metadata: None,
            registered_at: SystemTime::now(),
        }
    }

    #[test]
    fn changes_publish_new_versions_and_identical_lists_do_not() {
        let c = catalog();
        c.upsert("etcd", inst("svc", "k1", 1)).unwrap();
        let e = c.service("svc").unwrap();
        assert_eq!(e.current_list().version, 1);
        c.upsert("etcd", inst("svc", "k1", 1)).unwrap();
        assert_eq!(
            e.current_list().version,
            1,
            "identical upsert must not publish"
        );
        c.upsert("etcd", inst("svc", "k2", 2)).unwrap();
        assert_eq!(e.current_list().version, 2);
        assert_eq!(e.current_list().servers.len(), 2);
        c.remove("etcd", "k1");
        assert_eq!(e.current_list().servers.len(), 1);
        c.remove("etcd", "k2");
        assert!(c.contains("svc"), "a service stays known when empty");
        assert!(e.current_list().servers.is_empty());
    }

    #[test]
    fn health_changes_republish_and_unchecked_backends_wait() {
        let c = Catalog::new(
            Policy {
                panic_threshold: 0.0,
                ..Policy::default()
            },
            Arc::new(Metrics::new()),
            1,
            true,
        );
        let mut members = c.subscribe_members();
        c.upsert("etcd", inst("svc", "k1", 1)).unwrap();
        c.upsert("etcd", inst("svc", "k2", 2)).unwrap();
        assert!(members.has_changed().unwrap());
        members.mark_unchanged();
        let e = c.service("svc").unwrap();
        assert!(
            e.current_list().servers.is_empty(),
            "nothing is listed before its first health check"
        );
        let a1 = SocketAddr::from(([127, 0, 0, 1], 1));
        let a2 = SocketAddr::from(([127, 0, 0, 1], 2));
        c.set_health("svc", a1, HealthState::Serving, "");
        c.set_health("svc", a2, HealthState::Serving, "");
        assert_eq!(e.current_list().servers.len(), 2);
        c.set_health("svc", a2, HealthState::Unreachable, "connection refused");
        assert_eq!(e.current_list().servers.len(), 1);
        let b2 = e.backends().into_iter().find(|b| b.addr == a2).unwrap();
        assert!(
            !b2.decision.listed && b2.decision.reason.contains("unreachable"),
            "{:?}",
            b2.decision
        );
        assert!(
            !members.has_changed().unwrap(),
            "health changes are not membership changes"
        );
        assert_eq!(c.members().len(), 2);
        assert!(c.set_drained("svc", a1, true));
        assert!(e.current_list().servers.is_empty());
    }

    fn ports(c: &Catalog, service: &str) -> Vec<i32> {
        let mut p: Vec<i32> = c
            .service(service)
            .unwrap()
            .current_list()
            .servers
            .iter()
            .map(|s| s.port)
            .collect();
        p.sort();
        p
    }

    #[test]
    fn replace_source_removes_missing_and_keeps_other_sources() {
        let c = catalog().with_source_order(vec!["etcd", "file"]);
        c.upsert("etcd", inst("svc", "k1", 1)).unwrap();
        c.upsert("etcd", inst("svc", "k2", 2)).unwrap();
        c.upsert("file", inst("other", "f1", 3)).unwrap();
        assert!(c
            .replace_source("etcd", vec![inst("svc", "k2", 2), inst("more", "k3", 4)])
            .is_empty());
        assert_eq!(ports(&c, "svc"), vec![2]);
        assert_eq!(ports(&c, "more"), vec![4]);
        assert_eq!(
            ports(&c, "other"),
            vec![3],
            "another source's service is untouched"
        );
        assert!(c
            .replace_source_service("file", "other", vec![inst("other", "f2", 5)])
            .is_empty());
        assert_eq!(ports(&c, "other"), vec![5]);
        assert_eq!(
            ports(&c, "svc"),
            vec![2],
            "replacing one service leaves the rest"
        );
    }

    #[test]
    fn a_service_two_sources_define_is_served_from_the_first_and_reported() {
        let c = catalog().with_source_order(vec!["file", "etcd"]);
        c.upsert("etcd", inst("svc", "k1", 1)).unwrap();
        assert_eq!(ports(&c, "svc"), vec![1]);
        assert!(c.service("svc").unwrap().conflict().is_none());
        c.upsert("file", inst("svc", "f1", 2)).unwrap();
        assert_eq!(
            ports(&c, "svc"),
            vec![2],
            "the first source in --registry order wins"
        );
        let e = c.service("svc").unwrap();
        let conflict = e.conflict().expect("conflict reported");
        assert!(
            conflict.contains("file") && conflict.contains("etcd"),
            "{conflict}"
        );
        let ignored = e
            .backends()
            .into_iter()
            .find(|b| b.source == "etcd")
            .unwrap();
        assert!(!ignored.decision.listed && ignored.decision.reason.starts_with("conflict"));
        c.remove("file", "f1");
        assert_eq!(ports(&c, "svc"), vec![1], "the other source takes over");
        assert!(c.service("svc").unwrap().conflict().is_none());
    }

    #[test]
    fn tokens_are_stable_and_short() {
        let a = SocketAddr::from(([10, 0, 0, 1], 80));
        assert_eq!(token_for("s", a), token_for("s", a));
        assert_ne!(token_for("s", a), token_for("t", a));
        assert!(token_for("s", a).len() < 50);
    }
}
