//! A hostile or broken registry: junk values, out-of-range ports, hosts that
//! do not resolve, duplicates, gigantic values, keys with odd characters,
//! too many services, and a service flapping about a thousand times a
//! second. Each is rejected or absorbed without a crash and without losing a
//! healthy backend, counted, and logged once per key (rate-limited).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::{channel, wait_backends, wait_until, Caller, Etcd, Greeter, Lb, ListWatcher};

fn rejects(lb: &Lb, kind: &str) -> f64 {
    lb.metric(&format!(
        "lb_registry_rejects_total{{source=\"etcd\",kind=\"{kind}\"}}"
    ))
}

fn log_lines_with(lb: &Lb, needle: &str) -> usize {
    std::fs::read_to_string(&lb.proc.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_in_the_registry_is_rejected_counted_logged_once_and_loses_nothing() {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&["--registry", &etcd.registry_url(), "--max-services", "20"]).await;
    let greeters = lb_tests::greeters(3, &etcd.registry_url(), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 2, Duration::from_millis(5));

    let giant = "a".repeat(1024 * 1024);
    let long_key = format!("/services/bad/{}", "k".repeat(2000));
    let long_service = format!("/services/{}/i", "s".repeat(300));
    let cases: Vec<(String, String, &str)> = vec![
        (
            "/services/bad/v1".into(),
            "neither json nor host:port".into(),
            "bad_address",
        ),
        (
            "/services/bad/v2".into(),
            r#"{"Op":0,"Addr":"#.into(),
            "bad_value",
        ),
        (
            "/services/bad/v3".into(),
            "127.0.0.1:70000".into(),
            "bad_address",
        ),
        (
            "/services/bad/v4".into(),
            "127.0.0.1:0".into(),
            "bad_address",
        ),
        (
            "/services/bad/v5".into(),
            "127.0.0.1:-5".into(),
            "bad_address",
        ),
        (
            "/services/bad/v6".into(),
            "no-such-host.invalid:80".into(),
            "unresolvable",
        ),
        ("/services/bad/v7".into(), giant, "too_large"),
        (
            "/services/bad/v8".into(),
            r#"{"Op":0,"Addr":"127.0.0.1:1","Metadata":{"weight":1e9}}"#.into(),
            "bad_value",
        ),
        (long_key, "127.0.0.1:1".into(), "bad_key"),
        (long_service, "127.0.0.1:1".into(), "bad_key"),
        (
            "/services/\u{202e}evil/i".into(),
            "127.0.0.1:1".into(),
            "bad_key",
        ),
        // Control characters in a key must not forge log lines.
        (
            "/services/bad/x\nFORGED LOG LINE\u{1b}[31m".into(),
            "junk value".into(),
            "bad_address",
        ),
    ];
    for (key, value, _) in &cases {
        etcd.put(key, value).await;
    }
    let mut expected: BTreeMap<&str, f64> = BTreeMap::new();
    for (_, _, kind) in &cases {
        *expected.entry(kind).or_default() += 1.0;
    }
    let counted = |lb: &Lb| expected.iter().all(|(kind, n)| rejects(lb, kind) >= *n);
    assert!(
        wait_until(Duration::from_secs(10), || counted(&lb)).await,
        "rejects not counted: {:?}",
        expected
            .keys()
            .map(|k| (k, rejects(&lb, k)))
            .collect::<Vec<_>>()
    );
    let log = std::fs::read_to_string(&lb.proc.log).unwrap_or_default();
    let forged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FORGED LOG LINE"))
        .collect();
    assert!(
        forged.len() == 1 && forged[0].contains("registry entry rejected"),
        "the key's control characters must stay escaped inside its one log line: {forged:?}"
    );

    // A duplicate instance (same address under another key) is listed once.
    etcd.put(
        "/services/greeter/duplicate-of-first",
        &greeters[0].addr.to_string(),
    )
    .await;
    let watcher = ListWatcher::start(lb.addr, "greeter").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let list = watcher.latest().expect("a list");
    let mut per_addr: BTreeMap<_, usize> = BTreeMap::new();
    for a in &list {
        *per_addr.entry(*a).or_default() += 1;
    }
    assert_eq!(per_addr.len(), 3, "{list:?}");
    assert!(
        per_addr.values().all(|n| *n == per_addr[&greeters[1].addr]),
        "a duplicated instance got extra weight: {per_addr:?}"
    );

    // One bad key rewritten 200 times: counted 200 times, logged once.
    let before = rejects(&lb, "bad_address");
    let mut client = etcd.client().await;
    for i in 0..200 {
        client
            .put("/services/bad/rewritten", format!("junk {i}"), None)
            .await
            .unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(10), || rejects(&lb, "bad_address")
            >= before + 200.0)
        .await,
        "rewrites not all counted"
    );
    assert_eq!(
        log_lines_with(&lb, "/services/bad/rewritten"),
        1,
        "a rewritten bad key must be logged once per minute"
    );

    // Too many services: beyond --max-services 20, new services are refused.
    for i in 0..30 {
        etcd.put(&format!("/services/svc-{i}/i"), "127.0.0.1:1")
            .await;
    }
    assert!(
        wait_until(Duration::from_secs(10), || rejects(&lb, "limit") >= 10.0).await,
        "service limit not enforced: {}",
        rejects(&lb, "limit")
    );
    let (_, services) = lb.get("/api/v1/services");
    let known = serde_json::from_str::<serde_json::Value>(&services).unwrap()["services"]
        .as_array()
        .unwrap()
        .len();
    assert!(known <= 20, "{known} services tracked");

    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
    assert_eq!(calls.per_backend.len(), 3, "{:?}", calls.per_backend);
    assert_eq!(lb.get("/healthz").0, 200);
}

