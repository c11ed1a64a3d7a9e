//! EndpointSlices → instances, as a pure function of the slices a service
//! has now (so one slice changing recomputes its service from all of its
//! slices: a pod moving between slices is never lost or doubled).
//!
//! Rules, from the `discovery.k8s.io/v1` API reference:
//! - a slice belongs to the Service named by its `kubernetes.io/service-name`
//!   label; the LB's service is `<service>.<namespace>`;
//! - an endpoint is listed when `conditions.ready` is true (absent counts as
//!   true) and it is not `terminating`: a terminating pod leaves the lists
//!   as soon as the kubelet marks it, before it stops serving;
//! - the port is the slice's port named `--k8s-port`, or its only port;
//! - `zone` becomes the backend's zone (the zones feature reads it), and
//!   `nodeName` and the target pod go into the metadata operators see;
//! - `FQDN` address types, and slices without a usable port, are rejected
//!   (counted and logged), never half-used.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{Instance, RejectReason, Rejected};

/// The label naming a slice's Service.
pub const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// A slice, reduced to what lists are made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    /// `<service>.<namespace>`.
    pub service: String,
    /// `<namespace>/<slice name>`, for rejections.
    pub key: String,
    /// Its endpoints, usable or not.
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint address of a slice.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Address and the chosen port.
    pub addr: SocketAddr,
    /// Listed: ready and not terminating.
    pub usable: bool,
    /// Its zone (empty when unknown).
    pub zone: String,
    /// The node it runs on.
    pub node: String,
    /// The pod behind it.
    pub pod: String,
}

/// The `(namespace, name)` of a slice.
pub fn id(slice: &EndpointSlice) -> (String, String) {
    (
        slice.metadata.namespace.clone().unwrap_or_default(),
        slice.metadata.name.clone().unwrap_or_default(),
    )
}

/// Reads one slice; `port_name` picks the port (empty: the only one).
/// `Ok(None)`: a slice of no Service (ignored).
pub fn parse(slice: &EndpointSlice, port_name: &str) -> Result<Option<Slice>, Rejected> {
    let (namespace, name) = id(slice);
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_LABEL))
        .filter(|s| !s.is_empty())
    else {
        return Ok(None);
    };
    let key = format!("{namespace}/{name}");
    let reject = |reason, detail: String| Rejected { reason, detail };
    if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
        return Err(reject(
            RejectReason::BadAddress,
            format!(
                "addressType {:?}: only IPv4 and IPv6 slices can be listed",
                slice.address_type
            ),
        ));
    }
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = if port_name.is_empty() {
        match ports {
            [only] => only.port,
            [] => None,
            _ => {
                return Err(reject(
                    RejectReason::BadValue,
                    format!(
                        "{} ports ({}): name the gRPC one with --k8s-port",
                        ports.len(),
                        ports
                            .iter()
                            .filter_map(|p| p.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        }
    } else {
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| p.port)
    };
    let port = port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            reject(
                RejectReason::BadAddress,
                if port_name.is_empty() {
                    "no port".to_string()
                } else {
                    format!("no port named {port_name:?}")
                },
            )
        })?;
    let mut endpoints = Vec::new();
    for e in &slice.endpoints {
        let conditions = e.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        for address in &e.addresses {
            let ip: IpAddr = address.parse().map_err(|_| {
                reject(
                    RejectReason::BadAddress,
                    format!("endpoint address {address:?} is not an IP address"),
                )
            })?;
            endpoints.push(Endpoint {
                addr: SocketAddr::new(ip, port),
                usable: ready && !terminating,
                zone: e.zone.clone().unwrap_or_default(),
                node: e.node_name.clone().unwrap_or_default(),
                pod: e
                    .target_ref
                    .as_ref()
                    .and_then(|t| t.name.clone())
                    .unwrap_or_default(),
            });
        }
    }
    Ok(Some(Slice {
        service: format!("{service}.{namespace}"),
        key,
        endpoints,
    }))
}

/// Slices grouped by service, in one pass (a listing of every slice turns
/// into every service's instances without a walk per service).
pub fn by_service<'a>(
    slices: impl Iterator<Item = &'a Slice>,
) -> BTreeMap<&'a str, Vec<&'a Slice>> {
    let mut groups: BTreeMap<&str, Vec<&Slice>> = BTreeMap::new();
    for s in slices {
        groups.entry(s.service.as_str()).or_default().push(s);
    }
    groups
}

