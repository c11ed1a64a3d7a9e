//! The registry says gone but the backend is healthy: a backend that
//! leaves the registry while the LB's own probes find it SERVING (its
//! lease lost to a partition between it and the registry, an operator's
//! mistaken delete) stays listed for `--deregistration-grace` (default
//! 5 min), shown with `left_registry_s`, a decision that says it is kept,
//! the gauge `lb_backends_kept_unregistered` and a WARN line. A backend
//! that leaves while not SERVING goes at once: a graceful stop turns
//! NOT_SERVING before it deregisters. The grace never empties a service:
//! the last backends stay while they pass their checks. A backend that
//! registers again is an ordinary backend again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::netns::{Host, Net};
use lb_tests::scenario::{
    assert_connected, brief, channel_on, client_listed, is_listed, judge_calls, listed, row,
    service,
};
use lb_tests::{
    etcd_cluster, greeters, greeters_in, listed_and_calling, wait_until, Caller, Etcd, Greeter, Lb,
};
use serde_json::Value;

/// Where the greeters register in etcd.
const PREFIX: &str = "/services/greeter/";
/// The greeters' registration lease TTL in the partition scenario.
const TTL: Duration = Duration::from_secs(3);
/// The greeters' port on their hosts.
const PORT: u16 = 50051;
/// The alert: backends gone from the registry, kept listed.
const KEPT: &str = "lb_backends_kept_unregistered{service=\"greeter\"}";

/// Whether the LB shows the backend at `addr` as gone from the registry
/// (`left_registry_s` a number).
fn left_registry(v: &Value, addr: SocketAddr) -> bool {
    row(v, addr).is_some_and(|b| b["left_registry_s"].is_number())
}

/// Stops `greeter` gracefully (SIGTERM: NOT_SERVING, deregister, drain,
/// exit) on a blocking thread, so that the test can watch meanwhile.
fn stop_gracefully(mut greeter: Greeter) -> tokio::task::JoinHandle<Greeter> {
    tokio::task::spawn_blocking(move || {
        greeter.proc.terminate(Duration::from_secs(10));
        greeter
    })
}

