//! A witness's opinion: what a replica that does not own a backend finds
//! when it probes it because the owner finds it silent, as stored in etcd
//! under `<prefix>opinions/<service>/<addr>/<replica>` (on the witness's
//! lease, so a dead witness's opinions go with it).
//!
//! Silence is the one verdict that may be the owner's path only (a
//! partition between that replica and part of the fleet). A second view
//! settles it: the witness finds the backend silent too (the removal is
//! confirmed) or serving (the backend stays listed); see
//! [`crate::policy`].

use std::net::SocketAddr;

use super::BackendKey;
use crate::model::HealthState;

/// One witness's result for a backend.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Opinion {
    /// What the witness's probe found.
    pub health: HealthState,
    /// Detail of it (status or error text).
    pub detail: String,
}

/// The etcd key of `replica`'s opinion of `service` at `addr`.
pub fn key(prefix: &str, service: &str, addr: SocketAddr, replica: &str) -> String {
    format!("{prefix}opinions/{service}/{addr}/{replica}")
}

/// Splits an opinion key back into the backend and the witness's id.
pub fn parse_key(prefix: &str, key: &str) -> Option<(BackendKey, String)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("opinions/")?;
    let (backend, replica) = rest.rsplit_once('/')?;
    let (service, addr) = backend.rsplit_once('/')?;
    if replica.is_empty() || service.is_empty() {
        return None;
    }
    Some((
        (service.to_string(), addr.parse().ok()?),
        replica.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_even_with_slashes_in_names() {
        let addr: SocketAddr = "[::1]:8080".parse().unwrap();
        let k = key("/lb/", "team/greeter", addr, "lb-2");
        assert_eq!(k, "/lb/opinions/team/greeter/[::1]:8080/lb-2");
        assert_eq!(
            parse_key("/lb/", &k),
            Some((("team/greeter".into(), addr), "lb-2".into()))
        );
        assert_eq!(parse_key("/lb/", "/lb/health/svc/127.0.0.1:80"), None);
        assert_eq!(parse_key("/lb/", "/lb/opinions/svc/127.0.0.1:80/"), None);
        assert_eq!(parse_key("/lb/", "/lb/opinions/svc/nope/lb-2"), None);
    }
}
