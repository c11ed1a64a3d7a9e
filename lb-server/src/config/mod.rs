//! Command-line and environment configuration of an `lb-server` process.
//!
//! Every flag can also be given as an `LB_…` environment variable or in the
//! config file (`--config lb.toml`, see [`mod@file`]); `--help` documents them
//! all, each section of it headed by its section of the file. [`Config`] is plain data: [`crate::LbServer`] turns it
//! into running parts, handing each part its own section
//! ([`RegistryFlags`] to the registry sources, [`ProbeFlags`] to the probes,
//! [`PolicyFlags`] to the policy, [`GrpcFlags`] to the gRPC port, and so on),
//! never the whole.
//!
//! The process environment is read by the binary's `main` alone: clap reads
//! the `LB_*` flag variables when `main` parses, and [`Config::with_secrets`]
//! takes the secrets that are never flags. [`Config::with_addrs`], for
//! programs that embed the LB, reads no environment at all.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

pub mod file;
pub mod reload;

/// Configuration of one LB replica.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "lb-server",
    version,
    about = "Lookaside load balancer for gRPC: streams grpc.lb.v1 server lists built from a service registry.",
    long_about = None
)]
pub struct Config {
    /// Read settings from this TOML file (sections as headed below, keys
    /// the flags' long names). Command-line flags win over `LB_…`
    /// variables, which win over the file, which wins over the defaults.
    #[arg(long, env = "LB_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Print the effective configuration (flags, environment and file) as
    /// a config file that starts the same LB, and exit. Secrets are left out.
    #[arg(long)]
    pub print_config: bool,

    /// Address of the gRPC port: grpc.lb.v1.LoadBalancer and the embedded
    /// registry's registration API.
    #[arg(long, env = "LB_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,

    /// Address of the admin HTTP port (health, JSON API, Prometheus metrics).
    #[arg(long, env = "LB_ADMIN_LISTEN", default_value = "127.0.0.1:7001")]
    pub admin_listen: SocketAddr,

    /// A connection that has not sent its first bytes (HTTP/2 preface, TLS
    /// hello, HTTP request) within this time is closed; so is a TLS
    /// handshake, or an admin request's headers, taking longer.
    #[arg(long, env = "LB_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info,lb_server=debug`.
    /// Re-read on SIGHUP.
    #[arg(long, env = "LB_LOG", default_value = "info")]
    pub log: String,

    /// Where backends are found: the registry URLs and what each kind of source needs.
    #[command(flatten)]
    pub registry: RegistryFlags,

    /// Caps on what registries may put in the catalog.
    #[command(flatten)]
    pub catalog: CatalogFlags,

    /// How each backend is probed: health checks and ORCA load reports.
    #[command(flatten)]
    pub probes: ProbeFlags,

    /// How backends become a server list.
    #[command(flatten)]
    pub policy: PolicyFlags,

    /// The gRPC port: names, streams, caps, TLS.
    #[command(flatten)]
    pub grpc: GrpcFlags,

    /// The admin HTTP port: caps, token, TLS.
    #[command(flatten)]
    pub admin: AdminFlags,

    /// Zone-aware lists: where zones come from and how far a zone may be loaded.
    #[command(flatten)]
    pub zones: ZoneFlags,

    /// Replicas sharing health checks through etcd.
    #[command(flatten)]
    pub cluster: ClusterFlags,

    /// The in-memory history the dashboard draws.
    #[command(flatten)]
    pub history: HistoryFlags,
}

