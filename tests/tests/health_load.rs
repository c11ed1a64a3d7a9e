//! Health and load awareness (DESIGN §4, 7–9): active health checks, ORCA
//! load reports, slow start, panic mode and shedding, with real processes.

use std::time::{Duration, Instant};

use lb_tests::fleet::BusyFleet;
use lb_tests::{
    call_n, channel, etcd_cluster, greeters, wait_backends, wait_until, Caller, Greeter, Lb,
    ListWatcher,
};

/// An LB with the embedded registry and fast load-weighting settings.
async fn fast_lb(extra: &[&str]) -> Lb {
    let mut args = lb_tests::fleet::FAST_LOAD_FLAGS.to_vec();
    args.extend_from_slice(extra);
    Lb::embedded(&args).await
}

fn registry(lb: &Lb) -> String {
    format!("lb://{}", lb.addr)
}

/// Scenario 7: a SIGKILLed backend (no deregistration, 30 s lease) leaves
/// every client's list within 1 s through health checking; no call fails
/// after its removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_backend_leaves_lists_within_a_second_through_health_checks() {
    let (etcd, lb, mut greeters) = etcd_cluster(3, &["--ttl", "30s"]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let watcher = ListWatcher::start(lb.addr, "greeter").await;
    let caller = Caller::start(&ch, 4, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let victim = greeters[0].addr;
    let killed_at = Instant::now();
    greeters[0].proc.kill();
    assert!(
        wait_until(Duration::from_secs(3), || watcher
            .removed_after(victim, killed_at)
            .is_some())
        .await,
        "killed backend still listed 3 s later: {:?}",
        watcher.latest()
    );
    let removed_at = watcher.removed_after(victim, killed_at).unwrap();
    let took = removed_at - killed_at;
    eprintln!("SIGKILL -> removed from the LB's list: {took:?}");
    assert!(took <= Duration::from_secs(2), "removal took {took:?}");

    // The client's own list: calls started after it dropped the backend
    // must all succeed (the LB's stream to the watcher above may be written
    // a little before the client's).
    assert!(
        wait_until(Duration::from_secs(2), || !lb_tests::listed(&ch)
            .contains(&victim))
        .await,
        "the client still lists the killed backend"
    );
    let client_removed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = caller.stop().await;
    let late: Vec<_> = calls
        .failures
        .iter()
        .filter(|(t, ..)| *t > client_removed_at)
        .collect();
    assert!(late.is_empty(), "calls failed after the removal: {late:?}");
    // The lease is still alive: health checking removed it, not the TTL.
    let key = format!("/services/greeter/{victim}");
    let kept = etcd.client().await.get(key, None).await.unwrap();
    assert_eq!(kept.kvs().len(), 1, "the key should still be in etcd");
}

/// Scenario 8a: NOT_SERVING gets zero calls; SERVING again gets traffic back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_backend_gets_no_calls_until_it_serves_again() {
    let lb = fast_lb(&[]).await;
    let gs = greeters(3, &registry(&lb), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);

    assert!(!gs[1].toggle_health().await);
    assert!(
        wait_backends(&ch, 2, Duration::from_secs(5)).await,
        "NOT_SERVING backend still listed"
    );
    let tally = call_n(&ch, 90).await;
    assert_eq!(tally.failed(), 0);
    assert_eq!(
        tally.per_backend.get(&gs[1].addr.to_string()),
        None,
        "{:?}",
        tally.per_backend
    );
    let backends = lb.backends("greeter");
    let sick = backends
        .iter()
        .find(|b| b["address"] == gs[1].addr.to_string())
        .expect("the sick backend is shown");
    assert!(
        sick["health"] == "not_serving"
            && sick["health_detail"]
                .as_str()
                .is_some_and(|d| d.contains("NOT_SERVING")),
        "the admin API must say why: {sick}"
    );

    assert!(gs[1].toggle_health().await);
    assert!(
        wait_backends(&ch, 3, Duration::from_secs(5)).await,
        "SERVING backend not listed again"
    );
    let tally = call_n(&ch, 90).await;
    assert_eq!(
        tally.per_backend.get(&gs[1].addr.to_string()),
        Some(&30),
        "{:?}",
        tally.per_backend
    );
}

