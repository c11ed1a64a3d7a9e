//! The greeter backend: `helloworld.Greeter/SayHello` answering with its own
//! address, plus `grpc.health.v1.Health`.
//!
//! Shutdown is graceful and loses no call: health goes NOT_SERVING, the
//! instance is deregistered (so the LB pushes new lists), the server keeps
//! serving for a drain period while clients move away, then stops after the
//! calls in flight finish.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lb_client::orca::LoadRecorder;
use lb_client::Registration;
use lb_proto::helloworld::greeter_server::{Greeter, GreeterServer};
use lb_proto::helloworld::{HelloReply, HelloRequest};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Metadata key in which the greeter echoes the `lb-token` it received.
pub const TOKEN_ECHO: &str = "x-lb-token";

/// How a greeter behaves.
#[derive(Debug, Clone, Default)]
pub struct GreeterOptions {
    /// Constant utilization reported over ORCA (application and CPU),
    /// simulated; 0 = none.
    pub utilization: f64,
    /// Simulated capacity in calls/s: utilization is reported as measured
    /// qps / capacity (overrides `utilization` for the application value).
    pub capacity: Option<f64>,
    /// Extra latency added to every call, simulating a slow backend.
    pub delay: Duration,
    /// Serve a health service that answers `Check` but not `Watch`
    /// (UNIMPLEMENTED), like some older servers.
    pub health_check_only: bool,
    /// Serve over TLS with these settings.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

/// A `grpc.health.v1.Health` that answers `Check` only.
struct CheckOnlyHealth {
    serving: Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for CheckOnlyHealth {
    type WatchStream =
        futures::stream::Empty<Result<tonic_health::pb::HealthCheckResponse, Status>>;

    async fn check(
        &self,
        _request: Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<Response<tonic_health::pb::HealthCheckResponse>, Status> {
        let status = if self.serving.load(Ordering::Relaxed) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(Response::new(tonic_health::pb::HealthCheckResponse {
            status: tonic_health::pb::health_check_response::ServingStatus::from(status) as i32,
        }))
    }

    async fn watch(
        &self,
        _request: Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "Watch is not implemented by this server",
        ))
    }
}

/// The standard health service, counting the `Watch` streams open on it
/// (so tests can see how many health checkers watch this backend).
struct CountingHealth {
    inner: tonic_health::server::HealthService,
    watchers: Arc<tokio::sync::watch::Sender<usize>>,
}

/// A `Watch` stream that counts itself out when dropped.
struct CountedWatch {
    inner: tonic_health::server::WatchStream,
    watchers: Arc<tokio::sync::watch::Sender<usize>>,
}

impl futures::Stream for CountedWatch {
    type Item = Result<tonic_health::pb::HealthCheckResponse, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for CountedWatch {
    fn drop(&mut self) {
        self.watchers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for CountingHealth {
    type WatchStream = CountedWatch;

    async fn check(
        &self,
        request: Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<Response<tonic_health::pb::HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    async fn watch(
        &self,
        request: Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        self.watchers.send_modify(|n| *n += 1);
        Ok(Response::new(CountedWatch {
            inner,
            watchers: self.watchers.clone(),
        }))
    }
}

/// The greeter service.
pub struct GreeterService {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    load: LoadRecorder,
    delay: Duration,
}

#[tonic::async_trait]
impl Greeter for GreeterService {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.load.record_call();
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let token = request.metadata().get(lb_client::LB_TOKEN).cloned();
        let name = request.into_inner().name;
        let mut reply = Response::new(HelloReply {
            message: format!("Hello {name} from {}", self.addr),
        });
        if let Some(token) = token {
            reply.metadata_mut().insert(TOKEN_ECHO, token);
        }
        Ok(reply)
    }
}

/// The backend address named in a greeter reply.
pub fn backend_of(message: &str) -> &str {
    message.rsplit(" from ").next().unwrap_or(message)
}

/// A running greeter.
pub struct RunningGreeter {
    /// Where it serves.
    pub addr: SocketAddr,
    /// Calls answered so far.
    pub calls: Arc<AtomicU64>,
    /// Load reported over ORCA.
    pub load: LoadRecorder,
    health: HealthReporter,
    health_watchers: Arc<tokio::sync::watch::Sender<usize>>,
    serving: Arc<std::sync::atomic::AtomicBool>,
    registration: Option<Registration>,
    stop: CancellationToken,
    server: JoinHandle<()>,
}

impl RunningGreeter {
    /// Serves on `listener`; `register` (if any) is started once serving.
    pub async fn start(
        listener: TcpListener,
        options: GreeterOptions,
        register: impl FnOnce(SocketAddr) -> Option<Registration>,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicU64::new(0));
        let load = LoadRecorder::new();
        load.set_application_utilization(options.utilization);
        load.set_cpu_utilization(options.utilization);
        load.set_capacity(options.capacity);
        let health = HealthReporter::new();
        let health_watchers = Arc::new(tokio::sync::watch::channel(0).0);
        let health_service = tonic_health::pb::health_server::HealthServer::new(CountingHealth {
            inner: tonic_health::server::HealthService::from_health_reporter(health.clone()),
            watchers: health_watchers.clone(),
        });
        health.set_serving::<GreeterServer<GreeterService>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        let stop = CancellationToken::new();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let check_only = options.health_check_only.then(|| {
            tonic_health::pb::health_server::HealthServer::new(CheckOnlyHealth {
                serving: serving.clone(),
            })
        });
        let watching = (!options.health_check_only).then_some(health_service);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = options.tls {
            builder = builder.tls_config(tls)?;
        }
        let router = builder
            .add_optional_service(watching)
            .add_optional_service(check_only)
            .add_service(load.service())
            .add_service(GreeterServer::new(GreeterService {
                addr,
                calls: calls.clone(),
                load: load.clone(),
                delay: options.delay,
            }));
        let shutdown = stop.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                tracing::error!(error = %e, "greeter server failed");
            }
        });
        let registration = register(addr);
        Ok(RunningGreeter {
            addr,
            calls,
            load,
            serving,
            health,
            health_watchers,
            registration,
            stop,
            server,
        })
    }

    /// Number of health `Watch` streams open on this backend, as it changes.
    pub fn health_watchers(&self) -> tokio::sync::watch::Receiver<usize> {
        self.health_watchers.subscribe()
    }

    /// Waits until the registration (if any) is confirmed.
    pub async fn wait_registered(&self, timeout: Duration) -> bool {
        match &self.registration {
            Some(r) => r.wait_registered(timeout).await,
            None => true,
        }
    }

    /// Sets the health status reported to health checkers (server-wide and
    /// for the Greeter service).
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        self.health
            .set_service_status("helloworld.Greeter", status)
            .await;
        self.serving.store(serving, Ordering::Relaxed);
    }

    /// Flips the health status; returns the new one (true = serving).
    pub async fn toggle_serving(&self) -> bool {
        let next = !self.serving.load(Ordering::Relaxed);
        self.set_serving(next).await;
        next
    }

    /// Graceful stop: NOT_SERVING, deregister, drain for `drain`, then stop
    /// once calls in flight are done.
    pub async fn shutdown(self, drain: Duration) {
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.health
            .set_not_serving::<GreeterServer<GreeterService>>()
            .await;
        if let Some(r) = self.registration {
            r.deregister().await;
        }
        tokio::time::sleep(drain).await;
        self.stop.cancel();
        let _ = self.server.await;
    }
}