/// Where backends are found: the registry URLs and what each kind of source needs.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Registry sources [registry]")]
pub struct RegistryFlags {
    /// Where backends are registered: `memory` (embedded, fed by the
    /// registration API), `etcd://host1:2379,host2:2379`,
    /// `file:///path/to/services.json`, `dns://[server:port]` (services named
    /// by --dns-service), `zk://host1:2181,host2:2181/prefix`, or
    /// `consul[+https]://host:8500[?dc=…&tag=…]`, or `k8s://[namespace]`
    /// (Kubernetes EndpointSlices; services are `<service>.<namespace>`).
    /// Repeat (or space-separate in the
    /// env var) to combine sources; each service must come from one source
    /// (a service two sources define is served from the first one given,
    /// and the conflict is reported).
    #[arg(
        long,
        env = "LB_REGISTRY",
        default_value = "memory",
        value_delimiter = ' '
    )]
    pub registry: Vec<String>,

    /// DNS registry: a service and the DNS name it is found under,
    /// `service=name[:port]` (repeatable / comma-separated). SRV records
    /// `_grpc._tcp.<name>` are used where present; otherwise the A/AAAA
    /// records of `<name>` with `:port`.
    #[arg(long = "dns-service", env = "LB_DNS_SERVICES", value_delimiter = ',', value_parser = parse_alias)]
    pub dns_services: Vec<(String, String)>,

    /// DNS registry: names are re-resolved when their records' TTL runs
    /// out, but never sooner than this…
    #[arg(long, env = "LB_DNS_MIN_TTL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub dns_min_ttl: Duration,

    /// …and never later than this.
    #[arg(long, env = "LB_DNS_MAX_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub dns_max_ttl: Duration,

    /// ZooKeeper registry: session timeout asked of the ensemble.
    #[arg(long, env = "LB_ZK_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub zk_session_timeout: Duration,

    /// Consul registry: file holding the ACL token (or the token itself in
    /// LB_CONSUL_TOKEN).
    #[arg(long, env = "LB_CONSUL_TOKEN_FILE")]
    pub consul_token_file: Option<std::path::PathBuf>,

    /// The Consul ACL token itself, from the `LB_CONSUL_TOKEN` environment
    /// variable only (never a flag).
    #[arg(skip)]
    pub consul_token: Option<String>,

    /// Consul registry over HTTPS (`consul+https://`): trust this CA (PEM).
    #[arg(long, env = "LB_CONSUL_CA")]
    pub consul_ca: Option<std::path::PathBuf>,

    /// Client certificate (PEM) for a Consul agent that verifies clients.
    #[arg(long, env = "LB_CONSUL_CERT", requires_all = ["consul_key", "consul_ca"])]
    pub consul_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of --consul-cert.
    #[arg(long, env = "LB_CONSUL_KEY", requires = "consul_cert")]
    pub consul_key: Option<std::path::PathBuf>,

    /// Consul registry: how long one blocking query may wait for a change.
    #[arg(long, env = "LB_CONSUL_WAIT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub consul_wait: Duration,

    /// Kubernetes registry: the name of the gRPC port in the services'
    /// EndpointSlices (default: their only port).
    #[arg(long, env = "LB_K8S_PORT", default_value = "")]
    pub k8s_port: String,

    /// Key prefix of service instances in etcd: keys are
    /// `<prefix><service>/<instance>`.
    #[arg(long, env = "LB_ETCD_PREFIX", default_value = "/services/")]
    pub etcd_prefix: String,

    /// Embedded registry: most live registrations.
    #[arg(long, env = "LB_MAX_REGISTRATIONS", default_value_t = 10_000)]
    pub max_registrations: usize,

    /// Embedded registry: file holding the bearer token that registration
    /// calls must carry (`authorization: Bearer …` metadata). Without it
    /// (or LB_REGISTRATION_TOKEN), anyone reaching the gRPC port may
    /// register.
    #[arg(long, env = "LB_REGISTRATION_TOKEN_FILE")]
    pub registration_token_file: Option<std::path::PathBuf>,

    /// The registration token itself, from the `LB_REGISTRATION_TOKEN`
    /// environment variable (never a flag).
    #[arg(skip)]
    pub registration_token: Option<String>,

    /// Lease time to live given to embedded registrations that ask for none.
    #[arg(long, env = "LB_DEFAULT_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub default_ttl: Duration,

    /// Talk to etcd over TLS, trusting this CA (PEM).
    #[arg(long, env = "LB_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,

    /// Client certificate (PEM) for etcd's client-cert authentication.
    #[arg(long, env = "LB_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "LB_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,

    /// etcd user name (etcd authentication); the password comes from
    /// --etcd-password-file or LB_ETCD_PASSWORD.
    #[arg(long, env = "LB_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password.
    #[arg(long, env = "LB_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<std::path::PathBuf>,

    /// The etcd password itself, from the `LB_ETCD_PASSWORD` environment
    /// variable only (never a flag).
    #[arg(skip)]
    pub etcd_password: Option<String>,
}

/// Caps on what registries may put in the catalog.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Catalog [catalog]")]
pub struct CatalogFlags {
    /// Most services the LB tracks; registry entries of further services
    /// are rejected (reason `limit`).
    #[arg(long, env = "LB_MAX_SERVICES", default_value_t = 10_000)]
    pub max_services: usize,

    /// Most backends one service may have; further registry entries are
    /// rejected (reason `limit`).
    #[arg(long, env = "LB_MAX_BACKENDS_PER_SERVICE", default_value_t = 10_000)]
    pub max_backends_per_service: usize,

    /// A service without backends that no stream watches is forgotten after
    /// this long, so that `--max-services` caps the services known at once,
    /// not all those ever seen (0 = services are never forgotten). Until
    /// then its clients are told "no servers" rather than "unknown service".
    #[arg(long, env = "LB_IDLE_SERVICE_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_service_grace: Duration,

    /// A backend its registry drops while it still passes health checks (a
    /// lease that expired because the backend lost the registry, an empty
    /// listing) stays listed this long, counted in
    /// `lb_backends_kept_unregistered`; it leaves at once when its health
    /// is not SERVING (a graceful deregistration says NOT_SERVING first),
    /// and the last healthy backends of a service stay while they pass
    /// (0 = a dropped entry leaves at once).
    #[arg(long, env = "LB_DEREGISTRATION_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub deregistration_grace: Duration,
}

