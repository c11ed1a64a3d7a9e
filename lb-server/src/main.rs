//! The `lb-server` binary: parses flags, starts [`lb_server::LbServer`],
//! and stops it gracefully on SIGTERM or SIGINT.

use std::time::Duration;

use clap::Parser;
use lb_server::{Config, LbServer};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The one place the process environment is read: clap reads the `LB_*`
    // flag variables, and the secrets that are never flags come after.
    let cfg = Config::parse().with_secrets(|name| std::env::var(name).ok());
    let filter =
        EnvFilter::try_new(&cfg.log).map_err(|e| anyhow::anyhow!("--log {:?}: {e}", cfg.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let server = LbServer::start(cfg.clone()).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    server
        .shutdown(cfg.grpc.shutdown_spread + Duration::from_secs(5))
        .await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
