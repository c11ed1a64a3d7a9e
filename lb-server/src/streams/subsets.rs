//! Per-client subsets: each client is given K of a service's backends
//! instead of all of them (`--subset-size K`), so that thousands of clients
//! do not each open a connection to every backend.
//!
//! Subsets are computed centrally, per service, over the backends the policy
//! lists, for the clients connected to this replica:
//! - a joining client takes the K least-used backends, ties broken by the
//!   rendezvous score of (client id, backend), so the same client tends to
//!   get the same backends back;
//! - a backend that leaves is replaced, in the subsets that held it and
//!   nowhere else, by the least-used backends;
//! - a backend that arrives, or clients that leave, unbalance the counts:
//!   when the most- and least-used backends differ by more than two
//!   clients, single clients are moved from the one to the other until they
//!   differ by at most one.
//!
//! So every backend serves the mean number of clients ±1, and subsets change
//! only as much as that requires. A stream's list is the service's list
//! filtered to its subset: weights (repetitions), order and drop entries are
//! kept.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use lb_proto::grpc::lb::v1::Server;
use tokio::sync::watch;

use crate::rendezvous;
use crate::snapshot::PublishedList;

/// Longest client id taken from the `lb-client-id` metadata.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// The metadata key in which a client may name itself.
pub use lb_proto::ext::CLIENT_ID_HEADER;

/// Subset tables of every service.
pub struct Subsets {
    size: usize,
    services: DashMap<String, Arc<Table>>,
}

/// One service's subsets.
pub struct Table {
    size: usize,
    state: Mutex<State>,
    /// Bumped whenever any existing subset changes.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// Version of the list the backend set was taken from.
    version: Option<u64>,
    backends: BTreeSet<SocketAddr>,
    counts: HashMap<SocketAddr, usize>,
    clients: HashMap<u64, Assigned>,
}

struct Assigned {
    key: u64,
    subset: Vec<SocketAddr>,
}

impl Subsets {
    /// Subsets of `size` backends; 0 turns subsetting off.
    pub fn new(size: usize) -> Self {
        Subsets {
            size,
            services: DashMap::new(),
        }
    }

    /// Whether subsetting is on.
    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// The subset size.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Drops the table of a service the catalog forgot, unless a client is
    /// still in it.
    pub fn forget(&self, service: &str) {
        self.services.remove_if(service, |_, t| {
            t.state.lock().expect("subset lock").clients.is_empty()
        });
    }

    /// The table of `service`.
    pub fn table(&self, service: &str) -> Arc<Table> {
        self.services
            .entry(service.to_string())
            .or_insert_with(|| {
                Arc::new(Table {
                    size: self.size,
                    state: Mutex::new(State::default()),
                    changed: watch::channel(0).0,
                })
            })
            .clone()
    }

    /// How many clients hold each backend of `service` in their subset.
    pub fn counts(&self, service: &str) -> HashMap<SocketAddr, usize> {
        self.services
            .get(service)
            .map(|t| t.state.lock().expect("subset lock").counts.clone())
            .unwrap_or_default()
    }
}

impl Table {
    /// Adds a client (`session` unique per stream, `client_id` seeding its
    /// preferences) given the service's current list.
    pub fn join(self: &Arc<Self>, session: u64, client_id: &str, list: &PublishedList) -> Member {
        let mut st = self.state.lock().expect("subset lock");
        if st.sync(self.size, list) {
            self.bump();
        }
        let mut m = Assigned {
            key: rendezvous::hash(client_id.as_bytes()),
            subset: Vec::new(),
        };
        st.fill(self.size, &mut m);
        st.clients.insert(session, m);
        Member {
            table: self.clone(),
            session,
        }
    }

    /// Changes when any subset may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }
}

/// A client's place in a [`Table`]; leaves it when dropped.
pub struct Member {
    table: Arc<Table>,
    session: u64,
}

impl Member {
    /// The client's list: `list` filtered to its subset, after bringing the
    /// table up to date with `list`. Also returns the subset.
    pub fn filter(&self, list: &PublishedList) -> (Vec<Server>, Vec<SocketAddr>) {
        let mut st = self.table.state.lock().expect("subset lock");
        if st.sync(self.table.size, list) {
            self.table.bump();
        }
        let subset = st
            .clients
            .get(&self.session)
            .map(|m| m.subset.clone())
            .unwrap_or_default();
        drop(st);
        let servers = list
            .servers
            .iter()
            .filter(|s| s.drop || s.socket_addr().is_some_and(|a| subset.contains(&a)))
            .cloned()
            .collect();
        (servers, subset)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut st = self.table.state.lock().expect("subset lock");
        if let Some(m) = st.clients.remove(&self.session) {
            for a in &m.subset {
                if let Some(c) = st.counts.get_mut(a) {
                    *c = c.saturating_sub(1);
                }
            }
            if st.rebalance() {
                drop(st);
                self.table.bump();
            }
        }
    }
}

