//! Replicas sharing one etcd: who health-checks which backend.
//!
//! Every replica registers itself under `<prefix>replicas/<id>` with a lease
//! and watches that prefix, so each knows the live replicas. A backend is
//! checked by one replica only, its *owner*: the rendezvous-hash winner of
//! `service|addr` over the live replica ids ([`crate::rendezvous`]). The
//! owner writes each result to `<prefix>health/<service>/<addr>` (attached
//! to its lease) and every other replica applies what it reads there, so all
//! replicas hold the same health and load and build the same lists, while
//! each backend sees the checks of one replica instead of N.
//!
//! When a replica dies its lease expires (`--replica-ttl`), its key
//! disappears and the survivors take over its backends. When a replica loses
//! etcd itself it cannot know who else is alive, so it checks every backend
//! on its own until it is back (*degraded*): more checks, never fewer.
//!
//! A replica cut off from etcd but not from its clients and backends (a
//! partition, DESIGN §8) is the case this arrangement is for. Its lease
//! runs out in etcd after the TTL, so the others take its backends over
//! within the TTL plus one probe interval; it stops hearing keep-alive
//! answers after the same TTL and turns degraded. Both sides then check
//! more, never less, and neither side's lists shrink: the cut replica keeps
//! its own probes' results and its registry's last known state (an
//! unreachable etcd never becomes an empty list). Degraded is shown, not
//! hidden: the `lb_cluster_degraded` gauge, a `/readyz` detail (the replica
//! stays ready: it serves lists its own probes back) and a WARN line, from
//! the session's loss until it rejoins ([`Cluster::degraded`]). Rejoining
//! republishes its own results under a new lease and changes no list whose
//! health did not change.
//!
//! One replica's silence never judges alone. When a backend's owner finds
//! it *silent* (no answer at all, which may be that replica's path only),
//! every other replica probes it too, as a *witness*, and publishes what it
//! finds under `<prefix>opinions/…` ([`opinion`]); the policy removes a
//! silent backend that a witness confirms, holds one a witness finds
//! serving, and caps what one view alone may remove ([`crate::policy`]).
//! Opinions read before a session loss are forgotten with it: a replica cut
//! off from etcd judges on its own view, within the cap.
//!
//! Gray-failure ejections are shared the same way: a replica that ejects a
//! backend on its clients' reports publishes a vote under
//! `<prefix>gray/<service>/<addr>/<replica>` (on its lease), and every
//! replica adopts the votes it reads, within one cap, so that all publish
//! the same ejected set ([`crate::gray::shared`]).
//!
//! Load reports are published only when they moved by 5 % (or every 30 s),
//! and the owner applies the published value itself, so that every replica
//! weights from the same numbers.

pub mod opinion;
mod session;
pub mod shared;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, OwnVotes, Votes};
use crate::gray::shared::{ReadVote, Vote};
use crate::model::{HealthState, LoadSample};
use opinion::Opinion;
use shared::{SharedHealth, SharedLoad};

/// A backend, as the cluster names it.
pub type BackendKey = (String, SocketAddr);

/// What this replica has to write to etcd.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Outgoing {
    /// Its result for a backend it owns.
    Health(BackendKey),
    /// Its opinion, as a witness, of a backend another replica owns.
    Opinion(BackendKey),
    /// Its gray-failure ejection of a backend ([`crate::gray::shared`]).
    Vote(BackendKey),
}

/// Settings of cluster membership.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The etcd cluster and how to get in.
    pub etcd: crate::registry::etcd::EtcdAccess,
    /// Key prefix of the cluster's own keys (ends with `/`).
    pub prefix: String,
    /// This replica's id (unique among live replicas).
    pub replica_id: String,
    /// Lease time to live: how long a dead replica's backends stay unchecked.
    pub ttl: Duration,
    /// Advertised in the replica's key, for operators.
    pub lb_addr: SocketAddr,
    /// Advertised in the replica's key, for operators.
    pub admin_addr: SocketAddr,
}

/// One live replica, as advertised in etcd.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaInfo {
    /// Its id.
    pub id: String,
    /// Its gRPC address.
    pub lb_addr: String,
    /// Its admin address.
    pub admin_addr: String,
}

