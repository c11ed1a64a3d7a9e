//! The state-of-the-world rules for one resource type of one ADS stream,
//! kept apart from any I/O so that they can be tested on their own.
//!
//! The rules (the xDS protocol's, and what stock clients rely on):
//!
//! - Each type has its own version and nonce. A request whose
//!   `response_nonce` is not the last one sent for its type is stale and
//!   ignored: the client has not seen the newest response yet and will
//!   answer it.
//! - A request answering the last response is an ACK, or a NACK when it
//!   carries `error_detail`. Either way the client is ready for the next
//!   response: at most one response per type is ever unanswered, so a
//!   client that never answers costs one response per type and no more.
//! - What was sent is remembered per resource, whatever the client made of
//!   it: a NACKed resource is not sent again until it changes (resending it
//!   would loop forever), and an unchanged resource is never resent.
//! - LDS and CDS responses carry the whole requested set, so leaving a name
//!   out says "does not exist", at once; RDS and EDS responses carry only
//!   what changed. A name that does not exist yet stays subscribed and is
//!   sent when it comes into being.
//! - An empty first LDS or CDS request, or the name `*`, is a wildcard:
//!   every resource of the type. An empty first request is the *legacy*
//!   wildcard, and Envoy's state-of-the-world mux keeps sending an empty
//!   list on every later request of it, ACKs included: so an empty list
//!   keeps a legacy wildcard a wildcard until the client names a resource
//!   (as go-control-plane's legacy-wildcard rule does). Read as "no names",
//!   the first ACK would unsubscribe Envoy from every service added later.
//! - The first LDS or CDS response of a subscription is sent at once, even
//!   when it is empty: a client waits for it (Envoy up to its 15 s
//!   `initial_fetch_timeout`) before it counts itself initialized.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use bytes::Bytes;

use super::resources::Kind;

/// What a client asks for of one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// Every resource of the type.
    Wildcard,
    /// These names.
    Names(BTreeSet<String>),
}

/// How a request was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The first request of its type, or one with no nonce.
    Subscribe,
    /// Accepts the last response.
    Ack,
    /// Rejects the last response, with the client's error.
    Nack(String),
    /// Answers an older response: ignored.
    Stale,
}

/// A response to write: version, nonce and resources (each an encoded
/// `google.protobuf.Any`).
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The type's new version.
    pub version: String,
    /// The response's nonce.
    pub nonce: String,
    /// The resources it carries.
    pub resources: Vec<Bytes>,
}

/// One type's state on one stream.
#[derive(Debug)]
pub struct Subscription {
    kind: Kind,
    requested: Option<Requested>,
    /// The wildcard came from an empty first request (see the module doc):
    /// later empty requests keep it.
    legacy_wildcard: bool,
    /// Nonce of the last response sent, if any.
    nonce: Option<String>,
    /// The last response has not been answered yet.
    awaiting: bool,
    version: u64,
    /// Per name, a fingerprint of what was last sent (`None`: answered as
    /// absent, in an LDS or CDS response that left it out).
    sent: BTreeMap<String, Option<u64>>,
    /// The version the client last accepted.
    pub acked: Option<String>,
    /// The version the client last rejected, and why.
    pub nack: Option<(String, String)>,
}

impl Subscription {
    /// A type nobody has asked for yet.
    pub fn new(kind: Kind) -> Self {
        Subscription {
            kind,
            requested: None,
            legacy_wildcard: false,
            nonce: None,
            awaiting: false,
            version: 0,
            sent: BTreeMap::new(),
            acked: None,
            nack: None,
        }
    }

    /// The type this subscription is of.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether the last response is still unanswered.
    pub fn is_awaiting(&self) -> bool {
        self.awaiting
    }

    /// How many names it holds (0 for a wildcard).
    pub fn names_len(&self) -> usize {
        match &self.requested {
            Some(Requested::Names(n)) => n.len(),
            _ => 0,
        }
    }

    /// What the client asks for now (`None` before its first request).
    pub fn requested(&self) -> Option<&Requested> {
        self.requested.as_ref()
    }

    /// The version last sent ("" before the first response).
    pub fn version(&self) -> String {
        if self.version == 0 {
            String::new()
        } else {
            self.version.to_string()
        }
    }

    /// Takes one request: its nonce, error and names.
    pub fn on_request(&mut self, nonce: &str, error: Option<String>, names: Vec<String>) -> Answer {
        let answer = match (&self.nonce, nonce.is_empty()) {
            (_, true) => Answer::Subscribe,
            (Some(last), false) if last == nonce => match error {
                Some(e) => Answer::Nack(e),
                None => Answer::Ack,
            },
            _ => return Answer::Stale,
        };
        match &answer {
            Answer::Ack => {
                self.acked = Some(self.version());
                self.awaiting = false;
            }
            Answer::Nack(e) => {
                self.nack = Some((self.version(), e.clone()));
                self.awaiting = false;
            }
            // A request without a nonce while a response is out: the client
            // has not seen it; it will answer it, so keep waiting.
            _ => {}
        }
        if names.is_empty() && self.kind.full_state() {
            // An empty first request opens a legacy wildcard; later empty
            // requests (Envoy's ACKs among them) keep it.
            self.legacy_wildcard |= self.requested.is_none();
        } else {
            self.legacy_wildcard = false;
        }
        self.requested = Some(if self.legacy_wildcard || names.iter().any(|n| n == "*") {
            Requested::Wildcard
        } else {
            Requested::Names(names.into_iter().collect())
        });
        // Forget what was sent under names no longer asked for: asked again
        // later, they are sent again.
        if let Some(Requested::Names(names)) = &self.requested {
            self.sent.retain(|n, _| names.contains(n));
        }
        answer
    }

