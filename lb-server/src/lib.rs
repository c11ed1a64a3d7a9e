//! `lb-server`: a lookaside load balancer for gRPC.
//!
//! The LB watches a service registry, keeps a catalog of every service's
//! backends, turns it into ordered server lists, and streams those lists to
//! clients over gRPC's own `grpc.lb.v1.LoadBalancer` protocol. Clients then
//! call backends directly: the LB is never in the data path.
//!
//! Data flows one way, one module per step:
//!
//! ```text
//! registry ──► catalog ◄── health (Watch/Check per backend)
//!                 ▲    ◄── load (ORCA stream per backend)
//!                 │
//!                 └──► policy ──► balancer (BalanceLoad streams) ──► clients
//!                 └──► admin (HTTP: JSON, /metrics) reads snapshots
//! ```
//!
//! | module | job |
//! | --- | --- |
//! | [`config`] | flags and env vars |
//! | [`registry`] | sources: embedded memory, etcd, file, DNS, ZooKeeper, Consul |
//! | [`catalog`] | services, backends, published lists |
//! | [`health`] | active health checks per backend |
//! | [`cluster`] | replicas sharing health checks through etcd |
//! | [`rendezvous`] | stable rendezvous hashing |
//! | [`load`] | ORCA load reports per backend |
//! | [`policy`] | backends → ordered, weighted server list, with reasons |
//! | [`names`] | requested name → service |
//! | [`subsets`] | per-client subsets of backends |
//! | [`balancer`] | the BalanceLoad service |
//! | [`sessions`] | table of connected streams |
//! | [`admin`] | admin HTTP endpoint |
//! | [`metrics`] | Prometheus metrics |
//! | [`listener`] | accepting connections under caps and a handshake deadline |
//! | [`limits`] | quotas of connections and streams, in total and per peer |
//! | [`auth`] | bearer tokens (admin mutations, registration API) |
//! | [`log_limit`] | rate limits for log lines outsiders can trigger |
//! | [`tls`] | TLS material: the gRPC port's, towards backends and etcd |
//!
//! [`LbServer::start`] assembles and runs them all.

pub mod admin;
pub mod auth;
pub mod balancer;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod health;
pub mod limits;
pub mod listener;
pub mod load;
pub mod log_limit;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod registry;
pub mod rendezvous;
pub mod sessions;
pub mod subsets;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lb_proto::grpc::lb::v1::load_balancer_server::LoadBalancerServer;
use lb_proto::registry::v1::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::balancer::{Balancer, BalancerSettings};
use crate::catalog::Catalog;
use crate::metrics::Metrics;
use crate::names::NameMapper;
use crate::registry::memory::RegistrationApi;
use crate::registry::RegistrySink;
use crate::sessions::Sessions;

/// Largest HTTP/2 header block accepted on the gRPC port (gRPC clients send
/// a few hundred bytes; hyper's default would be 16 MiB).
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Largest message written to a stream: a server list of the longest
/// allowed length is well under this.
const MAX_ENCODED_MESSAGE: usize = 4 * 1024 * 1024;

