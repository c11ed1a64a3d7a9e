//! The vocabulary every part of the LB speaks: the ground floor.
//!
//! Registry sources report [`Instance`]s and [`Rejected`] entries, probes
//! report [`HealthState`]s and [`LoadSample`]s; the catalog stores them, the
//! policy reads them, the admin API shows them. None of these types knows
//! where it came from or where it goes, so this module imports no other
//! part of the LB and every part may import it.
//!
//! Wire forms stay at the edges: the ORCA proto is turned into a
//! [`LoadSample`] by the probe that reads it ([`crate::probe::load`]), and
//! the JSON replicas share through etcd by [`crate::cluster`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

/// One registered instance of a service, as a registry source sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The service it belongs to, e.g. `greeter`.
    pub service: String,
    /// The key that identifies it within its source (the etcd key, say).
    pub key: String,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Relative weight from the registry metadata (`{"weight": n}`), 1 if unset.
    pub weight: u32,
    /// Metadata as registered (JSON), if any.
    pub metadata: Option<serde_json::Value>,
    /// When this source first reported it.
    pub registered_at: SystemTime,
}

/// Where a backend or a client runs: its zone and, optionally, region.
/// Empty strings mean unknown.
///
/// Backends get theirs from registry metadata (`{"zone": "eu-west-1a",
/// "region": "eu-west-1"}` in every source that carries metadata), clients
/// from what they say (`lb-client-zone`, the xDS node's locality) or from
/// the LB's map of peer addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Locality {
    /// The region, e.g. `eu-west-1`; empty when unknown.
    pub region: String,
    /// The zone, e.g. `eu-west-1a`; empty when unknown.
    pub zone: String,
}

impl Locality {
    /// Longest zone or region name kept (longer ones are cut).
    pub const MAX_LEN: usize = 64;

    /// A locality of `zone` in `region`, each cut to [`Self::MAX_LEN`] bytes
    /// of printable ASCII.
    pub fn new(region: &str, zone: &str) -> Self {
        Locality {
            region: clean(region),
            zone: clean(zone),
        }
    }

    /// The `zone` and `region` strings of registry metadata, if any.
    pub fn of_metadata(metadata: Option<&serde_json::Value>) -> Self {
        let field = |k: &str| {
            metadata
                .and_then(|m| m.get(k))
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
        };
        Locality::new(field("region"), field("zone"))
    }

    /// Whether the zone is known.
    pub fn is_known(&self) -> bool {
        !self.zone.is_empty()
    }
}

fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(Locality::MAX_LEN)
        .collect()
}

/// Why an entry was rejected (also the `reason` label of the rejects metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The key is not `<prefix><service>/<instance>`.
    BadKey,
    /// The value is neither naming JSON nor `host:port`.
    BadValue,
    /// The address has no host, a bad port, or bad characters.
    BadAddress,
    /// The host name did not resolve.
    Unresolvable,
    /// The value is larger than [`MAX_VALUE_LEN`].
    TooLarge,
    /// Accepting it would pass a configured limit (services, backends per
    /// service, registrations).
    Limit,
}

impl RejectReason {
    /// Machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadKey => "bad_key",
            RejectReason::BadValue => "bad_value",
            RejectReason::BadAddress => "bad_address",
            RejectReason::Unresolvable => "unresolvable",
            RejectReason::TooLarge => "too_large",
            RejectReason::Limit => "limit",
        }
    }
}

/// A rejected entry: why, and a human-readable detail.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Why.
    pub reason: RejectReason,
    /// What exactly was wrong.
    pub detail: String,
}

impl Rejected {
    /// A rejection for `reason` with a human-readable `detail`.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejected {
            reason,
            detail: detail.into(),
        }
    }
}

/// Health of a backend as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Not checked yet.
    Unknown,
    /// Reports SERVING.
    Serving,
    /// Reports NOT_SERVING (or does not know the checked service).
    NotServing,
    /// The backend's host answered that nothing serves there: connection
    /// refused or reset, health stream broken, TLS refused.
    Unreachable,
    /// No answer at all: connect or heartbeat timed out, no route. Unlike
    /// the states above this is one replica's *view*: the backend may be
    /// fine and only this replica's path to it broken (an asymmetric
    /// partition), so the policy does not let it alone take out more than
    /// a bounded share of a service (see [`crate::policy`]).
    Silent,
    /// Health checking is disabled: treated as serving.
    Unchecked,
}

impl HealthState {
    /// Every state.
    pub const ALL: [HealthState; 6] = [
        HealthState::Unknown,
        HealthState::Serving,
        HealthState::NotServing,
        HealthState::Unreachable,
        HealthState::Silent,
        HealthState::Unchecked,
    ];

    /// Serving, or not checked at all (which counts as serving).
    pub fn is_healthy(self) -> bool {
        matches!(self, HealthState::Serving | HealthState::Unchecked)
    }
}

/// One load report of a backend (ORCA's fields that weighting and operators
/// use), whichever way it arrived: from the backend's own stream or from the
/// replica that probes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoadSample {
    /// CPU utilization.
    pub cpu_utilization: f64,
    /// Memory utilization.
    pub mem_utilization: f64,
    /// Application utilization.
    pub application_utilization: f64,
    /// Queries per second.
    pub qps: f64,
    /// Errors per second.
    pub eps: f64,
    /// Application-defined metrics.
    pub named_metrics: BTreeMap<String, f64>,
}

impl LoadSample {
    /// The utilization weighting uses: the application's if it reports one,
    /// else CPU.
    pub fn utilization(&self) -> f64 {
        if self.application_utilization > 0.0 {
            self.application_utilization
        } else {
            self.cpu_utilization
        }
    }
}
