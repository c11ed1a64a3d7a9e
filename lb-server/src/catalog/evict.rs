//! Forgetting services nobody uses.
//!
//! A service is made the first time a registry lists a backend of it, and
//! counts against `--max-services` from then on. Names come and go
//! (Kubernetes preview namespaces, one-off jobs), so a service that has had
//! no backends and no stream watching its list for `--idle-service-grace`
//! is dropped: until then its clients are told "no servers", afterwards
//! "unknown service", and its slot is free for a new name.
//!
//! "Watching" is a receiver of the service's list: BalanceLoad streams,
//! ADS streams subscribed to its assignment, and zone tables planning for
//! it hold one. Registry writes hold the catalog's `writers` lock shared, and
//! the sweep takes it exclusively, so a backend is never added to an entry
//! being dropped. A stream that looked the service up just before it was
//! dropped and subscribes just after gets it put back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Catalog, ServiceEntry};

impl ServiceEntry {
    /// No backends, and nobody watching the list.
    fn is_idle(&self) -> bool {
        self.list.receiver_count() == 0 && self.backends.lock().expect("catalog lock").is_empty()
    }
}

impl Catalog {
    /// How often [`Catalog::forget_idle`] should run: often enough that a
    /// service goes within half a grace period of its due time.
    pub fn idle_sweep_interval(&self) -> Option<Duration> {
        let grace = self.limits.idle_service_grace;
        (!grace.is_zero())
            .then(|| (grace / 2).clamp(Duration::from_millis(100), Duration::from_secs(30)))
    }

    /// Forgets the services idle (no backends, no watchers) since at least
    /// `--idle-service-grace` before `now`; returns their names, for the
    /// per-service state kept elsewhere (zone tables, subsets).
    pub fn forget_idle(&self, now: Instant) -> Vec<String> {
        let grace = self.limits.idle_service_grace;
        if grace.is_zero() {
            return Vec::new();
        }
        let mut due: Vec<Arc<ServiceEntry>> = Vec::new();
        for entry in self.services() {
            let idle = entry.is_idle();
            let since = {
                let mut since = entry.idle_since.lock().expect("idle lock");
                if !idle {
                    *since = None;
                    continue;
                }
                *since.get_or_insert(now)
            };
            if now.saturating_duration_since(since) >= grace {
                due.push(entry);
            }
        }
        if due.is_empty() {
            return Vec::new();
        }
        let mut gone = Vec::new();
        {
            let _no_writes = self.writers.write().expect("writers lock");
            for entry in due {
                if !entry.is_idle() {
                    continue;
                }
                let name = entry.name().to_string();
                if self
                    .services
                    .remove_if(&name, |_, e| Arc::ptr_eq(e, &entry))
                    .is_none()
                {
                    continue;
                }
                if entry.list.receiver_count() > 0 {
                    // Looked up before it went, subscribed since: keep it.
                    self.services.entry(name).or_insert(entry);
                    continue;
                }
                self.metrics.forget_service(&name);
                self.metrics.services_forgotten.inc();
                gone.push(name);
            }
        }
        if !gone.is_empty() {
            tracing::info!(
                services = gone.len(),
                first = %gone[0],
                grace = ?grace,
                "services without backends or streams forgotten"
            );
            self.members_changed();
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::SystemTime;

    use super::*;
    use crate::catalog::CatalogLimits;
    use crate::metrics::Metrics;
    use crate::model::Instance;
    use crate::policy::Policy;

    fn inst(service: &str) -> Instance {
        Instance {
            service: service.into(),
            key: service.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            weight: 1,
            metadata: None,
            registered_at: SystemTime::now(),
        }
    }

    #[test]
    fn idle_services_go_after_the_grace_and_watched_ones_stay() {
        let grace = Duration::from_secs(60);
        let c = Catalog::new(Policy::default(), Arc::new(Metrics::new()), 1, false).with_limits(
            CatalogLimits {
                max_services: 2,
                idle_service_grace: grace,
                ..CatalogLimits::default()
            },
        );
        c.upsert("memory", inst("a")).unwrap();
        c.upsert("memory", inst("b")).unwrap();
        assert!(c.upsert("memory", inst("c")).is_err(), "the cap holds");
        let watcher = c.service("b").unwrap().subscribe();
        c.remove("memory", "a");
        c.remove("memory", "b");
        let t0 = Instant::now();
        assert!(c.forget_idle(t0).is_empty(), "idle from now on");
        assert!(c.forget_idle(t0 + grace / 2).is_empty(), "within the grace");
        assert_eq!(c.forget_idle(t0 + grace), vec!["a".to_string()]);
        assert!(!c.contains("a") && c.contains("b"), "b is watched");
        c.upsert("memory", inst("c")).expect("a's slot is free");
        drop(watcher);
        let t1 = t0 + grace + Duration::from_secs(1);
        assert!(c.forget_idle(t1).is_empty(), "b idle only from now");
        assert_eq!(c.forget_idle(t1 + grace), vec!["b".to_string()]);
        c.upsert("memory", inst("a"))
            .expect("seen again: a new service");
        assert_eq!(c.service("a").unwrap().current_list().servers.len(), 1);
    }

    #[test]
    fn a_zero_grace_keeps_every_service() {
        let c = Catalog::new(Policy::default(), Arc::new(Metrics::new()), 1, false).with_limits(
            CatalogLimits {
                idle_service_grace: Duration::ZERO,
                ..CatalogLimits::default()
            },
        );
        c.upsert("memory", inst("a")).unwrap();
        c.remove("memory", "a");
        let t0 = Instant::now();
        c.forget_idle(t0);
        assert!(c.forget_idle(t0 + Duration::from_secs(86_400)).is_empty());
        assert!(c.contains("a"));
        assert_eq!(c.idle_sweep_interval(), None);
    }
}
