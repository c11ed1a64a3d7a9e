//! Wiring: builds every part from the [`Config`] and connects them, in the
//! order data flows (registry → catalog → probes → frontends).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lb_proto::registry::v1::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, CatalogLimits};
use crate::cluster::{Cluster, ClusterSettings};
use crate::config::reload::Reload;
use crate::config::Config;
use crate::grpclb::{Balancer, BalancerParts, BalancerSettings};
use crate::history::History;
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::net::limits::Quota;
use crate::net::listener::{self, FirstBytes, ListenerSettings};
use crate::net::tls;
use crate::registry::memory::RegistrationApi;
use crate::registry::{self, RegistrySink, Sources};
use crate::streams::names::NameMapper;
use crate::streams::service::StreamingService;
use crate::streams::sessions::Sessions;
use crate::streams::subsets::Subsets;
use crate::xds;
use crate::zones::{ZoneSettings, Zones};
use crate::{admin, probe};
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_server::LoadReportingServiceServer;

/// Largest HTTP/2 header block accepted on the gRPC port (gRPC clients send
/// a few hundred bytes; hyper's default would be 16 MiB).
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Largest message written to a stream: a server list of the longest
/// allowed length is well under this.
const MAX_ENCODED_MESSAGE: usize = 4 * 1024 * 1024;

/// The LB PINGs a client connection after this long with nothing read
/// from it, so that a client that went away leaves something unanswered.
/// Clients accept PINGs at any rate (the 5-minute rules of DESIGN §3 are
/// servers'), and the PING keeps the connection's TCP user timeout
/// ([`crate::net::listener::PEER_USER_TIMEOUT`]) running, which is what
/// reaps a client behind a dead link: within the interval plus that
/// timeout.
const CLIENT_PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long a PING may go unanswered by a client whose kernel still
/// acknowledges (a hung process): generous, because on a lossy link an
/// answer lost a few times in a row comes back after seconds (the client
/// host's retransmissions back off exponentially), and a connection
/// closed for a late answer costs every stream on it a reconnect.
const CLIENT_PING_TIMEOUT: Duration = Duration::from_secs(15);

/// A running LB: its bound addresses and the handles to stop it.
pub struct LbServer {
    /// Address of the gRPC port (BalanceLoad, registration API).
    pub lb_addr: SocketAddr,
    /// Address of the admin HTTP port.
    pub admin_addr: SocketAddr,
    /// The catalog (for embedding programs and tests).
    pub catalog: Arc<Catalog>,
    names: Arc<NameMapper>,
    /// The policy flags it started with: what needs a restart among them
    /// stays as it runs through reloads.
    started_policy: crate::config::PolicyFlags,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// What every part shares.
struct Parts {
    cfg: Config,
    metrics: Arc<Metrics>,
    catalog: Arc<Catalog>,
    names: Arc<NameMapper>,
    sessions: Arc<Sessions>,
    subsets: Arc<Subsets>,
    zones: Arc<Zones>,
    history: Arc<History>,
    refusal_log: Arc<LogLimiter>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Parts {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Runs `job` every `every` (a late tick is delayed, not bunched) until
    /// shutdown.
    fn spawn_every(&mut self, every: Duration, mut job: impl FnMut() + Send + 'static) {
        let shutdown = self.shutdown.clone();
        self.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => job(),
                }
            }
        });
    }
}

