//! The table of connected BalanceLoad streams ("clients"), for the admin API
//! and metrics. Each stream holds a [`SessionGuard`] that removes its row
//! when the stream ends, however it ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use lb_proto::grpc::lb::v1::ClientStats;

use crate::metrics::Metrics;

/// The last client-stats report of a stream, flattened.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StatsReport {
    /// Calls started since the previous report.
    pub started: i64,
    /// Calls finished.
    pub finished: i64,
    /// Calls that failed before being sent.
    pub failed_to_send: i64,
    /// Calls whose response was received.
    pub known_received: i64,
    /// Calls dropped on drop entries.
    pub dropped: i64,
}

impl From<&ClientStats> for StatsReport {
    fn from(s: &ClientStats) -> Self {
        StatsReport {
            started: s.num_calls_started,
            finished: s.num_calls_finished,
            failed_to_send: s.num_calls_finished_with_client_failed_to_send,
            known_received: s.num_calls_finished_known_received,
            dropped: s.calls_finished_with_drop.iter().map(|d| d.num_calls).sum(),
        }
    }
}

/// One connected stream.
#[derive(Debug)]
pub struct Session {
    /// Unique within this process.
    pub id: u64,
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
    /// The name the client asked for.
    pub name: String,
    /// The service it was mapped to.
    pub service: String,
    /// The id that seeds its subset (`lb-client-id` metadata, else the peer).
    pub client_id: String,
    /// Its subset of backends, when subsetting is on.
    pub subset: Mutex<Option<Vec<SocketAddr>>>,
    /// When the stream was accepted.
    pub since: SystemTime,
    /// Server lists written to it.
    pub lists_sent: AtomicU64,
    /// Version of the last list written.
    pub list_version: AtomicU64,
    /// Its latest client-stats report.
    pub last_stats: Mutex<Option<StatsReport>>,
}

/// All connected streams.
#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    open: DashMap<u64, Arc<Session>>,
}

impl Sessions {
    /// Registers a new stream; the returned guard unregisters it on drop.
    pub fn open(
        self: &Arc<Self>,
        metrics: Arc<Metrics>,
        peer: Option<SocketAddr>,
        name: String,
        service: String,
        client_id: Option<String>,
    ) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(Session {
            id,
            peer,
            name,
            service,
            client_id: client_id
                .or_else(|| peer.map(|p| p.to_string()))
                .unwrap_or_else(|| format!("session-{id}")),
            subset: Mutex::new(None),
            since: SystemTime::now(),
            lists_sent: AtomicU64::new(0),
            list_version: AtomicU64::new(0),
            last_stats: Mutex::new(None),
        });
        self.open.insert(id, session.clone());
        metrics.streams_open.inc();
        metrics.streams_total.inc();
        SessionGuard {
            sessions: self.clone(),
            session,
            metrics,
        }
    }

    /// Every open stream, oldest first.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut all: Vec<_> = self.open.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// Number of open streams for `service`.
    pub fn count_for(&self, service: &str) -> usize {
        self.open
            .iter()
            .filter(|e| e.value().service == service)
            .count()
    }
}

/// Keeps a session row alive for as long as its stream runs.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    session: Arc<Session>,
    metrics: Arc<Metrics>,
}

impl SessionGuard {
    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.open.remove(&self.session.id);
        self.metrics.streams_open.dec();
    }
}
