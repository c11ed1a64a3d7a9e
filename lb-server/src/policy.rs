//! Policy: turns a service's backends (registry data, health, load) into the
//! ordered server list that clients walk, and records why each backend is
//! or is not in it.
//!
//! Steps, in order:
//! 1. **Eligibility**: backends whose health is SERVING (or not yet checked,
//!    when configured) are eligible.
//! 2. **One view never judges alone**: a backend *silent* to the replica
//!    that checks it (no answer at all, which may be that replica's path
//!    only: an asymmetric partition) leaves the list when another replica's
//!    witness probe agrees it is down. Without that confirmation, one view
//!    may take out at most `max_unconfirmed_removal` of the service (at
//!    least one backend, lowest token first, so that every replica picks the
//!    same); the rest are *held* in the list, and so is a backend another
//!    replica finds serving. A held backend costs clients a failed connect
//!    they route around; removing half a service on one replica's word
//!    would overload the other half for every client.
//!    Backends the gray-failure detector ejected ([`crate::gray`]) are
//!    not eligible either; those on probation or slow are listed at a
//!    reduced weight (step 4).
//! 3. **Panic mode**: when fewer than `panic_threshold` of the registered
//!    backends are eligible, all registered backends are listed rather than
//!    overloading the few healthy ones.
//! 4. **Weights**: gRPC's weighted round robin from ORCA reports,
//!    `qps / (utilization + eps/qps × penalty)`, ignored during a blackout
//!    after the weight first appears and after it goes stale; backends
//!    without a usable weight get the mean; weights are clamped to
//!    [mean/100, mean×10]; multiplied by the registry weight and by the
//!    slow-start ramp of newly healthy backends.
//! 5. **Repetition**: weights become integers and a smooth weighted round
//!    robin order (no bursts of one backend), within `max_list_len`.
//! 6. **Shedding** (off by default): when every listed backend reports
//!    utilization above the threshold, `drop` entries are spread through the
//!    list so that clients shed the excess.
//!
//! The order depends only on the inputs (backends sorted by token), so every
//! LB replica sends the same list for the same state.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_proto::grpc::lb::v1::Server;

use crate::model::HealthState;

/// Token of the drop entries used for load shedding.
pub const SHED_TOKEN: &str = "lb-shed";

/// Replica ids of `opinions`, comma-separated.
fn names(opinions: &BTreeMap<String, HealthState>) -> String {
    opinions
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Largest integer weight a backend gets when weights are fractional (less
/// when the list budget per backend is smaller).
const MAX_RESOLUTION: f64 = 100.0;

/// Load weights are clamped to [mean × MIN_RATIO, mean × MAX_RATIO], as
/// gRPC's weighted round robin scheduler does.
const MIN_RATIO: f64 = 0.01;
const MAX_RATIO: f64 = 10.0;

/// The latest ORCA load report of a backend, with the times weighting needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// Application utilization if reported, else CPU utilization.
    pub utilization: f64,
    /// Queries per second.
    pub qps: f64,
    /// Errors per second.
    pub eps: f64,
    /// When the report arrived.
    pub at: Instant,
    /// Since when reports have given a usable weight (for the blackout).
    pub usable_since: Option<Instant>,
}

/// Weighting settings (gRPC weighted round robin defaults).
#[derive(Debug, Clone)]
pub struct WeightSettings {
    /// A new weight is ignored for this long.
    pub blackout: Duration,
    /// A weight older than this is ignored.
    pub expiry: Duration,
    /// Penalty of errors: `eps/qps × penalty` is added to utilization.
    pub error_penalty: f64,
}

impl Default for WeightSettings {
    fn default() -> Self {
        WeightSettings {
            blackout: Duration::from_secs(10),
            expiry: Duration::from_secs(180),
            error_penalty: 1.0,
        }
    }
}

/// List-building settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Longest list produced; weights are scaled down to fit.
    pub max_list_len: usize,
    /// List backends that have not been health-checked yet.
    pub list_unchecked: bool,
    /// Panic when fewer than this fraction of backends are eligible (0 = never).
    pub panic_threshold: f64,
    /// Weight ramp of a newly healthy backend (zero = off).
    pub slow_start: Duration,
    /// Weight factor at the start of the ramp.
    pub slow_start_min: f64,
    /// ORCA weighting.
    pub weights: WeightSettings,
    /// Shed load when every listed backend's utilization is above this.
    pub shed_utilization: Option<f64>,
    /// Largest fraction of calls shed.
    pub max_shed: f64,
    /// Largest fraction of a service that one replica's view alone (silent
    /// backends no other replica confirmed) may take out of the list; at
    /// least one backend when above 0, none at 0, no cap at 1.
    pub max_unconfirmed_removal: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_list_len: 256,
            list_unchecked: false,
            panic_threshold: 0.5,
            slow_start: Duration::ZERO,
            slow_start_min: 0.1,
            weights: WeightSettings::default(),
            shed_utilization: None,
            max_shed: 0.5,
            max_unconfirmed_removal: 0.2,
        }
    }
}