/// How each backend is probed: health checks and ORCA load reports.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Health and load probes [probes]")]
pub struct ProbeFlags {
    /// Actively health-check backends (`grpc.health.v1.Health/Watch`, or
    /// periodic `Check` when Watch is unimplemented).
    #[arg(long, env = "LB_HEALTH_CHECKS", default_value_t = true, action = clap::ArgAction::Set)]
    pub health_checks: bool,

    /// Health service name checked for a service, `service=name` (repeatable /
    /// comma-separated); default empty (the whole server).
    #[arg(long = "health-service", env = "LB_HEALTH_SERVICES", value_delimiter = ',', value_parser = parse_alias)]
    pub health_services: Vec<(String, String)>,

    /// Interval of `Check` calls: the heartbeat beside each `Watch` stream
    /// (a hung backend is out within interval + timeout), and the status
    /// poll for backends without `Watch`. Health probes send no HTTP/2 PINGs:
    /// stock gRPC servers allow one per 5 minutes.
    #[arg(long, env = "LB_HEALTH_CHECK_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,

    /// Limit for connecting to a backend and for each health answer; a
    /// heartbeat left unanswered this long marks the backend unreachable.
    #[arg(long, env = "LB_HEALTH_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Reconnect attempts per second, all health probes together (0: no
    /// limit). A backend's first check is never held back; in a zone outage
    /// the dead backends are retried in turn instead of taking every core.
    #[arg(long, env = "LB_PROBE_RECONNECT_RATE", default_value_t = 2000)]
    pub probe_reconnect_rate: u32,

    /// Subscribe to backends' ORCA load reports and weight lists by them.
    #[arg(long, env = "LB_ORCA", default_value_t = true, action = clap::ArgAction::Set)]
    pub orca: bool,

    /// ORCA report interval asked of backends.
    #[arg(long, env = "LB_ORCA_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub orca_interval: Duration,

    /// Health-check and load-report backends over TLS, trusting this CA
    /// (PEM). Backends' certificates must name their registered IP address,
    /// or --backend-tls-server-name.
    #[arg(long, env = "LB_BACKEND_TLS_CA")]
    pub backend_tls_ca: Option<std::path::PathBuf>,

    /// Client certificate (PEM) presented to backends that require mutual TLS.
    #[arg(long, env = "LB_BACKEND_TLS_CERT", requires_all = ["backend_tls_key", "backend_tls_ca"])]
    pub backend_tls_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of --backend-tls-cert.
    #[arg(long, env = "LB_BACKEND_TLS_KEY", requires = "backend_tls_cert")]
    pub backend_tls_key: Option<std::path::PathBuf>,

    /// Verify every backend's certificate against this name instead of its
    /// IP address.
    #[arg(long, env = "LB_BACKEND_TLS_SERVER_NAME", requires = "backend_tls_ca")]
    pub backend_tls_server_name: Option<String>,
}

/// How backends become a server list.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "List policy [policy]")]
pub struct PolicyFlags {
    /// Longest server list sent (weights are expressed by repetition and are
    /// scaled down to fit).
    #[arg(long, env = "LB_MAX_LIST_LEN", default_value_t = 256)]
    pub max_list_len: usize,

    /// List backends before their first successful health check.
    #[arg(long, env = "LB_LIST_UNCHECKED", default_value_t = false, action = clap::ArgAction::Set)]
    pub list_unchecked: bool,

    /// How often weights (load, blackout, expiry, slow start) are recomputed.
    #[arg(long, env = "LB_WEIGHT_UPDATE_PERIOD", default_value = "1s", value_parser = humantime::parse_duration)]
    pub weight_update_period: Duration,

    /// A backend's load weight is ignored for this long after it first appears.
    #[arg(long, env = "LB_WEIGHT_BLACKOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub weight_blackout: Duration,

    /// A load report older than this is ignored.
    #[arg(long, env = "LB_WEIGHT_EXPIRY", default_value = "3m", value_parser = humantime::parse_duration)]
    pub weight_expiry: Duration,

    /// Weight penalty of errors (`eps/qps × penalty` is added to utilization).
    #[arg(long, env = "LB_ERROR_PENALTY", default_value_t = 1.0)]
    pub error_penalty: f64,

    /// Window over which a newly healthy backend's weight ramps up (0 = off).
    #[arg(long, env = "LB_SLOW_START", default_value = "0s", value_parser = humantime::parse_duration)]
    pub slow_start: Duration,

    /// Panic mode: when fewer than this fraction of backends are healthy, list
    /// all of them (0 = never).
    #[arg(long, env = "LB_PANIC_THRESHOLD", default_value_t = 0.5)]
    pub panic_threshold: f64,

    /// Largest fraction of a service that one replica's view alone may take
    /// out of the list: backends *silent* to the replica that checks them
    /// (no answer, maybe that replica's path only) and not confirmed by
    /// another replica's witness probe. Beyond it they stay listed, counted
    /// in `lb_backends_held` (at least one may go when above 0; 0: none
    /// without confirmation; 1: no cap).
    #[arg(long, env = "LB_MAX_UNCONFIRMED_REMOVAL", default_value_t = 0.2)]
    pub max_unconfirmed_removal: f64,

