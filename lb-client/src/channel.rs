//! [`LbChannel`]: the `tower::Service` that tonic-generated clients accept.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lb_client::Error> {
//! use lb_client::LbChannel;
//! let channel = LbChannel::builder("greeter").lb("127.0.0.1:7000").build()?;
//! // let mut client = GreeterClient::new(channel);
//! # Ok(()) }
//! ```
//!
//! Each call picks the next entry of the current list: a backend gets the
//! call (with `lb-token` metadata), a drop entry fails it with UNAVAILABLE.
//! A call that could not be written to its backend's connection is retried
//! once on the next entry. With no usable entry, calls wait while backends
//! are connecting and fail fast with UNAVAILABLE otherwise (or wait up to
//! their deadline with [`LbChannelBuilder::wait_for_ready`]).
//!
//! **Backpressure.** At most [`LbChannelBuilder::concurrency_limit`] calls
//! (1,024 by default) wait for their response headers at once, all
//! backends together; beyond that, `poll_ready` is pending, so a caller
//! (a tonic client's `ready().await`, a tower layer) waits before its call
//! exists instead of queueing it without bound in front of a backend's
//! `max_concurrent_streams`. The calls in flight are the channel's
//! [`tower::load::Load`], so it composes with tower's balancers and
//! limiters.
//!
//! A call's deadline (its `grpc-timeout`, or the channel's
//! [`LbChannelBuilder::timeout`]) holds for the whole call, as in every
//! stock client: a backend that stops answering ends the call with
//! DEADLINE_EXCEEDED at its deadline. Below that, TCP keep-alive and
//! `TCP_USER_TIMEOUT` close a connection to a black-holed backend within
//! seconds, so that even a call without a deadline ends.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Uri;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, PollSemaphore};
use tonic::body::Body;
use tonic::Status;

use crate::backends::ConnSettings;
use crate::balancer_stream::{self, LbSettings};
use crate::deadline::{self, DeadlineBody, RequestDeadline};
use crate::outcomes::{CallOutcome, End, OutcomeBody};
use crate::picker::{Pick, ReadyBackend};
use crate::retry::{
    Attempts, Outcome, Replay, RetryPolicies, RetryPolicy, RetryThrottling, Throttle,
};
use crate::state::ChannelState;
use crate::Error;

/// Metadata key carrying the load-balance token to backends.
pub const LB_TOKEN: &str = "lb-token";

/// [`LB_TOKEN`] as a ready-made header name (no parsing per call).
pub const LB_TOKEN_HEADER: http::HeaderName = http::HeaderName::from_static(LB_TOKEN);

/// Calls in flight at once by default (tonic's `Channel` buffers 1,024
/// requests by default).
pub const DEFAULT_CONCURRENCY_LIMIT: usize = 1024;

/// Builds an [`LbChannel`]: where the LBs are, how to reach backends, and
/// what calls may expect. The HTTP/2 and connection settings have the
/// names tonic's `Endpoint` gives them.
///
/// ```
/// use std::time::Duration;
/// use lb_client::{LbChannel, RetryPolicy, RetryThrottling};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), lb_client::Error> {
/// let channel = LbChannel::builder("greeter")
///     // Several replicas; the channel moves between them.
///     .lbs(["127.0.0.1:7000", "127.0.0.1:7001"])
///     .zone("eu-west-1a")
///     .timeout(Duration::from_secs(2))
///     .concurrency_limit(Some(256))
///     .initial_stream_window_size(1 << 20)
///     .user_agent("checkout/1.4")
///     // The common recipe for rolling restarts, as a stock client's
///     // service config has it.
///     .retry_policy(
///         "helloworld.Greeter",
///         RetryPolicy::new(2, [tonic::Code::Unavailable]),
///     )
///     .retry_throttling(RetryThrottling { max_tokens: 10, token_ratio: 0.1 })
///     .build()?;
/// // Built at once; the LB stream and connections come up in the background.
/// assert_eq!(channel.in_flight(), 0);
///
/// // Settings that cannot work are refused when built.
/// assert!(LbChannel::builder("greeter").build().is_err(), "no LB, no fallback");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LbChannelBuilder {
    service: String,
    lb: LbSettings,
    conn: ConnSettings,
    fallback: Vec<SocketAddr>,
    wait_for_ready: bool,
    timeout: Option<Duration>,
    backend_tls: Option<crate::TlsConfig>,
    concurrency_limit: Option<usize>,
    retry: RetryPolicies,
    throttling: Option<RetryThrottling>,
}

