//! The picker: walks the current server list, in order, duplicates included.
//!
//! A [`PickList`] is immutable once built except for its cursor (one atomic
//! counter), and is swapped whole through `arc_swap`, so a pick takes no lock
//! and allocates nothing. Callers that must wait (no list yet, backends still
//! connecting) subscribe to [`Picker::subscribe`] and pick again on change.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use hyper::client::conn::http2::SendRequest;
use tokio::sync::watch;

use crate::backends::BackendConn;

/// A backend entry whose connection is ready.
#[derive(Clone)]
pub struct ReadyBackend {
    /// Sends requests on the backend's HTTP/2 connection.
    pub sender: SendRequest<tonic::body::Body>,
    /// The backend's address.
    pub addr: SocketAddr,
    /// `host:port` authority of requests to it (parsed once per list).
    pub authority: http::uri::Authority,
    /// `lb-token` metadata value; `None` in fallback mode.
    pub token: Option<HeaderValue>,
    /// The connection, to report failures to.
    pub conn: Arc<BackendConn>,
}

/// One entry of a pick list.
pub enum Entry {
    /// Send the call to this backend.
    Backend(ReadyBackend),
    /// Fail the call (load shedding) and count it under this token.
    Drop(Arc<str>),
}

/// What the list as a whole allows when it has no entry to pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Entries exist: pick them.
    Ready,
    /// Nothing usable yet but something is on its way (first list, first
    /// connections): calls wait.
    Waiting,
    /// Nothing usable and nothing expected soon: calls fail fast with
    /// UNAVAILABLE (unless they asked to wait for ready).
    Failing(String),
}

/// The result of one pick.
pub enum Pick<'a> {
    /// Call this backend.
    Backend(&'a ReadyBackend),
    /// Drop the call, counting it under this token.
    Drop(&'a Arc<str>),
    /// Wait for the next list.
    Wait,
    /// Fail with this reason.
    Fail(&'a str),
}

/// An ordered list of entries and a cursor.
pub struct PickList {
    entries: Vec<Entry>,
    next: AtomicUsize,
    mode: Mode,
}

impl PickList {
    /// A list walking `entries` from a random starting point (so that many
    /// clients given the same list do not all start on the same backend).
    pub fn new(entries: Vec<Entry>, mode: Mode) -> Self {
        let start = if entries.is_empty() {
            0
        } else {
            rand::random::<u32>() as usize % entries.len()
        };
        let mode = if entries.is_empty() {
            mode
        } else {
            Mode::Ready
        };
        PickList {
            entries,
            next: AtomicUsize::new(start),
            mode,
        }
    }

    /// The next entry: lock-free, allocation-free.
    #[inline]
    pub fn pick(&self) -> Pick<'_> {
        let n = self.entries.len();
        if n == 0 {
            return match &self.mode {
                Mode::Failing(why) => Pick::Fail(why),
                _ => Pick::Wait,
            };
        }
        match &self.entries[self.next.fetch_add(1, Ordering::Relaxed) % n] {
            Entry::Backend(b) => Pick::Backend(b),
            Entry::Drop(t) => Pick::Drop(t),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The list's mode.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Addresses of the backend entries, in order (duplicates included).
    pub fn backend_addrs(&self) -> Vec<SocketAddr> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                Entry::Backend(b) => Some(b.addr),
                Entry::Drop(_) => None,
            })
            .collect()
    }
}

/// Holds the current pick list and wakes waiters when it changes.
pub struct Picker {
    current: ArcSwap<PickList>,
    generation: watch::Sender<u64>,
}

impl Default for Picker {
    fn default() -> Self {
        Picker {
            current: ArcSwap::from_pointee(PickList::new(Vec::new(), Mode::Waiting)),
            generation: watch::channel(0).0,
        }
    }
}

impl Picker {
    /// The current list.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<PickList>> {
        self.current.load()
    }

    /// Installs a new list and wakes waiters.
    pub fn store(&self, list: PickList) {
        self.current.store(Arc::new(list));
        self.generation.send_modify(|g| *g += 1);
    }

    /// A receiver that sees every later [`Picker::store`]. Subscribe before
    /// picking so that no change is missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_walked_in_order() {
        let list = PickList::new(
            vec![Entry::Drop("a".into()), Entry::Drop("b".into())],
            Mode::Ready,
        );
        let mut seen = Vec::new();
        for _ in 0..4 {
            match list.pick() {
                Pick::Drop(t) => seen.push(t.to_string()),
                _ => panic!("expected a drop"),
            }
        }
        // Whatever the random start, the order alternates.
        assert_ne!(seen[0], seen[1]);
        assert_eq!(seen[0], seen[2]);
    }

    #[test]
    fn empty_lists_wait_or_fail() {
        assert!(matches!(
            PickList::new(Vec::new(), Mode::Waiting).pick(),
            Pick::Wait
        ));
        let failing = PickList::new(Vec::new(), Mode::Failing("no servers".into()));
        assert!(matches!(failing.pick(), Pick::Fail("no servers")));
    }
}
