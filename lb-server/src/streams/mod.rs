//! Streams: who is connected, and what each one is shown.
//!
//! Every protocol frontend shares these parts: a requested name is mapped
//! to a service ([`names`]), each open stream has a row in the session table
//! ([`sessions`], read by the admin API), and with subsetting on each client
//! sees its own stable part of a large service ([`subsets`]). Streams are
//! served by a hand-written one-method service ([`service`]) whose codec
//! writes pre-encoded responses with small buffers ([`codec`]).
//!
//! | module | job |
//! | --- | --- |
//! | [`names`] | requested name → service (aliases, domain suffixes, ports) |
//! | [`sessions`] | the table of open streams |
//! | [`subsets`] | per-client subsets of backends |
//! | [`service`] | a one-method streaming gRPC service (BalanceLoad, ADS) |
//! | [`codec`] | pre-encoded responses, small buffers |
//! | [`first_request`] | a stream's first request, within the deadline |

pub mod codec;
pub mod first_request;
pub mod names;
pub mod service;
pub mod sessions;
pub mod subsets;