    /// Gray failures: eject backends that pass their health checks but
    /// fail clients' calls, judged from every client's pooled outcomes
    /// (LRS reports of `LbChannel` and xDS clients); `false` turns the
    /// detector off (and re-admits everyone).
    #[arg(long, env = "LB_GRAY_EJECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub gray_ejection: bool,

    /// Gray failures: answered calls (decayed over ~90 s) a backend needs
    /// before it is judged.
    #[arg(long, env = "LB_GRAY_MIN_CALLS", default_value_t = 10.0)]
    pub gray_min_calls: f64,

    /// Gray failures: distinct clients that must have seen a backend's
    /// errors (one broken or lying client never ejects).
    #[arg(long, env = "LB_GRAY_MIN_CLIENTS", default_value_t = 3)]
    pub gray_min_clients: usize,

    /// Gray failures: smallest error rate that ejects.
    #[arg(long, env = "LB_GRAY_MIN_ERROR_RATE", default_value_t = 0.02)]
    pub gray_min_error_rate: f64,

    /// Gray failures: a backend's error rate must be this many times its
    /// peers' pooled rate (peers beyond this many times the median, and
    /// beyond the minimum error rate, left out of it).
    #[arg(long, env = "LB_GRAY_ERROR_RATIO", default_value_t = 3.0)]
    pub gray_error_ratio: f64,

    /// Gray failures: evidence needed, in nats (12: a chance of about 6 in
    /// a million that the errors were the peers' noise).
    #[arg(long, env = "LB_GRAY_MIN_SCORE", default_value_t = 12.0)]
    pub gray_min_score: f64,

    /// Gray failures: largest fraction of a service ejected at once (at
    /// least one backend); further suspects stay listed, counted in
    /// `lb_gray_held`.
    #[arg(long, env = "LB_GRAY_MAX_EJECTION", default_value_t = 0.1)]
    pub gray_max_ejection: f64,

    /// Gray failures: length of a first ejection; the n-th lasts n times
    /// this (at most 5 minutes).
    #[arg(long, env = "LB_GRAY_BASE_EJECTION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub gray_base_ejection: Duration,

    /// Gray failures: weight factor of a backend on probation after an
    /// ejection.
    #[arg(long, env = "LB_GRAY_PROBATION_WEIGHT", default_value_t = 0.2)]
    pub gray_probation_weight: f64,

    /// Gray failures: a backend whose mean latency is this many times its
    /// peers' median is de-weighted.
    #[arg(long, env = "LB_GRAY_LATENCY_RATIO", default_value_t = 3.0)]
    pub gray_latency_ratio: f64,

    /// Shed load (drop entries) when every backend's utilization is above
    /// this (off unless set).
    #[arg(long, env = "LB_SHED_UTILIZATION")]
    pub shed_utilization: Option<f64>,

    /// Largest fraction of calls shed.
    #[arg(long, env = "LB_MAX_SHED", default_value_t = 0.5)]
    pub max_shed: f64,
}

/// The gRPC port: names, streams, caps, TLS.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "gRPC port: BalanceLoad and ADS streams [grpc]")]
pub struct GrpcFlags {
    /// Extra names for services, `name=service` (repeatable, or
    /// comma-separated in the env var).
    #[arg(long = "alias", env = "LB_ALIASES", value_delimiter = ',', value_parser = parse_alias)]
    pub aliases: Vec<(String, String)>,

