//! Host name resolution for registry addresses.
//!
//! The grpclb protocol carries IP addresses only, so the LB resolves host
//! names when it reads them. IP literals are used as they are; names are
//! looked up through the system resolver with a time limit, IPv4 preferred.
//!
//! A name that failed is remembered for [`NEGATIVE_TTL`]: a registry key
//! rewritten in a loop with an unresolvable host costs one lookup, not one
//! per write, and cannot stall the source's watch.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::{RejectReason, Rejected};

/// A `host:port` pair, host not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port, 1–65535.
    pub port: u16,
}

/// Longest time one lookup may take before the entry is rejected.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a failed lookup is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// Most failed names remembered.
const NEGATIVE_MAX: usize = 4096;

/// Names whose lookup failed lately, with when and why.
static FAILED: Mutex<Option<HashMap<String, (Instant, String)>>> = Mutex::new(None);

/// Resolves `hp` to one socket address.
pub async fn resolve(hp: &HostPort) -> Result<SocketAddr, Rejected> {
    if let Ok(ip) = hp.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, hp.port));
    }
    let unresolvable = |detail: String| Rejected {
        reason: RejectReason::Unresolvable,
        detail,
    };
    if let Some(detail) = recently_failed(&hp.host) {
        return Err(unresolvable(format!("{detail} (failed lookup remembered)")));
    }
    let result = lookup(hp).await;
    if let Err(r) = &result {
        remember_failure(&hp.host, &r.detail);
    }
    result
}

fn recently_failed(host: &str) -> Option<String> {
    let mut failed = FAILED.lock().expect("negative cache lock");
    let map = failed.get_or_insert_with(HashMap::new);
    match map.get(host) {
        Some((at, detail)) if at.elapsed() < NEGATIVE_TTL => Some(detail.clone()),
        Some(_) => {
            map.remove(host);
            None
        }
        None => None,
    }
}

fn remember_failure(host: &str, detail: &str) {
    let mut failed = FAILED.lock().expect("negative cache lock");
    let map = failed.get_or_insert_with(HashMap::new);
    if map.len() >= NEGATIVE_MAX {
        map.retain(|_, (at, _)| at.elapsed() < NEGATIVE_TTL);
        if map.len() >= NEGATIVE_MAX {
            map.clear();
        }
    }
    map.insert(host.to_string(), (Instant::now(), detail.to_string()));
}

/// One lookup through the system resolver.
async fn lookup(hp: &HostPort) -> Result<SocketAddr, Rejected> {
    let unresolvable = |detail: String| Rejected {
        reason: RejectReason::Unresolvable,
        detail,
    };
    let lookup = tokio::net::lookup_host((hp.host.as_str(), hp.port));
    let addrs: Vec<SocketAddr> = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .map_err(|_| {
            unresolvable(format!(
                "{}: lookup took longer than {LOOKUP_TIMEOUT:?}",
                hp.host
            ))
        })?
        .map_err(|e| unresolvable(format!("{}: {e}", hp.host)))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| unresolvable(format!("{}: no addresses", hp.host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_and_localhost_resolve() {
        let hp = HostPort {
            host: "127.0.0.9".into(),
            port: 80,
        };
        assert_eq!(resolve(&hp).await.unwrap(), "127.0.0.9:80".parse().unwrap());
        let hp = HostPort {
            host: "localhost".into(),
            port: 81,
        };
        assert!(resolve(&hp).await.unwrap().ip().is_loopback());
        let hp = HostPort {
            host: "no-such-host.invalid".into(),
            port: 81,
        };
        assert_eq!(
            resolve(&hp).await.unwrap_err().reason,
            RejectReason::Unresolvable
        );
    }
}
