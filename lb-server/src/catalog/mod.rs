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
//! | module | job |
//! | --- | --- |
//! | this one | the service table, lookups, readiness, membership |
//! | `backend` | the data model: a backend and what is known of it |
//! | `ingest` | what registries report (within the caps) |
//! | `observe` | what probes and operators say |
//! | `publish` | policy → snapshot, source priority and conflicts |
//! | `calls` | client stats, summed per service |
//! | `outcomes` | what clients saw of each backend, pooled over a window |
//! | `ejections` | the gray-failure detector's verdicts on those, applied |
//! | `journal` | each change, as an event, for history |
//! | `startup` | the starting state logged as one summary, not per service |
//! | `evict` | forgetting services nobody uses |
//!
//! A service whose backends are all gone stays known (with an empty list),
//! so that its clients see "no servers" rather than "unknown service" while
//! its backends come back (a deploy, a restart). Once it has had no
//! backends and no stream watching it for `--idle-service-grace`, it is
//! forgotten: names come and go (Kubernetes preview namespaces, one-off
//! jobs), and `--max-services` caps the services known at once, not all
//! those ever seen.

mod backend;
mod calls;
mod departed;
mod ejections;
mod evict;
mod ingest;
pub mod journal;
mod observe;
mod outcomes;
mod publish;
mod startup;

pub use backend::{token_for, Backend, LoadReport, WeightOverride};
pub use calls::CallTotals;
pub use ejections::{OwnVotes, Votes};
pub use outcomes::{reporter_name, OutcomesView, Sample, ServiceOutcomes};

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::watch;

use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::model::HealthState;
use crate::policy::Policy;
use crate::snapshot::PublishedList;