/// The instances of one service from all of its slices: each usable
/// address once (a pod in two slices during a move is one backend).
pub fn instances<'a>(
    service: &str,
    slices: impl Iterator<Item = &'a Slice>,
    now: SystemTime,
) -> Vec<Instance> {
    let mut by_addr: BTreeMap<SocketAddr, &Endpoint> = BTreeMap::new();
    for s in slices.filter(|s| s.service == service) {
        for e in s.endpoints.iter().filter(|e| e.usable) {
            by_addr.entry(e.addr).or_insert(e);
        }
    }
    by_addr
        .into_iter()
        .map(|(addr, e)| {
            let mut meta = serde_json::Map::new();
            for (k, v) in [("zone", &e.zone), ("node", &e.node), ("pod", &e.pod)] {
                if !v.is_empty() {
                    meta.insert(k.into(), v.clone().into());
                }
            }
            Instance {
                service: service.to_string(),
                key: format!("{service}/{addr}"),
                addr,
                weight: 1,
                metadata: (!meta.is_empty()).then_some(serde_json::Value::Object(meta)),
                registered_at: now,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    fn greeter(endpoints: serde_json::Value, ports: serde_json::Value) -> EndpointSlice {
        slice(serde_json::json!({
            "metadata": {"name": "greeter-abc", "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "greeter"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }))
    }

    #[test]
    fn ready_endpoints_are_listed_and_terminating_ones_leave() {
        let s = greeter(
            serde_json::json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "a", "nodeName": "n1",
                 "targetRef": {"kind": "Pod", "name": "greeter-1"}},
                {"addresses": ["10.0.0.2"]},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false}},
            ]),
            serde_json::json!([{"name": "grpc", "port": 50051}]),
        );
        let parsed = parse(&s, "").unwrap().unwrap();
        assert_eq!(parsed.service, "greeter.prod");
        let list = instances("greeter.prod", [parsed].iter(), SystemTime::now());
        let addrs: Vec<String> = list.iter().map(|i| i.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:50051", "10.0.0.2:50051"]);
        assert_eq!(list[0].metadata.as_ref().unwrap()["zone"], "a");
        assert_eq!(list[0].metadata.as_ref().unwrap()["pod"], "greeter-1");
    }

    #[test]
    fn ports_are_chosen_by_name() {
        let ports =
            serde_json::json!([{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 50051}]);
        let s = greeter(serde_json::json!([{"addresses": ["10.0.0.1"]}]), ports);
        assert_eq!(
            parse(&s, "grpc").unwrap().unwrap().endpoints[0].addr.port(),
            50051
        );
        let e = parse(&s, "").unwrap_err();
        assert!(e.detail.contains("--k8s-port"), "{}", e.detail);
        assert!(parse(&s, "http")
            .unwrap_err()
            .detail
            .contains("no port named \"http\""));
    }

    #[test]
    fn bad_slices_are_rejected_and_unowned_ones_ignored() {
        let mut fqdn = greeter(
            serde_json::json!([{"addresses": ["a.example"]}]),
            serde_json::json!([{"port": 80}]),
        );
        fqdn.address_type = "FQDN".into();
        assert_eq!(
            parse(&fqdn, "").unwrap_err().reason,
            RejectReason::BadAddress
        );
        let bad_ip = greeter(
            serde_json::json!([{"addresses": ["not-an-ip"]}]),
            serde_json::json!([{"port": 80}]),
        );
        assert!(parse(&bad_ip, "").is_err());
        let mut unowned = greeter(serde_json::json!([]), serde_json::json!([]));
        unowned.metadata.labels = None;
        assert_eq!(parse(&unowned, "").unwrap(), None);
    }

    #[test]
    fn slices_group_by_service_in_one_pass() {
        let one = |service: &str, ip: &str| Slice {
            service: service.into(),
            key: format!("prod/{service}-{ip}"),
            endpoints: vec![Endpoint {
                addr: SocketAddr::new(ip.parse().unwrap(), 80),
                usable: true,
                zone: String::new(),
                node: String::new(),
                pod: String::new(),
            }],
        };
        let all = [
            one("b.prod", "10.0.0.1"),
            one("a.prod", "10.0.0.2"),
            one("b.prod", "10.0.0.3"),
        ];
        let groups = by_service(all.iter());
        assert_eq!(
            groups.keys().copied().collect::<Vec<_>>(),
            ["a.prod", "b.prod"]
        );
        assert_eq!(groups["b.prod"].len(), 2);
        let now = SystemTime::now();
        for (service, group) in groups {
            assert_eq!(
                instances(service, group.into_iter(), now),
                instances(service, all.iter(), now),
                "{service}"
            );
        }
    }

    #[test]
    fn a_pod_in_two_slices_is_one_backend() {
        let a = parse(
            &greeter(
                serde_json::json!([{"addresses": ["10.0.0.1"]}]),
                serde_json::json!([{"port": 80}]),
            ),
            "",
        )
        .unwrap()
        .unwrap();
        let mut b = a.clone();
        b.key = "prod/greeter-def".into();
        assert_eq!(
            instances("greeter.prod", [a, b].iter(), SystemTime::now()).len(),
            1
        );
    }
}
