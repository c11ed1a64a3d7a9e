//! Client-side call counters reported to the LB as grpclb `client_stats`.
//!
//! Counting follows grpc-go's grpclb client: a call is *started* when it is
//! picked; a drop is started, finished and counted under its token; a call
//! that could not be written to the backend is *failed to send*; a call
//! whose response headers arrived is *known received*. Counters reset at
//! every report.
//!
//! Reports follow C-core's grpclb client: one whose counters are all zero is
//! sent once, then skipped while they stay zero ([`ZeroReports`]), so an
//! idle channel costs the LB nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lb_proto::grpc::lb::v1::{ClientStats, ClientStatsPerToken};

/// Counters since the last report.
#[derive(Default)]
pub struct CallStats {
    started: AtomicI64,
    finished: AtomicI64,
    failed_to_send: AtomicI64,
    known_received: AtomicI64,
    drops: Mutex<HashMap<Arc<str>, i64>>,
}

impl CallStats {
    /// A call was sent to a backend.
    #[inline]
    pub fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// A call's response headers arrived.
    #[inline]
    pub fn known_received(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        self.known_received.fetch_add(1, Ordering::Relaxed);
    }

    /// A call could not be written to its backend.
    pub fn failed_to_send(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        self.failed_to_send.fetch_add(1, Ordering::Relaxed);
    }

    /// A call failed after it was sent, without a response.
    pub fn failed(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// A call hit a drop entry.
    pub fn dropped(&self, token: &Arc<str>) {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Relaxed);
        *self
            .drops
            .lock()
            .expect("drops lock")
            .entry(token.clone())
            .or_default() += 1;
    }

    /// Takes the counters as a report and resets them.
    pub fn take(&self) -> ClientStats {
        let drops = std::mem::take(&mut *self.drops.lock().expect("drops lock"));
        ClientStats {
            timestamp: Some(prost_types::Timestamp::from(SystemTime::now())),
            num_calls_started: self.started.swap(0, Ordering::Relaxed),
            num_calls_finished: self.finished.swap(0, Ordering::Relaxed),
            num_calls_finished_with_client_failed_to_send: self
                .failed_to_send
                .swap(0, Ordering::Relaxed),
            num_calls_finished_known_received: self.known_received.swap(0, Ordering::Relaxed),
            calls_finished_with_drop: drops
                .into_iter()
                .map(|(token, n)| ClientStatsPerToken {
                    load_balance_token: token.to_string(),
                    num_calls: n,
                })
                .collect(),
        }
    }
}

/// Whether every counter of `stats` is zero (nothing to report).
pub fn is_zero(stats: &ClientStats) -> bool {
    stats.num_calls_started == 0
        && stats.num_calls_finished == 0
        && stats.num_calls_finished_with_client_failed_to_send == 0
        && stats.num_calls_finished_known_received == 0
        && stats
            .calls_finished_with_drop
            .iter()
            .all(|d| d.num_calls == 0)
}

/// Which reports are sent: as C-core, an all-zero report is skipped when
/// the previous one was all zero too (the first one after calls stop is
/// sent, so the LB sees the rate fall to zero).
#[derive(Debug, Default)]
pub struct ZeroReports {
    last_was_zero: bool,
}

impl ZeroReports {
    /// Whether `stats` is to be sent.
    pub fn should_send(&mut self, stats: &ClientStats) -> bool {
        let zero = is_zero(stats);
        let send = !(zero && self.last_was_zero);
        self.last_was_zero = zero;
        send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_reset_counters() {
        let s = CallStats::default();
        s.started();
        s.known_received();
        s.started();
        s.failed_to_send();
        s.dropped(&Arc::from("t1"));
        let r = s.take();
        assert_eq!(r.num_calls_started, 3);
        assert_eq!(r.num_calls_finished, 3);
        assert_eq!(r.num_calls_finished_known_received, 1);
        assert_eq!(r.num_calls_finished_with_client_failed_to_send, 1);
        assert_eq!(r.calls_finished_with_drop[0].num_calls, 1);
        let r = s.take();
        assert_eq!(r.num_calls_started, 0);
        assert!(r.calls_finished_with_drop.is_empty());
    }

    #[test]
    fn all_zero_reports_are_sent_once_then_skipped() {
        let s = CallStats::default();
        let mut zeros = ZeroReports::default();
        assert!(
            zeros.should_send(&s.take()),
            "the first zero report is sent"
        );
        assert!(!zeros.should_send(&s.take()));
        assert!(!zeros.should_send(&s.take()));
        s.started();
        assert!(zeros.should_send(&s.take()));
        assert!(zeros.should_send(&s.take()), "calls stopped: said once");
        assert!(!zeros.should_send(&s.take()));
        s.dropped(&Arc::from("t"));
        assert!(
            zeros.should_send(&s.take()),
            "a drop is something to report"
        );
    }
}
