//! Publishing: a service's backends through the policy into a new snapshot,
//! when the list changed. A service belongs to one registry source, the
//! first in `--registry` order that defines it; another source defining it
//! too is a conflict, reported, and its backends are left out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::journal::Change;
use super::{Backend, Catalog, ServiceEntry};
use crate::metrics::{Metrics, ServiceLabels};
use crate::model::{HealthState, Locality};
use crate::policy::{Candidate, Decision};
use crate::snapshot::PublishedList;

impl Catalog {
    /// Rank of a source: its place in the configured order (unknown
    /// sources after the known ones, by name).
    pub(super) fn priority(&self, source: &str) -> (usize, String) {
        match self.source_order.iter().position(|s| *s == source) {
            Some(i) => (i, String::new()),
            None => (usize::MAX, source.to_string()),
        }
    }

    /// Records whether sources other than `owner` also define the service;
    /// returns the reason given to their ignored backends.
    pub(super) fn note_conflict(
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

    /// Shows how many backends the policy holds in the list against their
    /// checker's view (an alert: a partition between a replica and part of
    /// the fleet, or a fleet that died faster than replicas confirm):
    /// `lb_backends_held` and one WARN line when holding starts.
    fn note_held(&self, entry: &ServiceEntry, held: usize) {
        let was = entry.held.swap(held, std::sync::atomic::Ordering::Relaxed);
        if was == held {
            return;
        }
        Metrics::set_alert(&self.metrics.backends_held, &entry.name, held);
        if held == 0 {
            tracing::info!(service = %entry.name, "no backend held against one replica's view any more");
            return;
        }
        if was == 0 {
            tracing::warn!(service = %entry.name, held,
                "backends held in the list: silent to the replica that checks them, but not confirmed by another view (see their decisions)");
        }
    }

    /// Recomputes the service's list, records the decisions, and publishes
    /// the list if it changed.
    pub(super) fn publish(
        &self,
        entry: &ServiceEntry,
        backends: &mut BTreeMap<(&'static str, String), Backend>,
    ) {
        let now = Instant::now();
        if self.sweep_departed(entry, backends) {
            self.members_changed();
        }
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
                    opinions: Some(&b.opinions),
                    gray: b.gray.as_ref(),
                })
                .collect();
            self.policy.load().build(&candidates, now)
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
            // Gauges only when they change: a refresh of 100,000 unchanged
            // backends must not format and look up 200,000 label sets.
            let gauges = (d.weight, b.health.is_healthy());
            if b.exported_gauges != Some(gauges) {
                self.metrics
                    .set_backend(&entry.name, b.addr, gauges.0, gauges.1);
                b.exported_gauges = Some(gauges);
            }
            b.decision = d;
            if let Some(at) = b.left_registry {
                b.decision.reason.push_str(&format!(
                    "; kept: left the registry {:.0} s ago while passing health checks",
                    now.saturating_duration_since(at).as_secs_f64()
                ));
            }
        }
        self.note_departed(entry, backends);
        let labels = ServiceLabels {
            service: entry.name.clone(),
        };
        self.metrics
            .backends
            .get_or_create(&labels)
            .set(backends.len() as i64);
        self.note_held(entry, outcome.held);
        let (servers, panic, shed_fraction) =
            (outcome.servers, outcome.panic, outcome.shed_fraction);
        let localities: BTreeMap<SocketAddr, Locality> = backends
            .values()
            .filter(|b| b.decision.listed && b.locality.is_known())
            .map(|b| (b.addr, b.locality.clone()))
            .collect();
        // Version 0 is "not decided yet" (no frontend sends it): a list
        // becomes version 1 once a backend is listed for passing its
        // health checks, or once every backend had its first check. A
        // restarted LB must not tell its first clients "no servers", nor
        // send them to the one backend whose refused connection answered
        // first (panic mode over the few checked so far), because its
        // probes have not all answered yet.
        let settled = backends
            .values()
            .all(|b| b.drained || b.health != HealthState::Unknown);
        let decided = settled || (!servers.is_empty() && !panic);
        entry.list.send_if_modified(|current| {
            if !current.decided() && !decided {
                return false;
            }
            if current.decided()
                && current.servers == servers
                && current.panic == panic
                && *current.localities == localities
            {
                return false;
            }
            let version = current.version + 1;
            if let Some(repeats) = self.log_change(format_args!("{}|list", entry.name)) {
                tracing::info!(service = %entry.name, version, servers = servers.len(), panic, changes_not_logged = repeats, "list changed");
            }
            self.metrics.list_version.get_or_create(&labels).set(version as i64);
            self.journal.record(
                &entry.name,
                None,
                Change::List {
                    version,
                    servers: servers.len(),
                    panic,
                },
            );
            *current = Arc::new(
                PublishedList::new(version, servers, panic, shed_fraction)
                    .with_localities(Arc::new(localities)),
            );
            true
        });
    }
}
