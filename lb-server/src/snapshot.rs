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

use std::time::Instant;

use bytes::Bytes;
use lb_proto::grpc::lb::v1::{
    load_balance_response::LoadBalanceResponseType, LoadBalanceResponse, Server, ServerList,
};
use prost::Message;

/// One service's server list, as published to streams.
#[derive(Debug)]
pub struct PublishedList {
    /// Increments on every change; 0 before the first backend appeared.
    pub version: u64,
    /// The ordered list.
    pub servers: Vec<Server>,
    /// When the change that produced it was applied.
    pub changed_at: Instant,
    /// Panic mode was on when it was built.
    pub panic: bool,
    /// Fraction of drop entries (load shedding).
    pub shed_fraction: f64,
    /// `servers` as an encoded grpclb `LoadBalanceResponse`.
    grpclb: Bytes,
}

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
            grpclb,
        }
    }

    /// The list before any backend appeared.
    pub fn empty() -> Self {
        PublishedList::new(0, Vec::new(), false, 0.0)
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
