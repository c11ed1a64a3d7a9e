//! Network faults between test hosts (DESIGN §8), on real kernel
//! networking: each process on a host of its own (a network namespace)
//! behind one router, and the fault a set of packets the router drops, with
//! no RST and no ICMP. Killing or stopping a process is not a network
//! fault: here both ends stay up and only the path between them dies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::netns::Net;
use lb_tests::scenario::{
    assert_connected, channel_on, checkers, joined, listed, replica_args, replica_in, service,
    wait_formed, StockClients, CHANNEL_ID,
};
use lb_tests::{greeters_in, wait_until, Etcd, Greeter, Lb};

/// Calls made by a steady caller: ok and failed, with the last failure.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Load {
    fn success(&self) -> f64 {
        let ok = self.ok.load(Ordering::SeqCst) as f64;
        let failed = self.failed.load(Ordering::SeqCst) as f64;
        ok / (ok + failed).max(1.0)
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// One call every `every`, each with a 1 s deadline, until stopped.
async fn steady_calls(channel: LbChannel, load: Arc<Load>, every: Duration) {
    let mut client = GreeterClient::new(channel);
    let mut tick = tokio::time::interval(every);
    while !load.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let mut request = tonic::Request::new(HelloRequest {
            name: "steady".into(),
        });
        request.set_timeout(Duration::from_secs(1));
        match client.say_hello(request).await {
            Ok(_) => {
                load.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                load.failed.fetch_add(1, Ordering::SeqCst);
                *load.last_error.lock().unwrap() = Some(e.to_string());
            }
        }
    }
}

/// What happens between a client host and the LB replica its clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientLbFault {
    /// Packets dropped both ways in the router: silence, no RST.
    Blackhole,
    /// The LB process SIGSTOPped: its kernel still acknowledges, nothing
    /// answers.
    Stopped,
    /// The LB host's kernel kills every socket to the client host
    /// (`ss -K`): RSTs.
    Reset,
}

/// Whether `lb` holds a BalanceLoad stream of the channel under test.
fn holds_channel(lb: &Lb) -> bool {
    lb.json("/api/v1/clients")["clients"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["client_id"] == CHANNEL_ID))
}