/// A running LB: its bound addresses and the handles to stop it.
pub struct LbServer {
    /// Address of the gRPC port (BalanceLoad, registration API).
    pub lb_addr: SocketAddr,
    /// Address of the admin HTTP port.
    pub admin_addr: SocketAddr,
    /// The catalog (for embedding programs and tests).
    pub catalog: Arc<Catalog>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl LbServer {
    /// Binds both ports, starts the registry source and serves. Returns once
    /// the ports are bound; port 0 picks a free port (see [`LbServer::lb_addr`]).
    pub async fn start(cfg: Config) -> anyhow::Result<LbServer> {
        let metrics = Arc::new(Metrics::new());
        let admin_token = cfg.load_admin_token()?;
        let registration_token = cfg.load_registration_token()?;
        let sources = registry::from_urls(&cfg.registry, &cfg)?;
        let catalog = Arc::new(
            Catalog::new(cfg.policy(), metrics.clone(), 1, cfg.health_checks)
                .with_limits(catalog::CatalogLimits {
                    max_services: cfg.max_services,
                    max_backends_per_service: cfg.max_backends_per_service,
                })
                .with_source_order(sources.names()),
        );
        let sessions = Arc::new(Sessions::default());
        let subsets = Arc::new(subsets::Subsets::new(cfg.subset_size));
        let shutdown = CancellationToken::new();

        let lb_listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", cfg.listen))?;
        let admin_listener = TcpListener::bind(cfg.admin_listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (--admin-listen): {e}",
                cfg.admin_listen
            )
        })?;
        let lb_addr = lb_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let mut tasks = Vec::new();
        let first_etcd = cfg
            .registry
            .iter()
            .find_map(|url| registry::etcd_endpoints(url));
        let cluster = match first_etcd {
            Some(endpoints) if cfg.cluster && cfg.health_checks => {
                let c = cluster::Cluster::new(
                    cluster::ClusterSettings {
                        etcd: cfg.etcd_access(endpoints)?,
                        prefix: cfg.cluster_prefix.clone(),
                        replica_id: cfg.replica_id(lb_addr),
                        ttl: cfg.replica_ttl,
                        lb_addr,
                        admin_addr,
                    },
                    catalog.clone(),
                );
                tasks.push(tokio::spawn(c.clone().run(shutdown.clone())));
                Some(c)
            }
            _ => None,
        };
        for (name, source) in &sources.list {
            let sink = RegistrySink::new(name, catalog.clone(), metrics.clone());
            tasks.push(tokio::spawn(source.clone().run(sink, shutdown.clone())));
        }
        if cfg.health_checks {
            let settings = health::HealthSettings {
                service_names: cfg.health_services.iter().cloned().collect(),
                check_interval: cfg.health_check_interval,
                timeout: cfg.health_timeout,
                orca: cfg.orca,
                orca_interval: cfg.orca_interval,
                tls: tls::client_config(
                    "--backend-tls-ca",
                    cfg.backend_tls_ca.as_deref(),
                    cfg.backend_tls_cert
                        .as_deref()
                        .zip(cfg.backend_tls_key.as_deref()),
                    cfg.backend_tls_server_name.as_deref(),
                )?,
            };
            tasks.push(tokio::spawn(health::run(
                catalog.clone(),
                cluster.clone(),
                settings,
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(refresh(
            catalog.clone(),
            cfg.weight_update_period,
            shutdown.clone(),
        )));

        let balancer = Balancer::new(
            catalog.clone(),
            Arc::new(NameMapper::new(
                cfg.aliases.clone(),
                cfg.domain_suffixes.clone(),
            )),
            sessions.clone(),
            subsets.clone(),
            metrics.clone(),
            BalancerSettings {
                client_stats_interval: cfg.client_stats_interval,
                initial_request_timeout: cfg.initial_request_timeout,
                shutdown_spread: cfg.shutdown_spread,
                streams: limits::Quota::new(
                    "BalanceLoad streams",
                    cfg.max_streams,
                    cfg.max_streams_per_peer,
                ),
                client_stats_max_rate: cfg.client_stats_max_rate,
            },
            shutdown.clone(),
        );
        let registration = RegistrationApi::new(
            sources.memory.clone(),
            cfg.registry_line(),
            registration_token,
            metrics.clone(),
        );
        let refusal_log = Arc::new(log_limit::LogLimiter::default());
        let incoming = listener::guarded(
            lb_listener,
            listener::ListenerSettings {
                port: "lb",
                quota: limits::Quota::new(
                    "connections to the gRPC port",
                    cfg.max_connections,
                    cfg.max_connections_per_peer,
                ),
                handshake_timeout: cfg.handshake_timeout,
                first_bytes: listener::FirstBytes::Http2,
                metrics: metrics.clone(),
                log: refusal_log.clone(),
            },
        );
        let max_message = cfg.max_message_size;
        let mut grpc = tonic::transport::Server::builder();
        if let Some(tls) = tls::server_config(
            cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref()),
            cfg.tls_client_ca.as_deref(),
            cfg.handshake_timeout,
        )? {
            grpc = grpc
                .tls_config(tls)
                .map_err(|e| anyhow::anyhow!("--tls-cert / --tls-key: {e}"))?;
        }
        let grpc = grpc
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .max_concurrent_streams(Some(cfg.max_streams_per_connection))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_SIZE))
            .add_service(
                LoadBalancerServer::new(balancer)
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(MAX_ENCODED_MESSAGE),
            )
            .add_service(RegistryServer::new(registration).max_decoding_message_size(max_message))
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = grpc.await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));

        let admin_metrics = metrics.clone();
        let admin = admin::router(admin::AdminState {
            catalog: catalog.clone(),
            sessions,
            subsets,
            cluster,
            metrics: metrics.clone(),
            registry: cfg.registry_line(),
            token: admin_token.map(Arc::from),
        });
        let admin_settings = listener::ListenerSettings {
            port: "admin",
            quota: limits::Quota::new(
                "connections to the admin port",
                cfg.admin_max_connections,
                cfg.admin_max_connections_per_peer,
            ),
            handshake_timeout: cfg.handshake_timeout,
            first_bytes: listener::FirstBytes::Any,
            metrics: admin_metrics,
            log: refusal_log,
        };
        let admin_tls = match cfg
            .admin_tls_cert
            .as_deref()
            .zip(cfg.admin_tls_key.as_deref())
        {
            Some((cert, key)) => Some(tls::https_acceptor(
                [
                    "--admin-tls-cert",
                    "--admin-tls-key",
                    "--admin-tls-client-ca",
                ],
                cert,
                key,
                cfg.admin_tls_client_ca.as_deref(),
            )?),
            None => None,
        };
        tasks.push(tokio::spawn(admin::serve::serve(
            admin_listener,
            admin,
            admin_settings,
            admin_tls,
            shutdown.clone(),
        )));

        tracing::info!(%lb_addr, %admin_addr, registry = %cfg.registry_line(), "lb-server listening");
        Ok(LbServer {
            lb_addr,
            admin_addr,
            catalog,
            shutdown,
            tasks,
        })
    }

    /// Stops serving: streams are closed (spread over the shutdown window),
    /// then the ports. Waits at most `limit` for everything to finish.
    pub async fn shutdown(self, limit: Duration) {
        self.shutdown.cancel();
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!(?limit, "shutdown did not finish in time");
        }
    }
}

/// Recomputes every list periodically: load reports, weight blackout and
/// expiry, and slow start depend on time.
async fn refresh(catalog: Arc<Catalog>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => catalog.refresh_all(),
        }
    }
}
