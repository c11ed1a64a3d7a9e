//! Zone views, pure: what a plan's row does to a service's list.
//!
//! A backend's capacity is its number of entries in the service's list
//! (the policy's weight: registry weight, ORCA, slow start). A zone's
//! capacity is the sum over its backends. A client zone's list gives each
//! destination zone its planned fraction of the entries, split among the
//! zone's backends in proportion to their own entries, in the same smooth
//! order the policy uses; drop entries (shedding) keep their fraction. The
//! backends left out are the view's failover (xDS priority 1).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use lb_proto::grpc::lb::v1::Server;

use super::plan::Destination;
use crate::policy;
use crate::snapshot::PublishedList;

/// Destinations below this fraction of a row are left out (a backend
/// cannot have less than one entry, so a sliver would be overweighted).
const MIN_FRACTION: f64 = 0.01;

/// Each listed backend once, with its entries, in list order.
fn backends(list: &PublishedList) -> Vec<(Server, u32)> {
    let mut out: Vec<(Server, u32)> = Vec::new();
    let mut at: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for s in list.servers.iter().filter(|s| !s.drop) {
        let Some(addr) = s.socket_addr() else {
            continue;
        };
        match at.get(&addr) {
            Some(&k) => out[k].1 += 1,
            None => {
                at.insert(addr, out.len());
                out.push((s.clone(), 1));
            }
        }
    }
    out
}

fn zone_of<'a>(list: &'a PublishedList, s: &Server) -> (&'a str, &'a str) {
    s.socket_addr()
        .and_then(|a| list.localities.get(&a))
        .map(|l| (l.zone.as_str(), l.region.as_str()))
        .unwrap_or(("", ""))
}

/// The backend zones of `list`, with their capacity and healthy backends.
pub fn destinations(list: &PublishedList) -> Vec<Destination> {
    let mut zones: BTreeMap<&str, Destination> = BTreeMap::new();
    for (s, n) in backends(list) {
        let (zone, region) = zone_of(list, &s);
        let d = zones.entry(zone).or_insert_with(|| Destination {
            zone: zone.to_string(),
            region: region.to_string(),
            capacity: 0.0,
            healthy: 0,
        });
        d.capacity += n as f64;
        d.healthy += 1;
    }
    zones.into_values().collect()
}

/// The servers of a client zone whose plan row is `row`, and the failover
/// set; the service's own list when the row is empty or in panic mode.
pub fn view(
    list: &PublishedList,
    row: &BTreeMap<String, f64>,
    max_len: usize,
) -> (Vec<Server>, Vec<Server>) {
    let kept: BTreeMap<&str, f64> = row
        .iter()
        .filter(|(_, f)| **f >= MIN_FRACTION)
        .map(|(z, f)| (z.as_str(), *f))
        .collect();
    let all = backends(list);
    if list.panic || kept.is_empty() || all.is_empty() {
        return (list.servers.clone(), Vec::new());
    }
    let mut zone_entries: BTreeMap<&str, f64> = BTreeMap::new();
    for (s, n) in &all {
        *zone_entries.entry(zone_of(list, s).0).or_default() += *n as f64;
    }
    let total: f64 = kept
        .iter()
        .filter(|(z, _)| zone_entries.contains_key(*z))
        .map(|(_, f)| f)
        .sum();
    if total <= 0.0 {
        return (list.servers.clone(), Vec::new());
    }
    let (mut chosen, mut weights, mut failover) = (Vec::new(), Vec::new(), Vec::new());
    for (s, n) in all {
        let zone = zone_of(list, &s).0;
        match kept.get(zone) {
            Some(f) => {
                weights.push(f / total * n as f64 / zone_entries[zone]);
                chosen.push(s);
            }
            None => failover.push((s, n)),
        }
    }
    let entries = policy::entries(&weights, max_len);
    let mut servers = policy::ordered(chosen.into_iter().zip(entries).collect());
    if list.shed_fraction > 0.0 {
        policy::with_drops(&mut servers, list.shed_fraction);
    }
    (servers, policy::ordered(failover))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Locality;

    fn list(zones: &[(&str, u32)]) -> PublishedList {
        let mut servers = Vec::new();
        let mut localities = BTreeMap::new();
        for (i, (zone, entries)) in zones.iter().enumerate() {
            let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
            for _ in 0..*entries {
                servers.push(Server::at(addr, format!("t{i}")));
            }
            if !zone.is_empty() {
                localities.insert(addr, Locality::new("r", zone));
            }
        }
        PublishedList::new(1, servers, false, 0.0).with_localities(Arc::new(localities))
    }

    fn share(servers: &[Server], list: &PublishedList, zone: &str) -> f64 {
        let n = servers
            .iter()
            .filter(|s| !s.drop && zone_of(list, s).0 == zone)
            .count();
        n as f64 / servers.len() as f64
    }

    #[test]
    fn destinations_sum_entries_per_zone() {
        let l = list(&[("a", 2), ("a", 1), ("b", 3), ("", 1)]);
        let d = destinations(&l);
        let caps: Vec<(&str, f64, usize)> = d
            .iter()
            .map(|d| (d.zone.as_str(), d.capacity, d.healthy))
            .collect();
        assert_eq!(caps, vec![("", 1.0, 1), ("a", 3.0, 2), ("b", 3.0, 1)]);
    }

    #[test]
    fn a_row_becomes_entry_shares_and_the_rest_failover() {
        let l = list(&[("a", 1), ("a", 1), ("a", 1), ("b", 1), ("b", 1), ("c", 1)]);
        let row = BTreeMap::from([("a".to_string(), 0.6), ("b".to_string(), 0.4)]);
        let (servers, failover) = view(&l, &row, 256);
        assert!((share(&servers, &l, "a") - 0.6).abs() < 0.02, "{servers:?}");
        assert!((share(&servers, &l, "b") - 0.4).abs() < 0.02);
        assert_eq!(failover.len(), 1);
        assert_eq!(zone_of(&l, &failover[0]).0, "c");
    }

    #[test]
    fn slivers_are_left_out_and_panic_keeps_the_whole_list() {
        let l = list(&[("a", 1), ("b", 1)]);
        let row = BTreeMap::from([("a".to_string(), 0.995), ("b".to_string(), 0.005)]);
        let (servers, failover) = view(&l, &row, 256);
        assert_eq!(servers.len(), 1);
        assert_eq!(failover.len(), 1);
        let mut p = list(&[("a", 1), ("b", 1)]);
        p.panic = true;
        assert_eq!(view(&p, &row, 256).0.len(), 2);
    }
}