    /// Domain suffixes stripped from requested names, e.g. `.svc.test` maps
    /// `greeter.svc.test:443` to `greeter` (repeatable / comma-separated).
    #[arg(
        long = "domain-suffix",
        env = "LB_DOMAIN_SUFFIXES",
        value_delimiter = ','
    )]
    pub domain_suffixes: Vec<String>,

    /// Interval at which clients are asked to report client stats (0 = never).
    #[arg(long, env = "LB_CLIENT_STATS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub client_stats_interval: Duration,

    /// Interval at which clients are asked to send load reports over LRS
    /// (xDS clients, and `LbChannel`'s per-backend outcomes): the evidence
    /// of the gray-failure detector, so it bounds how fast a failing
    /// backend is seen (0 = LRS off). `LbChannel` skips a report with
    /// nothing in it.
    #[arg(long, env = "LB_LOAD_REPORT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub load_report_interval: Duration,

    /// A BalanceLoad stream that sends no initial request within this time is
    /// closed.
    #[arg(long, env = "LB_INITIAL_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub initial_request_timeout: Duration,

    /// Most BalanceLoad streams open at once, all clients together; more
    /// are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LB_MAX_STREAMS", default_value_t = 100_000)]
    pub max_streams: usize,

    /// Most BalanceLoad streams open at once from one client IP address.
    #[arg(long, env = "LB_MAX_STREAMS_PER_PEER", default_value_t = 10_000)]
    pub max_streams_per_peer: usize,

    /// Most concurrent HTTP/2 streams on one connection (advertised to
    /// clients as SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "LB_MAX_STREAMS_PER_CONNECTION", default_value_t = 1_000)]
    pub max_streams_per_connection: u32,

    /// Most connections open at once on the gRPC port; more are closed at
    /// accept.
    #[arg(long, env = "LB_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,

    /// Most connections open at once on the gRPC port from one IP address.
    #[arg(long, env = "LB_MAX_CONNECTIONS_PER_PEER", default_value_t = 10_000)]
    pub max_connections_per_peer: usize,

    /// Largest gRPC message accepted on the gRPC port, in bytes (an initial
    /// request is < 300 bytes; client stats grow with drop tokens).
    #[arg(long, env = "LB_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    pub max_message_size: usize,

    /// Most client-stats reports one stream may send per second (bursts of
    /// twice that pass); a faster stream is closed with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LB_CLIENT_STATS_MAX_RATE", default_value_t = 10.0)]
    pub client_stats_max_rate: f64,

    /// Shortest heartbeat interval granted to a BalanceLoad stream that asks
    /// for one (`lb-heartbeat-ms` metadata, which `LbChannel` sends): a
    /// repeated `initial_response` after this long without a message, so
    /// that the client knows the LB alive without PINGs. Each heartbeat
    /// costs one small write: at most one per stream per this interval.
    /// 0 = no heartbeats.
    #[arg(long, env = "LB_HEARTBEAT_MIN", default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_min: Duration,

    /// Most resource names one ADS stream may subscribe to in one request
    /// (all types together); a request naming more closes the stream with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "LB_XDS_MAX_RESOURCE_NAMES", default_value_t = 10_000)]
    pub xds_max_resource_names: usize,

    /// xDS clients retry a call that failed UNAVAILABLE (its backend died
    /// or its connection broke mid-call) this many times on another backend
    /// (the routes' `retry_policy`; 0 = never, for services whose calls must
    /// not run twice).
    #[arg(long, env = "LB_XDS_RETRIES", default_value_t = 1)]
    pub xds_retries: u32,

    /// Clusters carry `outlier_detection` (gRFC A50 as gRPC documents it:
    /// success-rate ejection with its defaults, and failure-percentage
    /// ejection at 50 %), so that xDS clients run their own per-client
    /// detection. Off by default: the LB's pooled detection
    /// (`--gray-ejection`) sees every client's calls; this is for
    /// comparing the two (`lb-bench gray`).
    #[arg(long, env = "LB_XDS_OUTLIER_DETECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub xds_outlier_detection: bool,

    /// Most xDS requests (ADS) or load reports (LRS) one stream may send per
    /// second (bursts of twice that pass); a faster stream is closed with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "LB_XDS_REQUEST_MAX_RATE", default_value_t = 100.0)]
    pub xds_request_max_rate: f64,

    /// On shutdown, streams are closed spread over this window so that their
    /// clients do not reconnect to the other replicas all at once.
    #[arg(long, env = "LB_SHUTDOWN_SPREAD", default_value = "1s", value_parser = humantime::parse_duration)]
    pub shutdown_spread: Duration,

    /// Give each client a subset of this many backends (0 = every backend).
    /// Subsets are balanced across the clients of a replica and change
    /// minimally when backends come and go.
    #[arg(long, env = "LB_SUBSET_SIZE", default_value_t = 0)]
    pub subset_size: usize,

    /// Serve the gRPC port (BalanceLoad, registration API) over TLS with
    /// this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "LB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "LB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Require clients of the gRPC port to present a certificate signed by
    /// this CA (PEM): mutual TLS.
    #[arg(long, env = "LB_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

/// The admin HTTP port: caps, token, TLS.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Admin port [admin]")]
pub struct AdminFlags {
    /// Most connections open at once on the admin port.
    #[arg(long, env = "LB_ADMIN_MAX_CONNECTIONS", default_value_t = 256)]
    pub admin_max_connections: usize,

    /// Most connections open at once on the admin port from one IP address.
    #[arg(long, env = "LB_ADMIN_MAX_CONNECTIONS_PER_PEER", default_value_t = 64)]
    pub admin_max_connections_per_peer: usize,

    /// File holding the bearer token that admin mutations (drain, weight
    /// override) require. Without a token, mutations are disabled.
    #[arg(long, env = "LB_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,

    /// The admin token itself. Not a flag: a command line is visible to
    /// every local user, so it is read from the `LB_ADMIN_TOKEN` environment
    /// variable only (when `--admin-token-file` is not given).
    #[arg(skip)]
    pub admin_token: Option<String>,

    /// Serve the admin port over TLS (HTTPS, HTTP/2 or HTTP/1.1) with this
    /// certificate chain (PEM); needs --admin-tls-key.
    #[arg(long, env = "LB_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of --admin-tls-cert.
    #[arg(long, env = "LB_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<std::path::PathBuf>,