/// Clients on one host call through LB replicas on two others while `kind`
/// strikes between the client host and the replica they use, for `hold`.
/// Every client keeps calling on its last list (≥ 99.9 % success):
/// `LbChannel`, which knows both replicas and moves to the other one
/// within `move_within`, getting a list from it within 1 s; and stock
/// grpc-go grpclb and C-core (grpcio) xDS clients, which know only the one
/// LB. The struck replica holds no stream of the channel within 20 s of
/// being able to tell (at once after a reset, from the fault's start for a
/// blackhole, from SIGCONT for a stop); the channel then stays where it
/// moved, and its backend connections are never touched.
async fn client_lb_fault(kind: ClientLbFault, hold: Duration, move_within: Duration) {
    let net = Net::new();
    let (lb1_host, lb2_host) = (net.host(), net.host());
    let backend_hosts = [net.host(), net.host()];
    let client_host = net.host();

    let backends: Vec<SocketAddr> = backend_hosts.iter().map(|h| h.addr(50051)).collect();
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.json");
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    std::fs::write(&services, format!("{{\"greeter\": [{}]}}", list.join(", "))).unwrap();
    let registry = format!("file://{}", services.display());

    let mut greeters = Vec::new();
    for h in &backend_hosts {
        greeters.push(Greeter::start_in(h, 50051, "none", &[]).await);
    }
    let lb1 = Lb::start_in(&lb1_host, &["--registry", &registry]).await;
    let lb2 = Lb::start_in(&lb2_host, &["--registry", &registry]).await;
    for lb in [&lb1, &lb2] {
        let listed = wait_until(Duration::from_secs(10), || {
            lb.backends("greeter")
                .iter()
                .filter(|b| b["list_entries"].as_u64().unwrap_or(0) > 0)
                .count()
                == 2
        })
        .await;
        assert!(listed, "an LB never listed both backends");
    }

    // The client, on its own host: an in-process LbChannel on a runtime
    // whose threads live there.
    let rt = client_host.ns.runtime();
    let channel = channel_on(&rt, &[lb1.addr, lb2.addr], Some(CHANNEL_ID));
    assert_connected(
        &channel,
        2,
        Duration::from_secs(10),
        "the client never connected to both backends",
    )
    .await;
    // The channel starts on either replica: `used` is the one it is on.
    assert!(wait_until(Duration::from_secs(5), || channel.current_lb().is_some()).await);
    let (used, used_host, other, lbs) = if channel.current_lb() == Some(lb1.addr) {
        (lb1.addr, &lb1_host, lb2.addr, [&lb1, &lb2])
    } else {
        (lb2.addr, &lb2_host, lb1.addr, [&lb2, &lb1])
    };
    let [used_lb, other_lb] = lbs;
    let load = Arc::new(Load::default());
    let caller = rt.spawn(steady_calls(
        channel.clone(),
        load.clone(),
        Duration::from_millis(20),
    ));
    // Beside it, on the same host, stock clients of the same LB: grpc-go's
    // grpclb policy and C-core's xDS client (grpcio), for the whole run.
    let stock_for = hold + Duration::from_secs(12);
    let interval = Duration::from_millis(50);
    let stock = StockClients::start_in(&client_host, used, stock_for, interval);
    stock.wait_reached(used_lb, &client_host, "the LB").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = channel.counters();

    let t0 = Instant::now();
    let cut = match kind {
        ClientLbFault::Blackhole => Some(net.cut(&client_host, used_host)),
        ClientLbFault::Stopped => {
            used_lb.proc.signal(libc::SIGSTOP);
            None
        }
        ClientLbFault::Reset => {
            used_host.ns.kill_sockets_to(client_host.ip);
            None
        }
    };
    let moved = wait_until(Duration::from_secs(15), || {
        channel.current_lb() == Some(other)
    })
    .await;
    let moved_after = t0.elapsed();
    assert!(
        moved,
        "{kind:?}: the channel stayed off the other LB for 15 s: {:?}",
        channel.current_lb()
    );
    // The other LB's first list arrives within 1 s of the move.
    let listed = wait_until(Duration::from_secs(1), || {
        channel.counters().lists > before.lists
    })
    .await;
    assert!(
        listed,
        "{kind:?}: no list from the other LB within 1 s of the move"
    );
    assert_eq!(channel.listed_backends().len(), 2, "the list is whole");
    eprintln!("{kind:?}: the channel moved to the other LB after {moved_after:?}");
    assert!(
        moved_after <= move_within,
        "{kind:?}: the channel moved after {moved_after:?} (want ≤ {move_within:?})"
    );
    assert!(holds_channel(other_lb));

    // A stopped LB answers nothing, its admin port included: it is asked
    // only once it runs again.
    if kind != ClientLbFault::Stopped {
        let reaped = wait_until(Duration::from_secs(25), || !holds_channel(used_lb)).await;
        let reaped_after = t0.elapsed();
        eprintln!("{kind:?}: the dead stream reaped after {reaped_after:?}");
        assert!(
            reaped,
            "{kind:?}: the struck LB still holds the dead stream after 25 s"
        );
        assert!(
            reaped_after <= Duration::from_secs(20),
            "{kind:?}: the struck LB reaped the dead stream after {reaped_after:?} (want ≤ 20 s)"
        );
    }

    // The rest of the fault: everyone keeps calling on their lists.
    tokio::time::sleep(hold.saturating_sub(t0.elapsed())).await;
    drop(cut);
    if kind == ClientLbFault::Stopped {
        used_lb.proc.signal(libc::SIGCONT);
        let t1 = Instant::now();
        let reaped = wait_until(Duration::from_secs(25), || !holds_channel(used_lb)).await;
        eprintln!(
            "{kind:?}: after SIGCONT the dead stream went in {:?}",
            t1.elapsed()
        );
        assert!(
            reaped && t1.elapsed() <= Duration::from_secs(20),
            "{kind:?}: the resumed LB still holds the channel's old stream after {:?}",
            t1.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    load.stop.store(true, Ordering::SeqCst);
    caller.await.expect("caller");
    let (ok, failed) = load.counts();
    eprintln!(
        "{kind:?}: LbChannel {ok} ok, {failed} failed ({:.3} %); last error: {:?}",
        100.0 * load.success(),
        load.last_error.lock().unwrap()
    );
    assert!(
        ok as f64 >= hold.as_secs_f64() * 30.0,
        "too few calls to judge: {ok}"
    );
    assert!(
        load.success() >= 0.999,
        "{kind:?}: {failed} of {} calls failed; last: {:?}",
        ok + failed,
        load.last_error.lock().unwrap()
    );

    // The stock clients kept calling on their last lists.
    stock
        .finish(
            Duration::from_secs(60),
            hold.as_secs_f64() * 10.0,
            &format!("{kind:?}"),
        )
        .await;

    // After the fault: LbChannel stays where it moved, the struck LB holds
    // no stream of it, and its backend connections were never touched.
    assert_eq!(channel.current_lb(), Some(other));
    assert!(!holds_channel(used_lb));
    let after = channel.counters();
    assert_eq!(
        after.backend_connections, before.backend_connections,
        "backend connections were re-made: {before:?} -> {after:?}"
    );
    drop((channel, rt, lb1, lb2, greeters));
    drop(net);
}

/// A client host's link to its LB replica goes silent for 60 s: no RST,
/// only the HTTP/2 PINGs on each side can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_to_lb_blackhole_moves_the_client_and_is_reaped() {
    client_lb_fault(
        ClientLbFault::Blackhole,
        Duration::from_secs(60),
        Duration::from_millis(8_500),
    )
    .await;
}

/// The LB replica the clients use is SIGSTOPped for 20 s: its kernel keeps
/// the connections open, nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_lb_replica_moves_the_client_and_is_left_behind() {
    client_lb_fault(
        ClientLbFault::Stopped,
        Duration::from_secs(20),
        Duration::from_millis(8_500),
    )
    .await;
}