/// What the policy needs to know about one backend.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its stable load-balance token.
    pub token: &'a str,
    /// Registry weight, ≥ 1.
    pub weight: u32,
    /// Health.
    pub health: HealthState,
    /// Since when it has been serving (for slow start).
    pub serving_since: Option<Instant>,
    /// Latest load report.
    pub load: Option<&'a Load>,
    /// Taken out by an operator (drained).
    pub drained: bool,
    /// Other replicas' witness results while its checker finds it silent,
    /// by replica id.
    pub opinions: Option<&'a BTreeMap<String, HealthState>>,
    /// What the gray-failure detector says of it ([`crate::gray`]).
    pub gray: Option<&'a crate::gray::State>,
}

/// Why a backend is (not) listed, and with what weight.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Decision {
    /// In the list.
    pub listed: bool,
    /// Relative weight used (1.0 = average), 0 when not listed.
    pub weight: f64,
    /// Entries in the list.
    pub entries: usize,
    /// Human-readable reason.
    pub reason: String,
}

/// The result for one service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// The ordered list.
    pub servers: Vec<Server>,
    /// One decision per candidate, in the candidates' order.
    pub decisions: Vec<Decision>,
    /// Panic mode is on.
    pub panic: bool,
    /// Fraction of list entries that are drops.
    pub shed_fraction: f64,
    /// Backends listed against their checker's view (held, step 2).
    pub held: usize,
}

impl Policy {
    /// The ORCA weight of a load report at `now`, if usable.
    fn orca_weight(&self, load: Option<&Load>, now: Instant) -> Option<f64> {
        let l = load?;
        let w = &self.weights;
        if now.saturating_duration_since(l.at) > w.expiry {
            return None;
        }
        if now.saturating_duration_since(l.usable_since?) < w.blackout {
            return None;
        }
        raw_weight(l.qps, l.eps, l.utilization, w.error_penalty)
    }

    fn slow_start_factor(&self, since: Option<Instant>, now: Instant) -> f64 {
        match since {
            Some(t) if !self.slow_start.is_zero() => {
                let progress =
                    now.saturating_duration_since(t).as_secs_f64() / self.slow_start.as_secs_f64();
                (self.slow_start_min + (1.0 - self.slow_start_min) * progress).min(1.0)
            }
            _ => 1.0,
        }
    }

