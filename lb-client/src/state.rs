//! The channel's shared state: the list in force (from the LB, or the
//! fallback backends), the backend connections, and the picker built from
//! both. The picker is rebuilt whenever the list or a connection changes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::HeaderValue;

use crate::backends::{BackendPool, ConnSettings, ConnState};
use crate::picker::{Entry, Mode, PickList, Picker, ReadyBackend};
use crate::stats::CallStats;

/// One entry of a server list as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// Backend address.
    pub addr: SocketAddr,
    /// Its load-balance token (none in fallback mode).
    pub token: Option<Arc<str>>,
    /// A drop entry.
    pub drop: bool,
}

/// Where the list in force comes from.
#[derive(Debug, Clone)]
enum Source {
    /// Nothing yet.
    Waiting,
    /// The LB's latest list.
    Lb(Vec<ListEntry>),
    /// The configured fallback backends.
    Fallback(Vec<ListEntry>),
    /// No list and no fallback: calls fail with this reason.
    Unavailable(String),
}

/// How often a channel connected and heard from its LB, since it started.
/// In steady state none of these move: a rising count means a peer is
/// closing connections or the LB is pushing lists.
#[derive(Debug, Default)]
pub struct Counters {
    /// BalanceLoad streams opened (an initial response received).
    pub lb_streams: AtomicU64,
    /// Server lists received.
    pub lists: AtomicU64,
    /// Backend connections established (first connects and reconnects).
    pub backend_connections: Arc<AtomicU64>,
    /// Calls sent again under a retry policy (one per retry).
    pub retries: AtomicU64,
    /// Per-backend outcome reports sent to the LB.
    pub outcome_reports: AtomicU64,
}

/// How often a channel connected, heard from its LB and retried, at one
/// moment ([`crate::LbChannel::counters`]). In steady state none of these
/// move but `outcome_reports`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// BalanceLoad streams opened.
    pub lb_streams: u64,
    /// Server lists received.
    pub lists: u64,
    /// Backend connections established.
    pub backend_connections: u64,
    /// Retries under a retry policy.
    pub retries: u64,
    /// Per-backend outcome reports sent.
    pub outcome_reports: u64,
}

impl Counters {
    /// The counts now.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            lb_streams: self.lb_streams.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
            backend_connections: self.backend_connections.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            outcome_reports: self.outcome_reports.load(Ordering::Relaxed),
        }
    }
}

/// Shared by the channel, the LB stream task and the connection tasks.
pub struct ChannelState {
    /// The service this channel calls.
    pub service: String,
    /// The current pick list.
    pub picker: Picker,
    /// Counters reported to the LB.
    pub stats: CallStats,
    /// Calls wait while no backend is ready instead of failing fast.
    pub wait_for_ready: bool,
    /// Address of the LB whose stream is open now, if any.
    pub current_lb: Mutex<Option<SocketAddr>>,
    /// URI scheme of calls to backends (`https` when they are called over TLS).
    pub scheme: http::uri::Scheme,
    /// `user-agent` of every call.
    pub user_agent: http::HeaderValue,
    /// `:authority` of every call, when set instead of the backend's.
    pub origin: Option<http::uri::Authority>,
    /// How often connections were made and lists received.
    pub counters: Counters,
    /// Calls waiting for their response headers now.
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Each backend's call outcomes are counted (and reported).
    pub(crate) count_outcomes: bool,
    fallback: Vec<SocketAddr>,
    pool: BackendPool,
    source: Mutex<Source>,
    got_lb_list: AtomicBool,
}

