//! Registry sources: who exists.
//!
//! A registry source watches one discovery system (etcd, the embedded
//! in-memory registry, a static file) and reports what it sees through a
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

pub mod entry;
pub mod etcd;
pub mod file;
pub mod memory;
pub mod resolve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;

/// One registered instance of a service, as a registry source sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The service it belongs to, e.g. `greeter`.
    pub service: String,
    /// The key that identifies it within its source (the etcd key, say).
    pub key: String,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Relative weight from the registry metadata (`{"weight": n}`), 1 if unset.
    pub weight: u32,
    /// Metadata as registered (JSON), if any.
    pub metadata: Option<serde_json::Value>,
    /// When this source first reported it.
    pub registered_at: SystemTime,
}

/// A discovery system the LB reads.
pub trait Registry: Send + Sync + 'static {
    /// Short name used in logs, metrics and the admin API (`etcd`, `memory`, …).
    fn kind(&self) -> &'static str;

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
}

impl RegistrySink {
    /// A sink writing into `catalog` on behalf of `source`.
    pub fn new(source: &'static str, catalog: Arc<Catalog>, metrics: Arc<Metrics>) -> Self {
        RegistrySink {
            source,
            catalog,
            metrics,
            log: Arc::new(LogLimiter::default()),
        }
    }

    /// The source's name.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Replaces everything this source had reported with `instances` (initial
    /// listing, or a re-list after a disconnect or compaction).
    pub fn snapshot(&self, instances: Vec<Instance>) {
        self.metrics.event(self.source, "snapshot");
        for (key, r) in self.catalog.replace_source(self.source, instances) {
            self.reject(&key, r.reason, &r.detail);
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

    /// Removes the instance registered under `key`, if any.
    pub fn remove(&self, key: &str) {
        self.metrics.event(self.source, "delete");
        self.catalog.remove(self.source, key);
    }

    /// Reports an entry that could not be used. The last good state of that
    /// key (if any) is kept; nothing else changes. Counted every time;
    /// logged once per key and reason per minute (with the number of
    /// repeats held back), so a key rewritten in a loop cannot flood the log.
    pub fn reject(&self, key: &str, reason: entry::RejectReason, detail: &str) {
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
    }
}

/// A registry source built from a `--registry` value.
pub struct Source {
    /// The source, to run.
    pub registry: Arc<dyn Registry>,
    /// The embedded registry, when that is the source (its registration API
    /// is served on the LB port).
    pub memory: Option<Arc<memory::MemoryRegistry>>,
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

/// Builds the registry source named by a `--registry` value.
pub fn from_url(url: &str, cfg: &crate::config::Config) -> anyhow::Result<Source> {
    if url == "memory" || url == "memory://" {
        let memory = Arc::new(memory::MemoryRegistry::new(
            cfg.default_ttl,
            cfg.max_registrations,
        ));
        return Ok(Source {
            registry: memory.clone(),
            memory: Some(memory),
        });
    }
    if let Some(endpoints) = etcd_endpoints(url) {
        anyhow::ensure!(
            !endpoints.is_empty(),
            "--registry {url:?}: no etcd endpoint given (etcd://host:2379,…)"
        );
        let registry = Arc::new(etcd::EtcdRegistry::new(
            cfg.etcd_access(endpoints)?,
            cfg.etcd_prefix.clone(),
        ));
        return Ok(Source {
            registry,
            memory: None,
        });
    }
    if let Some(path) = url.strip_prefix("file://") {
        anyhow::ensure!(
            !path.is_empty(),
            "--registry {url:?}: no file path given (file:///path/services.json)"
        );
        return Ok(Source {
            registry: Arc::new(file::FileRegistry::new(path.into())),
            memory: None,
        });
    }
    anyhow::bail!(
        "--registry {url:?} is not one of: memory, etcd://host:port[,host:port…], file:///path"
    )
}
