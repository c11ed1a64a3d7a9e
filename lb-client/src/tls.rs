//! TLS for the connections the client side opens: to LBs (BalanceLoad), to
//! backends (calls), and to the embedded registry or etcd (registration).
//!
//! A [`TlsConfig`] says whom to trust: a CA given as PEM (a private PKI,
//! the common case inside a fleet), Mozilla's roots compiled in
//! ([`TlsConfig::with_webpki_roots`], feature `tls-webpki-roots`), the
//! system's store ([`TlsConfig::with_native_roots`], feature
//! `tls-native-roots`; `SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured),
//! or several of them; nothing is trusted implicitly. Optionally a client
//! certificate and key for servers that demand mutual TLS, and the name to
//! verify servers' certificates against (by default the host as dialled:
//! an IP address for backends, which then need an IP subject alternative
//! name).
//!
//! ```no_run
//! # fn demo() -> Result<(), lb_client::Error> {
//! let tls = lb_client::TlsConfig::from_files(Some("ca.pem".as_ref()), None, None)?;
//! let channel = lb_client::LbChannel::builder("greeter")
//!     .lb("lb.example:7000")
//!     .lb_tls(tls.clone())
//!     .backend_tls(tls)
//!     .build()?;
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::Error;

/// TLS settings of outgoing connections.
#[derive(Clone, Default)]
pub struct TlsConfig {
    ca_pem: Option<Vec<u8>>,
    webpki_roots: bool,
    native_roots: bool,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    server_name: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TlsConfig")
            .field("ca", &self.ca_pem.is_some())
            .field("webpki_roots", &self.webpki_roots)
            .field("native_roots", &self.native_roots)
            .field("client_identity", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl TlsConfig {
    /// Empty settings; give at least a CA with [`TlsConfig::ca_pem`].
    pub fn new() -> Self {
        TlsConfig::default()
    }

    /// The CA certificate(s), PEM, that servers' certificates must chain to.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Also trust Mozilla's root CAs, compiled in (as tonic's
    /// `ClientTlsConfig::with_webpki_roots`).
    #[cfg(feature = "tls-webpki-roots")]
    pub fn with_webpki_roots(mut self) -> Self {
        self.webpki_roots = true;
        self
    }

    /// Also trust the system's root CAs, read when the connection settings
    /// are built (as tonic's `ClientTlsConfig::with_native_roots`;
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR` override the system's paths).
    #[cfg(feature = "tls-native-roots")]
    pub fn with_native_roots(mut self) -> Self {
        self.native_roots = true;
        self
    }

    /// A client certificate chain and its private key, PEM, presented to
    /// servers that require mutual TLS.
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Verify every server's certificate against this name instead of the
    /// host dialled.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The name set with [`TlsConfig::server_name`], if any.
    pub(crate) fn server_name_override(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Settings read from PEM files: a CA, and optionally a client
    /// certificate with its key (both or neither).
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, Error> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())));
        let mut tls = TlsConfig::new();
        if let Some(ca) = ca {
            tls = tls.ca_pem(read(ca)?);
        }
        match (cert, key) {
            (Some(c), Some(k)) => tls = tls.identity_pem(read(c)?, read(k)?),
            (None, None) => {}
            _ => {
                return Err(Error::Config(
                    "a client certificate needs its key, and a key its certificate".into(),
                ))
            }
        }
        tls.check()?;
        Ok(tls)
    }

    /// Checks that the PEM parses and a CA is given.
    pub fn check(&self) -> Result<(), Error> {
        self.rustls().map(|_| ())
    }

    /// The same settings for tonic channels (LB streams, registration,
    /// etcd). Not part of the API (it ties this crate to tonic's TLS types).
    #[doc(hidden)]
    pub fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        #[cfg(feature = "tls-webpki-roots")]
        if self.webpki_roots {
            tls = tls.with_webpki_roots();
        }
        #[cfg(feature = "tls-native-roots")]
        if self.native_roots {
            tls = tls.with_native_roots();
        }
        if let Some(ca) = &self.ca_pem {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        tls
    }

    /// The same settings for raw rustls connections (backend calls), with
    /// ALPN `h2`. Not part of the API (it ties this crate to rustls).
    #[doc(hidden)]
    pub fn rustls(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let bad = |what: &str, e: &dyn std::fmt::Display| Error::Config(format!("TLS {what}: {e}"));
        if self.ca_pem.is_none() && !self.webpki_roots && !self.native_roots {
            return Err(Error::Config(
                "TLS needs CAs to trust: a CA certificate (ca_pem), or the webpki or native roots"
                    .into(),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.ca_pem {
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| bad("CA certificate", &e))?;
                roots.add(cert).map_err(|e| bad("CA certificate", &e))?;
            }
            if roots.is_empty() {
                return Err(Error::Config("TLS CA: no certificate in the PEM".into()));
            }
        }
        #[cfg(feature = "tls-webpki-roots")]
        if self.webpki_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        #[cfg(feature = "tls-native-roots")]
        if self.native_roots {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "a system root certificate could not be read");
            }
            roots.add_parsable_certificates(found.certs);
        }
        if roots.is_empty() {
            return Err(Error::Config(
                "TLS: no CA to trust (the system's store is empty)".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("client certificate", &e))?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("client key", &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad("client certificate", &e))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The name to verify a server dialled at `host` against.
    pub(crate) fn name_for(&self, host: &str) -> Result<ServerName<'static>, Error> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_string())
            .map_err(|e| Error::Config(format!("TLS server name {name:?}: {e}")))
    }
}
