//! Backends the registry dropped while they still serve.
//!
//! A registry entry can vanish for reasons that say nothing about the
//! backend: its lease or ephemeral node expired because *the backend* lost
//! the registry (a partition between it and etcd or ZooKeeper), or a watch
//! answered with an empty listing. Removing a backend that still passes the
//! LB's probes on such evidence would shrink, or empty, every client's list
//! for a fault clients never see. So the rule is Envoy's: a backend leaves
//! when discovery *and* health say it is gone. One the registry drops while
//! it is SERVING stays listed, marked *departed* (`left_registry_s` in the
//! admin API, `lb_backends_kept_unregistered`, a WARN line), until:
//! - its health is anything but SERVING: a graceful deregistration says
//!   NOT_SERVING first (the registration helpers do), so it leaves at once;
//! - `--deregistration-grace` has passed, unless that would leave the
//!   service without a healthy backend (the last ones stay while they pass);
//! - or it is registered again, and is an ordinary backend once more.
//!
//! Which drops count: every one from a source whose entries live on the
//! backends' own leases (etcd, ZooKeeper, the embedded registry); from a
//! source that declares its entries (DNS records, Kubernetes
//! EndpointSlices, Consul's catalog, a file), only an answer that leaves
//! the service empty, since there a removal is an operator's or the
//! platform's decision (a terminating pod, a record taken out) and must
//! take effect. A grace of zero turns this off: a dropped entry is removed
//! at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::journal::Change;
use super::{Backend, Catalog, ServiceEntry};
use crate::metrics::Metrics;
use crate::model::HealthState;

/// How long a departure goes unsaid: a graceful deregistration's
/// NOT_SERVING, on the probe's own stream, arrives well within it.
const NOTICE_AFTER: Duration = Duration::from_secs(2);

