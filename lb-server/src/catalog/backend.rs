//! The data model: a backend as the catalog knows it, with what probes and
//! operators have said about it.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use crate::model::{HealthState, LoadSample, Locality};
use crate::policy::{Decision, Load};

/// A backend as the catalog knows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Backend {
    /// Registry source that reported it.
    pub source: &'static str,
    /// Its key in that source.
    pub key: String,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Registry weight.
    pub weight: u32,
    /// Load-balance token sent in lists (stable for a given service and address).
    pub token: String,
    /// Registry metadata.
    pub metadata: Option<serde_json::Value>,
    /// Its zone and region, from the metadata (empty when unknown).
    pub locality: Locality,
    /// When it was first reported.
    #[serde(with = "humantime_serde_compat")]
    pub registered_at: SystemTime,
    /// Health as last checked.
    pub health: HealthState,
    /// Since when the health has been what it is.
    #[serde(with = "humantime_serde_compat")]
    pub health_since: SystemTime,
    /// Detail of the last health change (error text, status).
    pub health_detail: String,
    /// What other replicas' witness probes find while its checker finds it
    /// silent, by replica id (empty otherwise): a second view, which
    /// confirms the removal or holds it in the list ([`crate::policy`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub opinions: BTreeMap<String, HealthState>,
    /// Health transitions in the last [`FLAP_WINDOW`] (the first check of a
    /// new backend not counted): a flapping backend shows here at a glance.
    #[serde(rename = "health_transitions_10m")]
    pub recent_transitions: RecentTransitions,
    /// Since when it has been serving (slow start).
    #[serde(skip)]
    pub serving_since: Option<Instant>,
    /// Load as weighting uses it.
    #[serde(skip)]
    pub load: Option<Load>,
    /// The last ORCA report, as received.
    pub load_report: Option<LoadReport>,
    /// Taken out of lists by an operator, kept registered.
    pub drained: bool,
    /// When its registry dropped it while it passed health checks: kept
    /// listed for a grace period (serialized as seconds ago).
    #[serde(rename = "left_registry_s", serialize_with = "secs_ago")]
    pub left_registry: Option<Instant>,
    /// Whether its departure was logged and journaled (once it outlasted
    /// the moment a graceful deregistration's NOT_SERVING takes to arrive).
    #[serde(skip)]
    pub departure_noted: bool,
    /// What the gray-failure detector says of it, from clients' outcomes
    /// (`None` until it said something).
    #[serde(serialize_with = "gray_view", skip_serializing_if = "Option::is_none")]
    pub gray: Option<crate::gray::State>,
    /// The policy's last decision about it.
    pub decision: Decision,
    /// Operator's weight override, replacing the registry weight until it expires.
    pub weight_override: Option<WeightOverride>,
    /// The weight and health last written to its `/metrics` gauges.
    #[serde(skip)]
    pub exported_gauges: Option<(f64, bool)>,
}

impl Backend {
    /// Whether the policy's view of it can change with time alone: a load
    /// report (blackout, expiry), a slow start, an override (expiry), a
    /// departure's grace.
    pub fn changes_with_time(&self) -> bool {
        self.load.is_some()
            || self.serving_since.is_some()
            || self.weight_override.is_some()
            || self.left_registry.is_some()
    }
}

fn secs_ago<S: serde::Serializer>(at: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(t) => s.serialize_f64((t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
        None => s.serialize_none(),
    }
}

/// The detector's state as the API shows it: phase, for how long, the
/// ejections so far, the weight factor and why.
fn gray_view<S: serde::Serializer>(
    state: &Option<crate::gray::State>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let Some(g) = state else {
        return s.serialize_none();
    };
    let mut v = s.serialize_struct("Gray", 6)?;
    v.serialize_field("state", g.phase_name())?;
    let secs = (g.since.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    v.serialize_field("since_s", &secs)?;
    v.serialize_field("ejections", &g.times)?;
    v.serialize_field("weight_factor", &g.weight_factor)?;
    v.serialize_field("why", &g.why)?;
    v.serialize_field("judged_by", &g.by)?;
    v.end()
}

/// The window of [`Backend::recent_transitions`].
pub const FLAP_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// When a backend's recent health transitions happened (bounded: at most
/// [`RecentTransitions::CAP`] are remembered). Serialized as their count
/// within [`FLAP_WINDOW`].
#[derive(Debug, Clone, Default)]
pub struct RecentTransitions(std::collections::VecDeque<Instant>);

impl RecentTransitions {
    /// Most transitions remembered per backend.
    pub const CAP: usize = 256;

    pub(super) fn record(&mut self, now: Instant) {
        self.forget_before(now);
        if self.0.len() == Self::CAP {
            self.0.pop_front();
        }
        self.0.push_back(now);
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .0
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > FLAP_WINDOW)
        {
            self.0.pop_front();
        }
    }

    /// Transitions within the window ending now.
    pub fn count(&self) -> usize {
        let now = Instant::now();
        self.0
            .iter()
            .filter(|t| now.saturating_duration_since(**t) <= FLAP_WINDOW)
            .count()
    }
}

impl serde::Serialize for RecentTransitions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.count() as u64)
    }
}

/// An operator's weight override.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WeightOverride {
    /// The weight used instead of the registry weight.
    pub weight: u32,
    /// When it lapses.
    #[serde(with = "humantime_serde_compat")]
    pub until: SystemTime,
    #[serde(skip)]
    pub(super) expires: Instant,
}

/// The last load report of a backend, as shown to operators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// What it said.
    #[serde(flatten)]
    pub sample: LoadSample,
    /// When it arrived.
    #[serde(with = "humantime_serde_compat")]
    pub received_at: SystemTime,
}

/// The load-balance token of a backend: a short hash of service and
/// address, so it is stable for as long as the address is listed, the same
/// on every LB replica, and well under the protocol's 50-byte limit.
pub fn token_for(service: &str, addr: SocketAddr) -> String {
    let mut h = fnv::FnvHasher::default();
    h.write(service.as_bytes());
    h.write(b"|");
    h.write(addr.to_string().as_bytes());
    format!("{:016x}", h.finish())
}

/// Serializes `SystemTime` as RFC 3339 text.
mod humantime_serde_compat {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
    }
}
