//! Parsing of registry keys and values.
//!
//! Two value layouts are read, whatever the source:
//! - etcd's official naming format (as written by go.etcd.io's
//!   `naming/endpoints`): `{"Op":0,"Addr":"host:port","Metadata":…}`;
//! - the plain layout: `host:port`.
//!
//! Keys are `<prefix><service>/<instance>`. Anything else is rejected with a
//! [`RejectReason`](crate::model::RejectReason); callers log and count it and keep what they knew.

use serde::Deserialize;

use super::resolve::{self, HostPort};
use crate::model::{RejectReason, Rejected};

/// Largest value accepted, in bytes. Registry values are an address and a
/// little metadata; anything bigger is a mistake or an attack.
pub const MAX_VALUE_LEN: usize = 16 * 1024;

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Longest service name accepted, in bytes.
pub const MAX_SERVICE_LEN: usize = lb_proto::ext::MAX_SERVICE_NAME_LEN;

/// What a value asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueOp {
    /// The instance serves at this address.
    Add {
        /// Where.
        addr: HostPort,
        /// Metadata (naming JSON only).
        metadata: Option<serde_json::Value>,
        /// Weight from `Metadata.weight`, 1 if unset.
        weight: u32,
    },
    /// Naming JSON with `"Op":1`: the instance is gone.
    Delete,
}

/// Splits `key` into `(service, instance)` after stripping `prefix`.
pub fn parse_key(prefix: &str, key: &str) -> Result<(String, String), Rejected> {
    if key.len() > MAX_KEY_LEN {
        return Err(Rejected::new(
            RejectReason::BadKey,
            format!("key is {} bytes, limit {MAX_KEY_LEN}", key.len()),
        ));
    }
    let rest = key.strip_prefix(prefix).ok_or_else(|| {
        Rejected::new(
            RejectReason::BadKey,
            format!("key does not start with prefix {prefix:?}"),
        )
    })?;
    let (service, instance) = rest.rsplit_once('/').ok_or_else(|| {
        Rejected::new(
            RejectReason::BadKey,
            "key is not <prefix><service>/<instance>",
        )
    })?;
    let service = service.trim_matches('/');
    if service.is_empty() || instance.is_empty() {
        return Err(Rejected::new(
            RejectReason::BadKey,
            "empty service or instance in key",
        ));
    }
    if !service.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Rejected::new(
            RejectReason::BadKey,
            "service name has non-printable or non-ASCII characters",
        ));
    }
    if service.len() > MAX_SERVICE_LEN {
        return Err(Rejected::new(
            RejectReason::BadKey,
            format!("service name is longer than {MAX_SERVICE_LEN} bytes"),
        ));
    }
    Ok((service.to_string(), instance.to_string()))
}

#[derive(Deserialize)]
struct NamingUpdate {
    #[serde(rename = "Op", default)]
    op: u8,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata", default)]
    metadata: Option<serde_json::Value>,
}

/// Parses a registry value in either layout.
pub fn parse_value(value: &[u8]) -> Result<ValueOp, Rejected> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Rejected::new(
            RejectReason::TooLarge,
            format!("value is {} bytes, limit {MAX_VALUE_LEN}", value.len()),
        ));
    }
    let text = std::str::from_utf8(value)
        .map_err(|_| Rejected::new(RejectReason::BadValue, "value is not UTF-8"))?;
    let text = text.trim();
    if text.starts_with('{') {
        let update: NamingUpdate = serde_json::from_str(text).map_err(|e| {
            Rejected::new(
                RejectReason::BadValue,
                format!("not etcd naming JSON {{\"Op\":0,\"Addr\":…}}: {e}"),
            )
        })?;
        return match update.op {
            0 => {
                let weight = update
                    .metadata
                    .as_ref()
                    .map(weight_of)
                    .transpose()?
                    .unwrap_or(1);
                Ok(ValueOp::Add {
                    addr: parse_host_port(&update.addr)?,
                    metadata: update.metadata,
                    weight,
                })
            }
            1 => Ok(ValueOp::Delete),
            op => Err(Rejected::new(
                RejectReason::BadValue,
                format!("unknown naming Op {op} (0 = add, 1 = delete)"),
            )),
        };
    }
    Ok(ValueOp::Add {
        addr: parse_host_port(text)?,
        metadata: None,
        weight: 1,
    })
}