impl LbChannelBuilder {
    /// Adds one LB address (`host:port`). Several may be given; the channel
    /// moves between them when a stream breaks.
    pub fn lb(mut self, addr: impl Into<String>) -> Self {
        self.lb.lb_addrs.push(addr.into());
        self
    }

    /// Names this client to the LB (`lb-client-id`); with subsets on, the
    /// same id tends to get the same backends. Default: random per channel.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.lb.client_id = id.into();
        self
    }

    /// Names this client's zone to the LB (`lb-client-zone`), e.g.
    /// `eu-west-1a`: the LB then gives it a list that keeps its calls in
    /// that zone as far as the zone's backends can take them, and spills
    /// the rest to other zones. Default: none (the service's whole list).
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.lb.zone = Some(zone.into()).filter(|z| !z.is_empty());
        self
    }

    /// Adds several LB addresses.
    pub fn lbs<I: IntoIterator<Item = S>, S: Into<String>>(mut self, addrs: I) -> Self {
        self.lb.lb_addrs.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// Backends to call when no LB list can be had (default: none).
    pub fn fallback_backends(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.fallback = addrs.into_iter().collect();
        self
    }

    /// Use the fallback backends if no list arrived within this time
    /// (default 10 s, as stock gRPC clients).
    pub fn fallback_timeout(mut self, timeout: Duration) -> Self {
        self.lb.fallback_timeout = timeout;
        self
    }

    /// Time allowed to connect to one LB and get its first answer (default 3 s).
    pub fn lb_connect_timeout(mut self, timeout: Duration) -> Self {
        self.lb.connect_timeout = timeout;
        self
    }

    /// Reconnect backoff towards the LBs (defaults 200 ms to 10 s).
    pub fn lb_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.lb.backoff_initial = initial;
        self.lb.backoff_max = max;
        self
    }

    /// Heartbeat asked of the LB on its stream (default 1 s; `None` asks
    /// for none): `lb-server` then writes a message whenever the stream has
    /// been quiet that long, so that the client knows it alive from what it
    /// reads. `lb-server` grants at least its `--heartbeat-min`.
    pub fn lb_heartbeat(mut self, every: Option<Duration>) -> Self {
        self.lb.heartbeat = every;
        self
    }

    /// HTTP/2 PINGs towards the LB after `interval` with nothing read on the
    /// connection, each allowed `timeout` before the LB counts as gone and
    /// the next one is tried (defaults 2 s and 4 s; `None`: no PINGs, and a
    /// hung LB is noticed only by TCP). With the heartbeat on, a PING goes
    /// out only when a heartbeat is late, so a stock HTTP/2 proxy in front
    /// of the LB (which, built on grpc-go or C-core, closes connections
    /// that PING more often than every 5 minutes with no data flowing)
    /// sees none in steady state; with the heartbeat off, set an interval
    /// the proxy allows.
    pub fn lb_keepalive(mut self, keepalive: Option<(Duration, Duration)>) -> Self {
        self.lb.keepalive = keepalive;
        self
    }

    /// Reconnect backoff towards backends (defaults 100 ms to 3 s).
    pub fn backend_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.conn.backoff_initial = initial;
        self.conn.backoff_max = max;
        self
    }

    /// HTTP/2 PINGs towards backends while calls are in flight, every
    /// `interval`, each allowed `timeout` (default: none). Only for backends
    /// that permit them: stock gRPC servers close a connection that PINGs
    /// more often than every 5 minutes.
    pub fn backend_keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.conn.keepalive = Some((interval, timeout));
        self
    }

    /// Time allowed to connect to one backend (default 3 s).
    pub fn backend_connect_timeout(mut self, timeout: Duration) -> Self {
        self.conn.connect_timeout = timeout;
        self
    }

    /// A deadline for every call (default: none; a call's own
    /// `grpc-timeout` still applies, and the earlier of the two wins). Like
    /// a call's own deadline it holds for the whole call, streams included
    /// (tonic's `Endpoint::timeout` bounds only the wait for response
    /// headers), and it is sent to the backend as the call's
    /// `grpc-timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// TCP keep-alive on backend connections: idle time before the first
    /// probe (default 10 s; `None` turns it off). The kernel's probes are
    /// not HTTP/2 PINGs, so stock servers' PING limits do not apply.
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.conn.tcp_keepalive = idle;
        self
    }

    /// Time between TCP keep-alive probes (default 5 s).
    pub fn tcp_keepalive_interval(mut self, interval: Option<Duration>) -> Self {
        self.conn.tcp_keepalive_interval = interval;
        self
    }

    /// `TCP_USER_TIMEOUT` on backend connections (Linux; default 20 s, as
    /// gRFC A18 ties it to the keep-alive timeout; `None` leaves the
    /// kernel's default): a connection whose sent data or keep-alive probes
    /// stay unacknowledged this long is closed, and its calls fail with
    /// UNAVAILABLE. This bounds a call without a deadline to a black-holed
    /// backend to about this long (plus the keep-alive idle time when the
    /// link goes dark while the call waits for its answer).
    pub fn tcp_user_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.conn.tcp_user_timeout = timeout;
        self
    }

    /// Talk to the LBs over TLS with these settings (their certificates are
    /// verified against the host name given in [`LbChannelBuilder::lb`], or
    /// the IP address, unless the settings name a server).
    pub fn lb_tls(mut self, tls: crate::TlsConfig) -> Self {
        self.lb.tls = Some(tls);
        self
    }

    /// Call backends over TLS with these settings (their certificates are
    /// verified against their IP address, unless the settings name a server).
    pub fn backend_tls(mut self, tls: crate::TlsConfig) -> Self {
        self.backend_tls = Some(tls);
        self
    }

    /// Most calls waiting for their response headers at once, all backends
    /// together (default [`DEFAULT_CONCURRENCY_LIMIT`]; `None`: no limit).
    /// At the limit, `poll_ready` is pending until a call gets its headers
    /// (or fails), so callers wait before their calls exist: memory stays
    /// bounded however many callers there are, and a backend's
    /// `max_concurrent_streams` never becomes an unbounded queue inside the
    /// channel. A streaming call counts until its response headers arrive.
    pub fn concurrency_limit(mut self, limit: Option<usize>) -> Self {
        self.concurrency_limit = limit.map(|n| n.max(1));
        self
    }

    /// HTTP/2 `SETTINGS_INITIAL_WINDOW_SIZE` of backend connections (as
    /// tonic's `Endpoint`; default hyper's).
    pub fn initial_stream_window_size(mut self, size: impl Into<Option<u32>>) -> Self {
        self.conn.http2.initial_stream_window_size = size.into();
        self
    }

    /// HTTP/2 connection-level window of backend connections (as tonic's
    /// `Endpoint`; default hyper's).
    pub fn initial_connection_window_size(mut self, size: impl Into<Option<u32>>) -> Self {
        self.conn.http2.initial_connection_window_size = size.into();
        self
    }

    /// HTTP/2 windows sized from the measured bandwidth-delay product
    /// (default off, as tonic's `Endpoint`).
    pub fn http2_adaptive_window(mut self, enabled: bool) -> Self {
        self.conn.http2.adaptive_window = enabled;
        self
    }

    /// Largest response header block accepted from backends (as tonic's
    /// `Endpoint`; default hyper's 16 KiB).
    pub fn http2_max_header_list_size(mut self, size: u32) -> Self {
        self.conn.http2.max_header_list_size = Some(size);
        self
    }

    /// `user-agent` of every call: `ua` before `lb-client/<version>` (as
    /// tonic's `Endpoint::user_agent` puts it before `tonic/<version>`).
    pub fn user_agent(mut self, ua: impl Into<String>) -> Self {
        self.conn.user_agent = Some(ua.into());
        self
    }

    /// Scheme and `:authority` of every call instead of the picked
    /// backend's address (as tonic's `Endpoint::origin`), for backends
    /// behind a proxy that routes on it. The connection still goes to the
    /// picked backend.
    pub fn origin(mut self, origin: http::Uri) -> Self {
        self.conn.origin = Some(origin);
        self
    }

    /// Reach backends through `connector` instead of TCP to their
    /// addresses (as tonic's `Endpoint::connect_with_connector`): a
    /// `tower::Service` given the backend's `http://ip:port` that returns
    /// the connection (a Unix socket, a tunnel through a proxy, an
    /// in-memory pipe). TLS, when set, runs over it; the TCP keep-alive and
    /// user-timeout settings are the connector's business then.
    ///
    /// ```
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), lb_client::Error> {
    /// // Backends listen on Unix sockets named after the address the LB
    /// // lists.
    /// let unix = tower::service_fn(|uri: http::Uri| {
    ///     let path = format!("/run/greeter/{}.sock", uri.port_u16().unwrap_or(0));
    ///     tokio::net::UnixStream::connect(path)
    /// });
    /// let channel = lb_client::LbChannel::builder("greeter")
    ///     .lb("127.0.0.1:7000")
    ///     .connector(unix)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn connector<C>(mut self, connector: C) -> Self
    where
        C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
        C::Response: crate::BackendIo,
        C::Error: Into<crate::BoxError>,
        C::Future: Send + 'static,
    {
        self.conn.connector = Some(crate::backends::Connector::new(connector));
        self
    }

    /// Retries calls to `name` (`pkg.Service` for all its methods, or
    /// `pkg.Service/Method`; a method's own policy wins) as gRPC's
    /// `retryPolicy` says (gRFC A6): see [`crate::retry`]. The common
    /// recipe for rolling restarts is
    /// `RetryPolicy::new(2, [tonic::Code::Unavailable])`. Without a policy,
    /// only a call that could not be written to its backend is sent again.
    pub fn retry_policy(mut self, name: &str, policy: RetryPolicy) -> Self {
        self.retry.insert(name, policy);
        self
    }

    /// Retry throttling for the whole channel (gRFC A6 `retryThrottling`):
    /// retries stop once failures outrun successes by about `max_tokens /
    /// 2` (in steady state, while more than about `token_ratio / (1 +
    /// token_ratio)` of attempts fail: 9 % for a ratio of 0.1), so that
    /// retries cannot amplify an outage.
    pub fn retry_throttling(mut self, throttling: RetryThrottling) -> Self {
        self.throttling = Some(throttling);
        self
    }

    /// Report each backend's call outcomes to the LB (default on): calls,
    /// the backend's errors, latency, and apart from them the calls that
    /// the caller cancelled or its deadline ended, every interval the LB
    /// asks, over LRS beside the BalanceLoad stream. The LB pools them over
    /// its clients (`/api/v1/services/{name}` shows them per backend).
    /// Off, calls are not counted per backend at all.
    pub fn report_outcomes(mut self, on: bool) -> Self {
        self.conn.count_outcomes = on;
        self
    }

    /// Calls wait (up to their deadline) while no backend is usable, instead
    /// of failing fast with UNAVAILABLE (default false).
    pub fn wait_for_ready(mut self, wait: bool) -> Self {
        self.wait_for_ready = wait;
        self
    }

    /// Starts the channel. Must be called within a Tokio runtime.
    pub fn build(mut self) -> Result<LbChannel, Error> {
        if let Some(tls) = &self.lb.tls {
            tls.check()?;
        }
        if let Some(settings) = self.backend_tls.take() {
            let config = settings.rustls()?;
            self.conn.tls = Some(crate::backends::BackendTls { settings, config });
        }
        let max = lb_proto::ext::MAX_SERVICE_NAME_LEN;
        if self.service.is_empty() || self.service.len() > max {
            return Err(Error::Config(format!(
                "service name must be 1 to {max} bytes"
            )));
        }
        if self.lb.lb_addrs.is_empty() && self.fallback.is_empty() {
            return Err(Error::Config(
                "give at least one LB address (or fallback backends)".into(),
            ));
        }
        tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config("LbChannel::build must be called within a Tokio runtime".into())
        })?;
        let state = ChannelState::new(self.service, self.fallback, self.conn, self.wait_for_ready);
        let timeout = self.timeout;
        let cancel = CancellationToken::new();
        if self.lb.lb_addrs.is_empty() {
            state.enter_fallback("no load balancer configured");
        } else {
            tokio::spawn(balancer_stream::run(state.clone(), self.lb, cancel.clone()));
        }
        Ok(LbChannel {
            state: state.clone(),
            timeout,
            limit: self
                .concurrency_limit
                .map(|n| PollSemaphore::new(Arc::new(Semaphore::new(n)))),
            permit: None,
            retry: Arc::new(self.retry),
            throttle: self.throttling.map(|t| Arc::new(Throttle::new(t))),
            _guard: Arc::new(StopOnDrop { cancel, state }),
        })
    }
}

