//! What probes and operators say about a backend: health (republished at
//! once, with the slow-start rule), load (folded in at the next refresh),
//! drains and weight overrides.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use super::journal::Change;
use super::{Backend, Catalog, LoadReport, WeightOverride, STARTUP_GRACE};
use crate::model::{HealthState, LoadSample};
use crate::policy::Load;

impl Catalog {
    /// Applies `f` to every backend of `service` at `addr`; republishes if it
    /// returned true for any (then returns true), right away or (`defer`) at
    /// the next refresh.
    pub(super) fn update_backends(
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
            self.journal.record(
                service,
                Some(addr),
                Change::Health {
                    from: b.health,
                    to: health,
                    detail: detail.to_string(),
                },
            );
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

    /// Records what other replicas' witness probes find for a backend (by
    /// replica id); the list is republished at once when that changes it.
    pub fn set_opinions(
        &self,
        service: &str,
        addr: SocketAddr,
        opinions: &std::collections::BTreeMap<String, HealthState>,
    ) {
        self.update_backends(service, addr, false, |b| {
            if b.opinions == *opinions {
                return false;
            }
            b.opinions.clone_from(opinions);
            true
        });
    }

    /// Records a load report; weights follow at the next refresh.
    pub fn set_load(&self, service: &str, addr: SocketAddr, report: &LoadSample) {
        let now = Instant::now();
        let utilization = report.utilization();
        let policy = self.policy.load();
        let penalty = policy.weights.error_penalty;
        let usable =
            crate::policy::raw_weight(report.qps, report.eps, utilization, penalty).is_some();
        let expiry = policy.weights.expiry;
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
        let found = self.update_backends(service, addr, false, |b| {
            b.drained = drained;
            true
        });
        if found {
            self.journal
                .record(service, Some(addr), Change::Drained { drained });
        }
        found
    }

    /// Sets (or with `None` clears) an operator's weight override of a
    /// backend, lasting `ttl`. Returns false when no such backend exists.
    pub fn set_weight_override(
        &self,
        service: &str,
        addr: SocketAddr,
        over: Option<(u32, std::time::Duration)>,
    ) -> bool {
        let found = self.update_backends(service, addr, false, |b| {
            b.weight_override = over.map(|(weight, ttl)| WeightOverride {
                weight: weight.max(1),
                until: SystemTime::now() + ttl,
                expires: Instant::now() + ttl,
            });
            true
        });
        if found {
            let weight = over.map(|(w, _)| w.max(1));
            self.journal
                .record(service, Some(addr), Change::WeightOverride { weight });
        }
        found
    }
}