    /// Require clients of the admin port (operators, Prometheus) to present
    /// a certificate signed by this CA (PEM).
    #[arg(long, env = "LB_ADMIN_TLS_CLIENT_CA", requires = "admin_tls_cert")]
    pub admin_tls_client_ca: Option<std::path::PathBuf>,
}

/// Replicas sharing health checks through etcd.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Replicas [cluster]")]
pub struct ClusterFlags {
    /// With an etcd registry: share health checking with the other replicas
    /// over the same etcd (each backend is checked by one replica and the
    /// results are published), instead of every replica checking everything.
    #[arg(long, env = "LB_CLUSTER", default_value_t = true, action = clap::ArgAction::Set)]
    pub cluster: bool,

    /// Key prefix of the replicas' own keys in etcd (membership, shared
    /// health results).
    #[arg(long, env = "LB_CLUSTER_PREFIX", default_value = "/lb-cluster/")]
    pub cluster_prefix: String,

    /// This replica's id in the cluster; default `<hostname>:<lb port>`.
    /// A restarted replica keeping its id takes its backends back at once.
    #[arg(long, env = "LB_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Lease time to live of a replica's membership: how long a dead
    /// replica's backends go unchecked before the others take them over.
    /// Keep-alives go every third of it; on a lossy link to etcd (30 % loss,
    /// 400 ms round trips) a TCP retransmission backoff can hold them for
    /// seconds, and a lease lost there makes the replica degraded, so it
    /// is not much shorter than 10 s.
    #[arg(long, env = "LB_REPLICA_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub replica_ttl: Duration,
}

/// The in-memory history the dashboard draws
/// (`/api/v1/services/{name}/history`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "History [history]")]
pub struct HistoryFlags {
    /// Time between samples of each service and backend.
    #[arg(long, env = "LB_HISTORY_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub history_interval: Duration,

    /// How far back samples go.
    #[arg(long, env = "LB_HISTORY_WINDOW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub history_window: Duration,

    /// Events (health changes, registrations, drains, lists) kept per service.
    #[arg(long, env = "LB_HISTORY_EVENTS", default_value_t = 256)]
    pub history_events: usize,

    /// Services with history (the first ones seen); others have none.
    #[arg(long, env = "LB_HISTORY_MAX_SERVICES", default_value_t = 500)]
    pub history_max_services: usize,

    /// Backends with series, all services together. With the defaults the
    /// history takes at most about 40 MB.
    #[arg(long, env = "LB_HISTORY_MAX_BACKENDS", default_value_t = 5000)]
    pub history_max_backends: usize,
}

impl HistoryFlags {
    /// The history settings these flags describe, for clients reporting
    /// stats every `stats_interval`.
    pub fn settings(
        &self,
        stats_interval: Duration,
    ) -> anyhow::Result<crate::history::HistorySettings> {
        anyhow::ensure!(
            self.history_interval >= Duration::from_millis(100),
            "--history-interval {:?} is below 100ms",
            self.history_interval
        );
        Ok(crate::history::HistorySettings {
            interval: self.history_interval,
            window: self.history_window.max(self.history_interval),
            events: self.history_events.max(1),
            max_services: self.history_max_services,
            max_backends: self.history_max_backends,
            rate_window: (2 * stats_interval).max(self.history_interval),
        })
    }
}

impl Config {
    /// Defaults of every flag, with the given listen addresses: handy for
    /// embedding the LB in a program or a test. The process environment is
    /// not read (stray `LB_*` variables do not leak into an embedded LB).
    pub fn with_addrs(listen: SocketAddr, admin_listen: SocketAddr) -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let command = Config::command().mut_args(|a| a.env(None));
        let matches = command.get_matches_from(["lb-server"]);
        let mut cfg = Config::from_arg_matches(&matches).expect("the defaults parse");
        cfg.listen = listen;
        cfg.admin_listen = admin_listen;
        cfg
    }

    /// Fills the secrets that are never flags (a command line is visible to
    /// every local user) from `lookup`, which the binary's `main` points at
    /// the process environment: `LB_ADMIN_TOKEN`, `LB_REGISTRATION_TOKEN`,
    /// `LB_CONSUL_TOKEN`, `LB_ETCD_PASSWORD`.
    pub fn with_secrets(mut self, lookup: impl Fn(&str) -> Option<String>) -> Self {
        self.admin.admin_token = lookup("LB_ADMIN_TOKEN");
        self.registry.registration_token = lookup("LB_REGISTRATION_TOKEN");
        self.registry.consul_token = lookup("LB_CONSUL_TOKEN");
        self.registry.etcd_password = lookup("LB_ETCD_PASSWORD");
        self
    }
}

impl RegistryFlags {
    /// The registration token, from `--registration-token-file` or
    /// `LB_REGISTRATION_TOKEN`; `None` leaves the embedded registry open.
    pub fn load_registration_token(&self) -> anyhow::Result<Option<String>> {
        load_token(
            "registration",
            "--registration-token-file",
            self.registration_token_file.as_deref(),
            self.registration_token.as_deref(),
        )
    }

