//! The etcd side of cluster membership: one session at a time (lease,
//! replica key, keep-alive, list + watch of the cluster prefix, writes of
//! this replica's results), retried with backoff when it breaks.
//!
//! A session is as alive as its lease, and only the lease's end ends it.
//! The lease is etcd's, not a connection's: when the connection carrying
//! its keep-alive breaks (a PING answered late on a lossy link, a reset),
//! the session connects again and keeps the same lease alive, as long as
//! the lease has not run out meanwhile; and when keep-alive answers are
//! late on every connection (2/5 of the TTL without one), it opens a fresh
//! connection beside the stalled ones. When the connection of the
//! listing, watch and writes breaks, it is made again beside the lease:
//! the cluster prefix is listed anew (what changed meanwhile is applied,
//! what was deleted forgotten), the watch resumes after the listing, and
//! the write that was in flight goes again. Either way no lease is lost,
//! no other replica takes this one's backends over, and nothing is
//! written twice under two leases.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::opinion::{self, Opinion};
use super::shared::{self, SharedHealth};
use super::{BackendKey, Cluster, Outgoing, ReplicaInfo, View};
use crate::gray::shared::Vote;
use crate::registry::retry::session_backoff;

/// Limit for one etcd request; a longer wait means the session is broken.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A write to etcd in flight.
type WriteFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Written>> + Send>>;

/// A connection for the listing, watch and writes, being made.
type LinkFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Link, String>> + Send>>;

/// A connection for the lease's keep-alive, being made.
type LesseeFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Lessee, String>> + Send>>;

/// Pause before making a broken connection again.
const RELINK_DELAY: Duration = Duration::from_millis(200);

/// Why a write did not land.
enum Written {
    /// No answer in time: try again while the lease holds.
    Late(String),
    /// The connection broke under it: make it again, then try again.
    Broken(String),
    /// etcd refused it (a lost lease, for one): the session is over.
    Failed(String),
}

/// The connection of the listing, the watch and the writes, with what it
/// listed: every key of the cluster prefix at `revision`, and the watch of
/// what follows. It also keeps the lease alive, beside the lessee: on a
/// lossy link one TCP connection now and then stalls for seconds (a
/// segment lost again and again, its retransmission timeout grown from
/// spurious retransmissions), and a lease renewed over two connections is
/// lost only when both stall at once.
struct Link {
    client: Client,
    revision: i64,
    listing: Vec<etcd_client::KeyValue>,
    watch: etcd_client::WatchStream,
    keeper: etcd_client::LeaseKeeper,
    keep_alive: etcd_client::LeaseKeepAliveStream,
}

impl Link {
    /// Connects (to the member in use, or the next that answers), lists the
    /// cluster prefix and watches it from just after the listing, and
    /// opens a second keep-alive stream for `lease`.
    fn make(cluster: &Cluster, lease: i64, after: Duration) -> LinkFuture {
        let etcd = cluster.settings.etcd.clone();
        let prefix = cluster.settings.prefix.clone();
        Box::pin(async move {
            tokio::time::sleep(after).await;
            let mut client = timed("connect", etcd.connect()).await?;
            let (revision, listing) = lb_client::internals::list_prefix(&mut client, &prefix)
                .await
                .map_err(|e| format!("list cluster: {e}"))?;
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let watch = timed(
                "watch cluster",
                client.watch(prefix.as_str(), Some(options)),
            )
            .await?;
            let (keeper, keep_alive) =
                timed("lease keep-alive", client.lease_keep_alive(lease)).await?;
            Ok(Link {
                client,
                revision,
                listing,
                watch,
                keeper,
                keep_alive,
            })
        })
    }
}

/// The connection of the lease's keep-alive.
struct Lessee {
    client: Client,
    keeper: etcd_client::LeaseKeeper,
    keep_alive: etcd_client::LeaseKeepAliveStream,
}

