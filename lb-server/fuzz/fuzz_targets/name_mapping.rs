//! The name in a client's initial request (any string up to the protocol's
//! limit) mapped to a service: never panics, the first candidate is the
//! name without its port, and every candidate is a substring of the name
//! or a configured alias.
#![no_main]

use lb_server::internals::{strip_port, NameMapper};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|name: &str| {
    let mapper = NameMapper::new(
        [
            ("hello".to_string(), "greeter".to_string()),
            ("[::1]".to_string(), "v6".to_string()),
        ],
        [
            ".svc.test".to_string(),
            "example".to_string(),
            ".".to_string(),
        ],
    );
    let candidates = mapper.candidates(name);
    assert_eq!(candidates[0], strip_port(name.trim()));
    for c in &candidates {
        assert!(
            name.contains(c.as_str()) || c == "greeter" || c == "v6",
            "{c:?} from {name:?}"
        );
    }
    let _ = mapper.resolve(name, |s| s == "greeter");
});
