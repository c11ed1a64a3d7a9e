//! The xDS frontend: proxyless gRPC clients (C-core, grpc-js, grpc-java,
//! grpc-go) and Envoy, served from the same published lists as grpclb.
//!
//! Two services on the gRPC port, beside BalanceLoad and under its limits:
//!
//! - `envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources`
//!   (ADS, state of the world). A client dialing `xds:///NAME` asks for the
//!   Listener `NAME`, then its RouteConfiguration, Cluster and
//!   ClusterLoadAssignment ([`resources`]); names map to services exactly as
//!   for grpclb (aliases, domain suffixes, ports). Envoy subscribes to
//!   clusters by wildcard and gets every service.
//! - `envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats`
//!   (LRS): the calls, errors and drops clients report are added to the same
//!   per-service totals as grpclb client stats ([`lrs`]).
//!
//! What the policy decided reaches xDS clients as it reaches grpclb ones:
//! only listed backends are in an assignment, weights (registry, ORCA, slow
//! start) become locality weights, shedding becomes `drop_overloads`, and
//! with subsetting each node gets its own subset (seeded by its node id).
//!
//! | module | job |
//! | --- | --- |
//! | this one | accepting a stream: quota, the session row, its task; cached assignments |
//! | [`resources`] | Listener, RouteConfiguration, Cluster, ClusterLoadAssignment |
//! | [`subscription`] | the state-of-the-world rules of one type on one stream |
//! | `stream` | one ADS stream's life |
//! | `lrs` | load reports in |

pub mod resources;
pub mod subscription;

mod lrs;
mod stream;

pub use lrs::LoadReporting;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::Catalog;
use crate::metrics::Metrics;
use crate::net::limits::{Exceeded, Quota};
use crate::snapshot::PublishedList;
use crate::streams::names::NameMapper;
use crate::streams::service::{ResponseStream, StreamingMethod};
use crate::streams::sessions::Sessions;
use crate::streams::subsets::Subsets;
use resources::ResourceSettings;
use stream::AdsStream;

/// Settings of the xDS services.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// Caps on streams open at once (shared with BalanceLoad).
    pub streams: Arc<Quota>,
    /// Most resource names one stream may hold.
    pub max_resource_names: usize,
    /// Requests (or load reports) allowed per second and stream.
    pub request_max_rate: f64,
    /// Window over which streams are closed on shutdown.
    pub shutdown_spread: Duration,
    /// The interval clients are asked to report load at (zero: no LRS).
    pub load_report_interval: Duration,
    /// What built Clusters carry.
    pub resources: ResourceSettings,
}

/// What the xDS services read and write: the shared parts.
pub struct XdsParts {
    /// Services and their published lists.
    pub catalog: Arc<Catalog>,
    /// Requested name → service.
    pub names: Arc<NameMapper>,
    /// The table of open streams.
    pub sessions: Arc<Sessions>,
    /// Per-client subsets.
    pub subsets: Arc<Subsets>,
    /// Per-client-zone lists.
    pub zones: Arc<crate::zones::Zones>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// The ADS service and what its streams share.
pub struct Ads {
    parts: XdsParts,
    settings: XdsSettings,
    shutdown: CancellationToken,
    assignments: Assignments,
}

impl Ads {
    /// A service answering from `parts.catalog`; streams end when `shutdown`
    /// fires.
    pub fn new(parts: XdsParts, settings: XdsSettings, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Ads {
            parts,
            settings,
            shutdown,
            assignments: Assignments::default(),
        })
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        tracing::warn!(reason, message = status.message(), "xDS stream refused");
        self.parts.metrics.xds.refuse(reason);
        status
    }

    /// A slot in the stream quota for `peer`, or the status refusing it.
    fn permit(
        &self,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<crate::net::limits::Permit, Status> {
        let ip = peer.map(|p| p.ip());
        self.settings.streams.acquire(ip).map_err(|exceeded| {
            let reason = match exceeded {
                Exceeded::Total => "too_many_streams",
                Exceeded::PerPeer => "too_many_streams_per_peer",
            };
            self.refuse(
                reason,
                Status::resource_exhausted(self.settings.streams.describe(exceeded, ip)),
            )
        })
    }
}

/// Each service's assignment, encoded once per published list version and
/// shared by every stream that sees the whole list.
#[derive(Default)]
struct Assignments(DashMap<(String, String), (u64, Bytes)>);

impl Assignments {
    /// The assignment of `service` for clients of `zone` ("" = the
    /// service's own list) from `list`, encoded once per list.
    fn get(&self, service: &str, zone: &str, list: &PublishedList) -> Bytes {
        let key = (service.to_string(), zone.to_string());
        if let Some(hit) = self.0.get(&key) {
            if hit.0 == list.id {
                return hit.1.clone();
            }
        }
        let any = resources::assignment(service, &list.servers, list);
        self.0.insert(key, (list.id, any.clone()));
        any
    }
}

/// What the LRS service's streams write.
type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl StreamingMethod for Ads {
    const SERVICE: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
    const PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
    type Request = DiscoveryRequest;

    /// Accepts one ADS stream (state of the world; the incremental method
    /// answers UNIMPLEMENTED) and starts its task.
    async fn call(
        self: Arc<Self>,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = request.remote_addr();
        let permit = self.permit(peer)?;
        let session = self
            .parts
            .sessions
            .open_xds(self.parts.metrics.clone(), peer);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let stream = AdsStream::new(self, session, permit);
        tokio::spawn(stream.run(request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