impl State {
    /// Brings the backend set up to date with `list`; returns whether any
    /// subset changed.
    fn sync(&mut self, size: usize, list: &PublishedList) -> bool {
        if self.version == Some(list.version) {
            return false;
        }
        self.version = Some(list.version);
        let now: BTreeSet<SocketAddr> = list
            .servers
            .iter()
            .filter(|s| !s.drop)
            .filter_map(Server::socket_addr)
            .collect();
        if now == self.backends {
            return false;
        }
        let added = now.difference(&self.backends).count() > 0;
        for gone in self.backends.difference(&now) {
            self.counts.remove(gone);
        }
        for new in now.difference(&self.backends) {
            self.counts.insert(*new, 0);
        }
        self.backends = now;
        let mut changed = false;
        let sessions: Vec<u64> = self.clients.keys().copied().collect();
        for s in sessions {
            let mut m = self.clients.remove(&s).expect("listed");
            let before = m.subset.len();
            m.subset.retain(|a| self.backends.contains(a));
            let dropped = m.subset.len() != before;
            let short = m.subset.len() < size.min(self.backends.len());
            if dropped || short {
                self.fill(size, &mut m);
                changed = true;
            }
            self.clients.insert(s, m);
        }
        if added {
            changed |= self.rebalance();
        }
        changed
    }

    /// Tops `m` up to `size` backends with the least-used ones.
    fn fill(&mut self, size: usize, m: &mut Assigned) {
        while m.subset.len() < size.min(self.backends.len()) {
            let pick = self
                .backends
                .iter()
                .filter(|a| !m.subset.contains(a))
                .min_by(|a, b| {
                    let (ca, cb) = (self.counts[*a], self.counts[*b]);
                    ca.cmp(&cb)
                        .then_with(|| score(m.key, b).cmp(&score(m.key, a)))
                })
                .copied();
            let Some(a) = pick else { break };
            *self.counts.get_mut(&a).expect("counted") += 1;
            m.subset.push(a);
        }
    }

    /// Moves single clients from the most- to the least-used backend while
    /// they differ by more than two (then down to one). Returns whether any
    /// subset changed.
    fn rebalance(&mut self) -> bool {
        let spread = |st: &State| {
            let min = st.counts.iter().min_by_key(|(a, c)| (**c, **a));
            let max = st
                .counts
                .iter()
                .max_by_key(|(a, c)| (**c, std::cmp::Reverse(**a)));
            match (min, max) {
                (Some((lo, cl)), Some((hi, ch))) => Some((*lo, *cl, *hi, *ch)),
                _ => None,
            }
        };
        match spread(self) {
            Some((_, lo, _, hi)) if hi > lo + 2 => {}
            _ => return false,
        }
        let mut moved = false;
        let limit = self.clients.len() * self.backends.len().max(1);
        for _ in 0..limit {
            let Some((lo, cl, hi, ch)) = spread(self) else {
                break;
            };
            if ch <= cl + 1 {
                break;
            }
            // The client holding `hi` but not `lo` that prefers `lo` most.
            let candidate = self
                .clients
                .iter()
                .filter(|(_, m)| m.subset.contains(&hi) && !m.subset.contains(&lo))
                .max_by_key(|(s, m)| (score(m.key, &lo), std::cmp::Reverse(**s)))
                .map(|(s, _)| *s);
            let Some(s) = candidate else { break };
            let m = self.clients.get_mut(&s).expect("found");
            for a in m.subset.iter_mut() {
                if *a == hi {
                    *a = lo;
                }
            }
            *self.counts.get_mut(&hi).expect("counted") -= 1;
            *self.counts.get_mut(&lo).expect("counted") += 1;
            moved = true;
        }
        moved
    }
}