    /// The response to write now, if one is due: `current` holds every
    /// requested resource that exists (all of the type for a wildcard).
    /// `nonce` is used only when a response is due.
    pub fn plan(
        &mut self,
        current: &BTreeMap<String, Bytes>,
        nonce: impl FnOnce() -> String,
    ) -> Option<Planned> {
        if self.awaiting {
            return None;
        }
        let requested = self.requested.as_ref()?;
        let now: BTreeMap<&str, Option<u64>> = match requested {
            Requested::Wildcard => current
                .iter()
                .map(|(n, a)| (n.as_str(), Some(fingerprint(a))))
                .collect(),
            Requested::Names(names) => names
                .iter()
                .map(|n| (n.as_str(), current.get(n).map(fingerprint)))
                .collect(),
        };
        let changed: Vec<&str> = now
            .iter()
            .filter(|(n, fp)| self.sent.get(**n) != Some(*fp))
            .map(|(n, _)| *n)
            .collect();
        // A wildcard also learns of resources gone away.
        let gone = matches!(requested, Requested::Wildcard)
            && self.sent.keys().any(|n| !now.contains_key(n.as_str()));
        // The first full-state response is due even when empty.
        let first = self.version == 0 && self.kind.full_state();
        if changed.is_empty() && !gone && !first {
            return None;
        }
        let resources: Vec<Bytes> = if self.kind.full_state() {
            now.keys()
                .filter_map(|n| current.get(*n).cloned())
                .collect()
        } else {
            changed
                .iter()
                .filter_map(|n| current.get(*n).cloned())
                .collect()
        };
        if !self.kind.full_state() && resources.is_empty() {
            // RDS/EDS cannot say "absent": nothing to send for names that do
            // not exist (yet).
            return None;
        }
        self.sent = if self.kind.full_state() {
            now.into_iter().map(|(n, fp)| (n.to_string(), fp)).collect()
        } else {
            let mut sent = std::mem::take(&mut self.sent);
            for n in changed {
                if let Some(fp) = now[n] {
                    sent.insert(n.to_string(), Some(fp));
                }
            }
            sent
        };
        self.version += 1;
        let nonce = nonce();
        self.nonce = Some(nonce.clone());
        self.awaiting = true;
        Some(Planned {
            version: self.version(),
            nonce,
            resources,
        })
    }
}

