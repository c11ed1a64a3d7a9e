//! Host name resolution for registry addresses.
//!
//! The grpclb protocol carries IP addresses only, so the LB resolves host
//! names when it reads them. IP literals are used as they are; names are
//! looked up through the system resolver with a time limit, IPv4 preferred.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::entry::{HostPort, RejectReason, Rejected};

/// Longest time one lookup may take before the entry is rejected.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Resolves `hp` to one socket address.
pub async fn resolve(hp: &HostPort) -> Result<SocketAddr, Rejected> {
    if let Ok(ip) = hp.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, hp.port));
    }
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
