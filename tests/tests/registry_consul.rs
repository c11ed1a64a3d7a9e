//! The Consul registry source. No Consul agent can be installed on this
//! machine, so these tests run against `lb_tests::consul::FakeConsul`, an
//! HTTP server that answers as Consul's API documentation describes
//! (blocking queries, `X-Consul-Index`, `?passing`, ACL tokens): verified
//! against the documented API, not a live agent.
//!
//! Covered: initial listing, additions, removals, failing checks, 5xx
//! answers, an index that goes backwards, an outage (last known list kept,
//! zero failed calls), recovery, malformed answers and entries, the ACL
//! token, backends registering themselves through the agent API, and HTTPS
//! with client certificates.

use std::time::{Duration, Instant};

use lb_tests::certs::{flags, Pki};
use lb_tests::consul::{ConsulInstance, FakeConsul};
use lb_tests::{channel, listed, listed_and_calling, wait_listed, wait_until, Greeter, Lb};

const TOKEN: &str = "consul-acl-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_blocking_queries_follow_changes_and_survive_failures() {
    let mut consul = FakeConsul::start(Some(TOKEN)).await;
    let g: Vec<Greeter> =
        futures::future::join_all((0..3).map(|_| Greeter::start("none", &[]))).await;
    consul.add("greeter", "g0", g[0].addr);
    consul.add("greeter", "g1", g[1].addr);
    let flags = ["--registry", &consul.url(), "--consul-wait", "2s"];
    let lb = Lb::start_with_env(&flags, &[("LB_CONSUL_TOKEN", TOKEN)]).await;
    let (ch, caller) = listed_and_calling(&lb, &[g[0].addr, g[1].addr]).await;

    // A change answers the waiting blocking query at once.
    let t = Instant::now();
    consul.add("greeter", "g2", g[2].addr);
    assert!(
        wait_listed(
            &ch,
            &[g[0].addr, g[1].addr, g[2].addr],
            Duration::from_secs(5)
        )
        .await,
        "add"
    );
    eprintln!("Consul add -> listed after {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a blocking query should answer at once"
    );
    consul.remove("g0");
    assert!(
        wait_listed(&ch, &[g[1].addr, g[2].addr], Duration::from_secs(5)).await,
        "remove"
    );
    // A failing check takes it out of ?passing answers.
    consul.set_passing("g1", false);
    assert!(
        wait_listed(&ch, &[g[2].addr], Duration::from_secs(5)).await,
        "critical"
    );
    consul.set_passing("g1", true);
    assert!(
        wait_listed(&ch, &[g[1].addr, g[2].addr], Duration::from_secs(5)).await,
        "passing again"
    );

    // 500s for 3 s: nothing changes, the failures are counted, then updates resume.
    let errors = |lb: &Lb| lb.metric("lb_registry_events_total{source=\"consul\",kind=\"error\"}");
    let before = errors(&lb);
    consul.fail(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(listed(&ch).len(), 2);
    assert!(errors(&lb) > before, "5xx not counted");
    consul.fail(false);
    consul.add("greeter", "g0", g[0].addr);
    assert!(
        wait_listed(
            &ch,
            &[g[0].addr, g[1].addr, g[2].addr],
            Duration::from_secs(8)
        )
        .await,
        "after 5xx"
    );

    // The index goes backwards (a snapshot restore): the watch starts over
    // and sees the change made with the lower index.
    consul.reset_index(3, |c| c.remove("g2"));
    assert!(
        wait_listed(&ch, &[g[0].addr, g[1].addr], Duration::from_secs(8)).await,
        "after an index reset: {:?}",
        listed(&ch)
    );

    // Outage: the agent is gone for 3 s, then comes back changed.
    consul.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(listed(&ch).len(), 2);
    consul.add("greeter", "g2", g[2].addr);
    consul.restart().await;
    assert!(
        wait_listed(
            &ch,
            &[g[0].addr, g[1].addr, g[2].addr],
            Duration::from_secs(10)
        )
        .await,
        "recovery"
    );

    // An answer that does not parse: counted, the last list stays.
    let before = errors(&lb);
    consul.malformed(true);
    assert!(
        wait_until(Duration::from_secs(5), || errors(&lb) > before).await,
        "malformed answer not counted"
    );
    assert_eq!(listed(&ch).len(), 3);
    consul.malformed(false);

    // Entries that cannot be called: rejected one by one, the rest serve.
    for (id, address, port) in [
        ("junk-port", "127.0.0.1", 0),
        ("junk-addr", "not an ip!", 80),
    ] {
        consul.add_instance(ConsulInstance {
            service: "greeter".into(),
            id: id.into(),
            address: address.into(),
            port,
            tags: vec![],
            weight: 1,
            passing: true,
        });
    }
    assert!(
        wait_until(Duration::from_secs(5), || lb.metric(
            "lb_registry_rejects_total{source=\"consul\",kind=\"bad_address\"}"
        ) >= 2.0)
        .await,
        "junk entries not counted"
    );
    assert_eq!(listed(&ch).len(), 3);

    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);

    // Without the ACL token: refused (403), counted, never ready.
    let anonymous = Lb::start(&flags).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(anonymous.get("/readyz").0, 503);
    assert!(anonymous.metric("lb_registry_events_total{source=\"consul\",kind=\"error\"}") >= 1.0);
}