    /// Builds the list and the decisions for `candidates` at time `now`.
    pub fn build(&self, candidates: &[Candidate<'_>], now: Instant) -> Outcome {
        let mut decisions = vec![Decision::default(); candidates.len()];
        // One entry per address (the first candidate with it wins).
        let mut seen = std::collections::HashSet::with_capacity(candidates.len());
        let mut unique: Vec<usize> = Vec::with_capacity(candidates.len());
        for (i, c) in candidates.iter().enumerate() {
            if seen.insert(c.addr) {
                unique.push(i);
            } else {
                decisions[i].reason = "same address as another instance; listed once".into();
            }
        }
        let held = self.held(candidates, &unique);
        let eligible = |i: usize| {
            let c = &candidates[i];
            !c.drained
                && !c.gray.is_some_and(|g| g.ejected())
                && (held[i].is_some()
                    || match c.health {
                        HealthState::Serving | HealthState::Unchecked => true,
                        HealthState::Unknown => self.list_unchecked,
                        HealthState::NotServing
                        | HealthState::Unreachable
                        | HealthState::Silent => false,
                    })
        };
        // Backends not checked yet count neither as healthy nor as sick: a
        // freshly registered backend must not trigger panic (and be listed
        // before its first check).
        let counted = |c: &Candidate<'_>| {
            !c.drained && (self.list_unchecked || c.health != HealthState::Unknown)
        };
        let registered: Vec<usize> = unique
            .iter()
            .copied()
            .filter(|&i| counted(&candidates[i]))
            .collect();
        let healthy: Vec<usize> = registered
            .iter()
            .copied()
            .filter(|&i| eligible(i))
            .collect();
        let panic = self.panic_threshold > 0.0
            && !registered.is_empty()
            && (healthy.len() as f64) < self.panic_threshold * registered.len() as f64;
        let chosen: Vec<usize> = if panic {
            // Every registered backend, but never one ejected for failing
            // clients' calls: panic spreads load over the unhealthy, not
            // back onto a backend known to fail calls.
            registered
                .iter()
                .copied()
                .filter(|&i| !candidates[i].gray.is_some_and(|g| g.ejected()))
                .collect()
        } else {
            healthy.clone()
        };
        let mut is_chosen = vec![false; candidates.len()];
        for &i in &chosen {
            is_chosen[i] = true;
        }
        for &i in &unique {
            let c = &candidates[i];
            if !is_chosen[i] {
                decisions[i].reason = match (c.drained, c.health) {
                    (true, _) => "drained by an operator".into(),
                    _ if c.gray.is_some_and(|g| g.ejected()) => {
                        c.gray.map(|g| g.why.clone()).unwrap_or_default()
                    }
                    (_, HealthState::Unknown) => "not health-checked yet".into(),
                    (_, HealthState::NotServing) => "health: NOT_SERVING".into(),
                    (_, HealthState::Unreachable) => "health: unreachable".into(),
                    (_, HealthState::Silent) => match c.opinions.filter(|o| !o.is_empty()) {
                        Some(o) => format!("health: silent, confirmed by {}", names(o)),
                        None => "health: silent (within the unconfirmed-removal cap)".into(),
                    },
                    (_, h) => format!("health: {h:?}"),
                };
            }
        }
        let held_count = held.iter().filter(|h| h.is_some()).count();
        if chosen.is_empty() {
            return Outcome {
                servers: Vec::new(),
                decisions,
                panic,
                shed_fraction: 0.0,
                held: held_count,
            };
        }

        // Relative weights.
        let orca: Vec<Option<f64>> = chosen
            .iter()
            .map(|&i| self.orca_weight(candidates[i].load, now))
            .collect();
        let known: Vec<f64> = orca.iter().flatten().copied().collect();
        let mean = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let weights: Vec<f64> = chosen
            .iter()
            .zip(&orca)
            .map(|(&i, w)| {
                let c = &candidates[i];
                let relative = w
                    .map(|w| w.clamp(mean * MIN_RATIO, mean * MAX_RATIO) / mean)
                    .unwrap_or(1.0);
                relative
                    * c.weight.max(1) as f64
                    * self.slow_start_factor(c.serving_since, now)
                    * c.gray.map_or(1.0, |g| g.weight_factor)
            })
            .collect();
        let ints = entries(&weights, self.max_list_len);
        let mut servers = ordered(
            chosen
                .iter()
                .zip(&ints)
                .map(|(&i, &n)| (server(&candidates[i]), n))
                .collect(),
        );

        for (k, &i) in chosen.iter().enumerate() {
            let c = &candidates[i];
            let d = &mut decisions[i];
            d.listed = true;
            d.weight = weights[k];
            // Smooth order emits each backend exactly its integer weight times.
            d.entries = ints[k] as usize;
            let mut why = Vec::new();
            if let Some(h) = &held[i] {
                why.push(h.clone());
            }
            if panic {
                why.push(format!(
                    "panic mode: only {} of {} backends healthy",
                    healthy.len(),
                    registered.len()
                ));
            } else if held[i].is_none() {
                why.push("serving".to_string());
            }
            match orca[k] {
                Some(w) => why.push(format!("load weight {w:.2} (mean {mean:.2})")),
                None if c.load.is_some() => why.push(
                    "load report not usable yet (blackout, idle or stale): mean weight".into(),
                ),
                None => why.push("no load report: mean weight".into()),
            }
            let f = self.slow_start_factor(c.serving_since, now);
            if f < 1.0 {
                why.push(format!("slow start {:.0}%", f * 100.0));
            }
            if let Some(g) = c.gray.filter(|g| !g.why.is_empty()) {
                why.push(g.why.clone());
            }
            d.reason = why.join("; ");
        }

        let shed_fraction = self.shed(&chosen, candidates, now, &mut servers);
        Outcome {
            servers,
            decisions,
            panic,
            shed_fraction,
            held: held_count,
        }
    }

