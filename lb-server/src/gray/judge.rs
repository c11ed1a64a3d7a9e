//! The decision, pure: every backend's pooled evidence and previous state
//! in, its next state with the reason out (see the module above for the
//! rules).
//!
//! Significance is a Chernoff bound: observing `k` errors in `n` calls when
//! the peers' rate is `p` has probability at most `exp(−n · KL(k/n ‖ p))`,
//! so `n · KL` (in nats) is the evidence score, and a backend is suspect
//! when it reaches [`Settings::min_score`] (12 nats: about 6 in a million).
//! The bound is closed-form (no sum over calls), conservative, and grows
//! with evidence: 6 errors in 20 calls against a clean fleet score 29; 15
//! in 300 against a 0.5 % fleet score 21; 3 in 10 against a 2 % fleet 7.
//!
//! The peers' rate is pooled: their errors over their answered calls, of
//! the peers whose own rate is in line with the rest (at most
//! [`Settings::error_ratio`] times the median rate, or below
//! [`Settings::min_error_rate`]), so several failing backends do not
//! raise the bar for each other. A pooled rate is read from several times
//! the calls of any one peer's: with a few errors per peer, a median of
//! per-peer rates jumps between 0, 1 and 2 errors' worth, and a small
//! excess (5 % against 0.5 %) would wait for a lucky draw.

use std::time::{Duration, Instant};

/// Latency evidence decays with this time constant: a call reported this
/// long ago counts 1/e of a call reported now. Short, so that a backend
/// turning slow shows its new mean soon.
pub const DECAY: Duration = Duration::from_secs(30);

/// Error evidence (answered calls and errors) decays with this longer
/// time constant: a small excess of errors needs many calls to be told
/// from noise (5 % against a 0.5 % fleet: about 300 calls), and a
/// backend answering 10 calls a second only has them within a minute if
/// they are remembered that long (a reporter silent for a minute is
/// forgotten whole). A failing backend's evidence is reset when its
/// probation starts.
pub const ERROR_DECAY: Duration = Duration::from_secs(90);

/// Longest ejection, however often a backend was ejected.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Longest probation without enough calls to judge: then re-admitted.
const MAX_PROBATION: Duration = Duration::from_secs(300);

/// Peers' error rate assumed when theirs is lower (a clean fleet is not a
/// fleet that never fails).
const BASELINE_FLOOR: f64 = 0.001;

/// De-weighting ends below this share of the latency ratio (hysteresis).
const LATENCY_RECOVERY: f64 = 2.0 / 3.0;

/// A backend slower than its peers' median by less than this is not slow,
/// whatever the ratio (sub-millisecond means are mostly noise).
const MIN_LATENCY_EXCESS_MS: f64 = 5.0;

/// The detector's knobs (flags `--gray-*`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Judge at all.
    pub enabled: bool,
    /// Answered calls (decayed) a backend needs before it is judged, and
    /// a peer before its rate counts in the baseline.
    pub min_calls: f64,
    /// Distinct clients that must have seen its errors (or its latency).
    pub min_reporters: usize,
    /// Smallest error rate that can eject.
    pub min_error_rate: f64,
    /// A suspect's error rate is at least this many times its peers'.
    pub error_ratio: f64,
    /// Evidence score needed, nats (see the module docs).
    pub min_score: f64,
    /// Largest share of a service ejected at once (at least one backend).
    pub max_ejection: f64,
    /// First ejection's length; the n-th lasts n times this.
    pub base_ejection: Duration,
    /// Weight factor of a backend on probation.
    pub probation_weight: f64,
    /// Mean latency this many times the peers' median de-weights.
    pub latency_ratio: f64,
}

impl Settings {
    /// Most backends of a service of `n` ejected at once.
    pub fn cap(&self, n: usize) -> usize {
        ((self.max_ejection * n as f64).floor() as usize).max(1)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            min_calls: 10.0,
            min_reporters: 3,
            min_error_rate: 0.02,
            error_ratio: 3.0,
            min_score: 12.0,
            max_ejection: 0.1,
            base_ejection: Duration::from_secs(30),
            probation_weight: 0.2,
            latency_ratio: 3.0,
        }
    }
}

