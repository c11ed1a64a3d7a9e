//! The health result one replica publishes for a backend it owns, as stored
//! in etcd under `<prefix>health/<service>/<addr>`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::model::{HealthState, LoadSample};

/// A backend's health (and load) as checked by its owner.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SharedHealth {
    /// Replica that checked it.
    pub owner: String,
    /// The result.
    pub health: HealthState,
    /// Detail of the result (status or error text).
    pub detail: String,
    /// The last load report that was worth publishing.
    #[serde(default)]
    pub load: Option<SharedLoad>,
}

/// The fields of an ORCA report that weighting and operators use.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SharedLoad {
    /// CPU utilization.
    pub cpu: f64,
    /// Memory utilization.
    pub mem: f64,
    /// Application utilization.
    pub app: f64,
    /// Queries per second.
    pub qps: f64,
    /// Errors per second.
    pub eps: f64,
    /// Application-defined metrics.
    #[serde(default)]
    pub named: BTreeMap<String, f64>,
}

impl From<&LoadSample> for SharedLoad {
    fn from(r: &LoadSample) -> Self {
        SharedLoad {
            cpu: r.cpu_utilization,
            mem: r.mem_utilization,
            app: r.application_utilization,
            qps: r.qps,
            eps: r.eps,
            named: r.named_metrics.clone(),
        }
    }
}

impl SharedLoad {
    /// Back to the form the catalog takes.
    pub fn to_sample(&self) -> LoadSample {
        LoadSample {
            cpu_utilization: self.cpu,
            mem_utilization: self.mem,
            application_utilization: self.app,
            qps: self.qps,
            eps: self.eps,
            named_metrics: self.named.clone(),
        }
    }

    /// Whether `self` differs enough from `published` (sent at
    /// `published_at`) to be worth a write: a 5 % change in a weighting
    /// input, or a refresh well within the weight expiry.
    pub fn worth_publishing(&self, published: &SharedLoad, published_at: Instant) -> bool {
        const REFRESH: Duration = Duration::from_secs(30);
        let moved = |a: f64, b: f64| (a - b).abs() > 0.01_f64.max(0.05 * a.abs().max(b.abs()));
        moved(self.app, published.app)
            || moved(self.cpu, published.cpu)
            || moved(self.qps, published.qps)
            || moved(self.eps, published.eps)
            || published_at.elapsed() > REFRESH
    }
}

/// The etcd key of a backend's shared health under `prefix`.
pub fn key(prefix: &str, service: &str, addr: SocketAddr) -> String {
    format!("{prefix}health/{service}/{addr}")
}

/// Splits a shared-health key back into service and address.
pub fn parse_key(prefix: &str, key: &str) -> Option<(String, SocketAddr)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("health/")?;
    let (service, addr) = rest.rsplit_once('/')?;
    Some((service.to_string(), addr.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_even_with_slashes_in_names() {
        let addr: SocketAddr = "[::1]:8080".parse().unwrap();
        let k = key("/lb/", "team/greeter", addr);
        assert_eq!(k, "/lb/health/team/greeter/[::1]:8080");
        assert_eq!(parse_key("/lb/", &k), Some(("team/greeter".into(), addr)));
        assert_eq!(parse_key("/lb/", "/lb/replicas/x"), None);
        assert_eq!(parse_key("/lb/", "/lb/health/svc/not-an-addr"), None);
    }

    #[test]
    fn small_load_changes_are_not_published() {
        let a = SharedLoad {
            cpu: 0.5,
            mem: 0.1,
            app: 0.5,
            qps: 100.0,
            eps: 0.0,
            named: BTreeMap::new(),
        };
        let now = Instant::now();
        let mut b = a.clone();
        b.qps = 102.0;
        assert!(!b.worth_publishing(&a, now));
        b.qps = 110.0;
        assert!(b.worth_publishing(&a, now));
        let mut c = a.clone();
        c.app = 0.9;
        assert!(c.worth_publishing(&a, now));
    }

    #[test]
    fn values_round_trip_as_json() {
        let v = SharedHealth {
            owner: "lb-1".into(),
            health: HealthState::NotServing,
            detail: "NOT_SERVING".into(),
            load: None,
        };
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<SharedHealth>(&text).unwrap(), v);
    }
}
