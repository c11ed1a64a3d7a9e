//! Zones of clients that do not say theirs: a map from peer address ranges
//! to zones (`--client-zone 10.1.0.0/16=eu-west-1a`, repeatable). Stock
//! grpclb clients send nothing but the name they dial, but a platform
//! usually gives each zone its own subnets.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::Locality;

/// Address ranges and their zones; the longest matching prefix wins.
#[derive(Debug, Clone, Default)]
pub struct PeerZones {
    ranges: Vec<(IpNet, Locality)>,
}

impl PeerZones {
    /// Parses `CIDR=ZONE` or `CIDR=REGION/ZONE` entries.
    pub fn parse(entries: &[String]) -> anyhow::Result<Self> {
        let mut ranges = Vec::new();
        for e in entries {
            let (net, zone) = e.split_once('=').ok_or_else(|| {
                anyhow::anyhow!(
                    "--client-zone {e:?}: expected CIDR=ZONE, e.g. 10.1.0.0/16=eu-west-1a"
                )
            })?;
            let net: IpNet = match net.trim().parse() {
                Ok(n) => n,
                Err(_) => net.trim().parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                    anyhow::anyhow!("--client-zone {e:?}: {net:?} is not an address range (CIDR)")
                })?,
            };
            let (region, zone) = zone.trim().rsplit_once('/').unwrap_or(("", zone.trim()));
            let locality = Locality::new(region, zone);
            anyhow::ensure!(
                locality.is_known(),
                "--client-zone {e:?}: the zone is empty"
            );
            ranges.push((net.trunc(), locality));
        }
        ranges.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        Ok(PeerZones { ranges })
    }

    /// The zone of a client at `ip`, if a range holds it (IPv4-mapped IPv6
    /// addresses match IPv4 ranges).
    pub fn zone_of(&self, ip: IpAddr) -> Option<&Locality> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.ranges
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, l)| l)
    }

    /// Whether any range is configured.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins_and_junk_is_an_error() {
        let z = PeerZones::parse(&[
            "127.0.0.0/8=a".into(),
            "127.0.0.2/32=eu/b".into(),
            "::1=c".into(),
        ])
        .unwrap();
        assert_eq!(z.zone_of("127.0.0.9".parse().unwrap()).unwrap().zone, "a");
        let b = z.zone_of("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!((b.region.as_str(), b.zone.as_str()), ("eu", "b"));
        assert_eq!(
            z.zone_of("::ffff:127.0.0.2".parse().unwrap()).unwrap().zone,
            "b"
        );
        assert_eq!(z.zone_of("::1".parse().unwrap()).unwrap().zone, "c");
        assert!(z.zone_of("10.0.0.1".parse().unwrap()).is_none());
        for bad in ["127.0.0.1", "nonsense=a", "10.0.0.0/8="] {
            assert!(PeerZones::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
