//! `greeter-client`: calls the greeter through the load balancer and prints
//! how many calls each backend answered.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use lb_client::LbChannel;
use lb_examples::drive::drive;

#[derive(Parser, Debug)]
#[command(
    name = "greeter-client",
    about = "Calls the greeter through the lookaside load balancer."
)]
struct Args {
    /// LB address(es), comma-separated.
    #[arg(
        long,
        env = "GREETER_LB",
        default_value = "127.0.0.1:7000",
        value_delimiter = ','
    )]
    lb: Vec<String>,
    /// Service name asked of the LB.
    #[arg(long, default_value = "greeter")]
    service: String,
    /// Number of calls.
    #[arg(long, default_value_t = 300)]
    calls: u64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Per-call deadline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Backends to use when no LB answers (comma-separated).
    #[arg(long, value_delimiter = ',')]
    fallback: Vec<SocketAddr>,
    /// Talk to the LB over TLS, trusting this CA (PEM).
    #[arg(long)]
    lb_ca: Option<std::path::PathBuf>,
    /// Call backends over TLS, trusting this CA (PEM).
    #[arg(long)]
    backend_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for servers demanding mutual TLS.
    #[arg(long, requires = "client_key")]
    client_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<std::path::PathBuf>,
    /// Log filter.
    #[arg(long, default_value = "warn")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    lb_examples::init_logging(&args.log)?;
    let tls = |ca: &Option<std::path::PathBuf>| {
        lb_examples::client_tls(
            ca.as_deref(),
            args.client_cert.as_deref(),
            args.client_key.as_deref(),
        )
    };
    let mut builder = LbChannel::builder(&args.service)
        .lbs(args.lb.clone())
        .fallback_backends(args.fallback.clone());
    if let Some(t) = tls(&args.lb_ca)? {
        builder = builder.lb_tls(t);
    }
    if let Some(t) = tls(&args.backend_ca)? {
        builder = builder.backend_tls(t);
    }
    let channel = builder.build()?;
    let tally = drive(&channel, args.calls, args.concurrency, args.timeout).await;
    println!(
        "{} calls to {:?}: {} ok, {} failed",
        args.calls,
        args.service,
        tally.ok(),
        tally.failed()
    );
    print!("{}", tally.table());
    if tally.failed() > 0 {
        std::process::exit(1);
    }
    Ok(())
}
