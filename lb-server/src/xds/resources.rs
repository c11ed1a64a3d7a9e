//! The four resources a proxyless gRPC client asks for, built from a
//! service name and its published list.
//!
//! A client dialing `xds:///NAME` walks a chain, each link by name:
//!
//! ```text
//! Listener NAME ──RDS──► RouteConfiguration NAME ──► Cluster SERVICE ──EDS──► ClusterLoadAssignment SERVICE
//! ```
//!
//! The Listener and RouteConfiguration keep the name the client dialed (with
//! or without a port), so that the route's virtual host matches the
//! authority the client sends; the Cluster and its assignment are named by
//! the service the name maps to, so that every alias of one service shares
//! them.
//!
//! The assignment says what the policy decided, in the form proxyless round
//! robin honours: round robin ignores endpoint weights but weights
//! *localities*, so each listed backend is its own locality (its zone and
//! region, and its address in `sub_zone`) whose `load_balancing_weight` is
//! the number of entries the policy gave it in the grpclb list. Envoy
//! weights endpoints, so the endpoint carries the same weight. Load
//! shedding becomes a `drop_overloads` entry. A client of known zone gets
//! its zone's list ([`crate::zones`]) at priority 0 and the service's other
//! backends at priority 1: a client whose zone list fails entirely fails
//! over by itself before the LB has said anything.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
    Cluster, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier, Address,
    AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Http2ProtocolOptions, Locality,
    SelfConfigSource, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    cluster_load_assignment::{policy::DropOverload, Policy},
    lb_endpoint::HostIdentifier,
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, RetryPolicy, Route,
    RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter::ConfigType, HttpConnectionManager,
    HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use lb_proto::grpc::lb::v1::Server;
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;

use crate::snapshot::PublishedList;
use crate::streams::names::strip_port;

/// The resource types served, in the order a client asks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// LDS: `envoy.config.listener.v3.Listener`.
    Listener,
    /// RDS: `envoy.config.route.v3.RouteConfiguration`.
    Route,
    /// CDS: `envoy.config.cluster.v3.Cluster`.
    Cluster,
    /// EDS: `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    Endpoint,
}

impl Kind {
    /// Every kind, in chain order.
    pub const ALL: [Kind; 4] = [Kind::Listener, Kind::Route, Kind::Cluster, Kind::Endpoint];

    /// The type URL on the wire.
    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoint => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        }
    }

    /// The kind of a type URL, if it is one served here.
    pub fn of_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// Short name for metrics and the admin API (`lds`, `rds`, `cds`, `eds`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Listener => "lds",
            Kind::Route => "rds",
            Kind::Cluster => "cds",
            Kind::Endpoint => "eds",
        }
    }

    /// Whether every response carries the whole requested set (LDS, CDS), so
    /// that a name left out of one means the resource does not exist.
    pub fn full_state(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }
}

/// A resource as it goes on the wire: an encoded `google.protobuf.Any`.
fn pack<T: prost::Name + prost::Message>(message: T) -> Bytes {
    pack_any(message).encode_to_vec().into()
}

/// An encoded `DiscoveryResponse` of already encoded resources: assembled
/// by copying, so that one assignment encoded for 10,000 streams is not
/// encoded 10,000 times.
pub fn response(version: &str, resources: &[Bytes], type_url: &str, nonce: &str) -> Bytes {
    let size = version.len()
        + type_url.len()
        + nonce.len()
        + 32
        + resources.iter().map(|r| r.len() + 6).sum::<usize>();
    let mut buf = BytesMut::with_capacity(size);
    let field = |tag: u32, bytes: &[u8], buf: &mut BytesMut| {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    };
    // DiscoveryResponse: version_info = 1, resources = 2, type_url = 4, nonce = 5.
    if !version.is_empty() {
        field(1, version.as_bytes(), &mut buf);
    }
    for r in resources {
        field(2, r, &mut buf);
    }
    field(4, type_url.as_bytes(), &mut buf);
    field(5, nonce.as_bytes(), &mut buf);
    buf.freeze()
}

/// Settings the built resources carry.
#[derive(Debug, Clone, Copy)]
pub struct ResourceSettings {
    /// Whether Clusters name this server as their LRS server
    /// (`lrs_server: {self: {}}`), so that C-core reports load back.
    pub lrs: bool,
    /// The Cluster's `connect_timeout` (Envoy uses it; gRPC ignores it).
    pub connect_timeout: Duration,
    /// Retries of a call that failed UNAVAILABLE (its backend died or its
    /// connection broke mid-call), on another backend; 0 = none. Said in
    /// the route (`retry_policy`, gRFC A44), as service meshes do by default.
    pub retries: u32,
    /// Whether Clusters carry [`outlier_detection`] (clients' own
    /// per-client ejection, for comparison with the LB's pooled one).
    pub outlier_detection: bool,
}