/// A registry slot: the source and its key.
pub(super) type Slot = (&'static str, String);

impl Catalog {
    /// Whether a backend its registry just dropped stays, departed: the grace
    /// is on, the LB's probes find it serving, and either its entry lived on
    /// its own lease (a leased source: the backend may have lost the
    /// registry) or the answer left its service empty (`emptied`: a
    /// declared source answering "nothing" is more likely broken than
    /// right).
    pub(super) fn keeps_departed(&self, b: &Backend, emptied: bool) -> bool {
        !self.limits.deregistration_grace.is_zero()
            && b.health == HealthState::Serving
            && !b.drained
            && (emptied || self.leased.contains(&b.source))
    }

    /// Marks `b` departed (its registry dropped it) if it is not already.
    /// Said (a WARN line, a journal event) only once it outlasts
    /// [`NOTICE_AFTER`]: a graceful deregistration's NOT_SERVING can arrive
    /// just after the registry's removal, and is no news.
    pub(super) fn depart(&self, b: &mut Backend) {
        if b.left_registry.is_none() {
            b.left_registry = Some(Instant::now());
            b.departure_noted = false;
        }
    }

    /// Says which departed backends of `service` outlasted [`NOTICE_AFTER`].
    fn notice_departed(&self, service: &str, backends: &mut BTreeMap<Slot, Backend>) {
        let now = Instant::now();
        for b in backends.values_mut() {
            let Some(at) = b.left_registry else { continue };
            if b.departure_noted || now.saturating_duration_since(at) < NOTICE_AFTER {
                continue;
            }
            b.departure_noted = true;
            if let Some(repeats) = self.log_change(format_args!("{service}|departed")) {
                tracing::warn!(service, addr = %b.addr, key = ?b.key, grace = ?self.limits.deregistration_grace,
                    repeats_not_logged = repeats,
                    "backend left the registry while passing health checks; kept in lists until its health fails or the grace ends (--deregistration-grace)");
            }
            self.journal.record(service, Some(b.addr), Change::Departed);
        }
    }

    /// Removes the departed backends whose time is up (health not SERVING,
    /// or the grace ended while a registered backend is healthy); returns
    /// whether any went.
    pub(super) fn sweep_departed(
        &self,
        entry: &ServiceEntry,
        backends: &mut BTreeMap<Slot, Backend>,
    ) -> bool {
        let grace = self.limits.deregistration_grace;
        let now = Instant::now();
        let others_healthy = backends
            .values()
            .any(|b| b.left_registry.is_none() && !b.drained && b.health.is_healthy());
        let due: Vec<Slot> = backends
            .iter()
            .filter(|(_, b)| {
                b.left_registry.is_some_and(|at| {
                    b.health != HealthState::Serving
                        || b.drained
                        || (others_healthy && now.saturating_duration_since(at) >= grace)
                })
            })
            .map(|(slot, _)| slot.clone())
            .collect();
        for slot in &due {
            if let Some(gone) = backends.remove(slot) {
                if gone.departure_noted {
                    tracing::info!(service = %entry.name, addr = %gone.addr, health = ?gone.health,
                        "departed backend removed");
                }
                self.forget_removed(&entry.name, backends, &gone);
            }
        }
        self.notice_departed(&entry.name, backends);
        !due.is_empty()
    }

    /// Bookkeeping after `gone` left `service`: its gauges and a journal
    /// entry, unless another record of the same address stays.
    pub(super) fn forget_removed(
        &self,
        service: &str,
        backends: &mut BTreeMap<Slot, Backend>,
        gone: &Backend,
    ) {
        let mut shared = backends
            .values_mut()
            .filter(|b| b.addr == gone.addr)
            .peekable();
        if shared.peek().is_none() {
            self.metrics.forget_backend(service, gone.addr);
            self.journal
                .record(service, Some(gone.addr), Change::Removed);
        }
        // Another record of the same address writes the gauges again.
        shared.for_each(|b| b.exported_gauges = None);
    }

    /// Shows how many departed backends a service keeps
    /// (`lb_backends_kept_unregistered`, present only while some are).
    pub(super) fn note_departed(&self, entry: &ServiceEntry, backends: &BTreeMap<Slot, Backend>) {
        let kept = backends
            .values()
            .filter(|b| b.left_registry.is_some())
            .count();
        let was = entry
            .departed
            .swap(kept, std::sync::atomic::Ordering::Relaxed);
        if was != kept {
            Metrics::set_alert(&self.metrics.backends_kept_unregistered, &entry.name, kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::catalog::CatalogLimits;
    use crate::metrics::ServiceLabels;
    use crate::model::Instance;
    use crate::policy::Policy;

    fn catalog(grace: Duration) -> Catalog {
        Catalog::new(Policy::default(), Arc::new(Metrics::new()), 1, true)
            .with_limits(CatalogLimits {
                deregistration_grace: grace,
                ..CatalogLimits::default()
            })
            .with_leased_sources(vec!["etcd"])
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn inst(port: u16) -> Instance {
        Instance {
            service: "svc".into(),
            key: format!("k{port}"),
            addr: addr(port),
            weight: 1,
            metadata: None,
            registered_at: SystemTime::now(),
        }
    }

    /// Three serving backends of "svc".
    fn serving(c: &Catalog) -> Arc<ServiceEntry> {
        for port in 1..=3 {
            c.upsert("etcd", inst(port)).unwrap();
            c.set_health("svc", addr(port), HealthState::Serving, "SERVING");
        }
        let e = c.service("svc").unwrap();
        assert_eq!(e.current_list().servers.len(), 3);
        e
    }

    fn kept(c: &Catalog) -> i64 {
        c.metrics
            .backends_kept_unregistered
            .get_or_create(&ServiceLabels {
                service: "svc".into(),
            })
            .get()
    }

    #[test]
    fn a_serving_backend_the_registry_drops_stays_until_its_health_fails() {
        let c = catalog(Duration::from_secs(300));
        let e = serving(&c);
        let version = e.current_list().version;
        c.remove("etcd", "k1");
        assert_eq!(e.current_list().servers.len(), 3, "kept while serving");
        assert_eq!(e.current_list().version, version, "no new list");
        assert_eq!(kept(&c), 1);
        let b1 = e
            .backends()
            .into_iter()
            .find(|b| b.addr == addr(1))
            .unwrap();
        assert!(b1.left_registry.is_some());
        assert!(
            b1.decision.reason.contains("kept: left the registry"),
            "{:?}",
            b1.decision
        );
        // Registered again: an ordinary backend, and no new list.
        c.upsert("etcd", inst(1)).unwrap();
        assert_eq!(kept(&c), 0);
        assert_eq!(e.current_list().version, version);
        // Dropped again, then NOT_SERVING (a graceful stop's order, in
        // either order): it leaves at once.
        c.remove("etcd", "k1");
        c.set_health("svc", addr(1), HealthState::NotServing, "NOT_SERVING");
        assert_eq!(e.current_list().servers.len(), 2);
        assert_eq!(e.backends().len(), 2, "removed, not only unlisted");
        assert_eq!(kept(&c), 0);
        // A backend that is NOT_SERVING when dropped goes at once.
        c.set_health("svc", addr(2), HealthState::NotServing, "NOT_SERVING");
        c.remove("etcd", "k2");
        assert_eq!(e.backends().len(), 1);
    }

    #[test]
    fn a_declared_source_removes_at_once_unless_it_empties_the_service() {
        let c = catalog(Duration::from_secs(300));
        for port in 1..=3 {
            c.upsert("k8s", inst(port)).unwrap();
            c.set_health("svc", addr(port), HealthState::Serving, "SERVING");
        }
        let e = c.service("svc").unwrap();
        // A terminating pod taken out of its slice: gone at once.
        c.replace_source("k8s", vec![inst(2), inst(3)]);
        assert_eq!(e.backends().len(), 2);
        c.remove("k8s", "k2");
        assert_eq!(e.backends().len(), 1);
        assert_eq!(kept(&c), 0);
        // An answer with nothing in it: kept.
        c.replace_source("k8s", Vec::new());
        assert_eq!(e.current_list().servers.len(), 1);
        assert_eq!(kept(&c), 1);
    }

    #[test]
    fn an_empty_listing_never_empties_a_serving_service() {
        let c = catalog(Duration::ZERO);
        let e = serving(&c);
        c.replace_source("etcd", Vec::new());
        assert!(
            e.current_list().servers.is_empty(),
            "grace 0: removed at once"
        );

        let c = catalog(Duration::from_millis(1));
        let e = serving(&c);
        c.replace_source("etcd", Vec::new());
        std::thread::sleep(Duration::from_millis(5));
        c.refresh_all();
        assert_eq!(
            e.current_list().servers.len(),
            3,
            "the grace ended, but these are the last healthy backends"
        );
        assert_eq!(kept(&c), 3);
        // One comes back: the grace of the others is over, so they go.
        c.replace_source("etcd", vec![inst(2)]);
        c.refresh_all();
        let left: Vec<SocketAddr> = e.backends().iter().map(|b| b.addr).collect();
        assert_eq!(left, vec![addr(2)]);
        assert_eq!(kept(&c), 0);
    }
}
