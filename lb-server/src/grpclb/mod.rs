//! The grpclb frontend: the `grpc.lb.v1.LoadBalancer/BalanceLoad` service.
//!
//! Per stream: read `initial_request` (within a deadline), map its name to a
//! service, answer `initial_response` first (stock clients treat anything
//! else first as an error), then write the service's current list and every
//! later change. Lists come from the catalog's watch channel, so a stream
//! that cannot keep up simply skips to the newest list; identical lists are
//! never resent. `client_stats` from the client are added to the service's
//! totals. Streams run inside tonic's response body: no task per stream.
//!
//! A reload that maps a stream's name to another service ends the stream,
//! so that its client reconnects and is mapped anew (see `stream`).
//!
//! With subsets on ([`crate::streams::subsets`]), each stream gets the
//! service's list filtered to its client's subset, and is re-sent it when
//! the subset changes. Otherwise a client of known zone (`lb-client-zone`
//! metadata, or its address in `--client-zone`) gets its zone's list
//! ([`crate::zones`]), and its client stats count as its zone's demand.
//!
//! A stream whose client asks for a heartbeat (`lb-heartbeat-ms` metadata,
//! as `LbChannel` does) gets its `initial_response` again whenever it has
//! been quiet that long (at least `--heartbeat-min`): the client knows the
//! LB alive from what it reads, without PINGs, and a slow or lossy link
//! delays a heartbeat without failing it.
//!
//! Lists are written as the snapshot's bytes ([`crate::snapshot`]): encoded
//! once per change, whatever the number of streams (a subset, which is the
//! stream's own, is encoded for that stream).
//!
//! | module | job |
//! | --- | --- |
//! | this one | accepting a stream: quota, initial request, name → service |
//! | `stream` | one stream's life: lists out, client stats in |
//! | [`Refusal`] | why a stream was refused or closed |
//!
//! The service itself is [`crate::streams::service::StreamingService`]
//! over [`Balancer`].

mod refusal;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lb_proto::grpc::lb::v1::{
    load_balance_request::LoadBalanceRequestType, load_balance_response::LoadBalanceResponseType,
    InitialLoadBalanceResponse, LoadBalanceRequest, LoadBalanceResponse,
};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::{Catalog, ServiceEntry};
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::model::Locality;
use crate::net::limits::{Exceeded, Quota, RateBudget};
use crate::streams::first_request::{first_request, timeout_status, FirstRequest};
use crate::streams::names::{NameMapper, MAX_NAME_LEN};
use crate::streams::service::{ResponseStream, StreamingMethod};
use crate::streams::sessions::Sessions;
use crate::streams::subsets::{self, Subsets};
use crate::zones::{Zones, CLIENT_ZONE_HEADER};
pub use refusal::Refusal;
use stream::{Heartbeat, StreamState, Subset};

/// Settings of the BalanceLoad service.
#[derive(Debug, Clone)]
pub struct BalancerSettings {
    /// Client-stats report interval asked of clients (zero = never).
    pub client_stats_interval: Duration,
    /// Deadline for the initial request.
    pub initial_request_timeout: Duration,
    /// Window over which streams are closed on shutdown.
    pub shutdown_spread: Duration,
    /// Caps on streams open at once, in total and per client address.
    pub streams: Arc<Quota>,
    /// Client-stats reports allowed per second and stream (bursts of twice
    /// that pass).
    pub client_stats_max_rate: f64,
    /// Shortest heartbeat granted to a stream that asks for one (zero =
    /// none).
    pub heartbeat_min: Duration,
}

/// What the BalanceLoad service reads and writes: the shared parts.
pub struct BalancerParts {
    /// Services and their published lists.
    pub catalog: Arc<Catalog>,
    /// Requested name → service.
    pub names: Arc<NameMapper>,
    /// The table of open streams.
    pub sessions: Arc<Sessions>,
    /// Per-client subsets.
    pub subsets: Arc<Subsets>,
    /// Per-client-zone lists.
    pub zones: Arc<Zones>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// The BalanceLoad service.
pub struct Balancer {
    parts: BalancerParts,
    settings: BalancerSettings,
    shutdown: CancellationToken,
    /// The `initial_response`, the same for every stream.
    initial_response: Bytes,
    /// Refusal lines (streams refused or closed by the LB): one per reason
    /// per minute, whatever the number of streams (all are counted).
    log: Arc<LogLimiter>,
}

impl Balancer {
    /// A service answering from `parts.catalog`; streams end when `shutdown` fires.
    pub fn new(
        parts: BalancerParts,
        settings: BalancerSettings,
        shutdown: CancellationToken,
    ) -> Self {
        let interval = settings.client_stats_interval;
        let initial_response = LoadBalanceResponse {
            load_balance_response_type: Some(LoadBalanceResponseType::InitialResponse(
                InitialLoadBalanceResponse {
                    client_stats_report_interval: (!interval.is_zero())
                        .then(|| prost_types::Duration::try_from(interval).ok())
                        .flatten(),
                },
            )),
        }
        .encode_to_vec()
        .into();
        Balancer {
            parts,
            settings,
            shutdown,
            initial_response,
            log: Arc::new(LogLimiter::default()),
        }
    }

    fn refuse(&self, reason: Refusal, status: Status) -> Status {
        if let Some(held) = self.log.allow(reason.as_str()) {
            tracing::warn!(
                reason = reason.as_str(),
                message = status.message(),
                refusals_not_logged = held,
                "BalanceLoad stream refused"
            );
        }
        self.parts.metrics.refuse(reason.as_str());
        status
    }