/// gRFC A50's outlier detection as gRPC documents its defaults: every
/// 10 s, a backend is ejected (30 s × times ejected; at most 10 % of the
/// cluster, and always at least one) when its success rate is 1.9 standard deviations below the
/// mean of at least 5 backends with 100 calls each in the interval, or
/// when 50 % of at least 50 calls failed (failure percentage, which gRPC
/// leaves off unless configured). Counted per client, per interval.
pub fn outlier_detection() -> OutlierDetection {
    let n = |v: u32| Some(UInt32Value { value: v });
    OutlierDetection {
        interval: Some(duration(Duration::from_secs(10))),
        base_ejection_time: Some(duration(Duration::from_secs(30))),
        max_ejection_time: Some(duration(Duration::from_secs(300))),
        max_ejection_percent: n(10),
        enforcing_success_rate: n(100),
        success_rate_minimum_hosts: n(5),
        success_rate_request_volume: n(100),
        success_rate_stdev_factor: n(1900),
        failure_percentage_threshold: n(50),
        enforcing_failure_percentage: n(100),
        failure_percentage_minimum_hosts: n(5),
        failure_percentage_request_volume: n(50),
        ..Default::default()
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// `d` as the protobuf Duration of Envoy's types (their own generated
/// type, without prost-types' conversions).
pub(crate) fn duration(d: Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Listener `name`: an `api_listener` whose HttpConnectionManager takes its
/// routes by RDS over ADS, with the router as its one (terminal) filter.
pub fn listener(name: &str) -> Bytes {
    let manager = HttpConnectionManager {
        stat_prefix: "lb".into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    pack(Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Default::default()
    })
}

/// RouteConfiguration `name`: one virtual host matching the name with and
/// without its port, every path to cluster `service`, retrying UNAVAILABLE
/// `settings.retries` times.
pub fn route(name: &str, service: &str, settings: &ResourceSettings) -> Bytes {
    let mut domains = vec![name.to_string()];
    if strip_port(name) != name {
        domains.push(strip_port(name).to_string());
    }
    pack(RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: service.to_string(),
            domains,
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(service.to_string())),
                    retry_policy: (settings.retries > 0).then(|| RetryPolicy {
                        retry_on: "unavailable".into(),
                        num_retries: Some(UInt32Value {
                            value: settings.retries,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// Cluster `service`: EDS over ADS, round robin, HTTP/2 upstream (Envoy
/// needs it said; gRPC always speaks HTTP/2), and this server for LRS.
pub fn cluster(service: &str, settings: &ResourceSettings) -> Bytes {
    let http2 = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    };
    pack(Cluster {
        name: service.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        lb_policy: LbPolicy::RoundRobin as i32,
        connect_timeout: Some(duration(settings.connect_timeout)),
        typed_extension_protocol_options: HashMap::from([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack_any(http2),
        )]),
        outlier_detection: settings.outlier_detection.then(outlier_detection),
        lrs_server: settings.lrs.then(|| ConfigSource {
            config_source_specifier: Some(
                ConfigSourceSpecifier::Self_(SelfConfigSource::default()),
            ),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The drop category of load shedding, as clients report it back in LRS.
pub const SHED_CATEGORY: &str = "lb_shed";

/// ClusterLoadAssignment `service` from `servers` (a published list, or a
/// stream's subset of it) and what `list` says of them: one locality per
/// backend (its zone and region, and its address as `sub_zone`), weighted
/// by its entries; `list`'s failover backends (a zone view's other zones)
/// at priority 1, used only when priority 0 fails; shedding as a drop.
pub fn assignment(service: &str, servers: &[Server], list: &PublishedList) -> Bytes {
    let mut endpoints = localities(servers, 0, list);
    endpoints.extend(localities(&list.failover, 1, list));
    let ppm = (list.shed_fraction.clamp(0.0, 1.0) * 1_000_000.0).round() as u32;
    pack(ClusterLoadAssignment {
        cluster_name: service.to_string(),
        endpoints,
        policy: (ppm > 0).then(|| Policy {
            drop_overloads: vec![DropOverload {
                category: SHED_CATEGORY.into(),
                drop_percentage: Some(FractionalPercent {
                    numerator: ppm,
                    denominator: DenominatorType::Million as i32,
                }),
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// One locality per backend of `servers`, weighted by its entries.
fn localities(servers: &[Server], priority: u32, list: &PublishedList) -> Vec<LocalityLbEndpoints> {
    let mut order: Vec<SocketAddr> = Vec::new();
    let mut entries: HashMap<SocketAddr, u32> = HashMap::new();
    for s in servers.iter().filter(|s| !s.drop) {
        let Some(addr) = socket_addr(s) else { continue };
        let n = entries.entry(addr).or_insert(0);
        if *n == 0 {
            order.push(addr);
        }
        *n += 1;
    }
    order
        .into_iter()
        .map(|addr| {
            let weight = Some(UInt32Value {
                value: entries[&addr],
            });
            let zone = list.localities.get(&addr);
            LocalityLbEndpoints {
                locality: Some(Locality {
                    region: zone.map(|z| z.region.clone()).unwrap_or_default(),
                    zone: zone.map(|z| z.zone.clone()).unwrap_or_default(),
                    sub_zone: addr.to_string(),
                }),
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: addr.ip().to_string(),
                                port_specifier: Some(PortSpecifier::PortValue(addr.port() as u32)),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    health_status: HealthStatus::Healthy as i32,
                    load_balancing_weight: weight,
                    ..Default::default()
                }],
                load_balancing_weight: weight,
                priority,
                ..Default::default()
            }
        })
        .collect()
}

/// A grpclb server entry's address.
fn socket_addr(s: &Server) -> Option<SocketAddr> {
    let ip: IpAddr = match s.ip_address.len() {
        4 => <[u8; 4]>::try_from(&s.ip_address[..]).ok()?.into(),
        16 => <[u8; 16]>::try_from(&s.ip_address[..]).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::try_from(s.port).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;

    fn unpack<T: Message + Default>(b: &Bytes) -> T {
        T::decode(&Any::decode(&b[..]).unwrap().value[..]).unwrap()
    }

    #[test]
    fn an_assembled_response_decodes_as_prost_would_encode_it() {
        let resources = vec![listener("a"), listener("b")];
        let bytes = response("7", &resources, Kind::Listener.type_url(), "12");
        let decoded = DiscoveryResponse::decode(&bytes[..]).unwrap();
        assert_eq!(decoded.version_info, "7");
        assert_eq!(decoded.nonce, "12");
        assert_eq!(decoded.type_url, Kind::Listener.type_url());
        assert_eq!(decoded.resources.len(), 2);
        assert_eq!(decoded.resources[1].encode_to_vec(), resources[1].to_vec());
    }

    fn server(last: u8, port: i32) -> Server {
        Server {
            ip_address: vec![127, 0, 0, last],
            port,
            load_balance_token: String::new(),
            drop: false,
        }
    }

    #[test]
    fn repeated_entries_become_locality_weights() {
        let servers = vec![server(1, 10), server(2, 20), server(1, 10), server(1, 10)];
        let list = PublishedList::new(1, servers.clone(), false, 0.0);
        let any = assignment("greeter", &servers, &list);
        let cla: ClusterLoadAssignment = unpack(&any);
        let weights: Vec<(String, u32)> = cla
            .endpoints
            .iter()
            .map(|l| {
                let loc = l.locality.as_ref().unwrap().sub_zone.clone();
                (loc, l.load_balancing_weight.unwrap().value)
            })
            .collect();
        assert_eq!(
            weights,
            vec![("127.0.0.1:10".into(), 3), ("127.0.0.2:20".into(), 1)]
        );
        assert!(cla.policy.is_none());
    }

    #[test]
    fn a_zone_view_says_zones_and_puts_its_failover_at_priority_1() {
        use crate::model::Locality;
        let (a, b) = (server(1, 10), server(2, 20));
        let localities = std::collections::BTreeMap::from([
            (socket_addr(&a).unwrap(), Locality::new("eu", "a")),
            (socket_addr(&b).unwrap(), Locality::new("eu", "b")),
        ]);
        let view = PublishedList::new(3, vec![a.clone(), a], false, 0.0)
            .with_localities(std::sync::Arc::new(localities))
            .with_failover(vec![b]);
        let cla: ClusterLoadAssignment = unpack(&assignment("greeter", &view.servers, &view));
        let seen: Vec<(String, String, u32, u32)> = cla
            .endpoints
            .iter()
            .map(|l| {
                let loc = l.locality.as_ref().unwrap();
                (
                    loc.region.clone(),
                    loc.zone.clone(),
                    l.priority,
                    l.load_balancing_weight.unwrap().value,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("eu".into(), "a".into(), 0, 2),
                ("eu".into(), "b".into(), 1, 1)
            ]
        );
    }

    #[test]
    fn shedding_becomes_a_drop_overload() {
        let mut servers = vec![server(1, 10)];
        servers.push(Server {
            drop: true,
            ..Default::default()
        });
        let list = PublishedList::new(1, servers.clone(), false, 0.25);
        let any = assignment("greeter", &servers, &list);
        let cla: ClusterLoadAssignment = unpack(&any);
        assert_eq!(cla.endpoints.len(), 1);
        let drop = &cla.policy.unwrap().drop_overloads[0];
        assert_eq!(drop.drop_percentage.unwrap().numerator, 250_000);
    }

    #[test]
    fn a_route_matches_the_name_with_and_without_its_port() {
        let settings = ResourceSettings {
            lrs: false,
            connect_timeout: Duration::from_secs(1),
            retries: 1,
            outlier_detection: false,
        };
        let any = route("greeter.svc.example:8443", "greeter", &settings);
        let rc: RouteConfiguration = unpack(&any);
        assert_eq!(
            rc.virtual_hosts[0].domains,
            vec!["greeter.svc.example:8443", "greeter.svc.example"]
        );
        let Some(Action::Route(action)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!("no route action");
        };
        assert_eq!(
            action.retry_policy.as_ref().unwrap().retry_on,
            "unavailable"
        );
    }

    #[test]
    fn type_urls_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::of_type_url(k.type_url()), Some(k));
        }
        assert_eq!(Kind::of_type_url("type.googleapis.com/foo"), None);
    }
}
