//! `greeter-server`: an example backend that registers itself.
//!
//! Prints `LISTENING <addr>` once serving and `REGISTERED` once its
//! registration is confirmed. SIGUSR1 flips its health status (printing
//! `HEALTH SERVING` or `HEALTH NOT_SERVING`); it reports load over ORCA and
//! prints `HEALTH_WATCHERS <n>` whenever the number of health `Watch`
//! streams open on it changes. On SIGTERM or SIGINT it shuts down
//! gracefully: NOT_SERVING, deregister, drain, stop.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use lb_client::{Registration, RegistrationOptions};
use lb_examples::greeter::{GreeterOptions, RunningGreeter};

#[derive(Parser, Debug)]
#[command(
    name = "greeter-server",
    about = "Example gRPC backend that registers itself with the load balancer's registry."
)]
struct Args {
    /// Address to serve on (port 0 picks a free one).
    #[arg(long, env = "GREETER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address to register (`host:port`); default: the listen address, or
    /// `<hostname>:<port>` when listening on 0.0.0.0 / `[::]` (the LB resolves
    /// host names).
    #[arg(long, env = "GREETER_ADVERTISE")]
    advertise: Option<String>,
    /// Service name to register under.
    #[arg(long, env = "GREETER_SERVICE", default_value = "greeter")]
    service: String,
    /// Registry: `etcd://host:2379[,…]`, `lb://host:7000` (the LB's embedded
    /// registry), `zk://host:2181[,…]/prefix` (an ephemeral provider znode;
    /// --ttl is the session timeout), `consul[+https]://host:8500` (the agent
    /// API, with a gRPC health check; ACL token from GREETER_REGISTRATION_TOKEN),
    /// or `none`.
    #[arg(long, env = "GREETER_REGISTRY", default_value = "lb://127.0.0.1:7000")]
    registry: String,
    /// etcd key prefix.
    #[arg(long, env = "GREETER_ETCD_PREFIX", default_value = "/services/")]
    etcd_prefix: String,
    /// Registration lease time to live.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Write the plain `host:port` value to etcd instead of naming JSON.
    #[arg(long)]
    plain: bool,
    /// Weight stored in the registration metadata.
    #[arg(long)]
    weight: Option<u32>,
    /// Zone stored in the registration metadata (zone-aware lists).
    #[arg(long)]
    zone: Option<String>,
    /// Region stored in the registration metadata.
    #[arg(long)]
    region: Option<String>,
    /// Time between deregistering and stopping, for clients to move away.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Constant utilization to report over ORCA (simulated, e.g. 0.8; 0 = none).
    #[arg(long, default_value_t = 0.0)]
    utilization: f64,
    /// Simulated capacity in calls/s: report utilization = measured qps / capacity.
    #[arg(long)]
    capacity: Option<f64>,
    /// Extra latency per call (simulates a slow backend).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Serve health `Check` only (`Watch` answers UNIMPLEMENTED).
    #[arg(long)]
    health_check_only: bool,
    /// Serve over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require callers to present a certificate signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Register with the LB's embedded registry over TLS, trusting this CA (PEM).
    #[arg(long)]
    lb_ca: Option<std::path::PathBuf>,
    /// Talk to etcd over TLS, trusting this CA (PEM).
    #[arg(long)]
    etcd_ca: Option<std::path::PathBuf>,
    /// Register with Consul over HTTPS (`consul+https://`), trusting this CA (PEM).
    #[arg(long)]
    consul_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for etcd, Consul, and the LB when it demands one.
    #[arg(long, requires = "client_key")]
    client_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<std::path::PathBuf>,
    /// etcd user name; the password comes from GREETER_ETCD_PASSWORD.
    #[arg(long)]
    etcd_user: Option<String>,
    /// File holding the LB's registration token (embedded registry with
    /// `lb-server --registration-token-file`), or Consul's ACL token; or
    /// GREETER_REGISTRATION_TOKEN.
    #[arg(long, env = "GREETER_REGISTRATION_TOKEN_FILE")]
    registration_token_file: Option<std::path::PathBuf>,
    /// Log filter.
    #[arg(long, env = "GREETER_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    lb_examples::init_logging(&args.log)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let options = RegistrationOptions {
        ttl: args.ttl,
        metadata: metadata(&args),
        plain_value: args.plain,
        etcd_prefix: args.etcd_prefix.clone(),
        lb_tls: client_tls(args.lb_ca.as_deref(), &args)?,
        etcd_tls: client_tls(args.etcd_ca.as_deref(), &args)?,
        consul_tls: client_tls(args.consul_ca.as_deref(), &args)?,
        etcd_user: match &args.etcd_user {
            Some(user) => Some((
                user.clone(),
                std::env::var("GREETER_ETCD_PASSWORD")
                    .map_err(|_| anyhow::anyhow!("--etcd-user needs GREETER_ETCD_PASSWORD"))?,
            )),
            None => None,
        },
        token: match &args.registration_token_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("--registration-token-file {}: {e}", path.display())
            })?),
            None => std::env::var("GREETER_REGISTRATION_TOKEN").ok(),
        },
    };
    let registry = args.registry.clone();
    let service = args.service.clone();
    let advertise = args.advertise.clone();
    let mut registration_error = None;
    let behaviour = GreeterOptions {
        utilization: args.utilization,
        capacity: args.capacity,
        delay: args.delay,
        health_check_only: args.health_check_only,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let identity =
                    tonic::transport::Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?);
                let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &args.tls_client_ca {
                    tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(
                        std::fs::read(ca)?,
                    ));
                }
                Some(tls)
            }
            _ => None,
        },
    };
    let greeter = RunningGreeter::start(listener, behaviour, |addr| {
        if registry == "none" {
            return None;
        }
        let advertised = advertise.unwrap_or_else(|| advertised_addr(addr));
        match Registration::start(&registry, &service, &advertised, options) {
            Ok(r) => Some(r),
            Err(e) => {
                registration_error = Some(e);
                None
            }
        }
    })
    .await?;
    if let Some(e) = registration_error {
        anyhow::bail!("--registry {}: {e}", args.registry);
    }
    say(&format!("LISTENING {}", greeter.addr));
    tracing::info!(addr = %greeter.addr, service = %args.service, registry = %args.registry, "greeter serving");

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    {
        let announce = async {
            if args.registry != "none"
                && greeter
                    .wait_registered(Duration::from_secs(24 * 3600))
                    .await
            {
                say("REGISTERED");
            }
            std::future::pending::<()>().await
        };
        let toggles = async {
            // SIGUSR1 flips the reported health (SERVING <-> NOT_SERVING).
            while usr1.recv().await.is_some() {
                let serving = greeter.toggle_serving().await;
                tracing::info!(serving, "health toggled by SIGUSR1");
                say(if serving {
                    "HEALTH SERVING"
                } else {
                    "HEALTH NOT_SERVING"
                });
            }
        };
        let watchers = async {
            let mut count = greeter.health_watchers();
            while count.changed().await.is_ok() {
                let n = *count.borrow_and_update();
                say(&format!("HEALTH_WATCHERS {n}"));
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = announce => {}
            _ = toggles => {}
            _ = watchers => {}
        }
    }
    tracing::info!(drain = ?args.drain, "shutting down gracefully");
    greeter.shutdown(args.drain).await;
    Ok(())
}

/// Prints a status line for whoever started us; a closed stdout is ignored
/// (a backend must not die because nobody reads its output).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

/// The address to register for a server bound to `addr`.
fn advertised_addr(addr: SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", addr.port())
}

/// Client TLS towards a server trusting `ca`, with the client certificate
/// if one is given.
fn client_tls(
    ca: Option<&std::path::Path>,
    args: &Args,
) -> anyhow::Result<Option<lb_client::TlsConfig>> {
    lb_examples::client_tls(ca, args.client_cert.as_deref(), args.client_key.as_deref())
}

/// The registration metadata: weight, zone and region, those given.
fn metadata(args: &Args) -> Option<serde_json::Value> {
    let mut m = serde_json::Map::new();
    if let Some(w) = args.weight {
        m.insert("weight".into(), w.into());
    }
    if let Some(z) = &args.zone {
        m.insert("zone".into(), z.clone().into());
    }
    if let Some(r) = &args.region {
        m.insert("region".into(), r.clone().into());
    }
    (!m.is_empty()).then_some(serde_json::Value::Object(m))
}
