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
//! registry ──► catalog ──► policy ──► snapshot ──► grpclb ──► clients
//!                 ▲                      │
//!   probe (health, load)                 └──► admin (HTTP: JSON, /metrics)
//!   cluster (probe results shared between replicas)
//! ```
//!
//! | module | job |
//! | --- | --- |
//! | [`model`] | the vocabulary: instances, rejections, health, load samples |
//! | [`config`] | flags and env vars |
//! | [`registry`] | sources: embedded memory, etcd, file, DNS, ZooKeeper, Consul |
//! | [`catalog`] | who exists, and what probes and operators say; publishes lists |
//! | [`policy`] | backends → ordered, weighted server list, with reasons |
//! | [`snapshot`] | published lists: versioned, immutable, encoded once |
//! | [`probe`] | active health checks and ORCA load per backend |
//! | [`cluster`] | replicas sharing health checks through etcd |
//! | [`rendezvous`] | stable rendezvous hashing |
//! | [`grpclb`] | the grpclb frontend (BalanceLoad streams) |
//! | [`streams`] | name mapping, the session table, per-client subsets |
//! | [`admin`] | admin HTTP endpoint |
//! | [`metrics`] | Prometheus metrics |
//! | [`net`] | listener caps, quotas, bearer tokens, TLS |
//! | [`log_limit`] | rate limits for log lines outsiders can trigger |
//!
//! [`LbServer::start`] (in `server.rs`) assembles and runs them all.

pub mod admin;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod grpclb;
pub mod log_limit;
pub mod metrics;
pub mod model;
pub mod net;
pub mod policy;
pub mod probe;
pub mod registry;
pub mod rendezvous;
pub mod snapshot;
pub mod streams;

pub use config::Config;
pub use server::LbServer;

mod server;