impl LbServer {
    /// Binds both ports, starts the registry sources, probes and frontends,
    /// and serves. Returns once the ports are bound; port 0 picks a free
    /// port (see [`LbServer::lb_addr`]).
    pub async fn start(cfg: Config) -> anyhow::Result<LbServer> {
        let metrics = Arc::new(Metrics::new());
        let sources = registry::from_urls(&cfg.registry)?;
        let catalog = Arc::new(
            Catalog::new(
                cfg.policy.policy(),
                metrics.clone(),
                1,
                cfg.probes.health_checks,
            )
            .with_limits(CatalogLimits {
                max_services: cfg.catalog.max_services,
                max_backends_per_service: cfg.catalog.max_backends_per_service,
                idle_service_grace: cfg.catalog.idle_service_grace,
                deregistration_grace: cfg.catalog.deregistration_grace,
            })
            .with_source_order(sources.names())
            .with_leased_sources(sources.leased()),
        );
        let lb_listener = bind(cfg.listen, "--listen").await?;
        let admin_listener = bind(cfg.admin_listen, "--admin-listen").await?;
        let (lb_addr, admin_addr) = (lb_listener.local_addr()?, admin_listener.local_addr()?);
        let zone_settings = cfg
            .zones
            .settings(cfg.policy.max_list_len, cfg.grpc.client_stats_interval)?;
        let mut parts = Parts {
            subsets: Arc::new(Subsets::new(cfg.grpc.subset_size)),
            zones: Arc::new(Zones::new(
                ZoneSettings {
                    // Subsets and zone lists are not combined.
                    enabled: zone_settings.enabled && cfg.grpc.subset_size == 0,
                    ..zone_settings
                },
                metrics.clone(),
            )),
            history: Arc::new(History::new(
                cfg.history.settings(cfg.grpc.client_stats_interval)?,
            )),
            names: Arc::new(NameMapper::new(
                cfg.grpc.aliases.clone(),
                cfg.grpc.domain_suffixes.clone(),
            )),
            cfg,
            metrics,
            catalog: catalog.clone(),
            sessions: Arc::new(Sessions::default()),
            refusal_log: Arc::new(LogLimiter::default()),
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
        };
        let wired = (|| {
            let cluster = parts.cluster(lb_addr, admin_addr)?;
            parts.sources(&sources);
            parts.probes(cluster.clone())?;
            parts.refresh();
            parts.judge_gray(cluster.clone());
            parts.forget_idle();
            parts.history();
            parts.grpc(lb_listener, &sources)?;
            parts.admin(admin_listener, cluster)
        })();
        if let Err(e) = wired {
            // Stop what was already started: an embedding program goes on.
            parts.shutdown.cancel();
            return Err(e);
        }
        tracing::info!(%lb_addr, %admin_addr, registry = %parts.cfg.registry.registry_line(), "lb-server listening");
        Ok(LbServer {
            lb_addr,
            admin_addr,
            catalog,
            names: parts.names,
            started_policy: parts.cfg.policy.clone(),
            shutdown: parts.shutdown,
            tasks: parts.tasks,
        })
    }

    /// Applies what `reload` found changed in `cfg` that a running LB can
    /// take (see [`crate::config::reload`]): name mapping and the list
    /// policy. The log filter belongs to the program that installed it.
    pub fn reload(&self, cfg: &Config, reload: &Reload) {
        if reload.names_changed() {
            self.names
                .replace(cfg.grpc.aliases.clone(), cfg.grpc.domain_suffixes.clone());
        }
        if reload.policy_changed() {
            self.catalog.set_policy(crate::config::reload::policy(
                &cfg.policy,
                &self.started_policy,
            ));
        }
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

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}"))
}

impl Parts {
    /// Replicas sharing probes through the first etcd registry, when on.
    fn cluster(
        &mut self,
        lb_addr: SocketAddr,
        admin_addr: SocketAddr,
    ) -> anyhow::Result<Option<Arc<Cluster>>> {
        let cfg = &self.cfg;
        let first_etcd = cfg
            .registry
            .registry
            .iter()
            .find_map(|u| registry::etcd_endpoints(u));
        let Some(endpoints) =
            first_etcd.filter(|_| cfg.cluster.cluster && cfg.probes.health_checks)
        else {
            return Ok(None);
        };
        let settings = ClusterSettings {
            etcd: cfg.registry.etcd_access(endpoints)?,
            prefix: cfg.cluster.cluster_prefix.clone(),
            replica_id: cfg.cluster.id(lb_addr),
            ttl: cfg.cluster.replica_ttl,
            lb_addr,
            admin_addr,
        };
        let cluster = Cluster::new(settings, self.catalog.clone());
        self.spawn(cluster.clone().run(self.shutdown.clone()));
        Ok(Some(cluster))
    }

    /// Every registry source, each writing into the catalog through its sink.
    fn sources(&mut self, sources: &Sources) {
        for (name, source) in &sources.list {
            let sink = RegistrySink::new(name, self.catalog.clone(), self.metrics.clone());
            self.spawn(source.clone().run(sink, self.shutdown.clone()));
        }
    }

