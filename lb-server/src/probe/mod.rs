//! Probes: what the LB learns by asking the backends themselves.
//!
//! One probe per backend address keeps a gRPC connection open and runs two
//! things on it: the health check ([`health`]: `Watch`, with a `Check`
//! heartbeat beside it) and, when enabled, the ORCA load stream ([`load`]).
//! Both hand what they learn to a [`report::Reporter`], which writes it into
//! the catalog and, with replicas, shares it with the others.
//!
//! | module | job |
//! | --- | --- |
//! | [`health`] | one probe task per backend address, started and stopped as membership changes |
//! | [`load`] | the ORCA out-of-band stream of one backend |
//! | [`report`] | where probes put what they learn |
//! | [`pace`] | one budget for reconnects, shared by every probe |

pub mod health;
pub mod load;
pub mod pace;
pub mod report;
