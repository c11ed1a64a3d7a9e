//! Maps the name a client asks for to a registry service.
//!
//! Stock gRPC clients send the dial target's authority as written, port
//! included (`greeter.svc.test:8443`). The mapping tries, in order: the name
//! without its port, a configured alias of it, the name with a configured
//! domain suffix removed, and an alias of that. The rules can be replaced
//! while streams run (a configuration reload); each lookup sees one set.
//!
//! A stream maps its name once, when it opens; a replacement therefore
//! wakes every open stream ([`NameMapper::subscribe`]), which maps its
//! name again: an alias moved to another service must move the clients
//! already connected, not only the next ones.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

/// Longest name accepted in an initial request (the protocol's limit).
pub const MAX_NAME_LEN: usize = lb_proto::ext::MAX_SERVICE_NAME_LEN;

/// Name → service mapping rules, replaceable at run time.
#[derive(Debug)]
pub struct NameMapper {
    rules: ArcSwap<Rules>,
    /// Bumped on each replacement of the rules.
    generation: watch::Sender<u64>,
}

impl Default for NameMapper {
    fn default() -> Self {
        NameMapper::new([], [])
    }
}

/// One set of rules.
#[derive(Debug, Default)]
struct Rules {
    aliases: HashMap<String, String>,
    suffixes: Vec<String>,
}

impl NameMapper {
    /// Rules from configured aliases (`name → service`) and domain suffixes.
    pub fn new(
        aliases: impl IntoIterator<Item = (String, String)>,
        suffixes: impl IntoIterator<Item = String>,
    ) -> Self {
        NameMapper {
            rules: ArcSwap::from_pointee(Rules::new(aliases, suffixes)),
            generation: watch::channel(0).0,
        }
    }

    /// Replaces the rules; lookups from now on use the new ones, and
    /// every subscriber is woken.
    pub fn replace(
        &self,
        aliases: impl IntoIterator<Item = (String, String)>,
        suffixes: impl IntoIterator<Item = String>,
    ) {
        self.rules.store(Arc::new(Rules::new(aliases, suffixes)));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes when the rules are replaced: streams that mapped a name
    /// watch it to map it again.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The candidate service names for `name`, most specific first.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        self.rules.load().candidates(name)
    }

    /// The first candidate for which `exists` holds.
    pub fn resolve(&self, name: &str, exists: impl Fn(&str) -> bool) -> Option<String> {
        self.candidates(name).into_iter().find(|c| exists(c))
    }
}

impl Rules {
    fn new(
        aliases: impl IntoIterator<Item = (String, String)>,
        suffixes: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut suffixes: Vec<String> = suffixes
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.starts_with('.') {
                    s
                } else {
                    format!(".{s}")
                }
            })
            .collect();
        // Longest first, so `.svc.cluster.local` wins over `.local`.
        suffixes.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Rules {
            aliases: aliases.into_iter().collect(),
            suffixes,
        }
    }

    fn candidates(&self, name: &str) -> Vec<String> {
        let host = strip_port(name.trim());
        let mut out = vec![host.to_string()];
        if let Some(a) = self.aliases.get(host) {
            out.push(a.clone());
        }
        for suffix in &self.suffixes {
            if let Some(short) = host.strip_suffix(suffix.as_str()).filter(|s| !s.is_empty()) {
                out.push(short.to_string());
                if let Some(a) = self.aliases.get(short) {
                    out.push(a.clone());
                }
            }
        }
        out
    }
}

/// Removes a trailing `:port` (and IPv6 brackets) from an authority.
pub fn strip_port(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match name.rsplit_once(':') {
        // Only one colon and a numeric port: host:port.
        Some((host, port)) if !host.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            host
        }
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("greeter:8443"), "greeter");
        assert_eq!(strip_port("greeter"), "greeter");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
    }

    #[test]
    fn aliases_and_suffixes_map_names() {
        let m = NameMapper::new(
            [("hello".to_string(), "greeter".to_string())],
            [".svc.test".to_string()],
        );
        let known = |s: &str| s == "greeter";
        assert_eq!(m.resolve("greeter:443", known).as_deref(), Some("greeter"));
        assert_eq!(m.resolve("hello", known).as_deref(), Some("greeter"));
        assert_eq!(
            m.resolve("greeter.svc.test:8443", known).as_deref(),
            Some("greeter")
        );
        assert_eq!(
            m.resolve("hello.svc.test", known).as_deref(),
            Some("greeter")
        );
        assert_eq!(m.resolve("other.svc.test", known), None);
        assert_eq!(m.resolve(".svc.test", known), None);
    }

    #[test]
    fn a_replacement_wakes_subscribers_and_maps_anew() {
        let m = NameMapper::new([("hello".to_string(), "greeter".to_string())], []);
        let mut changes = m.subscribe();
        assert!(!changes.has_changed().unwrap());
        let known = |s: &str| s == "greeter" || s == "other";
        m.replace([("hello".to_string(), "other".to_string())], []);
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert_eq!(m.resolve("hello", known).as_deref(), Some("other"));
    }

    #[test]
    fn exact_name_wins_over_suffix_stripping() {
        let m = NameMapper::new([], ["svc.test".to_string()]);
        let known = |s: &str| s == "a.svc.test" || s == "a";
        assert_eq!(
            m.resolve("a.svc.test", known).as_deref(),
            Some("a.svc.test")
        );
    }
}
