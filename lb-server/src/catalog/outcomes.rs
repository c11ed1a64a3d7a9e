//! What clients saw of each backend: per-backend call outcomes from every
//! client's load reports (LRS, one locality per backend), pooled per
//! backend over a sliding window.
//!
//! Health checks ask a backend whether it serves; these say how it served
//! real calls, as its callers saw them: calls, the backend's errors, the
//! calls a deadline ended and those the caller cancelled (the caller's
//! doing, kept apart), latency, and how many distinct clients reported.
//! `LbChannel` reports exactly this; stock xDS clients report successes
//! and errors (every non-OK status is an error to them).
//!
//! Bounded by construction: entries exist only for backends the service
//! has; per backend, the window is [`BUCKETS`] buckets of [`BUCKET`], and
//! at most [`MAX_REPORTERS`] distinct reporters are remembered (their calls
//! count beyond that, their names do not). Sums saturate: the counts are
//! whatever a client sends.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Catalog, ServiceEntry};
use crate::metrics::{CallLabels, OUTCOME_ENDS};

/// One bucket of the window.
pub const BUCKET: Duration = Duration::from_secs(10);
/// Buckets in the window (the window is `BUCKETS × BUCKET`: one minute).
pub const BUCKETS: usize = 6;
/// Most distinct reporters remembered per backend.
pub const MAX_REPORTERS: usize = 256;
/// Longest reporter name kept (longer ones are cut).
pub const MAX_REPORTER_NAME: usize = 128;

/// One report's counts for one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Calls issued.
    pub issued: u64,
    /// Calls the backend answered.
    pub successes: u64,
    /// Calls the backend (or the way to it) failed.
    pub errors: u64,
    /// Calls in progress at the report.
    pub in_progress: u64,
    /// Calls their deadline ended.
    pub deadline: u64,
    /// Calls the caller cancelled.
    pub cancelled: u64,
    /// Calls with a latency, and its sum in milliseconds.
    pub timed: u64,
    /// Sum of latencies, milliseconds.
    pub latency_ms: f64,
}

impl Sample {
    fn add(&mut self, o: &Sample) {
        self.issued = self.issued.saturating_add(o.issued);
        self.successes = self.successes.saturating_add(o.successes);
        self.errors = self.errors.saturating_add(o.errors);
        self.deadline = self.deadline.saturating_add(o.deadline);
        self.cancelled = self.cancelled.saturating_add(o.cancelled);
        self.timed = self.timed.saturating_add(o.timed);
        if o.latency_ms.is_finite() && o.latency_ms >= 0.0 {
            self.latency_ms += o.latency_ms;
        }
    }
}

/// One bucket: its start and what was reported in it.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    counts: Sample,
}

/// One reporter of a backend: when it last reported, its calls in
/// progress then, and what it saw, decayed ([`crate::gray::DECAY`],
/// [`crate::gray::ERROR_DECAY`]).
#[derive(Debug, Clone, Copy)]
struct Reporter {
    last: Instant,
    in_progress: u64,
    recent: Decayed,
}

/// Counts that fade: each is worth `exp(−age / DECAY)` of itself (errors
/// and answered calls with the longer `ERROR_DECAY`).
#[derive(Debug, Clone, Copy, Default)]
struct Decayed {
    answered: f64,
    errors: f64,
    timed: f64,
    latency_ms: f64,
}

impl Decayed {
    /// These counts as seen `age` later.
    fn aged(&self, age: Duration) -> Decayed {
        let fade = |decay: Duration| (-age.as_secs_f64() / decay.as_secs_f64()).exp();
        let (f, g) = (fade(crate::gray::DECAY), fade(crate::gray::ERROR_DECAY));
        Decayed {
            answered: self.answered * g,
            errors: self.errors * g,
            timed: self.timed * f,
            latency_ms: self.latency_ms * f,
        }
    }

    fn add(&mut self, s: &Sample) {
        // Saturating counts in f64: at worst a huge number, never NaN.
        let n = |v: u64| v as f64;
        self.answered += n(s.successes) + n(s.errors);
        self.errors += n(s.errors);
        self.timed += n(s.timed);
        if s.latency_ms.is_finite() && s.latency_ms >= 0.0 {
            self.latency_ms += s.latency_ms;
        }
    }
}

/// One backend's pooled outcomes.
#[derive(Debug, Default)]
struct Pooled {
    buckets: VecDeque<Bucket>,
    reporters: HashMap<Arc<str>, Reporter>,
    total: Sample,
    /// When a report last swept out the reporters gone quiet.
    swept: Option<Instant>,
}