    /// Step 2: which silent backends stay listed, and why (`Some(reason)`,
    /// indexed like `candidates`). Silent to its checker and serving to
    /// another replica: held. Confirmed by another replica: removed.
    /// Unconfirmed: at most `max_unconfirmed_removal` of the counted
    /// backends (at least one) are out on one view, lowest token first so
    /// that every replica holds the same ones; the rest are held.
    fn held(&self, candidates: &[Candidate<'_>], unique: &[usize]) -> Vec<Option<String>> {
        let mut held = vec![None; candidates.len()];
        let counted = unique
            .iter()
            .filter(|&&i| !candidates[i].drained && candidates[i].health != HealthState::Unknown)
            .count();
        let mut unconfirmed: Vec<usize> = Vec::new();
        for &i in unique {
            let c = &candidates[i];
            if c.drained || c.health != HealthState::Silent {
                continue;
            }
            let opinions = c.opinions.into_iter().flatten();
            let serving: Vec<&str> = opinions
                .clone()
                .filter(|(_, h)| h.is_healthy())
                .map(|(r, _)| r.as_str())
                .collect();
            let confirmed = opinions.clone().any(|(_, h)| {
                matches!(
                    h,
                    HealthState::Silent | HealthState::Unreachable | HealthState::NotServing
                )
            });
            if !serving.is_empty() {
                held[i] = Some(format!(
                    "held: silent to its checker but serving to {}",
                    serving.join(", ")
                ));
            } else if !confirmed {
                unconfirmed.push(i);
            }
        }
        unconfirmed.sort_by(|&a, &b| candidates[a].token.cmp(candidates[b].token));
        let allowed = if self.max_unconfirmed_removal > 0.0 {
            ((self.max_unconfirmed_removal * counted as f64).floor() as usize).max(1)
        } else {
            0
        };
        for (k, i) in unconfirmed.into_iter().enumerate() {
            if k >= allowed {
                held[i] = Some(format!(
                    "held: silent to its checker only; one replica's view may take out at most {:.0}% of the service (--max-unconfirmed-removal)",
                    self.max_unconfirmed_removal * 100.0
                ));
            }
        }
        held
    }

    /// Adds drop entries when every chosen backend is above the shedding
    /// threshold; returns the fraction of drops.
    fn shed(
        &self,
        chosen: &[usize],
        candidates: &[Candidate<'_>],
        now: Instant,
        servers: &mut Vec<Server>,
    ) -> f64 {
        let Some(threshold) = self.shed_utilization.filter(|t| *t > 0.0) else {
            return 0.0;
        };
        let fresh = |c: &Candidate<'_>| {
            c.load
                .filter(|l| now.saturating_duration_since(l.at) <= self.weights.expiry)
                .map(|l| l.utilization)
        };
        let utils: Option<Vec<f64>> = chosen.iter().map(|&i| fresh(&candidates[i])).collect();
        let Some(min_util) = utils.and_then(|u| u.into_iter().reduce(f64::min)) else {
            return 0.0;
        };
        if min_util <= threshold {
            return 0.0;
        }
        // Remove the share of calls that brings utilization back to the threshold.
        let fraction = (1.0 - threshold / min_util).min(self.max_shed);
        with_drops(servers, fraction);
        servers.iter().filter(|s| s.drop).count() as f64 / servers.len() as f64
    }
}

/// Spreads drop entries evenly through `servers` so that `fraction` of the
/// list drops (at least one entry).
pub(crate) fn with_drops(servers: &mut Vec<Server>, fraction: f64) {
    let n = servers.len();
    let fraction = fraction.clamp(0.0, 0.99);
    let drops = ((n as f64 * fraction / (1.0 - fraction)).round() as usize).max(1);
    let mut out = Vec::with_capacity(n + drops);
    let mut placed = 0;
    for (k, s) in servers.drain(..).enumerate() {
        out.push(s);
        while placed < drops && (placed + 1) * n <= (k + 1) * drops {
            out.push(Server {
                ip_address: Vec::new(),
                port: 0,
                load_balance_token: SHED_TOKEN.into(),
                drop: true,
            });
            placed += 1;
        }
    }
    *servers = out;
}

/// Relative weights as list entries (step 4): integers, at least 1 each,
/// summing to at most `max_len` (or one per weight, if more).
pub(crate) fn entries(weights: &[f64], max_len: usize) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let resolution = (max_len as f64 / weights.len() as f64).clamp(1.0, MAX_RESOLUTION);
    scale_weights(&to_integers(weights, resolution), max_len)
}