fn score(key: u64, addr: &SocketAddr) -> u64 {
    rendezvous::mix(key ^ rendezvous::hash(addr.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(i: usize) -> Server {
        Server {
            ip_address: vec![10, 0, (i / 256) as u8, (i % 256) as u8],
            port: 80,
            load_balance_token: format!("t{i}"),
            drop: false,
        }
    }

    fn list(version: u64, backends: &[usize]) -> PublishedList {
        PublishedList::new(
            version,
            backends.iter().map(|i| server(*i)).collect(),
            false,
            0.0,
        )
    }

    fn subsets_of(members: &[Member], l: &PublishedList) -> Vec<Vec<SocketAddr>> {
        members
            .iter()
            .map(|m| {
                let mut s = m.filter(l).1;
                s.sort();
                s
            })
            .collect()
    }

    fn assert_balanced(t: &Arc<Table>, clients: usize, k: usize, n: usize) {
        let st = t.state.lock().unwrap();
        let mean = (clients * k) as f64 / n as f64;
        for (a, c) in &st.counts {
            assert!(
                (*c as f64 - mean).abs() <= 1.0 + 1e-9,
                "{a} has {c} clients, mean {mean}"
            );
        }
    }

    #[test]
    fn subsets_are_balanced_and_sized() {
        let subsets = Subsets::new(5);
        let t = subsets.table("svc");
        let l = list(1, &(0..20).collect::<Vec<_>>());
        let members: Vec<_> = (0..200)
            .map(|i| t.join(i, &format!("client-{i}"), &l))
            .collect();
        for s in subsets_of(&members, &l) {
            assert_eq!(s.len(), 5);
        }
        assert_balanced(&t, 200, 5, 20);
    }

    #[test]
    fn removing_a_backend_changes_only_the_subsets_that_held_it() {
        let t = Subsets::new(5).table("svc");
        let all: Vec<usize> = (0..20).collect();
        let l1 = list(1, &all);
        let members: Vec<_> = (0..200)
            .map(|i| t.join(i, &format!("client-{i}"), &l1))
            .collect();
        let before = subsets_of(&members, &l1);
        let gone = server(7).socket_addr().unwrap();
        let l2 = list(
            2,
            &all.iter().copied().filter(|i| *i != 7).collect::<Vec<_>>(),
        );
        let after = subsets_of(&members, &l2);
        for (b, a) in before.iter().zip(&after) {
            if !b.contains(&gone) {
                assert_eq!(b, a, "a subset without the removed backend changed");
            } else {
                assert!(!a.contains(&gone));
                assert_eq!(a.len(), 5);
                let kept = b.iter().filter(|x| a.contains(x)).count();
                assert_eq!(kept, 4, "only the removed backend is replaced");
            }
        }
        assert_balanced(&t, 200, 5, 19);
    }

    #[test]
    fn an_added_backend_gets_its_share_by_moving_few_clients() {
        let t = Subsets::new(5).table("svc");
        let l1 = list(1, &(0..20).collect::<Vec<_>>());
        let members: Vec<_> = (0..200)
            .map(|i| t.join(i, &format!("client-{i}"), &l1))
            .collect();
        let before = subsets_of(&members, &l1);
        let l2 = list(2, &(0..21).collect::<Vec<_>>());
        let after = subsets_of(&members, &l2);
        let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert_balanced(&t, 200, 5, 21);
        // The newcomer needs about 1000/21 ≈ 48 clients: one move each.
        assert!(changed <= 48, "{changed} subsets changed");
    }

    #[test]
    fn leaving_clients_keep_the_rest_balanced_and_drop_entries_stay() {
        let t = Subsets::new(3).table("svc");
        let mut l = list(1, &(0..10).collect::<Vec<_>>());
        l.servers.push(Server {
            ip_address: Vec::new(),
            port: 0,
            load_balance_token: "lb-shed".into(),
            drop: true,
        });
        let mut members: Vec<_> = (0..100).map(|i| t.join(i, &format!("c{i}"), &l)).collect();
        members.truncate(37);
        assert_balanced(&t, 37, 3, 10);
        let (servers, subset) = members[0].filter(&l);
        assert_eq!(subset.len(), 3);
        assert_eq!(servers.len(), 4);
        assert!(servers.iter().any(|s| s.drop));
    }

    #[test]
    fn fewer_backends_than_the_size_gives_everyone_all() {
        let t = Subsets::new(5).table("svc");
        let l = list(1, &[1, 2, 3]);
        let m = t.join(1, "c", &l);
        assert_eq!(m.filter(&l).1.len(), 3);
        let l2 = list(2, &[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(m.filter(&l2).1.len(), 5);
    }
}