impl ChannelState {
    /// New state; `fallback` backends are used when no LB list can be had.
    pub fn new(
        service: String,
        fallback: Vec<SocketAddr>,
        conn: ConnSettings,
        wait_for_ready: bool,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak: &std::sync::Weak<ChannelState>| {
            let weak = weak.clone();
            let counters = Counters::default();
            let connects = counters.backend_connections.clone();
            let on_change = Arc::new(move || {
                if let Some(state) = weak.upgrade() {
                    state.rebuild();
                }
            });
            let origin = conn.origin.as_ref();
            let scheme = match origin.and_then(|o| o.scheme()) {
                Some(s) => s.clone(),
                None if conn.tls.is_some() => http::uri::Scheme::HTTPS,
                None => http::uri::Scheme::HTTP,
            };
            let origin = origin.and_then(|o| o.authority()).cloned();
            let library = concat!("lb-client/", env!("CARGO_PKG_VERSION"));
            let user_agent = conn
                .user_agent
                .as_deref()
                .and_then(|ua| http::HeaderValue::try_from(format!("{ua} {library}")).ok())
                .unwrap_or(http::HeaderValue::from_static(library));
            ChannelState {
                count_outcomes: conn.count_outcomes,
                scheme,
                user_agent,
                origin,
                service,
                picker: Picker::default(),
                stats: CallStats::default(),
                wait_for_ready,
                current_lb: Mutex::new(None),
                fallback,
                counters,
                in_flight: std::sync::atomic::AtomicUsize::new(0),
                pool: BackendPool::new(conn, on_change, connects),
                source: Mutex::new(Source::Waiting),
                got_lb_list: AtomicBool::new(false),
            }
        })
    }

    /// Whether a list from an LB has ever been received.
    pub fn got_lb_list(&self) -> bool {
        self.got_lb_list.load(Ordering::Relaxed)
    }

    /// Backend addresses of the list in force (LB or fallback), in order,
    /// whether or not their connections are ready.
    pub fn listed_backends(&self) -> Vec<SocketAddr> {
        match &*self.source.lock().expect("source lock") {
            Source::Lb(e) | Source::Fallback(e) => {
                e.iter().filter(|e| !e.drop).map(|e| e.addr).collect()
            }
            Source::Waiting | Source::Unavailable(_) => Vec::new(),
        }
    }

    /// Every backend's outcomes since the last report, one locality each.
    pub(crate) fn take_outcomes(
        &self,
    ) -> Vec<lb_proto::envoy::service::load_stats::v3::UpstreamLocalityStats> {
        self.pool.take_outcomes()
    }

    /// Installs a list received from the LB.
    pub fn set_lb_list(&self, entries: Vec<ListEntry>) {
        self.got_lb_list.store(true, Ordering::Relaxed);
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let addrs = backend_addrs(&entries);
        *self.source.lock().expect("source lock") = Source::Lb(entries);
        self.pool.sync(&addrs);
        self.rebuild();
    }

    /// Switches to the fallback backends (or, with none configured, to
    /// failing calls) because `why`.
    pub fn enter_fallback(&self, why: &str) {
        self.enter_fallback_if(why, |_| true);
    }

    /// [`ChannelState::enter_fallback`] if `still` holds of the source in
    /// force (checked under its lock).
    fn enter_fallback_if(&self, why: &str, still: impl FnOnce(&Source) -> bool) {
        let next = if self.fallback.is_empty() {
            Source::Unavailable(format!(
                "no server list for {:?}: {why}; no fallback backends configured",
                self.service
            ))
        } else {
            Source::Fallback(
                self.fallback
                    .iter()
                    .map(|&addr| ListEntry {
                        addr,
                        token: None,
                        drop: false,
                    })
                    .collect(),
            )
        };
        let addrs = match &next {
            Source::Fallback(e) => backend_addrs(e),
            _ => Vec::new(),
        };
        {
            let mut source = self.source.lock().expect("source lock");
            if !still(&source) {
                return;
            }
            *source = next;
        }
        if self.fallback.is_empty() {
            tracing::warn!(service = %self.service, why, "no server list and no fallback backends");
        } else {
            tracing::warn!(service = %self.service, why, fallback = ?self.fallback, "using fallback backends");
        }
        self.pool.sync(&addrs);
        self.rebuild();
    }

    /// Enters fallback only if no list is in force yet.
    pub fn fallback_if_waiting(&self, why: &str) {
        let waiting = matches!(
            *self.source.lock().expect("source lock"),
            Source::Waiting | Source::Unavailable(_)
        );
        if waiting {
            self.enter_fallback(why);
        }
    }

    /// Reports that a request could not be sent on `backend`'s connection.
    pub fn report_send_failure(&self, backend: &ReadyBackend) {
        backend.conn.report_send_failure(&|| self.rebuild());
    }

    /// Rebuilds the pick list from the source and connection states.
    fn rebuild(&self) {
        let source = self.source.lock().expect("source lock");
        let (entries, empty_mode) = match &*source {
            Source::Waiting => (&[][..], Mode::Waiting),
            Source::Lb(e) => (
                &e[..],
                Mode::Failing(format!(
                    "the load balancer lists no servers for {:?}",
                    self.service
                )),
            ),
            Source::Fallback(e) => (
                &e[..],
                Mode::Failing("no fallback backend reachable".into()),
            ),
            Source::Unavailable(why) => (&[][..], Mode::Failing(why.clone())),
        };
        let mut picks = Vec::with_capacity(entries.len());
        let mut connecting = false;
        let mut failures: Vec<String> = Vec::new();
        for e in entries {
            if e.drop {
                picks.push(Entry::Drop(
                    e.token.clone().unwrap_or_else(|| Arc::from("")),
                ));
                continue;
            }
            let Some(conn) = self.pool.get(&e.addr) else {
                continue;
            };
            match conn.state() {
                ConnState::Ready(sender) => picks.push(Entry::Backend(ReadyBackend {
                    sender,
                    addr: e.addr,
                    authority: http::uri::Authority::try_from(e.addr.to_string())
                        .expect("a socket address is a valid authority"),
                    token: e
                        .token
                        .as_deref()
                        .and_then(|t| HeaderValue::from_str(t).ok()),
                    conn,
                })),
                ConnState::Connecting => connecting = true,
                ConnState::Failed(why) => {
                    if failures.len() < 3 {
                        failures.push(why)
                    }
                }
            }
        }
        let mode = if connecting {
            Mode::Waiting
        } else if entries.is_empty() {
            empty_mode
        } else {
            Mode::Failing(format!(
                "no backend of {:?} is reachable: {}",
                self.service,
                failures.join("; ")
            ))
        };
        // C-core's grpclb rule: with the LB lost and every backend of its
        // last list unreachable (a connect attempt failed, not merely a
        // connection closed and being made again), the fallback backends
        // serve until a list comes.
        let lb_list_dead = match &*source {
            Source::Lb(e) => {
                e.iter().any(|e| !e.drop)
                    && e.iter()
                        .filter(|e| !e.drop)
                        .all(|e| self.pool.get(&e.addr).is_none_or(|c| c.unreachable()))
            }
            _ => false,
        } && !self.fallback.is_empty();
        let list = self.counters.lists.load(Ordering::Relaxed);
        self.picker.store(PickList::new(picks, mode));
        drop(source);
        if lb_list_dead {
            self.fall_back_from(list);
        }
    }

    /// Enters fallback if the LB list numbered `list` is still in force and
    /// no LB stream is open (checked again under the lock: a list may have
    /// come meanwhile).
    fn fall_back_from(&self, list: u64) {
        self.enter_fallback_if(
            "the load balancer is lost and every backend of its last list is unreachable",
            |source| {
                matches!(source, Source::Lb(_))
                    && self.counters.lists.load(Ordering::Relaxed) == list
                    && self.current_lb.lock().expect("lb lock").is_none()
            },
        );
    }

    /// The LB stream ended: the list in force stays, unless every backend
    /// of it has failed too (then the fallback backends serve).
    pub fn lb_lost(&self) {
        *self.current_lb.lock().expect("lb lock") = None;
        self.rebuild();
    }

    /// Stops every backend connection.
    pub fn close(&self) {
        self.pool.close_all();
    }
}

fn backend_addrs(entries: &[ListEntry]) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = entries.iter().filter(|e| !e.drop).map(|e| e.addr).collect();
    addrs.sort();
    addrs.dedup();
    addrs
}
