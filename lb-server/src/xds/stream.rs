//! One ADS stream's life: requests in, responses out, from the first
//! request (which names the node) to its end.
//!
//! The stream runs as one task. It waits on the client's requests and on
//! the published lists of the services it subscribes to (plus the catalog's
//! membership while it waits for a name that does not exist yet, or holds a
//! wildcard, and the name mapping while it has listeners or routes, whose
//! names a reload may map to another service); whenever something moved,
//! each resource type is planned by its [`Subscription`], which sends only
//! what changed and only when the client has answered the previous
//! response. A slow client therefore skips
//! to the newest state: lists are latest-wins watch channels.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use futures::{Stream, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;
use tonic::{Status, Streaming};

use super::resources::{self, Kind};
use super::subscription::{Answer, Requested, Subscription};
use super::Ads;
use crate::metrics::XdsMetrics;
use crate::model::Locality;
use crate::net::limits::{Permit, RateBudget};
use crate::streams::first_request::{first_request, timeout_status, FirstRequest};
use crate::streams::names::MAX_NAME_LEN;
use crate::streams::sessions::{XdsNack, XdsNode, XdsSessionGuard, XdsTypeStatus};
use crate::streams::subsets::Member;
use crate::zones::ZoneMember;

/// What a stream's task writes to tonic's response body.
pub(super) type Outbound = mpsc::Sender<Result<Bytes, Status>>;

/// What wakes a stream besides its client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Watch {
    /// A service's published list.
    List(String),
    /// A service's subset table.
    Subset(String),
    /// Services appearing.
    Members,
    /// The name mapping replaced (a reload): listeners and routes map
    /// their names again.
    Names,
}

type Wakes = StreamMap<Watch, Pin<Box<dyn Stream<Item = ()> + Send>>>;

/// One ADS stream.
pub(super) struct AdsStream {
    ads: Arc<Ads>,
    session: XdsSessionGuard,
    subs: [Subscription; 4],
    next_nonce: u64,
    client_id: Option<String>,
    /// Per service, this client's subset (subsetting on only).
    members: HashMap<String, Member>,
    /// The client's zone (its node's locality, else its address's).
    locality: Locality,
    /// Per service subscribed by EDS, this stream's place in its zone
    /// table (zone lists on).
    zone_members: HashMap<String, ZoneMember>,
    /// Per service, the list version last sent in an assignment.
    sent_versions: HashMap<String, u64>,
    wakes: Wakes,
    /// Types that may have something to send (what woke the stream says
    /// which: a wildcard CDS of 10,000 clusters is not rebuilt for every
    /// list change).
    dirty: [bool; 4],
    /// Types with a change held back while the client had a response
    /// unanswered.
    held: [bool; 4],
    /// What to watch may have changed (names subscribed, services known).
    rewatch: bool,
    budget: RateBudget,
    _permit: Permit,
}

impl AdsStream {
    pub(super) fn new(ads: Arc<Ads>, session: XdsSessionGuard, permit: Permit) -> Self {
        let budget = RateBudget::new(ads.settings.request_max_rate);
        AdsStream {
            ads,
            session,
            subs: Kind::ALL.map(Subscription::new),
            next_nonce: 0,
            client_id: None,
            members: HashMap::new(),
            locality: Locality::default(),
            zone_members: HashMap::new(),
            sent_versions: HashMap::new(),
            wakes: StreamMap::new(),
            dirty: [false; 4],
            held: [false; 4],
            rewatch: false,
            budget,
            _permit: permit,
        }
    }

    fn metrics(&self) -> &XdsMetrics {
        &self.ads.parts.metrics.xds
    }

