//! Rendezvous (highest-random-weight) hashing with a stable hash.
//!
//! Used wherever replicas or clients must agree on a choice without talking
//! to each other: which replica health-checks a backend
//! ([`crate::cluster`]), and the order in which a client prefers backends
//! ([`crate::streams::subsets`]). The hash is FNV-1a followed by the SplitMix64
//! finalizer: fixed by this file, so replicas built by different compilers
//! still agree (unlike `std`'s `DefaultHasher`, whose algorithm may change).

use std::hash::Hasher;

/// A well-mixed, stable 64-bit hash of `bytes`.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    mix(h.finish())
}

/// The SplitMix64 finalizer: spreads every input bit over the output.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The score of `candidate` for `key`: the highest score wins.
pub fn score(key: u64, candidate: &str) -> u64 {
    mix(key ^ hash(candidate.as_bytes()))
}

/// The candidate with the highest score for `key`; ties (practically
/// impossible) go to the smaller name, so every caller picks the same one.
pub fn winner<'a>(key: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let k = hash(key.as_bytes());
    candidates
        .into_iter()
        .max_by(|a, b| score(k, a).cmp(&score(k, b)).then_with(|| b.cmp(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_winner_does_not_depend_on_order() {
        let a = ["r1", "r2", "r3", "r4"];
        let b = ["r4", "r2", "r1", "r3"];
        for key in ["svc|10.0.0.1:80", "svc|10.0.0.2:80", "x"] {
            assert_eq!(winner(key, a), winner(key, b));
        }
        assert_eq!(winner("k", std::iter::empty()), None);
    }

    #[test]
    fn removing_a_candidate_moves_only_its_keys() {
        let all = ["r1", "r2", "r3"];
        let left = ["r1", "r3"];
        for i in 0..1000 {
            let key = format!("svc|10.0.{}.{}:80", i / 256, i % 256);
            let before = winner(&key, all).unwrap();
            let after = winner(&key, left).unwrap();
            if before != "r2" {
                assert_eq!(before, after, "{key} moved although its owner stayed");
            }
        }
    }

    #[test]
    fn keys_spread_evenly() {
        let all = ["r1", "r2", "r3"];
        let mut counts = std::collections::HashMap::new();
        for i in 0..3000 {
            let key = format!("svc|10.0.{}.{}:80", i / 256, i % 256);
            *counts.entry(winner(&key, all).unwrap()).or_insert(0) += 1;
        }
        for (r, n) in counts {
            assert!((850..=1150).contains(&n), "{r} owns {n} of 3000");
        }
    }
}
