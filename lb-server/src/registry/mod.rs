//! Registry sources: who exists.
//!
//! A registry source watches one discovery system (etcd, the embedded
//! in-memory registry, a static file, DNS, ZooKeeper, Consul, Kubernetes)
//! and reports
//! what it sees through a
//! [`RegistrySink`]: full snapshots, single upserts and removals, and rejected
//! entries. The sink writes into the [`Catalog`]; sources never read it.
//!
//! | module | job |
//! | --- | --- |
//! | [`entry`] | parse keys and values (etcd naming JSON or plain `host:port`) |
//! | [`resolve`] | turn `host:port` into a socket address |
//! | [`memory`] | embedded registry with TTL leases and its registration API |
//! | [`etcd`] | initial get + watch, re-list on compaction or disconnect |
//! | [`file`] | a static JSON file, reloaded when it changes |
//! | [`dns`] | A/AAAA and SRV records, re-resolved as their TTLs run out |
//! | [`zookeeper`] | Dubbo-style provider znodes, watched recursively |
//! | [`consul`] | Consul's health API with blocking queries |
//! | [`k8s`] | Kubernetes EndpointSlices, listed then watched |
//! | [`retry`] | sessions one after another, with backoff |
//!
//! Several sources can feed one LB (`--registry` repeated); each service
//! belongs to one of them, the first listed that defines it (see
//! [`crate::catalog`]).

pub mod consul;
pub mod dns;
pub mod entry;
pub mod etcd;
pub mod file;
pub mod k8s;
pub mod memory;
pub mod resolve;
pub mod retry;
pub mod zookeeper;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::RegistryFlags;
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::model::Instance;

/// A discovery system the LB reads.
pub trait Registry: Send + Sync + 'static {
    /// Short name used in logs, metrics and the admin API (`etcd`, `memory`, …).
    fn kind(&self) -> &'static str;

    /// Whether its entries live on the backend's own lease or session
    /// (etcd leases, ZooKeeper ephemeral nodes, the embedded registry's
    /// leases): then an entry can vanish because the *backend* lost the
    /// registry, and one that still serves is kept for a grace period (see
    /// the catalog's `departed`). Entries an operator or a platform
    /// declares (DNS, Kubernetes, Consul, a file) are removed when they go,
    /// unless the answer would empty the service.
    fn leased(&self) -> bool {
        false
    }

    /// Feeds `sink` until `shutdown` is cancelled. Must never return early on
    /// errors: a source keeps the last known state and retries by itself.
    fn run(
        self: Arc<Self>,
        sink: RegistrySink,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}

