//! The embedded registry: instances held in memory under TTL leases, fed by
//! the `lb.registry.v1.Registry` gRPC API served on the LB's own port.
//!
//! It is the default (`--registry memory`), so a newcomer can run the LB and
//! a few backends with nothing else installed. Leases behave like etcd's: an
//! instance disappears when its lease is not renewed within its TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use lb_proto::registry::v1 as api;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::entry::{self, Decoded};
use super::{Registry, RegistrySink};

/// Longest lease a registration may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// How often expired leases are swept.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

struct Lease {
    key: String,
    ttl: Duration,
    expires: Instant,
}

/// In-memory registry with leases.
pub struct MemoryRegistry {
    default_ttl: Duration,
    max_leases: usize,
    sink: OnceLock<RegistrySink>,
    leases: Mutex<HashMap<u64, Lease>>,
}

impl MemoryRegistry {
    /// An empty registry giving `default_ttl` to registrations that ask for
    /// none, holding at most `max_leases` registrations.
    pub fn new(default_ttl: Duration, max_leases: usize) -> Self {
        MemoryRegistry {
            default_ttl,
            max_leases,
            sink: OnceLock::new(),
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh lease id: random, so that ids cannot be guessed from one's
    /// own, and a client holding an id from a previous LB process gets
    /// NOT_FOUND rather than someone else's lease.
    fn new_id(leases: &HashMap<u64, Lease>) -> u64 {
        loop {
            let id = rand::random::<u64>() >> 1;
            if id != 0 && !leases.contains_key(&id) {
                return id;
            }
        }
    }

    fn sink(&self) -> Result<&RegistrySink, Status> {
        self.sink
            .get()
            .ok_or_else(|| Status::unavailable("embedded registry is starting"))
    }

    /// Registers `address` as an instance of `service` under a new lease;
    /// returns the lease id and its TTL.
    pub async fn register(&self, req: api::RegisterRequest) -> Result<(u64, Duration), Status> {
        let sink = self.sink()?.clone();
        let ttl = match req.ttl_seconds {
            0 => self.default_ttl,
            s => Duration::from_secs(s as u64).min(MAX_TTL),
        };
        if req.service.is_empty() || req.service.contains('/') || req.service.len() > 200 {
            return Err(Status::invalid_argument(
                "service must be a non-empty name without '/', at most 200 bytes",
            ));
        }
        let instance = if req.instance.is_empty() {
            req.address.clone()
        } else {
            req.instance.clone()
        };
        let key = format!("{}/{}", req.service, instance);
        let metadata: serde_json::Value = if req.metadata_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&req.metadata_json)
                .map_err(|e| Status::invalid_argument(format!("metadata_json is not JSON: {e}")))?
        };
        let value =
            serde_json::json!({"Op": 0, "Addr": req.address, "Metadata": metadata}).to_string();
        let instance = match entry::decode("", &key, value.as_bytes()).await {
            Ok(Decoded::Upsert(i)) => i,
            Ok(Decoded::Delete) => return Err(Status::invalid_argument("not a registration")),
            Err(rejected) => {
                sink.reject(&key, rejected.reason, &rejected.detail);
                return Err(Status::invalid_argument(format!(
                    "{}: {}",
                    rejected.reason.as_str(),
                    rejected.detail
                )));
            }
        };
        let id = {
            let mut leases = self.leases.lock().expect("lease lock");
            leases.retain(|_, l| l.key != key);
            if leases.len() >= self.max_leases {
                sink.reject(
                    &key,
                    crate::model::RejectReason::Limit,
                    &format!("{} registrations held (--max-registrations)", leases.len()),
                );
                return Err(Status::resource_exhausted(format!(
                    "the embedded registry holds its limit of {} registrations",
                    self.max_leases
                )));
            }
            let id = Self::new_id(&leases);
            leases.insert(
                id,
                Lease {
                    key,
                    ttl,
                    expires: Instant::now() + ttl,
                },
            );
            id
        };
        sink.upsert(instance);
        Ok((id, ttl))
    }