/// Backends register themselves through the agent API with a gRPC health
/// check, are re-registered when the agent forgets them, and deregister on
/// a graceful stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_register_with_the_consul_agent() {
    let consul = FakeConsul::start(Some(TOKEN)).await;
    let lb = Lb::start_with_env(
        &["--registry", &consul.url(), "--consul-wait", "2s"],
        &[("LB_CONSUL_TOKEN", TOKEN)],
    )
    .await;
    let token_env = [("GREETER_REGISTRATION_TOKEN", TOKEN)];
    let mut g =
        Greeter::start_with_env("127.0.0.1:0", &consul.url(), &["--ttl", "3s"], &token_env).await;
    assert!(
        g.wait_registered(Duration::from_secs(10)).await,
        "see {}",
        g.proc.log.display()
    );
    let id = format!("greeter-127.0.0.1-{}", g.addr.port());
    assert_eq!(consul.ids(), vec![id.clone()]);
    let ch = channel("greeter", &[lb.addr]);
    assert!(lb_tests::wait_backends(&ch, 1, Duration::from_secs(10)).await);

    // The agent forgets it (restart): registered again within ttl/3.
    consul.remove(&id);
    assert!(
        wait_until(Duration::from_secs(5), || consul.ids() == vec![id.clone()]).await,
        "not re-registered"
    );

    // Graceful stop: deregistered.
    tokio::task::block_in_place(|| g.proc.terminate(Duration::from_secs(10)));
    assert!(
        consul.ids().is_empty(),
        "still registered: {:?}",
        consul.ids()
    );
}

/// An agent serving HTTPS that verifies client certificates (Consul's
/// `verify_incoming`): the LB reads it and a backend registers through it
/// with the CA and a client certificate. An LB trusting another CA, one
/// without a client certificate, and one speaking plain HTTP are never
/// ready and count errors; `consul+https://` without a CA does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_over_https_with_client_certificates() {
    let pki = Pki::generate();
    let consul = FakeConsul::start_tls(Some(TOKEN), pki.https_acceptor(true)).await;
    let url = consul.url();
    assert!(url.starts_with("consul+https://"), "{url}");
    let token_env = [("LB_CONSUL_TOKEN", TOKEN)];
    let start = |tls: Vec<String>, url: String| async move {
        let mut args: Vec<String> = vec![
            "--registry".into(),
            url,
            "--consul-wait".into(),
            "2s".into(),
        ];
        args.extend(tls);
        Lb::start_with_env(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &token_env,
        )
        .await
    };
    let lb = start(
        flags(&[
            ("--consul-ca", &pki.ca),
            ("--consul-cert", &pki.client_cert),
            ("--consul-key", &pki.client_key),
        ]),
        url.clone(),
    )
    .await;
    let greeter_tls = flags(&[
        ("--consul-ca", &pki.ca),
        ("--client-cert", &pki.client_cert),
        ("--client-key", &pki.client_key),
    ]);
    let mut greeter_args = vec!["--ttl", "3s"];
    greeter_args.extend(greeter_tls.iter().map(String::as_str));
    let g = Greeter::start_with_env(
        "127.0.0.1:0",
        &url,
        &greeter_args,
        &[("GREETER_REGISTRATION_TOKEN", TOKEN)],
    )
    .await;
    assert!(
        g.wait_registered(Duration::from_secs(10)).await,
        "registration over HTTPS failed; see {}",
        g.proc.log.display()
    );
    lb.wait_ready(Duration::from_secs(10)).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(
        wait_listed(&ch, &[g.addr], Duration::from_secs(10)).await,
        "not listed over HTTPS: {:?}",
        listed(&ch)
    );

    let wrong_ca = start(
        flags(&[
            ("--consul-ca", &pki.other_ca),
            ("--consul-cert", &pki.client_cert),
            ("--consul-key", &pki.client_key),
        ]),
        url.clone(),
    )
    .await;
    let anonymous = start(flags(&[("--consul-ca", &pki.ca)]), url.clone()).await;
    let plain = start(vec![], format!("consul://{}", consul.addr)).await;
    let errors = |lb: &Lb| lb.metric("lb_registry_events_total{source=\"consul\",kind=\"error\"}");
    for (who, lb) in [
        ("wrong CA", &wrong_ca),
        ("no client certificate", &anonymous),
        ("plain HTTP", &plain),
    ] {
        assert!(
            wait_until(Duration::from_secs(5), || errors(lb) >= 1.0).await,
            "{who}: no error counted"
        );
        assert_ne!(lb.get("/readyz").0, 200, "{who} became ready");
    }

    let no_ca = std::process::Command::new(lb_tests::bin("lb-server"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--registry", &url])
        .output()
        .unwrap();
    assert!(!no_ca.status.success());
    let stderr = String::from_utf8_lossy(&no_ca.stderr);
    assert!(stderr.contains("--consul-ca"), "{stderr}");
}
