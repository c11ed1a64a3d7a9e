//! How the project talks to etcd: the LB's registry watch and cluster
//! session, and the registration helper, all connect through [`EtcdAccess`].
//!
//! Two rules of a stock etcd shape it:
//! - **Keep-alive within etcd's policy.** etcd's gRPC server enforces
//!   `--grpc-keepalive-min-time` (5 s by default) with `PermitWithoutStream:
//!   false`: a client that pings more often, or pings with no stream open,
//!   collects strikes and is sent GOAWAY `too_many_pings`. So pings go every
//!   [`KEEPALIVE_INTERVAL`] (twice the minimum), only while a stream is open
//!   (every session here holds a watch or a lease keep-alive stream).
//! - **One member at a time, the next one on failure.** A client built over
//!   all members balances each request over them, and a dead member keeps
//!   being picked until its reconnect fails, so a request can fail while two
//!   live members hold quorum. [`EtcdAccess::connect`] instead opens a client
//!   on one member, checks that it answers, and remembers it; when a session
//!   fails its owner calls [`EtcdAccess::rotate`], and the next connect starts
//!   at the next member. Streams ask for a leader (etcd's `require-leader`
//!   metadata), so a member cut off from quorum cancels them and the session
//!   moves on instead of waiting on a member that will tell it nothing.
//!
//! And one of lossy links: the traffic to etcd is thin (a lease keep-alive
//! every few seconds, a write now and then), and TCP backs off
//! exponentially on a segment lost again and again: on a link that drops
//! 30 % of its packets a keep-alive lost four times in a row arrives after
//! ten seconds, by when its lease is gone. So the connection to the member
//! is made here, with Linux's linear timeouts for thin streams
//! (`TCP_THIN_LINEAR_TIMEOUTS`), and handed to the client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// HTTP/2 PING interval: twice etcd's default `--grpc-keepalive-min-time`.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the member counts as gone.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for the TCP (and TLS) connect to one member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Limit for the first answer of a member.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Limit for a unary request. A write proposed while the leader is gone
/// waits for the next leader (etcd elects one in about a second); past
/// this, the session gives up and starts again on the next member.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where an etcd cluster is and how to get in: endpoints, TLS, user; and
/// which member the next session starts with.
#[derive(Clone, Default)]
pub struct EtcdAccess {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// TLS towards etcd (https), when set.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// User name and password, when etcd authentication is on.
    pub user: Option<(String, String)>,
    /// Index (into `endpoints`) of the member the next connect tries first.
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("EtcdAccess")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl EtcdAccess {
    /// Access without TLS or credentials.
    pub fn plain(endpoints: Vec<String>) -> Self {
        EtcdAccess {
            endpoints,
            ..Default::default()
        }
    }

    /// Access with TLS and credentials as given.
    pub fn new(
        endpoints: Vec<String>,
        tls: Option<tonic::transport::ClientTlsConfig>,
        user: Option<(String, String)>,
    ) -> Self {
        EtcdAccess {
            endpoints,
            tls,
            user,
            next: Default::default(),
        }
    }

    /// Connect options: short timeouts, keep-alive within etcd's policy,
    /// leader required on streams, TLS and credentials.
    pub fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        options
    }

    /// A client on the first member, starting at the remembered one, that
    /// answers within a couple of seconds; that member is remembered.
    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(etcd_client::Error::InvalidArgs("no etcd endpoint".into()));
        }
        let start = self.next.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let index = (start + i) % n;
            let endpoint = &self.endpoints[index];
            match self.open(endpoint).await {
                Ok(client) => {
                    self.next.store(index, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e) => {
                    tracing::debug!(%endpoint, error = %e, "etcd member did not answer; trying the next");
                    last = Some(e);
                }
            }
        }
        // Next time, start one further than this time.
        self.next.store((start + 1) % n, Ordering::Relaxed);
        Err(last.expect("at least one endpoint"))
    }

    /// The session on the current member failed: the next connect starts
    /// with the member after it.
    pub fn rotate(&self) {
        let n = self.endpoints.len().max(1);
        let _ = self
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| Some((i + 1) % n));
    }

    /// The member the next connect tries first.
    pub fn current_endpoint(&self) -> Option<&str> {
        let n = self.endpoints.len();
        (n > 0).then(|| self.endpoints[self.next.load(Ordering::Relaxed) % n].as_str())
    }

    /// The member's channel, over a connection made by [`thin_stream`].
    fn channel(&self, endpoint: &str) -> Result<tonic::transport::Channel, etcd_client::Error> {
        use tonic::transport::Endpoint;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let url = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("{scheme}://{endpoint}")
        };
        let mut e = Endpoint::from_shared(url)
            .map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(false);
        if let Some(tls) = &self.tls {
            e = e.tls_config(tls.clone())?;
        }
        Ok(e.connect_with_connector_lazy(tower::service_fn(thin_stream)))
    }

    async fn open(&self, endpoint: &str) -> Result<Client, etcd_client::Error> {
        let options = self.connect_options();
        let attempt = async {
            let channel = etcd_client::Channel::Tonic(self.channel(endpoint)?);
            let mut client = Client::from_channel(channel, Some(options)).await?;
            // The client connects lazily; one cheap request proves the member
            // is there and answering.
            client.status().await?;
            Ok(client)
        };
        match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("etcd member {endpoint} did not answer within {PROBE_TIMEOUT:?}"),
            ))),
        }
    }
}

/// A TCP connection to the member `uri` names, tuned as a thin stream
/// ([`crate::thin`]): lease keep-alives must not wait seconds behind a
/// lost segment.
async fn thin_stream(
    uri: http::Uri,
) -> std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    crate::thin::tune(&tcp);
    Ok(hyper_util::rt::TokioIo::new(tcp))
}

/// Keys asked for per listing request.
const PAGE: i64 = 1000;
/// How long one page of a listing may take.
const PAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every key under `prefix`, listed in pages of 1,000 all read at the
/// revision of the first, and that revision (to watch from). One answer
/// for a registry of 100,000 keys would pass gRPC's 4 MiB message limit
/// and the request timeout.
pub async fn list_prefix(
    client: &mut Client,
    prefix: &str,
) -> Result<(i64, Vec<etcd_client::KeyValue>), String> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let mut options = etcd_client::GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut page = tokio::time::timeout(PAGE_TIMEOUT, client.get(from, Some(options)))
            .await
            .map_err(|_| format!("no page of the listing within {PAGE_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        if revision == 0 {
            revision = page.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = page.more();
        let got = page.take_kvs();
        // The next page starts just after the last key of this one.
        let next = got.last().filter(|_| more).map(|last| {
            let mut key = last.key().to_vec();
            key.push(0);
            key
        });
        kvs.extend(got);
        match next {
            Some(key) => from = key,
            None => return Ok((revision, kvs)),
        }
    }
}

/// The end of the key range holding every key that starts with `prefix`
/// (etcd's rule: the prefix with its last byte below 0xff incremented; `\0`,
/// the whole key space, when there is none).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod page_tests {
    use super::prefix_end;

    #[test]
    fn the_prefix_range_ends_where_etcd_says() {
        assert_eq!(prefix_end(b"/services/"), b"/services0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
