//! Network plumbing around the two ports: what is accepted, from whom, how
//! much of it, and over which TLS.
//!
//! | module | job |
//! | --- | --- |
//! | [`listener`] | accepting connections under caps and a handshake deadline |
//! | [`limits`] | quotas of connections and streams, in total and per peer |
//! | [`auth`] | bearer tokens (admin mutations, registration API) |
//! | [`tls`] | TLS material: the gRPC port's, the admin port's, towards backends and etcd |

pub mod auth;
pub mod limits;
pub mod listener;
pub mod tls;