/// What this replica knows of the cluster now.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct View {
    /// This replica's id.
    pub replica_id: String,
    /// Whether the etcd session is up; when not, this replica checks every
    /// backend itself.
    pub connected: bool,
    /// Live replicas, sorted by id.
    pub replicas: Vec<ReplicaInfo>,
}

impl View {
    /// The replica that checks `service` at `addr`; `None` while
    /// disconnected (then everyone checks it).
    pub fn owner(&self, service: &str, addr: SocketAddr) -> Option<&str> {
        if !self.connected || self.replicas.is_empty() {
            return None;
        }
        crate::rendezvous::winner(
            &format!("{service}|{addr}"),
            self.replicas.iter().map(|r| r.id.as_str()),
        )
    }
}

/// Why and since when a replica has no etcd session ([`Cluster::degraded`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Degraded {
    /// How long it has been without a session (seconds, in JSON).
    #[serde(rename = "lasted_s", serialize_with = "secs")]
    pub lasted: Duration,
    /// The last error of the session, or why none was opened yet.
    pub reason: String,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 10.0).round() / 10.0)
}

impl Degraded {
    /// One line for operators (`/readyz`).
    pub fn detail(&self) -> String {
        format!(
            "degraded: no etcd cluster session for {:.1} s ({}); checking every backend locally, \
             lists kept",
            self.lasted.as_secs_f64(),
            self.reason
        )
    }
}

/// The state behind [`Cluster::degraded`].
struct Lost {
    since: Instant,
    reason: String,
    /// Sessions failed since the last one that was up.
    failures: u32,
}

/// Results this replica published, to republish after a reconnect.
struct Published {
    value: SharedHealth,
    load_at: Instant,
}

/// Membership and shared health of one replica.
pub struct Cluster {
    settings: ClusterSettings,
    catalog: Arc<Catalog>,
    view: watch::Sender<View>,
    /// Results published by every owner, as last read from etcd.
    remote: Mutex<HashMap<BackendKey, SharedHealth>>,
    /// Results this replica owns and published.
    mine: Mutex<HashMap<BackendKey, Published>>,
    /// Witnesses' opinions of backends, by replica id, as read from etcd
    /// (this replica's own included at once).
    opinions: Mutex<HashMap<BackendKey, BTreeMap<String, HealthState>>>,
    /// Opinions this replica holds as a witness and published.
    witnessing: Mutex<HashMap<BackendKey, Opinion>>,
    /// Gray-failure votes of every replica, as read from etcd (this
    /// replica's own once read back), by service and backend.
    votes: Mutex<Votes>,
    /// This replica's own votes, as published, with when each ejection
    /// ends (what is left of it is written, not what was).
    voting: Mutex<HashMap<BackendKey, (Vote, Instant)>>,
    /// Bumped when the backends that need a witness may have changed.
    suspects: watch::Sender<u64>,
    /// Keys to write (or delete) in etcd.
    outbox: mpsc::UnboundedSender<Outgoing>,
    outbox_rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
    /// Since when and why there is no etcd session (`None`: joined).
    lost: Mutex<Option<Lost>>,
}

impl Cluster {
    /// A cluster member feeding `catalog`; call [`Cluster::run`] to join.
    pub fn new(settings: ClusterSettings, catalog: Arc<Catalog>) -> Arc<Self> {
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        catalog.metrics().cluster_degraded.set(1);
        let view = View {
            replica_id: settings.replica_id.clone(),
            connected: false,
            replicas: Vec::new(),
        };
        Arc::new(Cluster {
            settings,
            catalog,
            view: watch::channel(view).0,
            remote: Mutex::new(HashMap::new()),
            mine: Mutex::new(HashMap::new()),
            opinions: Mutex::new(HashMap::new()),
            witnessing: Mutex::new(HashMap::new()),
            votes: Mutex::new(Votes::new()),
            voting: Mutex::new(HashMap::new()),
            suspects: watch::channel(0).0,
            outbox,
            outbox_rx: Mutex::new(Some(outbox_rx)),
            lost: Mutex::new(Some(Lost {
                since: Instant::now(),
                reason: "not joined yet".into(),
                failures: 0,
            })),
        })
    }

    /// Why and for how long this replica has had no etcd session; `None`
    /// while it is joined.
    pub fn degraded(&self) -> Option<Degraded> {
        let lost = self.lost.lock().expect("cluster lock");
        lost.as_ref().map(|l| Degraded {
            lasted: l.since.elapsed(),
            reason: l.reason.clone(),
        })
    }

