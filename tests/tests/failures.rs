//! Failure scenarios (DESIGN §4, 4–6) and an LB restart under load: real
//! etcd killed and restarted, backends SIGKILLed, the LB process restarted.

use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::{call_n, channel, etcd_cluster, wait_backends, Caller, Greeter};

async fn say_hello(ch: &LbChannel, timeout: Duration) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(HelloRequest { name: "t".into() });
    req.set_timeout(timeout);
    GreeterClient::new(ch.clone())
        .say_hello(req)
        .await
        .map(|r| r.into_inner().message)
}

/// Scenarios 4 and 5: etcd dies — clients keep calling, new clients get
/// lists from the LB's cache; etcd returns — a backend that started during
/// the outage appears and a deleted key disappears, by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_changes_nothing_and_its_return_resumes_updates() {
    let (mut etcd, lb, greeters) = etcd_cluster(3, &["--ttl", "10s"]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 2, Duration::from_millis(5));

    let source_ok = r#"lb_registry_source_ok{source="etcd"}"#;
    assert_eq!(lb.metric(source_ok), 1.0);
    etcd.kill();
    let killed = Instant::now();
    // The outage shows in /metrics within 10 s.
    assert!(
        lb_tests::wait_until(Duration::from_secs(10), || lb.metric(source_ok) == 0.0).await,
        "{source_ok} still 1 10 s into the outage"
    );
    eprintln!("etcd killed -> {source_ok} 0 after {:?}", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(killed.elapsed())).await;
    let newcomer = channel("greeter", &[lb.addr]);
    assert!(
        wait_backends(&newcomer, 3, Duration::from_secs(5)).await,
        "a new client got no list during the outage"
    );
    let tally = call_n(&newcomer, 30).await;
    assert_eq!(
        tally.failed(),
        0,
        "new client failed during the outage: {:?}",
        tally.failures
    );
    assert_eq!(tally.per_backend.len(), 3);

    // A backend starting during the outage registers once etcd is back.
    let late = Greeter::start(&etcd.registry_url(), &["--ttl", "10s"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!late.is_registered(), "registered while etcd was down?");
    let back_at = Instant::now();
    etcd.restart().await;
    assert!(
        late.wait_registered(Duration::from_secs(15)).await,
        "late greeter never registered"
    );
    assert!(
        wait_backends(&ch, 4, Duration::from_secs(15)).await,
        "late backend never reached the client"
    );
    assert_eq!(lb.metric(source_ok), 1.0, "etcd is back, its source is not");
    eprintln!(
        "etcd back -> late backend in client list: {:?}",
        back_at.elapsed()
    );

    // Removals resume too: the deleted entry is seen at once (the backend
    // still serves, so it is kept, departed) and the backend leaves as
    // soon as it stops serving.
    let removed = greeters[0].addr;
    etcd.delete(&format!("/services/greeter/{removed}")).await;
    let t = Instant::now();
    assert!(
        lb_tests::wait_until(Duration::from_secs(5), || lb.departed("greeter", removed)).await,
        "deleted backend not seen: {:?}",
        lb.backends("greeter")
    );
    eprintln!("etcd delete -> seen by the LB: {:?}", t.elapsed());
    assert!(!greeters[0].toggle_health().await);
    assert!(
        lb_tests::wait_until(Duration::from_secs(5), || !ch
            .ready_backends()
            .contains(&removed))
        .await,
        "deleted backend that stopped serving still listed"
    );

    let calls = caller.stop().await;
    assert!(
        calls.failures.is_empty(),
        "calls failed across the etcd outage: {:?}",
        calls.failures
    );
    assert!(calls.ok() > 100, "too few calls made: {}", calls.ok());
}

/// Scenario 6: with every backend down, calls fail fast with UNAVAILABLE
/// (or wait until their deadline when asked to wait for ready); service
/// resumes when one backend returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_fail_fast_then_resume() {
    let (etcd, lb, mut greeters) = etcd_cluster(3, &["--ttl", "60s"]).await;
    let ch = channel("greeter", &[lb.addr]);
    let patient = LbChannel::builder("greeter")
        .lb(lb.addr.to_string())
        .wait_for_ready(true)
        .build()
        .unwrap();
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    assert!(wait_backends(&patient, 3, Duration::from_secs(10)).await);
    let first = greeters[0].addr;
    for g in &mut greeters {
        g.proc.kill();
    }
    // Both channels must have seen every connection close: a call picked
    // before its channel noticed would be sent and fail on the dead socket,
    // which is UNAVAILABLE even for a wait-for-ready call.
    for c in [&ch, &patient] {
        assert!(
            wait_backends(c, 0, Duration::from_secs(5)).await,
            "dead backends still ready"
        );
    }

    let t = Instant::now();
    let err = say_hello(&ch, Duration::from_secs(10))
        .await
        .expect_err("a call succeeded with every backend dead");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "fail-fast took {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let err = say_hello(&patient, Duration::from_millis(500))
        .await
        .expect_err("wait-for-ready call succeeded");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "wait-for-ready gave up after {:?}",
        t.elapsed()
    );

    // One backend returns on its old address; both clients resume.
    let _back =
        Greeter::start_on(&first.to_string(), &etcd.registry_url(), &["--ttl", "60s"]).await;
    let t = Instant::now();
    let resumed =
        lb_tests::wait_until(Duration::from_secs(10), || !ch.ready_backends().is_empty()).await;
    assert!(resumed, "service did not resume within 10 s");
    eprintln!("backend back -> client ready: {:?}", t.elapsed());
    assert!(say_hello(&ch, Duration::from_secs(5)).await.is_ok());
    assert!(say_hello(&patient, Duration::from_secs(5)).await.is_ok());
}

/// The LB restarts while clients call: no call fails (clients keep their
/// last list), clients reconnect, and later changes reach them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_restart_while_clients_run_loses_no_call() {
    let (etcd, lb, _greeters) = etcd_cluster(2, &["--ttl", "10s"]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 2, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let lb = lb.restart().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, clients) = lb.get("/api/v1/clients");
    assert!(
        lb_tests::wait_until(Duration::from_secs(5), || lb.json("/api/v1/clients")
            ["clients"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["service"] == "greeter")))
        .await,
        "client did not reconnect to the restarted LB: {clients}"
    );

    let third = Greeter::start(&etcd.registry_url(), &["--ttl", "10s"]).await;
    assert!(third.wait_registered(Duration::from_secs(10)).await);
    assert!(
        wait_backends(&ch, 3, Duration::from_secs(5)).await,
        "a change after the LB restart did not reach the client"
    );
    let calls = caller.stop().await;
    assert!(
        calls.failures.is_empty(),
        "calls failed across the LB restart: {:?}",
        calls.failures
    );
}
