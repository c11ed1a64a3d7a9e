//! A replica's word on a backend another replica may own, one key per
//! replica: a witness's opinion and a gray-failure vote.
//!
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

/// Where witnesses' opinions live under the cluster prefix.
pub const OPINIONS: &str = "opinions/";

/// Where replicas' gray-failure votes live under the cluster prefix
/// ([`crate::gray::shared`]).
pub const VOTES: &str = "gray/";

/// The etcd key of `replica`'s word (under `dir`: [`OPINIONS`], [`VOTES`])
/// on `service` at `addr`.
pub fn key(prefix: &str, dir: &str, service: &str, addr: SocketAddr, replica: &str) -> String {
    format!("{prefix}{dir}{service}/{addr}/{replica}")
}

/// Splits a key of [`key`] back into the backend and the replica's id.
pub fn parse_key(prefix: &str, dir: &str, key: &str) -> Option<(BackendKey, String)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(dir)?;
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
        let k = key("/lb/", OPINIONS, "team/greeter", addr, "lb-2");
        assert_eq!(k, "/lb/opinions/team/greeter/[::1]:8080/lb-2");
        assert_eq!(
            parse_key("/lb/", OPINIONS, &k),
            Some((("team/greeter".into(), addr), "lb-2".into()))
        );
        assert_eq!(parse_key("/lb/", VOTES, &k), None);
        assert_eq!(
            parse_key("/lb/", OPINIONS, "/lb/health/svc/127.0.0.1:80"),
            None
        );
        assert_eq!(
            parse_key("/lb/", OPINIONS, "/lb/opinions/svc/127.0.0.1:80/"),
            None
        );
        assert_eq!(
            parse_key("/lb/", OPINIONS, "/lb/opinions/svc/nope/lb-2"),
            None
        );
        let v = key("/lb/", VOTES, "svc", addr, "lb-1");
        assert_eq!(v, "/lb/gray/svc/[::1]:8080/lb-1");
        assert_eq!(
            parse_key("/lb/", VOTES, &v),
            Some((("svc".into(), addr), "lb-1".into()))
        );
    }
}