fn fingerprint(a: &Bytes) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(v: &str) -> Bytes {
        Bytes::copy_from_slice(v.as_bytes())
    }

    fn current(pairs: &[(&str, &str)]) -> BTreeMap<String, Bytes> {
        pairs.iter().map(|(n, v)| (n.to_string(), any(v))).collect()
    }

    fn nonce(n: &str) -> impl FnOnce() -> String + '_ {
        move || n.to_string()
    }

    #[test]
    fn an_absent_listener_is_answered_at_once_and_sent_when_it_appears() {
        let mut s = Subscription::new(Kind::Listener);
        s.on_request("", None, vec!["greeter".into()]);
        let first = s.plan(&current(&[]), nonce("1")).expect("answered at once");
        assert!(first.resources.is_empty());
        assert_eq!(s.on_request("1", None, vec!["greeter".into()]), Answer::Ack);
        assert_eq!(s.plan(&current(&[]), nonce("2")), None, "nothing changed");
        let second = s.plan(&current(&[("greeter", "L")]), nonce("2")).unwrap();
        assert_eq!(second.resources, vec![any("L")]);
        assert_eq!(second.version, "2");
    }

    #[test]
    fn a_nacked_version_is_not_resent_until_it_changes() {
        let mut s = Subscription::new(Kind::Endpoint);
        s.on_request("", None, vec!["a".into()]);
        let cur = current(&[("a", "v1")]);
        assert!(s.plan(&cur, nonce("1")).is_some());
        assert_eq!(
            s.on_request("1", Some("bad".into()), vec!["a".into()]),
            Answer::Nack("bad".into())
        );
        assert_eq!(s.nack, Some(("1".into(), "bad".into())));
        for _ in 0..3 {
            assert_eq!(s.plan(&cur, nonce("x")), None);
        }
        let next = s.plan(&current(&[("a", "v2")]), nonce("2")).unwrap();
        assert_eq!(next.resources, vec![any("v2")]);
    }

    #[test]
    fn one_response_at_a_time_and_stale_nonces_ignored() {
        let mut s = Subscription::new(Kind::Endpoint);
        s.on_request("", None, vec!["a".into()]);
        assert!(s.plan(&current(&[("a", "v1")]), nonce("1")).is_some());
        // Unanswered: a change waits.
        assert_eq!(s.plan(&current(&[("a", "v2")]), nonce("2")), None);
        assert_eq!(s.on_request("0", None, vec!["a".into()]), Answer::Stale);
        assert_eq!(s.plan(&current(&[("a", "v2")]), nonce("2")), None);
        assert_eq!(s.on_request("1", None, vec!["a".into()]), Answer::Ack);
        assert_eq!(s.acked.as_deref(), Some("1"));
        // Latest wins: v3, not v2.
        let next = s.plan(&current(&[("a", "v3")]), nonce("2")).unwrap();
        assert_eq!(next.resources, vec![any("v3")]);
    }

    #[test]
    fn lds_carries_the_whole_set_eds_only_the_changes() {
        let mut l = Subscription::new(Kind::Listener);
        l.on_request("", None, vec!["a".into(), "b".into()]);
        l.plan(&current(&[("a", "1"), ("b", "1")]), nonce("1"))
            .unwrap();
        l.on_request("1", None, vec!["a".into(), "b".into()]);
        let p = l
            .plan(&current(&[("a", "1"), ("b", "2")]), nonce("2"))
            .unwrap();
        assert_eq!(p.resources.len(), 2);

        let mut e = Subscription::new(Kind::Endpoint);
        e.on_request("", None, vec!["a".into(), "b".into()]);
        e.plan(&current(&[("a", "1"), ("b", "1")]), nonce("1"))
            .unwrap();
        e.on_request("1", None, vec!["a".into(), "b".into()]);
        let p = e
            .plan(&current(&[("a", "1"), ("b", "2")]), nonce("2"))
            .unwrap();
        assert_eq!(p.resources, vec![any("2")]);
    }

    #[test]
    fn empty_first_cds_request_is_a_wildcard() {
        let mut c = Subscription::new(Kind::Cluster);
        c.on_request("", None, vec![]);
        assert_eq!(c.requested(), Some(&Requested::Wildcard));
        let mut e = Subscription::new(Kind::Endpoint);
        e.on_request("", None, vec![]);
        assert_eq!(e.requested(), Some(&Requested::Names(BTreeSet::new())));
    }

    #[test]
    fn a_legacy_wildcard_stays_one_through_empty_acks() {
        let mut c = Subscription::new(Kind::Cluster);
        c.on_request("", None, vec![]);
        let first = c.plan(&current(&[("a", "1")]), nonce("1")).unwrap();
        assert_eq!(first.resources, vec![any("1")]);
        // Envoy's ACK repeats the empty list: still every cluster.
        assert_eq!(c.on_request("1", None, vec![]), Answer::Ack);
        assert_eq!(c.requested(), Some(&Requested::Wildcard));
        let second = c
            .plan(&current(&[("a", "1"), ("b", "1")]), nonce("2"))
            .expect("a cluster added later is sent");
        assert_eq!(second.resources.len(), 2);
        c.on_request("2", None, vec![]);
        let third = c
            .plan(&current(&[("b", "1")]), nonce("3"))
            .expect("a cluster gone is left out");
        assert_eq!(third.resources, vec![any("1")]);
        // Naming a resource ends the legacy wildcard; an empty list after
        // that means no names.
        c.on_request("3", None, vec!["b".into()]);
        c.on_request("3", None, vec![]);
        assert_eq!(c.requested(), Some(&Requested::Names(BTreeSet::new())));
    }

    #[test]
    fn an_empty_wildcard_is_answered_at_once_once() {
        let mut c = Subscription::new(Kind::Cluster);
        c.on_request("", None, vec![]);
        let first = c.plan(&current(&[]), nonce("1")).expect("answered at once");
        assert!(first.resources.is_empty());
        c.on_request("1", None, vec![]);
        assert_eq!(c.plan(&current(&[]), nonce("2")), None, "nothing changed");
        // EDS cannot say "absent": nothing is sent for an empty EDS request.
        let mut e = Subscription::new(Kind::Endpoint);
        e.on_request("", None, vec!["a".into()]);
        assert_eq!(e.plan(&current(&[]), nonce("1")), None);
    }

    #[test]
    fn a_name_asked_again_is_sent_again() {
        let mut e = Subscription::new(Kind::Endpoint);
        e.on_request("", None, vec!["a".into()]);
        e.plan(&current(&[("a", "1")]), nonce("1")).unwrap();
        e.on_request("1", None, vec![]);
        assert_eq!(e.plan(&current(&[("a", "1")]), nonce("2")), None);
        e.on_request("1", None, vec!["a".into()]);
        assert!(e.plan(&current(&[("a", "1")]), nonce("2")).is_some());
    }
}