/// Three backends on hosts of their own, an LB and a client on theirs. One
/// backend's host is cut from etcd's: its lease expires and its key goes,
/// but the LB and the client still reach it. It never leaves the LB's
/// list nor the client's ready backends (every 100 ms for 15 s); within
/// 10 s of the cut + TTL the LB shows `left_registry_s`, a decision saying
/// it is kept, `lb_backends_kept_unregistered` = 1 and a WARN line. After
/// the heal the greeter registers again by itself, and within 2 s of its
/// key reappearing it is an ordinary backend (`left_registry_s` null, the
/// gauge 0). The client keeps ≥ 99.9 % success and the LB's list version
/// moves at most twice over the whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_lost_the_registry_but_serves_stays_listed() {
    let net = Net::new();
    let etcd_host = net.host();
    let lb_host = net.host();
    let backend_hosts: Vec<Host> = (0..3).map(|_| net.host()).collect();
    let client_host = net.host();
    let n = backend_hosts.len();

    let etcd = Etcd::start_in(&etcd_host).await;
    let registry = etcd.registry_url();
    let ttl = format!("{}s", TTL.as_secs());
    let greeters = greeters_in(&backend_hosts, PORT, &registry, &["--ttl", &ttl]).await;
    let lb = Lb::start_in(
        &lb_host,
        &["--registry", &registry, "--health-check-interval", "500ms"],
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || listed(&service(&lb)) == n).await,
        "the LB never listed every backend: {}",
        brief(&service(&lb))
    );

    // The client, on its own host: an LbChannel calling steadily.
    let rt = client_host.ns.runtime();
    let channel = channel_on(&rt, &[lb.addr], None);
    assert_connected(
        &channel,
        n,
        Duration::from_secs(10),
        "the client never connected to every backend",
    )
    .await;
    let caller = Caller::start_on(&rt, &channel, 1, Duration::from_millis(20));
    let start = service(&lb);
    let version_before = start["list_version"].as_u64().expect("list_version");
    let warns_before = lb.log_lines("WARN").len();

    // The cut: one backend's host and etcd's, both ways. Every 100 ms: the
    // LB's and the client's lists, what the LB shows of the backend; every
    // 500 ms, whether its key is still in etcd.
    let lost = backend_hosts[0].addr(PORT);
    let key = format!("{PREFIX}{lost}");
    assert!(
        etcd.keys(PREFIX).await.contains(&key),
        "{key} is not in etcd before the cut"
    );
    let window = Duration::from_secs(15);
    let t0 = Instant::now();
    let cut = net.cut(&backend_hosts[0], &etcd_host);
    let (mut lb_gaps, mut client_gaps) = (0, 0);
    let mut first_gap: Option<(Duration, String)> = None;
    let mut key_gone_after = None;
    let mut left_after = None;
    let mut gauge_after = None;
    let mut next_key_check = t0;
    while t0.elapsed() < window {
        let at = t0.elapsed();
        let v = service(&lb);
        let on_lb = is_listed(&v, lost);
        let on_client = channel.ready_backends().contains(&lost);
        if !on_lb {
            lb_gaps += 1;
        }
        if !on_client {
            client_gaps += 1;
        }
        if (!on_lb || !on_client) && first_gap.is_none() {
            first_gap = Some((at, format!("client ready: {on_client}; LB {}", brief(&v))));
        }
        if left_after.is_none() && left_registry(&v, lost) {
            left_after = Some(at);
        }
        if gauge_after.is_none() && lb.metric(KEPT) == 1.0 {
            gauge_after = Some(at);
        }
        if key_gone_after.is_none() && Instant::now() >= next_key_check {
            next_key_check += Duration::from_millis(500);
            if !etcd.keys(PREFIX).await.contains(&key) {
                key_gone_after = Some(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = service(&lb);
    eprintln!(
        "registry gone: key gone from etcd after {key_gone_after:?}; left_registry_s shown after \
         {left_after:?}, {KEPT} = 1 after {gauge_after:?}; samples without it: LB {lb_gaps}, \
         client {client_gaps}"
    );
    eprintln!("registry gone: the LB while cut: {}", brief(&during));
    assert!(
        key_gone_after.is_some(),
        "{key} never left etcd in {window:?}: the lease did not expire, the scenario did not \
         happen; see {}",
        greeters[0].proc.log.display()
    );
    assert!(
        lb_gaps == 0 && client_gaps == 0,
        "{lost}, serving and reachable, left a list ({lb_gaps} LB samples, {client_gaps} client \
         samples); first: {first_gap:?}"
    );
    let bound = TTL + Duration::from_secs(10);
    assert!(
        left_after.is_some_and(|d| d <= bound),
        "left_registry_s shown after {left_after:?} (want ≤ {bound:?}): {}",
        brief(&during)
    );
    assert!(
        gauge_after.is_some_and(|d| d <= bound),
        "{KEPT} reached 1 after {gauge_after:?} (want ≤ {bound:?}); now {}",
        lb.metric(KEPT)
    );
    assert_eq!(lb.metric(KEPT), 1.0, "{KEPT} while cut");
    let kept = row(&during, lost).cloned().unwrap_or_default();
    assert!(
        kept["decision"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("kept")),
        "the decision about {lost} does not say it is kept: {kept}"
    );
    for g in &greeters[1..] {
        assert!(
            !left_registry(&during, g.addr),
            "{} is registered, yet shows left_registry_s: {}",
            g.addr,
            brief(&during)
        );
    }
    let new_warns = lb.log_lines("WARN")[warns_before..].to_vec();
    assert!(
        new_warns.iter().any(|l| l.contains("left the registry")),
        "no WARN line says a backend left the registry: {new_warns:?}"
    );

    // Heal: the greeter's registration grants itself a new lease and writes
    // its key again; within 2 s of that the LB treats it as registered.
    let t1 = Instant::now();
    drop(cut);
    let mut back_after = None;
    while t1.elapsed() < Duration::from_secs(30) {
        if etcd.keys(PREFIX).await.contains(&key) {
            back_after = Some(t1.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t_key = Instant::now();
    assert!(
        back_after.is_some(),
        "{key} was not written again within 30 s of the heal; see {}",
        greeters[0].proc.log.display()
    );
    let ordinary = wait_until(Duration::from_secs(2), || {
        let v = service(&lb);
        row(&v, lost).is_some_and(|b| !b["left_registry_s"].is_number()) && lb.metric(KEPT) == 0.0
    })
    .await;
    let ordinary_after = t_key.elapsed();
    let end = service(&lb);
    eprintln!(
        "registry gone: the key came back {back_after:?} after the heal; ordinary again \
         {ordinary_after:?} after that: {}",
        brief(&end)
    );
    assert!(
        ordinary,
        "{lost} registered again, yet after 2 s the LB still shows it gone ({KEPT} = {}): {}",
        lb.metric(KEPT),
        brief(&end)
    );
    assert!(
        is_listed(&end, lost) && client_listed(&channel) == n,
        "after the heal: LB {} / client lists {}",
        brief(&end),
        client_listed(&channel)
    );
    let version_after = end["list_version"].as_u64().expect("list_version");
    assert!(
        version_after - version_before <= 2,
        "the LB's list changed {} times over the run (want ≤ 2: no churn): {version_before} -> \
         {version_after}",
        version_after - version_before
    );

    let calls = caller.stop().await;
    judge_calls(&calls, window.as_secs_f64() * 20.0, "registry gone");
    drop((channel, rt, lb, greeters, etcd));
    drop(net);
}

/// Every key of the service is deleted from etcd (the greeters' leases
/// live on, so nobody writes them again), with a grace of 5 s. The grace
/// never empties the service: all three stay listed for 10 s, past it,
/// with `lb_backends_kept_unregistered` = 3. Then the backends still go
/// when their health says so: one stopped gracefully leaves the list
/// within 2 s and no call of a steady caller fails; one turned NOT_SERVING
/// leaves within 2 s; the last one, serving, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_registry_never_empties_the_list() {
    let etcd = Etcd::start().await;
    let registry = etcd.registry_url();
    let grace = Duration::from_secs(5);
    let lb = Lb::start(&[
        "--registry",
        &registry,
        "--health-check-interval",
        "500ms",
        "--deregistration-grace",
        "5s",
    ])
    .await;
    let mut gs = greeters(3, &registry, &[]).await;
    let addrs: Vec<SocketAddr> = gs.iter().map(|g| g.addr).collect();
    let n = addrs.len();
    let (channel, caller) = listed_and_calling(&lb, &addrs).await;
    assert!(
        wait_until(Duration::from_secs(10), || listed(&service(&lb)) == n).await,
        "the LB never listed every backend: {}",
        brief(&service(&lb))
    );

    // The registry empties.
    let deleted = etcd.delete_prefix(PREFIX).await;
    assert_eq!(deleted, n as i64, "keys deleted under {PREFIX}");
    let t0 = Instant::now();
    let hold = Duration::from_secs(10);
    let (mut min_lb, mut min_client) = (n, n);
    let mut first_short: Option<(Duration, String)> = None;
    let mut all_kept_after = None;
    let mut gauge_slipped: Option<(Duration, f64)> = None;
    while t0.elapsed() < hold {
        let at = t0.elapsed();
        let v = service(&lb);
        let (on_lb, on_client) = (listed(&v), client_listed(&channel));
        min_lb = min_lb.min(on_lb);
        min_client = min_client.min(on_client);
        if (on_lb < n || on_client < n) && first_short.is_none() {
            first_short = Some((at, format!("client {on_client}; LB {}", brief(&v))));
        }
        let gauge = lb.metric(KEPT);
        match all_kept_after {
            None if gauge == n as f64 => all_kept_after = Some(at),
            Some(_) if gauge != n as f64 && gauge_slipped.is_none() => {
                gauge_slipped = Some((at, gauge))
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = service(&lb);
    eprintln!(
        "emptied registry: smallest lists over {hold:?}: LB {min_lb}, client {min_client}; {KEPT} \
         = {n} after {all_kept_after:?}, slipped {gauge_slipped:?}; LB {}",
        brief(&kept)
    );
    assert!(
        etcd.keys(PREFIX).await.is_empty(),
        "keys came back under {PREFIX}: the registry did not stay empty"
    );
    assert!(
        min_lb == n && min_client == n,
        "the grace emptied the list: smallest LB {min_lb}, client {min_client} of {n}; first \
         short sample: {first_short:?}"
    );
    assert!(
        all_kept_after.is_some_and(|d| d <= Duration::from_secs(2)),
        "{KEPT} reached {n} after {all_kept_after:?} (want ≤ 2 s of the deletion); now {}",
        lb.metric(KEPT)
    );
    assert!(
        gauge_slipped.is_none(),
        "{KEPT} left {n} while all {n} were kept: {gauge_slipped:?}"
    );
    for a in &addrs {
        let gone_for = row(&kept, *a).and_then(|b| b["left_registry_s"].as_f64());
        assert!(
            gone_for.is_some_and(|s| s > grace.as_secs_f64()),
            "{a}: left_registry_s {gone_for:?} after {hold:?} (want a number past the {grace:?} \
             grace): {}",
            brief(&kept)
        );
    }

    // A graceful stop: NOT_SERVING first, so it goes at once, and no call
    // fails.
    let failures_before = caller.snapshot().failures.len();
    let stopped = gs.remove(0);
    let stopped_addr = stopped.addr;
    let t1 = Instant::now();
    let stopping = stop_gracefully(stopped);
    let left = wait_until(Duration::from_secs(2), || {
        !is_listed(&service(&lb), stopped_addr)
    })
    .await;
    let left_after = t1.elapsed();
    let stopped = stopping.await.expect("graceful stop");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = caller.snapshot();
    let failed_in_stop = calls.failures[failures_before..].to_vec();
    eprintln!(
        "emptied registry: a graceful stop left the list after {left_after:?}; calls failed \
         meanwhile: {failed_in_stop:?}"
    );
    assert!(
        left,
        "{stopped_addr}, stopped gracefully, still listed after 2 s: {}",
        brief(&service(&lb))
    );
    assert!(
        failed_in_stop.is_empty(),
        "calls failed during a graceful stop: {failed_in_stop:?}"
    );

    // NOT_SERVING: it goes within 2 s; the last one stays.
    let t2 = Instant::now();
    assert!(
        !gs[0].toggle_health().await,
        "the greeter turned NOT_SERVING"
    );
    let sick = gs[0].addr;
    let left = wait_until(Duration::from_secs(2), || !is_listed(&service(&lb), sick)).await;
    let sick_after = t2.elapsed();
    let end = service(&lb);
    eprintln!(
        "emptied registry: NOT_SERVING left the list after {sick_after:?}; {KEPT} = {}; LB {}",
        lb.metric(KEPT),
        brief(&end)
    );
    assert!(
        left,
        "{sick}, NOT_SERVING, still listed after 2 s: {}",
        brief(&end)
    );
    assert!(
        is_listed(&end, gs[1].addr) && listed(&end) == 1,
        "the last serving backend must stay, alone: {}",
        brief(&end)
    );

    let calls = caller.stop().await;
    eprintln!(
        "emptied registry: {} calls ok, {} failed over the run",
        calls.ok(),
        calls.failures.len()
    );
    drop((channel, lb, gs, stopped, etcd));
}

/// A graceful stop (SIGTERM: NOT_SERVING, deregister, drain) with the
/// default grace: the backend leaves the list within 2 s, is never kept
/// (`lb_backends_kept_unregistered` stays 0, sampled through the stop and
/// after), and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_deregistration_leaves_at_once() {
    let (etcd, lb, mut gs) = etcd_cluster(3, &[]).await;
    let addrs: Vec<SocketAddr> = gs.iter().map(|g| g.addr).collect();
    let (channel, caller) = listed_and_calling(&lb, &addrs).await;
    assert!(
        wait_until(Duration::from_secs(10), || listed(&service(&lb))
            == addrs.len())
        .await,
        "the LB never listed every backend: {}",
        brief(&service(&lb))
    );
    let kept_before = lb.metric(KEPT);

    let leaving = gs.remove(1);
    let addr = leaving.addr;
    let key = format!("{PREFIX}{addr}");
    let t0 = Instant::now();
    let stopping = stop_gracefully(leaving);
    let watch = Duration::from_secs(5);
    let mut left_after = None;
    let mut max_kept = kept_before;
    let mut kept_seen: Option<(Duration, String)> = None;
    while t0.elapsed() < watch {
        let at = t0.elapsed();
        let v = service(&lb);
        if left_after.is_none() && !is_listed(&v, addr) {
            left_after = Some(at);
        }
        let kept = lb.metric(KEPT);
        if kept > 0.0 && kept_seen.is_none() {
            kept_seen = Some((at, brief(&v)));
        }
        max_kept = max_kept.max(kept);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leaving = stopping.await.expect("graceful stop");
    let end = service(&lb);
    eprintln!(
        "graceful deregistration: left the list after {left_after:?}; most {KEPT} {max_kept}; LB \
         {}",
        brief(&end)
    );
    assert!(
        !etcd.keys(PREFIX).await.contains(&key),
        "{key} is still in etcd: the stop did not deregister"
    );
    assert!(
        left_after.is_some_and(|d| d <= Duration::from_secs(2)),
        "{addr}, deregistered gracefully, left the list after {left_after:?} (want ≤ 2 s): {}",
        brief(&end)
    );
    assert!(
        max_kept == 0.0,
        "{KEPT} reached {max_kept} for a graceful deregistration; first: {kept_seen:?}"
    );
    assert_eq!(
        listed(&end),
        addrs.len() - 1,
        "the others stay: {}",
        brief(&end)
    );
    let calls = caller.stop().await;
    assert!(
        calls.failures.is_empty(),
        "calls failed during a graceful stop: {:?}",
        calls.failures
    );
    drop((channel, lb, gs, leaving, etcd));
}
