//! TLS material of the LB, read from PEM files at start-up: its own
//! certificate on the gRPC port (optionally demanding client certificates),
//! and the CA and identity it presents to backends (health checks, ORCA
//! load reports) and to etcd. A file that is missing or does not parse
//! stops the LB at start with the flag's name in the error.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    anyhow::ensure!(
        bytes.windows(11).any(|w| w == b"-----BEGIN "),
        "{flag} {}: not a PEM file",
        path.display()
    );
    Ok(bytes)
}

/// The gRPC port's TLS: `cert` and `key`, and with `client_ca` clients must
/// present a certificate it signed. TLS handshakes longer than
/// `handshake_timeout` are cut off.
pub fn server_config(
    cert_and_key: Option<(&Path, &Path)>,
    client_ca: Option<&Path>,
    handshake_timeout: Duration,
) -> anyhow::Result<Option<ServerTlsConfig>> {
    let Some((cert, key)) = cert_and_key else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?);
    let mut tls = ServerTlsConfig::new()
        .identity(identity)
        .timeout(handshake_timeout);
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?));
    }
    Ok(Some(tls))
}

/// TLS towards a server (backend or etcd), when `ca` is given; `flag`
/// names the CA flag in errors.
pub fn client_config(
    flag: &str,
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> anyhow::Result<Option<ClientTlsConfig>> {
    let Some(ca) = ca else {
        return Ok(None);
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(flag, ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            read("client certificate", cert)?,
            read("client key", key)?,
        ));
    }
    if let Some(name) = server_name {
        tls = tls.domain_name(name);
    }
    Ok(Some(tls))
}
