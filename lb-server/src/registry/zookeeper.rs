//! The ZooKeeper registry source, in the layout Dubbo and many Java shops
//! use: one ephemeral znode per instance under
//! `/<prefix>/<service>/providers/`, named by a URL-encoded provider URL
//! (`dubbo%3A%2F%2F10.0.0.7%3A20880%2F…%3Fweight%3D100`) or by `host:port`,
//! with `host:port` (or etcd naming JSON) as its data.
//!
//! One persistent recursive watch on the prefix reports every change. The
//! tree is listed after the watch is set (nothing can slip between the two)
//! and again whenever the connection comes back, because a persistent watch
//! can miss events while disconnected. When the session expires, a new one
//! is made and everything is listed again; until then the catalog keeps the
//! last known state, so an ensemble outage changes nothing clients see. An
//! instance whose own session dies (a crashed backend) disappears with its
//! ephemeral znode.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

use super::entry::{self, ValueOp};
use super::retry::run_sessions;
use super::{Registry, RegistrySink};
use crate::model::{Instance, RejectReason, Rejected};

/// Where the ensemble is and what to read.
#[derive(Debug, Clone, PartialEq)]
pub struct ZkSettings {
    /// `host:port[,host:port…]`.
    pub hosts: String,
    /// The root of the services, e.g. `/dubbo`.
    pub prefix: String,
    /// Session timeout asked of the ensemble.
    pub session_timeout: Duration,
}

impl ZkSettings {
    /// Settings from the part of a `zk://h1:2181,h2:2181/prefix` URL after
    /// the scheme (prefix `/dubbo` when none is given).
    pub fn parse(rest: &str, session_timeout: Duration) -> anyhow::Result<Self> {
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_matches('/'))),
            None => (rest, "/dubbo".to_string()),
        };
        anyhow::ensure!(
            !hosts.is_empty(),
            "--registry zk://…: give the ensemble, zk://host:2181[,host:2181…]/prefix"
        );
        anyhow::ensure!(
            prefix != "/",
            "--registry zk://{hosts}/: give the prefix services live under, e.g. /dubbo"
        );
        Ok(ZkSettings {
            hosts: hosts.to_string(),
            prefix,
            session_timeout,
        })
    }
}

/// The segment under a service holding its instances.
pub const PROVIDERS: &str = "providers";

/// Reads services from ZooKeeper.
pub struct ZkRegistry {
    settings: ZkSettings,
}

impl ZkRegistry {
    /// A source reading the ensemble and prefix `settings` name.
    pub fn new(settings: ZkSettings) -> Self {
        ZkRegistry { settings }
    }

