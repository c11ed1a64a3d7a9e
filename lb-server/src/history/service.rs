//! One service's history: a sample of it every interval (calls, failures,
//! list version) and of each of its backends (list share, weight, health,
//! utilization), aligned on the same times, and the timeline of its
//! catalog events.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::SystemTime;

use super::ring::Ring;
use crate::catalog::journal::Event;
use crate::catalog::{Backend, ServiceEntry};
use crate::model::HealthState;

/// A backend's health in one sample, as stored (one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not registered at that time.
    Absent,
    /// Registered, not checked yet.
    Unknown,
    /// Healthy (serving, or not health-checked).
    Serving,
    /// Not serving or unreachable.
    Down,
    /// Drained by an operator.
    Drained,
}

impl Health {
    fn of(b: &Backend) -> Health {
        match (b.drained, b.health) {
            (true, _) => Health::Drained,
            (false, HealthState::Unknown) => Health::Unknown,
            (false, h) if h.is_healthy() => Health::Serving,
            _ => Health::Down,
        }
    }
}

/// One backend's series.
#[derive(Debug, Clone)]
struct BackendSeries {
    share: Ring<f32>,
    weight: Ring<f32>,
    utilization: Ring<f32>,
    health: Ring<Health>,
}

/// Totals of the service's client stats at the previous sample.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    finished: i64,
    failed: i64,
}

/// One service's history.
#[derive(Debug)]
pub struct ServiceHistory {
    capacity: usize,
    times: Ring<u64>,
    calls: Ring<f32>,
    failures: Ring<f32>,
    list_version: Ring<u64>,
    backends: BTreeMap<SocketAddr, BackendSeries>,
    events: VecDeque<Event>,
    max_events: usize,
    /// Client-stats totals at recent samples, for rates over `rate_window`.
    previous: VecDeque<(SystemTime, Totals)>,
    rate_window: std::time::Duration,
}

/// Bytes one backend's series take per sample (share, weight,
/// utilization as `f32`, health as one byte), for the memory budget.
pub const BACKEND_SAMPLE_BYTES: usize = 13;

/// Bytes one service's own series take per sample.
pub const SERVICE_SAMPLE_BYTES: usize = 24;

impl ServiceHistory {
    /// An empty history of at most `capacity` samples and `max_events`
    /// events, with call rates measured over `rate_window`.
    pub fn new(capacity: usize, max_events: usize, rate_window: std::time::Duration) -> Self {
        ServiceHistory {
            capacity,
            times: Ring::new(capacity),
            calls: Ring::new(capacity),
            failures: Ring::new(capacity),
            list_version: Ring::new(capacity),
            backends: BTreeMap::new(),
            events: VecDeque::new(),
            max_events,
            previous: VecDeque::new(),
            rate_window,
        }
    }

    /// Backends with a series.
    pub fn backends(&self) -> usize {
        self.backends.len()
    }

