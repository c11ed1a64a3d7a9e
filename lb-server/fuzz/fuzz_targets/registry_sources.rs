//! What the DNS, ZooKeeper and Consul sources read from outside: a
//! `--dns-service` value, a provider znode's name and data, a Consul health
//! answer. Byte 0 picks which; the rest is the input. Nothing may panic, and
//! every address accepted has a host and a port 1-65535.
#![no_main]

use lb_server::internals::{consul, dns, zookeeper};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(s) = dns::parse_service("svc", &text) {
                assert!(!s.name.is_empty());
                assert!(s.port != Some(0));
            }
        }
        1 => {
            let (node, value) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b""[..]),
            };
            let node = String::from_utf8_lossy(node);
            if let Ok((addr, weight, _)) = zookeeper::address_of(&node, value) {
                assert!(!addr.host.is_empty() && addr.port != 0);
                assert!((1..=10_000).contains(&weight));
            }
        }
        _ => {
            if let Ok(entries) = consul::parse_health("svc", rest) {
                for (key, address) in entries {
                    assert!(key.starts_with("svc/"));
                    if let Ok((addr, weight)) = address {
                        assert!(!addr.host.is_empty() && addr.port != 0);
                        assert!((1..=10_000).contains(&weight));
                    }
                }
            }
        }
    }
});
