//! Registry keys and values as etcd, the file source and the embedded
//! registry hand them to the LB: any bytes. Parsing must never panic, and
//! whatever it accepts must be usable (a host, a port 1-65535, a weight
//! 1-10000).
#![no_main]

use lb_server::internals::{parse_host_port, parse_key, parse_value, ValueOp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First line: a key; the rest: the value.
    let (key, value) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let key = String::from_utf8_lossy(key);
    if let Ok((service, instance)) = parse_key("/services/", &key) {
        assert!(!service.is_empty() && !instance.is_empty());
        assert!(service.len() <= 255);
    }
    match parse_value(value) {
        Ok(ValueOp::Add { addr, weight, .. }) => {
            assert!(!addr.host.is_empty());
            assert!(addr.port != 0);
            assert!((1..=10_000).contains(&weight));
        }
        Ok(ValueOp::Delete) | Err(_) => {}
    }
    if let Ok(text) = std::str::from_utf8(value) {
        let _ = parse_host_port(text);
    }
});
