//! The catalog's journal: each change to what it knows, as an [`Event`],
//! broadcast to whoever keeps history (the `history` module). The catalog
//! only writes; a reader that falls behind loses the oldest events and
//! learns how many (`broadcast`'s lag), so a burst of 100,000 changes never
//! slows the catalog down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::model::HealthState;

/// Events held for a reader that has not caught up.
const BACKLOG: usize = 4096;

/// One change the catalog saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    /// When.
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// The service (history is kept per service: not repeated in its JSON).
    #[serde(skip)]
    pub service: Arc<str>,
    /// The backend, for changes to one backend.
    pub backend: Option<SocketAddr>,
    /// What changed.
    #[serde(flatten)]
    pub change: Change,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A registry reported a new backend.
    Registered,
    /// A registry removed a backend.
    Removed,
    /// A registry dropped a backend that still passes its health checks:
    /// kept listed (see the catalog's `departed`).
    Departed,
    /// A health check changed a backend's state.
    Health {
        /// The state before.
        from: HealthState,
        /// The state now.
        to: HealthState,
        /// The check's detail (error, status).
        detail: String,
    },
    /// An operator drained (or undrained) a backend.
    Drained {
        /// Drained now.
        drained: bool,
    },
    /// An operator set (or cleared) a weight override.
    WeightOverride {
        /// The override; `None` when cleared.
        weight: Option<u32>,
    },
    /// The gray-failure detector changed its verdict on a backend.
    Gray {
        /// Its phase now: ejected, probation, held, deweighted, admitted.
        state: String,
        /// Why, in words.
        why: String,
    },
    /// A new list was published.
    List {
        /// Its version.
        version: u64,
        /// Its entries.
        servers: usize,
        /// Whether in panic mode.
        panic: bool,
    },
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

/// The sending side, owned by the catalog.
pub struct Journal {
    tx: broadcast::Sender<Event>,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Journal {
    /// Records a change (dropped at once when nobody reads the journal).
    pub fn record(&self, service: &str, backend: Option<SocketAddr>, change: Change) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Event {
            at: SystemTime::now(),
            service: service.into(),
            backend,
            change,
        });
    }

    /// Reads the changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
