//! The `grpc.lb.v1.LoadBalancer/BalanceLoad` service.
//!
//! Per stream: read `initial_request` (within a deadline), map its name to a
//! service, answer `initial_response` first (stock clients treat anything
//! else first as an error), then write the service's current list and every
//! later change. Lists come from the catalog's watch channel, so a stream
//! that cannot keep up simply skips to the newest list; identical lists are
//! never resent. `client_stats` from the client are added to the service's
//! totals. Streams run inside tonic's response body: no task per stream.
//!
//! With subsets on ([`crate::subsets`]), each stream gets the service's list
//! filtered to its client's subset, and is re-sent it when the subset
//! changes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use lb_proto::grpc::lb::v1::{
    load_balance_request::LoadBalanceRequestType, load_balance_response::LoadBalanceResponseType,
    load_balancer_server::LoadBalancer, InitialLoadBalanceResponse, LoadBalanceRequest,
    LoadBalanceResponse, ServerList,
};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::{Catalog, PublishedList, ServiceEntry};
use crate::limits::{Exceeded, Permit, Quota};
use crate::metrics::{Metrics, ReasonLabels};
use crate::names::{NameMapper, MAX_NAME_LEN};
use crate::sessions::{SessionGuard, Sessions, StatsReport};
use crate::subsets::{self, Subsets};

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
}

/// The BalanceLoad service.
pub struct Balancer {
    catalog: Arc<Catalog>,
    names: Arc<NameMapper>,
    sessions: Arc<Sessions>,
    subsets: Arc<Subsets>,
    metrics: Arc<Metrics>,
    settings: BalancerSettings,
    shutdown: CancellationToken,
}

impl Balancer {
    /// A service answering from `catalog`; streams end when `shutdown` fires.
    pub fn new(
        catalog: Arc<Catalog>,
        names: Arc<NameMapper>,
        sessions: Arc<Sessions>,
        subsets: Arc<Subsets>,
        metrics: Arc<Metrics>,
        settings: BalancerSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Balancer {
            catalog,
            names,
            sessions,
            subsets,
            metrics,
            settings,
            shutdown,
        }
    }

    fn refuse(&self, reason: &str, status: Status) -> Status {
        tracing::warn!(
            reason,
            message = status.message(),
            "BalanceLoad stream refused"
        );
        self.metrics.refuse(reason);
        status
    }

