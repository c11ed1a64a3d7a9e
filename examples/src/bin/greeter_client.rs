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
    /// Log filter.
    #[arg(long, default_value = "warn")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    lb_examples::init_logging(&args.log)?;
    let channel = LbChannel::builder(&args.service)
        .lbs(args.lb.clone())
        .fallback_backends(args.fallback.clone())
        .build()?;
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