    /// TLS towards Consul, when `--consul-ca` is given.
    pub fn consul_tls(&self) -> anyhow::Result<Option<tokio_rustls::rustls::ClientConfig>> {
        self.consul_ca
            .as_deref()
            .map(|ca| {
                crate::net::tls::http_client_config(
                    ["--consul-ca", "--consul-cert", "--consul-key"],
                    ca,
                    self.consul_cert.as_deref().zip(self.consul_key.as_deref()),
                )
            })
            .transpose()
    }

    /// The Consul ACL token, from `--consul-token-file` or `LB_CONSUL_TOKEN`.
    pub fn load_consul_token(&self) -> anyhow::Result<Option<String>> {
        let token = read_secret(
            "--consul-token-file",
            self.consul_token_file.as_deref(),
            self.consul_token.as_deref(),
        )?;
        Ok(token.map(|t| t.trim().to_string()))
    }

    /// The `--registry` values as one line, for logs and messages.
    pub fn registry_line(&self) -> String {
        self.registry.join(" ")
    }

    /// How to reach the etcd cluster at `endpoints`: TLS and credentials
    /// from the `--etcd-…` flags.
    pub fn etcd_access(
        &self,
        endpoints: Vec<String>,
    ) -> anyhow::Result<crate::registry::etcd::EtcdAccess> {
        let tls = crate::net::tls::client_config(
            "--etcd-ca",
            self.etcd_ca.as_deref(),
            self.etcd_cert.as_deref().zip(self.etcd_key.as_deref()),
            None,
        )?;
        let user = match &self.etcd_user {
            None => None,
            Some(user) => {
                let password = read_secret(
                    "--etcd-password-file",
                    self.etcd_password_file.as_deref(),
                    self.etcd_password.as_deref(),
                )?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--etcd-user {user:?} needs a password: --etcd-password-file or LB_ETCD_PASSWORD"
                    )
                })?;
                Some((user.clone(), password))
            }
        };
        Ok(crate::registry::etcd::EtcdAccess::new(endpoints, tls, user))
    }
}

impl PolicyFlags {
    /// The gray-failure detector's settings these flags describe.
    pub fn gray(&self) -> crate::gray::Settings {
        crate::gray::Settings {
            enabled: self.gray_ejection,
            min_calls: self.gray_min_calls.max(1.0),
            min_reporters: self.gray_min_clients.max(1),
            min_error_rate: self.gray_min_error_rate.clamp(0.0, 1.0),
            error_ratio: self.gray_error_ratio.max(1.0),
            min_score: self.gray_min_score.max(0.0),
            max_ejection: self.gray_max_ejection.clamp(0.0, 1.0),
            base_ejection: self.gray_base_ejection.max(Duration::from_secs(1)),
            probation_weight: self.gray_probation_weight.clamp(0.01, 1.0),
            latency_ratio: self.gray_latency_ratio.max(1.0),
        }
    }

    /// The list-building policy these flags describe.
    pub fn policy(&self) -> crate::policy::Policy {
        crate::policy::Policy {
            max_list_len: self.max_list_len.max(1),
            list_unchecked: self.list_unchecked,
            panic_threshold: self.panic_threshold.clamp(0.0, 1.0),
            slow_start: self.slow_start,
            slow_start_min: 0.1,
            weights: crate::policy::WeightSettings {
                blackout: self.weight_blackout,
                expiry: self.weight_expiry,
                error_penalty: self.error_penalty.max(0.0),
            },
            shed_utilization: self.shed_utilization,
            max_shed: self.max_shed.clamp(0.0, 0.95),
            max_unconfirmed_removal: self.max_unconfirmed_removal.clamp(0.0, 1.0),
        }
    }
}

/// Zone-aware lists: where zones come from and how far a zone may be loaded.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Zones [zones]")]
pub struct ZoneFlags {
    /// Give clients of known zone a list that keeps their calls in their
    /// zone as far as its backends' capacity allows (backends' zones come
    /// from `zone`/`region` in their registry metadata).
    #[arg(long, env = "LB_ZONE_AWARE", default_value_t = true, action = clap::ArgAction::Set)]
    pub zone_aware: bool,

    /// How far above its share of the service's capacity a zone may be
    /// loaded by keeping calls local (0.1 = 10 %).
    #[arg(long, env = "LB_ZONE_OVERLOAD_TOLERANCE", default_value_t = 0.1)]
    pub zone_overload_tolerance: f64,

    /// A zone with fewer healthy backends than this keeps none of its
    /// clients' calls: they all go to other zones.
    #[arg(long, env = "LB_ZONE_MIN_HEALTHY", default_value_t = 1)]
    pub zone_min_healthy: usize,