    /// The session broke (or could not be opened) with `error`: degraded
    /// from the first failure on, with the latest error as the reason.
    /// Returns whether this is the first failure since a session was up (or
    /// since start), the one worth a WARN line: a long partition fails a
    /// retry every few seconds, and one line says it all.
    fn session_lost(&self, error: &str) -> bool {
        let mut lost = self.lost.lock().expect("cluster lock");
        let l = lost.get_or_insert_with(|| Lost {
            since: Instant::now(),
            reason: String::new(),
            failures: 0,
        });
        l.reason = error.to_string();
        l.failures += 1;
        self.catalog.metrics().cluster_degraded.set(1);
        l.failures == 1
    }

    /// A session is up: no longer degraded. Returns how long it was.
    fn session_joined(&self) -> Option<Duration> {
        let was = self.lost.lock().expect("cluster lock").take();
        self.catalog.metrics().cluster_degraded.set(0);
        was.map(|l| l.since.elapsed())
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.settings.replica_id
    }

    /// The cluster as this replica sees it now.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// Changes whenever the replica set or the connection changes.
    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    /// Whether this replica checks `service` at `addr`.
    pub fn owns(&self, service: &str, addr: SocketAddr) -> bool {
        self.view
            .borrow()
            .owner(service, addr)
            .is_none_or(|o| o == self.settings.replica_id)
    }

    /// Records a health result of a backend this replica checks: applied
    /// locally at once and published to the other replicas.
    pub fn report_health(
        &self,
        service: &str,
        addr: SocketAddr,
        health: HealthState,
        detail: &str,
    ) {
        self.catalog.set_health(service, addr, health, detail);
        let key = (service.to_string(), addr);
        let mut mine = self.mine.lock().expect("cluster lock");
        match mine.get_mut(&key) {
            Some(slot) if slot.value.health == health && slot.value.detail == detail => return,
            Some(slot) => {
                slot.value.health = health;
                slot.value.detail = detail.to_string();
            }
            None => {
                let value = SharedHealth {
                    owner: self.settings.replica_id.clone(),
                    health,
                    detail: detail.to_string(),
                    load: None,
                };
                mine.insert(
                    key.clone(),
                    Published {
                        value,
                        load_at: Instant::now(),
                    },
                );
            }
        }
        let _ = self.outbox.send(Outgoing::Health(key));
    }

    /// Records a load report of a backend this replica checks; published
    /// (and applied locally) only when it moved enough.
    pub fn report_load(&self, service: &str, addr: SocketAddr, report: &LoadSample) {
        let load = SharedLoad::from(report);
        let key = (service.to_string(), addr);
        let mut mine = self.mine.lock().expect("cluster lock");
        let Some(slot) = mine.get_mut(&key) else {
            // No health result yet: nothing published to attach it to.
            self.catalog.set_load(service, addr, report);
            return;
        };
        let worth = match &slot.value.load {
            None => true,
            Some(published) => load.worth_publishing(published, slot.load_at),
        };
        if !worth {
            return;
        }
        self.catalog.set_load(service, addr, &load.to_sample());
        slot.value.load = Some(load);
        slot.load_at = Instant::now();
        let _ = self.outbox.send(Outgoing::Health(key));
    }

    /// Forgets the load of a backend this replica checks (its report stream
    /// ended).
    pub fn clear_load(&self, service: &str, addr: SocketAddr) {
        self.catalog.clear_load(service, addr);
        let key = (service.to_string(), addr);
        let mut mine = self.mine.lock().expect("cluster lock");
        if let Some(slot) = mine.get_mut(&key) {
            if slot.value.load.take().is_some() {
                let _ = self.outbox.send(Outgoing::Health(key));
            }
        }
    }

    /// This replica stopped checking a backend because another owns it now:
    /// its last result stays in etcd until the new owner overwrites it.
    pub fn release(&self, service: &str, addr: SocketAddr) {
        let key = (service.to_string(), addr);
        self.mine.lock().expect("cluster lock").remove(&key);
        self.apply_remote(&key);
    }

    /// A backend left the registry: its shared result is deleted.
    pub fn withdraw(&self, service: &str, addr: SocketAddr) {
        let key = (service.to_string(), addr);
        if self
            .mine
            .lock()
            .expect("cluster lock")
            .remove(&key)
            .is_some()
        {
            let _ = self.outbox.send(Outgoing::Health(key));
        }
    }