impl Lessee {
    /// Connects and opens a keep-alive stream for `lease`, which etcd keeps
    /// until its TTL runs out whatever becomes of the connection that took
    /// it.
    fn resume(cluster: &Cluster, lease: i64, after: Duration) -> LesseeFuture {
        let etcd = cluster.settings.etcd.clone();
        Box::pin(async move {
            tokio::time::sleep(after).await;
            let mut client = timed("connect", etcd.connect()).await?;
            let (mut keeper, keep_alive) =
                timed("lease keep-alive", client.lease_keep_alive(lease)).await?;
            // Renewed at once: the lease may be near its end.
            timed("keep-alive", keeper.keep_alive()).await?;
            Ok(Lessee {
                client,
                keeper,
                keep_alive,
            })
        })
    }
}

/// Keeps a session up until `shutdown`.
pub(super) async fn run(
    cluster: &Cluster,
    outbox: &mut mpsc::UnboundedReceiver<Outgoing>,
    shutdown: &CancellationToken,
) {
    let mut backoff = session_backoff();
    let mut stale_lease: Option<i64> = None;
    loop {
        backoff.attempt();
        let result = Session::open(cluster, &mut stale_lease, shutdown).await;
        let error = match result {
            Ok(mut s) => match s.serve(cluster, outbox, shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    stale_lease = Some(s.lease);
                    e
                }
            },
            Err(e) => e,
        };
        set_connected(cluster, false, None);
        cluster.forget_opinions();
        cluster.forget_votes();
        let first = cluster.session_lost(&error);
        cluster.settings.etcd.rotate();
        cluster.catalog.metrics().upstream_reconnect("cluster");
        let next = cluster.settings.etcd.current_endpoint();
        if first {
            tracing::warn!(error = %error, retry_in = ?backoff.peek(), ?next,
                "cluster session lost; degraded: checking every backend locally until etcd is back");
        } else {
            tracing::debug!(error = %error, retry_in = ?backoff.peek(), ?next,
                "cluster session retry failed; still degraded");
        }
        if !backoff.wait(shutdown).await {
            return;
        }
    }
}