/// How often reports sweep out reporters gone quiet for the window: every
/// report would walk up to [`MAX_REPORTERS`] entries for each backend it
/// names. Views and the detector's reads sweep every time.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Pooled {
    fn record(&mut self, reporter: &Arc<str>, sample: &Sample, now: Instant) {
        if self
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY)
        {
            self.expire(now);
        }
        match self.buckets.back_mut() {
            Some(b) if now.duration_since(b.start) < BUCKET => b.counts.add(sample),
            _ => self.buckets.push_back(Bucket {
                start: now,
                counts: *sample,
            }),
        }
        self.total.add(sample);
        let r = self.reporters.get(reporter).copied();
        if r.is_none() && self.reporters.len() >= MAX_REPORTERS {
            return;
        }
        let mut recent = r.map_or_else(Decayed::default, |r| {
            r.recent.aged(now.saturating_duration_since(r.last))
        });
        recent.add(sample);
        self.reporters.insert(
            reporter.clone(),
            Reporter {
                last: now,
                in_progress: sample.in_progress,
                recent,
            },
        );
    }

    /// What the reporters saw, decayed to `now`, as the detector reads it.
    fn evidence(&mut self, now: Instant) -> crate::gray::Evidence {
        self.expire(now);
        let mut e = crate::gray::Evidence::default();
        for r in self.reporters.values() {
            let d = r.recent.aged(now.saturating_duration_since(r.last));
            e.answered += d.answered;
            e.errors += d.errors;
            e.timed += d.timed;
            e.latency_ms += d.latency_ms;
            if d.answered > 0.01 {
                e.reporters += 1;
            }
            if d.errors >= 0.5 {
                e.reporters_with_errors += 1;
            }
            if d.errors > e.top_errors.0 {
                e.top_errors = (d.errors, d.answered);
            }
            if d.latency_ms > e.top_latency.0 {
                e.top_latency = (d.latency_ms, d.timed);
            }
        }
        e
    }

    /// Forgets what the reporters saw so far (probation starts afresh).
    fn reset(&mut self) {
        for r in self.reporters.values_mut() {
            r.recent = Decayed::default();
        }
    }

    fn expire(&mut self, now: Instant) {
        self.swept = Some(now);
        let window = BUCKET * BUCKETS as u32;
        while self
            .buckets
            .front()
            .is_some_and(|b| now.duration_since(b.start) >= window)
        {
            self.buckets.pop_front();
        }
        self.reporters
            .retain(|_, r| now.duration_since(r.last) < window);
    }

    fn view(&mut self, now: Instant) -> OutcomesView {
        self.expire(now);
        let mut w = Sample::default();
        for b in &self.buckets {
            w.add(&b.counts);
        }
        let in_progress = self
            .reporters
            .values()
            .map(|r| r.in_progress)
            .fold(0u64, u64::saturating_add);
        let answered = w.successes.saturating_add(w.errors);
        OutcomesView {
            window_s: (BUCKET * BUCKETS as u32).as_secs(),
            calls: w.issued,
            successes: w.successes,
            errors: w.errors,
            error_rate: (answered > 0).then(|| w.errors as f64 / answered as f64),
            deadline_exceeded: w.deadline,
            cancelled_by_caller: w.cancelled,
            latency_ms_mean: (w.timed > 0).then(|| w.latency_ms / w.timed as f64),
            in_progress,
            reporters: self.reporters.len(),
            total_calls: self.total.issued,
            total_errors: self.total.errors,
        }
    }
}

/// What `/api/v1/services/{name}` shows of one backend's outcomes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutcomesView {
    /// The window the figures below cover, seconds.
    pub window_s: u64,
    /// Calls issued to it.
    pub calls: u64,
    /// Calls it answered.
    pub successes: u64,
    /// Calls it (or the way to it) failed.
    pub errors: u64,
    /// Errors among the calls that ended by the backend.
    pub error_rate: Option<f64>,
    /// Calls a deadline ended (the callers' budgets, not errors).
    pub deadline_exceeded: u64,
    /// Calls their callers cancelled (not errors).
    pub cancelled_by_caller: u64,
    /// Mean latency of the calls that ended, milliseconds.
    pub latency_ms_mean: Option<f64>,
    /// Calls in progress, as each reporter last said.
    pub in_progress: u64,
    /// Distinct clients that reported on it in the window.
    pub reporters: usize,
    /// Calls issued to it since the LB started.
    pub total_calls: u64,
    /// Errors since the LB started.
    pub total_errors: u64,
}

/// The pooled outcomes of one service's backends.
#[derive(Debug, Default)]
pub struct ServiceOutcomes {
    backends: Mutex<HashMap<SocketAddr, Pooled>>,
}

impl ServiceOutcomes {
    /// Adds `sample`, reported by `reporter`, to `addr`'s outcomes (the
    /// caller checked that the service has that backend).
    pub fn record(&self, addr: SocketAddr, reporter: &Arc<str>, sample: &Sample, now: Instant) {
        self.backends
            .lock()
            .expect("outcomes lock")
            .entry(addr)
            .or_default()
            .record(reporter, sample, now);
    }

    /// The outcomes of `addr` in the window, if anyone ever reported on it.
    pub fn view(&self, addr: SocketAddr, now: Instant) -> Option<OutcomesView> {
        self.backends
            .lock()
            .expect("outcomes lock")
            .get_mut(&addr)
            .map(|p| p.view(now))
    }