    /// Changes whenever the backends that need a witness may have changed
    /// (see [`Cluster::needs_witness`]).
    pub fn subscribe_suspects(&self) -> watch::Receiver<u64> {
        self.suspects.subscribe()
    }

    /// Whether this replica should probe `service` at `addr` as a witness:
    /// it is joined, another replica owns the backend, and the owner finds
    /// it silent.
    pub fn needs_witness(&self, service: &str, addr: SocketAddr) -> bool {
        let view = self.view.borrow();
        if !view.connected {
            return false;
        }
        let owner = view.owner(service, addr);
        if owner.is_none_or(|o| o == self.settings.replica_id) {
            return false;
        }
        let key = (service.to_string(), addr);
        self.remote
            .lock()
            .expect("cluster lock")
            .get(&key)
            .is_some_and(|v| v.health == HealthState::Silent && Some(v.owner.as_str()) == owner)
    }

    /// Records what this replica's witness probe found for a backend
    /// another replica owns: applied locally and published.
    pub fn report_opinion(
        &self,
        service: &str,
        addr: SocketAddr,
        health: HealthState,
        detail: &str,
    ) {
        let key = (service.to_string(), addr);
        let value = Opinion {
            health,
            detail: detail.to_string(),
        };
        {
            let mut witnessing = self.witnessing.lock().expect("cluster lock");
            if witnessing.get(&key) == Some(&value) {
                return;
            }
            witnessing.insert(key.clone(), value);
        }
        let _ = self.outbox.send(Outgoing::Opinion(key.clone()));
        let me = self.settings.replica_id.clone();
        self.on_opinion(key, me, Some(health));
    }

    /// This replica stopped witnessing a backend: its opinion is deleted.
    pub fn withdraw_opinion(&self, service: &str, addr: SocketAddr) {
        let key = (service.to_string(), addr);
        if self
            .witnessing
            .lock()
            .expect("cluster lock")
            .remove(&key)
            .is_some()
        {
            let _ = self.outbox.send(Outgoing::Opinion(key.clone()));
            let me = self.settings.replica_id.clone();
            self.on_opinion(key, me, None);
        }
    }

    /// An opinion read from etcd or made here (`None`: withdrawn); the
    /// catalog gets the backend's opinions when they changed.
    fn on_opinion(&self, key: BackendKey, replica: String, health: Option<HealthState>) {
        let opinions = {
            let mut all = self.opinions.lock().expect("cluster lock");
            let of = all.entry(key.clone()).or_default();
            let changed = match health {
                Some(h) => of.insert(replica, h) != Some(h),
                None => of.remove(&replica).is_some(),
            };
            if !changed {
                return;
            }
            let now = of.clone();
            if now.is_empty() {
                all.remove(&key);
            }
            now
        };
        self.catalog.set_opinions(&key.0, key.1, &opinions);
    }

    /// Forgets every opinion read (the session is gone: they may be stale,
    /// and a replica on its own judges on its own view).
    fn forget_opinions(&self) {
        let all = std::mem::take(&mut *self.opinions.lock().expect("cluster lock"));
        let none = BTreeMap::new();
        for (service, addr) in all.keys() {
            self.catalog.set_opinions(service, *addr, &none);
        }
    }

    /// The cluster's gray-failure votes as read (empty while the session
    /// is down: a replica on its own judges alone).
    pub fn votes(&self) -> Votes {
        self.votes.lock().expect("cluster lock").clone()
    }

    /// Publishes this replica's own ejections as its votes: a new vote for
    /// a new ejection (or a repeat), a withdrawal for one that ended.
    pub fn publish_votes(&self, own: OwnVotes) {
        let at = Instant::now();
        let mut voting = self.voting.lock().expect("cluster lock");
        let mut now: HashMap<BackendKey, Vote> = HashMap::with_capacity(own.len());
        for (service, addr, vote) in own {
            now.insert((service, addr), vote);
        }
        let withdrawn: Vec<BackendKey> = voting
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        for key in withdrawn {
            voting.remove(&key);
            let _ = self.outbox.send(Outgoing::Vote(key));
        }
        for (key, vote) in now {
            // The remaining time shrinks every second; only a new ejection
            // (or a longer one) is written again.
            let same = voting.get(&key).is_some_and(|(v, _)| v.times == vote.times);
            if !same {
                let ends = at + vote.remaining;
                voting.insert(key.clone(), (vote, ends));
                let _ = self.outbox.send(Outgoing::Vote(key));
            }
        }
    }

