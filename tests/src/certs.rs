//! Certificates made at test time (rcgen): a CA, a server certificate for
//! `localhost` / 127.0.0.1 signed by it, a client certificate signed by it,
//! and an unrelated CA that trusts nothing of ours. PEM files in a temp dir.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A small PKI on disk.
pub struct Pki {
    dir: tempfile::TempDir,
    /// CA certificate (PEM) that signs the others.
    pub ca: PathBuf,
    /// Server certificate for `localhost` and 127.0.0.1.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Client certificate (CN `test-client`).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A CA that signed none of the above.
    pub other_ca: PathBuf,
    /// A server certificate signed by the other CA.
    pub rogue_cert: PathBuf,
    /// Its key.
    pub rogue_key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert")
}

fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// Generates everything.
    pub fn generate() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, pem: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).expect("write PEM");
            p
        };
        let ca = self::ca("lb test CA");
        let other = self::ca("unrelated CA");
        let (server_cert, server_key) = leaf(&ca, "lb test server");
        let (client_cert, client_key) = leaf(&ca, "test-client");
        let (rogue_cert, rogue_key) = leaf(&other, "rogue server");
        Pki {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
            other_ca: write("other-ca.pem", &other.pem()),
            rogue_cert: write("rogue.pem", &rogue_cert),
            rogue_key: write("rogue-key.pem", &rogue_key),
            dir,
        }
    }

    /// Directory holding the files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Client TLS settings trusting `ca`, with the client certificate when
    /// `with_identity`.
    pub fn client_tls(&self, ca: &std::path::Path, with_identity: bool) -> lb_client::TlsConfig {
        let (cert, key) = if with_identity {
            (
                Some(self.client_cert.as_path()),
                Some(self.client_key.as_path()),
            )
        } else {
            (None, None)
        };
        lb_client::TlsConfig::from_files(Some(ca), cert, key).expect("client TLS settings")
    }
}

impl Pki {
    /// An HTTPS server's TLS with the test server certificate (the LB's own
    /// builder); with `verify_clients`, clients must present a certificate
    /// from the CA.
    pub fn https_acceptor(&self, verify_clients: bool) -> tokio_rustls::TlsAcceptor {
        lb_server::internals::https_acceptor(
            ["server certificate", "server key", "CA"],
            &self.server_cert,
            &self.server_key,
            verify_clients.then_some(self.ca.as_path()),
        )
        .expect("server TLS")
    }
}

/// Flags naming PEM files: `[(flag, path)]` → `[flag, path, …]`.
pub fn flags(pairs: &[(&str, &std::path::Path)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), arg(path).to_string()])
        .collect()
}

/// A path as a command-line argument.
pub fn arg(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
