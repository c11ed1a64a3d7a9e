//! The Consul registry source, through Consul's HTTP API:
//! - the service catalog, `GET /v1/catalog/services`, watched with blocking
//!   queries (`index`, `wait`): services appearing get a watcher, services
//!   disappearing lose their backends;
//! - per service, `GET /v1/health/service/<name>?passing`, watched the same
//!   way: the instances whose checks all pass, at `Service.Address` (or the
//!   node's address) and `Service.Port`, weighted by `Weights.Passing`.
//!
//! Blocking queries follow Consul's documented rules: the index of the last
//! answer is sent back; an index that goes backwards resets the watch to 0;
//! an index that is not positive is replaced by 1; answers that come back at
//! once without a new index are rate-limited. A 5xx, a refused connection or
//! an answer that does not parse leaves the last known state in force, is
//! counted, and is retried with backoff. The ACL token goes in
//! `X-Consul-Token`. `consul://host:8500?dc=dc1&tag=grpc` picks a datacenter
//! and keeps only services and instances with a tag; `consul+https://host:8501`
//! speaks HTTPS to the agent (its CA and an optional client certificate come
//! from `--consul-ca`, `--consul-cert`, `--consul-key`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::retry::session_backoff;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::entry;
use super::{Registry, RegistrySink};
use crate::model::{Instance, RejectReason, Rejected};

/// Where Consul is and what to read.
#[derive(Clone)]
pub struct ConsulSettings {
    /// `http://host:port` or `https://host:port`.
    pub base: String,
    /// TLS towards the agent (`https` bases only).
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// Datacenter, when not the agent's own.
    pub dc: Option<String>,
    /// Only services and instances with this tag.
    pub tag: Option<String>,
    /// ACL token.
    pub token: Option<String>,
    /// How long one blocking query may wait.
    pub wait: Duration,
}

impl std::fmt::Debug for ConsulSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulSettings")
            .field("base", &self.base)
            .field("tls", &self.tls.is_some())
            .field("dc", &self.dc)
            .field("tag", &self.tag)
            .field("token", &self.token.is_some())
            .field("wait", &self.wait)
            .finish()
    }
}

impl ConsulSettings {
    /// Settings from a `consul://host:port[?dc=…&tag=…]` URL, or
    /// `consul+https://…` (default port 8501) with `tls` to trust the agent.
    pub fn parse(
        url: &str,
        token: Option<String>,
        wait: Duration,
        tls: Option<tokio_rustls::rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let parsed =
            url::Url::parse(url).map_err(|e| anyhow::anyhow!("--registry {url:?}: {e}"))?;
        let (scheme, default_port) = match parsed.scheme() {
            "consul" => ("http", 8500),
            "consul+https" => ("https", 8501),
            other => anyhow::bail!(
                "--registry {url:?}: {other}:// is neither consul:// nor consul+https://"
            ),
        };
        match (scheme, &tls) {
            ("https", None) => anyhow::bail!(
                "--registry {url:?}: HTTPS to Consul needs the agent's CA: give --consul-ca"
            ),
            ("http", Some(_)) => anyhow::bail!(
                "--registry {url:?}: --consul-ca is given but the URL is plain HTTP: use consul+https://"
            ),
            _ => {}
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--registry {url:?}: give consul://host:8500"))?;
        let port = parsed.port().unwrap_or(default_port);
        let mut dc = None;
        let mut tag = None;
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "dc" => dc = Some(v.into_owned()),
                "tag" => tag = Some(v.into_owned()),
                other => anyhow::bail!("--registry {url:?}: unknown parameter {other:?} (dc, tag)"),
            }
        }
        let wait = wait.clamp(Duration::from_secs(1), Duration::from_secs(600));
        Ok(ConsulSettings {
            base: format!("{scheme}://{host}:{port}"),
            tls: tls.map(Arc::new),
            dc,
            tag,
            token: token.filter(|t| !t.is_empty()),
            wait,
        })
    }
}

/// The next index to send, from the one sent and the one answered
/// (Consul's documented rules).
pub fn next_index(sent: u64, answered: u64) -> u64 {
    if answered < sent {
        0 // went backwards: start over
    } else if answered == 0 {
        1 // never block on 0
    } else {
        answered
    }
}

