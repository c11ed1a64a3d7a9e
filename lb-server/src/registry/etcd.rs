//! The etcd registry source.
//!
//! Lists `<prefix>` once, then watches it from the next revision. When the
//! watch is cancelled (compaction, a member without a leader) or the
//! connection is lost, it re-lists and watches again, starting with the next
//! etcd member ([`EtcdAccess`]: one member at a time, keep-alive within
//! etcd's policy); until that succeeds the catalog keeps the last known
//! state, so an etcd outage changes nothing that clients see.

use std::sync::Arc;

use etcd_client::{EventType, WatchOptions};
use futures::future::BoxFuture;
use futures::FutureExt;
use lb_client::internals::list_prefix;
pub use lb_client::internals::EtcdAccess;
use tokio_util::sync::CancellationToken;

use super::entry::{self, Decoded};
use super::retry::run_sessions;
use super::{Registry, RegistrySink};
use crate::model::Instance;

/// Reads services from etcd.
pub struct EtcdRegistry {
    access: EtcdAccess,
    prefix: String,
}

impl EtcdRegistry {
    /// A source reading keys under `prefix` from the etcd cluster `access`
    /// names.
    pub fn new(access: EtcdAccess, prefix: String) -> Self {
        EtcdRegistry { access, prefix }
    }

    /// One list + watch session; returns when the watch ends (error,
    /// compaction, or shutdown) and whether it listed successfully.
    async fn session(
        &self,
        sink: &RegistrySink,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut client = self.access.connect().await?;
        let (revision, kvs) = list_prefix(&mut client, &self.prefix)
            .await
            .map_err(|e| anyhow::anyhow!("listing {:?}: {e}", self.prefix))?;
        let mut instances: Vec<Instance> = Vec::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match entry::decode(&self.prefix, &key, kv.value()).await {
                Ok(Decoded::Upsert(i)) => instances.push(i),
                Ok(Decoded::Delete) => {}
                Err(r) => sink.reject(&key, r.reason, &r.detail),
            }
        }
        tracing::info!(prefix = %self.prefix, revision, instances = instances.len(), "etcd listed");
        sink.snapshot(instances);
        sink.mark_synced();

        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut watch = client.watch(self.prefix.as_str(), Some(options)).await?;
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = watch.message() => m?,
            };
            let Some(response) = message else {
                anyhow::bail!("watch stream ended");
            };
            if response.canceled() {
                anyhow::bail!(
                    "watch cancelled (compacted at revision {}): {}",
                    response.compact_revision(),
                    response.cancel_reason()
                );
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match event.event_type() {
                    EventType::Delete => sink.remove(&key),
                    EventType::Put => match entry::decode(&self.prefix, &key, kv.value()).await {
                        Ok(Decoded::Upsert(i)) => sink.upsert(i),
                        Ok(Decoded::Delete) => sink.remove(&key),
                        Err(r) => sink.reject(&key, r.reason, &r.detail),
                    },
                }
            }
        }
    }
}

impl Registry for EtcdRegistry {
    fn kind(&self) -> &'static str {
        "etcd"
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
            let session = move || async move {
                this.session(sink, shutdown)
                    .await
                    .map_err(|e| e.to_string())
            };
            run_sessions(shutdown, session, |error, retry_in| {
                this.access.rotate();
                sink.session_lost(error);
                tracing::debug!(next = ?this.access.current_endpoint(), ?retry_in, "etcd session retry");
            })
            .await
        }
        .boxed()
    }
}