/// One cycle of `servers`, each repeated its number of entries, sorted by
/// token (then address) and spread by smooth weighted round robin, so that
/// every replica builds the same order and no backend comes in bursts.
pub(crate) fn ordered(mut servers: Vec<(Server, u32)>) -> Vec<Server> {
    servers.sort_by(|(a, _), (b, _)| {
        a.load_balance_token
            .cmp(&b.load_balance_token)
            .then_with(|| a.ip_address.cmp(&b.ip_address))
            .then(a.port.cmp(&b.port))
    });
    let weights: Vec<u32> = servers.iter().map(|(_, n)| *n).collect();
    smooth_order(&weights)
        .into_iter()
        .map(|j| servers[j].0.clone())
        .collect()
}

/// gRPC weighted round robin's weight, or `None` when there is no signal.
pub fn raw_weight(qps: f64, eps: f64, utilization: f64, penalty: f64) -> Option<f64> {
    if qps <= 0.0 || utilization <= 0.0 {
        return None;
    }
    Some(qps / (utilization + eps / qps * penalty))
}

/// Float weights to integers: exact when they are integers already,
/// otherwise scaled so the largest is `resolution`.
fn to_integers(weights: &[f64], resolution: f64) -> Vec<u32> {
    if weights
        .iter()
        .all(|w| (w - w.round()).abs() < 1e-9 && *w >= 1.0)
    {
        return weights.iter().map(|w| w.round() as u32).collect();
    }
    let max = weights
        .iter()
        .copied()
        .fold(f64::MIN, f64::max)
        .max(f64::MIN_POSITIVE);
    weights
        .iter()
        .map(|w| ((w / max) * resolution).round().max(1.0) as u32)
        .collect()
}