    /// A vote read from etcd (`None`: withdrawn) by `replica`, with the
    /// revision that created its key.
    fn on_vote(&self, key: BackendKey, replica: String, vote: Option<(Vote, i64)>) {
        // A vote of this replica's that it no longer holds (a write that
        // landed after its withdrawal, or one of an earlier run under the
        // same id): withdrawn again.
        if vote.is_some()
            && replica == self.settings.replica_id
            && !self.voting.lock().expect("cluster lock").contains_key(&key)
        {
            let _ = self.outbox.send(Outgoing::Vote(key.clone()));
        }
        let mut all = self.votes.lock().expect("cluster lock");
        let (service, addr) = key;
        let of_service = all.entry(service.clone()).or_default();
        let of = of_service.entry(addr).or_default();
        let was = of
            .iter()
            .position(|v| v.replica == replica)
            .map(|i| of.swap_remove(i));
        if let Some((vote, revision)) = vote {
            // Read again unchanged (a re-listing): it was read back then.
            let read_at = match was {
                Some(w) if w.revision == revision && w.vote == vote => w.read_at,
                _ => Instant::now(),
            };
            of.push(ReadVote {
                replica,
                vote,
                revision,
                read_at,
            });
        }
        if of.is_empty() {
            of_service.remove(&addr);
            if of_service.is_empty() {
                all.remove(&service);
            }
        }
    }

    /// Every vote read, as (backend, voter).
    fn votes_read(&self) -> Vec<(BackendKey, String)> {
        let all = self.votes.lock().expect("cluster lock");
        all.iter()
            .flat_map(|(service, of)| {
                of.iter().flat_map(move |(addr, votes)| {
                    votes
                        .iter()
                        .map(move |v| ((service.clone(), *addr), v.replica.clone()))
                })
            })
            .collect()
    }

    /// Forgets every vote read (the session is gone: a replica on its own
    /// judges alone, and what it only adopted ends in probation).
    fn forget_votes(&self) {
        self.votes.lock().expect("cluster lock").clear();
    }

    /// What to write for a vote key: this replica's, or `None` to delete.
    fn outgoing_vote(&self, key: &BackendKey) -> Option<Vote> {
        let voting = self.voting.lock().expect("cluster lock");
        let (vote, ends) = voting.get(key)?;
        Some(Vote {
            remaining: ends.saturating_duration_since(Instant::now()),
            ..vote.clone()
        })
    }

    /// What to write for an opinion key: this replica's, or `None` to delete.
    fn outgoing_opinion(&self, key: &BackendKey) -> Option<Opinion> {
        self.witnessing
            .lock()
            .expect("cluster lock")
            .get(key)
            .cloned()
    }

    /// Applies the owner's published result for a backend this replica does
    /// not check (if one was read).
    pub fn apply_remote(&self, key: &BackendKey) {
        if self.owns(&key.0, key.1) {
            return;
        }
        let value = self.remote.lock().expect("cluster lock").get(key).cloned();
        if let Some(v) = value {
            self.apply(key, &v);
        }
    }

    fn apply(&self, (service, addr): &BackendKey, v: &SharedHealth) {
        self.catalog.set_health(service, *addr, v.health, &v.detail);
        match &v.load {
            Some(load) => self.catalog.set_load(service, *addr, &load.to_sample()),
            None => self.catalog.clear_load(service, *addr),
        }
    }

    /// A result read from etcd (`None`: deleted).
    fn on_remote(&self, key: BackendKey, value: Option<SharedHealth>) {
        let silent = |v: Option<&SharedHealth>| v.is_some_and(|v| v.health == HealthState::Silent);
        let silence_changed = match value {
            Some(v) => {
                let theirs = v.owner != self.settings.replica_id;
                let was = self
                    .remote
                    .lock()
                    .expect("cluster lock")
                    .insert(key.clone(), v.clone());
                if theirs && !self.owns(&key.0, key.1) {
                    self.apply(&key, &v);
                }
                silent(was.as_ref()) != (v.health == HealthState::Silent)
            }
            None => {
                // The last known state stays until someone publishes anew.
                let was = self.remote.lock().expect("cluster lock").remove(&key);
                silent(was.as_ref())
            }
        };
        if silence_changed {
            self.suspects.send_modify(|n| *n += 1);
        }
    }

