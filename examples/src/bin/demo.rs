//! `demo`: the whole product in one command, no etcd needed.
//!
//! Starts an LB with its embedded registry, three greeter backends that
//! register themselves, and a thin client; prints where calls go, stops one
//! backend gracefully while calls run (none fail), and adds a new one.

use std::time::Duration;

use clap::Parser;
use lb_client::{LbChannel, Registration, RegistrationOptions};
use lb_examples::drive::drive;
use lb_examples::greeter::{GreeterOptions, RunningGreeter};
use lb_server::{Config, LbServer};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "demo",
    about = "Runs an LB, three greeters and a client in one process and shows balancing and failover."
)]
struct Args {
    /// Calls per round.
    #[arg(long, default_value_t = 300)]
    calls: u64,
    /// LB gRPC address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// LB admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:0")]
    admin_listen: std::net::SocketAddr,
    /// Keep everything running after the demo (Ctrl-C to stop), to explore
    /// the admin endpoint.
    #[arg(long)]
    hold: bool,
    /// Log filter.
    #[arg(long, default_value = "warn")]
    log: String,
}

async fn greeter(lb: std::net::SocketAddr) -> anyhow::Result<RunningGreeter> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let options = RegistrationOptions {
        ttl: Duration::from_secs(5),
        ..Default::default()
    };
    let g = RunningGreeter::start(listener, GreeterOptions::default(), |addr| {
        Registration::embedded(vec![lb.to_string()], "greeter", &addr.to_string(), options).ok()
    })
    .await?;
    anyhow::ensure!(
        g.wait_registered(Duration::from_secs(5)).await,
        "greeter {} did not register",
        g.addr
    );
    Ok(g)
}

async fn wait_for_backends(channel: &LbChannel, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while channel.ready_backends().len() != n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    lb_examples::init_logging(&args.log)?;
    let timeout = Duration::from_secs(5);

    let lb = LbServer::start(Config::with_addrs(args.listen, args.admin_listen)).await?;
    println!(
        "LB (embedded registry) on {}; admin on http://{}/api/v1/services",
        lb.lb_addr, lb.admin_addr
    );

    let mut greeters = Vec::new();
    for _ in 0..3 {
        greeters.push(greeter(lb.lb_addr).await?);
    }
    println!(
        "3 greeters registered: {}",
        greeters
            .iter()
            .map(|g| g.addr.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let channel = LbChannel::builder("greeter")
        .lb(lb.lb_addr.to_string())
        .build()?;
    wait_for_backends(&channel, 3).await;

    println!("\n1) {} calls over three backends:", args.calls);
    let tally = drive(&channel, args.calls, 8, timeout).await;
    print!("{}", tally.table());

    let leaving = greeters.remove(1);
    println!("\n2) calls in batches of 30 while {} shuts down gracefully (NOT_SERVING, deregister, drain):", leaving.addr);
    let stop = tokio::spawn(leaving.shutdown(Duration::from_millis(500)));
    let mut tally = lb_examples::drive::Tally::default();
    while !stop.is_finished() {
        tally.merge(drive(&channel, 30, 8, timeout).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.await?;
    print!("{}", tally.table());
    println!("   failed calls: {}", tally.failed());

    println!("\n3) {} calls after it left:", args.calls);
    let tally = drive(&channel, args.calls, 8, timeout).await;
    print!("{}", tally.table());

    let newcomer = greeter(lb.lb_addr).await?;
    println!(
        "\n4) a new greeter {} registers; {} calls:",
        newcomer.addr, args.calls
    );
    greeters.push(newcomer);
    wait_for_backends(&channel, 3).await;
    let tally = drive(&channel, args.calls, 8, timeout).await;
    print!("{}", tally.table());

    if args.hold {
        println!(
            "\nRunning; try: curl http://{}/api/v1/services/greeter   (Ctrl-C to stop)",
            lb.admin_addr
        );
        tokio::signal::ctrl_c().await?;
    }
    for g in greeters {
        g.shutdown(Duration::ZERO).await;
    }
    lb.shutdown(Duration::from_secs(3)).await;
    Ok(())
}