fn set_connected(cluster: &Cluster, connected: bool, replicas: Option<Vec<ReplicaInfo>>) {
    cluster.view.send_if_modified(|v| {
        let mut next = View {
            replica_id: v.replica_id.clone(),
            connected,
            replicas: replicas.unwrap_or_else(|| v.replicas.clone()),
        };
        next.replicas.sort_by(|a, b| a.id.cmp(&b.id));
        if next.connected == v.connected && next.replicas == v.replicas {
            return false;
        }
        tracing::info!(
            connected,
            replicas = ?next.replicas.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            "cluster view changed"
        );
        *v = next;
        true
    });
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Err(_) => Err(format!("{what}: no answer within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Ok(Ok(v)) => Ok(v),
    }
}

struct Session {
    /// The connection of the lease and its keep-alive (`None` while it is
    /// being made again).
    lessee: Option<Lessee>,
    /// The connection of the listing, the watch and the writes (`None`
    /// while it is being made again).
    link: Option<Link>,
    lease: i64,
    replicas: BTreeMap<String, ReplicaInfo>,
    /// Writes waiting for their turn (each key once: its latest value is
    /// what gets written). Writes go one at a time beside the keep-alive,
    /// never in its way, and one that gets no answer in time goes back in
    /// the queue: on a slow or lossy link a write can outlast its timeout
    /// while the lease is kept alive fine, and the session is only as
    /// broken as its lease.
    pending: VecDeque<Outgoing>,
}

impl Session {
    /// Connects, takes a lease, registers this replica, lists and watches.
    async fn open(
        cluster: &Cluster,
        stale_lease: &mut Option<i64>,
        shutdown: &CancellationToken,
    ) -> Result<Session, String> {
        let s = &cluster.settings;
        let mut lessee = timed("connect", s.etcd.connect()).await?;
        let ttl = s.ttl.as_secs().max(2) as i64;
        let lease = timed("lease grant", lessee.lease_grant(ttl, None))
            .await?
            .id();
        if let Some(old) = stale_lease.take() {
            // Results written under the old lease are rewritten below.
            let _ = timed("lease revoke", lessee.lease_revoke(old)).await;
        }
        let me = ReplicaInfo {
            id: s.replica_id.clone(),
            lb_addr: s.lb_addr.to_string(),
            admin_addr: s.admin_addr.to_string(),
        };
        let value = serde_json::to_vec(&me).expect("replica info serializes");
        let replica_key = format!("{}replicas/{}", s.prefix, s.replica_id);
        timed(
            "register replica",
            lessee.put(
                replica_key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        let (keeper, keep_alive) =
            timed("lease keep-alive", lessee.lease_keep_alive(lease)).await?;
        // A connection of its own for the lease's keep-alive: the listing,
        // the watch and the writes go over a second one, so that on a lossy
        // link a retransmitted write or watch event never holds a
        // keep-alive back (TCP delivers in order) and the keep-alive's
        // connection stays thin.
        let mut link = Link::make(cluster, lease, Duration::ZERO).await?;
        let listing = std::mem::take(&mut link.listing);
        let revision = link.revision;
        let mut session = Session {
            lessee: Some(Lessee {
                client: lessee,
                keeper,
                keep_alive,
            }),
            link: Some(link),
            lease,
            replicas: BTreeMap::new(),
            pending: VecDeque::new(),
        };
        session.apply_listing(cluster, &listing);
        set_connected(
            cluster,
            true,
            Some(session.replicas.values().cloned().collect()),
        );
        let degraded_for = cluster.session_joined();
        tracing::info!(replica = %s.replica_id, lease, revision, ?degraded_for, "joined the cluster");
        if shutdown.is_cancelled() {
            return Err("shutting down".into());
        }
        for out in cluster.republish() {
            session.queue(out);
        }
        Ok(session)
    }

    /// Applies a listing of the cluster prefix: every key as read, and the
    /// deletion of results no longer there (deleted while this replica did
    /// not watch).
    fn apply_listing(&mut self, cluster: &Cluster, listing: &[etcd_client::KeyValue]) {
        let prefix = &cluster.settings.prefix;
        let mut seen = HashSet::new();
        let mut opinions_seen = HashSet::new();
        let mut votes_seen = HashSet::new();
        let replicas = std::mem::take(&mut self.replicas);
        for kv in listing {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if let Some(k) = shared::parse_key(prefix, &key) {
                seen.insert(k.clone());
            } else if let Some(opinion) = opinion::parse_key(prefix, opinion::OPINIONS, &key) {
                opinions_seen.insert(opinion);
            } else if let Some(vote) = opinion::parse_key(prefix, opinion::VOTES, &key) {
                votes_seen.insert(vote);
            }
            self.on_put(cluster, &key, kv.value(), kv.create_revision());
        }
        // Opinions no longer there (each change is applied once: an opinion
        // read again unchanged changes nothing).
        let stale: Vec<(BackendKey, String)> = cluster
            .opinions
            .lock()
            .expect("cluster lock")
            .iter()
            .flat_map(|(k, of)| of.keys().map(move |r| (k.clone(), r.clone())))
            // This replica's own opinions are its to write or withdraw.
            .filter(|(_, r)| *r != cluster.settings.replica_id)
            .filter(|o| !opinions_seen.contains(o))
            .collect();
        for (k, replica) in stale {
            cluster.on_opinion(k, replica, None);
        }
        for (k, replica) in cluster.votes_read() {
            if !votes_seen.contains(&(k.clone(), replica.clone())) {
                cluster.on_vote(k, replica, None);
            }
        }
        if self.replicas != replicas {
            set_connected(
                cluster,
                true,
                Some(self.replicas.values().cloned().collect()),
            );
        }
        let gone: Vec<BackendKey> = cluster
            .remote
            .lock()
            .expect("cluster lock")
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            cluster.on_remote(k, None);
        }
    }

    /// Serves the session until its lease ends (`Err`) or `shutdown` (`Ok`).
    async fn serve(
        &mut self,
        cluster: &Cluster,
        outbox: &mut mpsc::UnboundedReceiver<Outgoing>,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let ttl = cluster.settings.ttl.max(Duration::from_secs(2));
        let mut tick = tokio::time::interval(ttl / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed = Instant::now();
        // A write in flight, with the number of the link it went out on.
        let mut writing: Option<(Outgoing, WriteFuture, u64)> = None;
        let mut relinking: Option<LinkFuture> = None;
        let mut relessing: Option<LesseeFuture> = None;
        // Links made so far, and since when the link has been down.
        let mut links: u64 = 0;
        let mut link_down: Option<Instant> = None;
        loop {
            if self.link.is_none() && link_down.is_none() {
                link_down = Some(Instant::now());
            }
            if writing.is_none() && self.link.is_some() {
                if let Some(out) = self.pending.pop_front() {
                    let write = self.write(cluster, &out);
                    writing = Some((out, write, links));
                }
            }
            let in_flight = async {
                match writing.as_mut() {
                    Some((_, write, _)) => write.await,
                    None => std::future::pending().await,
                }
            };
            let keep_alive = async {
                match self.lessee.as_mut() {
                    Some(l) => l.keep_alive.message().await,
                    None => std::future::pending().await,
                }
            };
            // The link's watch and keep-alive streams, polled side by side
            // (one borrow of the link).
            let (watched, link_keep_alive) = match self.link.as_mut() {
                Some(l) => (
                    futures::future::Either::Left(l.watch.message()),
                    futures::future::Either::Left(l.keep_alive.message()),
                ),
                None => (
                    futures::future::Either::Right(std::future::pending()),
                    futures::future::Either::Right(std::future::pending()),
                ),
            };
            tokio::select! {
                written = in_flight => {
                    let (out, _, on_link) = writing.take().expect("a write was in flight");
                    match written {
                        Ok(()) => {}
                        Err(Written::Late(e)) => {
                            tracing::debug!(error = %e, "cluster write unanswered; trying again");
                            self.queue(out);
                        }
                        Err(Written::Broken(e)) => {
                            self.queue(out);
                            // Only if it broke on the link in use (not on
                            // one already made again).
                            if on_link == links && self.link.take().is_some() {
                                relinking = Some(self.relink(cluster, &e));
                            }
                        }
                        Err(Written::Failed(e)) => return Err(e),
                    }
                }
                _ = shutdown.cancelled() => {
                    // Leaving: survivors take over this replica's backends now.
                    let client = match (self.lessee.as_mut(), self.link.as_mut()) {
                        (Some(l), _) => Some(&mut l.client),
                        (None, Some(l)) => Some(&mut l.client),
                        (None, None) => None,
                    };
                    if let Some(client) = client {
                        let _ = timed("lease revoke", client.lease_revoke(self.lease)).await;
                    }
                    return Ok(());
                }
                _ = tick.tick() => {
                    if renewed.elapsed() > ttl {
                        return Err(format!("lease not renewed for {:?}", renewed.elapsed()));
                    }
                    // Without its watch, this replica's view of the
                    // cluster goes stale and its results stay unwritten:
                    // a link not made again within a TTL ends the session
                    // (which moves to the next member).
                    if link_down.is_some_and(|since| since.elapsed() > ttl) {
                        return Err(format!(
                            "cluster watch connection not made again for {:?}",
                            link_down.map(|s| s.elapsed()).unwrap_or_default()
                        ));
                    }
                    if renewed.elapsed() > ttl * 2 / 5 && relessing.is_none() {
                        // Both connections stalled (on a lossy link a TCP
                        // connection's retransmission timeout can grow to
                        // seconds): a fresh one starts with a fresh timeout.
                        tracing::info!(late = ?renewed.elapsed(), lease = self.lease,
                            "lease keep-alive answers late; a fresh connection beside the stalled ones");
                        cluster.catalog.metrics().upstream_reconnect("cluster_lease");
                        relessing = Some(Lessee::resume(cluster, self.lease, Duration::ZERO));
                    }
                    if let Some(l) = self.lessee.as_mut() {
                        if let Err(e) = timed("keep-alive", l.keeper.keep_alive()).await {
                            self.lessee = None;
                            relessing = Some(self.reless(cluster, &e));
                        }
                    }
                    if let Some(l) = self.link.as_mut() {
                        if let Err(e) = timed("keep-alive", l.keeper.keep_alive()).await {
                            self.link = None;
                            relinking = Some(self.relink(cluster, &e));
                        }
                    }
                }
                answer = link_keep_alive => match renewal(answer, self.lease)? {
                    None => renewed = Instant::now(),
                    Some(why) => {
                        self.link = None;
                        relinking = Some(self.relink(cluster, &why));
                    }
                },
                answer = keep_alive => match renewal(answer, self.lease)? {
                    None => renewed = Instant::now(),
                    Some(why) => {
                        self.lessee = None;
                        relessing = Some(self.reless(cluster, &why));
                    }
                },
                made = async { relessing.as_mut().expect("guarded").await }, if relessing.is_some() => {
                    relessing = None;
                    match made {
                        Ok(l) => {
                            tracing::info!(lease = self.lease, "lease keep-alive resumed on a new connection");
                            self.lessee = Some(l);
                        }
                        Err(e) if self.lessee.is_none() || renewed.elapsed() > ttl * 2 / 5 => {
                            // The lease's own end (the tick) ends the session.
                            tracing::debug!(error = %e, "lease keep-alive connection not made; trying again");
                            relessing = Some(Lessee::resume(cluster, self.lease, RELINK_DELAY));
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "spare lease keep-alive connection not made; the old one answers again");
                        }
                    }
                }
                message = watched => {
                    let response = match message {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            self.link = None;
                            relinking = Some(self.relink(cluster, "watch stream ended"));
                            continue;
                        }
                        Err(e) => {
                            self.link = None;
                            relinking = Some(self.relink(cluster, &format!("watch: {e}")));
                            continue;
                        }
                    };
                    if response.canceled() {
                        // A member without a leader, or a compacted
                        // revision: the session starts again elsewhere.
                        return Err(format!("watch cancelled: {}", response.cancel_reason()));
                    }
                    let mut replicas_changed = false;
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        replicas_changed |= match event.event_type() {
                            EventType::Put => {
                                self.on_put(cluster, &key, kv.value(), kv.create_revision())
                            }
                            EventType::Delete => self.on_delete(cluster, &key),
                        };
                    }
                    if replicas_changed {
                        set_connected(cluster, true, Some(self.replicas.values().cloned().collect()));
                    }
                }
                made = async { relinking.as_mut().expect("guarded").await }, if relinking.is_some() => {
                    relinking = None;
                    match made {
                        Ok(mut link) => {
                            let listing = std::mem::take(&mut link.listing);
                            tracing::info!(revision = link.revision, "cluster watch resumed on a new connection");
                            links += 1;
                            link_down = None;
                            self.link = Some(link);
                            self.apply_listing(cluster, &listing);
                        }
                        Err(e) => {
                            // The next member, after a pause; the tick ends
                            // the session if this goes on for a TTL.
                            tracing::debug!(error = %e, "cluster watch connection not made; trying the next member");
                            cluster.settings.etcd.rotate();
                            relinking = Some(Link::make(cluster, self.lease, RELINK_DELAY));
                        }
                    }
                }
                Some(out) = outbox.recv() => {
                    self.queue(out);
                    while let Ok(out) = outbox.try_recv() {
                        self.queue(out);
                    }
                }
            }
        }
    }

    /// The connection of the listing, watch and writes broke (`why`): it is
    /// made again while the lease holds.
    fn relink(&self, cluster: &Cluster, why: &str) -> LinkFuture {
        tracing::info!(error = %why, "cluster watch connection lost; making it again (the lease holds)");
        cluster
            .catalog
            .metrics()
            .upstream_reconnect("cluster_watch");
        Link::make(cluster, self.lease, RELINK_DELAY)
    }

    /// The connection of the lease's keep-alive broke (`why`): it is made
    /// again for the same lease, which etcd keeps until its TTL runs out.
    fn reless(&self, cluster: &Cluster, why: &str) -> LesseeFuture {
        tracing::info!(error = %why, lease = self.lease, "lease keep-alive connection lost; making it again");
        cluster
            .catalog
            .metrics()
            .upstream_reconnect("cluster_lease");
        Lessee::resume(cluster, self.lease, RELINK_DELAY)
    }

    /// Queues a write of `out` unless one is queued already.
    fn queue(&mut self, out: Outgoing) {
        if !self.pending.contains(&out) {
            self.pending.push_back(out);
        }
    }

    /// The write (or deletion) of this replica's result or opinion for a
    /// backend, with the value it has now.
    fn write(&self, cluster: &Cluster, out: &Outgoing) -> WriteFuture {
        let prefix = &cluster.settings.prefix;
        let (etcd_key, value, what) = match out {
            Outgoing::Health(key) => (
                shared::key(prefix, &key.0, key.1),
                cluster
                    .outgoing(key)
                    .map(|v| serde_json::to_vec(&v).expect("shared health serializes")),
                "health",
            ),
            Outgoing::Opinion(key) => (
                opinion::key(
                    prefix,
                    opinion::OPINIONS,
                    &key.0,
                    key.1,
                    &cluster.settings.replica_id,
                ),
                cluster
                    .outgoing_opinion(key)
                    .map(|v| serde_json::to_vec(&v).expect("opinion serializes")),
                "opinion",
            ),
            Outgoing::Vote(key) => (
                opinion::key(
                    prefix,
                    opinion::VOTES,
                    &key.0,
                    key.1,
                    &cluster.settings.replica_id,
                ),
                cluster
                    .outgoing_vote(key)
                    .map(|v| serde_json::to_vec(&v).expect("vote serializes")),
                "gray-failure vote",
            ),
        };
        let mut client = self
            .link
            .as_ref()
            .expect("writes wait for the link")
            .client
            .clone();
        let lease = self.lease;
        Box::pin(async move {
            let answer = match value {
                Some(bytes) => {
                    let options = PutOptions::new().with_lease(lease);
                    let put = client.put(etcd_key, bytes, Some(options));
                    tokio::time::timeout(REQUEST_TIMEOUT, put)
                        .await
                        .map(|r| r.map(drop))
                }
                None => {
                    let delete = client.delete(etcd_key, None);
                    tokio::time::timeout(REQUEST_TIMEOUT, delete)
                        .await
                        .map(|r| r.map(drop))
                }
            };
            settle(what, answer)
        })
    }
}