/// Backends without health `Watch` are polled with `Check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_only_backends_are_polled() {
    let lb = fast_lb(&[]).await;
    let g = Greeter::start(&registry(&lb), &["--health-check-only"]).await;
    assert!(g.wait_registered(Duration::from_secs(10)).await);
    let ch = channel("greeter", &[lb.addr]);
    assert!(
        wait_backends(&ch, 1, Duration::from_secs(5)).await,
        "a Check-only backend was never listed"
    );
    let mut others = greeters(1, &registry(&lb), &[]).await;
    assert!(wait_backends(&ch, 2, Duration::from_secs(5)).await);
    assert!(!g.toggle_health().await);
    let t = Instant::now();
    assert!(
        wait_backends(&ch, 1, Duration::from_secs(3)).await,
        "NOT_SERVING via Check not noticed"
    );
    eprintln!(
        "Check-only backend NOT_SERVING -> removed: {:?}",
        t.elapsed()
    );
    assert!(ch.ready_backends().contains(&others[0].addr));
    others.clear();
}

/// Scenario 8b: of four backends, the one reporting 4x the utilization for
/// the same traffic (a quarter of the others' capacity: each reports
/// utilization = its measured qps / its capacity, as a real server's load
/// follows its traffic) gets clearly less traffic (below half the fair
/// share), through lb-client and through Python grpcio (gRPC C-core).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_backend_gets_less_traffic_with_lb_client_and_grpcio() {
    let BusyFleet {
        lb,
        calm,
        busy,
        caller,
    } = BusyFleet::start().await;
    let busy_addr = busy.addr.to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let snapshot = caller.snapshot();
    let total: usize = snapshot
        .times
        .keys()
        .map(|b| snapshot.count_after(b, window))
        .sum();
    let share = snapshot.count_after(&busy_addr, window) as f64 / total.max(1) as f64;
    eprintln!("lb-client: busy backend share {share:.3} of {total} calls (fair 0.25)");
    assert!(
        share < 0.125,
        "busy backend got {share:.3} of lb-client calls"
    );

    // The stock C-core client walks the same weighted list.
    let summary = lb_tests::grpcio_client(lb.addr, "greeter.svc.test", 400, 0.0).await;
    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
    let n = summary["per_backend"][&busy_addr].as_u64().unwrap_or(0);
    eprintln!("grpcio: busy backend {n} of 400 calls: {summary}");
    assert!(
        (n as f64) < 0.125 * 400.0,
        "busy backend got {n} of 400 grpcio calls: {summary}"
    );
    for g in &calm {
        assert!(
            summary["per_backend"][&g.addr.to_string()]
                .as_u64()
                .unwrap_or(0)
                > 60,
            "{summary}"
        );
    }
}

/// Scenario 9: a rolling restart of every backend under steady load
/// (graceful: NOT_SERVING, deregister, drain, exit) fails no call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_no_call() {
    let (etcd, lb, mut gs) = etcd_cluster(3, &["--ttl", "10s", "--drain", "500ms"]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 4, Duration::from_millis(2));
    for _ in 0..3 {
        let mut old = gs.remove(0);
        tokio::task::block_in_place(|| old.proc.terminate(Duration::from_secs(10)));
        let new = Greeter::start(&etcd.registry_url(), &["--ttl", "10s", "--drain", "500ms"]).await;
        assert!(new.wait_registered(Duration::from_secs(10)).await);
        let addr = new.addr;
        assert!(
            wait_until(Duration::from_secs(5), || ch
                .ready_backends()
                .contains(&addr))
            .await,
            "replacement never reached the client"
        );
        gs.push(new);
    }
    // Keep the load on a little, so the last replacement serves too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = caller.stop().await;
    assert!(
        calls.failures.is_empty(),
        "calls failed during the rolling restart: {:?}",
        calls.failures
    );
    for g in &gs {
        assert!(
            calls.per_backend.contains_key(&g.addr.to_string()),
            "replacement {} never served",
            g.addr
        );
    }
}