    /// Adds an event to the timeline (the oldest goes when full).
    pub fn event(&mut self, event: Event) {
        if self.events.len() == self.max_events {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Takes a sample of `entry` at `now`. `room` is how many more backend
    /// series may be started (the memory cap); returns how many of its
    /// backends were left without one by that cap.
    pub fn sample(&mut self, entry: &ServiceEntry, now: SystemTime, room: usize) -> usize {
        let list = entry.current_list();
        // List entries carry the backend's load-balance token.
        let mut entries: std::collections::HashMap<&str, usize> = Default::default();
        for s in list.servers.iter() {
            *entries.entry(s.load_balance_token.as_str()).or_default() += 1;
        }
        let total = list.servers.len().max(1) as f32;
        let calls = &entry.calls;
        let load = |a: &std::sync::atomic::AtomicI64| a.load(std::sync::atomic::Ordering::Relaxed);
        // Totals are sums of what clients reported (saturated, never
        // negative), so their differences are computed saturating too.
        let totals = Totals {
            finished: load(&calls.finished),
            // Calls not known to have reached a backend.
            failed: load(&calls.failed_to_send)
                .saturating_add(load(&calls.finished))
                .saturating_sub(load(&calls.known_received))
                .max(0),
        };
        // Clients report every client-stats interval, not when sampled: a
        // rate over one sample interval would alias (a report in one
        // interval, none in the next). Rates span at least `rate_window`.
        let (calls_rate, failure_rate) = match self.previous.front() {
            Some((at, before)) => {
                let secs = now
                    .duration_since(*at)
                    .map(|d| d.as_secs_f32())
                    .unwrap_or(0.0);
                if secs > 0.0 {
                    (
                        totals.finished.saturating_sub(before.finished).max(0) as f32 / secs,
                        totals.failed.saturating_sub(before.failed).max(0) as f32 / secs,
                    )
                } else {
                    (f32::NAN, f32::NAN)
                }
            }
            None => (f32::NAN, f32::NAN),
        };
        self.previous.push_back((now, totals));
        // Keep the newest sample at least `rate_window` old as the base.
        while self.previous.len() > 2
            && self.previous.get(1).is_some_and(|(t, _)| {
                now.duration_since(*t).unwrap_or_default() >= self.rate_window
            })
        {
            self.previous.pop_front();
        }
        let len = self.times.len();
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.times.push(millis);
        self.calls.push(calls_rate);
        self.failures.push(failure_rate);
        self.list_version.push(list.version);

        let (mut started, mut skipped) = (0, 0);
        let mut seen = std::collections::BTreeSet::new();
        for b in entry.backends() {
            if !seen.insert(b.addr) {
                continue;
            }
            if !self.backends.contains_key(&b.addr) {
                if started == room {
                    skipped += 1;
                    continue;
                }
                started += 1;
                self.backends.insert(
                    b.addr,
                    BackendSeries {
                        share: Ring::filled(self.capacity, len, f32::NAN),
                        weight: Ring::filled(self.capacity, len, f32::NAN),
                        utilization: Ring::filled(self.capacity, len, f32::NAN),
                        health: Ring::filled(self.capacity, len, Health::Absent),
                    },
                );
            }
            let series = self.backends.get_mut(&b.addr).expect("just inserted");
            series
                .share
                .push(entries.get(b.token.as_str()).copied().unwrap_or(0) as f32 / total);
            series.weight.push(b.decision.weight as f32);
            series.utilization.push(
                b.load_report
                    .as_ref()
                    .map(|r| r.sample.utilization() as f32)
                    .unwrap_or(f32::NAN),
            );
            series.health.push(Health::of(&b));
        }
        // Gone backends stay (as absent) until their whole window is absent.
        self.backends.retain(|addr, series| {
            if seen.contains(addr) {
                return true;
            }
            series.share.push(f32::NAN);
            series.weight.push(f32::NAN);
            series.utilization.push(f32::NAN);
            series.health.push(Health::Absent);
            series.health.iter().any(|h| *h != Health::Absent)
        });
        skipped
    }

    /// The history as the admin API answers it.
    pub fn view(&self, service: &str, interval_seconds: f64) -> HistoryView {
        let floats = |r: &Ring<f32>| r.iter().map(|v| v.is_finite().then_some(*v)).collect();
        HistoryView {
            service: service.to_string(),
            interval_seconds,
            samples: self.times.len(),
            times: self.times.iter().copied().collect(),
            calls_per_second: floats(&self.calls),
            failures_per_second: floats(&self.failures),
            list_version: self.list_version.iter().copied().collect(),
            backends: self
                .backends
                .iter()
                .map(|(addr, s)| BackendHistory {
                    address: addr.to_string(),
                    share: floats(&s.share),
                    weight: floats(&s.weight),
                    utilization: floats(&s.utilization),
                    health: s.health.iter().copied().collect(),
                })
                .collect(),
            events: self.events.iter().cloned().collect(),
        }
    }
}

/// `GET /api/v1/services/{name}/history`.
#[derive(Debug, serde::Serialize)]
pub struct HistoryView {
    /// The service.
    pub service: String,
    /// Seconds between samples.
    pub interval_seconds: f64,
    /// Samples held (every series has this many values).
    pub samples: usize,
    /// When each sample was taken (Unix milliseconds).
    pub times: Vec<u64>,
    /// Calls finished per second, from client stats (null before a rate).
    pub calls_per_second: Vec<Option<f32>>,
    /// Calls per second not known to have reached a backend (failed to
    /// send, or finished without a response).
    pub failures_per_second: Vec<Option<f32>>,
    /// The published list's version.
    pub list_version: Vec<u64>,
    /// Each backend's series.
    pub backends: Vec<BackendHistory>,
    /// The timeline: registrations, removals, health changes, drains,
    /// weight overrides and lists, oldest first.
    pub events: Vec<Event>,
}

/// One backend's series (null where it had no value).
#[derive(Debug, serde::Serialize)]
pub struct BackendHistory {
    /// `ip:port`.
    pub address: String,
    /// Fraction of the published list.
    pub share: Vec<Option<f32>>,
    /// The policy's weight.
    pub weight: Vec<Option<f32>>,
    /// ORCA utilization.
    pub utilization: Vec<Option<f32>>,
    /// Health.
    pub health: Vec<Health>,
}
