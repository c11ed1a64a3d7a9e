//! Generated protocol types and gRPC stubs shared by the LB server, the thin
//! client and the examples.
//!
//! - [`grpc::lb::v1`]: the grpclb protocol spoken with stock gRPC clients.
//! - [`registry::v1`]: the embedded registry's registration API.
//! - [`helloworld`]: the greeter used by examples, tests and benchmarks.
//! - [`xds`]: ORCA load reports (`xds.data.orca.v3`) and the out-of-band
//!   reporting service (`xds.service.orca.v3`).
//! - [`envoy::service::load_stats::v3`]: the client side's subset of LRS,
//!   over which `LbChannel` reports per-backend outcomes.

/// What this project adds to the grpclb protocol, the same at both ends.
pub mod ext {
    /// Request metadata naming the client, stable across its reconnects,
    /// so that per-client subsetting gives it the same backends each time.
    pub const CLIENT_ID_HEADER: &str = "lb-client-id";
    /// Request metadata naming the client's zone, so that the LB can keep
    /// its calls in that zone (as far as the zone's backends can take them).
    pub const CLIENT_ZONE_HEADER: &str = "lb-client-zone";
    /// Request metadata asking the LB for a heartbeat on a BalanceLoad
    /// stream: a repeated `initial_response` whenever the stream has been
    /// quiet this many milliseconds. A client proves the LB alive by what
    /// it reads, so it need not PING (stock gRPC servers, and proxies built
    /// on them, close connections that PING more often than every 5 min
    /// while no data flows), and a lossy link cannot pass for a dead LB:
    /// one late answer to a PING ends a connection, while a heartbeat that
    /// is late is followed by the next one. Stock clients do not ask and
    /// get none. The LB holds the interval to its `--heartbeat-min`.
    pub const HEARTBEAT_HEADER: &str = "lb-heartbeat-ms";
    /// Longest service name, in bytes: in a registry, in an initial request,
    /// in a client's settings.
    pub const MAX_SERVICE_NAME_LEN: usize = 255;

    /// LRS `Node.client_features` entry of a client whose calls the LB
    /// already counts from another report (an `LbChannel`'s grpclb client
    /// stats): its LRS reports carry per-backend outcomes only, and are not
    /// added to the service's call totals or its zone's demand a second
    /// time.
    pub const LRS_OUTCOMES_ONLY: &str = "lb.outcomes-only";
    /// LRS `load_metric_stats` name: the latency of finished calls, in
    /// milliseconds (`total_metric_value` sums them over
    /// `num_requests_finished_with_metric` calls), from the request sent to
    /// the response's end.
    pub const METRIC_LATENCY_MS: &str = "latency_ms";
    /// LRS `load_metric_stats` name: calls the caller abandoned before
    /// their end (counted in `num_requests_finished_with_metric`): the
    /// caller's doing, neither a success nor an error of the backend.
    pub const METRIC_CANCELLED: &str = "cancelled_by_caller";
    /// LRS `load_metric_stats` name: calls ended by their deadline
    /// (counted in `num_requests_finished_with_metric`): the caller's
    /// budget, not counted as an error of the backend (their latency is).
    pub const METRIC_DEADLINE: &str = "deadline_exceeded";
}

/// `grpc.lb.v1`: the grpclb protocol.
pub mod grpc {
    /// `grpc.lb`
    pub mod lb {
        /// `grpc.lb.v1`
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            tonic::include_proto!("grpc.lb.v1");

            use std::net::{IpAddr, SocketAddr};

            impl Server {
                /// A list entry for a backend at `addr`, carrying `token`.
                pub fn at(addr: SocketAddr, token: impl Into<String>) -> Server {
                    let ip_address = match addr.ip() {
                        IpAddr::V4(v4) => v4.octets().to_vec(),
                        IpAddr::V6(v6) => v6.octets().to_vec(),
                    };
                    Server {
                        ip_address,
                        port: i32::from(addr.port()),
                        load_balance_token: token.into(),
                        drop: false,
                    }
                }

                /// Where the entry points: `None` for a drop entry's empty
                /// address, an IP that is neither 4 nor 16 bytes, or a port
                /// outside 1–65535.
                pub fn socket_addr(&self) -> Option<SocketAddr> {
                    let ip: IpAddr = match self.ip_address.len() {
                        4 => <[u8; 4]>::try_from(self.ip_address.as_slice()).ok()?.into(),
                        16 => <[u8; 16]>::try_from(self.ip_address.as_slice())
                            .ok()?
                            .into(),
                        _ => return None,
                    };
                    let port = u16::try_from(self.port).ok().filter(|p| *p != 0)?;
                    Some(SocketAddr::new(ip, port))
                }
            }
        }
    }
}

/// `lb.registry.v1`: registration API of the embedded registry.
pub mod registry {
    /// `lb.registry.v1`
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("lb.registry.v1");
    }
}

/// `helloworld`: the example greeter service.
#[allow(missing_docs, clippy::all)]
pub mod helloworld {
    tonic::include_proto!("helloworld");
}

/// `xds.*`: ORCA load reporting.
pub mod xds {
    /// `xds.data`
    pub mod data {
        /// `xds.data.orca`
        pub mod orca {
            /// `xds.data.orca.v3`
            #[allow(missing_docs, clippy::all)]
            pub mod v3 {
                tonic::include_proto!("xds.data.orca.v3");
            }
        }
    }
    /// `xds.service`
    pub mod service {
        /// `xds.service.orca`
        pub mod orca {
            /// `xds.service.orca.v3`
            #[allow(missing_docs, clippy::all)]
            pub mod v3 {
                tonic::include_proto!("xds.service.orca.v3");
            }
        }
    }
}

/// `envoy.*`: the client side's subset of the Load Reporting Service.
pub mod envoy {
    /// `envoy.service`
    pub mod service {
        /// `envoy.service.load_stats`
        pub mod load_stats {
            /// `envoy.service.load_stats.v3`: LRS, with the messages it
            /// carries (their full API keeps some in `envoy.config.*`; the
            /// field numbers are the same).
            #[allow(missing_docs, clippy::all)]
            pub mod v3 {
                tonic::include_proto!("envoy.service.load_stats.v3");
            }
        }
    }
}

pub use prost_types;