/// Stops the background tasks when the last clone of a channel is dropped.
struct StopOnDrop {
    cancel: CancellationToken,
    state: Arc<ChannelState>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.state.close();
    }
}

/// A client channel balanced by a lookaside LB. Cheap to clone; clones share
/// the list, connections, stats and concurrency limit.
///
/// It is a `tower::Service` for HTTP/2 gRPC requests, so every
/// tonic-generated client takes it where it takes tonic's `Channel`. This
/// example runs as it stands: a greeter serves on a free port of this
/// process, and the channel, given no LB, calls it as its fallback backend
/// (with an LB, `.lb("host:port")` is all that changes).
///
/// ```
/// use lb_client::LbChannel;
/// use lb_proto::helloworld::greeter_client::GreeterClient;
/// use lb_proto::helloworld::greeter_server::{Greeter, GreeterServer};
/// use lb_proto::helloworld::{HelloReply, HelloRequest};
///
/// struct Hello;
///
/// #[tonic::async_trait]
/// impl Greeter for Hello {
///     async fn say_hello(
///         &self,
///         request: tonic::Request<HelloRequest>,
///     ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
///         let message = format!("Hello {}", request.into_inner().name);
///         Ok(tonic::Response::new(HelloReply { message }))
///     }
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let backend = listener.local_addr()?;
/// tokio::spawn(
///     tonic::transport::Server::builder()
///         .add_service(GreeterServer::new(Hello))
///         .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
/// );
///
/// let channel = LbChannel::builder("greeter")
///     .fallback_backends([backend])
///     .timeout(std::time::Duration::from_secs(5))
///     .build()?;
/// let mut greeter = GreeterClient::new(channel.clone());
/// let reply = greeter.say_hello(HelloRequest { name: "you".into() }).await?;
/// assert_eq!(reply.into_inner().message, "Hello you");
/// assert_eq!(channel.ready_backends(), vec![backend]);
/// # Ok(()) }
/// ```
pub struct LbChannel {
    state: Arc<ChannelState>,
    /// The default deadline of every call.
    timeout: Option<Duration>,
    /// The channel's concurrency limit, shared by its clones.
    limit: Option<PollSemaphore>,
    /// The permit `poll_ready` acquired for the next call.
    permit: Option<OwnedSemaphorePermit>,
    /// Retry policies by service and method.
    retry: Arc<RetryPolicies>,
    /// The channel's retry tokens, when throttled.
    throttle: Option<Arc<Throttle>>,
    _guard: Arc<StopOnDrop>,
}

