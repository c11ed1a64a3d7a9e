//! Balancing scenarios over etcd (DESIGN §4, 1–3) and the registry value
//! layouts: real etcd, a real lb-server, real greeter processes.

use std::time::{Duration, Instant};

use lb_tests::{
    call_n, channel, etcd_cluster, wait_backends, wait_until, Caller, Etcd, Greeter, Lb,
};

/// Scenario 1: each of three backends gets a third of 300 calls (±10 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_evenly_over_three_backends() {
    let (_etcd, lb, greeters) = etcd_cluster(3, &["--ttl", "10s", "--drain", "1s"]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(
        wait_backends(&ch, 3, Duration::from_secs(10)).await,
        "client never saw 3 backends"
    );
    let tally = call_n(&ch, 300).await;
    assert_eq!(tally.failed(), 0, "failures: {:?}", tally.failures);
    for g in &greeters {
        let n = tally
            .per_backend
            .get(&g.addr.to_string())
            .copied()
            .unwrap_or(0);
        assert!(
            (90..=110).contains(&n),
            "backend {} got {n} of 300 calls: {:?}",
            g.addr,
            tally.per_backend
        );
    }
}

/// Scenarios 2 and 3: a backend stops gracefully under load (zero failed
/// calls, traffic moves to the others), then comes back on the same address
/// and gets its share within 1 s of registering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_loses_no_call_and_return_gets_share_within_a_second() {
    let (etcd, lb, mut greeters) = etcd_cluster(3, &["--ttl", "10s", "--drain", "1s"]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 4, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let leaving_addr = greeters[1].addr.to_string();
    let mut leaving = greeters.remove(1);
    tokio::task::block_in_place(|| leaving.proc.terminate(Duration::from_secs(10)));
    let gone_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let during = caller.snapshot();
    assert!(
        during.failures.is_empty(),
        "calls failed during a graceful stop: {:?}",
        during.failures
    );
    assert!(
        during.per_backend.get(&leaving_addr).copied().unwrap_or(0) > 0,
        "the leaving backend never served"
    );
    let after_gone: u64 = greeters
        .iter()
        .map(|g| g.addr.to_string())
        .filter(|a| during.last_seen.get(a).is_some_and(|t| *t > gone_at))
        .count() as u64;
    assert_eq!(
        after_gone, 2,
        "both remaining backends must keep serving: {:?}",
        during.last_seen
    );

    // It comes back on the same address.
    let back = Greeter::start_on(&leaving_addr, &etcd.registry_url(), &["--ttl", "10s"]).await;
    assert!(
        back.wait_registered(Duration::from_secs(10)).await,
        "returning greeter did not register"
    );
    let registered_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || caller
            .snapshot()
            .first_after(&leaving_addr, gone_at)
            .is_some())
        .await,
        "the returning backend got no call within 5 s"
    );
    let first_call = caller
        .snapshot()
        .first_after(&leaving_addr, gone_at)
        .unwrap();
    let delay = first_call.saturating_duration_since(registered_at);
    eprintln!("registration -> first call on the returning backend: {delay:?}");
    assert!(
        delay <= Duration::from_secs(1),
        "returning backend first served {delay:?} after registering"
    );

    // Its share over the next second is close to a third.
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = caller.stop().await;
    let total: usize = calls
        .times
        .keys()
        .map(|b| calls.count_after(b, window))
        .sum();
    let share = calls.count_after(&leaving_addr, window) as f64 / total.max(1) as f64;
    assert!(
        share > 0.25,
        "returning backend got {share:.2} of calls in the second after it came back"
    );
    assert!(calls.failures.is_empty(), "failures: {:?}", calls.failures);
    drop(back);
}

