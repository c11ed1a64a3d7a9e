//! Accepting connections on the LB's ports, defensively.
//!
//! [`guarded`] turns a `TcpListener` into the stream of connections the
//! gRPC and admin servers read, and on the way:
//! - caps connections in total and per peer address ([`crate::net::limits::Quota`]);
//!   a connection over the cap is closed at once and counted;
//! - closes a connection that has not sent its first bytes (the HTTP/2
//!   preface, an HTTP/1 request line, a TLS hello) within the handshake
//!   deadline, so that half-open connections and slowloris senders cannot
//!   hold slots forever;
//! - survives accept errors such as "too many open files" by pausing
//!   instead of spinning;
//! - tunes each connection as a thin stream (linear retransmission
//!   timeouts, an RTO ceiling of one second) and gives it a TCP user timeout ([`PEER_USER_TIMEOUT`]), so that a lossy link
//!   stays up and a dead one is noticed.
//!
//! Every refusal is a rate-limited warn line and a count in
//! `lb_connections_refused_total{port,reason}`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::net::limits::{Exceeded, Permit, Quota};

/// `TCP_USER_TIMEOUT` of accepted connections: a peer that acknowledges
/// nothing the LB sent for this long is behind a dead link, and its
/// connection is closed (gRFC A18's rule, from the server's side). On a
/// link that loses 30 % of its packets the LB's retransmissions (linear
/// for thin streams) get through long before.
pub const PEER_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes a client must send before the handshake deadline.
#[derive(Debug, Clone, Copy)]
pub enum FirstBytes {
    /// The 24-byte HTTP/2 client preface (gRPC over cleartext), or the
    /// first 24 bytes of a TLS hello.
    Http2,
    /// Anything: an HTTP/1 request may be short; hyper's header read
    /// timeout covers the rest.
    Any,
}

impl FirstBytes {
    fn len(self) -> usize {
        match self {
            FirstBytes::Http2 => 24,
            FirstBytes::Any => 1,
        }
    }
}

/// How one port accepts connections.
#[derive(Clone)]
pub struct ListenerSettings {
    /// Port name in logs and metrics (`lb`, `admin`).
    pub port: &'static str,
    /// Connection caps.
    pub quota: Arc<Quota>,
    /// Time allowed for the first bytes.
    pub handshake_timeout: Duration,
    /// What the first bytes must be.
    pub first_bytes: FirstBytes,
    /// Where refusals are counted.
    pub metrics: Arc<Metrics>,
    /// Rate limit of refusal log lines.
    pub log: Arc<LogLimiter>,
}

impl ListenerSettings {
    /// Counts and (rate-limited) logs a connection refused for `reason`.
    pub fn refused(&self, reason: &str, peer: Option<SocketAddr>, detail: &str) {
        self.metrics.connection_refused(self.port, reason);
        let key = format!("{}|{reason}|{:?}", self.port, peer.map(|p| p.ip()));
        if let Some(suppressed) = self.log.allow(&key) {
            tracing::warn!(port = self.port, reason, peer = ?peer, detail, suppressed, "connection refused");
        }
    }
}

/// The connections accepted on `listener`, guarded as the module explains.
pub fn guarded(
    listener: TcpListener,
    settings: ListenerSettings,
) -> impl Stream<Item = io::Result<GuardedIo>> + Send + 'static {
    futures::stream::unfold((listener, settings), |(listener, settings)| async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    settings.refused("accept_error", None, &e.to_string());
                    // EMFILE and friends: give the process a moment to
                    // free descriptors instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let permit = match settings.quota.acquire(Some(peer.ip())) {
                Ok(p) => p,
                Err(exceeded) => {
                    let reason = match exceeded {
                        Exceeded::Total => "too_many_connections",
                        Exceeded::PerPeer => "too_many_connections_per_peer",
                    };
                    let detail = settings.quota.describe(exceeded, Some(peer.ip()));
                    settings.refused(reason, Some(peer), &detail);
                    drop(tcp);
                    continue;
                }
            };
            // List streams are thin (a few segments in flight): on a lossy
            // link, exponential backoff and an RTO inflated by loss recovery
            // make a segment lost three times in a row cost seconds; linear
            // timeouts and an RTO ceiling of one second keep a list update
            // within a few round trips.
            lb_client::internals::tune_thin_stream(&tcp);
            // A client that acknowledges nothing the LB sent (a heartbeat,
            // a list, a PING) for this long is behind a dead link.
            let _ = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(PEER_USER_TIMEOUT));
            settings.metrics.connection_opened(settings.port);
            let io = GuardedIo {
                inner: tcp,
                peer,
                _permit: permit,
                handshake: Some(Handshake {
                    seen: 0,
                    need: settings.first_bytes.len(),
                    deadline: Box::pin(tokio::time::sleep(settings.handshake_timeout)),
                    limit: settings.handshake_timeout,
                }),
                settings: settings.clone(),
            };
            return Some((Ok(io), (listener, settings)));
        }
    })
}

struct Handshake {
    seen: usize,
    need: usize,
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
}

/// An accepted connection holding its quota slot until it closes.
pub struct GuardedIo {
    inner: TcpStream,
    peer: SocketAddr,
    _permit: Permit,
    handshake: Option<Handshake>,
    settings: ListenerSettings,
}

impl GuardedIo {
    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl Drop for GuardedIo {
    fn drop(&mut self) {
        self.settings.metrics.connection_closed(self.settings.port);
    }
}

impl Connected for GuardedIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(hs) = this.handshake.as_mut() else {
            return result;
        };
        match &result {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                hs.seen += read;
                if hs.seen >= hs.need || read == 0 {
                    this.handshake = None;
                }
                result
            }
            Poll::Ready(Err(_)) => result,
            Poll::Pending => {
                if hs.deadline.as_mut().poll(cx).is_ready() {
                    let detail = format!(
                        "{} of {} first bytes within {:?}",
                        hs.seen, hs.need, hs.limit
                    );
                    this.handshake = None;
                    this.settings
                        .refused("handshake_timeout", Some(this.peer), &detail);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, detail)));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