    /// Serves the stream until the client goes away, breaks a rule, or the
    /// LB shuts down.
    pub(super) async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>, out: Outbound) {
        let timeout = self.ads.settings.initial_request_timeout;
        let shutdown = self.ads.shutdown.clone();
        let first = tokio::select! {
            // Shutdown is answered by the loop below.
            _ = shutdown.cancelled() => None,
            _ = out.closed() => return,
            first = first_request(&mut inbound, timeout) => Some(first),
        };
        match first {
            None => {}
            Some(FirstRequest::Received(request)) => {
                if let Err(status) = self.on_request(request) {
                    let _ = out.send(Err(status)).await;
                    return;
                }
            }
            Some(FirstRequest::TimedOut) => {
                let status = timeout_status(timeout, "DiscoveryRequest");
                self.refuse("initial_request_timeout", &status);
                let _ = out.send(Err(status)).await;
                return;
            }
            Some(FirstRequest::Ended) => {
                // Half-closed before asking for anything: nothing will ever
                // be asked, and the stream would hold its quota slot.
                let status =
                    Status::invalid_argument("the stream ended before its first DiscoveryRequest");
                self.refuse("no_initial_request", &status);
                let _ = out.send(Err(status)).await;
                return;
            }
            Some(FirstRequest::Failed(status)) => {
                if let Some(status) = self.read_failed(status) {
                    let _ = out.send(Err(status)).await;
                }
                return;
            }
        }
        let mut inbound_done = false;
        loop {
            if std::mem::take(&mut self.rewatch) {
                self.sync_wakes();
            }
            for kind in Kind::ALL {
                if !std::mem::take(&mut self.dirty[kind as usize]) {
                    continue;
                }
                if self.subs[kind as usize].is_awaiting() {
                    // Planned when the client answers the response it has.
                    self.held[kind as usize] = true;
                    continue;
                }
                if let Some(response) = self.plan(kind) {
                    if out.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
            let shutdown = self.ads.shutdown.clone();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let spread = self.ads.settings.shutdown_spread.as_millis() as u64;
                    let delay = if spread == 0 { 0 } else { rand::rng().random_range(0..spread) };
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let _ = out.send(Err(Status::unavailable("load balancer shutting down; reconnect"))).await;
                    return;
                }
                _ = out.closed() => return,
                Some((woke, ())) = self.wakes.next(), if !self.wakes.is_empty() => match woke {
                    // A list or subset moved: only assignments can change.
                    Watch::List(_) | Watch::Subset(_) => self.dirty[Kind::Endpoint as usize] = true,
                    Watch::Members => {
                        // Names may resolve now, and a wildcard has more.
                        self.dirty = [true; 4];
                        self.rewatch = true;
                    }
                    Watch::Names => {
                        // A route may point at another cluster now, a
                        // listener exist or not.
                        self.dirty[Kind::Listener as usize] = true;
                        self.dirty[Kind::Route as usize] = true;
                        self.rewatch = true;
                    }
                },
                message = inbound.message(), if !inbound_done => match message {
                    Ok(Some(request)) => {
                        if let Err(status) = self.on_request(request) {
                            let _ = out.send(Err(status)).await;
                            return;
                        }
                    }
                    Ok(None) => inbound_done = true,
                    Err(status) => {
                        if let Some(status) = self.read_failed(status) {
                            let _ = out.send(Err(status)).await;
                        }
                        return;
                    }
                },
            }
        }
    }

    /// Ends the stream on a read error: the client going away ends it
    /// quietly, anything else (a message too large, junk) is refused.
    /// Returns the status to end it with, if any.
    fn read_failed(&self, status: Status) -> Option<Status> {
        if matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown) {
            return None;
        }
        self.refuse("bad_request", &status);
        Some(status)
    }

    /// Counts `reason` and logs it (one line per reason per minute, all
    /// streams together: a flood of bad streams is counted, not written out).
    fn refuse(&self, reason: &'static str, status: &Status) {
        self.metrics().refuse(reason);
        if let Some(held) = self.ads.log.allow(reason) {
            tracing::warn!(
                session = self.session.session().id,
                peer = ?self.session.session().peer,
                reason,
                message = status.message(),
                refusals_not_logged = held,
                "ADS request refused"
            );
        }
    }

    /// Takes one request; an error ends the stream with that status.
    fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Status> {
        if !self.budget.spend() {
            let status = Status::resource_exhausted(format!(
                "xDS requests sent faster than {} per second",
                self.budget.rate
            ));
            self.refuse("request_rate", &status);
            return Err(status);
        }
        if self.client_id.is_none() {
            self.client_id = Some(self.note_node(request.node.as_ref()));
            let node = self
                .session
                .session()
                .node
                .lock()
                .expect("node lock")
                .clone();
            self.locality = self.ads.parts.zones.client_zone(
                Locality::new(&node.region, &node.zone),
                self.session.session().peer,
            );
        }
        let Some(kind) = Kind::of_type_url(&request.type_url) else {
            let status = Status::invalid_argument(format!(
                "unknown type_url {:?}; served: Listener, RouteConfiguration, Cluster, ClusterLoadAssignment (v3)",
                truncate(&request.type_url)
            ));
            self.refuse("unknown_type", &status);
            return Ok(());
        };
        let limit = self.ads.settings.max_resource_names;
        let others: usize = self
            .subs
            .iter()
            .filter(|s| s.kind() != kind)
            .map(Subscription::names_len)
            .sum();
        if request.resource_names.len() + others > limit {
            let status = Status::resource_exhausted(format!(
                "{} resource names subscribed; the limit is {limit} per stream (--xds-max-resource-names)",
                request.resource_names.len() + others
            ));
            self.refuse("too_many_names", &status);
            return Err(status);
        }
        let mut names = request.resource_names;
        let before = names.len();
        names.retain(|n| n.len() <= MAX_NAME_LEN);
        if names.len() != before {
            let status = Status::invalid_argument(format!(
                "resource names over {MAX_NAME_LEN} bytes ignored"
            ));
            self.refuse("name_too_long", &status);
        }
        let error = request.error_detail.map(|e| e.message);
        let sub = &mut self.subs[kind as usize];
        let before = sub.requested().cloned();
        let answer = sub.on_request(&request.response_nonce, error, names);
        let renamed = sub.requested() != before.as_ref();
        if renamed {
            self.rewatch = true;
        }
        let metrics = &self.ads.parts.metrics.xds;
        match &answer {
            Answer::Ack => {
                XdsMetrics::of(&metrics.acks, kind.as_str()).inc();
            }
            Answer::Nack(e) => {
                XdsMetrics::of(&metrics.nacks, kind.as_str()).inc();
                tracing::warn!(
                    session = self.session.session().id,
                    node = %self.session.session().node.lock().expect("node lock").id,
                    r#type = kind.as_str(),
                    version = %sub.version(),
                    error = %truncate(e),
                    "xDS response rejected by the client"
                );
            }
            Answer::Stale | Answer::Subscribe => {}
        };
        if answer != Answer::Stale {
            // A plain ACK of an unchanged state plans nothing: the common
            // case, once per push and stream.
            let held = std::mem::take(&mut self.held[kind as usize]);
            self.dirty[kind as usize] |= held || renamed || answer == Answer::Subscribe;
            self.record(kind);
        }
        Ok(())
    }

    /// Records who the client is; returns the id its subsets are seeded by.
    fn note_node(&self, node: Option<&Node>) -> String {
        let session = self.session.session();
        let Some(node) = node else {
            return session
                .peer
                .map(|p: SocketAddr| p.to_string())
                .unwrap_or_else(|| format!("session-{}", session.id));
        };
        let locality = node.locality.clone().unwrap_or_default();
        let version = match &node.user_agent_version_type {
            Some(envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(v)) => v.clone(),
            _ => String::new(),
        };
        let info = XdsNode {
            id: truncate(&node.id),
            cluster: truncate(&node.cluster),
            region: truncate(&locality.region),
            zone: truncate(&locality.zone),
            sub_zone: truncate(&locality.sub_zone),
            user_agent: truncate(format!("{} {}", node.user_agent_name, version).trim()),
        };
        tracing::debug!(session = session.id, node = %info.id, user_agent = %info.user_agent, "ADS stream opened");
        let id = if info.id.is_empty() {
            session.peer.map(|p| p.to_string()).unwrap_or_default()
        } else {
            info.id.clone()
        };
        *session.node.lock().expect("node lock") = info;
        id
    }

    /// Copies one type's state into the session row (for the admin API).
    fn record(&self, kind: Kind) {
        let sub = &self.subs[kind as usize];
        let status = XdsTypeStatus {
            subscribed: match sub.requested() {
                None => Vec::new(),
                Some(Requested::Wildcard) => vec!["*".into()],
                Some(Requested::Names(n)) => n.iter().take(100).cloned().collect(),
            },
            sent_version: sub.version(),
            acked_version: sub.acked.clone(),
            last_nack: sub.nack.as_ref().map(|(v, e)| XdsNack {
                version: v.clone(),
                error: truncate(e),
            }),
        };
        self.session
            .session()
            .types
            .lock()
            .expect("types lock")
            .insert(kind.as_str(), status);
    }

    /// The service a Listener or RouteConfiguration name maps to.
    fn resolve(&self, name: &str) -> Option<String> {
        let catalog = &self.ads.parts.catalog;
        self.ads.parts.names.resolve(name, |s| catalog.contains(s))
    }

    /// Watches what the subscriptions depend on, and nothing else.
    fn sync_wakes(&mut self) {
        let mut want: HashSet<Watch> = HashSet::new();
        let mut eds: HashSet<String> = HashSet::new();
        let catalog = self.ads.parts.catalog.clone();
        for sub in &self.subs {
            match (sub.kind(), sub.requested()) {
                (_, None) => {}
                (Kind::Cluster | Kind::Endpoint, Some(Requested::Wildcard)) => {
                    want.insert(Watch::Members);
                }
                (_, Some(Requested::Wildcard)) => {}
                (kind, Some(Requested::Names(names))) => {
                    if matches!(kind, Kind::Listener | Kind::Route) && !names.is_empty() {
                        want.insert(Watch::Names);
                    }
                    for n in names {
                        let service = match kind {
                            Kind::Listener | Kind::Route => self.resolve(n),
                            _ => catalog.contains(n).then(|| n.clone()),
                        };
                        match service {
                            None => {
                                want.insert(Watch::Members);
                            }
                            Some(s) if kind == Kind::Endpoint => {
                                if self.ads.parts.subsets.enabled() {
                                    want.insert(Watch::Subset(s.clone()));
                                }
                                eds.insert(s.clone());
                                want.insert(Watch::List(s));
                            }
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        if matches!(
            self.subs[Kind::Endpoint as usize].requested(),
            Some(Requested::Wildcard)
        ) {
            for e in catalog.services() {
                eds.insert(e.name().to_string());
                want.insert(Watch::List(e.name().to_string()));
            }
        }
        self.zone_members.retain(|s, _| eds.contains(s));
        for s in &eds {
            if self.zone_members.contains_key(s) {
                continue;
            }
            let Some(entry) = catalog.service(s) else {
                continue;
            };
            if let Some(member) = self.ads.parts.zones.join(&entry, &self.locality) {
                // Its lists replace the service's as what wakes the stream.
                self.wakes.remove(&Watch::List(s.clone()));
                self.zone_members.insert(s.clone(), member);
            }
        }
        let have: Vec<Watch> = self.wakes.keys().cloned().collect();
        for w in have {
            if !want.contains(&w) {
                self.wakes.remove(&w);
            }
        }
        for w in want {
            if self.wakes.contains_key(&w) {
                continue;
            }
            let stream: Pin<Box<dyn Stream<Item = ()> + Send>> = match &w {
                Watch::Members => {
                    Box::pin(WatchStream::from_changes(catalog.subscribe_members()).map(|_| ()))
                }
                Watch::Names => Box::pin(
                    WatchStream::from_changes(self.ads.parts.names.subscribe()).map(|_| ()),
                ),
                Watch::List(s) => match (
                    self.zone_members.get(s).and_then(ZoneMember::lists),
                    catalog.service(s),
                ) {
                    (Some(view), _) => Box::pin(WatchStream::from_changes(view).map(|_| ())),
                    (None, Some(entry)) => {
                        Box::pin(WatchStream::from_changes(entry.watch()).map(|_| ()))
                    }
                    (None, None) => continue,
                },
                Watch::Subset(s) => Box::pin(
                    WatchStream::from_changes(self.ads.parts.subsets.table(s).subscribe())
                        .map(|_| ()),
                ),
            };
            self.wakes.insert(w, stream);
        }
    }

    /// The response of type `kind` due now, if any.
    fn plan(&mut self, kind: Kind) -> Option<Bytes> {
        let requested = self.subs[kind as usize].requested()?.clone();
        let current = self.current(kind, &requested);
        let mut nonce = self.next_nonce;
        let planned = self.subs[kind as usize].plan(&current, || {
            nonce += 1;
            nonce.to_string()
        })?;
        self.next_nonce = nonce;
        if kind == Kind::Endpoint {
            self.note_pushes();
        }
        let metrics = &self.ads.parts.metrics.xds;
        XdsMetrics::of(&metrics.responses, kind.as_str()).inc();
        self.session
            .session()
            .responses_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.record(kind);
        Some(resources::response(
            &planned.version,
            &planned.resources,
            kind.type_url(),
            &planned.nonce,
        ))
    }

    /// Observes the push latency of assignments newer than the last sent.
    fn note_pushes(&mut self) {
        let catalog = self.ads.parts.catalog.clone();
        let names: Vec<String> = match self.subs[Kind::Endpoint as usize].requested() {
            Some(Requested::Names(n)) => n.iter().cloned().collect(),
            _ => return,
        };
        for name in names {
            let Some(entry) = catalog.service(&name) else {
                continue;
            };
            let list = self
                .zone_members
                .get(&name)
                .and_then(ZoneMember::current)
                .unwrap_or_else(|| entry.current_list());
            match self.sent_versions.insert(name, list.version) {
                Some(v) if v < list.version => self
                    .ads
                    .parts
                    .metrics
                    .xds
                    .push_seconds
                    .observe(list.changed_at.elapsed().as_secs_f64()),
                _ => {}
            }
        }
    }

    /// Every resource of type `kind` that exists for `requested`.
    fn current(&mut self, kind: Kind, requested: &Requested) -> BTreeMap<String, Bytes> {
        let catalog = self.ads.parts.catalog.clone();
        let names: Vec<String> = match requested {
            Requested::Names(n) => n.iter().cloned().collect(),
            // No socket listeners or route tables are made up for a
            // wildcard: those are the deployment's (Envoy's static config).
            Requested::Wildcard if !matches!(kind, Kind::Cluster | Kind::Endpoint) => {
                return BTreeMap::new()
            }
            // A wildcard is every service the registries list now: one
            // whose backends all left the registry leaves the client's
            // clusters too (LDS and CDS answers carry the whole set, so
            // leaving it out removes it).
            Requested::Wildcard => catalog
                .services()
                .iter()
                .filter(|e| e.is_registered())
                .map(|e| e.name().to_string())
                .collect(),
        };
        let mut out = BTreeMap::new();
        for name in names {
            let resource = match kind {
                Kind::Listener => self.resolve(&name).map(|_| resources::listener(&name)),
                Kind::Route => self
                    .resolve(&name)
                    .map(|s| resources::route(&name, &s, &self.ads.settings.resources)),
                Kind::Cluster => catalog
                    .contains(&name)
                    .then(|| resources::cluster(&name, &self.ads.settings.resources)),
                Kind::Endpoint => self.assignment(&name),
            };
            if let Some(r) = resource {
                out.insert(name, r);
            }
        }
        out
    }

    /// The assignment of `service` as this client sees it.
    fn assignment(&mut self, service: &str) -> Option<Bytes> {
        let entry = self.ads.parts.catalog.service(service)?;
        // Version 0 is not decided yet (the LB's first health checks are
        // out): no assignment rather than one with no endpoints. gRPC
        // clients wait 15 s for a resource before taking it as absent
        // (gRFC A57); this replica's own first checks answer within
        // `--health-timeout`, other replicas' come through etcd.
        if let Some(member) = self.zone_members.get(service) {
            if let Some(view) = member.current() {
                return view
                    .decided()
                    .then(|| self.ads.assignments.get(service, &view));
            }
        }
        let list = entry.current_list();
        if !list.decided() {
            return None;
        }
        if !self.ads.parts.subsets.enabled() {
            return Some(self.ads.assignments.get(service, &list));
        }
        let client_id = self.client_id.clone().unwrap_or_default();
        let session_id = self.session.session().id;
        let subsets = self.ads.parts.subsets.clone();
        let member = self
            .members
            .entry(service.to_string())
            .or_insert_with(|| subsets.table(service).join(session_id, &client_id, &list));
        let (servers, _) = member.filter(&list);
        Some(resources::assignment(service, &servers, &list))
    }
}

/// At most 200 bytes of something a client sent, for logs and the admin API.
fn truncate(s: &str) -> String {
    if s.len() <= 200 {
        return s.to_string();
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