    /// The zone of clients connecting from an address range, for clients
    /// that do not say theirs (stock grpclb clients): `CIDR=ZONE` or
    /// `CIDR=REGION/ZONE` (repeatable / comma-separated; the longest prefix
    /// wins).
    #[arg(long = "client-zone", env = "LB_CLIENT_ZONES", value_delimiter = ',')]
    pub client_zones: Vec<String>,

    /// Most client zones planned for per service. Zones are what clients
    /// say, and each one costs a re-plan of every zone's list: clients of
    /// further zones get the service's own list, as clients of unknown zone
    /// do (counted in `lb_zone_clients_over_cap_total`).
    #[arg(long, env = "LB_ZONE_MAX_CLIENT_ZONES", default_value_t = 256)]
    pub zone_max_client_zones: usize,
}

impl ZoneFlags {
    /// The zone settings these flags describe, with the list length and
    /// client-stats interval they work with.
    pub fn settings(
        &self,
        max_list_len: usize,
        stats_interval: Duration,
    ) -> anyhow::Result<crate::zones::ZoneSettings> {
        anyhow::ensure!(
            (0.0..=10.0).contains(&self.zone_overload_tolerance),
            "--zone-overload-tolerance {} is not between 0 and 10",
            self.zone_overload_tolerance
        );
        Ok(crate::zones::ZoneSettings {
            enabled: self.zone_aware,
            plan: crate::zones::PlanSettings {
                tolerance: self.zone_overload_tolerance,
                min_healthy: self.zone_min_healthy,
            },
            peers: crate::zones::PeerZones::parse(&self.client_zones)?,
            max_list_len: max_list_len.max(1),
            stats_interval,
            max_client_zones: self.zone_max_client_zones,
        })
    }
}

impl AdminFlags {
    /// The admin token, from `--admin-token-file` or `LB_ADMIN_TOKEN`;
    /// `None` disables admin mutations.
    pub fn load_admin_token(&self) -> anyhow::Result<Option<String>> {
        load_token(
            "admin",
            "--admin-token-file",
            self.admin_token_file.as_deref(),
            self.admin_token.as_deref(),
        )
    }
}

impl ClusterFlags {
    /// This replica's cluster id: `--replica-id`, else `<hostname>:<port>`
    /// of the bound gRPC port.
    pub fn id(&self, lb_addr: SocketAddr) -> String {
        if let Some(id) = self.replica_id.as_deref().filter(|s| !s.trim().is_empty()) {
            return id.trim().to_string();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "lb".to_string());
        format!("{host}:{}", lb_addr.port())
    }
}

/// A secret from its file (`flag` names the file's flag in errors) or,
/// without one, the value the environment gave; a file's line end is not
/// part of it.
fn read_secret(
    flag: &str,
    file: Option<&std::path::Path>,
    env_value: Option<&str>,
) -> anyhow::Result<Option<String>> {
    match (file, env_value) {
        (Some(path), _) => Ok(Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        )),
        (None, value) => Ok(value.map(str::to_string)),
    }
}

/// A bearer token (see [`read_secret`]), trimmed; at least 16 characters.
fn load_token(
    what: &str,
    flag: &str,
    file: Option<&std::path::Path>,
    env_value: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let Some(token) = read_secret(flag, file, env_value)? else {
        return Ok(None);
    };
    let token = token.trim().to_string();
    anyhow::ensure!(
        token.len() >= 16,
        "the {what} token must be at least 16 characters"
    );
    Ok(Some(token))
}

fn parse_alias(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, service)) if !name.trim().is_empty() && !service.trim().is_empty() => {
            Ok((name.trim().to_string(), service.trim().to_string()))
        }
        _ => Err(format!("alias {s:?} is not of the form name=service")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_suffixes_parse() {
        let cfg = Config::parse_from([
            "lb-server",
            "--alias",
            "hello=greeter",
            "--domain-suffix",
            ".svc.test,.example",
        ]);
        assert_eq!(cfg.grpc.aliases, vec![("hello".into(), "greeter".into())]);
        assert_eq!(cfg.grpc.domain_suffixes, vec![".svc.test", ".example"]);
        assert_eq!(cfg.grpc.client_stats_interval, Duration::from_secs(10));
    }

    #[test]
    fn bad_alias_is_refused() {
        assert!(Config::try_parse_from(["lb-server", "--alias", "nonsense"]).is_err());
    }

    #[test]
    fn an_embedded_config_ignores_the_environment() {
        // A stray variable of the binary's flags must not reach an LB a
        // program embeds (nor one a test starts).
        std::env::set_var("LB_SUBSET_SIZE", "7");
        let cfg = Config::with_addrs(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        );
        std::env::remove_var("LB_SUBSET_SIZE");
        assert_eq!(cfg.grpc.subset_size, 0);
        assert!(cfg.admin.admin_token.is_none() && cfg.registry.etcd_password.is_none());
        let secret = cfg.with_secrets(|name| (name == "LB_ADMIN_TOKEN").then(|| "t".repeat(20)));
        assert_eq!(
            secret.admin.admin_token.as_deref(),
            Some("t".repeat(20).as_str())
        );
    }
}