    /// The service of an instance znode path, if it is one:
    /// `<prefix>/<service>/providers/<node>`.
    fn service_of<'p>(&self, path: &'p str) -> Option<(&'p str, &'p str)> {
        let rest = path
            .strip_prefix(&self.settings.prefix)?
            .strip_prefix('/')?;
        let mut parts = rest.split('/');
        let (service, providers, node) = (parts.next()?, parts.next()?, parts.next()?);
        (parts.next().is_none()
            && providers == PROVIDERS
            && !service.is_empty()
            && !node.is_empty())
        .then_some((service, node))
    }

    /// Lists every instance under the prefix.
    async fn list(
        &self,
        client: &zk::Client,
        sink: &RegistrySink,
    ) -> Result<Vec<Instance>, String> {
        let prefix = &self.settings.prefix;
        let services = match client.list_children(prefix).await {
            Ok(s) => s,
            Err(zk::Error::NoNode) => return Ok(Vec::new()),
            Err(e) => return Err(format!("listing {prefix}: {e}")),
        };
        let mut out = Vec::new();
        for service in services {
            let dir = format!("{prefix}/{service}/{PROVIDERS}");
            let nodes = match client.list_children(&dir).await {
                Ok(n) => n,
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(format!("listing {dir}: {e}")),
            };
            for node in nodes {
                let path = format!("{dir}/{node}");
                let data = match client.get_data(&path).await {
                    Ok((data, _)) => data,
                    Err(zk::Error::NoNode) => continue,
                    Err(e) => return Err(format!("reading {path}: {e}")),
                };
                match decode(&service, &node, &path, &data).await {
                    Ok(i) => out.push(i),
                    Err(r) => sink.reject(&path, r.reason, &r.detail),
                }
            }
        }
        Ok(out)
    }

    /// One session: connect, watch, list, follow events. Returns when the
    /// session is over (expired, closed) or a call fails.
    async fn session(
        &self,
        sink: &RegistrySink,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let s = &self.settings;
        let client = zk::Client::connector()
            .with_session_timeout(s.session_timeout)
            .connect(&s.hosts)
            .await
            .map_err(|e| format!("connecting to {}: {e}", s.hosts))?;
        let mut watcher = client
            .watch(&s.prefix, zk::AddWatchMode::PersistentRecursive)
            .await
            .map_err(|e| format!("watching {}: {e}", s.prefix))?;
        let listed = self.list(&client, sink).await?;
        tracing::info!(hosts = %s.hosts, prefix = %s.prefix, instances = listed.len(), "ZooKeeper listed");
        sink.snapshot(listed);
        sink.mark_synced();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                e = watcher.changed() => e,
            };
            match event.event_type {
                zk::EventType::Session => match event.session_state {
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                        // Events may have been lost while disconnected.
                        let listed = self.list(&client, sink).await?;
                        sink.snapshot(listed);
                    }
                    zk::SessionState::Disconnected => {
                        sink.source_error(&format!(
                            "disconnected from {}; the session may still recover",
                            s.hosts
                        ));
                    }
                    state if state.is_terminated() => {
                        return Err(format!("ZooKeeper session ended: {state}"));
                    }
                    _ => {}
                },
                zk::EventType::NodeCreated | zk::EventType::NodeDataChanged => {
                    let Some((service, node)) = self.service_of(&event.path) else {
                        continue;
                    };
                    match client.get_data(&event.path).await {
                        Ok((data, _)) => match decode(service, node, &event.path, &data).await {
                            Ok(i) => sink.upsert(i),
                            Err(r) => sink.reject(&event.path, r.reason, &r.detail),
                        },
                        Err(zk::Error::NoNode) => sink.remove(&event.path),
                        Err(e) => return Err(format!("reading {}: {e}", event.path)),
                    }
                }
                zk::EventType::NodeDeleted => {
                    if self.service_of(&event.path).is_some() {
                        sink.remove(&event.path);
                    }
                }
                zk::EventType::NodeChildrenChanged => {}
            }
        }
    }
}

/// What an instance znode says about where it serves: its name when that
/// is a provider URL or `host:port`, else its data. Host not resolved yet.
pub fn address_of(
    node: &str,
    data: &[u8],
) -> Result<(super::resolve::HostPort, u32, Option<serde_json::Value>), Rejected> {
    match address_in_name(node)? {
        Some(found) => Ok(found),
        None => match entry::parse_value(data)? {
            ValueOp::Add {
                addr,
                weight,
                metadata,
            } => Ok((addr, weight, metadata)),
            ValueOp::Delete => Err(Rejected::new(
                RejectReason::BadValue,
                "a provider znode's data cannot be a delete",
            )),
        },
    }
}

/// The instance an instance znode stands for.
pub async fn decode(
    service: &str,
    node: &str,
    path: &str,
    data: &[u8],
) -> Result<Instance, Rejected> {
    let (addr, weight, metadata) = address_of(node, data)?;
    let addr = super::resolve::resolve(&addr).await?;
    Ok(Instance {
        service: service.to_string(),
        key: path.to_string(),
        addr,
        weight,
        metadata,
        registered_at: SystemTime::now(),
    })
}

