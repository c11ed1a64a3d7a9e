//! Degraded, not cut (network-fault scenario 6): links that lose and delay
//! packets, and a replica whose wall clock is wrong. Real kernel
//! networking, as in `network_faults.rs`: loss is the router dropping a
//! random 30 % of the packets of a link ([`Net::lossy`]); delay is a proxy
//! at the LB's peer's end of the link holding every chunk 200 ± 50 ms each
//! way ([`Shaper`]), so a round trip costs about 400 ms before any
//! retransmission.
//!
//! What the LB promises on such links: streams ride them out (TCP
//! retransmits; keep-alive limits leave room for it), so every call is
//! served, at most one stream reset per client per minute, no
//! `too_many_pings` from any peer, no list emptied, no update lost, and
//! half of the list changes reach clients within 1 s + 3 RTT. The lease
//! kept and the 99th percentile within 1 s + 3 RTT are measured and
//! printed, not asserted: TCP's retransmission tail at 30 % loss misses
//! them in some runs (README, failure model). A replica's wall clock ten
//! minutes off changes nothing: every timer in the LB runs on the
//! monotonic clock, and etcd times leases itself.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::netns::{Host, Net};
use lb_tests::scenario::{
    assert_connected, channel_on, checkers, joined, judge_calls, replica_args, replica_in,
    wait_formed, StockClients,
};
use lb_tests::shaper::{Shape, Shaper};
use lb_tests::{greeters_in, wait_until, Caller, Etcd, Lb};

/// Share of packets the router drops on a lossy link, each way.
const LOSS: f64 = 0.3;
/// Delay of each chunk on a slow link, each way.
const SHAPE: Shape = Shape {
    delay: Duration::from_millis(200),
    jitter: Duration::from_millis(50),
};
/// How long the links stay bad.
const HOLD: Duration = Duration::from_secs(120);
/// How often the flipping backend's health changes.
const FLIP_EVERY: Duration = Duration::from_millis(1200);
/// Longest a list change may take to reach the client: no update is lost,
/// even behind a reconnect on a link this bad.
const NO_UPDATE_LOST: Duration = Duration::from_secs(30);
/// The slow link's port in front of the LB, on the clients' host.
const LB_PORT: u16 = 7000;
/// The slow link's port in front of etcd, on etcd's host.
const ETCD_PROXY_PORT: u16 = 2479;
/// The greeters' port on their hosts.
const PORT: u16 = 50051;

/// Lines of `log` (a process's log file) that mention a `too_many_pings`
/// GOAWAY, in any spelling the peers use.
fn too_many_pings(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("too_many_pings") || l.contains("too many pings")
        })
        .map(str::to_string)
        .collect()
}

/// The `p`-th percentile (0–100) of `samples`.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    let i = ((p / 100.0) * (s.len() as f64 - 1.0)).ceil() as usize;
    s[i.min(s.len() - 1)]
}

