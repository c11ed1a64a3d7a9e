//! What registries report: instances added, changed and removed, a source's
//! whole listing replaced, each within the caps. A removal names only its
//! key; an index of which services hold each key keeps it from touching the
//! others.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use super::journal::Change;
use super::{token_for, Backend, CallTotals, Catalog, ServiceEntry};
use crate::model::{Instance, Locality, RejectReason, Rejected};
use crate::policy::Decision;
use crate::snapshot::PublishedList;

impl Catalog {
    pub(super) fn entry(&self, service: &str) -> Result<Arc<ServiceEntry>, Rejected> {
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
                if !self.held_at_startup("new service") {
                    tracing::info!(service, "new service");
                }
                let (list, _) = watch::channel(Arc::new(PublishedList::empty()));
                Arc::new(ServiceEntry {
                    name: service.to_string(),
                    backends: Mutex::new(BTreeMap::new()),
                    list,
                    calls: CallTotals::default(),
                    outcomes: Default::default(),
                    conflict: Mutex::new(None),
                    idle_since: Mutex::new(None),
                    held: Default::default(),
                    departed: Default::default(),
                })
            })
            .value()
            .clone())
    }

    /// Adds or updates one instance reported by `source`; refused when it
    /// would pass a limit.
    pub fn upsert(&self, source: &'static str, instance: Instance) -> Result<(), Rejected> {
        let _writing = self.writers.read().expect("writers lock");
        let entry = self.entry(&instance.service)?;
        let mut backends = entry.backends.lock().expect("catalog lock");
        self.check_room(&backends, source, &instance)?;
        if self.apply_upsert(&mut backends, source, instance, true) {
            self.publish(&entry, &mut backends);
            drop(backends);
            self.members_changed();
        }
        Ok(())
    }

    /// Refuses a new backend beyond the per-service cap.
    pub(super) fn check_room(
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
    /// key are touched. A backend that still passes its health checks stays
    /// listed, departed (see `departed`): a registry entry can vanish for
    /// reasons of the registry's own.
    pub fn remove(&self, source: &'static str, key: &str) {
        self.remove_key(source, key, false);
    }

    /// Removes the instance `key` at its own request (an explicit
    /// deregistration by the backend): at once, even while it serves.
    pub fn deregister(&self, source: &'static str, key: &str) {
        self.remove_key(source, key, true);
    }

    fn remove_key(&self, source: &'static str, key: &str, asked: bool) {
        let services = self
            .index
            .remove(&(source, key.to_string()))
            .map(|(_, s)| s)
            .unwrap_or_default();
        for entry in services.iter().filter_map(|s| self.service(s)) {
            let mut backends = entry.backends.lock().expect("catalog lock");
            let slot = (source, key.to_string());
            let emptied = !backends
                .iter()
                .any(|(s, b)| *s != slot && b.left_registry.is_none());
            if let Some(b) = backends
                .get_mut(&slot)
                .filter(|b| !asked && self.keeps_departed(b, emptied))
            {
                self.depart(b);
                self.publish(&entry, &mut backends);
                continue;
            }
            if let Some(gone) = backends.remove(&slot) {
                self.forget_removed(&entry.name, &mut backends, &gone);
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
    pub(super) fn index_add(&self, source: &'static str, key: &str, service: &str) {
        let mut services = self.index.entry((source, key.to_string())).or_default();
        if !services.iter().any(|s| s == service) {
            services.push(service.to_string());
        }
    }

    /// Notes that `service` no longer holds (source, key).
    pub(super) fn index_drop(&self, source: &'static str, key: &str, service: &str) {
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

    pub(super) fn replace(
        &self,
        source: &'static str,
        only: Option<&str>,
        instances: Vec<Instance>,
    ) -> Vec<(String, Rejected)> {
        let _writing = self.writers.read().expect("writers lock");
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
            let dropped: Vec<_> = backends
                .iter()
                .filter(|((src, key), b)| {
                    *src == source && !keep.contains(key) && b.left_registry.is_none()
                })
                .map(|(slot, _)| slot.clone())
                .collect();
            let mut removed = 0;
            let emptied = keep.is_empty();
            for slot in dropped {
                self.index_drop(source, &slot.1, &service);
                let b = backends.get_mut(&slot).expect("listed above");
                if self.keeps_departed(b, emptied) {
                    self.depart(b);
                    removed += 1;
                } else if let Some(gone) = backends.remove(&slot) {
                    self.forget_removed(&service, &mut backends, &gone);
                    removed += 1;
                }
            }
            let mut upserted = 0;
            for i in fresh {
                match self.check_room(&backends, source, &i) {
                    Ok(()) => {
                        upserted += usize::from(self.apply_upsert(&mut backends, source, i, false))
                    }
                    Err(r) => refused.push((i.key, r)),
                }
            }
            let changed = removed > 0 || upserted > 0;
            // One line per service, not one per backend: a listing of
            // 100,000 backends writes 10,000 lines at most.
            if changed {
                if let Some(repeats) = self.log_change(format_args!("{service}|listed")) {
                    tracing::info!(%service, source, backends = backends.len(), added_or_changed = upserted, removed, changes_not_logged = repeats, "service listed");
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

    /// Applies one upsert (logged per key with `log`, else by the caller
    /// per service); returns whether anything changed.
    pub(super) fn apply_upsert(
        &self,
        backends: &mut BTreeMap<(&'static str, String), Backend>,
        source: &'static str,
        i: Instance,
        log: bool,
    ) -> bool {
        let initial_health = self.initial_health;
        let slot = (source, i.key.clone());
        if let Some(b) = backends.get_mut(&slot) {
            if b.addr == i.addr {
                // Registered again after it departed: an ordinary backend.
                let returned = b.left_registry.take().is_some();
                b.departure_noted = false;
                if returned {
                    self.index_add(source, &i.key, &i.service);
                    tracing::info!(service = %i.service, addr = %i.addr, "departed backend registered again");
                }
                if b.weight == i.weight && b.metadata == i.metadata {
                    return returned;
                }
                // Same backend, new registry data: keep its health and load.
                if let Some(repeats) = log
                    .then(|| self.log_change(format_args!("{}|{}|updated", i.service, i.key)))
                    .flatten()
                {
                    tracing::info!(service = %i.service, key = ?i.key, weight = i.weight, repeats_not_logged = repeats, "backend updated");
                }
                b.weight = i.weight;
                b.locality = Locality::of_metadata(i.metadata.as_ref());
                b.metadata = i.metadata;
                return true;
            }
        }
        // A backend at an address already known in this service (another key)
        // shares that address's health.
        let sibling = backends.values().find(|b| b.addr == i.addr).cloned();
        // The same backend registered again under a new key replaces the
        // record of it that departed.
        backends.retain(|s, b| *s == slot || b.addr != i.addr || b.left_registry.is_none());
        let registered_at = backends
            .get(&slot)
            .map(|b| b.registered_at)
            .unwrap_or(i.registered_at);
        self.index_add(source, &i.key, &i.service);
        if sibling.is_none() {
            self.journal
                .record(&i.service, Some(i.addr), Change::Registered);
        }
        if let Some(repeats) = log
            .then(|| self.log_change(format_args!("{}|{}|registered", i.service, i.key)))
            .flatten()
        {
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
                locality: Locality::of_metadata(i.metadata.as_ref()),
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
                opinions: sibling
                    .as_ref()
                    .map(|b| b.opinions.clone())
                    .unwrap_or_default(),
                serving_since: sibling.as_ref().and_then(|b| b.serving_since),
                gray: sibling.as_ref().and_then(|b| b.gray.clone()),
                load: sibling.as_ref().and_then(|b| b.load.clone()),
                load_report: sibling.as_ref().and_then(|b| b.load_report.clone()),
                drained: false,
                left_registry: None,
                departure_noted: false,
                weight_override: None,
                decision: Decision::default(),
                exported_gauges: None,
            },
        );
        true
    }
}