/// One element of a `/v1/health/service/<name>` answer.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: Node,
    service: ServiceDef,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default)]
    node: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceDef {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: i64,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    weights: Option<Weights>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    #[serde(default)]
    passing: i64,
}

/// One instance of a health answer: its key and, unless rejected, its
/// address (not resolved yet) and weight.
pub type Entry = (String, Result<(super::resolve::HostPort, u32), Rejected>);

/// Parses a `/v1/health/service/<name>` answer: one [`Entry`] per element,
/// or why the whole answer cannot be read.
pub fn parse_health(service: &str, body: &[u8]) -> Result<Vec<Entry>, String> {
    let entries: Vec<HealthEntry> =
        serde_json::from_slice(body).map_err(|e| format!("the answer does not parse: {e}"))?;
    Ok(entries.iter().map(|e| address_of(service, e)).collect())
}

/// The key, address and weight of one health entry.
fn address_of(service: &str, e: &HealthEntry) -> Entry {
    let key = format!("{service}/{}/{}", e.node.node, e.service.id);
    let host = if e.service.address.is_empty() {
        &e.node.address
    } else {
        &e.service.address
    };
    let address = if !(1..=65535).contains(&e.service.port) {
        Err(Rejected::new(
            RejectReason::BadAddress,
            format!("Service.Port {} is not 1-65535", e.service.port),
        ))
    } else {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        entry::parse_host_port(&format!("{host}:{}", e.service.port))
    };
    let weight = e
        .service
        .weights
        .as_ref()
        .map(|w| w.passing.clamp(1, 10_000) as u32)
        .unwrap_or(1);
    (key, address.map(|a| (a, weight)))
}

/// Turns one health entry into an instance of `service`.
async fn decode(service: &str, e: &HealthEntry) -> Result<Instance, (String, Rejected)> {
    let (key, address) = address_of(service, e);
    let (hp, weight) = address.map_err(|r| (key.clone(), r))?;
    let addr = super::resolve::resolve(&hp)
        .await
        .map_err(|r| (key.clone(), r))?;
    Ok(Instance {
        service: service.to_string(),
        key,
        addr,
        weight,
        metadata: metadata_of(e),
        registered_at: SystemTime::now(),
    })
}

/// An instance's metadata: its node's `Meta` overlaid with its service's
/// (so `zone` may be set once per node, or per service instance).
fn metadata_of(e: &HealthEntry) -> Option<serde_json::Value> {
    let (node, service) = (e.node.meta.as_ref(), e.service.meta.as_ref());
    if node.is_none() && service.is_none() {
        return None;
    }
    let mut merged = node.cloned().unwrap_or_default();
    merged.extend(service.cloned().unwrap_or_default());
    Some(serde_json::json!(merged))
}

/// Reads services from Consul.
pub struct ConsulRegistry {
    settings: ConsulSettings,
    http: reqwest::Client,
}