/// What a keep-alive stream's message means: the lease renewed (`None`),
/// the stream broken (`Some(why)`: its connection is made again), or the
/// lease gone (`Err`: the session is over).
fn renewal(
    answer: Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error>,
    lease: i64,
) -> Result<Option<String>, String> {
    match answer {
        Ok(Some(r)) if r.ttl() > 0 => Ok(None),
        Ok(Some(_)) => Err(format!("lease {lease} expired")),
        Ok(None) => Ok(Some("keep-alive stream ended".into())),
        Err(e) => Ok(Some(format!("keep-alive: {e}"))),
    }
}

/// What a write's answer means for the session.
fn settle(
    what: &str,
    answer: Result<Result<(), etcd_client::Error>, tokio::time::error::Elapsed>,
) -> Result<(), Written> {
    {
        match answer {
            Ok(Ok(())) => Ok(()),
            Err(_) => Err(Written::Late(format!(
                "{what}: no answer within {REQUEST_TIMEOUT:?}"
            ))),
            // The client's own deadline (a slow link), or a cluster between
            // leaders (an election after a partition heals): not a refusal.
            Ok(Err(etcd_client::Error::GRpcStatus(s)))
                if matches!(
                    s.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ) || s.message().contains("no leader")
                    || s.message().contains("leader changed") =>
            {
                Err(Written::Late(format!("{what}: {}", s.message())))
            }
            // The connection broke (a PING answered late, a reset).
            Ok(Err(etcd_client::Error::GRpcStatus(s)))
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) =>
            {
                Err(Written::Broken(format!("{what}: {}", s.message())))
            }
            Ok(Err(e @ etcd_client::Error::TransportError(_))) => {
                Err(Written::Broken(format!("{what}: {e}")))
            }
            Ok(Err(e)) => Err(Written::Failed(format!("publish {what}: {e}"))),
        }
    }
}