/// What a znode name says: a percent-encoded provider URL
/// (`scheme://host:port/path?weight=N`) or `host:port`; `None` when it
/// says neither (the data is used then).
fn address_in_name(
    node: &str,
) -> Result<Option<(super::resolve::HostPort, u32, Option<serde_json::Value>)>, Rejected> {
    let decoded = percent_encoding::percent_decode_str(node).decode_utf8_lossy();
    if decoded.contains("://") {
        let url = url::Url::parse(&decoded).map_err(|e| {
            Rejected::new(
                RejectReason::BadValue,
                format!("provider URL {decoded:?}: {e}"),
            )
        })?;
        let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
        let port = url.port().ok_or_else(|| {
            Rejected::new(
                RejectReason::BadAddress,
                format!("provider URL {decoded:?} has no port"),
            )
        })?;
        let hp = entry::parse_host_port(&format!("{}:{port}", bracket(host)))?;
        let weight = match url.query_pairs().find(|(k, _)| k == "weight") {
            None => 1,
            Some((_, w)) => w
                .parse::<u32>()
                .ok()
                .filter(|w| (1..=10_000).contains(w))
                .ok_or_else(|| {
                    Rejected::new(
                        RejectReason::BadValue,
                        format!("provider URL weight {w:?} is not 1-10000"),
                    )
                })?,
        };
        // Dubbo URLs say where a provider runs as parameters.
        let mut metadata = serde_json::json!({ "url": decoded });
        for (k, v) in url.query_pairs() {
            if k == "zone" || k == "region" {
                metadata[k.as_ref()] = serde_json::Value::String(v.into_owned());
            }
        }
        return Ok(Some((hp, weight, Some(metadata))));
    }
    Ok(entry::parse_host_port(&decoded)
        .ok()
        .map(|hp| (hp, 1, None)))
}

/// An IPv6 literal in brackets, anything else as it is.
fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl Registry for ZkRegistry {
    fn kind(&self) -> &'static str {
        "zk"
    }

    fn leased(&self) -> bool {
        true
    }

    fn run(
        self: Arc<Self>,
        sink: RegistrySink,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        async move {
            let (this, sink, shutdown) = (&self, &sink, &shutdown);
            let session = move || async move { this.session(sink, shutdown).await };
            run_sessions(shutdown, session, |error, _| sink.session_lost(error)).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_paths() {
        let s = ZkSettings::parse("h1:2181,h2:2181/dubbo/", Duration::from_secs(5)).unwrap();
        assert_eq!(
            (s.hosts.as_str(), s.prefix.as_str()),
            ("h1:2181,h2:2181", "/dubbo")
        );
        assert_eq!(
            ZkSettings::parse("h:1", Duration::ZERO).unwrap().prefix,
            "/dubbo"
        );
        assert!(ZkSettings::parse("h:1/", Duration::ZERO).is_err());
        let r = ZkRegistry::new(s);
        assert_eq!(
            r.service_of("/dubbo/greeter/providers/x"),
            Some(("greeter", "x"))
        );
        assert_eq!(r.service_of("/dubbo/greeter/consumers/x"), None);
        assert_eq!(r.service_of("/dubbo/greeter/providers"), None);
        assert_eq!(r.service_of("/dubbo/greeter/providers/x/y"), None);
        assert_eq!(r.service_of("/other/greeter/providers/x"), None);
    }

    #[tokio::test]
    async fn provider_urls_names_and_data_decode() {
        let url =
            "dubbo%3A%2F%2F127.0.0.1%3A20880%2Fcom.example.Greeter%3Fanyhost%3Dtrue%26weight%3D7";
        let i = decode("greeter", url, "/dubbo/greeter/providers/x", b"10.9.9.9")
            .await
            .unwrap();
        assert_eq!((i.addr, i.weight), ("127.0.0.1:20880".parse().unwrap(), 7));
        let i = decode("greeter", "127.0.0.1:5000", "/p", b"")
            .await
            .unwrap();
        assert_eq!(i.addr, "127.0.0.1:5000".parse().unwrap());
        let i = decode("greeter", "instance-1", "/p", b"127.0.0.1:6000")
            .await
            .unwrap();
        assert_eq!(i.addr, "127.0.0.1:6000".parse().unwrap());
        let i = decode("greeter", "grpc%3A%2F%2F%5B%3A%3A1%5D%3A7000%2F", "/p", b"")
            .await
            .unwrap();
        assert_eq!(i.addr, "[::1]:7000".parse().unwrap());
        for (node, data) in [
            ("instance-2", &b"junk"[..]),
            ("dubbo%3A%2F%2F127.0.0.1%2Fno-port", b""),
            ("dubbo%3A%2F%2F127.0.0.1%3A1%2F%3Fweight%3D0", b""),
            ("grpc%3A%2F%2F%25zz", b""),
        ] {
            assert!(decode("g", node, "/p", data).await.is_err(), "{node}");
        }
    }
}
