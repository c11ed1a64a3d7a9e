//! Shared parts of the examples: the greeter backend (with health and
//! graceful, deregister-first shutdown) and a call-counting driver.
//!
//! | item | job |
//! | --- | --- |
//! | [`greeter`] | the greeter backend |
//! | [`drive`] | make N calls through a channel and count where they went |
//! | [`envoy`] | a real Envoy's bootstrap, fed by the LB's xDS |

pub mod drive;
pub mod envoy;
pub mod greeter;

/// Sets up `tracing` logs to stderr with the given filter (EnvFilter syntax).
pub fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("log filter {filter:?}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

/// Client TLS settings trusting the CA at `ca` and presenting the
/// certificate and key at `cert`/`key` when given; `None` without a CA
/// (plaintext).
pub fn client_tls(
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<Option<lb_client::TlsConfig>> {
    let Some(ca) = ca else { return Ok(None) };
    Ok(Some(lb_client::TlsConfig::from_files(Some(ca), cert, key)?))
}