/// A key of a healthy service flapping (put, delete, put, …) as fast as
/// etcd takes it, about a thousand changes a second, for 3 s: the other
/// backends stay in every list, no call fails, and the flapping key is
/// logged a handful of times, not thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_service_keeps_its_healthy_backends_and_floods_no_log() {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&["--registry", &etcd.registry_url()]).await;
    let stable = lb_tests::greeters(3, &etcd.registry_url(), &[]).await;
    let flapper = Greeter::start("none", &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let watcher = ListWatcher::start(lb.addr, "greeter").await;
    let caller = Caller::start(&ch, 2, Duration::from_millis(5));

    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..8 {
        let (stop, changes) = (stop.clone(), changes.clone());
        let mut client = etcd.client().await;
        let key = format!("/services/greeter/flap-{w}");
        let value = flapper.addr.to_string();
        writers.push(tokio::spawn(async move {
            let limit = Instant::now() + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                client
                    .put(key.as_str(), value.as_str(), None)
                    .await
                    .unwrap();
                client.delete(key.as_str(), None).await.unwrap();
                changes.fetch_add(2, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let rate = changes.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    eprintln!("flapping: {rate:.0} registry changes per second");
    assert!(
        rate >= 300.0,
        "etcd took only {rate:.0} changes/s; the test needs hundreds"
    );

    // Every list sent meanwhile held the three stable backends.
    let lists = watcher.all();
    assert!(!lists.is_empty());
    for (at, list) in &lists {
        for g in &stable {
            assert!(
                list.contains(&g.addr),
                "list at {:?} lost stable backend {}: {list:?}",
                at.duration_since(started),
                g.addr
            );
        }
    }
    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
    // Every flapping key was deleted last, but the backend behind them
    // still serves: kept, departed, and still listed.
    assert!(
        wait_until(Duration::from_secs(5), || lb
            .departed("greeter", flapper.addr))
        .await,
        "the flapping keys' backend is not marked departed: {:?}",
        lb.backends("greeter")
    );
    assert!(watcher.latest().is_some_and(|l| l.contains(&flapper.addr)));
    let events = lb.metric("lb_registry_events_total{source=\"etcd\",kind=\"put\"}");
    assert!(
        events >= 0.9 * changes.load(Ordering::Relaxed) as f64 / 2.0,
        "puts counted: {events}"
    );
    let lines = log_lines_with(&lb, "flap-");
    eprintln!("log lines about the flapping keys: {lines}");
    assert!(lines <= 8 * 3 * 2, "{lines} log lines about flapping keys");
    assert_eq!(lb.get("/healthz").0, 200);
}

/// A registry larger than one etcd answer may carry: 12,000 keys of about
/// 600 bytes each (7 MiB, past gRPC's 4 MiB message limit) are listed in
/// pages, every one is in the catalog, and a change after the listing is
/// seen (the watch starts at the listing's revision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_bigger_than_one_etcd_answer_is_listed_whole() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let (services, per_service) = (120usize, 100usize);
    let padding = "x".repeat(500);
    let mut ops = Vec::new();
    for i in 0..services * per_service {
        let (s, b) = (i / per_service, i % per_service);
        let key = format!("/services/svc-{s}/b{b}");
        let value = serde_json::json!({
            "Op": 0,
            "Addr": format!("127.3.{}.{}:9", i / 256, i % 256),
            "Metadata": {"pad": padding},
        })
        .to_string();
        ops.push(etcd_client::TxnOp::put(key, value, None));
        if ops.len() == 128 || i + 1 == services * per_service {
            client
                .txn(etcd_client::Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .unwrap();
        }
    }
    let lb = Lb::start(&[
        "--registry",
        &etcd.registry_url(),
        "--health-checks",
        "false",
        "--cluster",
        "false",
    ])
    .await;
    lb.wait_ready(Duration::from_secs(30)).await;
    let total = || -> u64 {
        lb.json("/api/v1/services")["services"]
            .as_array()
            .map(|all| all.iter().filter_map(|s| s["backends"].as_u64()).sum())
            .unwrap_or(0)
    };
    assert_eq!(total(), (services * per_service) as u64);
    etcd.put("/services/svc-0/late", "127.3.200.1:9").await;
    assert!(
        wait_until(Duration::from_secs(5), || total()
            == (services * per_service) as u64 + 1)
        .await,
        "a put after the listing was missed"
    );
}
