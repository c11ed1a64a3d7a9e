//! Backend connections: one HTTP/2 connection per backend address, kept
//! across list updates, reconnected with jittered exponential backoff.
//!
//! Each connection knows its state (connecting, ready, failed), which the
//! picker uses: only ready backends are picked, like gRPC's own balancers.
//! A backend leaving the list stops being reconnected; calls already in
//! flight on its connection finish normally.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::outcomes::Outcomes;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    /// Limit for TCP connect plus HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// Reconnect backoff after a failure: first delay.
    pub backoff_initial: Duration,
    /// Reconnect backoff: longest delay.
    pub backoff_max: Duration,
    /// HTTP/2 PINGs `(interval, timeout)` while calls are in flight; off by
    /// default. Stock gRPC servers allow a client one PING per 5 minutes
    /// (grpc-go `EnforcementPolicy{MinTime: 5m}`, C-core
    /// `grpc.http2.min_ping_interval_without_data_ms`, grpc-java
    /// `permitKeepAliveTime`) and close the connection with GOAWAY
    /// `too_many_pings` after two strikes, so faster PINGs would cost a
    /// reconnect each time. The LB's health checks already take a dead or
    /// hung backend out of the list within seconds; a backend that allows
    /// faster PINGs can have them here.
    pub keepalive: Option<(Duration, Duration)>,
    /// TCP keep-alive: idle time before the first probe (default 10 s).
    /// Probes are the kernel's, below HTTP/2: peers' PING rules do not
    /// apply to them.
    pub tcp_keepalive: Option<Duration>,
    /// TCP keep-alive: time between probes (default 5 s).
    pub tcp_keepalive_interval: Option<Duration>,
    /// `TCP_USER_TIMEOUT` (Linux): how long sent data, keep-alive probes
    /// included, may stay unacknowledged before the connection is closed
    /// (default 20 s, gRFC A18's keep-alive timeout). Without it a
    /// black-holed backend holds a call for TCP's ~15 minutes of
    /// retransmissions.
    pub tcp_user_timeout: Option<Duration>,
    /// TLS towards backends, when they serve it.
    pub tls: Option<BackendTls>,
    /// HTTP/2 settings of backend connections, as tonic's `Endpoint` has
    /// them.
    pub http2: Http2Settings,
    /// `user-agent` of every call: this before the library's own.
    pub user_agent: Option<String>,
    /// `:authority` (and scheme) of every call instead of the backend's
    /// address, like tonic's `Endpoint::origin` (for backends behind a
    /// proxy that routes on it).
    pub origin: Option<http::Uri>,
    /// Count each backend's call outcomes and report them to the LB
    /// ([`crate::outcomes`], [`crate::load_report`]; default on).
    pub count_outcomes: bool,
    /// How to reach a backend instead of TCP to its address (Unix sockets,
    /// proxies), as tonic's `Endpoint::connect_with_connector`.
    pub connector: Option<Connector>,
}

/// A connection a custom connector made.
pub trait BackendIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> BackendIo for T {}

type Connecting = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Box<dyn BackendIo>, crate::BoxError>> + Send>,
>;

/// A custom connector: a `tower::Service<Uri>` (the backend's
/// `http://ip:port`) that makes the connection HTTP/2 runs over.
#[derive(Clone)]
pub struct Connector(Arc<dyn Fn(http::Uri) -> Connecting + Send + Sync>);

