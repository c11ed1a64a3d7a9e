//! Gray failures: backends that pass their health checks but fail or stall
//! real calls, found in what every client saw of them and taken out of
//! every client's list at once.
//!
//! Health checks ask a backend whether it serves; a broken dependency, a
//! bad disk or one poisoned cache answers "SERVING" and fails calls
//! anyway. Per-client detectors (gRPC's outlier detection, gRFC A50;
//! Envoy's; Finagle's failure accrual) each see one client's calls: a
//! client sending a backend a call a second never reaches their evidence
//! thresholds, and each spends its own ejection budget on different hosts.
//! The LB sees every client's outcomes of every backend (LRS reports from
//! `LbChannel` and xDS clients, pooled per backend by the catalog), so it
//! decides once, for everyone:
//!
//! 1. **Evidence**: per backend, its calls, the calls it answered, its
//!    errors and latency, pooled over clients with an exponential decay
//!    ([`ERROR_DECAY`] for errors, [`DECAY`] for latency), and who
//!    contributed them (distinct reporters).
//! 2. **Errors against its peers** ([`judge`]): a backend is suspect when
//!    its error rate is at least [`Settings::min_error_rate`], at least
//!    [`Settings::error_ratio`] times its peers' pooled rate (peers that
//!    fail too are left out of it, so that several failing backends do
//!    not raise the bar for each other), and significantly so (an
//!    evidence score of at least [`Settings::min_score`] against that
//!    rate), over at least [`Settings::min_calls`] answered calls; with
//!    the reporter that saw the most errors left out, the rest is still
//!    an excess (half the score), while at least [`Settings::min_reporters`]
//!    distinct clients saw errors. One broken or lying client cannot eject
//!    a healthy backend; a noise level shared by every backend ejects none.
//! 3. **A cap**: at most `max(1, max_ejection × backends)` are ejected at
//!    once, worst first; the rest are *held* with an alert. Every replica
//!    orders suspects the same way (score, then token).
//! 4. **Ejection time grows with repeats**: `base_ejection × times`, at
//!    most 5 minutes. Then **probation**: the backend is listed
//!    again at [`Settings::probation_weight`] of its weight, its evidence
//!    starts afresh, and it is re-admitted only on good results from real
//!    calls ([`Settings::min_calls`] answered without being suspect), never
//!    on a passing health check alone; suspect again, it is ejected for
//!    longer.
//! 5. **Latency**: a backend whose mean latency is at least
//!    [`Settings::latency_ratio`] times its peers' median, with the same
//!    evidence rules, is de-weighted (by the ratio) rather than ejected.
//!
//! 6. **One ejected set for the cluster**: each replica publishes its own
//!    ejections and adopts the others' ([`shared`]), within one cap.
//!
//! The decision is pure ([`judge`]: evidence and the previous state in,
//! verdicts with reasons out) and unit-tested like the policy; the catalog
//! runs it every second and publishes a new list when a verdict changes.
//! Panic mode still applies: ejected backends count as unhealthy.

mod judge;
pub mod shared;

#[cfg(test)]
pub use judge::Phase;
pub use judge::{judge, Evidence, Input, Settings, State, DECAY, ERROR_DECAY};
