//! The Kubernetes registry source: `--registry k8s://[namespace]` watches
//! `discovery.k8s.io/v1` EndpointSlices (every namespace, or one) through
//! the API server, with `kube`'s watcher: a paginated list, then a watch
//! from its resource version; bookmarks keep that version fresh, so a
//! watch that times out resumes where it was; a `410 Gone` (the version
//! was compacted away) lists again and replaces what was known.
//!
//! The client is configured as `kubectl` is: in a pod, from its service
//! account (the manifests in `examples/deploy/kubernetes/` grant it read
//! access to EndpointSlices); elsewhere, from `$KUBECONFIG` or
//! `~/.kube/config`. Each slice change recomputes its service from all of
//! that service's slices ([`slices`]) and replaces it in the catalog. A
//! slice that stops parsing (its port renamed, its address type changed)
//! is rejected (counted, logged) and its endpoints leave the lists, on the
//! watch as on a re-list: both paths agree on what a slice yields.
//!
//! While the API server is unreachable the last listed state is served;
//! the watcher retries with the shared registry backoff.

pub mod slices;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::Api;
use tokio_util::sync::CancellationToken;

use super::retry::session_backoff;
use super::{Registry, RegistrySink};
use slices::{Slice, SERVICE_LABEL};

/// What to watch.
#[derive(Debug, Clone)]
pub struct K8sSettings {
    /// One namespace, or every one.
    pub namespace: Option<String>,
    /// The name of the gRPC port in the slices (empty: their only port).
    pub port_name: String,
}

impl K8sSettings {
    /// Parses what follows `k8s://`: a namespace or nothing.
    pub fn parse(rest: &str, port_name: &str) -> anyhow::Result<K8sSettings> {
        let ns = rest.trim_end_matches('/');
        anyhow::ensure!(
            ns.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') && ns.len() <= 63,
            "--registry k8s://{rest}: {ns:?} is not a namespace name (k8s:// for every namespace, k8s://NAMESPACE for one)"
        );
        Ok(K8sSettings {
            namespace: (!ns.is_empty()).then(|| ns.to_string()),
            port_name: port_name.trim().to_string(),
        })
    }
}

/// The source.
pub struct K8sRegistry {
    settings: K8sSettings,
}

impl K8sRegistry {
    /// A source watching as `settings` say.
    pub fn new(settings: K8sSettings) -> Self {
        K8sRegistry { settings }
    }

