//! TLS end to end, with certificates made at test time: clients → LB
//! (mutual TLS), LB → backends (health and load over mutual TLS), clients →
//! backends, backends → the embedded registry, and LB and backends → etcd
//! (TLS, client certificates and password authentication). Peers with the
//! wrong CA, or without a client certificate, are refused.

use std::time::Duration;

use lb_client::LbChannel;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::certs::{arg, flags, Pki};
use lb_tests::{call_n, wait_backends, wait_until, Etcd, Greeter, Lb};

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
        assert!(log.contains("etcd unavailable"), "{who}: {log}");
    }
    // A registration without the password is refused too.
    cmd_args.truncate(6);
    let anonymous = Greeter::start(&registry, &cmd_args).await;
    assert!(!anonymous.wait_registered(Duration::from_secs(3)).await);
    assert_eq!(ch.ready_backends().len(), 1);
}
