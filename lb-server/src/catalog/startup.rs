//! The LB's starting state, said in one line rather than a few per service.
//!
//! An LB started on 10,000 services would otherwise write some 30,000 INFO
//! lines in its first seconds (a "new service", a "service listed", a
//! "list changed" per service, then a "health changed" per service as the
//! first checks come in) that together say one thing: the registries were
//! read. [`LogLimiter`](crate::log_limit::LogLimiter) thins each subject
//! over time, but at startup every subject is new.
//!
//! So per-service change lines are held (counted, not written) from the
//! catalog's creation until every registry source has listed its contents
//! and the first health results are in ([`STARTUP_GRACE`] later, the window
//! in which healthy backends count as the LB's starting state rather than
//! newcomers) and the next periodic refresh ends the holding: one INFO
//! line gives the services and backends known and the number of lines
//! held, by kind. From then on each change is logged
//! as before. A source that never lists (its registry unreachable) does not
//! hold the lines forever: the summary comes at [`MAX_HOLD`] at the latest.
//! Counters, metrics and the change journal see every change throughout;
//! only log lines are summarised.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Catalog, STARTUP_GRACE};

/// Longest time lines are held, whatever the sources do.
pub(super) const MAX_HOLD: Duration = Duration::from_secs(60);

/// Per-service lines held while the LB starts.
pub(super) struct StartupLog {
    /// Set once the summary is written: the fast path afterwards.
    done: AtomicBool,
    held: Mutex<Held>,
}

struct Held {
    /// When lines stop being held.
    until: Instant,
    /// Lines held, by kind.
    counts: BTreeMap<&'static str, u64>,
}

impl StartupLog {
    /// Holds lines from now on, for [`MAX_HOLD`] at most.
    pub(super) fn new() -> Self {
        StartupLog {
            done: AtomicBool::new(false),
            held: Mutex::new(Held {
                until: Instant::now() + MAX_HOLD,
                counts: BTreeMap::new(),
            }),
        }
    }

    /// The registries are listed: lines are held [`STARTUP_GRACE`] more
    /// (the first health results), no longer.
    pub(super) fn synced(&self, at: Instant) {
        let mut held = self.held.lock().expect("startup log lock");
        held.until = held.until.min(at + STARTUP_GRACE);
    }

    /// Whether a line of `kind` is held (and counted) rather than written.
    fn hold(&self, kind: &'static str) -> bool {
        if self.done.load(Ordering::Relaxed) {
            return false;
        }
        let mut held = self.held.lock().expect("startup log lock");
        if self.done.load(Ordering::Relaxed) {
            return false;
        }
        *held.counts.entry(kind).or_default() += 1;
        true
    }

    /// The held counts if the holding ends now (once).
    fn end_if_due(&self) -> Option<BTreeMap<&'static str, u64>> {
        if self.done.load(Ordering::Relaxed) {
            return None;
        }
        let mut held = self.held.lock().expect("startup log lock");
        if self.done.load(Ordering::Relaxed) || Instant::now() < held.until {
            return None;
        }
        self.done.store(true, Ordering::Relaxed);
        Some(std::mem::take(&mut held.counts))
    }
}

/// The kind of a change line, from the subject it is rate-limited under
/// (`service|…|what`).
pub(super) fn kind_of(subject: &str) -> &'static str {
    match subject.rsplit('|').next().unwrap_or_default() {
        "list" => "list changed",
        "listed" => "service listed",
        "health" => "health changed",
        "registered" => "backend registered",
        "updated" => "backend updated",
        "removed" => "backend removed",
        _ => "other",
    }
}

impl Catalog {
    /// Whether a per-service line of `kind` is held while the LB starts
    /// (see the module docs). Called with service locks held: it takes
    /// none of the catalog's.
    pub(super) fn held_at_startup(&self, kind: &'static str) -> bool {
        self.startup.hold(kind)
    }

    /// Ends the holding once its time has come, with the summary line.
    /// Called by the periodic refresh, with no lock held (the summary
    /// counts backends under each service's lock); lines keep being held
    /// until then, so the summary comes before the first per-service line.
    pub(super) fn settle_startup(&self) {
        if let Some(counts) = self.startup.end_if_due() {
            self.log_startup(&counts);
        }
    }

    fn log_startup(&self, counts: &BTreeMap<&'static str, u64>) {
        // Entries first, then each one's lock: no shard lock is held while
        // waiting on a service's.
        let entries = self.services();
        let services = entries.len();
        let backends: usize = entries
            .iter()
            .map(|e| e.backends.lock().expect("catalog lock").len())
            .sum();
        let lines: Vec<String> = counts.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        tracing::info!(
            services,
            backends,
            synced = self.is_synced(),
            lines_held = %lines.join(", "),
            "registry listed at startup; per-service lines from now on"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_held_until_synced_and_settled_then_summarised_once() {
        let log = StartupLog::new();
        assert!(log.hold("list changed"));
        assert!(log.hold("list changed"));
        assert!(log.hold("new service"));
        assert_eq!(log.end_if_due(), None, "not synced yet");
        log.synced(Instant::now());
        assert_eq!(
            log.end_if_due(),
            None,
            "the first health results are not in"
        );
        // Synced long enough ago: the holding ends, once.
        log.synced(Instant::now() - STARTUP_GRACE - Duration::from_millis(1));
        assert!(log.hold("list changed"));
        let counts = log.end_if_due().expect("due");
        assert_eq!(counts["list changed"], 3);
        assert_eq!(counts["new service"], 1);
        assert!(!log.hold("list changed"));
        assert_eq!(log.end_if_due(), None);
    }

    #[test]
    fn subjects_name_their_kind() {
        assert_eq!(kind_of("greeter|list"), "list changed");
        assert_eq!(
            kind_of("greeter|greeter/10.0.0.1:80|removed"),
            "backend removed"
        );
        assert_eq!(kind_of("greeter|health"), "health changed");
    }
}