fn weight_of(metadata: &serde_json::Value) -> Result<u32, Rejected> {
    match metadata.get("weight") {
        None | Some(serde_json::Value::Null) => Ok(1),
        Some(w) => w
            .as_u64()
            .filter(|w| (1..=10_000).contains(w))
            .map(|w| w as u32)
            .ok_or_else(|| {
                Rejected::new(
                    RejectReason::BadValue,
                    format!("Metadata.weight {w} is not an integer 1..=10000"),
                )
            }),
    }
}

/// Parses `host:port`, `ip:port` or `[ipv6]:port`.
pub fn parse_host_port(s: &str) -> Result<HostPort, Rejected> {
    let bad = |why: &str| Rejected::new(RejectReason::BadAddress, format!("{s:?}: {why}"));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| bad("expected [ipv6]:port"))?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address in brackets"))?;
        (host, port)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| bad("expected host:port"))?
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(bad("host has characters not allowed in a host name"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("port is not a number 1-65535"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_service_and_instance() {
        assert_eq!(
            parse_key("/services/", "/services/greeter/127.0.0.1:5000").unwrap(),
            ("greeter".into(), "127.0.0.1:5000".into())
        );
        assert_eq!(
            parse_key("/services/", "/services/a/b/i1").unwrap(),
            ("a/b".into(), "i1".into())
        );
        assert_eq!(
            parse_key("/s/", "/other/x/y").unwrap_err().reason,
            RejectReason::BadKey
        );
        assert_eq!(
            parse_key("/s/", "/s/lonely").unwrap_err().reason,
            RejectReason::BadKey
        );
        assert_eq!(
            parse_key("/s/", "/s//i").unwrap_err().reason,
            RejectReason::BadKey
        );
    }

    #[test]
    fn both_value_layouts_parse() {
        let plain = parse_value(b"127.0.0.1:5000").unwrap();
        assert_eq!(
            plain,
            ValueOp::Add {
                addr: HostPort {
                    host: "127.0.0.1".into(),
                    port: 5000
                },
                metadata: None,
                weight: 1
            }
        );
        let json =
            parse_value(br#"{"Op":0,"Addr":"localhost:6000","Metadata":{"weight":3}}"#).unwrap();
        match json {
            ValueOp::Add { addr, weight, .. } => {
                assert_eq!(
                    addr,
                    HostPort {
                        host: "localhost".into(),
                        port: 6000
                    }
                );
                assert_eq!(weight, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            parse_value(br#"{"Op":1,"Addr":"1.2.3.4:5"}"#).unwrap(),
            ValueOp::Delete
        );
        assert_eq!(
            parse_value(b"[::1]:7000").unwrap(),
            ValueOp::Add {
                addr: HostPort {
                    host: "::1".into(),
                    port: 7000
                },
                metadata: None,
                weight: 1
            }
        );
    }

    #[test]
    fn junk_is_rejected_with_a_reason() {
        for (value, reason) in [
            (&b"not an address"[..], RejectReason::BadAddress),
            (b"{\"Op\":0}", RejectReason::BadValue),
            (b"{broken json", RejectReason::BadValue),
            (b"host:99999", RejectReason::BadAddress),
            (b"host:0", RejectReason::BadAddress),
            (b":80", RejectReason::BadAddress),
            (b"\xff\xfe", RejectReason::BadValue),
            (br#"{"Op":7,"Addr":"a:1"}"#, RejectReason::BadValue),
            (
                br#"{"Op":0,"Addr":"a:1","Metadata":{"weight":-2}}"#,
                RejectReason::BadValue,
            ),
            (b"ho st:80", RejectReason::BadAddress),
        ] {
            assert_eq!(
                parse_value(value).unwrap_err().reason,
                reason,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        let huge = vec![b'a'; MAX_VALUE_LEN + 1];
        assert_eq!(
            parse_value(&huge).unwrap_err().reason,
            RejectReason::TooLarge
        );
    }
}

/// A fully decoded key/value pair, ready for the catalog.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Add or update this instance.
    Upsert(super::Instance),
    /// Remove the instance under this key.
    Delete,
}

/// Parses key and value and resolves the address.
pub async fn decode(prefix: &str, key: &str, value: &[u8]) -> Result<Decoded, Rejected> {
    let (service, _instance) = parse_key(prefix, key)?;
    match parse_value(value)? {
        ValueOp::Delete => Ok(Decoded::Delete),
        ValueOp::Add {
            addr,
            metadata,
            weight,
        } => {
            let addr = resolve::resolve(&addr).await?;
            Ok(Decoded::Upsert(super::Instance {
                service,
                key: key.to_string(),
                addr,
                weight,
                metadata,
                registered_at: std::time::SystemTime::now(),
            }))
        }
    }
}