/// Slow start: a newly healthy backend's share ramps up over the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_up_a_new_backend() {
    let lb = fast_lb(&["--slow-start", "4s"]).await;
    let _gs = greeters(3, &registry(&lb), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 4, Duration::from_millis(1));
    // Past the LB's startup grace, so the next backend is a newcomer.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let newcomer = Greeter::start(&registry(&lb), &[]).await;
    let addr = newcomer.addr.to_string();
    assert!(
        wait_until(Duration::from_secs(10), || caller
            .snapshot()
            .per_backend
            .contains_key(&addr))
        .await
    );
    let first = caller.snapshot().first_seen[&addr];

    let share_between = |from: Instant, to: Instant| {
        let c = caller.snapshot();
        let count = |b: &str| {
            c.times
                .get(b)
                .map(|v| v.iter().filter(|t| **t > from && **t <= to).count())
                .unwrap_or(0)
        };
        let total: usize = c.times.keys().map(|b| count(b)).sum();
        count(&addr) as f64 / total.max(1) as f64
    };
    tokio::time::sleep_until((first + Duration::from_secs(1)).into()).await;
    let early = share_between(first, first + Duration::from_secs(1));
    tokio::time::sleep_until((first + Duration::from_secs(6)).into()).await;
    let late = share_between(
        first + Duration::from_secs(5),
        first + Duration::from_secs(6),
    );
    let calls = caller.stop().await;
    eprintln!("slow start: share in 1st second {early:.3}, in 6th second {late:.3} (fair 0.25)");
    assert!(
        early < 0.125,
        "new backend got {early:.3} in its first second"
    );
    assert!(late > 0.18, "new backend got only {late:.3} after its ramp");
    assert!(calls.failures.is_empty());
}

/// Panic mode: with most backends NOT_SERVING, all are listed rather than
/// overloading the few; it ends when enough recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_lists_everyone_when_too_few_are_healthy() {
    let lb = fast_lb(&["--panic-threshold", "0.5"]).await;
    let gs = greeters(4, &registry(&lb), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 4, Duration::from_secs(10)).await);
    for g in &gs[1..] {
        assert!(!g.toggle_health().await);
    }
    assert!(
        wait_until(Duration::from_secs(5), || lb
            .json("/api/v1/services/greeter")["panic"]
            == true)
        .await,
        "panic mode not entered: {}",
        lb.get("/api/v1/services/greeter").1
    );
    let tally = call_n(&ch, 80).await;
    assert_eq!(tally.failed(), 0);
    assert_eq!(
        tally.per_backend.len(),
        4,
        "in panic mode every backend gets calls: {:?}",
        tally.per_backend
    );

    // Two recover: 3 of 4 healthy, no panic; the last sick one gets nothing.
    assert!(gs[1].toggle_health().await);
    assert!(gs[2].toggle_health().await);
    assert!(
        wait_until(Duration::from_secs(5), || lb
            .json("/api/v1/services/greeter")["panic"]
            == false)
        .await
    );
    assert!(wait_backends(&ch, 3, Duration::from_secs(5)).await);
    let tally = call_n(&ch, 60).await;
    assert_eq!(
        tally.per_backend.get(&gs[3].addr.to_string()),
        None,
        "{:?}",
        tally.per_backend
    );
}

/// Load shedding: when every backend is above the threshold, clients drop a
/// share of calls (UNAVAILABLE) and report the drops per token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_service_sheds_with_drop_entries() {
    let lb = fast_lb(&["--shed-utilization", "0.9"]).await;
    let _gs = greeters(2, &registry(&lb), &["--utilization", "1.2"]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let shed = lb.json("/api/v1/services/greeter")["shed_fraction"].as_f64();
            shed.is_some_and(|f| f > 0.0 && f < 1.0)
        })
        .await
    );
    assert!(wait_backends(&ch, 2, Duration::from_secs(5)).await);
    let tally = call_n(&ch, 200).await;
    let dropped: u64 = tally
        .failures
        .iter()
        .filter(|(k, _)| k.contains("dropped by the load balancer"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        dropped > 0 && dropped < 120,
        "expected some drops, got {dropped}: {:?}",
        tally.failures
    );
    assert_eq!(
        dropped,
        tally.failed(),
        "only drops may fail: {:?}",
        tally.failures
    );
    assert!(
        wait_until(Duration::from_secs(5), || lb.metric(
            "lb_client_calls_total{service=\"greeter\",kind=\"dropped\"}"
        ) >= dropped as f64)
        .await,
        "drops not reported in client stats"
    );
    assert!(
        lb.get("/api/v1/services/greeter").1.contains("lb-shed"),
        "drops per token not shown"
    );
}