    /// What to write for `key`: this replica's result, or `None` to delete.
    fn outgoing(&self, key: &BackendKey) -> Option<SharedHealth> {
        self.mine
            .lock()
            .expect("cluster lock")
            .get(key)
            .map(|p| p.value.clone())
    }

    /// Keys to republish after (re)joining: this replica's results for the
    /// backends it owns under the new view (the others are forgotten), and
    /// its opinions as a witness.
    fn republish(&self) -> Vec<Outgoing> {
        let mut mine = self.mine.lock().expect("cluster lock");
        mine.retain(|(service, addr), _| self.owns(service, *addr));
        let witnessing = self.witnessing.lock().expect("cluster lock");
        let voting = self.voting.lock().expect("cluster lock");
        mine.keys()
            .cloned()
            .map(Outgoing::Health)
            .chain(witnessing.keys().cloned().map(Outgoing::Opinion))
            .chain(voting.keys().cloned().map(Outgoing::Vote))
            .collect()
    }

    /// Joins the cluster and keeps membership and shared results in sync
    /// with etcd until `shutdown`; leaves (revokes its lease) on the way out.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut outbox) = self.outbox_rx.lock().expect("cluster lock").take() else {
            return;
        };
        session::run(&self, &mut outbox, &shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::policy::Policy;

    fn cluster() -> (Arc<Cluster>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let catalog = Arc::new(Catalog::new(Policy::default(), metrics.clone(), 1, false));
        let settings = ClusterSettings {
            etcd: crate::registry::etcd::EtcdAccess::plain(vec!["127.0.0.1:2379".into()]),
            prefix: "/lb/".into(),
            replica_id: "r1".into(),
            ttl: Duration::from_secs(2),
            lb_addr: "127.0.0.1:7000".parse().unwrap(),
            admin_addr: "127.0.0.1:7001".parse().unwrap(),
        };
        (Cluster::new(settings, catalog), metrics)
    }

    #[test]
    fn degraded_from_the_first_loss_until_joined() {
        let (c, metrics) = cluster();
        // Not joined yet: degraded, and it says so.
        let d = c.degraded().expect("degraded before joining");
        assert_eq!(d.reason, "not joined yet");
        assert_eq!(metrics.cluster_degraded.get(), 1);

        c.session_joined();
        assert_eq!(c.degraded(), None);
        assert_eq!(metrics.cluster_degraded.get(), 0);

        assert!(c.session_lost("lease not renewed for 2.1s"), "first loss");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!c.session_lost("connect: no answer within 2s"), "a retry");
        let d = c.degraded().expect("degraded after a loss");
        // The latest error, counted from the first loss.
        assert_eq!(d.reason, "connect: no answer within 2s");
        assert!(d.lasted >= Duration::from_millis(20));
        assert!(d.detail().contains("no etcd cluster session"));
        assert_eq!(metrics.cluster_degraded.get(), 1);

        let was = c.session_joined().expect("it was degraded");
        assert!(was >= Duration::from_millis(20));
        assert_eq!(c.degraded(), None);
        assert_eq!(metrics.cluster_degraded.get(), 0);
        // A loss after rejoining is a first loss again.
        assert!(c.session_lost("keep-alive stream ended"));
    }

    #[test]
    fn a_disconnected_replica_checks_every_backend() {
        let (c, _) = cluster();
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let other = ReplicaInfo {
            id: "r2".into(),
            lb_addr: String::new(),
            admin_addr: String::new(),
        };
        let me = ReplicaInfo {
            id: "r1".into(),
            ..other.clone()
        };
        let mut view = View {
            replica_id: "r1".into(),
            connected: true,
            replicas: vec![me, other],
        };
        // Find a backend the other replica owns while connected…
        let theirs = (0..100)
            .map(|i| format!("svc{i}"))
            .find(|s| view.owner(s, addr) == Some("r2"))
            .expect("some service owned by r2");
        c.view.send_replace(view.clone());
        assert!(!c.owns(&theirs, addr));
        // …and cut off from etcd, this replica checks it too.
        view.connected = false;
        c.view.send_replace(view);
        assert!(c.owns(&theirs, addr));
    }
}
