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
//! that service's slices ([`slices`]) and replaces it in the catalog.
//!
//! While the API server is unreachable the last listed state is served;
//! the watcher retries with the shared registry backoff.

pub mod slices;

use std::collections::BTreeMap;
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

/// The slices known, and those of a listing in progress.
#[derive(Default)]
struct State {
    slices: BTreeMap<(String, String), Slice>,
    listing: Option<BTreeMap<(String, String), Slice>>,
}

impl State {
    fn apply(&mut self, event: Event<EndpointSlice>, port_name: &str, sink: &RegistrySink) {
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(slice) => {
                let parsed = read(&slice, port_name, sink);
                if let (Some(listing), Some(parsed)) = (self.listing.as_mut(), parsed) {
                    listing.insert(slices::id(&slice), parsed);
                }
            }
            Event::InitDone => {
                self.slices = self.listing.take().unwrap_or_default();
                let now = SystemTime::now();
                let services: std::collections::BTreeSet<&str> =
                    self.slices.values().map(|s| s.service.as_str()).collect();
                let all = services
                    .into_iter()
                    .flat_map(|svc| slices::instances(svc, self.slices.values(), now))
                    .collect();
                sink.snapshot(all);
                sink.mark_synced();
            }
            Event::Apply(slice) => {
                let id = slices::id(&slice);
                let before = self.slices.get(&id).map(|s| s.service.clone());
                // A slice that no longer parses keeps its last good state
                // (the rejection is reported).
                let Some(parsed) = read(&slice, port_name, sink) else {
                    return;
                };
                let service = parsed.service.clone();
                self.slices.insert(id, parsed);
                self.publish(&service, sink);
                // Its Service label changed: the old service loses it.
                if let Some(old) = before.filter(|old| *old != service) {
                    self.publish(&old, sink);
                }
            }
            Event::Delete(slice) => {
                if let Some(gone) = self.slices.remove(&slices::id(&slice)) {
                    self.publish(&gone.service, sink);
                }
            }
        }
    }

    /// Replaces `service` in the catalog with what its slices say now.
    fn publish(&self, service: &str, sink: &RegistrySink) {
        let list = slices::instances(service, self.slices.values(), SystemTime::now());
        sink.replace_service(service, list);
    }
}

/// A slice parsed, or its rejection reported.
fn read(slice: &EndpointSlice, port_name: &str, sink: &RegistrySink) -> Option<Slice> {
    match slices::parse(slice, port_name) {
        Ok(parsed) => parsed,
        Err(r) => {
            let (ns, name) = slices::id(slice);
            sink.reject(&format!("{ns}/{name}"), r.reason, &r.detail);
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
}
