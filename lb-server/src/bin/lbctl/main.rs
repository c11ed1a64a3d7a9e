//! `lbctl`: the operator's command line over an LB replica's admin API.
//!
//! ```text
//! lbctl --admin http://lb-0:7001 services
//! lbctl service greeter            # backends: health, weight, share, why
//! lbctl clients | lbctl cluster
//! lbctl drain greeter 10.0.0.7:50051 && lbctl undrain greeter 10.0.0.7:50051
//! lbctl weight greeter 10.0.0.7:50051 5 --ttl 10m
//! ```
//!
//! Tables by default, the API's JSON with `--json`. Mutations carry the
//! admin token, read as the server reads it: `--token-file` /
//! `LB_ADMIN_TOKEN_FILE`, or `LB_ADMIN_TOKEN` (never a flag: a command line
//! is visible to every local user).
//!
//! | module | job |
//! | --- | --- |
//! | `admin` | the HTTP client: requests, the token, API errors |
//! | `tables` | JSON answers → aligned text tables |

mod admin;
mod tables;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Command line of `lbctl`.
#[derive(Debug, Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Query and steer an lb-server replica through its admin API."
)]
struct Cli {
    /// The replica's admin endpoint.
    #[arg(
        long,
        env = "LBCTL_ADMIN",
        default_value = "http://127.0.0.1:7001",
        global = true
    )]
    admin: String,

    /// File holding the admin token (mutations); else `LB_ADMIN_TOKEN`.
    #[arg(long, env = "LB_ADMIN_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,

    /// Trust this CA (PEM) for an `https://` admin endpoint.
    #[arg(long, env = "LBCTL_CA", global = true)]
    ca: Option<PathBuf>,

    /// Client certificate (PEM) for an admin port that verifies clients.
    #[arg(long, env = "LBCTL_CERT", requires = "key", global = true)]
    cert: Option<PathBuf>,

    /// Private key (PEM) of --cert.
    #[arg(long, env = "LBCTL_KEY", requires = "cert", global = true)]
    key: Option<PathBuf>,

    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,

    /// Give up on a request after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every service: backends, healthy, listed, list version, clients.
    Services,
    /// One service: each backend's health, weight, list share and why.
    Service {
        /// The service name.
        name: String,
    },
    /// Connected clients: grpclb streams and xDS (ADS) streams.
    Clients,
    /// The replicas of this LB's cluster and this one's view of it.
    Cluster,
    /// Take a backend out of lists (it stays registered and checked).
    Drain {
        /// The service.
        service: String,
        /// The backend, `ip:port`.
        addr: String,
    },
    /// Put a drained backend back.
    Undrain {
        /// The service.
        service: String,
        /// The backend, `ip:port`.
        addr: String,
    },
    /// Override a backend's weight for a while, or clear the override.
    Weight {
        /// The service.
        service: String,
        /// The backend, `ip:port`.
        addr: String,
        /// The weight, 1 to 10000 (drain takes a backend out); omit with --clear.
        #[arg(required_unless_present = "clear")]
        weight: Option<u32>,
        /// How long the override lasts.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Remove the override.
        #[arg(long, conflicts_with = "weight")]
        clear: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    // The one TLS implementation the LB itself uses (ring), for https://.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    if let Err(e) = run(cli).await {
        eprintln!("lbctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let token = admin::token(
        cli.token_file.as_deref(),
        std::env::var("LB_ADMIN_TOKEN").ok(),
    )?;
    let tls = admin::Tls {
        ca: cli.ca.clone(),
        identity: cli.cert.clone().zip(cli.key.clone()),
    };
    let api = admin::Admin::new(&cli.admin, token, &tls, cli.timeout)?;
    let path = |service: &str, addr: &str, action: &str| {
        format!(
            "/api/v1/services/{}/backends/{}/{action}",
            admin::segment(service),
            admin::segment(addr)
        )
    };
    let (answer, table): (serde_json::Value, fn(&serde_json::Value) -> String) = match &cli.command
    {
        Command::Services => (api.get("/api/v1/services").await?, tables::services),
        Command::Service { name } => (
            api.get(&format!("/api/v1/services/{}", admin::segment(name)))
                .await?,
            tables::service,
        ),
        Command::Clients => (api.get("/api/v1/clients").await?, tables::clients),
        Command::Cluster => (api.get("/api/v1/cluster").await?, tables::cluster),
        Command::Drain { service, addr } => (
            api.send("POST", &path(service, addr, "drain"), None)
                .await?,
            tables::mutation,
        ),
        Command::Undrain { service, addr } => (
            api.send("POST", &path(service, addr, "undrain"), None)
                .await?,
            tables::mutation,
        ),
        Command::Weight {
            service,
            addr,
            clear: true,
            ..
        } => (
            api.send("DELETE", &path(service, addr, "weight"), None)
                .await?,
            tables::mutation,
        ),
        Command::Weight {
            service,
            addr,
            weight,
            ttl,
            ..
        } => {
            let body = serde_json::json!({ "weight": weight, "ttl_seconds": ttl.as_secs().max(1) });
            (
                api.send("PUT", &path(service, addr, "weight"), Some(body))
                    .await?,
                tables::mutation,
            )
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", table(&answer));
    }
    Ok(())
}