/// One service.
pub struct ServiceEntry {
    name: String,
    backends: Mutex<BTreeMap<(&'static str, String), Backend>>,
    list: watch::Sender<Arc<PublishedList>>,
    /// Sums of the client stats reported for this service.
    pub calls: CallTotals,
    /// What clients saw of each of its backends.
    pub outcomes: ServiceOutcomes,
    /// Why some of its backends are ignored: two registry sources define it.
    conflict: Mutex<Option<String>>,
    /// Since when it has had no backends and no watcher, as last checked.
    idle_since: Mutex<Option<Instant>>,
    /// Backends the policy holds against one view, as last published.
    held: std::sync::atomic::AtomicUsize,
    /// Departed backends kept listed, as last published.
    departed: std::sync::atomic::AtomicUsize,
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

    /// Watches published lists from now on (the current one counts as seen).
    pub fn watch(&self) -> watch::Receiver<Arc<PublishedList>> {
        self.list.subscribe()
    }

    /// Whether any registry lists a backend of it now (healthy or not).
    pub fn is_registered(&self) -> bool {
        !self.backends.lock().expect("catalog lock").is_empty()
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
    /// The list policy; replaced whole by [`Catalog::set_policy`].
    policy: arc_swap::ArcSwap<Policy>,
    metrics: Arc<Metrics>,
    synced: Mutex<HashSet<&'static str>>,
    sources: usize,
    initial_health: HealthState,
    members: watch::Sender<u64>,
    synced_at: Mutex<Option<Instant>>,
    limits: CatalogLimits,
    log: LogLimiter,
    source_order: Vec<&'static str>,
    /// Sources whose entries live on the backends' own leases.
    leased: Vec<&'static str>,
    /// The services each (source, key) is in, so that a removal, which
    /// names only the key, touches those services and no other.
    index: DashMap<(&'static str, String), Vec<String>>,
    /// Each change, for history.
    journal: journal::Journal,
    /// Held (shared) by registry writes, and exclusively while idle
    /// services are forgotten: a write never lands in an entry that is
    /// being dropped.
    writers: std::sync::RwLock<()>,
    /// Per-service lines held while the LB starts.
    startup: startup::StartupLog,
}

/// Caps on what registries may put in the catalog.
#[derive(Debug, Clone, Copy)]
pub struct CatalogLimits {
    /// Most services tracked.
    pub max_services: usize,
    /// Most backends per service.
    pub max_backends_per_service: usize,
    /// A service without backends or watchers is forgotten after this
    /// long (zero: never).
    pub idle_service_grace: std::time::Duration,
    /// A backend its registry drops while it passes health checks stays
    /// listed this long (zero: it leaves at once); see `departed`.
    pub deregistration_grace: std::time::Duration,
}

impl Default for CatalogLimits {
    fn default() -> Self {
        CatalogLimits {
            max_services: 10_000,
            max_backends_per_service: 10_000,
            idle_service_grace: std::time::Duration::from_secs(300),
            deregistration_grace: std::time::Duration::from_secs(300),
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
            policy: arc_swap::ArcSwap::from_pointee(policy),
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
            leased: Vec::new(),
            index: DashMap::new(),
            journal: journal::Journal::default(),
            writers: std::sync::RwLock::new(()),
            startup: startup::StartupLog::new(),
        }
    }

    /// The same catalog with caps on services and backends.
    pub fn with_limits(mut self, limits: CatalogLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The sources whose entries live on the backends' own leases (see
    /// `departed`).
    pub fn with_leased_sources(mut self, names: Vec<&'static str>) -> Self {
        self.leased = names;
        self
    }

    /// Registry sources in priority order (`--registry` order): a service
    /// two sources define is served from the earlier one.
    pub fn with_source_order(mut self, names: Vec<&'static str>) -> Self {
        self.sources = names.len();
        self.source_order = names;
        self
    }

    /// Whether a change line about `subject` may be logged now.
    fn log_change(&self, subject: std::fmt::Arguments<'_>) -> Option<u64> {
        let subject = subject.to_string();
        if self.held_at_startup(startup::kind_of(&subject)) {
            return None;
        }
        self.log.allow(&subject)
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

    /// Recomputes the lists that time can change (load reports, their
    /// blackout and expiry, slow start, expiring overrides). Publishes only
    /// changes. A service with none of those inputs gives the same list as
    /// at its last change and is skipped: a zone of dead backends costs the
    /// refresh nothing.
    pub fn refresh_all(&self) {
        self.settle_startup();
        for entry in self.services() {
            let mut backends = entry.backends.lock().expect("catalog lock");
            if backends.values().any(Backend::changes_with_time) {
                self.publish(&entry, &mut backends);
            }
        }
    }

    /// Every change from now on, as events (see [`journal`]).
    pub fn journal(&self) -> tokio::sync::broadcast::Receiver<journal::Event> {
        self.journal.subscribe()
    }

    /// Replaces the list policy (a configuration reload) and rebuilds every
    /// service's list with it; a list that comes out the same is not sent.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
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
            let at = *self
                .synced_at
                .lock()
                .expect("synced lock")
                .get_or_insert_with(Instant::now);
            self.startup.synced(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::model::Instance;

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

    /// A catalog whose backends are health-checked (unlisted until their
    /// first check), with this panic threshold.
    fn checked_catalog(panic_threshold: f64) -> Catalog {
        Catalog::new(
            Policy {
                panic_threshold,
                ..Policy::default()
            },
            Arc::new(Metrics::new()),
            1,
            true,
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
        let c = checked_catalog(0.0);
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

    #[test]
    fn nothing_is_decided_before_the_first_health_checks_answer() {
        let c = checked_catalog(0.0);
        c.upsert("etcd", inst("svc", "k1", 1)).unwrap();
        c.upsert("etcd", inst("svc", "k2", 2)).unwrap();
        let e = c.service("svc").unwrap();
        assert_eq!(
            e.current_list().version,
            0,
            "not checked yet: no list to send, not an empty one"
        );
        let a1 = SocketAddr::from(([127, 0, 0, 1], 1));
        let a2 = SocketAddr::from(([127, 0, 0, 1], 2));
        c.set_health("svc", a1, HealthState::Unreachable, "connection refused");
        assert_eq!(e.current_list().version, 0, "one is still unchecked");
        c.set_health("svc", a2, HealthState::NotServing, "");
        let list = e.current_list();
        assert_eq!(
            (list.version, list.servers.len()),
            (1, 0),
            "every backend checked, none may be listed: an empty list, decided"
        );
        // With panic mode on, the first answer being a refused connection
        // decides nothing either: panic over the one checked backend would
        // send every client to it.
        let c = checked_catalog(0.5);
        for (key, port) in [("k1", 1), ("k2", 2), ("k3", 3)] {
            c.upsert("etcd", inst("svc", key, port)).unwrap();
        }
        let e = c.service("svc").unwrap();
        c.set_health("svc", a1, HealthState::Unreachable, "connection refused");
        assert_eq!(
            e.current_list().version,
            0,
            "panic over one checked backend"
        );
        c.set_health("svc", a2, HealthState::Serving, "");
        let list = e.current_list();
        assert_eq!(
            (list.version, list.servers.len()),
            (1, 1),
            "a backend passing its checks is listed at once"
        );
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