    /// Health and load probes of every backend (this replica's share).
    fn probes(&mut self, cluster: Option<Arc<Cluster>>) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        if !cfg.probes.health_checks {
            return Ok(());
        }
        let settings = probe::health::HealthSettings {
            service_names: cfg.probes.health_services.iter().cloned().collect(),
            check_interval: cfg.probes.health_check_interval,
            timeout: cfg.probes.health_timeout,
            orca: cfg.probes.orca,
            orca_interval: cfg.probes.orca_interval,
            reconnect_rate: cfg.probes.probe_reconnect_rate,
            tls: tls::client_config(
                "--backend-tls-ca",
                cfg.probes.backend_tls_ca.as_deref(),
                cfg.probes
                    .backend_tls_cert
                    .as_deref()
                    .zip(cfg.probes.backend_tls_key.as_deref()),
                cfg.probes.backend_tls_server_name.as_deref(),
            )?,
        };
        let run = probe::health::run(
            self.catalog.clone(),
            cluster,
            settings,
            self.shutdown.clone(),
        );
        self.spawn(run);
        Ok(())
    }

    /// Recomputes every list periodically: load reports, weight blackout
    /// and expiry, and slow start depend on time.
    fn refresh(&mut self) {
        let catalog = self.catalog.clone();
        let every = self
            .cfg
            .policy
            .weight_update_period
            .max(Duration::from_millis(10));
        self.spawn_every(every, move || catalog.refresh_all());
    }

    /// Judges gray failures every second from clients' pooled outcomes,
    /// with the other replicas' verdicts when in a cluster (and publishes
    /// this one's).
    fn judge_gray(&mut self, cluster: Option<Arc<Cluster>>) {
        let catalog = self.catalog.clone();
        let settings = self.cfg.policy.gray();
        self.spawn_every(Duration::from_secs(1), move || {
            let now = std::time::Instant::now();
            match &cluster {
                Some(cluster) => {
                    let own =
                        catalog.judge_gray(&settings, now, Some(cluster.id()), &cluster.votes());
                    cluster.publish_votes(own);
                }
                None => {
                    catalog.judge_gray(&settings, now, None, &Default::default());
                }
            }
        });
    }

    /// Forgets services idle for `--idle-service-grace`, and what the
    /// frontends kept about them.
    fn forget_idle(&mut self) {
        let Some(every) = self.catalog.idle_sweep_interval() else {
            return;
        };
        let (catalog, zones, subsets) = (
            self.catalog.clone(),
            self.zones.clone(),
            self.subsets.clone(),
        );
        self.spawn_every(every, move || {
            for service in catalog.forget_idle(std::time::Instant::now()) {
                zones.forget(&service);
                subsets.forget(&service);
            }
        });
    }

    /// History: samples of the catalog and its journal, for the dashboard.
    fn history(&mut self) {
        let task = self
            .history
            .clone()
            .run(self.catalog.clone(), self.shutdown.clone());
        self.spawn(task);
    }

    /// The gRPC port: the grpclb frontend and the registration API.
    fn grpc(&mut self, listener: TcpListener, sources: &Sources) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let names = self.names.clone();
        // One cap on streams: BalanceLoad, ADS and LRS streams together.
        let streams = Quota::new(
            "streams (BalanceLoad, ADS, LRS)",
            cfg.grpc.max_streams,
            cfg.grpc.max_streams_per_peer,
        );
        let ads = xds::Ads::new(
            xds::XdsParts {
                catalog: self.catalog.clone(),
                names: names.clone(),
                sessions: self.sessions.clone(),
                subsets: self.subsets.clone(),
                zones: self.zones.clone(),
                metrics: self.metrics.clone(),
            },
            xds::XdsSettings {
                streams: streams.clone(),
                max_resource_names: cfg.grpc.xds_max_resource_names,
                request_max_rate: cfg.grpc.xds_request_max_rate,
                shutdown_spread: cfg.grpc.shutdown_spread,
                initial_request_timeout: cfg.grpc.initial_request_timeout,
                load_report_interval: cfg.grpc.load_report_interval,
                resources: xds::resources::ResourceSettings {
                    lrs: !cfg.grpc.load_report_interval.is_zero(),
                    connect_timeout: Duration::from_secs(1),
                    retries: cfg.grpc.xds_retries,
                    outlier_detection: cfg.grpc.xds_outlier_detection,
                },
            },
            self.shutdown.clone(),
        );
        let parts = BalancerParts {
            catalog: self.catalog.clone(),
            names,
            sessions: self.sessions.clone(),
            subsets: self.subsets.clone(),
            zones: self.zones.clone(),
            metrics: self.metrics.clone(),
        };
        let balancer = Balancer::new(
            parts,
            BalancerSettings {
                client_stats_interval: cfg.grpc.client_stats_interval,
                initial_request_timeout: cfg.grpc.initial_request_timeout,
                shutdown_spread: cfg.grpc.shutdown_spread,
                streams,
                client_stats_max_rate: cfg.grpc.client_stats_max_rate,
                heartbeat_min: cfg.grpc.heartbeat_min,
            },
            self.shutdown.clone(),
        );
        let registration = RegistrationApi::new(
            sources.memory.clone(),
            cfg.registry.registry_line(),
            cfg.registry.load_registration_token()?,
            self.metrics.clone(),
        );
        let incoming = listener::guarded(
            listener,
            ListenerSettings {
                port: "lb",
                quota: Quota::new(
                    "connections to the gRPC port",
                    cfg.grpc.max_connections,
                    cfg.grpc.max_connections_per_peer,
                ),
                handshake_timeout: cfg.handshake_timeout,
                first_bytes: FirstBytes::Http2,
                metrics: self.metrics.clone(),
                log: self.refusal_log.clone(),
            },
        );
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls::server_config(
            cfg.grpc
                .tls_cert
                .as_deref()
                .zip(cfg.grpc.tls_key.as_deref()),
            cfg.grpc.tls_client_ca.as_deref(),
            cfg.handshake_timeout,
        )? {
            server = server
                .tls_config(tls)
                .map_err(|e| anyhow::anyhow!("--tls-cert / --tls-key: {e}"))?;
        }
        let max_message = cfg.grpc.max_message_size;
        let serve = server
            .http2_keepalive_interval(Some(CLIENT_PING_INTERVAL))
            .http2_keepalive_timeout(Some(CLIENT_PING_TIMEOUT))
            .max_concurrent_streams(Some(cfg.grpc.max_streams_per_connection))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_SIZE))
            .add_service(StreamingService::new(
                Arc::new(balancer),
                max_message,
                MAX_ENCODED_MESSAGE,
            ))
            .add_service(
                // An ADS request may name every service (Envoy's EDS), so
                // it may be as large as the largest response.
                StreamingService::new(
                    ads.clone(),
                    MAX_ENCODED_MESSAGE.max(max_message),
                    MAX_ENCODED_MESSAGE,
                ),
            )
            .add_service(
                LoadReportingServiceServer::new(xds::LoadReporting(ads))
                    .max_decoding_message_size(max_message),
            )
            .add_service(RegistryServer::new(registration).max_decoding_message_size(max_message))
            .serve_with_incoming_shutdown(incoming, self.shutdown.clone().cancelled_owned());
        self.spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        Ok(())
    }

    /// The admin port: JSON, metrics, the dashboard and operator actions.
    fn admin(
        &mut self,
        listener: TcpListener,
        cluster: Option<Arc<Cluster>>,
    ) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let router = admin::router(admin::AdminState {
            catalog: self.catalog.clone(),
            sessions: self.sessions.clone(),
            subsets: self.subsets.clone(),
            zones: self.zones.clone(),
            history: self.history.clone(),
            cluster,
            metrics: self.metrics.clone(),
            registry: cfg.registry.registry_line(),
            token: cfg.admin.load_admin_token()?.map(Arc::from),
        });
        let settings = ListenerSettings {
            port: "admin",
            quota: Quota::new(
                "connections to the admin port",
                cfg.admin.admin_max_connections,
                cfg.admin.admin_max_connections_per_peer,
            ),
            handshake_timeout: cfg.handshake_timeout,
            first_bytes: FirstBytes::Any,
            metrics: self.metrics.clone(),
            log: self.refusal_log.clone(),
        };
        let tls = match cfg
            .admin
            .admin_tls_cert
            .as_deref()
            .zip(cfg.admin.admin_tls_key.as_deref())
        {
            Some((cert, key)) => Some(tls::https_acceptor(
                [
                    "--admin-tls-cert",
                    "--admin-tls-key",
                    "--admin-tls-client-ca",
                ],
                cert,
                key,
                cfg.admin.admin_tls_client_ca.as_deref(),
            )?),
            None => None,
        };
        let serve = admin::serve::serve(listener, router, settings, tls, self.shutdown.clone());
        self.spawn(serve);
        Ok(())
    }
}
