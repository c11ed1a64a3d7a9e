//! Zone-aware lists: keep calls in their zone without overloading it.
//!
//! Cross-zone traffic costs money and latency, and keeping every call local
//! overloads a zone whose clients call more than its backends can take.
//! The LB sees both sides: which zone each client is in and how much it
//! calls (client stats, LRS), and which zone each backend is in and how much
//! it can take (its weight in the service's list). From that it plans, per
//! service, how much of each client zone's calls stays local and where the
//! rest goes ([`plan`]), and publishes one list per client zone ([`views`]).
//!
//! Where zones come from:
//! - backends: `zone` and `region` in their registry metadata;
//! - clients: what they say (`lb-client-zone` metadata on BalanceLoad, the
//!   xDS node's `locality`), else the LB's map of peer address ranges
//!   ([`peers`], `--client-zone CIDR=ZONE`). A client of unknown zone gets
//!   the service's own list, as before.
//!
//! The plan is recomputed on every change of the service's list (health,
//! weights, membership) and on demand changes, damped ([`table`]). Zone
//! lists are `PublishedList`s like the service's, latest wins, one per
//! client zone, shared by every stream of that zone.
//!
//! | module | job |
//! | --- | --- |
//! | [`plan`] | demand × capacity → where each zone's calls go (pure) |
//! | [`views`] | a plan row → a client zone's list (pure) |
//! | [`table`] | one service's clients by zone, their demand, the views |
//! | [`peers`] | peer address ranges → client zones |
//!
//! Per-client subsets (`--subset-size`) and zone lists are not combined:
//! with subsets on, every client gets its subset of the service's list.

pub mod peers;
pub mod plan;
pub mod table;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::catalog::ServiceEntry;
use crate::metrics::Metrics;
use crate::model::Locality;
pub use peers::PeerZones;
pub use plan::PlanSettings;
pub use table::{ZoneMember, ZoneReport, ZoneTable};

/// The metadata key in which an `lb-client` names its zone.
pub use lb_proto::ext::CLIENT_ZONE_HEADER;

/// How zone lists are made.
#[derive(Debug, Clone)]
pub struct ZoneSettings {
    /// Zone lists are made (`--zone-aware`).
    pub enabled: bool,
    /// The plan's knobs (`--zone-overload-tolerance`, `--zone-min-healthy`).
    pub plan: PlanSettings,
    /// Zones of peers that do not say theirs (`--client-zone`).
    pub peers: PeerZones,
    /// Longest list (`--max-list-len`).
    pub max_list_len: usize,
    /// The client-stats interval asked of clients: rates are measured over
    /// a few of them.
    pub stats_interval: Duration,
    /// Most client zones planned for per service
    /// (`--zone-max-client-zones`); clients of further zones count as of
    /// unknown zone.
    pub max_client_zones: usize,
}

impl ZoneSettings {
    /// The window over which call rates are measured.
    fn rate_window(&self) -> Duration {
        (self.stats_interval * 4).max(Duration::from_secs(5))
    }
}

/// The zone tables of every service.
pub struct Zones {
    settings: Arc<ZoneSettings>,
    metrics: Arc<Metrics>,
    tables: DashMap<String, Arc<ZoneTable>>,
}

impl Zones {
    /// Tables made with `settings`.
    pub fn new(settings: ZoneSettings, metrics: Arc<Metrics>) -> Self {
        Zones {
            settings: Arc::new(settings),
            metrics,
            tables: DashMap::new(),
        }
    }

    /// Zone lists off: every client gets its service's list.
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Zones::new(
            ZoneSettings {
                enabled: false,
                plan: PlanSettings {
                    tolerance: 0.1,
                    min_healthy: 1,
                },
                peers: PeerZones::default(),
                max_list_len: 256,
                stats_interval: Duration::from_secs(10),
                max_client_zones: 256,
            },
            metrics,
        )
    }

    /// Whether zone lists are made.
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// A client's zone: the one it said, else the one its address maps to,
    /// else unknown.
    pub fn client_zone(&self, said: Locality, peer: Option<SocketAddr>) -> Locality {
        if said.is_known() {
            return said;
        }
        peer.and_then(|p| self.settings.peers.zone_of(p.ip()))
            .cloned()
            .unwrap_or(said)
    }

    /// The table of `entry`: a service forgotten and seen again
    /// ([`crate::catalog`]) is a new entry, and gets a new table.
    fn table(&self, entry: &Arc<ServiceEntry>) -> Arc<ZoneTable> {
        let mut slot = self
            .tables
            .entry(entry.name().to_string())
            .or_insert_with(|| self.new_table(entry));
        if !slot.serves(entry) {
            *slot = self.new_table(entry);
        }
        slot.clone()
    }

    fn new_table(&self, entry: &Arc<ServiceEntry>) -> Arc<ZoneTable> {
        Arc::new(ZoneTable::new(
            entry.clone(),
            self.settings.clone(),
            self.metrics.clone(),
        ))
    }

    /// Drops the table of a service the catalog forgot (streams still in
    /// it keep it until they end).
    pub fn forget(&self, service: &str) {
        self.tables.remove(service);
    }

    /// Adds a stream of a client in `locality` to `entry`'s table (`None`
    /// when zone lists are off).
    pub fn join(&self, entry: &Arc<ServiceEntry>, locality: &Locality) -> Option<ZoneMember> {
        self.enabled()
            .then(|| self.table(entry).join(locality, true))
    }

    /// Adds a load reporter (an LRS stream) of `locality`: its calls count
    /// for its zone, but it is no client of its own.
    pub fn join_reporter(
        &self,
        entry: &Arc<ServiceEntry>,
        locality: &Locality,
    ) -> Option<ZoneMember> {
        self.enabled()
            .then(|| self.table(entry).join(locality, false))
    }

    /// The zones of `service`, once any client of it connected.
    pub fn report(&self, service: &str) -> Option<ZoneReport> {
        self.tables.get(service).map(|t| t.report())
    }
}
