//! One BalanceLoad stream, from its `initial_response` to its end: lists
//! out as they are published, client stats in. It lives inside tonic's
//! response body (`futures::stream::unfold`): no task per stream.
//!
//! When the name mapping is replaced (a reload changing aliases or domain
//! suffixes) and the stream's name now maps to another service (or to
//! none), the stream ends with `UNAVAILABLE`. Its client reconnects and is
//! mapped afresh, as any new stream: stock grpclb clients (grpc-go, C-core)
//! restart an LB call at once, without backoff, when the one that ended had
//! an answer, and keep using their last list meanwhile; the new stream
//! then joins the new service's subset and zone tables like any other,
//! with no second path for moving a live stream between services.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lb_proto::grpc::lb::v1::{load_balance_request::LoadBalanceRequestType, LoadBalanceRequest};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::catalog::{Catalog, ServiceEntry};
use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, ReasonLabels};
use crate::net::limits::{Permit, RateBudget};
use crate::snapshot::{encode_server_list, PublishedList};
use crate::streams::names::NameMapper;
use crate::streams::sessions::{SessionGuard, StatsReport};
use crate::streams::subsets;
use crate::zones::ZoneMember;

use super::Refusal;

/// A stream's subset and what it last sent.
pub(super) struct Subset {
    pub(super) member: subsets::Member,
    pub(super) changes: watch::Receiver<u64>,
    pub(super) last_sent: Option<Vec<lb_proto::grpc::lb::v1::Server>>,
}

/// A quiet stream's heartbeat: its `initial_response` again once it has
/// written nothing for `every`.
pub(super) struct Heartbeat {
    every: Duration,
    message: Bytes,
    due: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Heartbeat {
    /// A heartbeat of `message` after `every` of quiet.
    pub(super) fn new(every: Duration, message: Bytes) -> Self {
        Heartbeat {
            every,
            message,
            due: Box::pin(tokio::time::sleep(every)),
        }
    }

    /// The stream just wrote something: the quiet starts again.
    fn rearm(&mut self) {
        let next = tokio::time::Instant::now() + self.every;
        self.due.as_mut().reset(next);
    }
}

/// Everything one stream needs between two messages.
pub(super) struct StreamState {
    pub(super) initial: Option<Bytes>,
    /// Set when the client asked for heartbeats.
    pub(super) heartbeat: Option<Heartbeat>,
    pub(super) lists: watch::Receiver<Arc<PublishedList>>,
    pub(super) last_version: Option<u64>,
    pub(super) subset: Option<Subset>,
    /// The stream's place in its service's zone table (zone lists on).
    pub(super) zone: Option<ZoneMember>,
    pub(super) inbound: Streaming<LoadBalanceRequest>,
    pub(super) inbound_done: bool,
    /// The name the client asked for, as it asked.
    pub(super) name: String,
    /// Name → service rules, mapped again when they change.
    pub(super) names: Arc<NameMapper>,
    /// Wakes the stream when the rules are replaced (`None` once closed).
    pub(super) name_changes: Option<watch::Receiver<u64>>,
    pub(super) finished: bool,
    pub(super) catalog: Arc<Catalog>,
    pub(super) entry: Arc<ServiceEntry>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) session: SessionGuard,
    pub(super) shutdown: CancellationToken,
    pub(super) shutdown_spread: Duration,
    pub(super) stats_budget: RateBudget,
    /// Lines about streams the LB closes, rate-limited per reason.
    pub(super) log: Arc<LogLimiter>,
    pub(super) _permit: Permit,
}

impl StreamState {
    /// The stream's next message, and the state to continue from.
    pub(super) async fn next(mut self) -> Option<(Result<Bytes, Status>, Self)> {
        if self.finished {
            return None;
        }
        if let Some(initial) = self.initial.take() {
            return Some((Ok(initial), self));
        }
        loop {
            if let Some(list) = self.next_list() {
                if let Some(h) = &mut self.heartbeat {
                    h.rearm();
                }
                self.metrics.lists_sent.inc();
                self.session
                    .session()
                    .lists_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some((Ok(list), self));
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
                _ = async { self.heartbeat.as_mut().expect("guarded").due.as_mut().await }, if self.heartbeat.is_some() => {
                    let h = self.heartbeat.as_mut().expect("guarded");
                    h.rearm();
                    let message = h.message.clone();
                    self.metrics.heartbeats_sent.inc();
                    return Some((Ok(message), self));
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
                changed = async { self.name_changes.as_mut().expect("guarded").changed().await }, if self.name_changes.is_some() => {
                    if changed.is_err() {
                        self.name_changes = None;
                    } else if let Some(status) = self.remapped() {
                        self.finished = true;
                        return Some((Err(status), self));
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
                        let reason = Refusal::of_read_error(&status);
                        if reason == Refusal::StreamError {
                            // The client went away: end quietly.
                            return None;
                        }
                        if let Some(held) = self.log.allow(reason.as_str()) {
                            tracing::warn!(session = self.session.session().id, reason = reason.as_str(), message = status.message(), closes_not_logged = held, "BalanceLoad stream closed");
                        }
                        self.metrics.refuse(reason.as_str());
                        self.finished = true;
                        return Some((Err(status), self));
                    }
                },
            }
        }
    }

    /// After a change of the name mapping: the status ending the stream if
    /// its name no longer maps to the service it serves.
    fn remapped(&self) -> Option<Status> {
        let now = self.names.resolve(&self.name, |s| self.catalog.contains(s));
        if now.as_deref() == Some(self.entry.name()) {
            return None;
        }
        tracing::debug!(
            session = self.session.session().id,
            name = %self.name,
            from = self.entry.name(),
            to = ?now,
            "name maps elsewhere now; ending the stream so that its client maps it again"
        );
        Some(Status::unavailable(format!(
            "{:?} maps to {} now (name mapping reloaded); reconnect",
            self.name,
            now.as_deref().unwrap_or("no service")
        )))
    }

    /// The list to send now (encoded), if it differs from the last one sent.
    fn next_list(&mut self) -> Option<Bytes> {
        // Compare versions rather than relying on `has_changed`: `changed()`
        // marks the newest value as seen.
        let list = self.lists.borrow_and_update().clone();
        if !list.decided() {
            // Not decided yet (the LB's first health checks are out):
            // the client keeps what it has.
            return None;
        }
        let new_version = self.last_version != Some(list.version);
        let servers = match &mut self.subset {
            None if !new_version => return None,
            None => list.grpclb().clone(),
            Some(sub) => {
                sub.changes.borrow_and_update();
                let (servers, subset) = sub.member.filter(&list);
                if sub.last_sent.as_ref() == Some(&servers) {
                    self.last_version = Some(list.version);
                    return None;
                }
                let encoded = encode_server_list(&servers);
                sub.last_sent = Some(servers);
                *self.session.session().subset.lock().expect("subset lock") = Some(subset);
                encoded
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
                    self.metrics.refuse(Refusal::ClientStatsRate.as_str());
                    if let Some(held) = self.log.allow(Refusal::ClientStatsRate.as_str()) {
                        tracing::warn!(
                            session = id,
                            rate = self.stats_budget.rate,
                            closes_not_logged = held,
                            "client stats sent too fast; closing the stream"
                        );
                    }
                    return Err(Status::resource_exhausted(format!(
                        "client_stats sent faster than {} per second; report at the interval the load balancer asked for",
                        self.stats_budget.rate
                    )));
                }
                self.catalog.record_client_stats(&self.entry, &stats);
                if let Some(zone) = &self.zone {
                    zone.record_calls(stats.num_calls_started);
                }
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