/// What clients reported of one backend: decayed sums over reporters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    /// Calls answered (successes and errors; not the callers' own ends).
    pub answered: f64,
    /// Errors of the backend.
    pub errors: f64,
    /// Calls with a latency, and the sum of their latencies (ms).
    pub timed: f64,
    /// Sum of latencies, milliseconds.
    pub latency_ms: f64,
    /// Distinct reporters with calls.
    pub reporters: usize,
    /// Distinct reporters that saw errors.
    pub reporters_with_errors: usize,
    /// The reporter that saw the most errors: its errors and answered
    /// calls (left out, the rest must still be evidence).
    pub top_errors: (f64, f64),
    /// The reporter with the largest latency sum: its latency sum and
    /// timed calls.
    pub top_latency: (f64, f64),
}

/// Where a backend stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Listed as usual.
    Admitted,
    /// Out of every list until then.
    Ejected {
        /// When probation starts.
        until: Instant,
    },
    /// Listed at reduced weight, its evidence afresh, until its calls say
    /// whether it recovered.
    Probation,
}

/// A backend's standing with the detector.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// Where it stands.
    pub phase: Phase,
    /// Since when.
    pub since: Instant,
    /// Ejections so far (lengthens the next one; one is forgiven per
    /// [`MAX_EJECTION`] admitted).
    pub times: u32,
    /// Why, in words ("" while admitted with nothing to say).
    pub why: String,
    /// Its weight is multiplied by this (probation, latency).
    pub weight_factor: f64,
    /// Suspect, but the ejection cap is reached: listed, with an alert.
    pub held: bool,
    /// Ejected on another replica's verdict (its id), not this one's own
    /// ([`crate::gray::shared`]).
    pub by: Option<String>,
}

impl State {
    /// A backend nobody reported anything about.
    pub fn new(now: Instant) -> Self {
        State {
            phase: Phase::Admitted,
            since: now,
            times: 0,
            why: String::new(),
            weight_factor: 1.0,
            held: false,
            by: None,
        }
    }

    /// Out of the lists.
    pub fn ejected(&self) -> bool {
        matches!(self.phase, Phase::Ejected { .. })
    }

    /// The short name of its phase (API, metrics).
    pub fn phase_name(&self) -> &'static str {
        match (&self.phase, self.held) {
            (Phase::Ejected { .. }, _) => "ejected",
            (Phase::Probation, _) => "probation",
            (Phase::Admitted, true) => "held",
            (Phase::Admitted, false) if self.weight_factor < 1.0 => "deweighted",
            (Phase::Admitted, false) => "admitted",
        }
    }
}

/// One backend as the detector sees it.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// Its token (orders ties the same way on every replica).
    pub token: &'a str,
    /// What clients reported, if anything.
    pub evidence: Option<&'a Evidence>,
    /// Its state before this judgement.
    pub state: &'a State,
}

/// One backend's next state.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The state from now on.
    pub state: State,
    /// Its evidence is to start afresh (probation begins).
    pub reset_evidence: bool,
}

/// `n · KL(k/n ‖ p)`: the evidence, in nats, that `k` errors in `n` calls
/// did not come from an error rate of `p` (0 when the rate is not above).
fn score(k: f64, n: f64, p: f64) -> f64 {
    if n <= 0.0 {
        return 0.0;
    }
    let a = (k / n).clamp(0.0, 1.0);
    if a <= p {
        return 0.0;
    }
    let term = |x: f64, y: f64| if x <= 0.0 { 0.0 } else { x * (x / y).ln() };
    n * (term(a, p) + term(1.0 - a, 1.0 - p))
}