impl Clone for LbChannel {
    fn clone(&self) -> Self {
        LbChannel {
            state: self.state.clone(),
            timeout: self.timeout,
            limit: self.limit.clone(),
            // A permit belongs to the clone that acquired it.
            permit: None,
            retry: self.retry.clone(),
            throttle: self.throttle.clone(),
            _guard: self._guard.clone(),
        }
    }
}

impl std::fmt::Debug for LbChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbChannel")
            .field("service", &self.state.service)
            .finish()
    }
}

impl LbChannel {
    /// A builder for a channel to `service` (the name sent to the LB).
    pub fn builder(service: impl Into<String>) -> LbChannelBuilder {
        LbChannelBuilder {
            service: service.into(),
            lb: LbSettings {
                lb_addrs: Vec::new(),
                client_id: format!("{:016x}", rand::random::<u64>()),
                zone: None,
                connect_timeout: Duration::from_secs(3),
                backoff_initial: Duration::from_millis(200),
                backoff_max: Duration::from_secs(10),
                fallback_timeout: Duration::from_secs(10),
                tls: None,
                heartbeat: Some(crate::balancer_stream::LB_HEARTBEAT),
                keepalive: Some((
                    crate::balancer_stream::LB_KEEPALIVE_INTERVAL,
                    crate::balancer_stream::LB_KEEPALIVE_TIMEOUT,
                )),
            },
            conn: ConnSettings::default(),
            fallback: Vec::new(),
            wait_for_ready: false,
            timeout: None,
            backend_tls: None,
            concurrency_limit: Some(DEFAULT_CONCURRENCY_LIMIT),
            retry: RetryPolicies::default(),
            throttling: None,
        }
    }