/// The LB host kills every socket to the client host (`ss -K`): the
/// clients see RSTs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_client_to_lb_connections_move_the_client_at_once() {
    client_lb_fault(
        ClientLbFault::Reset,
        Duration::from_secs(15),
        Duration::from_secs(2),
    )
    .await;
}

/// Lease TTL of the replicas in the etcd-cut scenario.
const REPLICA_TTL: Duration = Duration::from_secs(2);
/// Their health-check interval.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Whether `lb` names `id` as the checker of every greeter backend (of
/// `n`).
fn all_checked_by(lb: &Lb, id: &str, n: usize) -> bool {
    let backends = lb.backends("greeter");
    backends.len() == n && backends.iter().all(|b| b["checked_by"] == id)
}

/// Whether `lb` reports itself degraded: the gauge, and `/readyz` still 200
/// (it serves its lists) with a detail saying why.
fn reports_degraded(lb: &Lb) -> bool {
    let (status, body) = lb.get("/readyz");
    let readyz: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    lb.metric("lb_cluster_degraded ") == 1.0
        && status == 200
        && readyz["degraded"] == true
        && readyz["detail"]
            .as_str()
            .is_some_and(|d| d.contains("etcd"))
}

/// Scenario 1 of the network faults: a replica cut off from etcd, still
/// reachable by its clients and its backends, for 20 s. It never sends
/// fewer endpoints than its own probes see (its list and its client's list
/// stay whole), reports itself degraded (`lb_cluster_degraded`, a `/readyz`
/// detail while staying ready, a WARN line), and the other replica takes
/// over its health checks within the lease TTL + one probe interval + 2 s.
/// The client keeps ≥ 99.9 % success. On heal the replica rejoins within
/// the session backoff + TTL, and its client gets at most one extra list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_etcd_keeps_its_lists_and_hands_over_its_checks() {
    let net = Net::new();
    let etcd_host = net.host();
    let (lb1_host, lb2_host) = (net.host(), net.host());
    let backend_hosts = [net.host(), net.host(), net.host()];
    let client_host = net.host();
    let n = backend_hosts.len();

    let etcd = Etcd::start_in(&etcd_host).await;
    let registry = etcd.registry_url();
    let greeters = greeters_in(&backend_hosts, 50051, &registry, &["--ttl", "3s"]).await;
    let lb_args = |id| replica_args(&registry, id, REPLICA_TTL, PROBE_INTERVAL, &[]);
    let lb1 = replica_in(&lb1_host, &lb_args("lb1"), &[]).await;
    let lb2 = replica_in(&lb2_host, &lb_args("lb2"), &[]).await;
    wait_formed(&[&lb1, &lb2], n, Duration::from_secs(10)).await;
    // The backends lb1 checks: lb2 must take them over.
    let owned_by_lb1: Vec<SocketAddr> = checkers(&lb2)
        .into_iter()
        .filter(|(_, by)| by == "lb1")
        .map(|(a, _)| a.parse().unwrap())
        .collect();
    eprintln!("etcd cut: lb1 checks {owned_by_lb1:?}");
    assert!(!reports_degraded(&lb1) && !reports_degraded(&lb2));

    // The client, on its own host, knows lb1 only: its lists are lb1's.
    let rt = client_host.ns.runtime();
    let channel = channel_on(&rt, &[lb1.addr], Some(CHANNEL_ID));
    assert_connected(
        &channel,
        n,
        Duration::from_secs(10),
        "the client never connected to every backend",
    )
    .await;
    let load = Arc::new(Load::default());
    let caller = rt.spawn(steady_calls(
        channel.clone(),
        load.clone(),
        Duration::from_millis(20),
    ));
    // Beside it, stock clients of lb1: grpc-go's grpclb policy and
    // C-core's xDS client (grpcio), for the whole run.
    let hold = Duration::from_secs(20);
    let stock_for = hold + Duration::from_secs(25);
    let every = Duration::from_millis(50);
    let stock = StockClients::start_in(&client_host, lb1.addr, stock_for, every);
    stock.wait_reached(&lb1, &client_host, "lb1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = channel.counters();
    let warns_before = lb1.log_lines("WARN").len();
    // Lists lb1 writes to its streams: grpclb lists and xDS responses.
    let sent = |lb: &Lb| {
        (
            lb.metric_sum("lb_lists_sent_total"),
            lb.metric_sum("lb_xds_responses_total"),
        )
    };
    let sent_before = sent(&lb1);

    // The cut: lb1 and etcd, both ways, for 20 s. Every 100 ms: lb1's and
    // the client's lists, lb1's signals, lb2's takeover.
    let t0 = Instant::now();
    let cut = net.cut(&lb1_host, &etcd_host);
    let (mut min_lb1, mut min_lb2, mut min_client) = (n, n, n);
    let mut degraded_after = None;
    let mut taken_over_after = None;
    let mut checks_all_after = None;
    while t0.elapsed() < hold {
        min_lb1 = min_lb1.min(listed(&service(&lb1)));
        min_lb2 = min_lb2.min(listed(&service(&lb2)));
        min_client = min_client.min(channel.listed_backends().len());
        if degraded_after.is_none() && reports_degraded(&lb1) {
            degraded_after = Some(t0.elapsed());
        }
        if taken_over_after.is_none()
            && all_checked_by(&lb2, "lb2", n)
            && greeters
                .iter()
                .filter(|g| owned_by_lb1.contains(&g.addr))
                .all(|g| g.health_watchers() >= 2)
        {
            taken_over_after = Some(t0.elapsed());
        }
        // And lb1, which can no longer read lb2's results, checks lb2's
        // backends itself.
        if checks_all_after.is_none()
            && all_checked_by(&lb1, "lb1", n)
            && greeters
                .iter()
                .filter(|g| !owned_by_lb1.contains(&g.addr))
                .all(|g| g.health_watchers() >= 2)
        {
            checks_all_after = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = channel.counters();
    let sent_during = sent(&lb1);
    eprintln!(
        "etcd cut: degraded after {degraded_after:?}, lb2 checks every backend after \
         {taken_over_after:?}, lb1 checks every backend after {checks_all_after:?}; smallest lists: lb1 {min_lb1}, lb2 {min_lb2}, client {min_client}; \
         lists to the client during the cut: {}",
        during.lists - before.lists
    );
    eprintln!(
        "etcd cut: lb1 /readyz {:?}, /api/v1/cluster {}",
        lb1.get("/readyz"),
        lb1.get("/api/v1/cluster").1
    );
    assert_eq!(min_lb1, n, "the cut replica shrank its list");
    assert_eq!(min_lb2, n, "the other replica shrank its list");
    assert_eq!(min_client, n, "the client's list shrank");
    let degraded_after = degraded_after.expect("the cut replica never reported itself degraded");
    assert!(
        degraded_after <= Duration::from_secs(10),
        "degraded shown after {degraded_after:?} (want ≤ 10 s)"
    );
    // One WARN line says it, however many retries fail.
    let new_warns = lb1.log_lines("WARN")[warns_before..].to_vec();
    let lost_lines = new_warns
        .iter()
        .filter(|l| l.contains("cluster session lost"))
        .count();
    assert_eq!(
        lost_lines, 1,
        "want one WARN line about the lost session: {new_warns:?}"
    );
    let taken_over_after = taken_over_after.expect("the other replica never took over the checks");
    let bound = REPLICA_TTL + PROBE_INTERVAL + Duration::from_secs(2);
    assert!(
        taken_over_after <= bound,
        "lb2 took over lb1's checks after {taken_over_after:?} (want ≤ {bound:?})"
    );
    let checks_all_after = checks_all_after.expect("the cut replica never checked every backend");
    assert!(
        checks_all_after <= bound,
        "lb1 checked lb2's backends itself after {checks_all_after:?} (want ≤ {bound:?})"
    );

    // Heal: lb1 rejoins within the session backoff (at most 5 s) + TTL,
    // stops reporting itself degraded, and hands the checks back.
    let t1 = Instant::now();
    drop(cut);
    let rejoin_bound = Duration::from_secs(5) + REPLICA_TTL;
    let rejoined = wait_until(rejoin_bound + Duration::from_secs(5), || {
        joined(&lb1, 2) && joined(&lb2, 2)
    })
    .await;
    let rejoined_after = t1.elapsed();
    assert!(
        rejoined,
        "lb1 never rejoined: {}",
        lb1.get("/api/v1/cluster").1
    );
    let recovered = wait_until(Duration::from_secs(5), || {
        !reports_degraded(&lb1) && lb1.metric("lb_cluster_degraded ") == 0.0
    })
    .await;
    assert!(
        recovered,
        "lb1 still reports itself degraded: {:?}",
        lb1.get("/readyz")
    );
    let back = wait_until(Duration::from_secs(5), || {
        let (a, b) = (checkers(&lb1), checkers(&lb2));
        a.len() == n && a.iter().zip(&b).all(|(x, y)| x.1 == y.1) && !all_checked_by(&lb2, "lb2", n)
    })
    .await;
    assert!(back, "the replicas did not split the checks again");
    // And each backend is checked once again, not twice.
    assert!(
        wait_until(Duration::from_secs(5), || greeters
            .iter()
            .all(|g| g.health_watchers() == 1))
        .await,
        "after the heal, watchers per backend: {:?}",
        greeters
            .iter()
            .map(Greeter::health_watchers)
            .collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = channel.counters();
    let sent_after = sent(&lb1);
    eprintln!(
        "etcd cut: lb1 rejoined after {rejoined_after:?}; lists to the client after the heal: {}; \
         lb1 wrote (grpclb lists, xDS responses) {:?} during the cut and {:?} after the heal",
        after.lists - during.lists,
        (sent_during.0 - sent_before.0, sent_during.1 - sent_before.1),
        (sent_after.0 - sent_during.0, sent_after.1 - sent_during.1),
    );
    assert!(
        rejoined_after <= rejoin_bound,
        "lb1 rejoined after {rejoined_after:?} (want ≤ {rejoin_bound:?})"
    );
    assert!(
        after.lists - during.lists <= 1,
        "the heal sent the client {} lists (want ≤ 1)",
        after.lists - during.lists
    );
    assert_eq!(listed(&service(&lb1)), n);
    assert_eq!(channel.listed_backends().len(), n);

    load.stop.store(true, Ordering::SeqCst);
    caller.await.expect("caller");
    let (ok, failed) = load.counts();
    eprintln!(
        "etcd cut: LbChannel {ok} ok, {failed} failed ({:.3} %); last error: {:?}",
        100.0 * load.success(),
        load.last_error.lock().unwrap()
    );
    assert!(
        ok as f64 >= hold.as_secs_f64() * 30.0,
        "too few calls to judge: {ok}"
    );
    assert!(
        load.success() >= 0.999,
        "{failed} of {} calls failed; last: {:?}",
        ok + failed,
        load.last_error.lock().unwrap()
    );
    assert_eq!(
        after.backend_connections, before.backend_connections,
        "backend connections were re-made: {before:?} -> {after:?}"
    );
    // Neither the cut nor the heal sent lb1's stream clients more than one
    // list each (2 grpclb streams, 1 xDS stream).
    assert!(
        sent_after.0 - sent_before.0 <= 2.0 && sent_after.1 - sent_before.1 <= 1.0,
        "lb1 wrote {:?} grpclb lists and xDS responses over the cut and the heal",
        (sent_after.0 - sent_before.0, sent_after.1 - sent_before.1)
    );
    // The stock clients kept calling on lb1's lists.
    stock
        .finish(
            Duration::from_secs(60),
            hold.as_secs_f64() * 10.0,
            "etcd cut",
        )
        .await;
    drop((channel, rt, lb1, lb2, greeters, etcd));
    drop(net);
}
