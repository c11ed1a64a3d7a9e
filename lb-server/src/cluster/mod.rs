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
//! Load reports are published only when they moved by 5 % (or every 30 s),
//! and the owner applies the published value itself, so that every replica
//! weights from the same numbers.

mod session;
pub mod shared;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::model::{HealthState, LoadSample};
use shared::{SharedHealth, SharedLoad};

/// A backend, as the cluster names it.
pub type BackendKey = (String, SocketAddr);

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
    /// Keys to write (or delete) in etcd.
    outbox: mpsc::UnboundedSender<BackendKey>,
    outbox_rx: Mutex<Option<mpsc::UnboundedReceiver<BackendKey>>>,
}

impl Cluster {
    /// A cluster member feeding `catalog`; call [`Cluster::run`] to join.
    pub fn new(settings: ClusterSettings, catalog: Arc<Catalog>) -> Arc<Self> {
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
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
            outbox,
            outbox_rx: Mutex::new(Some(outbox_rx)),
        })
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
        let _ = self.outbox.send(key);
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
        let _ = self.outbox.send(key);
    }

    /// Forgets the load of a backend this replica checks (its report stream
    /// ended).
    pub fn clear_load(&self, service: &str, addr: SocketAddr) {
        self.catalog.clear_load(service, addr);
        let key = (service.to_string(), addr);
        let mut mine = self.mine.lock().expect("cluster lock");
        if let Some(slot) = mine.get_mut(&key) {
            if slot.value.load.take().is_some() {
                let _ = self.outbox.send(key);
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
            let _ = self.outbox.send(key);
        }
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
        match value {
            Some(v) => {
                let theirs = v.owner != self.settings.replica_id;
                self.remote
                    .lock()
                    .expect("cluster lock")
                    .insert(key.clone(), v.clone());
                if theirs && !self.owns(&key.0, key.1) {
                    self.apply(&key, &v);
                }
            }
            None => {
                // The last known state stays until someone publishes anew.
                self.remote.lock().expect("cluster lock").remove(&key);
            }
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
    /// backends it owns under the new view; the others are forgotten.
    fn republish(&self) -> Vec<BackendKey> {
        let mut mine = self.mine.lock().expect("cluster lock");
        mine.retain(|(service, addr), _| self.owns(service, *addr));
        mine.keys().cloned().collect()
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
