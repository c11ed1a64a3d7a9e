//! History: what the catalog looked like over the last hour, for the
//! dashboard and `GET /api/v1/services/{name}/history`.
//!
//! The admin API shows *now*; an operator chasing a backend that flapped a
//! minute ago, a list share that drifted, or the calls of the last hour
//! needs *then*. Two inputs, both read-only:
//!
//! - **samples**: every `--history-interval` (10 s) each service is read
//!   from the catalog: calls and failures per second (client stats), list
//!   version, and per backend list share, weight, health and ORCA
//!   utilization. `--history-window` / interval samples are kept (360 for
//!   1 h at 10 s), in rings allocated once.
//! - **events**: the catalog's journal (registrations, removals, health
//!   changes, drains, weight overrides, lists), the newest
//!   `--history-events` per service, with their exact times.
//!
//! Memory is bounded by construction: at most `--history-max-services`
//! services and `--history-max-backends` backends have series (13 bytes
//! per backend and 24 per service per sample; 4.7 KB per backend-hour),
//! and [`History::budget_bytes`] states the ceiling, which the README
//! quotes. What does not fit is counted (the history answer's
//! `untracked`), not silently dropped.
//!
//! | module | job |
//! | --- | --- |
//! | this one | the store, the sampling task, the caps |
//! | `service` | one service's series and timeline, and their JSON |
//! | `ring` | fixed-capacity series |

mod ring;
mod service;

pub use service::HistoryView;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::catalog::journal::Event;
use crate::catalog::Catalog;
use service::{ServiceHistory, BACKEND_SAMPLE_BYTES, SERVICE_SAMPLE_BYTES};

/// Bytes an event takes in a timeline (its detail text aside).
const EVENT_BYTES: usize = 96;

/// How much history is kept.
#[derive(Debug, Clone, Copy)]
pub struct HistorySettings {
    /// Time between samples.
    pub interval: Duration,
    /// How far back samples go.
    pub window: Duration,
    /// Events kept per service.
    pub events: usize,
    /// Services with history.
    pub max_services: usize,
    /// Backends with series, all services together.
    pub max_backends: usize,
    /// Call rates span at least this long (twice the client-stats
    /// interval: clients report on their own clock).
    pub rate_window: Duration,
}

impl HistorySettings {
    /// Samples per series.
    pub fn samples(&self) -> usize {
        let n = self.window.as_secs_f64() / self.interval.as_secs_f64().max(0.001);
        (n.ceil() as usize).clamp(1, 100_000)
    }
}

/// The history store.
pub struct History {
    settings: HistorySettings,
    services: DashMap<String, Arc<Mutex<ServiceHistory>>>,
    backends: AtomicUsize,
    untracked_services: AtomicU64,
    untracked_backends: AtomicU64,
    lost_events: AtomicU64,
}

impl History {
    /// An empty store.
    pub fn new(settings: HistorySettings) -> Self {
        History {
            settings,
            services: DashMap::new(),
            backends: AtomicUsize::new(0),
            untracked_services: AtomicU64::new(0),
            untracked_backends: AtomicU64::new(0),
            lost_events: AtomicU64::new(0),
        }
    }

    /// The most memory the series and timelines can take with these
    /// settings (event detail text aside).
    pub fn budget_bytes(&self) -> usize {
        let s = &self.settings;
        let samples = s.samples();
        s.max_services * (samples * SERVICE_SAMPLE_BYTES + s.events * EVENT_BYTES)
            + s.max_backends * samples * BACKEND_SAMPLE_BYTES
    }

    /// Services and backends left without history by the caps at the last
    /// sample, and events lost because the store fell behind the catalog.
    pub fn untracked(&self) -> (u64, u64, u64) {
        (
            self.untracked_services.load(Ordering::Relaxed),
            self.untracked_backends.load(Ordering::Relaxed),
            self.lost_events.load(Ordering::Relaxed),
        )
    }

    /// The history of `service`, if it has one.
    pub fn view(&self, service: &str) -> Option<HistoryView> {
        let h = self.services.get(service)?.value().clone();
        let view = h
            .lock()
            .expect("history lock")
            .view(service, self.settings.interval.as_secs_f64());
        Some(view)
    }

    /// The service's history, started if the cap allows.
    fn service(&self, name: &str) -> Option<Arc<Mutex<ServiceHistory>>> {
        if let Some(h) = self.services.get(name) {
            return Some(h.value().clone());
        }
        if self.services.len() >= self.settings.max_services {
            return None;
        }
        let h = self
            .services
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(ServiceHistory::new(
                    self.settings.samples(),
                    self.settings.events,
                    self.settings.rate_window,
                )))
            })
            .value()
            .clone();
        Some(h)
    }

    fn record(&self, event: Event) {
        if let Some(h) = self.service(&event.service) {
            h.lock().expect("history lock").event(event);
        }
    }

    /// Takes one sample of every service the catalog knows.
    pub fn sample(&self, catalog: &Catalog) {
        let now = SystemTime::now();
        let (mut services_left_out, mut backends_left_out) = (0, 0);
        for entry in catalog.services() {
            let Some(h) = self.service(entry.name()) else {
                services_left_out += 1;
                continue;
            };
            let mut h = h.lock().expect("history lock");
            let before = h.backends();
            let room = self
                .settings
                .max_backends
                .saturating_sub(self.backends.load(Ordering::Relaxed));
            let skipped = h.sample(&entry, now, room);
            let after = h.backends();
            if after >= before {
                self.backends.fetch_add(after - before, Ordering::Relaxed);
            } else {
                self.backends.fetch_sub(before - after, Ordering::Relaxed);
            }
            backends_left_out += skipped as u64;
        }
        // Services the catalog forgot (idle past `--idle-service-grace`)
        // leave with their history, and free its room.
        self.services.retain(|name, h| {
            let known = catalog.contains(name);
            if !known {
                let backends = h.lock().expect("history lock").backends();
                self.backends.fetch_sub(backends, Ordering::Relaxed);
            }
            known
        });
        self.untracked_services
            .store(services_left_out, Ordering::Relaxed);
        self.untracked_backends
            .store(backends_left_out, Ordering::Relaxed);
    }

    /// Runs until `shutdown`: samples every interval and files the
    /// catalog's events.
    pub async fn run(self: Arc<Self>, catalog: Arc<Catalog>, shutdown: CancellationToken) {
        let mut journal = catalog.journal();
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.sample(&catalog),
                event = journal.recv() => match event {
                    Ok(event) => self.record(event),
                    Err(RecvError::Lagged(n)) => {
                        self.lost_events.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_the_settings() {
        let h = History::new(HistorySettings {
            interval: Duration::from_secs(10),
            window: Duration::from_secs(3600),
            events: 256,
            max_services: 1000,
            max_backends: 5000,
            rate_window: Duration::from_secs(20),
        });
        assert_eq!(h.settings.samples(), 360);
        // 1000 × (360 × 24 + 256 × 96) + 5000 × 360 × 13
        assert_eq!(h.budget_bytes(), 1000 * (8640 + 24_576) + 23_400_000);
    }
}