    /// Backend addresses of the current pick list, in order (only backends
    /// whose connection is ready appear).
    pub fn ready_backends(&self) -> Vec<SocketAddr> {
        self.state.picker.load().backend_addrs()
    }

    /// Backend addresses of the list in force, in order, including those
    /// whose connections are not ready yet.
    pub fn listed_backends(&self) -> Vec<SocketAddr> {
        self.state.listed_backends()
    }

    /// The picker holding the current pick list (for the pick benchmark;
    /// calls use it through the `tower::Service`). Not part of the API.
    #[doc(hidden)]
    pub fn picker(&self) -> &crate::picker::Picker {
        &self.state.picker
    }

    /// How often this channel opened LB streams and backend connections and
    /// received lists since it started (all still in steady state).
    pub fn counters(&self) -> crate::Counters {
        self.state.counters.snapshot()
    }

    /// The LB whose stream is open now (`None` between streams or in
    /// fallback without an LB).
    pub fn current_lb(&self) -> Option<SocketAddr> {
        *self.state.current_lb.lock().expect("lb lock")
    }

    /// Calls waiting for their response headers now (the channel's
    /// [`tower::load::Load`]).
    pub fn in_flight(&self) -> usize {
        self.state
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least one backend is ready, or `timeout` passes.
    pub async fn ready_within(&self, timeout: Duration) -> bool {
        let mut changes = self.state.picker.subscribe();
        let wait = async {
            loop {
                if !self.ready_backends().is_empty() {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && !self.ready_backends().is_empty()
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, crate::BoxError>> + Send>>;

impl tower::Service<http::Request<Body>> for LbChannel {
    type Response = http::Response<Body>;
    type Error = crate::BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Ready when under the concurrency limit; which backend takes the
        // call is decided when it is picked.
        let Some(limit) = &mut self.limit else {
            return Poll::Ready(Ok(()));
        };
        if self.permit.is_none() {
            match limit.poll_acquire(cx) {
                Poll::Ready(Some(permit)) => self.permit = Some(permit),
                // The semaphore is never closed while the channel lives.
                Poll::Ready(None) => return Poll::Ready(Err("channel closed".into())),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let state = self.state.clone();
        if let Some(t) = self.timeout {
            // The backend keeps the channel's deadline too.
            if deadline::grpc_timeout(request.headers()).is_none_or(|h| h > t) {
                request
                    .headers_mut()
                    .insert("grpc-timeout", deadline::encode_grpc_timeout(t));
            }
        }
        let deadline = deadline::deadline_of(request.headers(), self.timeout);
        let permit = self.permit.take();
        let policy = self.retry.lookup(request.uri().path());
        let throttle = self.throttle.clone();
        // A call made without `poll_ready` waits for its permit here.
        let semaphore = match (&permit, &self.limit) {
            (None, Some(limit)) => Some(limit.clone_inner()),
            _ => None,
        };
        Box::pin(async move {
            let _permit = match (permit, semaphore) {
                (Some(p), _) => Some(p),
                (None, Some(s)) => s.acquire_owned().await.ok(),
                (None, None) => None,
            };
            let _in_flight = InFlight::new(&state);
            let result = match policy {
                None => call(state.clone(), request, deadline).await,
                Some(policy) => {
                    let attempts = Attempts::new(policy, throttle);
                    call_retrying(state.clone(), request, deadline, attempts).await
                }
            };
            result.map_err(|f| Box::new(f.0) as crate::BoxError)
        })
    }
}

impl tower::load::Load for LbChannel {
    /// Calls waiting for their response headers now.
    type Metric = usize;

    fn load(&self) -> usize {
        self.in_flight()
    }
}

/// Counts a call in flight until its response headers (or its failure).
struct InFlight(Arc<ChannelState>);

impl InFlight {
    fn new(state: &Arc<ChannelState>) -> Self {
        state
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A call that no backend answered: the status the caller gets (tonic
/// hands a `Status` found in an error to the caller as it is), as an `Err`
/// of the service, so that tower's layers (`retry`, `timeout`, error
/// chains) can tell it from a backend's answer, which is always `Ok` (its
/// status in its headers or trailers), as with tonic's own `Channel`.
struct Failure(Status, Retry);

/// Whether a retry policy may send a failed call again.
#[derive(PartialEq)]
enum Retry {
    /// As the policy's codes say.
    AsPolicy,
    /// Never: the LB dropped the call (load shedding; stock clients do not
    /// retry drops either).
    Never,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure(status, Retry::AsPolicy)
    }
}

/// Runs a call under a retry policy: each attempt as [`call`] runs it,
/// with the request replayed, until one is committed or the policy (its
/// attempts, codes, throttling, the server's pushback, the deadline) says
/// no more.
async fn call_retrying(
    state: Arc<ChannelState>,
    request: http::Request<Body>,
    deadline: Option<Instant>,
    mut attempts: Attempts,
) -> Result<http::Response<Body>, Failure> {
    let (parts, body) = request.into_parts();
    let replay = Replay::new(body);
    loop {
        let mut attempt = http::Request::new(replay.attempt());
        *attempt.method_mut() = parts.method.clone();
        *attempt.uri_mut() = parts.uri.clone();
        *attempt.version_mut() = parts.version;
        *attempt.headers_mut() = parts.headers.clone();
        if attempts.made() > 1 {
            attempt.headers_mut().insert(
                "grpc-previous-rpc-attempts",
                http::HeaderValue::from(attempts.made() - 1),
            );
            // The backend gets the time that remains, not the whole.
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                attempt
                    .headers_mut()
                    .insert("grpc-timeout", deadline::encode_grpc_timeout(left));
            }
        }
        let result = call(state.clone(), attempt, deadline).await;
        let outcome = match &result {
            Ok(response) => Outcome::of_response(response),
            Err(Failure(_, Retry::Never)) => return result,
            Err(f) => Outcome::Failed {
                code: f.0.code(),
                pushback: None,
            },
        };
        let Some(delay) = attempts.next(&outcome, replay.replayable()) else {
            return result;
        };
        if deadline.is_some_and(|d| Instant::now() + delay >= d) {
            return result;
        }
        state
            .counters
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(code = ?match outcome { Outcome::Failed { code, .. } => code, Outcome::Committed => tonic::Code::Ok }, ?delay, attempt = attempts.made(), "retrying the call");
        tokio::time::sleep(delay).await;
    }
}

/// Runs one call: pick, send, retry once if it could not be sent, wait when
/// nothing is usable yet, all within the call's deadline. Failures become
/// gRPC status responses.
async fn call(
    state: Arc<ChannelState>,
    mut request: http::Request<Body>,
    deadline: Option<Instant>,
) -> Result<http::Response<Body>, Failure> {
    if let Some(d) = deadline {
        request = request.map(|b| Body::new(RequestDeadline::new(b, d)));
    }
    // Subscribed only once a call has to wait; it then picks once more so
    // that no change between its pick and its subscription is missed.
    let mut changes: Option<tokio::sync::watch::Receiver<u64>> = None;
    let mut retried = false;
    loop {
        let backend: Option<ReadyBackend> = {
            let list = state.picker.load();
            match list.pick() {
                Pick::Backend(b) => Some(b.clone()),
                Pick::Drop(token) => {
                    state.stats.dropped(token);
                    let status = Status::unavailable(format!(
                        "call dropped by the load balancer (token {token})"
                    ));
                    return Err(Failure(status, Retry::Never));
                }
                Pick::Wait => None,
                Pick::Fail(why) if !state.wait_for_ready => {
                    return Err(Status::unavailable(why.to_string()).into())
                }
                Pick::Fail(_) => None,
            }
        };
        let Some(mut backend) = backend else {
            let Some(changes) = changes.as_mut() else {
                changes = Some(state.picker.subscribe());
                continue;
            };
            let waited = match deadline {
                Some(d) => tokio::time::timeout_at(d, changes.changed()).await.ok(),
                None => Some(changes.changed().await),
            };
            match waited {
                Some(Ok(())) => continue,
                Some(Err(_)) => return Err(Status::unavailable("channel closed").into()),
                None => {
                    let why = match state.picker.load().mode() {
                        crate::picker::Mode::Failing(why) => why.clone(),
                        _ => "no backend became ready".to_string(),
                    };
                    return Err(
                        deadline::exceeded(&format!("while waiting for a backend: {why}")).into(),
                    );
                }
            }
        };
        prepare(&mut request, &backend, &state);
        state.stats.started();
        // Dropped with the call if the caller gives it up: a cancellation.
        let record = state
            .count_outcomes
            .then(|| CallOutcome::start(backend.conn.outcomes.clone()));
        let finish = |record: Option<CallOutcome>, end: End| {
            if let Some(r) = record {
                r.finish(end)
            }
        };
        let sent = backend.sender.try_send_request(request);
        let answered = match deadline {
            // Dropping the send on time-out resets the backend's stream.
            Some(d) => match tokio::time::timeout_at(d, sent).await {
                Ok(answered) => answered,
                Err(_) => {
                    state.stats.failed();
                    finish(record, End::Deadline);
                    return Err(deadline::exceeded(&format!(
                        "waiting for backend {}'s response",
                        backend.addr
                    ))
                    .into());
                }
            },
            None => sent.await,
        };
        match answered {
            Ok(response) => {
                state.stats.known_received();
                let response = match deadline {
                    Some(d) => response.map(|b| Body::new(DeadlineBody::new(b, d))),
                    None => response.map(Body::new),
                };
                return Ok(match record {
                    Some(record) => {
                        let (parts, body) = response.into_parts();
                        let body = OutcomeBody::new(body, &parts.headers, record);
                        http::Response::from_parts(parts, Body::new(body))
                    }
                    None => response,
                });
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if !retried => {
                    finish(record, End::NotSent);
                    state.stats.failed_to_send();
                    state.report_send_failure(&backend);
                    tracing::debug!(addr = %backend.addr, error = %e.into_error(), "call not sent; retrying on the next backend");
                    retried = true;
                    request = unsent;
                }
                Some(_) => {
                    finish(record, End::NotSent);
                    state.stats.failed_to_send();
                    state.report_send_failure(&backend);
                    return Err(Status::unavailable(format!(
                        "backend {} unavailable: {}",
                        backend.addr,
                        e.into_error()
                    ))
                    .into());
                }
                None if deadline.is_some_and(|d| Instant::now() >= d) => {
                    // The request body's deadline reset the stream first.
                    finish(record, End::Deadline);
                    state.stats.failed();
                    return Err(deadline::exceeded(&format!(
                        "sending to backend {}",
                        backend.addr
                    ))
                    .into());
                }
                None => {
                    finish(record, End::Error);
                    state.stats.failed();
                    let error = e.into_error();
                    return Err(
                        Status::unavailable(format!("backend {}: {error}", backend.addr)).into(),
                    );
                }
            },
        }
    }
}

/// Points the request at the backend (or the channel's origin), and
/// attaches the backend's token and the channel's `user-agent`.
fn prepare(request: &mut http::Request<Body>, backend: &ReadyBackend, state: &ChannelState) {
    let path = request.uri().path_and_query().cloned();
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(state.scheme.clone());
    parts.authority = Some(
        state
            .origin
            .clone()
            .unwrap_or_else(|| backend.authority.clone()),
    );
    request
        .headers_mut()
        .insert(http::header::USER_AGENT, state.user_agent.clone());
    parts.path_and_query = path.or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    match &backend.token {
        Some(token) => {
            request.headers_mut().insert(LB_TOKEN_HEADER, token.clone());
        }
        None => {
            request.headers_mut().remove(LB_TOKEN_HEADER);
        }
    }
}