    /// Every backend's evidence for the detector, decayed to `now`.
    pub fn evidence(&self, now: Instant) -> HashMap<SocketAddr, crate::gray::Evidence> {
        self.backends
            .lock()
            .expect("outcomes lock")
            .iter_mut()
            .map(|(a, p)| (*a, p.evidence(now)))
            .collect()
    }

    /// Forgets what clients saw of `addr` so far.
    pub fn reset(&self, addr: SocketAddr) {
        if let Some(p) = self.backends.lock().expect("outcomes lock").get_mut(&addr) {
            p.reset();
        }
    }

    /// Backends with outcomes kept.
    pub fn len(&self) -> usize {
        self.backends.lock().expect("outcomes lock").len()
    }

    /// Whether no backend has outcomes kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the backends `keep` says the service no longer has.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.backends
            .lock()
            .expect("outcomes lock")
            .retain(|a, _| keep(a));
    }
}

impl Catalog {
    /// Adds one report's per-backend `samples`, from `reporter`, to the
    /// service's pooled outcomes; samples for addresses the service does
    /// not have are left out and their count returned.
    pub fn record_outcomes(
        &self,
        entry: &ServiceEntry,
        reporter: &Arc<str>,
        samples: &[(SocketAddr, Sample)],
    ) -> usize {
        let now = Instant::now();
        let known: std::collections::HashSet<SocketAddr> = entry
            .backends
            .lock()
            .expect("catalog lock")
            .values()
            .map(|b| b.addr)
            .collect();
        let mut unknown = 0;
        let mut ends = [0u64; 4];
        for (addr, sample) in samples {
            if !known.contains(addr) {
                unknown += 1;
                continue;
            }
            entry.outcomes.record(*addr, reporter, sample, now);
            for (n, add) in ends.iter_mut().zip([
                sample.successes,
                sample.errors,
                sample.deadline,
                sample.cancelled,
            ]) {
                *n = n.saturating_add(add);
            }
        }
        // Backends that left stay until the next check: prune once they
        // could be as many as those the service has.
        if entry.outcomes.len() > 2 * known.len() + 16 {
            entry.outcomes.retain(|a| known.contains(a));
        }
        for (end, n) in OUTCOME_ENDS.iter().zip(ends) {
            if n > 0 {
                self.metrics
                    .backend_outcomes
                    .get_or_create(&CallLabels {
                        service: entry.name.clone(),
                        kind: (*end).into(),
                    })
                    .inc_by(n);
            }
        }
        unknown
    }
}

/// A reporter's name as kept: at most [`MAX_REPORTER_NAME`] bytes.
pub fn reporter_name(name: &str) -> Arc<str> {
    let mut end = name.len().min(MAX_REPORTER_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Arc::from(&name[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(issued: u64, ok: u64, errors: u64) -> Sample {
        Sample {
            issued,
            successes: ok,
            errors,
            timed: ok + errors,
            latency_ms: 2.0 * (ok + errors) as f64,
            ..Default::default()
        }
    }

    #[test]
    fn outcomes_pool_over_reporters_and_leave_the_window() {
        let o = ServiceOutcomes::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t0 = Instant::now();
        let (c1, c2) = (reporter_name("c1"), reporter_name("c2"));
        o.record(a, &c1, &sample(10, 9, 1), t0);
        o.record(a, &c2, &sample(10, 7, 3), t0 + Duration::from_secs(1));
        let v = o.view(a, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(
            (v.calls, v.successes, v.errors, v.reporters),
            (20, 16, 4, 2)
        );
        assert_eq!(v.error_rate, Some(0.2));
        assert_eq!(v.latency_ms_mean, Some(2.0));
        // A minute later, the window has moved on; the totals stay.
        let v = o.view(a, t0 + Duration::from_secs(70)).unwrap();
        assert_eq!((v.calls, v.reporters, v.total_calls), (0, 0, 20));
        assert_eq!(v.error_rate, None);
        assert!(o.view("127.0.0.1:2".parse().unwrap(), t0).is_none());
    }

    #[test]
    fn hostile_counts_saturate_and_reporters_are_bounded() {
        let o = ServiceOutcomes::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t0 = Instant::now();
        let huge = Sample {
            issued: u64::MAX,
            errors: u64::MAX,
            latency_ms: f64::NAN,
            timed: 1,
            ..Default::default()
        };
        for i in 0..(MAX_REPORTERS + 10) {
            o.record(a, &reporter_name(&format!("c{i}")), &huge, t0);
        }
        let v = o.view(a, t0).unwrap();
        assert_eq!(v.calls, u64::MAX);
        assert_eq!(v.reporters, MAX_REPORTERS);
        assert_eq!(v.latency_ms_mean, Some(0.0), "a NaN latency is ignored");
        assert_eq!(reporter_name(&"é".repeat(100)).len(), MAX_REPORTER_NAME);
        o.retain(|_| false);
        assert!(o.view(a, t0).is_none());
    }
}