/// Scenario 6: 30 % loss plus 200 ± 50 ms delay on client↔LB and on
/// LB↔etcd, for two minutes, under steady load from an `LbChannel`, a stock
/// grpc-go grpclb client and a stock grpcio xDS client. About every 1.2 s a
/// backend's health flips, and the time until the `LbChannel` sees it is a
/// propagation sample. Asserted: at most one reconnect per client per
/// minute, no `too_many_pings` anywhere, every update delivered, no list
/// emptied, propagation p50 ≤ 1 s + 3 RTT, every call of every client
/// served. Printed: p90, p99, leases lost, degraded samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_slow_links_keep_streams_leases_and_lists() {
    let net = Net::new();
    let etcd_host = net.host();
    let lb_host = net.host();
    let backend_hosts = [net.host(), net.host()];
    let client_host = net.host();

    // etcd's host as the README asks of etcd hosts on lossy links: linear
    // retransmission timeouts for thin streams and an RTO ceiling of one
    // second (the LB sets both on its own sockets), or a keep-alive answer
    // lost four times in a row arrives after its lease ran out.
    etcd_host
        .ns
        .sysctl("net.ipv4.tcp_thin_linear_timeouts", "1");
    // Linux 6.15 and later; an older kernel keeps its default ceiling.
    if std::path::Path::new("/proc/sys/net/ipv4/tcp_rto_max_ms").exists() {
        etcd_host.ns.sysctl("net.ipv4.tcp_rto_max_ms", "1000");
    }
    let etcd = Etcd::start_in(&etcd_host).await;
    let greeters = greeters_in(&backend_hosts, PORT, &etcd.registry_url(), &["--ttl", "5s"]).await;
    let backends: Vec<SocketAddr> = greeters.iter().map(|g| g.addr).collect();

    // The slow links' proxies stand at the far end from the LB, in front of
    // etcd and on the clients' host, so that the lossy TCP connections are
    // the LB's own sockets on one side (with its socket options) and a
    // default Linux socket, as etcd's and a client's, on the other.
    let etcd_addr: SocketAddr = etcd.endpoint().parse().expect("etcd address");
    let to_etcd = Shaper::start(&etcd_host, ETCD_PROXY_PORT, etcd_addr, SHAPE);
    let registry = format!("etcd://{}", to_etcd.addr);
    let lb = Lb::start_in(&lb_host, &["--registry", &registry, "--replica-id", "lb1"]).await;
    assert!(
        wait_until(Duration::from_secs(20), || lb.json("/api/v1/cluster")
            ["view"]["connected"]
            == true
            && lb.json("/api/v1/services/greeter")["listed"] == backends.len())
        .await,
        "the LB never joined and listed every backend: {} / {}",
        lb.get("/api/v1/cluster").1,
        lb.get("/api/v1/services/greeter").1
    );
    let to_lb = Shaper::start(&client_host, LB_PORT, lb.addr, SHAPE);

    let rt = client_host.ns.runtime();
    let channel = channel_on(&rt, &[to_lb.addr], None);
    assert_connected(
        &channel,
        backends.len(),
        Duration::from_secs(15),
        "the client never connected to every backend",
    )
    .await;
    let caller = Caller::start_on(&rt, &channel, 1, Duration::from_millis(50));
    let stock_for = HOLD + Duration::from_secs(30);
    let every = Duration::from_millis(100);
    let stock = StockClients::start_in(&client_host, to_lb.addr, stock_for, every);
    let clients = 3;
    assert!(
        wait_until(Duration::from_secs(20), || to_lb.accepted() >= clients).await,
        "the stock clients never reached the LB: {} connections",
        to_lb.accepted()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    let connections_before = to_lb.accepted();
    let channel_streams_before = channel.counters().lb_streams;
    let etcd_connections_before = to_etcd.accepted();
    let cluster_sessions = r#"lb_upstream_reconnects_total{kind="cluster"}"#;
    let registry_sessions = r#"lb_upstream_reconnects_total{kind="registry"}"#;
    let (cluster_before, registry_before) =
        (lb.metric(cluster_sessions), lb.metric(registry_sessions));
    let warns_before = lb.log_lines("WARN").len();

    // Two minutes of bad links. About every 1.2 s the first backend's health
    // flips and the client's list must follow.
    let faults = [
        net.lossy(&client_host, &lb_host, LOSS),
        net.lossy(&lb_host, &etcd_host, LOSS),
    ];
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut slowest: Option<(Duration, bool)> = None;
    let mut degraded_seen = 0;
    let flipping = &greeters[0];
    while started.elapsed() < HOLD {
        let serving = flipping.toggle_health().await;
        let flipped = Instant::now();
        let mut listed_after = None;
        let seen = wait_until(NO_UPDATE_LOST, || {
            if listed_after.is_none()
                && channel.listed_backends().contains(&flipping.addr) == serving
            {
                listed_after = Some(flipped.elapsed());
            }
            channel.ready_backends().contains(&flipping.addr) == serving
        })
        .await;
        let took = flipped.elapsed();
        if took > Duration::from_secs(1) + 6 * SHAPE.delay {
            eprintln!(
                "slow links: a slow change (serving: {serving}): listed after {listed_after:?},                  ready after {took:?}"
            );
        }
        assert!(
            seen,
            "a health flip (serving: {serving}) did not reach the client in {NO_UPDATE_LOST:?}: {:?}",
            channel.ready_backends()
        );
        assert!(
            lb.service_json("greeter")["listed"].as_u64() >= Some(1),
            "the LB listed nothing"
        );
        samples.push(took);
        if slowest.is_none_or(|(d, _)| took > d) {
            slowest = Some((took, serving));
        }
        if lb.metric("lb_cluster_degraded") != 0.0 {
            degraded_seen += 1;
        }
        tokio::time::sleep(FLIP_EVERY.saturating_sub(took)).await;
    }
    let held = started.elapsed();
    drop(faults);
    // Leave the flipping backend serving.
    if !channel.ready_backends().contains(&flipping.addr) {
        assert!(flipping.toggle_health().await);
    }

    let minutes = held.as_secs_f64() / 60.0;
    let reconnects = to_lb.accepted() - connections_before;
    let channel_reconnects = channel.counters().lb_streams - channel_streams_before;
    let etcd_reconnects = to_etcd.accepted() - etcd_connections_before;
    let cluster_lost = lb.metric(cluster_sessions) - cluster_before;
    let registry_lost = lb.metric(registry_sessions) - registry_before;
    let rtt = 2 * SHAPE.delay;
    let limit = Duration::from_secs(1) + 3 * rtt;
    let p50 = percentile(&samples, 50.0);
    let p90 = percentile(&samples, 90.0);
    let p99 = percentile(&samples, 99.0);
    eprintln!(
        "slow links: {:.1} min of {:.0} % loss and {:?} ± {:?} each way; {} propagation samples: \
         p50 {p50:?}, p90 {p90:?}, p99 {p99:?}, slowest {slowest:?} (target {limit:?}); client↔LB reconnects \
         {reconnects} over {clients} clients ({channel_reconnects} of them the LbChannel's); LB↔etcd connections {etcd_reconnects}, cluster \
         sessions lost {cluster_lost}, registry sessions lost {registry_lost}; degraded in \
         {degraded_seen} samples",
        minutes,
        LOSS * 100.0,
        SHAPE.delay,
        SHAPE.jitter,
        samples.len()
    );
    let metrics = lb.get("/metrics").1;
    let pushes: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("lb_list_push_seconds_count")
                || l.starts_with("lb_list_push_seconds_bucket{le=\"0.01\"}")
        })
        .collect();
    eprintln!("slow links: the LB's change → stream write times: {pushes:?}");
    let relinks: Vec<String> = lb
        .log_lines("INFO")
        .into_iter()
        .filter(|l| l.contains("connection lost") || l.contains("on a new connection"))
        .collect();
    eprintln!("slow links: LB connections to etcd made again: {relinks:?}");
    let new_warns: Vec<String> = lb.log_lines("WARN").split_off(warns_before);
    eprintln!("slow links: LB WARN lines during the run: {new_warns:?}");

    assert!(
        reconnects as f64 <= clients as f64 * minutes.ceil(),
        "{reconnects} reconnects of {clients} clients in {minutes:.1} min (≤ 1 per client per minute)"
    );
    // Measured, not asserted: at 30 % loss TCP's retransmission tail (a
    // segment lost four times in a row, about 1 % of them) now and then
    // holds a keep-alive past its lease or a list past the target; the
    // README's failure model gives the figures. What is asserted is what
    // clients were promised: every call served, every update delivered,
    // no list emptied, reconnects within one per client per minute.
    assert!(
        p50 <= limit,
        "list propagation p50 {p50:?} over {limit:?}: {samples:?}"
    );
    for (who, log) in [
        ("the LB", lb.proc.log.clone()),
        ("etcd", etcd.log().expect("etcd runs")),
    ] {
        let lines = too_many_pings(&log);
        assert!(lines.is_empty(), "{who} logged too_many_pings: {lines:?}");
    }

    // Every call of every client served: no minimum for the LbChannel's,
    // at least 500 of each stock client's.
    let calls = caller.stop().await;
    judge_calls(&calls, 0.0, "slow links");
    let summaries = stock
        .finish(Duration::from_secs(90), 500.0, "slow links")
        .await;
    for (name, summary) in summaries {
        let text = summary.to_string().to_ascii_lowercase();
        assert!(
            !text.contains("too_many_pings") && !text.contains("too many pings"),
            "{name} saw too_many_pings: {summary}"
        );
    }
    drop((channel, rt, to_lb, lb, to_etcd, greeters, etcd));
    drop(net);
}

