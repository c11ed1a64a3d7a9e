//! TLS material of the LB, read from PEM files at start-up: its own
//! certificate on the gRPC and admin ports (optionally demanding client
//! certificates), and the CA and identity it presents to backends (health
//! checks, ORCA load reports), to etcd and to Consul. A file that is missing or does not parse
//! stops the LB at start with the flag's name in the error.

use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
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

/// The certificates of a PEM file given with `flag`.
fn certificates(flag: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{flag} {}: no certificate in the file",
        path.display()
    );
    Ok(certs)
}

/// The trust anchors of a CA file given with `flag`.
fn roots(flag: &str, path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(flag, path)? {
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn private_key(flag: &str, path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(&read(flag, path)?)
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// HTTPS server TLS, as on the admin port (HTTP/2 and HTTP/1.1 by ALPN):
/// `cert` and `key`, and with `client_ca` clients must present a
/// certificate it signed. `flags` names the three flags in errors.
pub fn https_acceptor(
    flags: [&str; 3],
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<TlsAcceptor> {
    let [cert_flag, key_flag, ca_flag] = flags;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca_flag, ca)?),
                provider(),
            )
            .build()
            .map_err(|e| anyhow::anyhow!("{ca_flag} {}: {e}", ca.display()))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates(cert_flag, cert)?, private_key(key_flag, key)?)
        .map_err(|e| anyhow::anyhow!("{cert_flag} / {key_flag}: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A rustls client configuration (HTTP/1.1 by ALPN) trusting the CA in
/// `ca`, presenting `identity` when given; `flags` names the CA, certificate
/// and key flags in errors.
pub fn http_client_config(
    flags: [&str; 3],
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let [ca_flag, cert_flag, key_flag] = flags;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_flag, ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates(cert_flag, cert)?, private_key(key_flag, key)?)
            .map_err(|e| anyhow::anyhow!("{cert_flag} / {key_flag}: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client configuration that trusts no one, for HTTP clients that only
/// speak plain HTTP but must be built with a TLS backend.
pub fn trust_nobody() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}