    /// Renews lease `id`; NOT_FOUND if it expired or never existed.
    pub fn keep_alive(&self, id: u64) -> Result<Duration, Status> {
        let mut leases = self.leases.lock().expect("lease lock");
        let lease = leases
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("lease {id} not found")))?;
        lease.expires = Instant::now() + lease.ttl;
        Ok(lease.ttl)
    }

    /// Removes the instance of lease `id` at once.
    pub fn deregister(&self, id: u64) -> Result<(), Status> {
        let lease = self
            .leases
            .lock()
            .expect("lease lock")
            .remove(&id)
            .ok_or_else(|| Status::not_found(format!("lease {id} not found")))?;
        self.sink()?.deregister(&lease.key);
        Ok(())
    }

    fn sweep(&self, sink: &RegistrySink) {
        let now = Instant::now();
        let expired: Vec<String> = {
            let mut leases = self.leases.lock().expect("lease lock");
            let mut gone = Vec::new();
            leases.retain(|id, l| {
                let alive = l.expires > now;
                if !alive {
                    tracing::info!(lease = id, key = %l.key, "lease expired");
                    gone.push(l.key.clone());
                }
                alive
            });
            gone
        };
        for key in expired {
            sink.remove(&key);
        }
    }
}

impl Registry for MemoryRegistry {
    fn kind(&self) -> &'static str {
        "memory"
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
            sink.snapshot(Vec::new());
            sink.mark_synced();
            let _ = self.sink.set(sink.clone());
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => self.sweep(&sink),
                }
            }
        }
        .boxed()
    }
}

/// The `lb.registry.v1.Registry` gRPC service. Answers FAILED_PRECONDITION
/// when the LB reads another registry (register there instead), and
/// UNAUTHENTICATED to calls without the registration token, when one is set.
pub struct RegistrationApi {
    registry: Option<Arc<MemoryRegistry>>,
    source: String,
    token: Option<String>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl RegistrationApi {
    /// Serves `registry`, or refuses registrations when it is `None`
    /// (`source` names the registry the LB reads, for the error message).
    /// With a `token`, every call must carry `authorization: Bearer <token>`.
    pub fn new(
        registry: Option<Arc<MemoryRegistry>>,
        source: String,
        token: Option<String>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        RegistrationApi {
            registry,
            source,
            token,
            metrics,
        }
    }

    /// The registry, once the caller is authorized.
    fn registry<T>(&self, request: &Request<T>) -> Result<&MemoryRegistry, Status> {
        if let Some(expected) = &self.token {
            let given = request
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes());
            if let Err(e) = crate::net::auth::check_bearer(given, expected) {
                self.metrics
                    .registrations_refused
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: "unauthenticated".into(),
                    })
                    .inc();
                tracing::warn!(peer = ?request.remote_addr(), why = e.message(), "registration call refused");
                return Err(Status::unauthenticated(format!(
                    "{}: the embedded registry needs its registration token",
                    e.message()
                )));
            }
        }
        self.registry.as_deref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "this LB reads registry {}; register instances there, not through the embedded API",
                self.source
            ))
        })
    }
}

#[tonic::async_trait]
impl api::registry_server::Registry for RegistrationApi {
    async fn register(
        &self,
        request: Request<api::RegisterRequest>,
    ) -> Result<Response<api::RegisterResponse>, Status> {
        let (lease_id, ttl) = self
            .registry(&request)?
            .register(request.into_inner())
            .await?;
        Ok(Response::new(api::RegisterResponse {
            lease_id,
            ttl_seconds: ttl.as_secs() as u32,
        }))
    }

    async fn keep_alive(
        &self,
        request: Request<api::KeepAliveRequest>,
    ) -> Result<Response<api::KeepAliveResponse>, Status> {
        let ttl = self
            .registry(&request)?
            .keep_alive(request.get_ref().lease_id)?;
        Ok(Response::new(api::KeepAliveResponse {
            ttl_seconds: ttl.as_secs() as u32,
        }))
    }

    async fn deregister(
        &self,
        request: Request<api::DeregisterRequest>,
    ) -> Result<Response<api::DeregisterResponse>, Status> {
        self.registry(&request)?
            .deregister(request.get_ref().lease_id)?;
        Ok(Response::new(api::DeregisterResponse {}))
    }
}
