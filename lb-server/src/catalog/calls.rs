//! What clients report: their call counters (grpclb client stats), summed
//! per service.
//!
//! The counts are whatever a client sends (the gRPC port needs no
//! credentials): each report's negative counts read as 0, and sums
//! saturate at `i64::MAX` instead of overflowing, which would panic a debug
//! build (poisoning the lock held) and wrap a release build negative.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use super::{Catalog, ServiceEntry};
use crate::metrics::CallLabels;

/// Call counters reported by clients for one service (sums of client stats).
#[derive(Debug, Default)]
pub struct CallTotals {
    /// Calls started.
    pub started: AtomicI64,
    /// Calls finished.
    pub finished: AtomicI64,
    /// Calls that failed before being sent.
    pub failed_to_send: AtomicI64,
    /// Calls whose response the client received.
    pub known_received: AtomicI64,
    /// Calls dropped on a drop entry.
    pub dropped: AtomicI64,
    /// Dropped calls per load-balance token.
    pub dropped_by_token: Mutex<BTreeMap<String, i64>>,
}

impl Catalog {
    /// Adds one client-stats report to the service's totals.
    pub fn record_client_stats(
        &self,
        entry: &ServiceEntry,
        stats: &lb_proto::grpc::lb::v1::ClientStats,
    ) {
        let dropped: i64 = stats
            .calls_finished_with_drop
            .iter()
            .map(|d| d.num_calls.max(0))
            .fold(0, i64::saturating_add);
        if dropped > 0 {
            let mut by_token = entry.calls.dropped_by_token.lock().expect("drops lock");
            for d in &stats.calls_finished_with_drop {
                // Bounded: tokens are the LB's own (< 50 bytes); junk is ignored.
                let known = by_token.contains_key(&d.load_balance_token);
                if d.load_balance_token.len() < 50 && (known || by_token.len() < 1024) {
                    let total = by_token.entry(d.load_balance_token.clone()).or_default();
                    *total = total.saturating_add(d.num_calls.max(0));
                }
            }
        }
        for (counter, kind, n) in [
            (&entry.calls.started, "started", stats.num_calls_started),
            (&entry.calls.finished, "finished", stats.num_calls_finished),
            (
                &entry.calls.failed_to_send,
                "failed_to_send",
                stats.num_calls_finished_with_client_failed_to_send,
            ),
            (
                &entry.calls.known_received,
                "known_received",
                stats.num_calls_finished_known_received,
            ),
            (&entry.calls.dropped, "dropped", dropped),
        ] {
            let added = add_saturating(counter, n);
            if added > 0 {
                self.metrics
                    .client_calls
                    .get_or_create(&CallLabels {
                        service: entry.name.clone(),
                        kind: kind.into(),
                    })
                    .inc_by(added as u64);
            }
        }
    }
}

/// Adds `n` (read as 0 when negative) to `total`, stopping at `i64::MAX`;
/// returns what was added.
fn add_saturating(total: &AtomicI64, n: i64) -> i64 {
    let n = n.max(0);
    if n == 0 {
        return 0;
    }
    let before = total
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            Some(t.saturating_add(n))
        })
        .unwrap_or_else(|t| t);
    before.saturating_add(n).saturating_sub(before)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use lb_proto::grpc::lb::v1::{ClientStats, ClientStatsPerToken};
    use proptest::prelude::*;

    use super::*;
    use crate::history::{History, HistorySettings};
    use crate::metrics::Metrics;
    use crate::model::Instance;
    use crate::policy::Policy;
    use crate::streams::sessions::StatsReport;

    /// Counts as a hostile or broken client may send them.
    fn count() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::MAX),
            Just(i64::MIN),
            Just(-1i64),
            Just(0i64),
            0..1_000i64,
            any::<i64>(),
        ]
    }

    fn client_stats() -> impl Strategy<Value = ClientStats> {
        (
            [count(), count(), count(), count()],
            prop::collection::vec((0..3usize, count()), 0..4),
        )
            .prop_map(
                |([started, finished, failed, received], drops)| ClientStats {
                    num_calls_started: started,
                    num_calls_finished: finished,
                    num_calls_finished_with_client_failed_to_send: failed,
                    num_calls_finished_known_received: received,
                    calls_finished_with_drop: drops
                        .into_iter()
                        .map(|(t, n)| ClientStatsPerToken {
                            load_balance_token: format!("token-{t}"),
                            num_calls: n,
                        })
                        .collect(),
                    ..Default::default()
                },
            )
    }

    fn catalog() -> Catalog {
        let c = Catalog::new(Policy::default(), Arc::new(Metrics::new()), 1, false);
        c.upsert(
            "memory",
            Instance {
                service: "svc".into(),
                key: "k".into(),
                addr: SocketAddr::from(([127, 0, 0, 1], 1)),
                weight: 1,
                metadata: None,
                registered_at: SystemTime::now(),
            },
        )
        .unwrap();
        c
    }

    /// Every total, then every per-token drop count (by token), of `calls`.
    fn totals(calls: &CallTotals) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = [
            &calls.started,
            &calls.finished,
            &calls.failed_to_send,
            &calls.known_received,
            &calls.dropped,
        ]
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("total {i}"), a.load(Ordering::Relaxed)))
        .collect();
        let by_token = calls.dropped_by_token.lock().unwrap();
        out.extend(by_token.iter().map(|(t, n)| (t.clone(), *n)));
        out
    }

    proptest! {
        /// Whatever clients report, folding it neither panics (debug builds
        /// check overflow, and a panic under a lock poisons it) nor wraps:
        /// totals only grow, and stop at `i64::MAX`.
        #[test]
        fn client_stats_fold_saturates_and_never_goes_back(
            reports in prop::collection::vec(client_stats(), 1..8)
        ) {
            let c = catalog();
            let entry = c.service("svc").unwrap();
            let history = History::new(HistorySettings {
                interval: Duration::from_secs(1),
                window: Duration::from_secs(60),
                events: 8,
                max_services: 8,
                max_backends: 8,
                rate_window: Duration::from_secs(2),
            });
            let mut before = totals(&entry.calls);
            for stats in &reports {
                c.record_client_stats(&entry, stats);
                let report = StatsReport::from(stats);
                prop_assert!(report.dropped >= 0, "{report:?}");
                let after = totals(&entry.calls);
                for (name, b) in &before {
                    let a = after.iter().find(|(n, _)| n == name).map_or(0, |(_, a)| *a);
                    prop_assert!(a >= *b, "{name} went from {b} to {a}");
                }
                prop_assert!(after.iter().all(|(_, n)| *n >= 0), "{after:?}");
                history.sample(&c);
                before = after;
            }
        }
    }
}