/// Reduces weights by their common divisor, then scales them down (keeping
/// every weight ≥ 1) until their sum fits `max_len`.
fn scale_weights(weights: &[u32], max_len: usize) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u32> = weights.iter().map(|w| w / g).collect();
    let total: u64 = w.iter().map(|&x| x as u64).sum();
    let max_len = max_len.max(weights.len()) as u64;
    if total > max_len {
        let room = max_len - w.len() as u64;
        let over: u64 = w.iter().map(|&x| x as u64 - 1).sum();
        w = w
            .iter()
            .map(|&x| 1 + ((x as u64 - 1) * room / over.max(1)) as u32)
            .collect();
    }
    w
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Smooth weighted round robin: the index sequence of one full cycle.
fn smooth_order(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

fn server(c: &Candidate<'_>) -> Server {
    Server::at(c.addr, c.token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(port: u16, token: &str, weight: u32) -> Candidate<'_> {
        Candidate {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            token,
            weight,
            health: HealthState::Serving,
            serving_since: None,
            load: None,
            drained: false,
            opinions: None,
            gray: None,
        }
    }

    fn ports(list: &[Server]) -> Vec<i32> {
        list.iter().map(|s| s.port).collect()
    }

    fn policy() -> Policy {
        Policy {
            max_list_len: 100,
            ..Policy::default()
        }
    }

    fn build(p: &Policy, c: &[Candidate<'_>]) -> Outcome {
        p.build(c, Instant::now())
    }

    #[test]
    fn equal_weights_list_each_backend_once_in_token_order() {
        let out = build(
            &policy(),
            &[cand(3, "c", 1), cand(1, "a", 1), cand(2, "b", 1)],
        );
        assert_eq!(ports(&out.servers), vec![1, 2, 3]);
        assert_eq!(out.servers[0].ip_address, vec![127, 0, 0, 1]);
        assert_eq!(out.servers[0].load_balance_token, "a");
        assert!(out.decisions.iter().all(|d| d.listed && d.entries == 1));
    }

    #[test]
    fn registry_weights_repeat_smoothly() {
        let out = build(&policy(), &[cand(1, "a", 3), cand(2, "b", 1)]);
        assert_eq!(ports(&out.servers), vec![1, 1, 2, 1]);
        let out = build(
            &policy(),
            &[cand(1, "a", 5), cand(2, "b", 1), cand(3, "c", 1)],
        );
        assert_eq!(ports(&out.servers), vec![1, 1, 2, 1, 3, 1, 1]);
        assert_eq!(
            build(&policy(), &[cand(1, "a", 4), cand(2, "b", 2)])
                .servers
                .len(),
            3
        );
    }

    #[test]
    fn long_lists_are_scaled_to_the_limit() {
        let p = Policy {
            max_list_len: 10,
            ..Policy::default()
        };
        let out = build(&p, &[cand(1, "a", 1000), cand(2, "b", 1)]);
        assert!(out.servers.len() <= 10, "{}", out.servers.len());
        assert!(ports(&out.servers).contains(&2));
    }

    #[test]
    fn duplicate_addresses_are_listed_once() {
        let out = build(
            &policy(),
            &[cand(1, "a", 1), cand(1, "a", 1), cand(2, "b", 1)],
        );
        assert_eq!(ports(&out.servers), vec![1, 2]);
    }

    #[test]
    fn ipv6_addresses_are_16_bytes() {
        let mut c = cand(80, "t", 1);
        c.addr = "[::1]:80".parse().unwrap();
        assert_eq!(build(&policy(), &[c]).servers[0].ip_address.len(), 16);
    }

    /// Ten backends, `silent` of them silent to their checker, each with
    /// the opinions `opinion(i)` gives.
    fn silent_service(
        silent: usize,
        opinions: &[BTreeMap<String, HealthState>],
    ) -> Vec<Candidate<'_>> {
        const TOKENS: [&str; 10] = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9"];
        (0..10)
            .map(|i| {
                let mut c = cand(i as u16 + 1, TOKENS[i], 1);
                if i < silent {
                    c.health = HealthState::Silent;
                    c.opinions = opinions.get(i);
                }
                c
            })
            .collect()
    }

    fn listed_ports(out: &Outcome) -> Vec<i32> {
        let mut p = ports(&out.servers);
        p.sort();
        p.dedup();
        p
    }

    #[test]
    fn one_view_alone_removes_at_most_the_cap_of_a_service() {
        // Half a service silent to one replica, no witness yet: 20 % (two
        // of ten, lowest tokens first) leave, three are held.
        let out = build(&policy(), &silent_service(5, &[]));
        assert_eq!(listed_ports(&out), vec![3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(out.held, 3);
        assert!(!out.panic);
        assert!(out.decisions[2]
            .reason
            .starts_with("held: silent to its checker only"));
        assert!(out.decisions[0]
            .reason
            .contains("within the unconfirmed-removal cap"));
        // One silent backend is always within the cap, a second one of six
        // is not (20 % of six is one).
        let one = build(&policy(), &silent_service(1, &[]));
        assert_eq!(one.servers.len(), 9);
        assert_eq!(one.held, 0);
        let six = silent_service(2, &[]);
        let out = build(&policy(), &six[..6]);
        assert_eq!(
            listed_ports(&out),
            vec![2, 3, 4, 5, 6],
            "{:?}",
            out.decisions
        );
        assert_eq!(out.held, 1);
        // A cap of 0: nothing leaves on one view; of 1: no cap.
        let none = Policy {
            max_unconfirmed_removal: 0.0,
            ..policy()
        };
        assert_eq!(build(&none, &silent_service(5, &[])).servers.len(), 10);
        let all = Policy {
            max_unconfirmed_removal: 1.0,
            ..policy()
        };
        assert_eq!(build(&all, &silent_service(5, &[])).servers.len(), 5);
    }

    #[test]
    fn a_second_view_confirms_or_holds_a_silent_backend() {
        let agree = BTreeMap::from([("lb2".to_string(), HealthState::Silent)]);
        let serving = BTreeMap::from([("lb2".to_string(), HealthState::Serving)]);
        // All five confirmed by a witness: they leave, none held.
        let confirmed = vec![agree.clone(); 5];
        let out = build(&policy(), &silent_service(5, &confirmed));
        assert_eq!(listed_ports(&out), vec![6, 7, 8, 9, 10]);
        assert_eq!(out.held, 0);
        assert!(out.decisions[0].reason.contains("confirmed by lb2"));
        // All five serving to the witness: every one stays, held.
        let contested = vec![serving.clone(); 5];
        let out = build(&policy(), &silent_service(5, &contested));
        assert_eq!(out.servers.len(), 10);
        assert_eq!(out.held, 5);
        assert!(out.decisions[0]
            .reason
            .starts_with("held: silent to its checker but serving to lb2"));
        // Contested ones do not use up the cap: two unconfirmed leave.
        let mixed = vec![serving.clone(), serving, BTreeMap::new(), BTreeMap::new()];
        let out = build(&policy(), &silent_service(5, &mixed));
        assert_eq!(listed_ports(&out), vec![1, 2, 5, 6, 7, 8, 9, 10]);
        assert_eq!(out.held, 3);
        // NOT_SERVING and unreachable are the backend's own answer: no cap.
        let mut answered = silent_service(0, &[]);
        for c in answered.iter_mut().take(5) {
            c.health = HealthState::Unreachable;
        }
        assert_eq!(build(&policy(), &answered).servers.len(), 5);
    }

    #[test]
    fn unhealthy_and_unchecked_backends_are_not_listed() {
        let mut b = cand(2, "b", 1);
        b.health = HealthState::NotServing;
        let mut c = cand(3, "c", 1);
        c.health = HealthState::Unknown;
        let out = build(
            &Policy {
                panic_threshold: 0.0,
                ..policy()
            },
            &[cand(1, "a", 1), b.clone(), c.clone()],
        );
        assert_eq!(ports(&out.servers), vec![1]);
        assert!(out.decisions[1].reason.contains("NOT_SERVING"));
        assert!(out.decisions[2].reason.contains("not health-checked"));
        let lenient = Policy {
            list_unchecked: true,
            panic_threshold: 0.0,
            ..policy()
        };
        assert_eq!(
            ports(&build(&lenient, &[cand(1, "a", 1), b, c]).servers),
            vec![1, 3]
        );
    }

    #[test]
    fn panic_never_lists_a_backend_ejected_for_failing_calls() {
        let p = policy();
        let now = Instant::now();
        let mut ejected = crate::gray::State::new(now);
        ejected.phase = crate::gray::Phase::Ejected {
            until: now + Duration::from_secs(30),
        };
        let cands = vec![
            cand(1, "a", 1),
            Candidate {
                gray: Some(&ejected),
                ..cand(2, "b", 1)
            },
            Candidate {
                health: HealthState::NotServing,
                ..cand(3, "c", 1)
            },
            Candidate {
                health: HealthState::NotServing,
                ..cand(4, "d", 1)
            },
        ];
        let out = build(&p, &cands);
        assert!(out.panic, "1 of 4 eligible");
        assert_eq!(listed_ports(&out), vec![1, 3, 4]);
    }

    #[test]
    fn panic_mode_lists_everyone_when_too_few_are_healthy() {
        let sick = |port, token| Candidate {
            health: HealthState::Unreachable,
            ..cand(port, token, 1)
        };
        let out = build(
            &policy(),
            &[cand(1, "a", 1), sick(2, "b"), sick(3, "c"), sick(4, "d")],
        );
        assert!(out.panic);
        assert_eq!(out.servers.len(), 4);
        assert!(out.decisions[1].reason.contains("panic"));
        // Unchecked backends do not count: a lone new backend is no panic.
        let new = Candidate {
            health: HealthState::Unknown,
            ..cand(5, "e", 1)
        };
        let lone = build(&policy(), std::slice::from_ref(&new));
        assert!(!lone.panic && lone.servers.is_empty(), "{lone:?}");
        let mixed = build(&policy(), &[cand(1, "a", 1), sick(2, "b"), new]);
        assert!(
            !mixed.panic && ports(&mixed.servers) == vec![1],
            "{mixed:?}"
        );
        let calm = build(&policy(), &[cand(1, "a", 1), cand(2, "b", 1), sick(3, "c")]);
        assert!(!calm.panic);
        assert_eq!(calm.servers.len(), 2);
        let off = build(
            &Policy {
                panic_threshold: 0.0,
                ..policy()
            },
            &[cand(1, "a", 1), sick(2, "b"), sick(3, "c")],
        );
        assert_eq!(off.servers.len(), 1);
    }

    #[test]
    fn load_reports_weight_backends_after_the_blackout() {
        let now = Instant::now();
        let long_ago = now - Duration::from_secs(60);
        let load = |util| Load {
            utilization: util,
            qps: 100.0,
            eps: 0.0,
            at: now,
            usable_since: Some(long_ago),
        };
        let (l1, l4) = (load(0.2), load(0.8));
        let mk = |port, token, l| Candidate {
            load: Some(l),
            ..cand(port, token, 1)
        };
        let out = policy().build(
            &[
                mk(1, "a", &l1),
                mk(2, "b", &l1),
                mk(3, "c", &l1),
                mk(4, "d", &l4),
            ],
            now,
        );
        let busy = out.decisions[3].entries as f64 / out.servers.len() as f64;
        assert!(
            busy < 0.125,
            "4x utilization must get well under a fair quarter: {busy}"
        );
        // During the blackout the weight is not used yet.
        let fresh = Load {
            usable_since: Some(now),
            ..l4.clone()
        };
        let out = policy().build(&[mk(1, "a", &l1), mk(4, "d", &fresh)], now);
        assert_eq!(out.decisions[1].entries, out.decisions[0].entries);
        // A stale report is ignored.
        let stale = Load {
            at: now - Duration::from_secs(600),
            ..l4
        };
        let out = policy().build(&[mk(1, "a", &l1), mk(4, "d", &stale)], now);
        assert_eq!(out.decisions[1].entries, out.decisions[0].entries);
        // Errors lower a weight.
        assert!(
            raw_weight(100.0, 50.0, 0.5, 1.0).unwrap() < raw_weight(100.0, 0.0, 0.5, 1.0).unwrap()
        );
        assert_eq!(raw_weight(0.0, 0.0, 0.5, 1.0), None);
    }

    #[test]
    fn slow_start_ramps_a_new_backend() {
        let now = Instant::now();
        let p = Policy {
            slow_start: Duration::from_secs(10),
            ..policy()
        };
        let new = Candidate {
            serving_since: Some(now - Duration::from_secs(1)),
            ..cand(2, "b", 1)
        };
        let out = p.build(&[cand(1, "a", 1), new.clone()], now);
        assert!(
            out.decisions[1].entries * 4 < out.decisions[0].entries,
            "{:?}",
            out.decisions
        );
        assert!(out.decisions[1].reason.contains("slow start"));
        let later = Candidate {
            serving_since: Some(now - Duration::from_secs(11)),
            ..new
        };
        let out = p.build(&[cand(1, "a", 1), later], now);
        assert_eq!(out.decisions[1].entries, out.decisions[0].entries);
    }

    #[test]
    fn shedding_spreads_drops_when_everyone_is_overloaded() {
        let now = Instant::now();
        let hot = Load {
            utilization: 1.2,
            qps: 10.0,
            eps: 0.0,
            at: now,
            usable_since: None,
        };
        let mk = |port, token| Candidate {
            load: Some(&hot),
            ..cand(port, token, 1)
        };
        let p = Policy {
            shed_utilization: Some(0.9),
            ..policy()
        };
        let out = p.build(&[mk(1, "a"), mk(2, "b"), mk(3, "c"), mk(4, "d")], now);
        let drops = out.servers.iter().filter(|s| s.drop).count();
        assert!(drops >= 1, "{:?}", out.servers);
        assert!(
            out.shed_fraction > 0.1 && out.shed_fraction <= 0.5,
            "{}",
            out.shed_fraction
        );
        assert!(
            !out.servers[0].drop || !out.servers[1].drop,
            "drops must be spread"
        );
        // Off by default.
        assert!(policy()
            .build(&[mk(1, "a")], now)
            .servers
            .iter()
            .all(|s| !s.drop));
    }
}
