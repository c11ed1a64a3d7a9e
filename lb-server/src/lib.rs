//! `lb-server`: a lookaside load balancer for gRPC.
//!
//! The LB watches a service registry, keeps a catalog of every service's
//! backends, turns it into ordered server lists, and streams those lists to
//! clients over gRPC's own `grpc.lb.v1.LoadBalancer` protocol. Clients then
//! call backends directly: the LB is never in the data path.
//!
//! Data flows one way, one folder per step:
//!
//! ```text
//! registry ──► catalog ──► policy ──► snapshot ──► zones ──┬─► grpclb ──► clients
//!                 ▲                                         ├─► xds ────► clients, Envoy
//!   probe (health, load)                                    └─► admin (HTTP: JSON, /metrics)
//!   cluster (probe results shared between replicas)
//!   clients' outcomes (LRS) ──► gray (ejections, into the policy)
//! ```
//!
//! | module | job |
//! | --- | --- |
//! | `model` | the vocabulary: instances, rejections, health, load samples |
//! | [`config`] | flags, env vars and the config file; what SIGHUP may change |
//! | `registry` | sources: embedded memory, etcd, file, DNS, ZooKeeper, Consul, Kubernetes |
//! | `catalog` | who exists, and what probes and operators say; publishes lists |
//! | `policy` | backends → ordered, weighted server list, with reasons |
//! | `gray` | gray failures: every client's outcomes of each backend → ejections |
//! | `snapshot` | published lists: versioned, immutable, encoded once |
//! | `zones` | per-client-zone lists from demand and capacity per zone |
//! | `probe` | active health checks and ORCA load per backend |
//! | `cluster` | replicas sharing health checks through etcd |
//! | `history` | the last hour of samples and events, for the dashboard |
//! | `rendezvous` | stable rendezvous hashing |
//! | `grpclb` | the grpclb frontend (BalanceLoad streams) |
//! | `xds` | the xDS frontend (ADS state of the world, LRS) |
//! | `streams` | name mapping, the session table, per-client subsets |
//! | `admin` | admin HTTP endpoint |
//! | `metrics` | Prometheus metrics |
//! | `net` | listener caps, quotas, bearer tokens, TLS |
//! | `log_limit` | rate limits for log lines outsiders can trigger |
//!
//! [`LbServer::start`] (in `server.rs`) assembles and runs them all.

pub mod config;

pub(crate) mod admin;
pub(crate) mod catalog;
pub(crate) mod cluster;
pub(crate) mod gray;
pub(crate) mod grpclb;
pub(crate) mod history;
pub(crate) mod log_limit;
pub(crate) mod metrics;
pub(crate) mod model;
pub(crate) mod net;
pub(crate) mod policy;
pub(crate) mod probe;
pub(crate) mod registry;
pub(crate) mod rendezvous;
pub(crate) mod snapshot;
pub(crate) mod streams;
pub(crate) mod xds;
pub(crate) mod zones;

mod server;

pub use config::Config;
pub use server::LbServer;

/// The parsers and parts that the fuzz targets and the test suite drive
/// directly, so that hostile input reaches the exact code the server runs.
/// Not an API: hidden from the docs, and free to change with the server.
#[doc(hidden)]
pub mod internals {
    pub use crate::admin::{router, AdminState};
    pub use crate::catalog::Catalog;
    pub use crate::history::{History, HistorySettings};
    pub use crate::metrics::Metrics;
    pub use crate::model::Instance;
    pub use crate::net::tls::{http_client_config, https_acceptor};
    pub use crate::registry::entry::{parse_host_port, parse_key, parse_value, ValueOp};
    pub use crate::registry::{consul, dns, zookeeper};
    pub use crate::streams::names::{strip_port, NameMapper};
    pub use crate::streams::subsets::Subsets;
    pub use crate::zones::Zones;
}
