//! Published snapshots: what the catalog hands to the protocol frontends.
//!
//! Each service has one current [`PublishedList`]: versioned, immutable,
//! shared by `Arc` through a `tokio::sync::watch` channel (latest wins: a
//! slow stream skips straight to the newest list and never holds up the
//! catalog or the other streams). The catalog builds a snapshot once per
//! change, under the service's lock; frontends only read snapshots, never
//! the catalog's insides.
//!
//! A snapshot carries its grpclb message already encoded ([`PublishedList::grpclb`]):
//! a change to a service with 10,000 streams is encoded once, and the same
//! bytes are written to every stream that shows the whole list.
//!
//! A list also says where its backends are ([`PublishedList::localities`]):
//! the zone views ([`crate::zones`]) are built from it, and are
//! `PublishedList`s themselves, one per client zone, with the service's
//! other backends as their [`PublishedList::failover`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use lb_proto::grpc::lb::v1::{
    load_balance_response::LoadBalanceResponseType, LoadBalanceResponse, Server, ServerList,
};
use prost::Message;

use crate::model::Locality;

/// One service's server list, as published to streams.
#[derive(Debug)]
pub struct PublishedList {
    /// Increments on every change; 0 until something is decided (see
    /// [`PublishedList::empty`]).
    pub version: u64,
    /// The ordered list.
    pub servers: Vec<Server>,
    /// When the change that produced it was applied.
    pub changed_at: Instant,
    /// Panic mode was on when it was built.
    pub panic: bool,
    /// Fraction of drop entries (load shedding).
    pub shed_fraction: f64,
    /// The zone and region of every backend listed (unknown ones absent).
    pub localities: Arc<BTreeMap<SocketAddr, Locality>>,
    /// A zone view's fallback: the service's listed backends that are not
    /// in `servers`, as the service's list weights them (xDS priority 1).
    /// Empty for the service's own list.
    pub failover: Vec<Server>,
    /// Unique in this process: caches of what is built from a list key on it.
    pub id: u64,
    /// `servers` as an encoded grpclb `LoadBalanceResponse`.
    grpclb: Bytes,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl PublishedList {
    /// A snapshot of `servers`, encoded for every frontend.
    pub fn new(version: u64, servers: Vec<Server>, panic: bool, shed_fraction: f64) -> Self {
        let grpclb = encode_server_list(&servers);
        PublishedList {
            version,
            servers,
            changed_at: Instant::now(),
            panic,
            shed_fraction,
            localities: Arc::default(),
            failover: Vec::new(),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            grpclb,
        }
    }

    /// The same list, saying where its backends are.
    pub fn with_localities(mut self, localities: Arc<BTreeMap<SocketAddr, Locality>>) -> Self {
        self.localities = localities;
        self
    }

    /// The same list with a failover set (a zone view).
    pub fn with_failover(mut self, failover: Vec<Server>) -> Self {
        self.failover = failover;
        self
    }

    /// The list before anything was decided (version 0: no backend yet,
    /// or none had its first health check). Frontends never send it.
    pub fn empty() -> Self {
        PublishedList::new(0, Vec::new(), false, 0.0)
    }

    /// Whether it says anything yet (version 1 on): version 0 is "not
    /// decided", which no frontend sends (see [`PublishedList::empty`]).
    pub fn decided(&self) -> bool {
        self.version > 0
    }

    /// The whole list as a grpclb `LoadBalanceResponse` (`server_list`),
    /// encoded once.
    pub fn grpclb(&self) -> &Bytes {
        &self.grpclb
    }
}

/// `servers` as an encoded grpclb `LoadBalanceResponse` carrying a
/// `server_list` (a stream's own subset is encoded with this too).
pub fn encode_server_list(servers: &[Server]) -> Bytes {
    LoadBalanceResponse {
        load_balance_response_type: Some(LoadBalanceResponseType::ServerList(ServerList {
            servers: servers.to_vec(),
        })),
    }
    .encode_to_vec()
    .into()
}