/// Both etcd layouts (naming JSON and plain `host:port`) and host names are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_etcd_layouts_and_host_names_are_read() {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&["--registry", &etcd.registry_url()]).await;
    let a = Greeter::start("none", &[]).await;
    let b = Greeter::start("none", &[]).await;
    let c = Greeter::start("none", &[]).await;
    etcd.put(
        &format!("/services/greeter/{}", a.addr),
        &format!(r#"{{"Op":0,"Addr":"{}","Metadata":null}}"#, a.addr),
    )
    .await;
    etcd.put(
        &format!("/services/greeter/{}", b.addr),
        &b.addr.to_string(),
    )
    .await;
    etcd.put(
        "/services/greeter/by-name",
        &format!("localhost:{}", c.addr.port()),
    )
    .await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(
        wait_backends(&ch, 3, Duration::from_secs(10)).await,
        "expected 3 backends, have {:?}",
        ch.ready_backends()
    );
    let tally = call_n(&ch, 30).await;
    assert_eq!(tally.failed(), 0);
    for g in [&a, &b, &c] {
        assert_eq!(
            tally.per_backend.get(&g.addr.to_string()),
            Some(&10),
            "{:?}",
            tally.per_backend
        );
    }
    // Removing the plain entry is read. The backend still serves, so it is
    // kept listed, departed (registry_gone.rs), until it stops serving.
    etcd.delete(&format!("/services/greeter/{}", b.addr)).await;
    assert!(
        wait_until(Duration::from_secs(5), || lb.departed("greeter", b.addr)).await,
        "deleted key not seen: {:?}",
        lb.backends("greeter")
    );
    assert!(!b.toggle_health().await, "health toggled to NOT_SERVING");
    assert!(
        wait_backends(&ch, 2, Duration::from_secs(5)).await,
        "deleted key of a backend that stopped serving still listed"
    );
}

/// Malformed registry values are rejected and counted; nothing known is lost,
/// including across an LB restart that re-lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_rejected_counted_and_lose_nothing() {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&["--registry", &etcd.registry_url()]).await;
    let a = Greeter::start("none", &[]).await;
    let b = Greeter::start("none", &[]).await;
    let key_b = format!("/services/greeter/{}", b.addr);
    etcd.put(
        &format!("/services/greeter/{}", a.addr),
        &a.addr.to_string(),
    )
    .await;
    etcd.put(&key_b, &b.addr.to_string()).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 2, Duration::from_secs(10)).await);

    etcd.put("/services/greeter/junk1", "not an address").await;
    etcd.put("/services/greeter/junk2", r#"{"Op":0}"#).await;
    etcd.put("/services/greeter/junk3", "no-such-host.invalid:80")
        .await;
    etcd.put("/services/lonely", "127.0.0.1:1").await;
    etcd.put(&key_b, "garbage!! overwrite").await;
    let rejects = |lb: &Lb| {
        ["bad_address", "bad_value", "unresolvable", "bad_key"].map(|k| {
            lb.metric(&format!(
                "lb_registry_rejects_total{{source=\"etcd\",kind=\"{k}\"}}"
            ))
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || rejects(&lb)
            .iter()
            .all(|n| *n >= 1.0))
        .await,
        "rejects not counted: {:?}",
        rejects(&lb)
    );
    let tally = call_n(&ch, 20).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    assert_eq!(
        tally.per_backend.len(),
        2,
        "a backend was lost to junk: {:?}",
        tally.per_backend
    );
    let backends = lb.backends("greeter");
    assert!(
        backends.iter().any(|x| x["address"] == b.addr.to_string()),
        "overwritten key must keep its last good value: {backends:?}"
    );

    // A restarted LB lists the junk again and still serves both backends.
    let lb = lb.restart().await;
    let fresh = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&fresh, 1, Duration::from_secs(10)).await);
    let backends = lb.backends("greeter");
    assert!(
        backends.iter().any(|x| x["address"] == a.addr.to_string()),
        "{backends:?}"
    );
    assert!(
        rejects(&lb)[0] >= 1.0,
        "junk must be counted after a re-list"
    );
}