/// Where a registry source reports what it sees. Cheap to clone.
#[derive(Clone)]
pub struct RegistrySink {
    source: &'static str,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    log: Arc<LogLimiter>,
    /// Whether the source's last word was a good answer.
    ok: Arc<std::sync::atomic::AtomicBool>,
    /// When a session was last lost.
    last_lost: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl RegistrySink {
    /// A sink writing into `catalog` on behalf of `source`.
    pub fn new(source: &'static str, catalog: Arc<Catalog>, metrics: Arc<Metrics>) -> Self {
        RegistrySink {
            source,
            catalog,
            metrics,
            log: Arc::new(LogLimiter::default()),
            ok: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            last_lost: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Replaces everything this source had reported with `instances` (initial
    /// listing, or a re-list after a disconnect or compaction).
    pub fn snapshot(&self, instances: Vec<Instance>) {
        self.metrics.event(self.source, "snapshot");
        self.source_ok(true);
        for (key, r) in self.catalog.replace_source(self.source, instances) {
            self.reject(&key, r.reason, &r.detail);
        }
    }

    /// Replaces what this source had reported for `service` with
    /// `instances` (all of that service), leaving its other services alone.
    pub fn replace_service(&self, service: &str, instances: Vec<Instance>) {
        self.metrics.event(self.source, "snapshot");
        self.source_ok(true);
        for (key, r) in self
            .catalog
            .replace_source_service(self.source, service, instances)
        {
            self.reject(&key, r.reason, &r.detail);
        }
    }

    /// Reports that the source itself failed (unreachable, timed out,
    /// answered an error): counted as an `error` event and logged (at most
    /// once a minute per distinct detail); the last known state stays.
    pub fn source_error(&self, detail: &str) {
        self.metrics.event(self.source, "error");
        self.source_ok(false);
        if let Some(repeats) = self.log.allow(&format!("{}|error|{detail}", self.source)) {
            tracing::warn!(source = self.source, detail = ?detail, repeats_not_logged = repeats,
                "registry source failing; serving the last known state");
        }
    }

    /// Reports that the source's session (watch, connection) was lost and
    /// is being opened again: counted in `lb_upstream_reconnects_total`
    /// under the source's kind, then as [`RegistrySink::source_error`];
    /// except that a session lost while the source was answering well, and
    /// not lost before in the last minute, is logged at INFO: one that
    /// comes back at once (a connection reset) is no failure worth a
    /// warning, and one that does not is warned about by its failed
    /// attempts (or its next loss).
    pub fn session_lost(&self, detail: &str) {
        self.metrics.upstream_reconnect(self.source);
        let now = std::time::Instant::now();
        let lost_lately = self
            .last_lost
            .lock()
            .expect("sink lock")
            .replace(now)
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(60));
        if lost_lately || !self.ok.load(std::sync::atomic::Ordering::Relaxed) {
            return self.source_error(detail);
        }
        self.metrics.event(self.source, "error");
        self.source_ok(false);
        if let Some(repeats) = self.log.allow(&format!("{}|lost|{detail}", self.source)) {
            tracing::info!(source = self.source, detail = ?detail, repeats_not_logged = repeats,
                "registry session lost; listing again, serving the last known state meanwhile");
        }
    }

    /// Adds or updates one instance.
    pub fn upsert(&self, instance: Instance) {
        self.metrics.event(self.source, "put");
        let key = instance.key.clone();
        if let Err(r) = self.catalog.upsert(self.source, instance) {
            self.reject(&key, r.reason, &r.detail);
        }
    }

    /// Removes the instance registered under `key`, if any (one still
    /// passing health checks is kept for a grace period: the registry may
    /// have dropped it for reasons of its own).
    pub fn remove(&self, key: &str) {
        self.metrics.event(self.source, "delete");
        self.catalog.remove(self.source, key);
    }

    /// Removes the instance registered under `key` because the backend
    /// itself asked to leave: at once.
    pub fn deregister(&self, key: &str) {
        self.metrics.event(self.source, "delete");
        self.catalog.deregister(self.source, key);
    }

    /// Reports an entry that could not be used. The last good state of that
    /// key (if any) is kept; nothing else changes. Counted every time;
    /// logged once per key and reason per minute (with the number of
    /// repeats held back), so a key rewritten in a loop cannot flood the log.
    pub fn reject(&self, key: &str, reason: crate::model::RejectReason, detail: &str) {
        self.metrics.reject(self.source, reason.as_str());
        let subject = format!("{}|{}|{key}", self.source, reason.as_str());
        if let Some(repeats) = self.log.allow(&subject) {
            // `?key`: keys are outsiders' bytes; Debug escapes control
            // characters, so a key cannot forge log lines.
            tracing::warn!(
                source = self.source,
                key = ?key,
                reason = reason.as_str(),
                detail = ?detail,
                repeats_not_logged = repeats,
                "registry entry rejected"
            );
        }
    }

    /// Marks this source as having listed its contents at least once.
    pub fn mark_synced(&self) {
        self.catalog.mark_synced(self.source);
        self.source_ok(true);
    }

    /// `lb_registry_source_ok`: whether the source's last read succeeded.
    fn source_ok(&self, ok: bool) {
        self.ok.store(ok, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .registry_source_ok
            .get_or_create(&crate::metrics::RegistrySourceLabels {
                source: self.source.to_string(),
            })
            .set(i64::from(ok));
    }
}

/// The registry sources built from the `--registry` values, in priority
/// order (a service two sources define is served from the earlier one).
pub struct Sources {
    /// Each source with its unique name (its kind, `#2` etc. appended when a
    /// kind repeats).
    pub list: Vec<(&'static str, Arc<dyn Registry>)>,
    /// The embedded registry, when one of the sources (its registration API
    /// is served on the LB port).
    pub memory: Option<Arc<memory::MemoryRegistry>>,
}

impl Sources {
    /// The source names, in priority order.
    pub fn names(&self) -> Vec<&'static str> {
        self.list.iter().map(|(n, _)| *n).collect()
    }

    /// The names of the sources whose entries live on leases
    /// ([`Registry::leased`]).
    pub fn leased(&self) -> Vec<&'static str> {
        self.list
            .iter()
            .filter(|(_, r)| r.leased())
            .map(|(n, _)| *n)
            .collect()
    }
}

/// The endpoints of an `etcd://host:port[,host:port…]` registry URL.
pub fn etcd_endpoints(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix("etcd://")?;
    Some(
        rest.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('/').to_string())
            .collect(),
    )
}

/// What `--registry` accepts, for error messages.
const FORMS: &str = "memory, etcd://host:port[,host:port…], file:///path, dns://[server:port], \
                     zk://host:port[,host:port…]/prefix, consul[+https]://host:port[?dc=…&tag=…], \
                     k8s://[namespace]";

/// Builds every registry source named by the `--registry` values.
pub fn from_urls(cfg: &RegistryFlags) -> anyhow::Result<Sources> {
    let urls = &cfg.registry;
    anyhow::ensure!(!urls.is_empty(), "--registry: give at least one of {FORMS}");
    let mut list: Vec<(&'static str, Arc<dyn Registry>)> = Vec::new();
    let mut memory = None;
    for url in urls {
        let registry: Arc<dyn Registry> = match from_url(url, cfg)? {
            Built::Memory(m) => {
                anyhow::ensure!(memory.is_none(), "--registry memory is given twice");
                memory = Some(m.clone());
                m
            }
            Built::Other(r) => r,
        };
        let kind = registry.kind();
        let taken = list
            .iter()
            .filter(|(n, _)| n.split('#').next() == Some(kind))
            .count();
        let name: &'static str = if taken == 0 {
            kind
        } else {
            // A handful of names per process, made once at start-up.
            Box::leak(format!("{kind}#{}", taken + 1).into_boxed_str())
        };
        list.push((name, registry));
    }
    Ok(Sources { list, memory })
}

enum Built {
    Memory(Arc<memory::MemoryRegistry>),
    Other(Arc<dyn Registry>),
}

/// Builds the registry source named by one `--registry` value.
fn from_url(url: &str, cfg: &RegistryFlags) -> anyhow::Result<Built> {
    if url == "memory" || url == "memory://" {
        return Ok(Built::Memory(Arc::new(memory::MemoryRegistry::new(
            cfg.default_ttl,
            cfg.max_registrations,
        ))));
    }
    if let Some(endpoints) = etcd_endpoints(url) {
        anyhow::ensure!(
            !endpoints.is_empty(),
            "--registry {url:?}: no etcd endpoint given (etcd://host:2379,…)"
        );
        return Ok(Built::Other(Arc::new(etcd::EtcdRegistry::new(
            cfg.etcd_access(endpoints)?,
            cfg.etcd_prefix.clone(),
        ))));
    }
    if let Some(path) = url.strip_prefix("file://") {
        anyhow::ensure!(
            !path.is_empty(),
            "--registry {url:?}: no file path given (file:///path/services.json)"
        );
        return Ok(Built::Other(Arc::new(file::FileRegistry::new(path.into()))));
    }
    if let Some(rest) = url.strip_prefix("dns://") {
        return Ok(Built::Other(Arc::new(dns::DnsRegistry::new(
            dns::DnsSettings::parse(rest, cfg)?,
        ))));
    }
    if let Some(rest) = url.strip_prefix("zk://") {
        return Ok(Built::Other(Arc::new(zookeeper::ZkRegistry::new(
            zookeeper::ZkSettings::parse(rest, cfg.zk_session_timeout)?,
        ))));
    }
    if url.starts_with("consul://") || url.starts_with("consul+https://") {
        return Ok(Built::Other(Arc::new(consul::ConsulRegistry::new(
            consul::ConsulSettings::parse(
                url,
                cfg.load_consul_token()?,
                cfg.consul_wait,
                cfg.consul_tls()?,
            )?,
        )?)));
    }
    if let Some(rest) = url.strip_prefix("k8s://") {
        return Ok(Built::Other(Arc::new(k8s::K8sRegistry::new(
            k8s::K8sSettings::parse(rest, &cfg.k8s_port)?,
        ))));
    }
    anyhow::bail!("--registry {url:?} is not one of: {FORMS}")
}
