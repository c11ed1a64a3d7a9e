//! What clients' outcomes say about a backend: the gray-failure detector
//! ([`crate::gray`]) run over each service's pooled outcomes every second,
//! its verdicts written on the backends, and the list republished when a
//! verdict changes what clients get (an ejection, a probation, a
//! re-admission, a weight step).
//!
//! Only backends that pass their health checks (or are listed all the
//! same) are judged, on what clients saw while they passed: a backend that is down is the health checks'
//! business, and the errors its callers saw while it went down are
//! forgotten, not held against it once it is back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use super::journal::Change;
use super::{Catalog, ServiceEntry};
use crate::gray::shared::{self, ReadVote, Standing, Vote};
use crate::gray::{self, Input, State};
use crate::metrics::Metrics;
use crate::model::HealthState;

/// The cluster's votes ([`crate::gray::shared`]) as read, by service and
/// backend; empty without a cluster session.
pub type Votes = HashMap<String, HashMap<SocketAddr, Vec<ReadVote>>>;

/// This replica's own ejections, to publish as votes.
pub type OwnVotes = Vec<(String, SocketAddr, Vote)>;

/// Whether clients' outcomes of `b` are judged: it passes its health
/// checks (or they are off), or one replica's view alone could not take it
/// out of the list (the policy holds it listed).
fn judged(b: &super::Backend) -> bool {
    b.health.is_healthy() || (b.health == HealthState::Silent && b.decision.listed)
}

impl Catalog {
    /// Judges every service's backends at `now`, after adopting the
    /// cluster's `votes` (`me`: this replica's id in the cluster). Returns
    /// this replica's own ejections, which it publishes as its votes.
    pub fn judge_gray(
        &self,
        settings: &gray::Settings,
        now: Instant,
        me: Option<&str>,
        votes: &Votes,
    ) -> OwnVotes {
        let entries: Vec<_> = self.services.iter().map(|e| e.value().clone()).collect();
        let mut own = Vec::new();
        let none = HashMap::new();
        for entry in entries {
            let votes = votes.get(entry.name()).unwrap_or(&none);
            self.judge_service(&entry, settings, now, (me, votes), &mut own);
        }
        own
    }

    fn judge_service(
        &self,
        entry: &ServiceEntry,
        settings: &gray::Settings,
        now: Instant,
        (me, votes): (Option<&str>, &HashMap<SocketAddr, Vec<ReadVote>>),
        own: &mut OwnVotes,
    ) {
        let evidence = entry.outcomes.evidence(now);
        let mut resets: Vec<SocketAddr> = Vec::new();
        let (ejected, held) = {
            let mut backends = entry.backends.lock().expect("catalog lock");
            if evidence.is_empty()
                && votes.is_empty()
                && backends.values().all(|b| b.gray.is_none())
            {
                return;
            }
            let fresh = State::new(now);
            // The cluster's verdicts first (what other replicas ejected),
            // then this replica's judgement on top, within one cap.
            let mut states: Vec<State> = backends
                .values()
                .map(|b| b.gray.clone().unwrap_or_else(|| fresh.clone()))
                .collect();
            if let Some(me) = me {
                let mut standings: Vec<Standing<'_>> = backends
                    .values()
                    .zip(states.iter_mut())
                    .map(|(b, state)| Standing {
                        token: &b.token,
                        votes: votes.get(&b.addr).map_or(&[], Vec::as_slice),
                        state,
                    })
                    .collect();
                let cap = settings.cap(standings.len());
                shared::adopt(me, cap, settings.probation_weight, &mut standings, now);
            }
            let verdicts = {
                let inputs: Vec<Input<'_>> = backends
                    .values()
                    .zip(&states)
                    .map(|(b, state)| Input {
                        token: &b.token,
                        evidence: judged(b).then(|| evidence.get(&b.addr)).flatten(),
                        state,
                    })
                    .collect();
                gray::judge(settings, &inputs, now)
            };
            let mut republish = false;
            for (b, v) in backends.values_mut().zip(verdicts) {
                if let Some(vote) = shared::own_vote(&v.state, now) {
                    own.push((entry.name().to_string(), b.addr, vote));
                }
                // A backend that is down is the health checks' business:
                // what its callers saw meanwhile is not held against it
                // once it is back.
                if v.reset_evidence || (!judged(b) && evidence.contains_key(&b.addr)) {
                    resets.push(b.addr);
                }
                let before = b.gray.as_ref().unwrap_or(&fresh);
                let moved = before.phase_name() != v.state.phase_name()
                    || before.weight_factor != v.state.weight_factor
                    || before.by != v.state.by;
                if moved {
                    self.note_verdict(entry, b.addr, before, &v.state);
                }
                republish |= moved;
                b.gray = (b.gray.is_some() || v.state != fresh).then_some(v.state);
            }
            if republish {
                self.publish(entry, &mut backends);
            }
            let count = |f: fn(&State) -> bool| {
                backends
                    .values()
                    .filter(|b| b.gray.as_ref().is_some_and(f))
                    .count()
            };
            (count(State::ejected), count(|g| g.held))
        };
        for addr in resets {
            entry.outcomes.reset(addr);
        }
        Metrics::set_alert(&self.metrics.gray_ejected, &entry.name, ejected);
        Metrics::set_alert(&self.metrics.gray_held, &entry.name, held);
    }

    /// Logs, counts and journals one verdict that changed.
    fn note_verdict(&self, entry: &ServiceEntry, addr: SocketAddr, before: &State, now: &State) {
        let service = entry.name();
        let state = now.phase_name();
        match state {
            "ejected" => {
                tracing::warn!(service, %addr, why = %now.why, "backend ejected: clients' calls fail");
                self.metrics
                    .gray_ejections
                    .get_or_create(&crate::metrics::ServiceLabels {
                        service: service.to_string(),
                    })
                    .inc();
            }
            "held" if before.phase_name() != "held" => {
                tracing::warn!(service, %addr, why = %now.why, "backend suspect but held in the list: the ejection cap is reached");
            }
            _ => {
                tracing::info!(service, %addr, from = before.phase_name(), to = state, why = %now.why, "gray-failure verdict changed")
            }
        }
        self.journal.record(
            service,
            Some(addr),
            Change::Gray {
                state: state.to_string(),
                why: now.why.clone(),
            },
        );
    }
}