    async fn watch(self: Arc<Self>, sink: RegistrySink, shutdown: CancellationToken) {
        let mut backoff = session_backoff();
        let client = loop {
            match kube::Client::try_default().await {
                Ok(c) => break c,
                Err(e) => {
                    sink.source_error(&format!("no Kubernetes client configuration: {e}"));
                    backoff.attempt();
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                }
            }
        };
        let api: Api<EndpointSlice> = match &self.settings.namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        // Only slices that belong to a Service.
        let config = watcher::Config::default().labels(SERVICE_LABEL);
        let mut events = watcher::watcher(api, config).boxed();
        let mut state = State::default();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = events.next() => e,
            };
            match event {
                None => return,
                Some(Ok(event)) => {
                    backoff.reset();
                    state.apply(event, &self.settings.port_name, &sink);
                }
                Some(Err(e)) => {
                    if gone(&e) {
                        // The watch's version was compacted away: the
                        // watcher lists again and the snapshot replaces all.
                        tracing::info!(
                            source = "k8s",
                            "resource version expired (410 Gone); listing again"
                        );
                    } else {
                        sink.session_lost(&format!("EndpointSlice watch: {e}"));
                        backoff.attempt();
                        if !backoff.wait(&shutdown).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Whether a watcher error is the API server's `410 Gone`.
fn gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// A slice's `(namespace, name)`.
type SliceId = (String, String);

/// The slices known, indexed by service, and those of a listing in
/// progress.
///
/// A change of one slice recomputes its service from that service's slices
/// only, and a listing groups its slices by service in one pass: a re-list
/// of 10,000 services costs one walk over the slices, not one per service.
#[derive(Default)]
struct State {
    slices: BTreeMap<SliceId, Slice>,
    /// The ids of each service's slices.
    by_service: HashMap<String, BTreeSet<SliceId>>,
    listing: Option<BTreeMap<SliceId, Slice>>,
}

impl State {
    fn apply(&mut self, event: Event<EndpointSlice>, port_name: &str, sink: &RegistrySink) {
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(slice) => {
                let parsed = read(&slice, port_name, sink, false);
                if let (Some(listing), Some(parsed)) = (self.listing.as_mut(), parsed) {
                    listing.insert(slices::id(&slice), parsed);
                }
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let now = SystemTime::now();
                let all = slices::by_service(listed.values())
                    .into_iter()
                    .flat_map(|(svc, group)| slices::instances(svc, group.into_iter(), now))
                    .collect();
                sink.snapshot(all);
                sink.mark_synced();
                self.by_service.clear();
                for (id, slice) in &listed {
                    self.index(id, &slice.service);
                }
                self.slices = listed;
            }
            Event::Apply(slice) => {
                let id = slices::id(&slice);
                let known = self.slices.contains_key(&id);
                match read(&slice, port_name, sink, known) {
                    Some(parsed) => {
                        let service = parsed.service.clone();
                        let before = self.insert(id, parsed);
                        self.publish(&service, sink);
                        // Its Service label changed: the old service loses it.
                        if let Some(old) = before.filter(|old| *old != service) {
                            self.publish(&old, sink);
                        }
                    }
                    // It no longer yields endpoints (rejected, or no longer
                    // a Service's): its endpoints leave, as a re-list would
                    // leave the slice out. Keeping its last good state would
                    // serve endpoints on the watch that the next list drops.
                    None => {
                        if let Some(gone) = self.remove(&id) {
                            self.publish(&gone.service, sink);
                        }
                    }
                }
            }
            Event::Delete(slice) => {
                if let Some(gone) = self.remove(&slices::id(&slice)) {
                    self.publish(&gone.service, sink);
                }
            }
        }
    }

    fn index(&mut self, id: &SliceId, service: &str) {
        self.by_service
            .entry(service.to_string())
            .or_default()
            .insert(id.clone());
    }

    fn unindex(&mut self, id: &SliceId, service: &str) {
        if let Some(ids) = self.by_service.get_mut(service) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    /// Adds or replaces a slice; returns the service it belonged to before.
    fn insert(&mut self, id: SliceId, slice: Slice) -> Option<String> {
        let service = slice.service.clone();
        let before = self.slices.insert(id.clone(), slice).map(|s| s.service);
        if let Some(old) = &before {
            self.unindex(&id, old);
        }
        self.index(&id, &service);
        before
    }

    /// Forgets a slice; returns it.
    fn remove(&mut self, id: &SliceId) -> Option<Slice> {
        let gone = self.slices.remove(id)?;
        self.unindex(id, &gone.service);
        Some(gone)
    }

    /// Replaces `service` in the catalog with what its slices say now.
    fn publish(&self, service: &str, sink: &RegistrySink) {
        let slices = self
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.slices.get(id));
        let list = slices::instances(service, slices, SystemTime::now());
        sink.replace_service(service, list);
    }
}

/// A slice parsed, or its rejection reported (counted and logged). `known`:
/// the slice served endpoints until now, and the rejection takes them out.
fn read(slice: &EndpointSlice, port_name: &str, sink: &RegistrySink, known: bool) -> Option<Slice> {
    match slices::parse(slice, port_name) {
        Ok(parsed) => parsed,
        Err(r) => {
            let (ns, name) = slices::id(slice);
            let detail = if known {
                format!("{}; its endpoints leave the lists", r.detail)
            } else {
                r.detail
            };
            sink.reject(&format!("{ns}/{name}"), r.reason, &detail);
            None
        }
    }
}

impl Registry for K8sRegistry {
    fn kind(&self) -> &'static str {
        "k8s"
    }

    fn run(
        self: Arc<Self>,
        sink: RegistrySink,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        self.watch(sink, shutdown).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(K8sSettings::parse("", "").unwrap().namespace, None);
        let s = K8sSettings::parse("prod/", "grpc").unwrap();
        assert_eq!(
            (s.namespace.as_deref(), s.port_name.as_str()),
            (Some("prod"), "grpc")
        );
        assert!(K8sSettings::parse("Prod_1", "").is_err());
    }

    fn slice(name: &str, ip: &str, port_name: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "greeter"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]}],
            "ports": [{"name": port_name, "port": 50051}],
        }))
        .unwrap()
    }

    #[test]
    fn the_watch_drops_a_slice_that_stops_parsing_as_a_list_would() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let catalog = Arc::new(crate::catalog::Catalog::new(
            crate::policy::Policy::default(),
            metrics.clone(),
            1,
            false,
        ));
        let sink = RegistrySink::new("k8s", catalog.clone(), metrics);
        let backends = || {
            catalog
                .service("greeter.prod")
                .map(|e| e.backends().len())
                .unwrap_or(0)
        };
        let mut state = State::default();
        state.apply(Event::Init, "grpc", &sink);
        state.apply(
            Event::InitApply(slice("a", "10.0.0.1", "grpc")),
            "grpc",
            &sink,
        );
        state.apply(
            Event::InitApply(slice("b", "10.0.0.2", "grpc")),
            "grpc",
            &sink,
        );
        state.apply(Event::InitDone, "grpc", &sink);
        assert_eq!(backends(), 2);
        // Port renamed: b yields nothing now, on the watch as on a list.
        state.apply(Event::Apply(slice("b", "10.0.0.2", "http")), "grpc", &sink);
        assert_eq!(backends(), 1);
        assert_eq!(state.by_service["greeter.prod"].len(), 1);
        state.apply(Event::Apply(slice("b", "10.0.0.2", "grpc")), "grpc", &sink);
        assert_eq!(backends(), 2);
        state.apply(Event::Delete(slice("a", "10.0.0.1", "grpc")), "grpc", &sink);
        assert_eq!(backends(), 1);
    }
}