impl Connector {
    /// Wraps `service`; each connection is made by a clone of it.
    pub fn new<C>(service: C) -> Self
    where
        C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
        C::Response: BackendIo,
        C::Error: Into<crate::BoxError>,
        C::Future: Send + 'static,
    {
        Connector(Arc::new(move |uri| {
            use tower::ServiceExt;
            let service = service.clone();
            Box::pin(async move {
                let io = service.oneshot(uri).await.map_err(Into::into)?;
                Ok(Box::new(io) as Box<dyn BackendIo>)
            })
        }))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Box<dyn BackendIo>, String> {
        let uri = http::Uri::try_from(format!("http://{addr}")).map_err(|e| e.to_string())?;
        (self.0)(uri)
            .await
            .map_err(|e| format!("connect {addr} (custom connector): {e}"))
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

/// HTTP/2 settings of backend connections (`None`: hyper's defaults).
#[derive(Debug, Clone, Default)]
pub struct Http2Settings {
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: what one stream may receive ahead.
    pub initial_stream_window_size: Option<u32>,
    /// What the whole connection may receive ahead.
    pub initial_connection_window_size: Option<u32>,
    /// Windows sized from the measured bandwidth-delay product (overrides
    /// the two above).
    pub adaptive_window: bool,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`: largest header block accepted.
    pub max_header_list_size: Option<u32>,
}

/// TLS towards backends: the settings and the rustls configuration built
/// from them once.
#[derive(Clone)]
pub struct BackendTls {
    /// The settings (for the server name to verify).
    pub settings: crate::TlsConfig,
    /// The connector configuration.
    pub config: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.settings.fmt(f)
    }
}

impl Default for ConnSettings {
    fn default() -> Self {
        ConnSettings {
            connect_timeout: Duration::from_secs(3),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(3),
            keepalive: None,
            tcp_keepalive: Some(Duration::from_secs(10)),
            tcp_keepalive_interval: Some(Duration::from_secs(5)),
            tcp_user_timeout: Some(Duration::from_secs(20)),
            tls: None,
            http2: Http2Settings::default(),
            user_agent: None,
            origin: None,
            count_outcomes: true,
            connector: None,
        }
    }
}

/// State of one backend connection.
#[derive(Clone)]
pub enum ConnState {
    /// First connection attempt under way.
    Connecting,
    /// Connected.
    Ready(SendRequest<tonic::body::Body>),
    /// Not connected; retrying after a backoff.
    Failed(String),
}

/// One backend's connection.
pub struct BackendConn {
    /// The backend's address.
    pub addr: SocketAddr,
    state: Mutex<ConnState>,
    cancel: CancellationToken,
    kick: Notify,
    /// The last connect attempt failed (not merely a connection that
    /// closed and is being made again).
    unreachable: std::sync::atomic::AtomicBool,
    /// What the backend did with the calls sent to it since the last report.
    pub(crate) outcomes: Arc<Outcomes>,
}

impl BackendConn {
    /// Whether the last attempt to connect failed.
    pub fn unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }

    /// The current state.
    pub fn state(&self) -> ConnState {
        self.state.lock().expect("conn lock").clone()
    }

    fn set(&self, state: ConnState) {
        *self.state.lock().expect("conn lock") = state;
    }

    /// Reports that a request could not be sent on this connection: if the
    /// connection is closed, it is marked failed at once (and reconnected).
    ///
    /// Checked and set under one guard: a fresh connection that became
    /// ready since the failed send is not closed, so it is never
    /// overwritten (which would leave a healthy backend unpickable until
    /// that connection closed).
    pub fn report_send_failure(&self, on_change: &(dyn Fn() + Send + Sync)) {
        let marked = {
            let mut state = self.state.lock().expect("conn lock");
            let closed = matches!(&*state, ConnState::Ready(s) if s.is_closed());
            if closed {
                *state = ConnState::Failed("connection closed".into());
            }
            closed
        };
        if marked {
            on_change();
        }
    }
}

/// Most departed backends whose outcomes wait for the next report.
const MAX_DEPARTED: usize = 1024;

/// Callback run whenever a connection changes state.
pub type OnChange = Arc<dyn Fn() + Send + Sync>;

/// All backend connections of one channel.
pub struct BackendPool {
    conns: Mutex<HashMap<SocketAddr, Arc<BackendConn>>>,
    /// Outcomes of backends that left the pool, kept for the next report.
    departed: Mutex<Vec<(SocketAddr, Arc<Outcomes>)>>,
    settings: ConnSettings,
    on_change: OnChange,
    connects: Arc<AtomicU64>,
}

impl BackendPool {
    /// An empty pool; `on_change` runs after every state change, and
    /// `connects` counts every connection established.
    pub fn new(settings: ConnSettings, on_change: OnChange, connects: Arc<AtomicU64>) -> Self {
        BackendPool {
            conns: Mutex::new(HashMap::new()),
            departed: Mutex::new(Vec::new()),
            settings,
            on_change,
            connects,
        }
    }

    /// The connection to `addr`, if the pool has one.
    pub fn get(&self, addr: &SocketAddr) -> Option<Arc<BackendConn>> {
        self.conns.lock().expect("pool lock").get(addr).cloned()
    }

    /// Keeps connections to exactly `addrs`: opens new ones, closes those no
    /// longer wanted, and retries failed ones at once (the list changed, so
    /// the backend may be back).
    pub fn sync(&self, addrs: &[SocketAddr]) {
        let mut conns = self.conns.lock().expect("pool lock");
        conns.retain(|addr, conn| {
            let keep = addrs.contains(addr);
            if !keep {
                tracing::debug!(%addr, "backend left the list; closing");
                conn.cancel.cancel();
                if self.settings.count_outcomes {
                    let mut departed = self.departed.lock().expect("departed lock");
                    // Bounded: emptied at every report (but for backends
                    // with calls still in progress); at the cap, a churning
                    // list's further departures are not reported.
                    if departed.len() < MAX_DEPARTED {
                        departed.push((*addr, conn.outcomes.clone()));
                    }
                }
            }
            keep
        });
        for addr in addrs {
            match conns.get(addr) {
                Some(conn) => {
                    if matches!(conn.state(), ConnState::Failed(_)) {
                        conn.kick.notify_one();
                    }
                }
                None => {
                    let conn = Arc::new(BackendConn {
                        addr: *addr,
                        state: Mutex::new(ConnState::Connecting),
                        cancel: CancellationToken::new(),
                        kick: Notify::new(),
                        unreachable: std::sync::atomic::AtomicBool::new(false),
                        outcomes: Arc::default(),
                    });
                    conns.insert(*addr, conn.clone());
                    tokio::spawn(maintain(
                        conn,
                        self.settings.clone(),
                        self.on_change.clone(),
                        self.connects.clone(),
                    ));
                }
            }
        }
    }

    /// Every backend's outcomes since the last call, one locality each
    /// (backends that left the pool since included), reset.
    pub(crate) fn take_outcomes(
        &self,
    ) -> Vec<lb_proto::envoy::service::load_stats::v3::UpstreamLocalityStats> {
        let departed = std::mem::take(&mut *self.departed.lock().expect("departed lock"));
        let mut reports: Vec<_> = departed
            .iter()
            .filter_map(|(addr, o)| o.take(*addr))
            .collect();
        // Calls still running on a departed backend are reported when they end.
        let still = departed.into_iter().filter(|(_, o)| o.in_progress() > 0);
        self.departed.lock().expect("departed lock").extend(still);
        reports.extend(
            self.conns
                .lock()
                .expect("pool lock")
                .iter()
                .filter_map(|(addr, conn)| conn.outcomes.take(*addr)),
        );
        reports
    }

    /// Closes every connection.
    pub fn close_all(&self) {
        for (_, conn) in self.conns.lock().expect("pool lock").drain() {
            conn.cancel.cancel();
        }
    }
}

impl Drop for BackendPool {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// Opens one HTTP/2 connection; returns the sender and a receiver that
/// completes when the connection closes.
async fn connect(
    addr: SocketAddr,
    settings: &ConnSettings,
) -> Result<
    (
        SendRequest<tonic::body::Body>,
        tokio::sync::oneshot::Receiver<()>,
    ),
    String,
> {
    let attempt = async {
        let io: Box<dyn BackendIo> = match &settings.connector {
            Some(connector) => connector.connect(addr).await?,
            None => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                let _ = tcp.set_nodelay(true);
                tune(&tcp, settings);
                Box::new(tcp)
            }
        };
        match &settings.tls {
            None => http2_over(addr, io, settings).await,
            Some(tls) => {
                let name = tls
                    .settings
                    .name_for(&addr.ip().to_string())
                    .map_err(|e| e.to_string())?;
                let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(name, io)
                    .await
                    .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
                http2_over(addr, stream, settings).await
            }
        }
    };
    tokio::time::timeout(settings.connect_timeout, attempt)
        .await
        .map_err(|_| {
            format!(
                "connect {addr}: timed out after {:?}",
                settings.connect_timeout
            )
        })?
}

/// Applies the TCP keep-alive and user-timeout settings to a new
/// connection. A setting the platform refuses is logged and skipped: the
/// connection still works, only its dead-peer detection is slower.
fn tune(tcp: &TcpStream, settings: &ConnSettings) {
    let sock = socket2::SockRef::from(tcp);
    if let Some(idle) = settings.tcp_keepalive {
        let mut ka = socket2::TcpKeepalive::new().with_time(idle);
        if let Some(interval) = settings.tcp_keepalive_interval {
            ka = ka.with_interval(interval);
        }
        if let Err(e) = sock.set_tcp_keepalive(&ka) {
            tracing::debug!(error = %e, "TCP keep-alive not set");
        }
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(timeout) = settings.tcp_user_timeout {
        if let Err(e) = sock.set_tcp_user_timeout(Some(timeout)) {
            tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set");
        }
    }
}

/// The HTTP/2 handshake over `io`; the connection then runs on its own task
/// so that in-flight calls finish even after the backend leaves the list.
async fn http2_over<T>(
    addr: SocketAddr,
    io: T,
    settings: &ConnSettings,
) -> Result<
    (
        SendRequest<tonic::body::Body>,
        tokio::sync::oneshot::Receiver<()>,
    ),
    String,
>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    let h2 = &settings.http2;
    builder
        .initial_stream_window_size(h2.initial_stream_window_size)
        .initial_connection_window_size(h2.initial_connection_window_size)
        .adaptive_window(h2.adaptive_window);
    if let Some(max) = h2.max_header_list_size {
        builder.max_header_list_size(max);
    }
    if let Some((interval, timeout)) = settings.keepalive {
        // Only while calls are in flight: stock servers refuse PINGs on a
        // connection without streams (`PermitWithoutStream: false`).
        builder
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(false);
    }
    let (sender, connection) = builder
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%addr, error = %e, "backend connection ended");
        }
        let _ = closed_tx.send(());
    });
    Ok((sender, closed_rx))
}

/// Keeps one backend connected until it is cancelled.
async fn maintain(
    conn: Arc<BackendConn>,
    settings: ConnSettings,
    on_change: OnChange,
    connects: Arc<AtomicU64>,
) {
    // A connection that lived a while earns a fresh backoff; one that
    // closed at once (a flapping backend) waits as usual.
    let mut backoff = Backoff::new(settings.backoff_initial, settings.backoff_max)
        .reset_after(Duration::from_secs(1));
    loop {
        let attempt = tokio::select! {
            _ = conn.cancel.cancelled() => return,
            a = connect(conn.addr, &settings) => a,
        };
        match attempt {
            Ok((sender, closed)) => {
                connects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(addr = %conn.addr, "backend connected");
                conn.unreachable.store(false, Ordering::Relaxed);
                conn.set(ConnState::Ready(sender));
                on_change();
                backoff.attempt();
                tokio::select! {
                    _ = conn.cancel.cancelled() => {
                        conn.set(ConnState::Failed("removed".into()));
                        return;
                    }
                    _ = closed => {}
                }
                tracing::debug!(addr = %conn.addr, "backend connection closed; reconnecting");
                conn.set(ConnState::Failed("connection closed".into()));
                on_change();
                if !backoff.wait(&conn.cancel).await {
                    return;
                }
            }
            Err(error) => {
                tracing::debug!(addr = %conn.addr, %error, "backend connection failed");
                let was_failed = matches!(conn.state(), ConnState::Failed(_));
                conn.unreachable.store(true, Ordering::Relaxed);
                conn.set(ConnState::Failed(error));
                if !was_failed {
                    on_change();
                }
                tokio::select! {
                    _ = conn.cancel.cancelled() => return,
                    _ = conn.kick.notified() => backoff.reset(),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}
