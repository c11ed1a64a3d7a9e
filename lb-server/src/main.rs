//! The `lb-server` binary: reads flags, `LB_…` variables and the config
//! file, starts [`lb_server::LbServer`], re-reads the configuration on
//! SIGHUP, and stops gracefully on SIGTERM or SIGINT.

use std::time::Duration;

use lb_server::config::file::{self, Loaded};
use lb_server::config::reload::Reload;
use lb_server::LbServer;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let loaded = load();
    if loaded.config.print_config {
        print!("{}", loaded.settings.to_toml());
        return Ok(());
    }
    let (filter, log_filter) = reload::Layer::new(parse_filter(&loaded.config.log)?);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_writer(std::io::stderr)
                // Colours only on a terminal: log files and collectors get plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();

    let server = LbServer::start(loaded.config.clone()).await?;
    let mut running = loaded;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                if let Some(next) = reload_config(&server, &running, &log_filter) {
                    running = next;
                }
            }
        }
    }
    tracing::info!("shutting down");
    server
        .shutdown(running.config.grpc.shutdown_spread + Duration::from_secs(5))
        .await;
    Ok(())
}

/// The configuration from the command line, the environment and the file;
/// on an error, its message and exit status 2 (clap's own for bad flags).
fn load() -> Loaded {
    // The one place the process environment is read: clap reads the `LB_*`
    // flag variables, and the secrets that are never flags come after.
    match file::load(std::env::args_os(), true) {
        Ok(mut loaded) => {
            loaded.config = loaded.config.with_secrets(|name| std::env::var(name).ok());
            loaded
        }
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_error) => clap_error.exit(),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        },
    }
}

/// The log filter of `--log`. The Kubernetes client's own warnings (a
/// watch body cut by an outage) repeat what the Kubernetes source reports
/// itself, so they are shown only when the filter names `kube`.
fn parse_filter(log: &str) -> anyhow::Result<EnvFilter> {
    let spec = if log.contains("kube") {
        log.to_string()
    } else {
        format!("{log},kube_client=error")
    };
    EnvFilter::try_new(&spec).map_err(|e| anyhow::anyhow!("--log {log:?}: {e}"))
}

/// SIGHUP: reads the configuration again (the same flags and environment,
/// the file as it is now), applies what can change while running, and
/// says what needs a restart. A configuration that does not load is
/// reported and the running one kept. Returns what now runs: `running`'s
/// configuration (only start-time settings are read from it) and settings
/// updated with what was applied.
fn reload_config(
    server: &LbServer,
    running: &Loaded,
    log_filter: &reload::Handle<EnvFilter, Registry>,
) -> Option<Loaded> {
    let next = match file::load(std::env::args_os(), true) {
        Ok(next) => next,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: configuration not reloaded; the running one is kept");
            return None;
        }
    };
    let reload = Reload::between(&running.settings, &next.settings);
    if reload.applies("log") {
        match parse_filter(&next.config.log) {
            Ok(filter) => {
                if let Err(e) = log_filter.reload(filter) {
                    tracing::error!(error = %e, "SIGHUP: log filter not replaced");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: configuration not reloaded; the running one is kept");
                return None;
            }
        }
    }
    server.reload(&next.config, &reload);
    tracing::info!(
        applied = ?reload.apply,
        needs_restart = ?reload.restart,
        "SIGHUP: configuration reloaded"
    );
    if !reload.restart.is_empty() {
        tracing::warn!(flags = ?reload.restart, "SIGHUP: these settings changed but take effect only after a restart");
    }
    // What needs a restart stays as it runs: the next reload compares
    // against what is running, not against what was asked for.
    Some(Loaded {
        config: running.config.clone(),
        settings: running
            .settings
            .with_values_of(&next.settings, &reload.apply),
    })
}
