//! TLS end to end, with certificates made at test time: clients → LB
//! (mutual TLS), LB → backends (health and load over mutual TLS), clients →
//! backends, backends → the embedded registry, and LB and backends → etcd
//! (TLS, client certificates and password authentication), operators →
//! the admin port (HTTPS with client certificates). Peers with the wrong
//! CA, or without a client certificate, are refused.

use std::time::Duration;

use lb_client::LbChannel;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::certs::{arg, flags, Pki};
use lb_tests::{
    admin_tls, call_n, http_get, https_request, wait_backends, wait_until, Etcd, Greeter, Lb,
};

/// Flags making a greeter serve mutual TLS with the test PKI.
fn tls_greeter_args(pki: &Pki) -> Vec<String> {
    flags(&[
        ("--tls-cert", &pki.server_cert),
        ("--tls-key", &pki.server_key),
        ("--tls-client-ca", &pki.ca),
        ("--client-cert", &pki.client_cert),
        ("--client-key", &pki.client_key),
    ])
}

fn builder(lb: &Lb) -> lb_client::LbChannelBuilder {
    LbChannel::builder("greeter")
        .lb(lb.addr.to_string())
        .lb_backoff(Duration::from_millis(100), Duration::from_secs(1))
}

/// Whether one call through `ch` succeeds within 2 s.
async fn call_ok(ch: &LbChannel) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(HelloRequest { name: "tls".into() });
    req.set_timeout(Duration::from_secs(2));
    GreeterClient::new(ch.clone())
        .say_hello(req)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_over_mutual_tls_and_the_wrong_ca_is_refused() {
    let pki = Pki::generate();
    let lb_flags = flags(&[
        ("--tls-cert", &pki.server_cert),
        ("--tls-key", &pki.server_key),
        ("--tls-client-ca", &pki.ca),
        ("--backend-tls-ca", &pki.ca),
        ("--backend-tls-cert", &pki.client_cert),
        ("--backend-tls-key", &pki.client_key),
    ]);
    let lb = Lb::embedded(&lb_flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // Greeters serve mutual TLS and register over mutual TLS.
    let mut args = tls_greeter_args(&pki);
    args.extend(["--lb-ca".to_string(), arg(&pki.ca).to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let greeters = lb_tests::greeters(2, &format!("lb://{}", lb.addr), &args).await;

    // The LB health-checks them over TLS: both are listed.
    let good = builder(&lb)
        .lb_tls(pki.client_tls(&pki.ca, true))
        .backend_tls(pki.client_tls(&pki.ca, true))
        .build()
        .unwrap();
    assert!(
        wait_backends(&good, 2, Duration::from_secs(10)).await,
        "no TLS backends became ready: {}",
        lb.get("/api/v1/services/greeter").1
    );
    let tally = call_n(&good, 40).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    assert_eq!(tally.per_backend.len(), 2, "{:?}", tally.per_backend);
    assert!(greeters
        .iter()
        .all(|g| tally.per_backend.contains_key(&g.addr.to_string())));

    // A client trusting another CA never gets a list.
    let wrong_ca = builder(&lb)
        .lb_tls(pki.client_tls(&pki.other_ca, true))
        .build()
        .unwrap();
    // A client without a certificate is refused by the LB (mutual TLS).
    let anonymous = builder(&lb)
        .lb_tls(pki.client_tls(&pki.ca, false))
        .build()
        .unwrap();
    // A plaintext client gets nowhere either.
    let plaintext = builder(&lb).build().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (who, ch) in [
        ("wrong CA", &wrong_ca),
        ("no client certificate", &anonymous),
        ("plaintext", &plaintext),
    ] {
        assert!(ch.listed_backends().is_empty(), "{who} got a list");
        assert!(ch.current_lb().is_none(), "{who} holds an LB stream");
        assert!(call_ok(ch).await.is_err(), "{who} made a call");
    }

    // Backends called by a client trusting the wrong CA: no call goes out.
    let wrong_backend_ca = builder(&lb)
        .lb_tls(pki.client_tls(&pki.ca, true))
        .backend_tls(pki.client_tls(&pki.other_ca, true))
        .build()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || wrong_backend_ca
            .listed_backends()
            .len()
            == 2)
        .await,
        "the list did not arrive"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(wrong_backend_ca.ready_backends().is_empty());
    assert!(call_ok(&wrong_backend_ca).await.is_err());

    // The good client was never disturbed.
    assert_eq!(call_n(&good, 20).await.failed(), 0);
}

/// An LB that does not trust the backends' CA health-checks none of them
/// successfully, so none is listed; the error names the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_lb_with_the_wrong_backend_ca_lists_no_backend() {
    let pki = Pki::generate();
    let lb = Lb::embedded(&[
        "--backend-tls-ca",
        arg(&pki.other_ca),
        "--panic-threshold",
        "0",
    ])
    .await;
    let args = tls_greeter_args(&pki);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let g = Greeter::start(&format!("lb://{}", lb.addr), &args).await;
    assert!(g.wait_registered(Duration::from_secs(10)).await);
    let unreachable = || {
        let (_, body) = lb.get("/api/v1/services/greeter");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["backends"][0]["health"] == "unreachable" && v["listed"] == 0
    };
    assert!(
        wait_until(Duration::from_secs(5), unreachable).await,
        "{}",
        lb.get("/api/v1/services/greeter").1
    );
    let (_, body) = lb.get("/api/v1/services/greeter");
    assert!(
        body.to_lowercase().contains("certificate") || body.contains("UnknownIssuer"),
        "the health detail should name the certificate problem: {body}"
    );
}

/// etcd over TLS with client certificates and password authentication: the
/// LB lists what a backend registered with the same credentials; an LB with
/// the wrong CA or without the password never becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates_and_passwords() {
    let pki = Pki::generate();
    let mut etcd = Etcd::start_secure(&pki).await;
    etcd.enable_auth("root-password-123").await;
    let password_file = pki.dir().join("etcd-password");
    std::fs::write(&password_file, "root-password-123\n").unwrap();
    let registry = etcd.registry_url();
    let etcd_flags = |ca: &std::path::Path, with_password: bool| {
        let mut f = vec![
            "--registry".to_string(),
            registry.clone(),
            "--etcd-ca".into(),
            arg(ca).into(),
            "--etcd-cert".into(),
            arg(&pki.client_cert).into(),
            "--etcd-key".into(),
            arg(&pki.client_key).into(),
            "--etcd-user".into(),
            "root".into(),
        ];
        if with_password {
            f.extend(["--etcd-password-file".into(), arg(&password_file).into()]);
        }
        f
    };
    let flags = etcd_flags(&pki.ca, true);
    let lb = Lb::start(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(
        wait_until(Duration::from_secs(10), || lb.get("/readyz").0 == 200).await,
        "the LB did not list etcd over TLS"
    );

    // A backend registers over TLS with a password from its environment.
    let mut cmd_args = vec![
        "--etcd-ca",
        arg(&pki.ca),
        "--client-cert",
        arg(&pki.client_cert),
        "--client-key",
        arg(&pki.client_key),
        "--etcd-user",
        "root",
    ];
    let password = [("GREETER_ETCD_PASSWORD", "root-password-123")];
    let g = Greeter::start_with_env("127.0.0.1:0", &registry, &cmd_args, &password).await;
    assert!(
        g.wait_registered(Duration::from_secs(10)).await,
        "greeter did not register over TLS; see {}",
        g.proc.log.display()
    );
    let ch = lb_tests::channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 1, Duration::from_secs(10)).await);
    assert_eq!(call_n(&ch, 10).await.failed(), 0);

    // The wrong CA, or no password: never ready, and the log says why.
    let flags = etcd_flags(&pki.other_ca, true);
    let wrong_ca = Lb::start(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let flags = etcd_flags(&pki.ca, false);
    let no_password = lb_tests::Lb::start(&{
        let mut f: Vec<&str> = flags.iter().map(String::as_str).collect();
        f.retain(|a| *a != "--etcd-user" && *a != "root");
        f
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (who, lb) in [("wrong CA", &wrong_ca), ("no password", &no_password)] {
        assert_eq!(lb.get("/readyz").0, 503, "{who}: ready without access");
        let log = std::fs::read_to_string(&lb.proc.log).unwrap_or_default();
        assert!(
            log.contains("registry source failing; serving the last known state source=\"etcd\""),
            "{who}: {log}"
        );
    }
    // A registration without the password is refused too.
    cmd_args.truncate(6);
    let anonymous = Greeter::start(&registry, &cmd_args).await;
    assert!(!anonymous.wait_registered(Duration::from_secs(3)).await);
    assert_eq!(ch.ready_backends().len(), 1);
}

/// The admin port over mutual TLS: an operator with a certificate from the
/// CA reads and (with the token) mutates; plaintext HTTP, a client trusting
/// another CA and a client without a certificate get no answer, and a TLS
/// handshake that stalls is cut off at the handshake deadline. Every refusal
/// is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_serves_https_to_certificate_holders_only() {
    let pki = Pki::generate();
    let token_file = pki.dir().join("admin-token");
    std::fs::write(&token_file, "admin-token-of-the-tls-test\n").unwrap();
    let mut args: Vec<String> = [
        "--registry",
        "memory",
        "--domain-suffix",
        ".svc.test",
        "--handshake-timeout",
        "1s",
    ]
    .map(String::from)
    .to_vec();
    args.extend(flags(&[
        ("--admin-tls-cert", &pki.server_cert),
        ("--admin-tls-key", &pki.server_key),
        ("--admin-tls-client-ca", &pki.ca),
        ("--admin-token-file", &token_file),
    ]));
    let operator = admin_tls(&pki.client_tls(&pki.ca, true));
    let lb = Lb::start_admin_tls(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        operator.clone(),
    )
    .await;
    let g = Greeter::start(&format!("lb://{}", lb.addr), &[]).await;
    assert!(g.wait_registered(Duration::from_secs(10)).await);
    assert!(
        wait_until(Duration::from_secs(5), || lb
            .knows_backend("greeter", g.addr))
        .await,
        "the greeter is not shown over HTTPS: {}",
        lb.get("/api/v1/services/greeter").1
    );

    // A mutation over HTTPS with the token.
    let drain = format!("/api/v1/services/greeter/backends/{}/drain", g.addr);
    let (status, body) = lb
        .try_request(
            "POST",
            &drain,
            &[("Authorization", "Bearer admin-token-of-the-tls-test")],
            b"",
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(lb.backends("greeter").iter().any(|b| b["drained"] == true));

    // Strangers get no HTTP answer at all.
    let plaintext = http_get(lb.admin, "/healthz");
    assert!(
        !matches!(&plaintext, Ok((code, _)) if *code != 0),
        "plaintext HTTP was answered: {plaintext:?}"
    );
    let wrong_ca = admin_tls(&pki.client_tls(&pki.other_ca, true));
    let anonymous = admin_tls(&pki.client_tls(&pki.ca, false));
    for (who, tls) in [("wrong CA", &wrong_ca), ("no certificate", &anonymous)] {
        let answer = https_request(lb.admin, tls, "GET", "/healthz", &[], b"");
        assert!(answer.is_err(), "{who} was answered: {answer:?}");
    }

    // A client that starts a TLS hello and stalls is cut off at the 1 s
    // handshake deadline.
    let mut stalled = std::net::TcpStream::connect(lb.admin).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::io::Write::write_all(&mut stalled, &[0x16, 0x03, 0x01]).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = std::io::Read::read(&mut stalled, &mut buf);
    let held = started.elapsed();
    assert!(
        matches!(read, Ok(0) | Err(_)) && held < Duration::from_secs(3),
        "a stalled TLS handshake was held {held:?}: {read:?}"
    );

    let refused = |reason: &str| {
        lb.metric(&format!(
            "lb_connections_refused_total{{port=\"admin\",reason=\"{reason}\"}}"
        ))
    };
    assert!(
        wait_until(Duration::from_secs(2), || refused("tls_handshake") >= 3.0).await,
        "tls_handshake refusals: {}",
        refused("tls_handshake")
    );
    assert!(refused("handshake_timeout") >= 1.0);
    // The operator was never disturbed.
    assert_eq!(lb.get("/healthz").0, 200);
}

/// Trust without a CA file: the system's store (`with_native_roots`, here
/// pointed at the test CA by `SSL_CERT_FILE`, as an operator's would be by
/// the system's CA bundle) lets an `LbChannel` call a TLS backend; Mozilla's
/// compiled-in roots (`with_webpki_roots`) do not trust a private CA, so
/// the same call fails on the certificate; and settings that trust nothing
/// are refused when the channel is built.
#[test]
fn system_roots_trust_what_the_system_trusts_and_webpki_roots_do_not_trust_a_private_ca() {
    let pki = Pki::generate();
    // Read when the TLS settings are built (no test runs beside this one:
    // scripts/test runs them one at a time).
    std::env::set_var("SSL_CERT_FILE", &pki.ca);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let lb = Lb::embedded(&[]).await;
        let args = tls_greeter_args(&pki);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let g = Greeter::start(&format!("lb://{}", lb.addr), &args).await;
        let identity = |tls: lb_client::TlsConfig| {
            tls.identity_pem(
                std::fs::read(&pki.client_cert).unwrap(),
                std::fs::read(&pki.client_key).unwrap(),
            )
        };
        let channel = |tls: lb_client::TlsConfig| {
            LbChannel::builder("greeter")
                .fallback_backends([g.addr])
                .backend_tls(identity(tls))
                .build()
        };
        let native = channel(lb_client::TlsConfig::new().with_native_roots()).expect("channel");
        let mut answered = Err(tonic::Status::unknown("no call yet"));
        for _ in 0..50 {
            answered = call_ok(&native).await;
            if answered.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        answered.expect("a call trusting the system's roots");

        let webpki = channel(lb_client::TlsConfig::new().with_webpki_roots()).expect("channel");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let refused = call_ok(&webpki)
            .await
            .expect_err("a private CA is not Mozilla's");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(
            webpki.ready_backends().is_empty(),
            "no connection to a backend whose CA is not trusted"
        );

        let Err(nothing) = channel(lb_client::TlsConfig::new()) else {
            panic!("settings that trust no CA were accepted");
        };
        assert!(nothing.to_string().contains("CAs to trust"), "{nothing}");
    });
    std::env::remove_var("SSL_CERT_FILE");
}