impl Session {
    /// Applies one key read from etcd; returns whether the replica set changed.
    fn on_put(&mut self, cluster: &Cluster, key: &str, value: &[u8], revision: i64) -> bool {
        let prefix = &cluster.settings.prefix;
        if let Some(id) = key
            .strip_prefix(prefix.as_str())
            .and_then(|k| k.strip_prefix("replicas/"))
        {
            let info = serde_json::from_slice::<ReplicaInfo>(value).unwrap_or_else(|e| {
                tracing::warn!(key, error = %e, "unreadable replica entry; counting the replica anyway");
                ReplicaInfo {
                    id: id.to_string(),
                    lb_addr: String::new(),
                    admin_addr: String::new(),
                }
            });
            let info = ReplicaInfo {
                id: id.to_string(),
                ..info
            };
            return self.replicas.insert(id.to_string(), info.clone()) != Some(info);
        }
        if let Some(k) = shared::parse_key(prefix, key) {
            match serde_json::from_slice::<SharedHealth>(value) {
                Ok(v) => cluster.on_remote(k, Some(v)),
                Err(e) => tracing::warn!(key, error = %e, "unreadable shared health entry ignored"),
            }
        } else if let Some((k, replica)) = opinion::parse_key(prefix, opinion::OPINIONS, key) {
            match serde_json::from_slice::<Opinion>(value) {
                Ok(v) => cluster.on_opinion(k, replica, Some(v.health)),
                Err(e) => tracing::warn!(key, error = %e, "unreadable witness opinion ignored"),
            }
        } else if let Some((k, replica)) = opinion::parse_key(prefix, opinion::VOTES, key) {
            match serde_json::from_slice::<Vote>(value) {
                Ok(v) => cluster.on_vote(k, replica, Some((v, revision))),
                Err(e) => tracing::warn!(key, error = %e, "unreadable gray-failure vote ignored"),
            }
        }
        false
    }

    /// Applies one deletion read from etcd; returns whether the replica set
    /// changed.
    fn on_delete(&mut self, cluster: &Cluster, key: &str) -> bool {
        let prefix = &cluster.settings.prefix;
        if let Some(id) = key
            .strip_prefix(prefix.as_str())
            .and_then(|k| k.strip_prefix("replicas/"))
        {
            if id == cluster.settings.replica_id {
                tracing::warn!("this replica's key was deleted; it stays until the session ends");
                return false;
            }
            return self.replicas.remove(id).is_some();
        }
        if let Some(k) = shared::parse_key(prefix, key) {
            cluster.on_remote(k, None);
        } else if let Some((k, replica)) = opinion::parse_key(prefix, opinion::OPINIONS, key) {
            cluster.on_opinion(k, replica, None);
        } else if let Some((k, replica)) = opinion::parse_key(prefix, opinion::VOTES, key) {
            cluster.on_vote(k, replica, None);
        }
        false
    }
}
