//! A static registry file, re-read whenever it changes.
//!
//! Format (JSON): service name → list of addresses, each `"host:port"` or
//! `{"addr": "host:port", "weight": n}`:
//!
//! ```json
//! { "greeter": ["127.0.0.1:50051", {"addr": "127.0.0.1:50052", "weight": 2}] }
//! ```
//!
//! A file that does not parse is rejected as a whole (logged, counted) and
//! the previous contents stay in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use super::entry::{self, Decoded};
use super::{Registry, RegistrySink};
use crate::model::{Instance, RejectReason};

/// How often the file's modification time is checked.
const POLL: Duration = Duration::from_secs(1);

/// Reads services from a JSON file.
pub struct FileRegistry {
    path: PathBuf,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FileEntry {
    Plain(String),
    Weighted { addr: String, weight: Option<u32> },
}

impl FileRegistry {
    /// A source reading `path`.
    pub fn new(path: PathBuf) -> Self {
        FileRegistry { path }
    }

    async fn load(&self, sink: &RegistrySink) -> Result<Vec<Instance>, String> {
        let text = tokio::fs::read(&self.path)
            .await
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let parsed: std::collections::BTreeMap<String, Vec<FileEntry>> =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mut out = Vec::new();
        for (service, entries) in parsed {
            for e in entries {
                let (addr, weight) = match e {
                    FileEntry::Plain(a) => (a, None),
                    FileEntry::Weighted { addr, weight } => (addr, weight),
                };
                let key = format!("{service}/{addr}");
                let value =
                    serde_json::json!({"Op": 0, "Addr": addr, "Metadata": {"weight": weight}})
                        .to_string();
                match entry::decode("", &key, value.as_bytes()).await {
                    Ok(Decoded::Upsert(i)) => out.push(i),
                    Ok(Decoded::Delete) => {}
                    Err(r) => sink.reject(&key, r.reason, &r.detail),
                }
            }
        }
        Ok(out)
    }
}

impl Registry for FileRegistry {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn run(
        self: Arc<Self>,
        sink: RegistrySink,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        async move {
            let mut seen: Option<SystemTime> = None;
            let mut tick = tokio::time::interval(POLL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let modified = tokio::fs::metadata(&self.path).await.and_then(|m| m.modified()).ok();
                if modified.is_none() || modified == seen {
                    continue;
                }
                seen = modified;
                match self.load(&sink).await {
                    Ok(instances) => {
                        tracing::info!(path = %self.path.display(), instances = instances.len(), "registry file loaded");
                        sink.snapshot(instances);
                        sink.mark_synced();
                    }
                    Err(detail) => sink.reject(&self.path.display().to_string(), RejectReason::BadValue, &detail),
                }
            }
        }
        .boxed()
    }
}