/// Where Debian's libfaketime is (package `faketime`, which scripts/setup
/// installs).
fn libfaketime() -> String {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists());
    found
        .unwrap_or_else(|| {
            panic!("libfaketime not found: install Debian's faketime package (scripts/setup does)")
        })
        .display()
        .to_string()
}

/// A replica whose wall clock is ten minutes behind (libfaketime, on the
/// real-time clock only, as a clock without NTP drifts) beside one on time,
/// over one etcd, for a minute: no health transition, no check changes
/// hands, no replica expires, both publish the same lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_ten_minutes_off_changes_nothing() {
    let net = Net::new();
    let hosts: Vec<Host> = (0..6).map(|_| net.host()).collect();
    let (etcd_host, lb1_host, lb2_host) = (&hosts[0], &hosts[1], &hosts[2]);
    let etcd = Etcd::start_in(etcd_host).await;
    let greeters = greeters_in(&hosts[3..], PORT, &etcd.registry_url(), &["--ttl", "5s"]).await;
    let n = greeters.len();
    let registry = etcd.registry_url();
    let args = |id| {
        replica_args(
            &registry,
            id,
            Duration::from_secs(3),
            Duration::from_millis(500),
            &[],
        )
    };
    let lb1 = replica_in(lb1_host, &args("lb1"), &[]).await;
    let faketime = libfaketime();
    let skewed_env = [
        ("LD_PRELOAD", faketime.as_str()),
        ("FAKETIME", "-10m"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let lb2 = replica_in(lb2_host, &args("lb2"), &skewed_env).await;
    wait_formed(&[&lb1, &lb2], n, Duration::from_secs(15)).await;
    // The skew is real: lb2 says a time ten minutes behind lb1's.
    let started_at = |lb: &Lb| {
        let v = lb.json("/api/v1/services/greeter");
        v["backends"][0]["registered_at"]
            .as_str()
            .map(str::to_string)
    };
    eprintln!(
        "clock skew: a backend's registered_at on lb1 {:?}, on the skewed lb2 {:?}",
        started_at(&lb1),
        started_at(&lb2)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = (checkers(&lb1), checkers(&lb2));
    assert_eq!(before.0, before.1, "the replicas disagree on owners");
    let transitions = "lb_health_transitions_total";
    let t_before = (lb1.metric_sum(transitions), lb2.metric_sum(transitions));
    let lists_before = (
        lb1.json("/api/v1/services/greeter")["list_version"].clone(),
        lb2.json("/api/v1/services/greeter")["list_version"].clone(),
    );

    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(60) {
        assert!(
            joined(&lb1, 2) && joined(&lb2, 2),
            "a replica left the cluster after {:?}: {} / {}",
            watched.elapsed(),
            lb1.get("/api/v1/cluster").1,
            lb2.get("/api/v1/cluster").1
        );
        assert_eq!(
            (checkers(&lb1), checkers(&lb2)),
            before,
            "checks changed hands after {:?}",
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        (lb1.metric_sum(transitions), lb2.metric_sum(transitions)),
        t_before,
        "health transitions with a skewed clock"
    );
    assert_eq!(
        (
            lb1.json("/api/v1/services/greeter")["list_version"].clone(),
            lb2.json("/api/v1/services/greeter")["list_version"].clone(),
        ),
        lists_before,
        "new lists with nothing changed"
    );
    for lb in [&lb1, &lb2] {
        assert_eq!(lb.metric("lb_cluster_degraded"), 0.0);
        let warns = lb.log_lines("WARN");
        assert!(warns.is_empty(), "WARN lines: {warns:?}");
    }
    drop((lb1, lb2, greeters, etcd));
    drop(net);
}
