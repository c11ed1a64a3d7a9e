//! Gray failures, end to end: stock grpc-go backends whose health checks
//! always pass while some of their calls fail (`-fail-code 14 -fail-rate`),
//! many `LbChannel` clients each calling at a low rate and reporting what
//! they see per backend (LRS), and the LB judging the pooled evidence:
//! the failing backend leaves every client's list, one lying reporter
//! ejects nothing, and the ejection cap holds the rest with an alert.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::stock::{stock_cluster_of, stock_fleet_of, stock_fleet_with, StockClient};
use lb_tests::{wait_until, Lb};

/// Clients: each its own `LbChannel` (its own client id, so its own
/// reporter to the LB).
const CLIENTS: usize = 20;

/// `n` channels to `lb`, each ready with `backends` backends.
async fn clients(lb: &Lb, n: usize, backends: usize) -> Vec<LbChannel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            LbChannel::builder("greeter")
                .lb(lb.addr.to_string())
                .build()
                .expect("channel"),
        );
    }
    for c in &out {
        assert!(
            wait_until(Duration::from_secs(10), || c.ready_backends().len()
                == backends)
            .await,
            "a client never connected to the {backends} backends"
        );
    }
    out
}

/// Every client calls once per `every` until `stop`, counting failures
/// (bounded: at most `limit` in all).
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(channels: &[LbChannel], every: Duration, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks = channels
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (stop, failures, calls) = (stop.clone(), failures.clone(), calls.clone());
                let mut client = GreeterClient::new(c.clone());
                tokio::spawn(async move {
                    // Spread the clients over the interval.
                    tokio::time::sleep(every * i as u32 / 20).await;
                    let end = Instant::now() + limit;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        let mut request = tonic::Request::new(HelloRequest {
                            name: "gray".into(),
                        });
                        request.set_timeout(Duration::from_secs(2));
                        calls.fetch_add(1, Ordering::Relaxed);
                        if client.say_hello(request).await.is_err() {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(every).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            failures,
            calls,
            tasks,
        }
    }

    fn failures(&self) -> usize {
        self.failures.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// One lying reporter ("liar") over LRS to `lb`: for `length`, it claims 50
/// calls a second to `victim`, every one failed. Ends after `length`.
async fn lie_about(
    lb: &Lb,
    victim: std::net::SocketAddr,
    length: Duration,
) -> tokio::task::JoinHandle<()> {
    use lb_proto::envoy::service::load_stats::v3::{
        load_reporting_service_client::LoadReportingServiceClient, ClusterStats, LoadStatsRequest,
        Locality, Node, UpstreamLocalityStats,
    };
    let report = move |node: Option<Node>| LoadStatsRequest {
        node,
        cluster_stats: vec![ClusterStats {
            cluster_name: "greeter".into(),
            upstream_locality_stats: vec![UpstreamLocalityStats {
                locality: Some(Locality {
                    sub_zone: victim.to_string(),
                    ..Default::default()
                }),
                total_issued_requests: 50,
                total_error_requests: 50,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let node = Node {
        id: "liar".into(),
        ..Default::default()
    };
    tx.send(report(Some(node)))
        .await
        .expect("first report queued");
    let mut lrs = LoadReportingServiceClient::connect(format!("http://{}", lb.addr))
        .await
        .expect("LRS connect");
    let answers = lrs
        .stream_load_stats(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("LRS stream");
    tokio::spawn(async move {
        let _answers = answers;
        let end = Instant::now() + length;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if tx.send(report(None)).await.is_err() {
                return;
            }
        }
    })
}

/// The LB's JSON for the greeter backend at `addr` (null when not there).
fn backend(lb: &Lb, addr: std::net::SocketAddr) -> serde_json::Value {
    lb.backends("greeter")
        .into_iter()
        .find(|b| b["address"] == addr.to_string())
        .unwrap_or_default()
}

/// The detector's state of the backend at `addr` (`"admitted"` when it
/// never said anything).
fn gray_state(lb: &Lb, addr: std::net::SocketAddr) -> (String, String) {
    Some(backend(lb, addr))
        .filter(|b| !b.is_null())
        .map(|b| {
            (
                b["gray"]["state"]
                    .as_str()
                    .unwrap_or("admitted")
                    .to_string(),
                b["gray"]["why"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_default()
}

/// 20 clients at 1 call/s each against 5 backends, one failing 30 % of
/// its calls (its health checks pass): no client alone has the evidence
/// (each sends it a call every 5 s), the pool does. It leaves every
/// client's list within seconds, and the clients' failures stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_thirty_percent_leaves_every_clients_list() {
    let gray: &[&str] = &["-fail-code", "14", "-fail-rate", "0.3"];
    let (lb, backends, _registrations) = stock_fleet_of(&[&[], &[], gray, &[], &[]]).await;
    let bad = backends[2].addr;
    let channels = clients(&lb, CLIENTS, 5).await;
    // A stock grpc-go grpclb client beside them: it reports nothing per
    // backend, and gets the ejection in its list all the same.
    let stock = StockClient::go(
        lb.addr,
        "greeter",
        Duration::from_secs(15),
        Duration::from_millis(50),
    );
    let started = Instant::now();
    let load = Load::start(&channels, Duration::from_secs(1), Duration::from_secs(40));
    let out_of_every_list = wait_until(Duration::from_secs(20), || {
        channels.iter().all(|c| !c.listed_backends().contains(&bad))
    })
    .await;
    let took = started.elapsed();
    let (state, why) = gray_state(&lb, bad);
    eprintln!("gray: 30 % failing backend out of all {CLIENTS} clients' lists after {took:?}; {state}: {why}");
    assert!(
        out_of_every_list,
        "the failing backend stayed listed: {state} {why}"
    );
    assert!(took <= Duration::from_secs(15), "ejection took {took:?}");
    assert_eq!(state, "ejected", "{why}");
    assert!(why.contains("% errors from"), "{why}");
    assert_eq!(lb.metric("lb_gray_ejected{service=\"greeter\"}"), 1.0);
    assert!(lb.metric("lb_gray_ejections_total{service=\"greeter\"}") >= 1.0);
    // Every other backend stays, and the clients' failures stop.
    for c in &channels {
        assert_eq!(c.listed_backends().len(), 4);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = load.failures();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = load.failures();
    let calls = load.calls.load(Ordering::Relaxed);
    load.stop().await;
    eprintln!("gray: {before} failed calls before the ejection took hold, {} in the 5 s after ({calls} calls in all)", after - before);
    assert_eq!(after, before, "calls still failed after the ejection");
    let go = stock.finish(Duration::from_secs(30)).await;
    let calls = go["calls"].as_u64().unwrap_or(0) as f64;
    let to_bad = go["per_backend"][bad.to_string()].as_u64().unwrap_or(0) as f64;
    eprintln!("gray: the grpc-go grpclb client sent {to_bad} of {calls} calls to the failing backend (a fifth is its fair share)");
    assert!(calls > 100.0, "{go}");
    assert!(
        to_bad < 0.14 * calls,
        "the stock grpclb client kept calling the ejected backend: {go}"
    );
}

/// One client that reports every call to a healthy backend as failed
/// (over its own LRS stream) beside ten honest clients: nothing is
/// ejected, though the lie is in the evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lying_client_ejects_nothing() {
    let (lb, backends, _registrations) = stock_fleet_of(&[&[], &[], &[]]).await;
    let victim = backends[0].addr;
    let channels = clients(&lb, 10, 3).await;
    let load = Load::start(
        &channels,
        Duration::from_millis(200),
        Duration::from_secs(30),
    );
    // The liar: 50 calls a second to the victim, every one "failed".
    let lies = lie_about(&lb, victim, Duration::from_secs(12)).await;
    let _ = lies.await;
    let outcomes = backend(&lb, victim)["outcomes"].clone();
    let (state, why) = gray_state(&lb, victim);
    load.stop().await;
    eprintln!("gray: the lied-about backend: {state} {why}; outcomes {outcomes}");
    assert!(
        outcomes["errors"].as_u64().unwrap_or(0) >= 500,
        "the lies never reached the evidence: {outcomes}"
    );
    assert_eq!(outcomes["reporters"].as_u64(), Some(11), "{outcomes}");
    assert_eq!(
        state, "admitted",
        "one lying client ejected a healthy backend: {why}"
    );
    assert_eq!(
        lb.metric("lb_gray_ejections_total{service=\"greeter\"}"),
        0.0
    );
}

/// 4 of 10 backends failing half their calls: the cap (10 %: one backend)
/// ejects the worst, the other three are held in the list with an alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ejection_cap_holds_the_rest_with_an_alert() {
    let gray: &[&str] = &["-fail-code", "14", "-fail-rate", "0.5"];
    let fleet: Vec<&[&str]> = (0..10)
        .map(|i| if i % 3 == 0 { gray } else { &[][..] })
        .collect();
    let (lb, backends, _registrations) = stock_fleet_of(&fleet).await;
    let channels = clients(&lb, CLIENTS, 10).await;
    let load = Load::start(
        &channels,
        Duration::from_millis(250),
        Duration::from_secs(40),
    );
    let held = wait_until(Duration::from_secs(20), || {
        lb.metric("lb_gray_ejected{service=\"greeter\"}") == 1.0
            && lb.metric("lb_gray_held{service=\"greeter\"}") == 3.0
    })
    .await;
    let states: Vec<(String, String)> = backends.iter().map(|b| gray_state(&lb, b.addr)).collect();
    load.stop().await;
    eprintln!("gray: cap: {states:?}");
    assert!(held, "not one ejected and three held: {states:?}");
    // Held backends stay in every list; only the ejected one left.
    for c in &channels {
        assert_eq!(c.listed_backends().len(), 9, "{states:?}");
    }
    let ejected = states.iter().filter(|(s, _)| s == "ejected").count();
    assert_eq!(ejected, 1, "{states:?}");
    for (i, (s, why)) in states.iter().enumerate() {
        if i % 3 == 0 && s != "ejected" {
            assert_eq!(s, "held", "backend {i}: {why}");
            assert!(why.contains("cap"), "{why}");
        }
        if i % 3 != 0 {
            assert_eq!(s, "admitted", "a healthy backend {i} was judged: {why}");
        }
    }
}

/// The weight factor and list entries of the backend at `addr`.
fn weighting(lb: &Lb, addr: std::net::SocketAddr) -> (f64, u64) {
    Some(backend(lb, addr))
        .filter(|b| !b.is_null())
        .map(|b| {
            (
                b["gray"]["weight_factor"].as_f64().unwrap_or(1.0),
                b["list_entries"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

/// A backend whose every answer takes 40 ms more than its peers' (stock
/// grpc-go with `-delay`, health always SERVING) is de-weighted within
/// 15 s: its share of every list shrinks, and no peer is judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_is_deweighted_within_fifteen_seconds() {
    let slow: &[&str] = &["-delay", "40ms"];
    let fleet: Vec<&[&str]> = (0..5)
        .map(|i| if i == 0 { slow } else { &[][..] })
        .collect();
    let (lb, backends, _registrations) = stock_fleet_of(&fleet).await;
    let channels = clients(&lb, CLIENTS, 5).await;
    let load = Load::start(&channels, Duration::from_secs(1), Duration::from_secs(40));
    let started = Instant::now();
    let deweighted = wait_until(Duration::from_secs(15), || {
        gray_state(&lb, backends[0].addr).0 == "deweighted"
    })
    .await;
    let took = started.elapsed();
    let weights: Vec<(f64, u64)> = backends.iter().map(|b| weighting(&lb, b.addr)).collect();
    let states: Vec<(String, String)> = backends.iter().map(|b| gray_state(&lb, b.addr)).collect();
    load.stop().await;
    eprintln!("gray: slow backend de-weighted after {took:?}: weights {weights:?}; {states:?}");
    assert!(
        deweighted,
        "the slow backend was not de-weighted in 15 s: {states:?}"
    );
    assert!(weights[0].0 < 1.0, "{weights:?}");
    let fewest_peer = weights[1..].iter().map(|w| w.1).min().unwrap_or(0);
    assert!(
        weights[0].1 < fewest_peer,
        "the slow backend kept its share of the list: {weights:?}"
    );
    for (i, (s, why)) in states.iter().enumerate().skip(1) {
        assert_eq!(s, "admitted", "a peer {i} was judged: {why}");
    }
}

/// An ejection ends in probation (listed again, at a fifth of its
/// weight, its evidence afresh), and a backend that still fails there is
/// ejected again, for twice as long: its passing health checks never
/// re-admit it. With `--gray-base-ejection 3s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_still_failing_on_probation_is_ejected_again_for_longer() {
    let gray: &[&str] = &["-fail-code", "14", "-fail-rate", "0.3"];
    let fleet: Vec<&[&str]> = (0..5)
        .map(|i| if i == 0 { gray } else { &[][..] })
        .collect();
    let (lb, backends, _registrations) =
        stock_fleet_with(&["--gray-base-ejection", "3s"], &fleet).await;
    let channels = clients(&lb, CLIENTS, 5).await;
    let load = Load::start(
        &channels,
        Duration::from_millis(250),
        Duration::from_secs(60),
    );
    let addr = backends[0].addr;
    let phase = |want: &'static str, why: &'static str| {
        let lb = &lb;
        move || {
            let (s, w) = gray_state(lb, addr);
            s == want && w.contains(why)
        }
    };
    let first = wait_until(Duration::from_secs(15), phase("ejected", "(ejection 1)")).await;
    assert!(first, "never ejected: {:?}", gray_state(&lb, addr));
    let probation = wait_until(Duration::from_secs(10), phase("probation", "")).await;
    let probation_began = Instant::now();
    let on_probation = weighting(&lb, addr);
    let peers_entries = weighting(&lb, backends[1].addr).1;
    assert!(
        probation,
        "no probation after the ejection: {:?}",
        gray_state(&lb, addr)
    );
    // Listed again, at a fraction of its weight.
    let listed_again = wait_until(Duration::from_secs(5), || {
        channels.iter().any(|c| c.listed_backends().contains(&addr))
    })
    .await;
    let again = wait_until(Duration::from_secs(20), phase("ejected", "(ejection 2)")).await;
    let probation_lasted = probation_began.elapsed();
    let state = gray_state(&lb, addr);
    load.stop().await;
    eprintln!(
        "gray: on probation {on_probation:?} (a peer: {peers_entries} list entries) for {probation_lasted:?}; then {state:?}"
    );
    assert!(listed_again, "clients never listed it on probation");
    assert!(
        on_probation.0 < 1.0,
        "full weight on probation: {on_probation:?}"
    );
    assert!(
        on_probation.1 < peers_entries,
        "its full share of the list on probation: {on_probation:?} against {peers_entries}"
    );
    // Judged afresh on probation: the errors that ejected it do not
    // re-eject it at the next tick; new calls must.
    assert!(
        probation_lasted >= Duration::from_secs(2),
        "re-ejected {probation_lasted:?} into probation, before new evidence could come"
    );
    assert!(again, "not ejected again on probation: {state:?}");
    assert!(state.1.contains("ejected for 6s"), "{state:?}");
}

/// The backends `lb` ejects now.
fn ejected_set(lb: &Lb, backends: &[lb_tests::stock::StockBackend]) -> Vec<std::net::SocketAddr> {
    backends
        .iter()
        .filter(|b| gray_state(lb, b.addr).0 == "ejected")
        .map(|b| b.addr)
        .collect()
}

/// Three replicas over one etcd: two with half the clients each, so each
/// judges from its own clients' reports only, and one with no clients at
/// all. 4 of 10 backends fail half their calls. Each of the two alone
/// would eject the worst by its own evidence; sharing their verdicts,
/// both eject the same one (the oldest vote in etcd wins the cap) and hold
/// the other three, the third, which has no evidence of its own, ejects
/// that one on their votes, and every client drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_publish_one_ejected_set() {
    let gray: &[&str] = &["-fail-code", "14", "-fail-rate", "0.5"];
    let fleet: Vec<&[&str]> = (0..10)
        .map(|i| if i % 3 == 0 { gray } else { &[][..] })
        .collect();
    let (_etcd, lbs, backends, _registrations) =
        stock_cluster_of(3, &["--gray-base-ejection", "60s"], &fleet).await;
    let mut channels = clients(&lbs[0], CLIENTS / 2, 10).await;
    channels.extend(clients(&lbs[1], CLIENTS / 2, 10).await);
    let load = Load::start(
        &channels,
        Duration::from_millis(250),
        Duration::from_secs(50),
    );
    let agreed = || {
        let sets: Vec<_> = lbs.iter().map(|lb| ejected_set(lb, &backends)).collect();
        sets[0].len() == 1
            && sets.iter().all(|s| *s == sets[0])
            && lbs[..2]
                .iter()
                .all(|lb| lb.metric("lb_gray_held{service=\"greeter\"}") == 3.0)
    };
    let started = Instant::now();
    let converged = wait_until(Duration::from_secs(25), agreed).await;
    let took = started.elapsed();
    let states = |lb: &Lb| -> Vec<(String, String)> {
        backends.iter().map(|b| gray_state(lb, b.addr)).collect()
    };
    assert!(
        converged,
        "the replicas never agreed on one ejected backend and three held: lb1 {:?}, lb2 {:?}, lb3 {:?}",
        states(&lbs[0]),
        states(&lbs[1]),
        states(&lbs[2])
    );
    // And they stay agreed while the evidence keeps coming.
    let mut disagreements = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !agreed() {
            disagreements += 1;
        }
    }
    assert_eq!(disagreements, 0, "the replicas' ejected sets parted");
    let ejected = ejected_set(&lbs[0], &backends);
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    let judged_by: Vec<serde_json::Value> = lbs
        .iter()
        .map(|lb| backend(lb, ejected[0])["gray"]["judged_by"].clone())
        .collect();
    eprintln!(
        "gray: replicas agreed on {ejected:?} after {took:?}; judged by (lb1, lb2, lb3): {judged_by:?}; \
         lb1 {:?}; lb2 {:?}",
        states(&lbs[0]),
        states(&lbs[1])
    );
    load.stop().await;
    // The replica without clients ejected it on another's vote.
    assert!(
        judged_by[2] == "lb1" || judged_by[2] == "lb2",
        "lb3 did not adopt a vote: {judged_by:?}"
    );
    for c in &channels {
        let listed = c.listed_backends();
        assert_eq!(listed.len(), 9, "a client's list: {listed:?}");
        assert!(
            !listed.contains(&ejected[0]),
            "a client still lists {ejected:?}"
        );
    }
    for lb in &lbs {
        assert_eq!(lb.metric("lb_cluster_degraded"), 0.0);
    }
}

/// The same gray failure seen only by stock xDS clients (C-core through
/// Python grpcio): their LRS per-locality reports (each backend its own
/// locality) are the evidence, and the ejection reaches their EDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_xds_clients_evidence_ejects_and_they_stop_calling_it() {
    const XDS_CLIENTS: usize = 6;
    let gray: &[&str] = &["-fail-code", "14", "-fail-rate", "0.3"];
    let (lb, backends, _registrations) = stock_fleet_of(&[&[], &[], gray, &[], &[]]).await;
    let bad = backends[2].addr;
    let server = lb.addr.to_string();
    let (run, pace) = (Duration::from_secs(25), Duration::from_millis(200));
    let clients: Vec<StockClient> = (0..XDS_CLIENTS)
        .map(|i| StockClient::xds_grpcio(&server, "greeter", &format!("xds-{i}"), run, pace))
        .collect();
    let started = Instant::now();
    let ejected = wait_until(Duration::from_secs(25), || {
        gray_state(&lb, bad).0 == "ejected"
    })
    .await;
    let took = started.elapsed();
    let (state, why) = gray_state(&lb, bad);
    eprintln!("gray: xDS clients only: {state} after {took:?} (process start included): {why}");
    assert!(
        ejected,
        "the xDS clients' evidence ejected nothing: {state} {why}"
    );
    let mut to_bad = 0;
    let mut calls = 0;
    for c in clients {
        let summary = c.finish(Duration::from_secs(60)).await;
        calls += summary["calls"].as_u64().unwrap_or(0);
        to_bad += summary["per_backend"][bad.to_string()]
            .as_u64()
            .unwrap_or(0);
    }
    eprintln!("gray: the xDS clients sent {to_bad} of {calls} calls to the failing backend (a fifth is its fair share)");
    assert!(calls > 200, "too few calls: {calls}");
    assert!(
        (to_bad as f64) < 0.15 * calls as f64,
        "the xDS clients kept calling the ejected backend: {to_bad} of {calls}"
    );
}

/// 5 % failures against a fleet failing 0.5 %, 50 calls/s in all from 10
/// clients: a small excess needs more calls to be told from noise, and is
/// ejected once there are enough (a few hundred of the backend's calls:
/// 30 s at the median of six runs, 57 s at the slowest; the bound below
/// leaves room for an unlucky draw, not for a detector that waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_against_a_half_percent_fleet_is_ejected() {
    let noise: &[&str] = &["-fail-code", "14", "-fail-rate", "0.005"];
    let gray: &[&str] = &["-fail-code", "14", "-fail-rate", "0.05"];
    let (lb, backends, _registrations) = stock_fleet_of(&[noise, noise, gray, noise, noise]).await;
    let bad = backends[2].addr;
    let channels = clients(&lb, 10, 5).await;
    let started = Instant::now();
    let load = Load::start(
        &channels,
        Duration::from_millis(200),
        Duration::from_secs(100),
    );
    let ejected = wait_until(Duration::from_secs(90), || {
        gray_state(&lb, bad).0 == "ejected"
    })
    .await;
    let took = started.elapsed();
    let states: Vec<String> = backends.iter().map(|b| gray_state(&lb, b.addr).0).collect();
    let (_, why) = gray_state(&lb, bad);
    load.stop().await;
    eprintln!("gray: 5 % against 0.5 %: ejected {ejected} after {took:?}: {why}; all: {states:?}");
    assert!(
        ejected,
        "a backend failing 5 % was never ejected: {states:?}"
    );
    assert!(took <= Duration::from_secs(85), "took {took:?}");
    assert_eq!(
        states.iter().filter(|s| *s == "ejected").count(),
        1,
        "a noisy backend was ejected too: {states:?}"
    );
}

/// How long the no-false-ejection test runs: a minute in the suite, and
/// as long as `LB_GRAY_NOISE_SECS` says (10 to 3,600 s) for the ten-minute
/// run (`LB_GRAY_NOISE_SECS=600 cargo test --release --test gray -- noise`).
fn noise_run() -> Duration {
    let secs = std::env::var("LB_GRAY_NOISE_SECS")
        .ok()
        .map(|v| v.parse::<u64>().expect("LB_GRAY_NOISE_SECS: whole seconds"))
        .unwrap_or(60);
    assert!(
        (10..=3600).contains(&secs),
        "LB_GRAY_NOISE_SECS={secs}: give 10 to 3600 seconds"
    );
    Duration::from_secs(secs)
}

/// No false ejection: every backend fails 2 % of calls (the fleet's
/// noise), the callers cancel or time out a share of their calls on
/// their own, and one lying reporter claims every call to one backend
/// failed: for the whole run, nothing is ejected, held or de-weighted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_the_callers_own_ends_and_a_liar_eject_nothing() {
    let length = noise_run();
    let noise: &[&str] = &["-fail-code", "14", "-fail-rate", "0.02", "-delay", "20ms"];
    let (lb, backends, _registrations) = stock_fleet_of(&[noise; 5]).await;
    let channels = clients(&lb, 10, 5).await;
    let load = Load::start(&channels, Duration::from_millis(100), length);
    let victim = backends[0].addr;
    let lies = lie_about(&lb, victim, length).await;
    // Callers of their own: some give up after 10 ms, some carry a 10 ms
    // deadline, against answers that take 20 ms.
    let impatient: Vec<_> = channels
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, c)| {
            let mut client = GreeterClient::new(c.clone());
            tokio::spawn(async move {
                let end = Instant::now() + length;
                while Instant::now() < end {
                    let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
                    if i % 2 == 0 {
                        request.set_timeout(Duration::from_millis(10));
                        let _ = client.say_hello(request).await;
                    } else {
                        let _ = tokio::time::timeout(
                            Duration::from_millis(10),
                            client.say_hello(request),
                        )
                        .await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    let mut judged = Vec::new();
    let end = Instant::now() + length;
    while Instant::now() < end {
        for b in &backends {
            let (state, why) = gray_state(&lb, b.addr);
            if state != "admitted" {
                judged.push(format!("{}: {state}: {why}", b.addr));
            }
        }
        if !judged.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for t in impatient {
        let _ = t.await;
    }
    let _ = lies.await;
    let failures = load.failures();
    load.stop().await;
    let outcomes: Vec<serde_json::Value> = lb
        .backends("greeter")
        .into_iter()
        .map(|b| b["outcomes"].clone())
        .collect();
    eprintln!(
        "gray: {length:?} of 2 % noise, impatient callers and a liar: {failures} failed calls; outcomes {outcomes:?}"
    );
    let lied_about = backend(&lb, victim)["outcomes"].clone();
    assert_eq!(
        lied_about["reporters"].as_u64(),
        Some(11),
        "the liar never reached the evidence: {lied_about}"
    );
    assert!(judged.is_empty(), "false verdicts: {judged:?}");
    assert!(failures > 0, "the noise never showed");
    let cancelled: u64 = outcomes
        .iter()
        .map(|o| {
            o["cancelled_by_caller"].as_u64().unwrap_or(0)
                + o["deadline_exceeded"].as_u64().unwrap_or(0)
        })
        .sum();
    assert!(
        cancelled > 100,
        "the callers' own ends never showed: {outcomes:?}"
    );
    assert_eq!(
        lb.metric("lb_gray_ejections_total{service=\"greeter\"}"),
        0.0
    );
}
