//! Policy: turns a service's backends into the ordered server list that
//! clients walk.
//!
//! Clients consume a grpclb list in order, duplicates included, so weights
//! are expressed by repetition. The order is smooth weighted round robin
//! (the sequence nginx uses): a backend of weight 3 next to one of weight 1
//! gives `A A B A`, never a burst. Equal weights give each backend once.
//! The order depends only on the backends (sorted by token), so every LB
//! replica sends the same list for the same backends.

use std::net::{IpAddr, SocketAddr};

use lb_proto::grpc::lb::v1::Server;

/// What the policy needs to know about one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<'a> {
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its stable load-balance token.
    pub token: &'a str,
    /// Relative weight, ≥ 1.
    pub weight: u32,
}

/// List-building settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Longest list produced; weights are scaled down to fit.
    pub max_list_len: usize,
}

impl Policy {
    /// Builds the ordered list for `candidates`. Backends sharing an address
    /// are listed once (with the larger weight).
    pub fn build(&self, candidates: &[Candidate<'_>]) -> Vec<Server> {
        let mut unique: Vec<Candidate<'_>> = Vec::with_capacity(candidates.len());
        for c in candidates {
            match unique.iter_mut().find(|u| u.addr == c.addr) {
                Some(u) => u.weight = u.weight.max(c.weight),
                None => unique.push(c.clone()),
            }
        }
        unique.sort_by(|a, b| a.token.cmp(b.token).then(a.addr.cmp(&b.addr)));
        let weights = scale_weights(
            &unique.iter().map(|c| c.weight.max(1)).collect::<Vec<_>>(),
            self.max_list_len,
        );
        smooth_order(&weights)
            .into_iter()
            .map(|i| server(&unique[i]))
            .collect()
    }
}

/// Reduces weights by their common divisor, then scales them down (keeping
/// every weight ≥ 1) until their sum fits `max_len`.
fn scale_weights(weights: &[u32], max_len: usize) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u32> = weights.iter().map(|w| w / g).collect();
    let total: u64 = w.iter().map(|&x| x as u64).sum();
    let max_len = max_len.max(weights.len()) as u64;
    if total > max_len {
        let room = max_len - w.len() as u64;
        let over: u64 = w.iter().map(|&x| x as u64 - 1).sum();
        w = w
            .iter()
            .map(|&x| 1 + ((x as u64 - 1) * room / over.max(1)) as u32)
            .collect();
    }
    w
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Smooth weighted round robin: the index sequence of one full cycle.
fn smooth_order(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

fn server(c: &Candidate<'_>) -> Server {
    let ip_address = match c.addr.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    Server {
        ip_address,
        port: c.addr.port() as i32,
        load_balance_token: c.token.to_string(),
        drop: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(port: u16, token: &str, weight: u32) -> Candidate<'_> {
        Candidate {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            token,
            weight,
        }
    }

    fn ports(list: &[Server]) -> Vec<i32> {
        list.iter().map(|s| s.port).collect()
    }

    #[test]
    fn equal_weights_list_each_backend_once_in_token_order() {
        let p = Policy { max_list_len: 100 };
        let list = p.build(&[cand(3, "c", 1), cand(1, "a", 1), cand(2, "b", 1)]);
        assert_eq!(ports(&list), vec![1, 2, 3]);
        assert_eq!(list[0].ip_address, vec![127, 0, 0, 1]);
        assert_eq!(list[0].load_balance_token, "a");
        assert!(!list[0].drop);
    }

    #[test]
    fn weights_repeat_smoothly() {
        let p = Policy { max_list_len: 100 };
        let list = p.build(&[cand(1, "a", 3), cand(2, "b", 1)]);
        assert_eq!(ports(&list), vec![1, 1, 2, 1]);
        let list = p.build(&[cand(1, "a", 5), cand(2, "b", 1), cand(3, "c", 1)]);
        assert_eq!(ports(&list), vec![1, 1, 2, 1, 3, 1, 1]);
        // Common divisors are removed: 4:2 is 2:1.
        assert_eq!(p.build(&[cand(1, "a", 4), cand(2, "b", 2)]).len(), 3);
    }

    #[test]
    fn long_lists_are_scaled_to_the_limit() {
        let p = Policy { max_list_len: 10 };
        let list = p.build(&[cand(1, "a", 1000), cand(2, "b", 1)]);
        assert!(list.len() <= 10, "{}", list.len());
        assert!(ports(&list).contains(&2));
    }

    #[test]
    fn duplicate_addresses_are_listed_once() {
        let p = Policy { max_list_len: 100 };
        let list = p.build(&[cand(1, "a", 1), cand(1, "a", 1), cand(2, "b", 1)]);
        assert_eq!(ports(&list), vec![1, 2]);
    }

    #[test]
    fn ipv6_addresses_are_16_bytes() {
        let p = Policy { max_list_len: 100 };
        let c = Candidate {
            addr: "[::1]:80".parse().unwrap(),
            token: "t",
            weight: 1,
        };
        assert_eq!(p.build(&[c])[0].ip_address.len(), 16);
    }
}
