//! Quotas that keep one client, or all of them together, from exhausting the
//! LB: connections per port and BalanceLoad streams, each capped in total and
//! per peer IP address.
//!
//! A [`Quota`] hands out [`Permit`]s; a permit gives its slot back when it is
//! dropped, however the connection or stream ends. Refusals say which cap was
//! hit ([`Exceeded`]) so that callers can answer with a clear status and
//! count the reason. A [`RateBudget`] caps how often one stream may send.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Which cap a refused request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// Every slot of the process is taken.
    Total,
    /// This peer address holds all the slots it may.
    PerPeer,
}

/// A capped count of things held in total and per peer address.
#[derive(Debug)]
pub struct Quota {
    what: &'static str,
    max_total: usize,
    max_per_peer: usize,
    total: AtomicUsize,
    per_peer: DashMap<IpAddr, usize>,
}

impl Quota {
    /// A quota of `max_total` slots, at most `max_per_peer` of them for one
    /// peer address. `what` names the things counted, for messages.
    pub fn new(what: &'static str, max_total: usize, max_per_peer: usize) -> Arc<Quota> {
        Arc::new(Quota {
            what,
            max_total,
            max_per_peer,
            total: AtomicUsize::new(0),
            per_peer: DashMap::new(),
        })
    }

    /// Takes one slot for `peer` (peers of unknown address share the total
    /// cap only).
    pub fn acquire(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Permit, Exceeded> {
        let taken = self.total.fetch_add(1, Ordering::AcqRel);
        if taken >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Exceeded::Total);
        }
        if let Some(ip) = peer {
            let mut held = self.per_peer.entry(ip).or_insert(0);
            if *held >= self.max_per_peer {
                drop(held);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Exceeded::PerPeer);
            }
            *held += 1;
        }
        Ok(Permit {
            quota: self.clone(),
            peer,
        })
    }

    /// Slots held now.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Slots held now by `peer`.
    #[cfg(test)]
    pub fn held_by(&self, peer: IpAddr) -> usize {
        self.per_peer.get(&peer).map(|n| *n).unwrap_or(0)
    }

    /// A human-readable refusal, e.g. "too many BalanceLoad streams from
    /// 10.0.0.1 (limit 10000 per peer)".
    pub fn describe(&self, exceeded: Exceeded, peer: Option<IpAddr>) -> String {
        match (exceeded, peer) {
            (Exceeded::PerPeer, Some(ip)) => format!(
                "too many {} from {ip} (limit {} per peer)",
                self.what, self.max_per_peer
            ),
            _ => format!("too many {} (limit {} in all)", self.what, self.max_total),
        }
    }
}

/// One held slot of a [`Quota`], given back on drop.
#[derive(Debug)]
pub struct Permit {
    quota: Arc<Quota>,
    peer: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ip) = self.peer {
            // Remove the peer's row when its last slot goes, so the table
            // holds only peers that hold something.
            self.quota.per_peer.remove_if_mut(&ip, |_, held| {
                *held = held.saturating_sub(1);
                *held == 0
            });
        }
        self.quota.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket limiting how often one stream may send something (client
/// stats, xDS requests, load reports): `rate` per second, bursts of twice
/// that (at least 2).
pub struct RateBudget {
    /// Messages allowed per second.
    pub rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl RateBudget {
    /// A full bucket for `rate` messages per second.
    pub fn new(rate: f64) -> Self {
        let rate = rate.max(0.01);
        RateBudget {
            rate,
            tokens: Self::burst(rate),
            at: tokio::time::Instant::now(),
        }
    }

    fn burst(rate: f64) -> f64 {
        (rate * 2.0).max(2.0)
    }

    /// Spends one message; false when the stream is over its rate.
    pub fn spend(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.at = now;
        self.tokens = (self.tokens + earned).min(Self::burst(self.rate));
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_peer_and_gives_back_on_drop() {
        let q = Quota::new("things", 3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = q.acquire(Some(a)).unwrap();
        let p2 = q.acquire(Some(a)).unwrap();
        assert_eq!(q.acquire(Some(a)).unwrap_err(), Exceeded::PerPeer);
        let p3 = q.acquire(Some(b)).unwrap();
        assert_eq!(q.acquire(Some(b)).unwrap_err(), Exceeded::Total);
        assert_eq!(q.acquire(None).unwrap_err(), Exceeded::Total);
        assert_eq!((q.in_use(), q.held_by(a), q.held_by(b)), (3, 2, 1));
        drop(p1);
        assert_eq!(q.held_by(a), 1);
        let p4 = q.acquire(Some(a)).unwrap();
        drop((p2, p3, p4));
        assert_eq!(q.in_use(), 0);
        assert!(
            q.per_peer.is_empty(),
            "rows of peers holding nothing are removed"
        );
        assert!(q
            .describe(Exceeded::PerPeer, Some(a))
            .contains("limit 2 per peer"));
    }
}
