//! What clients report: their call counters (grpclb client stats), summed
//! per service.

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
            .sum();
        if dropped > 0 {
            let mut by_token = entry.calls.dropped_by_token.lock().expect("drops lock");
            for d in &stats.calls_finished_with_drop {
                // Bounded: tokens are the LB's own (< 50 bytes); junk is ignored.
                let known = by_token.contains_key(&d.load_balance_token);
                if d.load_balance_token.len() < 50 && (known || by_token.len() < 1024) {
                    *by_token.entry(d.load_balance_token.clone()).or_default() +=
                        d.num_calls.max(0);
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
            let n = n.max(0);
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
                self.metrics
                    .client_calls
                    .get_or_create(&CallLabels {
                        service: entry.name.clone(),
                        kind: kind.into(),
                    })
                    .inc_by(n as u64);
            }
        }
    }
}
