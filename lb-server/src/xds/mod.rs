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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use futures::Stream;
use prometheus_client::metrics::gauge::Gauge;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::Catalog;
use crate::log_limit::LogLimiter;
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
    /// Deadline for a stream's first request (ADS and LRS, as for
    /// BalanceLoad: `--initial-request-timeout`).
    pub initial_request_timeout: Duration,
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
    /// Refusal lines: one per reason per minute, whatever the number of
    /// streams refused (they are all counted).
    log: LogLimiter,
}

impl Ads {
    /// A service answering from `parts.catalog`; streams end when `shutdown`
    /// fires.
    pub fn new(parts: XdsParts, settings: XdsSettings, shutdown: CancellationToken) -> Arc<Self> {
        let assignments = Assignments::new(parts.metrics.xds.assignments_cached.clone());
        Arc::new(Ads {
            parts,
            settings,
            shutdown,
            assignments,
            log: LogLimiter::default(),
        })
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        if let Some(held) = self.log.allow(reason) {
            tracing::warn!(
                reason,
                message = status.message(),
                refusals_not_logged = held,
                "xDS stream refused"
            );
        }
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

/// Assignments, encoded once per published list and shared by every stream
/// that sees that whole list: a service's own list, or a client zone's view
/// of it (zones whose view is the service's list share its entry).
///
/// Entries are keyed by the list itself (`PublishedList::id`), not by the
/// client's zone: zones are whatever clients say (an xDS node's locality),
/// and a zone's view goes when the zone's last client leaves. An entry is
/// garbage once its list is dropped (replaced, or its zone gone); garbage
/// is swept whenever the cache has doubled since the last sweep, so it
/// holds at most about twice the lists alive (at least [`SWEEP_FLOOR`]):
/// per service, its list and the views of its client zones (at most
/// `--zone-max-client-zones`). The size is exported as
/// `lb_xds_assignments_cached`.
struct Assignments {
    entries: DashMap<u64, Cached>,
    /// Size at which the next new entry sweeps the cache.
    sweep_at: AtomicUsize,
    gauge: Gauge,
}

/// One cached assignment.
struct Cached {
    /// The list it was encoded from: once dropped, the entry is garbage.
    list: Weak<PublishedList>,
    encoded: Bytes,
}

/// The cache is not swept below this many entries.
const SWEEP_FLOOR: usize = 64;

impl Assignments {
    /// An empty cache whose size is shown on `gauge`.
    fn new(gauge: Gauge) -> Self {
        Assignments {
            entries: DashMap::new(),
            sweep_at: AtomicUsize::new(SWEEP_FLOOR),
            gauge,
        }
    }

    /// The assignment of `service` from `list` (its own list, or one of
    /// its zone views), encoded once per list.
    fn get(&self, service: &str, list: &Arc<PublishedList>) -> Bytes {
        if let Some(hit) = self.entries.get(&list.id) {
            return hit.encoded.clone();
        }
        let encoded = resources::assignment(service, &list.servers, list);
        let cached = Cached {
            list: Arc::downgrade(list),
            encoded: encoded.clone(),
        };
        if self.entries.insert(list.id, cached).is_none()
            && self.entries.len() >= self.sweep_at.load(Ordering::Relaxed)
        {
            self.entries.retain(|_, c| c.list.strong_count() > 0);
            let next = (2 * self.entries.len()).max(SWEEP_FLOOR);
            self.sweep_at.store(next, Ordering::Relaxed);
        }
        self.gauge.set(self.len() as i64);
        encoded
    }

    /// Assignments cached now.
    fn len(&self) -> usize {
        self.entries.len()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One short ADS stream per made-up zone: each zone's view lives only
    /// as long as its stream, and so must its cached assignment.
    #[test]
    fn assignments_of_lists_no_longer_published_are_dropped() {
        let cache = Assignments::new(Gauge::default());
        let service_list = Arc::new(PublishedList::empty());
        for _ in 0..5_000 {
            let view = Arc::new(PublishedList::empty());
            cache.get("svc", &view);
            // A new zone's view starts as the service's list.
            let shared = service_list.clone();
            cache.get("svc", &shared);
        }
        assert!(cache.len() <= 64, "{} assignments cached", cache.len());
        let first = cache.get("svc", &service_list);
        assert_eq!(first, cache.get("svc", &service_list), "encoded once");
    }
}