    /// Reads and validates the initial request; returns the service entry.
    async fn accept(
        &self,
        inbound: &mut Streaming<LoadBalanceRequest>,
    ) -> Result<(String, Arc<ServiceEntry>), Status> {
        let timeout = self.settings.initial_request_timeout;
        let first = match tokio::time::timeout(timeout, inbound.message()).await {
            Err(_) => {
                return Err(self.refuse(
                    "initial_request_timeout",
                    Status::deadline_exceeded(format!("no initial_request within {timeout:?}")),
                ))
            }
            Ok(Err(status)) => return Err(self.refuse(stream_error_reason(&status), status)),
            Ok(Ok(None)) => {
                return Err(self.refuse(
                    "no_initial_request",
                    Status::invalid_argument("stream closed before initial_request"),
                ))
            }
            Ok(Ok(Some(m))) => m,
        };
        let name = match first.load_balance_request_type {
            Some(LoadBalanceRequestType::InitialRequest(r)) => r.name,
            _ => {
                return Err(self.refuse(
                    "not_initial_request",
                    Status::invalid_argument("the first message must be initial_request"),
                ))
            }
        };
        if name.len() > MAX_NAME_LEN {
            return Err(self.refuse(
                "name_too_long",
                Status::invalid_argument(format!(
                    "name is {} bytes; the limit is {MAX_NAME_LEN}",
                    name.len()
                )),
            ));
        }
        let found = self.names.resolve(&name, |s| self.catalog.contains(s));
        match found.and_then(|s| self.catalog.service(&s)) {
            Some(entry) => Ok((name, entry)),
            None => Err(self.refuse(
                "unknown_service",
                Status::not_found(format!(
                    "unknown service {name:?} (tried {:?}); no backend of that name is registered",
                    self.names.candidates(&name)
                )),
            )),
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<LoadBalanceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LoadBalancer for Balancer {
    type BalanceLoadStream = ResponseStream;

    async fn balance_load(
        &self,
        request: Request<Streaming<LoadBalanceRequest>>,
    ) -> Result<Response<Self::BalanceLoadStream>, Status> {
        let peer = request.remote_addr();
        let permit = self
            .settings
            .streams
            .acquire(peer.map(|p| p.ip()))
            .map_err(|exceeded| {
                let reason = match exceeded {
                    Exceeded::Total => "too_many_streams",
                    Exceeded::PerPeer => "too_many_streams_per_peer",
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
        let mut inbound = request.into_inner();
        let (name, entry) = self.accept(&mut inbound).await?;
        tracing::debug!(
            ?peer,
            name,
            service = entry.name(),
            "BalanceLoad stream accepted"
        );
        let session = self.sessions.open(
            self.metrics.clone(),
            peer,
            name,
            entry.name().to_string(),
            client_id,
        );
        let subset = self.subsets.enabled().then(|| {
            let table = self.subsets.table(entry.name());
            let s = session.session();
            Subset {
                changes: table.subscribe(),
                member: table.join(s.id, &s.client_id, &entry.current_list()),
                last_sent: None,
            }
        });
        let state = StreamState {
            initial: Some(self.settings.client_stats_interval),
            lists: entry.subscribe(),
            last_version: None,
            subset,
            inbound,
            inbound_done: false,
            finished: false,
            catalog: self.catalog.clone(),
            entry,
            metrics: self.metrics.clone(),
            session,
            shutdown: self.shutdown.clone(),
            shutdown_spread: self.settings.shutdown_spread,
            stats_budget: StatsBudget::new(self.settings.client_stats_max_rate),
            _permit: permit,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            StreamState::next,
        ))))
    }
}

/// A stream's subset and what it last sent.
struct Subset {
    member: subsets::Member,
    changes: watch::Receiver<u64>,
    last_sent: Option<Vec<lb_proto::grpc::lb::v1::Server>>,
}

/// Everything one stream needs between two messages.
struct StreamState {
    initial: Option<Duration>,
    lists: watch::Receiver<Arc<PublishedList>>,
    last_version: Option<u64>,
    subset: Option<Subset>,
    inbound: Streaming<LoadBalanceRequest>,
    inbound_done: bool,
    finished: bool,
    catalog: Arc<Catalog>,
    entry: Arc<ServiceEntry>,
    metrics: Arc<Metrics>,
    session: SessionGuard,
    shutdown: CancellationToken,
    shutdown_spread: Duration,
    stats_budget: StatsBudget,
    _permit: Permit,
}

/// The reason label of a stream that failed while reading a request.
fn stream_error_reason(status: &Status) -> &'static str {
    match status.code() {
        // tonic's answer to a message over the decoding limit.
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => "message_too_large",
        _ => "stream_error",
    }
}

/// Token bucket limiting the client-stats reports of one stream.
struct StatsBudget {
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl StatsBudget {
    fn new(rate: f64) -> Self {
        let rate = rate.max(0.01);
        StatsBudget {
            rate,
            tokens: Self::burst(rate),
            at: tokio::time::Instant::now(),
        }
    }

    fn burst(rate: f64) -> f64 {
        (rate * 2.0).max(2.0)
    }

    /// Spends one report; false when the stream is over its rate.
    fn spend(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.at = now;
        self.tokens = (self.tokens + earned).min(Self::burst(self.rate));
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

impl StreamState {
    async fn next(mut self) -> Option<(Result<LoadBalanceResponse, Status>, Self)> {
        if self.finished {
            return None;
        }
        if let Some(interval) = self.initial.take() {
            let response = LoadBalanceResponseType::InitialResponse(InitialLoadBalanceResponse {
                client_stats_report_interval: (!interval.is_zero()).then(|| {
                    prost_types::Duration {
                        seconds: interval.as_secs() as i64,
                        nanos: interval.subsec_nanos() as i32,
                    }
                }),
            });
            return Some((
                Ok(LoadBalanceResponse {
                    load_balance_response_type: Some(response),
                }),
                self,
            ));
        }
        loop {
            if let Some(servers) = self.next_list() {
                self.metrics.lists_sent.inc();
                self.session
                    .session()
                    .lists_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let response = LoadBalanceResponseType::ServerList(ServerList { servers });
                return Some((
                    Ok(LoadBalanceResponse {
                        load_balance_response_type: Some(response),
                    }),
                    self,
                ));
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    // Spread the closes so clients do not stampede the other replicas.
                    let spread = self.shutdown_spread.as_millis() as u64;
                    let delay = if spread == 0 { 0 } else { rand::rng().random_range(0..spread) };
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    self.finished = true;
                    return Some((Err(Status::unavailable("load balancer shutting down; reconnect")), self));
                }
                changed = self.lists.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                changed = async { self.subset.as_mut().expect("guarded").changes.changed().await }, if self.subset.is_some() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                message = self.inbound.message(), if !self.inbound_done => match message {
                    Ok(Some(request)) => {
                        if let Err(status) = self.on_request(request) {
                            self.finished = true;
                            return Some((Err(status), self));
                        }
                    }
                    Ok(None) => self.inbound_done = true,
                    Err(status) => {
                        let reason = stream_error_reason(&status);
                        if reason == "stream_error" {
                            // The client went away: end quietly.
                            return None;
                        }
                        tracing::warn!(session = self.session.session().id, reason, message = status.message(), "BalanceLoad stream closed");
                        self.metrics.refuse(reason);
                        self.finished = true;
                        return Some((Err(status), self));
                    }
                },
            }
        }
    }

    /// The list to send now, if it differs from the last one sent.
    fn next_list(&mut self) -> Option<Vec<lb_proto::grpc::lb::v1::Server>> {
        // Compare versions rather than relying on `has_changed`: `changed()`
        // marks the newest value as seen.
        let list = self.lists.borrow_and_update().clone();
        let new_version = self.last_version != Some(list.version);
        let servers = match &mut self.subset {
            None if !new_version => return None,
            None => list.servers.clone(),
            Some(sub) => {
                sub.changes.borrow_and_update();
                let (servers, subset) = sub.member.filter(&list);
                if sub.last_sent.as_ref() == Some(&servers) {
                    self.last_version = Some(list.version);
                    return None;
                }
                sub.last_sent = Some(servers.clone());
                *self.session.session().subset.lock().expect("subset lock") = Some(subset);
                servers
            }
        };
        if new_version && self.last_version.is_some() {
            self.metrics
                .list_push_seconds
                .observe(list.changed_at.elapsed().as_secs_f64());
        }
        self.last_version = Some(list.version);
        self.session
            .session()
            .list_version
            .store(list.version, std::sync::atomic::Ordering::Relaxed);
        Some(servers)
    }

    /// Applies one request from the client; an error ends the stream.
    fn on_request(&mut self, request: LoadBalanceRequest) -> Result<(), Status> {
        match request.load_balance_request_type {
            Some(LoadBalanceRequestType::ClientStats(stats)) => {
                if !self.stats_budget.spend() {
                    let id = self.session.session().id;
                    self.metrics
                        .client_stats_refused
                        .get_or_create(&ReasonLabels {
                            reason: "rate".into(),
                        })
                        .inc();
                    self.metrics.refuse("client_stats_rate");
                    tracing::warn!(
                        session = id,
                        rate = self.stats_budget.rate,
                        "client stats sent too fast; closing the stream"
                    );
                    return Err(Status::resource_exhausted(format!(
                        "client_stats sent faster than {} per second; report at the interval the load balancer asked for",
                        self.stats_budget.rate
                    )));
                }
                self.catalog.record_client_stats(&self.entry, &stats);
                *self
                    .session
                    .session()
                    .last_stats
                    .lock()
                    .expect("stats lock") = Some(StatsReport::from(&stats));
            }
            Some(LoadBalanceRequestType::InitialRequest(_)) => {
                tracing::debug!(
                    session = self.session.session().id,
                    "repeated initial_request ignored"
                );
            }
            None => {}
        }
        Ok(())
    }
}