/// Whether `e` is suspect of failing calls against its peers' error rate
/// `base` (pooled, see the module docs): `Some((score, reason))`.
fn error_suspect(s: &Settings, e: &Evidence, base: Option<f64>) -> Option<(f64, String)> {
    let base = base?.max(0.0);
    if e.reporters_with_errors < s.min_reporters {
        return None;
    }
    let p = base.max(BASELINE_FLOOR);
    let test = |errors: f64, answered: f64, needed: f64| {
        if answered < s.min_calls {
            return None;
        }
        let rate = errors / answered;
        if rate < s.min_error_rate || rate < s.error_ratio * base {
            return None;
        }
        let sc = score(errors, answered, p);
        (sc >= needed).then_some(sc)
    };
    let sc = test(e.errors, e.answered, s.min_score)?;
    // No one reporter decides: without the one that saw the most errors,
    // the rest are still an excess, and still evidence (half the score:
    // a liar's errors left out leave nothing; honest ones leave most).
    test(
        e.errors - e.top_errors.0,
        e.answered - e.top_errors.1,
        s.min_score / 2.0,
    )?;
    Some((
        sc,
        format!(
            "{:.0} % errors from {} clients against a {:.1} % fleet baseline (its peers' rate)",
            100.0 * e.errors / e.answered,
            e.reporters_with_errors,
            100.0 * base
        ),
    ))
}

/// What a backend's latency says.
enum Latency {
    /// Slow against its peers: this weight factor, and why.
    Slow(f64, String),
    /// In line with its peers.
    Fine,
    /// Too few calls or reporters to say.
    Unknown,
}

/// The latency verdict on `e` against the peers' median mean latency,
/// given its current weight factor (steps change only when the ratio has
/// moved well past a step's edge, so noise near an edge moves nothing).
fn latency(s: &Settings, e: &Evidence, median: Option<f64>, current: f64) -> Latency {
    let Some(median) = median.filter(|m| *m > 0.0) else {
        return Latency::Unknown;
    };
    if e.timed < s.min_calls || e.reporters < s.min_reporters {
        return Latency::Unknown;
    }
    let mean = e.latency_ms / e.timed;
    let ratio = mean / median;
    let deweighted = current < 1.0;
    let needed = if deweighted {
        s.latency_ratio * LATENCY_RECOVERY
    } else {
        s.latency_ratio
    };
    // Sub-millisecond noise is not slowness.
    if ratio < needed || mean - median < MIN_LATENCY_EXCESS_MS {
        return Latency::Fine;
    }
    let (top_sum, top_timed) = e.top_latency;
    let rest = e.timed - top_timed;
    if rest < s.min_calls || (e.latency_ms - top_sum) / rest / median < needed {
        return Latency::Fine;
    }
    // In powers of two, with hysteresis around the current step.
    let exponent = ratio.log2();
    let current_exponent = -current.log2();
    let step = if deweighted && (exponent - current_exponent).abs() < 0.75 {
        current_exponent
    } else {
        exponent.round().max(1.0)
    };
    Latency::Slow(
        2f64.powf(-step).clamp(1.0 / 16.0, 1.0),
        format!("mean latency {mean:.0} ms, {ratio:.1}x the peers' median {median:.0} ms"),
    )
}

/// The peers' pooled error rate, per backend: errors over answered calls
/// of the backends in line with the rest (module docs), the backend
/// itself left out.
struct Baseline {
    /// Each backend's own errors and answered calls, when they count.
    own: Vec<Option<(f64, f64)>>,
    /// Their sums.
    errors: f64,
    answered: f64,
}

impl Baseline {
    fn of(s: &Settings, inputs: &[Input<'_>]) -> Self {
        let counted = |i: &Input<'_>| {
            i.evidence
                .filter(|e| !i.state.ejected() && e.answered >= s.min_calls)
                .map(|e| (e.errors, e.answered))
        };
        let mut rates: Vec<f64> = inputs
            .iter()
            .filter_map(counted)
            .map(|(k, n)| k / n)
            .filter(|r| r.is_finite())
            .collect();
        rates.sort_by(f64::total_cmp);
        let Some(median) = rates.get(rates.len() / 2).copied() else {
            return Baseline {
                own: vec![None; inputs.len()],
                errors: 0.0,
                answered: 0.0,
            };
        };
        let in_line = (s.error_ratio * median).max(s.min_error_rate);
        let own: Vec<Option<(f64, f64)>> = inputs
            .iter()
            .map(|i| counted(i).filter(|(k, n)| k / n <= in_line))
            .collect();
        let (errors, answered) = own
            .iter()
            .flatten()
            .fold((0.0, 0.0), |(k, n), (ki, ni)| (k + ki, n + ni));
        Baseline {
            own,
            errors,
            answered,
        }
    }