    /// Reads and validates the initial request; returns the service entry.
    async fn accept(
        &self,
        inbound: &mut Streaming<LoadBalanceRequest>,
    ) -> Result<(String, Arc<ServiceEntry>), Status> {
        let timeout = self.settings.initial_request_timeout;
        let first = match first_request(inbound, timeout).await {
            FirstRequest::TimedOut => {
                return Err(self.refuse(
                    Refusal::InitialRequestTimeout,
                    timeout_status(timeout, "initial_request"),
                ))
            }
            FirstRequest::Failed(status) => {
                return Err(self.refuse(Refusal::of_read_error(&status), status))
            }
            FirstRequest::Ended => {
                return Err(self.refuse(
                    Refusal::NoInitialRequest,
                    Status::invalid_argument("stream closed before initial_request"),
                ))
            }
            FirstRequest::Received(m) => m,
        };
        let name = match first.load_balance_request_type {
            Some(LoadBalanceRequestType::InitialRequest(r)) => r.name,
            _ => {
                return Err(self.refuse(
                    Refusal::NotInitialRequest,
                    Status::invalid_argument("the first message must be initial_request"),
                ))
            }
        };
        if name.len() > MAX_NAME_LEN {
            return Err(self.refuse(
                Refusal::NameTooLong,
                Status::invalid_argument(format!(
                    "name is {} bytes; the limit is {MAX_NAME_LEN}",
                    name.len()
                )),
            ));
        }
        let found = self
            .parts
            .names
            .resolve(&name, |s| self.parts.catalog.contains(s));
        match found.and_then(|s| self.parts.catalog.service(&s)) {
            Some(entry) => Ok((name, entry)),
            None => Err(self.refuse(
                Refusal::UnknownService,
                Status::not_found(format!(
                    "unknown service {name:?} (tried {:?}); no backend of that name is registered",
                    self.parts.names.candidates(&name)
                )),
            )),
        }
    }
}

impl StreamingMethod for Balancer {
    const SERVICE: &'static str = "grpc.lb.v1.LoadBalancer";
    const PATH: &'static str = "/grpc.lb.v1.LoadBalancer/BalanceLoad";
    type Request = LoadBalanceRequest;

    async fn call(
        self: Arc<Self>,
        request: Request<Streaming<LoadBalanceRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        self.balance_load(request).await
    }
}

impl Balancer {
    /// Accepts one BalanceLoad stream and returns what it will write.
    async fn balance_load(
        &self,
        request: Request<Streaming<LoadBalanceRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = request.remote_addr();
        let permit = self
            .settings
            .streams
            .acquire(peer.map(|p| p.ip()))
            .map_err(|exceeded| {
                let reason = match exceeded {
                    Exceeded::Total => Refusal::TooManyStreams,
                    Exceeded::PerPeer => Refusal::TooManyStreamsPerPeer,
                };
                let detail = self
                    .settings
                    .streams
                    .describe(exceeded, peer.map(|p| p.ip()));
                self.refuse(reason, Status::resource_exhausted(detail))
            })?;
        let client_id = request
            .metadata()
            .get(subsets::CLIENT_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= subsets::MAX_CLIENT_ID_LEN)
            .map(str::to_string);
        let said_zone = request
            .metadata()
            .get(CLIENT_ZONE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|z| Locality::new("", z))
            .unwrap_or_default();
        let heartbeat = request
            .metadata()
            .get(lb_proto::ext::HEARTBEAT_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .filter(|ms| *ms > 0 && !self.settings.heartbeat_min.is_zero())
            .map(|ms| {
                Heartbeat::new(
                    Duration::from_millis(ms).max(self.settings.heartbeat_min),
                    self.initial_response.clone(),
                )
            });
        let mut inbound = request.into_inner();
        // Subscribed before the name is mapped: a reload in between wakes
        // the stream, which maps its name again.
        let name_changes = self.parts.names.subscribe();
        let (name, entry) = self.accept(&mut inbound).await?;
        tracing::debug!(
            ?peer,
            name,
            service = entry.name(),
            "BalanceLoad stream accepted"
        );
        let session = self.parts.sessions.open(
            self.parts.metrics.clone(),
            peer,
            name.clone(),
            entry.name().to_string(),
            client_id,
        );
        let subset = self.parts.subsets.enabled().then(|| {
            let table = self.parts.subsets.table(entry.name());
            let s = session.session();
            Subset {
                changes: table.subscribe(),
                member: table.join(s.id, &s.client_id, &entry.current_list()),
                last_sent: None,
            }
        });
        let zone = match subset {
            Some(_) => None,
            None => {
                let locality = self.parts.zones.client_zone(said_zone, peer);
                session
                    .session()
                    .zone
                    .lock()
                    .expect("zone lock")
                    .clone_from(&locality.zone);
                self.parts.zones.join(&entry, &locality)
            }
        };
        let lists = zone
            .as_ref()
            .and_then(|z| z.lists())
            .unwrap_or_else(|| entry.subscribe());
        let state = StreamState {
            initial: Some(self.initial_response.clone()),
            heartbeat,
            lists,
            zone,
            last_version: None,
            subset,
            inbound,
            inbound_done: false,
            name,
            names: self.parts.names.clone(),
            name_changes: Some(name_changes),
            finished: false,
            catalog: self.parts.catalog.clone(),
            entry,
            metrics: self.parts.metrics.clone(),
            session,
            shutdown: self.shutdown.clone(),
            shutdown_spread: self.settings.shutdown_spread,
            stats_budget: RateBudget::new(self.settings.client_stats_max_rate),
            log: self.log.clone(),
            _permit: permit,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            StreamState::next,
        ))))
    }
}