impl ConsulRegistry {
    /// A source reading the Consul agent `settings` name.
    pub fn new(settings: ConsulSettings) -> anyhow::Result<Self> {
        // A blocking query may last `wait` plus up to wait/16 of jitter.
        let limit = settings.wait + settings.wait / 16 + Duration::from_secs(10);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(limit);
        let tls = match &settings.tls {
            Some(tls) => (**tls).clone(),
            None => crate::net::tls::trust_nobody(),
        };
        let http = http
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| anyhow::anyhow!("Consul HTTP client: {e}"))?;
        Ok(ConsulRegistry { settings, http })
    }

    /// One blocking GET: the body and the answer's index.
    async fn get(
        &self,
        path: &str,
        index: u64,
        extra: &[(&str, &str)],
    ) -> Result<(Vec<u8>, u64), String> {
        let s = &self.settings;
        let wait = format!("{}s", s.wait.as_secs());
        let index_text = index.to_string();
        let mut query: Vec<(&str, &str)> = vec![("index", &index_text), ("wait", &wait)];
        if let Some(dc) = &s.dc {
            query.push(("dc", dc));
        }
        query.extend_from_slice(extra);
        let url = url::Url::parse_with_params(&format!("{}{path}", s.base), &query)
            .map_err(|e| format!("GET {path}: {e}"))?;
        let mut request = self.http.get(url);
        if let Some(token) = &s.token {
            request = request.header("X-Consul-Token", token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = response.status();
        let answered = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("GET {path}: reading the answer: {e}"))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(format!("GET {path}: {status}: {}", text.trim()));
        }
        let answered = answered.ok_or_else(|| format!("GET {path}: no X-Consul-Index header"))?;
        Ok((body.to_vec(), answered))
    }

    /// Watches the catalog, starting and stopping per-service watchers.
    async fn watch_catalog(self: Arc<Self>, sink: RegistrySink, shutdown: CancellationToken) {
        let mut index = 0u64;
        let mut watchers: HashMap<String, (JoinHandle<()>, CancellationToken)> = HashMap::new();
        let mut backoff = session_backoff();
        // Readiness: the catalog listed, and every service in it answered once.
        let mut pending: Option<Arc<AtomicUsize>> = None;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.get("/v1/catalog/services", index, &[]) => r,
            };
            let (body, answered) = match result {
                Ok(ok) => ok,
                Err(e) => {
                    sink.session_lost(&e);
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let services: BTreeMap<String, Vec<String>> = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => {
                    sink.source_error(&format!(
                        "/v1/catalog/services: the answer does not parse: {e}"
                    ));
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            let wanted: Vec<String> = services
                .into_iter()
                .filter(|(name, tags)| {
                    name != "consul" && self.settings.tag.as_ref().is_none_or(|t| tags.contains(t))
                })
                .map(|(name, _)| name)
                .collect();
            let first_listing = pending.is_none();
            let counter = pending
                .get_or_insert_with(|| Arc::new(AtomicUsize::new(wanted.len() + 1)))
                .clone();
            watchers.retain(|name, (_, cancel)| {
                let keep = wanted.contains(name);
                if !keep {
                    tracing::info!(service = %name, "service left the Consul catalog");
                    cancel.cancel();
                    sink.replace_service(name, Vec::new());
                }
                keep
            });
            for name in wanted {
                if watchers.contains_key(&name) {
                    continue;
                }
                let cancel = shutdown.child_token();
                let task = tokio::spawn(self.clone().watch_service(
                    name.clone(),
                    sink.clone(),
                    counter.clone(),
                    cancel.clone(),
                ));
                watchers.insert(name, (task, cancel));
            }
            if first_listing && done_one(&counter) {
                sink.mark_synced();
            }
            let next = next_index(index, answered);
            if next == index && started.elapsed() < Duration::from_millis(100) {
                // An answer at once without a new index: do not spin.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            index = next;
        }
        for (_, (task, cancel)) in watchers {
            cancel.cancel();
            let _ = task.await;
        }
    }

    /// Watches one service's passing instances until `cancel`.
    async fn watch_service(
        self: Arc<Self>,
        service: String,
        sink: RegistrySink,
        pending: Arc<AtomicUsize>,
        cancel: CancellationToken,
    ) {
        let path = format!("/v1/health/service/{}", urlencode(&service));
        let mut index = 0u64;
        let mut first = true;
        let mut backoff = session_backoff();
        let tag = self.settings.tag.clone();
        loop {
            let mut extra: Vec<(&str, &str)> = vec![("passing", "1")];
            if let Some(t) = &tag {
                extra.push(("tag", t));
            }
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.get(&path, index, &extra) => r,
            };
            let outcome = match result {
                Err(e) => Err(e),
                Ok((body, answered)) => match serde_json::from_slice::<Vec<HealthEntry>>(&body) {
                    Err(e) => Err(format!("{path}: the answer does not parse: {e}")),
                    Ok(entries) => {
                        let mut instances = Vec::new();
                        for e in &entries {
                            match decode(&service, e).await {
                                Ok(i) => instances.push(i),
                                Err((key, r)) => sink.reject(&key, r.reason, &r.detail),
                            }
                        }
                        sink.replace_service(&service, instances);
                        Ok(answered)
                    }
                },
            };
            if first {
                first = false;
                if done_one(&pending) {
                    sink.mark_synced();
                }
            }
            match outcome {
                Ok(answered) => {
                    backoff.reset();
                    let next = next_index(index, answered);
                    if next == index && started.elapsed() < Duration::from_millis(100) {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    index = next;
                }
                Err(e) => {
                    sink.source_error(&e);
                    if !backoff.wait(&cancel).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Counts one of the answers readiness waits for; true when it was the last.
fn done_one(pending: &AtomicUsize) -> bool {
    pending
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok_and(|before| before == 1)
}

/// Percent-encodes a service name for a URL path.
fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Registry for ConsulRegistry {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn run(
        self: Arc<Self>,
        sink: RegistrySink,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        self.watch_catalog(sink, shutdown).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let s = ConsulSettings::parse(
            "consul://127.0.0.1:8500?dc=dc2&tag=grpc",
            Some("t".into()),
            Duration::from_secs(300),
            None,
        )
        .unwrap();
        assert_eq!(s.base, "http://127.0.0.1:8500");
        assert_eq!(
            (s.dc.as_deref(), s.tag.as_deref()),
            (Some("dc2"), Some("grpc"))
        );
        assert_eq!(
            ConsulSettings::parse("consul://c", None, Duration::ZERO, None)
                .unwrap()
                .base,
            "http://c:8500"
        );
        assert!(ConsulSettings::parse("consul://c?x=1", None, Duration::ZERO, None).is_err());
        assert!(ConsulSettings::parse("consul://", None, Duration::ZERO, None).is_err());
        // HTTPS needs a CA, and a CA needs HTTPS.
        let err = ConsulSettings::parse("consul+https://c", None, Duration::ZERO, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--consul-ca"), "{err}");
        let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
        .with_no_client_auth();
        let s = ConsulSettings::parse("consul+https://c", None, Duration::ZERO, Some(tls.clone()))
            .unwrap();
        assert_eq!((s.base.as_str(), s.tls.is_some()), ("https://c:8501", true));
        let err = ConsulSettings::parse("consul://c", None, Duration::ZERO, Some(tls))
            .unwrap_err()
            .to_string();
        assert!(err.contains("consul+https://"), "{err}");
    }

    #[test]
    fn indexes_follow_the_documented_rules() {
        assert_eq!(next_index(0, 12), 12);
        assert_eq!(next_index(12, 15), 15);
        assert_eq!(next_index(15, 15), 15);
        assert_eq!(next_index(15, 3), 0, "backwards resets");
        assert_eq!(next_index(0, 0), 1, "never block on 0");
    }

    #[tokio::test]
    async fn health_entries_decode_and_junk_is_rejected() {
        let json = br#"[
          {"Node":{"Node":"n1","Address":"127.0.0.1"},"Service":{"ID":"g1","Service":"greeter","Address":"","Port":5000,"Weights":{"Passing":3,"Warning":1}},"Checks":[]},
          {"Node":{"Node":"n2","Address":"10.0.0.2"},"Service":{"ID":"g2","Service":"greeter","Address":"127.0.0.2","Port":5001,"Meta":{"zone":"a"}},"Checks":[]},
          {"Node":{"Node":"n3","Address":"127.0.0.3"},"Service":{"ID":"g3","Port":0},"Checks":[]},
          {"Node":{"Node":"n4","Address":""},"Service":{"ID":"g4","Port":80},"Checks":[]}
        ]"#;
        let entries: Vec<HealthEntry> = serde_json::from_slice(json).unwrap();
        let i = decode("greeter", &entries[0]).await.unwrap();
        assert_eq!(
            (i.addr, i.weight, i.key.as_str()),
            ("127.0.0.1:5000".parse().unwrap(), 3, "greeter/n1/g1")
        );
        let i = decode("greeter", &entries[1]).await.unwrap();
        assert_eq!(
            i.addr,
            "127.0.0.2:5001".parse().unwrap(),
            "Service.Address wins"
        );
        assert_eq!(
            decode("greeter", &entries[2]).await.unwrap_err().1.reason,
            RejectReason::BadAddress
        );
        assert_eq!(
            decode("greeter", &entries[3]).await.unwrap_err().1.reason,
            RejectReason::BadAddress
        );
    }
}
