//! The catalog: everything the LB knows about services and their backends,
//! and the server list currently published for each service.
//!
//! Registry sources write into it through [`crate::registry::RegistrySink`].
//! Every change recomputes that service's list with the [`Policy`] and, when
//! the list differs, publishes it on a `tokio::sync::watch` channel: latest
//! wins, so a slow stream never holds up the registry or other streams.
//! Locks are per service, plain `std` mutexes never held across an await.
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
use lb_proto::grpc::lb::v1::Server;
use tokio::sync::watch;

use crate::metrics::{CallLabels, Metrics, ServiceLabels};
use crate::policy::{Candidate, Policy};
use crate::registry::Instance;

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
}

/// A server list as published to streams.
#[derive(Debug)]
pub struct PublishedList {
    /// Increments on every change; 0 before the first backend appeared.
    pub version: u64,
    /// The ordered list.
    pub servers: Vec<Server>,
    /// When the change that produced it was applied.
    pub changed_at: Instant,
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
}

/// One service.
pub struct ServiceEntry {
    name: String,
    backends: Mutex<BTreeMap<(&'static str, String), Backend>>,
    list: watch::Sender<Arc<PublishedList>>,
    /// Sums of the client stats reported for this service.
    pub calls: CallTotals,
}

impl ServiceEntry {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
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
}

impl Catalog {
    /// An empty catalog fed by `sources` registry sources.
    pub fn new(policy: Policy, metrics: Arc<Metrics>, sources: usize) -> Self {
        Catalog {
            services: DashMap::new(),
            policy,
            metrics,
            synced: Mutex::new(HashSet::new()),
            sources,
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

    /// Records that `source` has listed its contents.
    pub fn mark_synced(&self, source: &'static str) {
        if self.synced.lock().expect("synced lock").insert(source) {
            tracing::info!(source, "registry synced");
        }
    }

    fn entry(&self, service: &str) -> Arc<ServiceEntry> {
        if let Some(e) = self.services.get(service) {
            return e.value().clone();
        }
        self.services
            .entry(service.to_string())
            .or_insert_with(|| {
                tracing::info!(service, "new service");
                let (list, _) = watch::channel(Arc::new(PublishedList {
                    version: 0,
                    servers: Vec::new(),
                    changed_at: Instant::now(),
                }));
                Arc::new(ServiceEntry {
                    name: service.to_string(),
                    backends: Mutex::new(BTreeMap::new()),
                    list,
                    calls: CallTotals::default(),
                })
            })
            .value()
            .clone()
    }

    /// Adds or updates one instance reported by `source`.
    pub fn upsert(&self, source: &'static str, instance: Instance) {
        let entry = self.entry(&instance.service);
        let mut backends = entry.backends.lock().expect("catalog lock");
        if apply_upsert(&mut backends, source, instance) {
            self.publish(&entry, &backends);
        }
    }

    /// Removes the instance `key` reported by `source`, wherever it is.
    pub fn remove(&self, source: &'static str, key: &str) {
        for entry in self
            .services
            .iter()
            .map(|e| e.value().clone())
            .collect::<Vec<_>>()
        {
            let mut backends = entry.backends.lock().expect("catalog lock");
            if let Some(gone) = backends.remove(&(source, key.to_string())) {
                tracing::info!(service = %entry.name, key, addr = %gone.addr, "backend removed");
                self.publish(&entry, &backends);
            }
        }
    }

    /// Replaces everything `source` reported with `instances`.
    pub fn replace_source(&self, source: &'static str, instances: Vec<Instance>) {
        let mut by_service: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for i in instances {
            by_service.entry(i.service.clone()).or_default().push(i);
        }
        for entry in self
            .services
            .iter()
            .map(|e| e.value().clone())
            .collect::<Vec<_>>()
        {
            if !by_service.contains_key(&entry.name) {
                by_service.insert(entry.name.clone(), Vec::new());
            }
        }
        for (service, fresh) in by_service {
            let entry = self.entry(&service);
            let mut backends = entry.backends.lock().expect("catalog lock");
            let keep: HashSet<String> = fresh.iter().map(|i| i.key.clone()).collect();
            let before = backends.len();
            backends.retain(|(src, key), b| {
                let retained = *src != source || keep.contains(key);
                if !retained {
                    tracing::info!(service = %service, key, addr = %b.addr, "backend removed (not in re-list)");
                }
                retained
            });
            let mut changed = backends.len() != before;
            for i in fresh {
                changed |= apply_upsert(&mut backends, source, i);
            }
            if changed {
                self.publish(&entry, &backends);
            }
        }
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

    /// Recomputes the service's list and publishes it if it changed.
    fn publish(&self, entry: &ServiceEntry, backends: &BTreeMap<(&'static str, String), Backend>) {
        let candidates: Vec<Candidate<'_>> = backends
            .values()
            .map(|b| Candidate {
                addr: b.addr,
                token: &b.token,
                weight: b.weight,
            })
            .collect();
        let servers = self.policy.build(&candidates);
        let labels = ServiceLabels {
            service: entry.name.clone(),
        };
        self.metrics
            .backends
            .get_or_create(&labels)
            .set(backends.len() as i64);
        entry.list.send_if_modified(|current| {
            if current.servers == servers {
                return false;
            }
            let version = current.version + 1;
            tracing::info!(service = %entry.name, version, servers = servers.len(), "list changed");
            self.metrics
                .list_version
                .get_or_create(&labels)
                .set(version as i64);
            *current = Arc::new(PublishedList {
                version,
                servers,
                changed_at: Instant::now(),
            });
            true
        });
    }
}

/// Applies one upsert; returns whether anything changed.
fn apply_upsert(
    backends: &mut BTreeMap<(&'static str, String), Backend>,
    source: &'static str,
    i: Instance,
) -> bool {
    let slot = (source, i.key.clone());
    if let Some(b) = backends.get(&slot) {
        if b.addr == i.addr && b.weight == i.weight && b.metadata == i.metadata {
            return false;
        }
    }
    let registered_at = backends
        .get(&slot)
        .map(|b| b.registered_at)
        .unwrap_or(i.registered_at);
    tracing::info!(service = %i.service, key = %i.key, addr = %i.addr, weight = i.weight, "backend registered");
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
        },
    );
    true
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
        Catalog::new(Policy { max_list_len: 64 }, Arc::new(Metrics::new()), 1)
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
        c.upsert("etcd", inst("svc", "k1", 1));
        let e = c.service("svc").unwrap();
        assert_eq!(e.current_list().version, 1);
        c.upsert("etcd", inst("svc", "k1", 1));
        assert_eq!(
            e.current_list().version,
            1,
            "identical upsert must not publish"
        );
        c.upsert("etcd", inst("svc", "k2", 2));
        assert_eq!(e.current_list().version, 2);
        assert_eq!(e.current_list().servers.len(), 2);
        c.remove("etcd", "k1");
        assert_eq!(e.current_list().servers.len(), 1);
        c.remove("etcd", "k2");
        assert!(c.contains("svc"), "a service stays known when empty");
        assert!(e.current_list().servers.is_empty());
    }

    #[test]
    fn replace_source_removes_missing_and_keeps_other_sources() {
        let c = catalog();
        c.upsert("etcd", inst("svc", "k1", 1));
        c.upsert("etcd", inst("svc", "k2", 2));
        c.upsert("file", inst("svc", "f1", 3));
        c.replace_source("etcd", vec![inst("svc", "k2", 2), inst("other", "k3", 4)]);
        let ports: Vec<i32> = c
            .service("svc")
            .unwrap()
            .current_list()
            .servers
            .iter()
            .map(|s| s.port)
            .collect();
        assert_eq!(ports.len(), 2);
        assert!(ports.contains(&2) && ports.contains(&3));
        assert_eq!(c.service("other").unwrap().current_list().servers.len(), 1);
    }

    #[test]
    fn tokens_are_stable_and_short() {
        let a = SocketAddr::from(([10, 0, 0, 1], 80));
        assert_eq!(token_for("s", a), token_for("s", a));
        assert_ne!(token_for("s", a), token_for("t", a));
        assert!(token_for("s", a).len() < 50);
    }
}