    /// The rate of backend `k`'s peers, if they answered enough calls.
    /// Half an error more than they saw, over one call more (Jeffreys'
    /// estimate of a proportion): a fleet with few calls and no error yet
    /// is not known to fail less than about one call in twice as many as
    /// it answered (at 100 calls, 0.5 %; at 1,000 calls with 5 errors,
    /// 0.55 %), which keeps the first seconds after a start, when every
    /// count is small, from reading a clean fleet as a perfect one.
    fn without(&self, s: &Settings, k: usize) -> Option<f64> {
        let (ki, ni) = self.own[k].unwrap_or((0.0, 0.0));
        let (errors, answered) = (self.errors - ki, self.answered - ni);
        (answered >= s.min_calls).then(|| ((errors + 0.5) / (answered + 1.0)).clamp(0.0, 1.0))
    }
}

/// One figure over a service's backends, sorted, from which each
/// backend's peers' median is read without sorting again.
struct Medians(Vec<f64>);

impl Medians {
    /// The figure `value` of every backend not ejected whose evidence is
    /// `enough`, sorted.
    fn of(
        inputs: &[Input<'_>],
        enough: impl Fn(&Evidence) -> bool,
        value: impl Fn(&Evidence) -> f64,
    ) -> Self {
        let mut values: Vec<f64> = inputs
            .iter()
            .filter(|i| !i.state.ejected())
            .filter_map(|i| i.evidence)
            .filter(|e| enough(e))
            .map(value)
            .filter(|v| v.is_finite())
            .collect();
        values.sort_by(f64::total_cmp);
        Medians(values)
    }

    /// The median of the others: all values but `own` (when it is one of
    /// them).
    fn without(&self, own: Option<f64>) -> Option<f64> {
        let v = &self.0;
        match own.and_then(|o| v.binary_search_by(|x| x.total_cmp(&o)).ok()) {
            Some(p) => {
                let m = v.len() - 1;
                if m == 0 {
                    return None;
                }
                let i = m / 2;
                Some(if i < p { v[i] } else { v[i + 1] })
            }
            None if v.is_empty() => None,
            None => Some(v[v.len() / 2]),
        }
    }
}

/// Back to full standing from probation.
fn admit(state: &mut State, now: Instant, why: String) {
    state.phase = Phase::Admitted;
    state.since = now;
    state.why = why;
    state.weight_factor = 1.0;
}

/// Judges every backend of one service at `now`.
pub fn judge(s: &Settings, inputs: &[Input<'_>], now: Instant) -> Vec<Verdict> {
    let mut out: Vec<Verdict> = inputs
        .iter()
        .map(|i| Verdict {
            state: i.state.clone(),
            reset_evidence: false,
        })
        .collect();
    if !s.enabled {
        for v in &mut out {
            if v.state.phase != Phase::Admitted || v.state.weight_factor < 1.0 || v.state.held {
                v.state = State::new(now);
            }
        }
        return out;
    }
    let baseline = Baseline::of(s, inputs);
    let latencies = Medians::of(
        inputs,
        |p| p.timed >= s.min_calls,
        |p| p.latency_ms / p.timed,
    );
    let mut suspects: Vec<(usize, f64, String)> = Vec::new();
    for (k, i) in inputs.iter().enumerate() {
        let v = &mut out[k];
        // Ejections end in probation, with evidence afresh.
        if let Phase::Ejected { until } = v.state.phase {
            if now >= until {
                v.state.phase = Phase::Probation;
                v.state.since = now;
                v.state.why = format!("probation after ejection {}", v.state.times);
                v.state.weight_factor = s.probation_weight;
                v.state.by = None;
                v.reset_evidence = true;
            }
            continue;
        }
        // Held only while the cap below says so.
        v.state.held = false;
        let on_probation = v.state.phase == Phase::Probation;
        if on_probation
            && now.saturating_duration_since(v.state.since) >= MAX_PROBATION
            && i.evidence.is_none_or(|e| e.answered < s.min_calls)
        {
            // Too few calls to judge in all this time: nothing against it.
            let why = "re-admitted: too few calls on probation to judge".to_string();
            admit(&mut v.state, now, why);
            continue;
        }
        let Some(e) = i.evidence else { continue };
        let base = baseline.without(s, k);
        if let Some((sc, why)) = error_suspect(s, e, base) {
            suspects.push((k, sc, why));
            continue;
        }
        if on_probation {
            // Re-admitted on evidence of recovery only: enough answers, at
            // a rate below what could make it suspect.
            let bar = s.min_error_rate.max(s.error_ratio * base.unwrap_or(0.0));
            let rate = e.errors / e.answered.max(1.0);
            if e.answered >= s.min_calls && rate < bar {
                let why = format!(
                    "re-admitted: {:.0} calls answered on probation, {:.1} % errors",
                    e.answered,
                    100.0 * rate
                );
                admit(&mut v.state, now, why);
            }
            continue;
        }
        let own_latency = (e.timed >= s.min_calls).then(|| e.latency_ms / e.timed);
        let deweighted = v.state.weight_factor < 1.0;
        match latency(s, e, latencies.without(own_latency), v.state.weight_factor) {
            Latency::Slow(f, why) => {
                v.state.weight_factor = f;
                v.state.why = format!("de-weighted: {why}");
            }
            Latency::Fine if deweighted => {
                v.state.weight_factor = 1.0;
                v.state.why = "latency back in line with its peers".into();
            }
            // Too little to say: as it was.
            Latency::Fine | Latency::Unknown => {}
        }
    }
    // Worst first, the same order on every replica.
    suspects.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| inputs[a.0].token.cmp(inputs[b.0].token))
    });
    let cap = s.cap(inputs.len());
    let mut ejected = out.iter().filter(|v| v.state.ejected()).count();
    for (k, _, why) in suspects {
        let v = &mut out[k];
        if ejected >= cap {
            v.state.held = true;
            v.state.why = format!("suspect, held: the ejection cap ({cap}) is reached: {why}");
            continue;
        }
        ejected += 1;
        v.state.times = v.state.times.saturating_add(1);
        let length = (s.base_ejection * v.state.times).min(MAX_EJECTION);
        v.state.phase = Phase::Ejected {
            until: now + length,
        };
        v.state.since = now;
        v.state.held = false;
        v.state.weight_factor = 1.0;
        v.state.why = format!("ejected for {length:?} (ejection {}): {why}", v.state.times);
    }
    // One ejection forgiven per MAX_EJECTION admitted.
    for v in &mut out {
        if v.state.phase == Phase::Admitted
            && v.state.times > 0
            && now.saturating_duration_since(v.state.since) >= MAX_EJECTION
        {
            v.state.times -= 1;
            v.state.since = now;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    /// `errors` in `answered` calls, spread evenly over `reporters`
    /// clients, each call taking `ms`.
    fn evidence(answered: f64, errors: f64, reporters: usize, ms: f64) -> Evidence {
        let r = reporters.max(1) as f64;
        Evidence {
            answered,
            errors,
            timed: answered,
            latency_ms: answered * ms,
            reporters,
            reporters_with_errors: if errors > 0.0 {
                reporters.min(errors.ceil() as usize)
            } else {
                0
            },
            top_errors: ((errors / r).ceil().min(errors), answered / r),
            top_latency: (answered * ms / r, answered / r),
        }
    }

    struct Fleet {
        addrs: Vec<SocketAddr>,
        tokens: Vec<String>,
        states: Vec<State>,
        now: Instant,
    }

    impl Fleet {
        fn new(n: usize) -> Self {
            let now = Instant::now();
            Fleet {
                addrs: (0..n)
                    .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)))
                    .collect(),
                tokens: (0..n).map(|i| format!("t{i:02}")).collect(),
                states: vec![State::new(now); n],
                now,
            }
        }

        /// The detector's inputs: `evidence` per backend and its state.
        fn inputs<'a>(&'a self, evidence: &'a [Option<Evidence>]) -> Vec<Input<'a>> {
            (0..self.addrs.len())
                .map(|i| Input {
                    token: &self.tokens[i],
                    evidence: evidence[i].as_ref(),
                    state: &self.states[i],
                })
                .collect()
        }

        /// Judges with `evidence` per backend, keeps the states, returns
        /// the phases' names.
        fn judge(&mut self, s: &Settings, evidence: &[Option<Evidence>]) -> Vec<&'static str> {
            let verdicts = judge(s, &self.inputs(evidence), self.now);
            self.states = verdicts.into_iter().map(|v| v.state).collect();
            self.states.iter().map(State::phase_name).collect()
        }
    }

    #[test]
    fn thirty_percent_errors_seen_by_many_clients_eject() {
        let s = Settings::default();
        let mut f = Fleet::new(5);
        // 20 calls each, from 20 clients, in the first seconds.
        let mut e = vec![Some(evidence(20.0, 0.0, 20, 2.0)); 5];
        e[2] = Some(evidence(20.0, 6.0, 20, 2.0));
        let phases = f.judge(&s, &e);
        assert_eq!(
            phases,
            ["admitted", "admitted", "ejected", "admitted", "admitted"]
        );
        assert!(
            f.states[2].why.contains("30 % errors from 6 clients"),
            "{}",
            f.states[2].why
        );
    }

    #[test]
    fn five_percent_against_half_a_percent_ejects_with_enough_calls() {
        let s = Settings::default();
        let mut f = Fleet::new(5);
        let mut e = vec![Some(evidence(300.0, 1.5, 10, 2.0)); 5];
        e[0] = Some(evidence(100.0, 5.0, 10, 2.0));
        assert_eq!(
            f.judge(&s, &e)[0],
            "admitted",
            "100 calls: not yet evidence"
        );
        e[0] = Some(evidence(300.0, 15.0, 10, 2.0));
        assert_eq!(f.judge(&s, &e)[0], "ejected");
    }

    #[test]
    fn noise_shared_by_every_backend_ejects_none() {
        let s = Settings::default();
        let mut f = Fleet::new(5);
        // 2 % everywhere, one backend unlucky at 5 %.
        let mut e = vec![Some(evidence(300.0, 6.0, 10, 2.0)); 5];
        e[1] = Some(evidence(300.0, 15.0, 10, 2.0));
        assert!(f.judge(&s, &e).iter().all(|p| *p == "admitted"));
        // Few calls, a few errors: not evidence.
        let mut e = vec![Some(evidence(10.0, 0.0, 10, 2.0)); 5];
        e[3] = Some(evidence(10.0, 3.0, 10, 2.0));
        assert!(f.judge(&s, &e).iter().all(|p| *p == "admitted"));
    }

    #[test]
    fn one_client_reporting_failures_cannot_eject() {
        let s = Settings::default();
        let mut f = Fleet::new(5);
        let mut e = vec![Some(evidence(200.0, 0.0, 10, 2.0)); 5];
        // One liar: 100 % failures of its 50 calls; nine others: none.
        e[4] = Some(Evidence {
            errors: 50.0,
            reporters_with_errors: 1,
            top_errors: (50.0, 50.0),
            ..evidence(200.0, 0.0, 10, 2.0)
        });
        assert!(f.judge(&s, &e).iter().all(|p| *p == "admitted"));
        // Three liars among them are seen by `min_reporters`, but the one
        // that reported most left out, the rest must still be evidence.
        e[4] = Some(Evidence {
            errors: 150.0,
            reporters_with_errors: 3,
            top_errors: (50.0, 50.0),
            ..evidence(200.0, 0.0, 10, 2.0)
        });
        assert_eq!(f.judge(&s, &e)[4], "ejected", "three clients agree");
    }

    #[test]
    fn the_cap_holds_the_rest_with_an_alert_worst_first() {
        let s = Settings::default();
        let mut f = Fleet::new(10);
        let mut e = vec![Some(evidence(100.0, 0.0, 10, 2.0)); 10];
        for (i, errors) in [(1, 30.0), (3, 60.0), (5, 40.0), (7, 30.0)] {
            e[i] = Some(evidence(100.0, errors, 10, 2.0));
        }
        let phases = f.judge(&s, &e);
        assert_eq!(phases.iter().filter(|p| **p == "ejected").count(), 1);
        assert_eq!(phases[3], "ejected", "the worst one");
        assert_eq!(phases.iter().filter(|p| **p == "held").count(), 3);
        assert!(f.states[1].why.contains("cap"), "{}", f.states[1].why);
    }

    #[test]
    fn ejection_ends_in_probation_and_good_calls_readmit() {
        let s = Settings::default();
        let mut f = Fleet::new(5);
        let mut e = vec![Some(evidence(50.0, 0.0, 10, 2.0)); 5];
        e[0] = Some(evidence(50.0, 25.0, 10, 2.0));
        assert_eq!(f.judge(&s, &e)[0], "ejected");
        // While ejected, nothing changes, whatever the stale evidence.
        f.now += Duration::from_secs(29);
        assert_eq!(f.judge(&s, &e)[0], "ejected");
        f.now += Duration::from_secs(1);
        let v = judge(&s, &f.inputs(&e), f.now);
        assert_eq!(v[0].state.phase, Phase::Probation);
        assert!(v[0].reset_evidence, "probation starts on fresh evidence");
        assert_eq!(v[0].state.weight_factor, s.probation_weight);
        f.states = v.into_iter().map(|v| v.state).collect();
        // A passing health check is not evidence: no calls, no re-admission.
        e[0] = None;
        assert_eq!(f.judge(&s, &e)[0], "probation");
        // Failing again on probation: ejected for twice as long.
        e[0] = Some(evidence(20.0, 10.0, 10, 2.0));
        assert_eq!(f.judge(&s, &e)[0], "ejected");
        assert!(f.states[0].why.contains("60s"), "{}", f.states[0].why);
        f.now += Duration::from_secs(60);
        e[0] = None;
        assert_eq!(f.judge(&s, &e)[0], "probation");
        e[0] = Some(evidence(20.0, 0.0, 10, 2.0));
        assert_eq!(f.judge(&s, &e)[0], "admitted");
        assert_eq!(f.states[0].weight_factor, 1.0);
    }

    #[test]
    fn a_slow_backend_is_deweighted_and_recovers() {
        let s = Settings::default();
        let mut f = Fleet::new(5);
        let mut e = vec![Some(evidence(100.0, 0.0, 10, 10.0)); 5];
        e[2] = Some(evidence(100.0, 0.0, 10, 35.0));
        assert_eq!(f.judge(&s, &e)[2], "deweighted");
        assert_eq!(f.states[2].weight_factor, 0.25, "3.5x slower: a quarter");
        // Between recovery and the ratio: stays de-weighted (no flapping).
        e[2] = Some(evidence(100.0, 0.0, 10, 25.0));
        assert_eq!(f.judge(&s, &e)[2], "deweighted");
        e[2] = Some(evidence(100.0, 0.0, 10, 12.0));
        assert_eq!(f.judge(&s, &e)[2], "admitted");
        // 2.5x: not slow enough to act on.
        e[2] = Some(evidence(100.0, 0.0, 10, 25.0));
        assert_eq!(f.judge(&s, &e)[2], "admitted");
    }

    #[test]
    fn the_baseline_pools_the_peers_in_line_and_leaves_failing_ones_out() {
        let s = Settings::default();
        let mut f = Fleet::new(10);
        // Nine peers at 0.5 % (1.5 errors in 300 calls each, pooled), one
        // of them failing 30 %, and one backend at 5 %.
        let mut e = vec![Some(evidence(300.0, 1.5, 10, 2.0)); 10];
        e[0] = Some(evidence(300.0, 90.0, 10, 2.0));
        e[5] = Some(evidence(300.0, 15.0, 10, 2.0));
        let inputs = f.inputs(&e);
        let b = Baseline::of(&s, &inputs);
        // 8 peers' 12 errors in 2,400 calls (and half an error more).
        let rate = b.without(&s, 5).unwrap();
        assert!((rate - 12.5 / 2401.0).abs() < 1e-9, "{rate}");
        // The 5 % backend is out of the 30 % one's baseline as well.
        assert!((b.without(&s, 0).unwrap() - 12.5 / 2401.0).abs() < 1e-9);
        drop(inputs);
        let phases = f.judge(&s, &e);
        assert_eq!(phases[0], "ejected");
        assert_eq!(phases[5], "held", "over the cap of one: {phases:?}");
        assert!(f.states[5].why.contains("0.5 % fleet baseline"));
    }

    #[test]
    fn the_peers_median_leaves_the_backend_itself_out() {
        let m = Medians(vec![0.0, 0.1, 0.2, 0.3]);
        assert_eq!(m.without(Some(0.0)), Some(0.2));
        assert_eq!(m.without(Some(0.3)), Some(0.1));
        assert_eq!(m.without(None), Some(0.2));
        assert_eq!(Medians(vec![0.5]).without(Some(0.5)), None);
        assert_eq!(Medians(vec![]).without(None), None);
    }

    #[test]
    fn a_held_backend_is_released_when_the_cap_frees_or_its_evidence_goes() {
        let s = Settings::default();
        let mut f = Fleet::new(10);
        let mut e = vec![Some(evidence(100.0, 0.0, 10, 2.0)); 10];
        e[1] = Some(evidence(100.0, 50.0, 10, 2.0));
        e[2] = Some(evidence(100.0, 40.0, 10, 2.0));
        let phases = f.judge(&s, &e);
        assert_eq!((phases[1], phases[2]), ("ejected", "held"));
        // Its evidence gone (say, its reports stopped): not held any more.
        e[2] = None;
        assert_eq!(f.judge(&s, &e)[2], "admitted");
    }

    #[test]
    fn probation_needs_good_answers_not_merely_enough_of_them() {
        let s = Settings::default();
        let mut f = Fleet::new(5);
        let mut e = vec![Some(evidence(100.0, 0.0, 10, 2.0)); 5];
        e[0] = Some(evidence(100.0, 50.0, 10, 2.0));
        assert_eq!(f.judge(&s, &e)[0], "ejected");
        f.now += Duration::from_secs(30);
        e[0] = None;
        assert_eq!(f.judge(&s, &e)[0], "probation");
        // 12 answers at 25 % errors from two clients: not evidence enough
        // to eject again, and no sign of recovery either.
        e[0] = Some(Evidence {
            reporters_with_errors: 2,
            ..evidence(12.0, 3.0, 2, 2.0)
        });
        assert_eq!(f.judge(&s, &e)[0], "probation");
        e[0] = Some(evidence(12.0, 0.0, 2, 2.0));
        assert_eq!(f.judge(&s, &e)[0], "admitted");
    }

    #[test]
    fn without_evidence_or_switched_off_nothing_is_ejected() {
        let mut f = Fleet::new(3);
        assert!(f
            .judge(&Settings::default(), &[None, None, None])
            .iter()
            .all(|p| *p == "admitted"));
        let mut e = vec![Some(evidence(100.0, 0.0, 10, 2.0)); 3];
        e[0] = Some(evidence(100.0, 90.0, 10, 2.0));
        assert_eq!(f.judge(&Settings::default(), &e)[0], "ejected");
        let off = Settings {
            enabled: false,
            ..Settings::default()
        };
        assert_eq!(
            f.judge(&off, &e)[0],
            "admitted",
            "switched off: everyone back"
        );
    }
}
