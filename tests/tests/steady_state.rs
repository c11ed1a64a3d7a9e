//! Steady state against stock peers (DESIGN §4 scenario 12): when nothing
//! changes, nothing moves.
//!
//! One LB reads three registries at once (a real etcd, a real ZooKeeper,
//! and the Consul stand-in), each holding backends on stock gRPC servers
//! with default settings (grpc-go 1.33 and C-core through grpcio) beside
//! the project's greeter; registrations are kept by the registration
//! helpers, so their sessions are under test too. Stock grpclb clients
//! (grpc-go, and C-core through DNS SRV), stock xDS clients (C-core and
//! grpc-js, `xds:///greeter`) and an `LbChannel` call all along;
//! a second `LbChannel` makes a few calls and then sits idle.
//!
//! Over a window of [`WINDOW`] in which nothing changes, the test demands:
//! 0 health transitions, 0 reconnects of any kind (LB → backends, registry
//! and cluster sessions, clients → LB, clients → backends as counted by the
//! grpc-go backends and by `LbChannel`, no new ADS stream), at most 2 lists
//! per BalanceLoad stream and 2 responses per ADS stream, 0 WARN
//! lines, 0 failed calls. Then the idle channel calls at once on the
//! connections it already had, and a hung backend (SIGSTOP) leaves the
//! lists within 2 s and returns within 2 s of SIGCONT.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_client::{Registration, RegistrationOptions};
use lb_tests::consul::FakeConsul;
use lb_tests::stock::{Stock, StockBackend, StockClient};
use lb_tests::zookeeper::ZooKeeper;
use lb_tests::{call_n, channel, listed, wait_listed, wait_until, Caller, Etcd, Greeter, Lb};

/// How long nothing may move. Longer than the 60 s an idle channel must
/// survive, and than grpc-go's two-strike GOAWAY at one PING a second.
const WINDOW: Duration = Duration::from_secs(62);

/// What moved between two readings.
#[derive(Debug, Default, Clone, PartialEq)]
struct Reading {
    transitions: f64,
    reconnects: f64,
    streams: f64,
    /// Lists sent per BalanceLoad stream id.
    lists: BTreeMap<u64, u64>,
    /// ADS streams accepted.
    xds_streams: f64,
    /// Responses sent per ADS stream id.
    xds_responses: BTreeMap<u64, u64>,
    /// Connections accepted per grpc-go backend.
    backend_conns: Vec<Option<usize>>,
    warn_lines: usize,
}

fn read(lb: &Lb, backends: &[&StockBackend]) -> Reading {
    let (_, clients) = lb.get("/api/v1/clients");
    let clients: serde_json::Value = serde_json::from_str(&clients).expect("clients JSON");
    let lists = clients["clients"]
        .as_array()
        .expect("clients array")
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().expect("id"),
                c["lists_sent"].as_u64().expect("lists_sent"),
            )
        })
        .collect();
    let xds_responses = clients["xds_clients"]
        .as_array()
        .expect("xds_clients array")
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().expect("id"),
                c["responses_sent"].as_u64().expect("responses_sent"),
            )
        })
        .collect();
    Reading {
        xds_streams: lb.metric_sum("lb_xds_streams_total"),
        xds_responses,
        transitions: lb.metric_sum("lb_health_transitions_total"),
        reconnects: lb.metric_sum("lb_upstream_reconnects_total"),
        streams: lb.metric_sum("lb_streams_total"),
        lists,
        backend_conns: backends.iter().map(|b| b.connections()).collect(),
        warn_lines: lb.log_lines("WARN").len(),
    }
}

fn register(registry: &str, service: &str, addr: SocketAddr) -> Registration {
    Registration::start(
        registry,
        service,
        &addr.to_string(),
        RegistrationOptions::default(),
    )
    .unwrap_or_else(|e| panic!("register {addr} in {registry}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_changes_so_nothing_moves_with_stock_peers() {
    let etcd = Etcd::start().await;
    let zk = ZooKeeper::start().await;
    let consul = FakeConsul::start(None).await;
    let zk_url = zk.url("/dubbo");

    // Service "greeter" in etcd: two grpc-go backends, one C-core backend,
    // and the project's greeter reporting ORCA load by capacity.
    let go_a = StockBackend::start(Stock::GrpcGo).await;
    let go_b = StockBackend::start(Stock::GrpcGo).await;
    let core_a = StockBackend::start(Stock::Grpcio).await;
    let ours = Greeter::start(&etcd.registry_url(), &["--capacity", "2000"]).await;
    // Service "zk-greeter" in ZooKeeper, "consul-greeter" in Consul.
    let go_zk = StockBackend::start(Stock::GrpcGo).await;
    let core_consul = StockBackend::start(Stock::Grpcio).await;
    let _registrations = [
        register(&etcd.registry_url(), "greeter", go_a.addr),
        register(&etcd.registry_url(), "greeter", go_b.addr),
        register(&etcd.registry_url(), "greeter", core_a.addr),
        register(&zk_url, "zk-greeter", go_zk.addr),
        register(&consul.url(), "consul-greeter", core_consul.addr),
    ];
    let greeter = [go_a.addr, go_b.addr, core_a.addr, ours.addr];

    let lb = Lb::start(&[
        "--registry",
        &etcd.registry_url(),
        "--registry",
        &zk_url,
        "--registry",
        &consul.url(),
        "--domain-suffix",
        ".svc.test",
        "--client-stats-interval",
        "1s",
    ])
    .await;
    lb.wait_ready(Duration::from_secs(20)).await;

    // Every service listed, every client calling.
    let calling = channel("greeter", &[lb.addr]);
    assert!(
        wait_listed(&calling, &greeter, Duration::from_secs(15)).await,
        "greeter listing: {:?}; LB log {}",
        listed(&calling),
        lb.proc.log.display()
    );
    for (service, addr) in [
        ("zk-greeter", go_zk.addr),
        ("consul-greeter", core_consul.addr),
    ] {
        let ch = channel(service, &[lb.addr]);
        assert!(
            wait_listed(&ch, &[addr], Duration::from_secs(15)).await,
            "{service} listing: {:?}",
            listed(&ch)
        );
        assert_eq!(call_n(&ch, 20).await.failed(), 0, "{service} calls");
    }
    let idle = channel("greeter", &[lb.addr]);
    assert!(wait_listed(&idle, &greeter, Duration::from_secs(10)).await);
    let warmup = call_n(&idle, 40).await;
    assert_eq!(warmup.failed(), 0, "idle channel warm-up: {warmup:?}");

    let client_time = WINDOW + Duration::from_secs(15);
    let go_client = StockClient::go(lb.addr, "greeter", client_time, Duration::from_millis(50));
    let core_client = StockClient::grpcio(
        lb.addr,
        "greeter.svc.test",
        client_time,
        Duration::from_millis(50),
    );
    let pace = Duration::from_millis(50);
    let core_xds = StockClient::xds_grpcio(
        &lb.addr.to_string(),
        "greeter",
        "core-xds",
        client_time,
        pace,
    );
    let js_xds =
        StockClient::xds_grpc_js(&lb.addr.to_string(), "greeter", "js-xds", client_time, pace);
    let caller = Caller::start(&calling, 2, Duration::from_millis(20));
    // Settle: every client has its stream and its connections; ORCA weights
    // are past their blackout.
    let all_streams = wait_until(Duration::from_secs(20), || {
        lb.get("/api/v1/clients")
            .1
            .matches("\"service\":\"greeter\"")
            .count()
            >= 4
    })
    .await;
    assert!(all_streams, "clients: {}", lb.get("/api/v1/clients").1);
    let xds_streams = wait_until(Duration::from_secs(20), || {
        lb.json("/api/v1/clients")["xds_clients"]
            .as_array()
            .is_some_and(|a| a.len() >= 2)
    })
    .await;
    assert!(xds_streams, "xDS clients: {}", lb.get("/api/v1/clients").1);
    tokio::time::sleep(Duration::from_secs(12)).await;

    let watched = [&go_a, &go_b, &core_a, &go_zk, &core_consul];
    let before = read(&lb, &watched);
    let (calling_before, idle_before) = (calling.counters(), idle.counters());
    let started = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let after = read(&lb, &watched);
    let (calling_after, idle_after) = (calling.counters(), idle.counters());
    eprintln!(
        "steady window of {:?}: before {before:?}\nafter {after:?}",
        started.elapsed()
    );
    eprintln!("LbChannel counters: calling {calling_before:?} -> {calling_after:?}, idle {idle_before:?} -> {idle_after:?}");

    let log = lb.proc.log.display().to_string();
    let warns = lb.log_lines("WARN");
    assert_eq!(
        after.warn_lines,
        before.warn_lines,
        "WARN lines in the steady window (LB log {log}): {:#?}",
        &warns[before.warn_lines.min(warns.len())..]
    );
    assert_eq!(
        after.transitions, before.transitions,
        "health transitions in the steady window; LB log {log}"
    );
    assert_eq!(
        after.reconnects,
        before.reconnects,
        "upstream reconnects (LB → backends, registries, cluster) in the steady window: {}",
        lb.get("/metrics")
            .1
            .lines()
            .filter(|l| l.starts_with("lb_upstream_reconnects_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(
        after.streams, before.streams,
        "new BalanceLoad streams (a client reconnected to the LB)"
    );
    assert_eq!(
        after.xds_streams, before.xds_streams,
        "new ADS streams (an xDS client reconnected to the LB)"
    );
    for (id, sent) in &after.xds_responses {
        let was = before.xds_responses.get(id).copied().unwrap_or(0);
        assert!(
            sent - was <= 2,
            "ADS stream {id} was sent {} responses in the steady window; clients: {}",
            sent - was,
            lb.get("/api/v1/clients").1
        );
    }
    assert_eq!(
        after.backend_conns, before.backend_conns,
        "connections accepted by the grpc-go backends (someone reconnected)"
    );
    for (id, sent) in &after.lists {
        let was = before.lists.get(id).copied().unwrap_or(0);
        assert!(
            sent - was <= 2,
            "stream {id} was sent {} lists in the steady window; clients: {}",
            sent - was,
            lb.get("/api/v1/clients").1
        );
    }
    for (name, was, now) in [
        ("calling", calling_before, calling_after),
        ("idle", idle_before, idle_after),
    ] {
        assert_eq!(
            now.lb_streams, was.lb_streams,
            "the {name} LbChannel reopened its LB stream"
        );
        assert_eq!(
            now.backend_connections, was.backend_connections,
            "the {name} LbChannel reconnected to backends"
        );
        assert!(
            now.lists - was.lists <= 2,
            "the {name} LbChannel got {} lists",
            now.lists - was.lists
        );
    }

    // The idle channel calls at once, on the connections it already had.
    let t = Instant::now();
    let burst = call_n(&idle, 20).await;
    assert_eq!(burst.failed(), 0, "calls after 60 s idle: {burst:?}");
    assert_eq!(
        idle.counters().backend_connections,
        idle_before.backend_connections,
        "the idle channel had to reconnect to backends"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "20 calls took {:?}",
        t.elapsed()
    );
    assert_eq!(
        read(&lb, &watched).backend_conns,
        before.backend_conns,
        "grpc-go backends accepted new connections for the idle channel's calls"
    );

    // Every call of the window succeeded, from every client.
    let calls = caller.stop().await;
    assert!(calls.ok() > 1000, "LbChannel calls: {}", calls.ok());
    assert!(
        calls.failures.is_empty(),
        "LbChannel failures: {:?}",
        calls.failures
    );
    for (name, summary) in [
        (
            "grpc-go grpclb",
            go_client.finish(Duration::from_secs(60)).await,
        ),
        (
            "grpcio grpclb",
            core_client.finish(Duration::from_secs(60)).await,
        ),
        ("grpcio xDS", core_xds.finish(Duration::from_secs(60)).await),
        ("grpc-js xDS", js_xds.finish(Duration::from_secs(60)).await),
    ] {
        let failures = summary["failures"].as_array().expect("failures");
        assert!(failures.is_empty(), "{name} client failures: {summary}");
        let per_backend = summary["per_backend"].as_object().expect("per_backend");
        for addr in greeter {
            let n = per_backend
                .get(&addr.to_string())
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            assert!(n > 50, "{name} client: {addr} got {n} calls: {summary}");
        }
    }

    // A hung backend (SIGSTOP: sockets open, nothing answers) leaves the
    // list within 2 s, and is back within 2 s of SIGCONT.
    for backend in [&go_a, &core_a] {
        let others: Vec<SocketAddr> = greeter
            .iter()
            .copied()
            .filter(|a| *a != backend.addr)
            .collect();
        backend.proc.signal(libc::SIGSTOP);
        let stopped = Instant::now();
        let out = wait_listed(&calling, &others, Duration::from_secs(5)).await;
        let out_after = stopped.elapsed();
        backend.proc.signal(libc::SIGCONT);
        assert!(
            out,
            "{:?} backend still listed 5 s after SIGSTOP: {:?}",
            backend.kind,
            listed(&calling)
        );
        let resumed = Instant::now();
        let back = wait_listed(&calling, &greeter, Duration::from_secs(5)).await;
        let back_after = resumed.elapsed();
        eprintln!(
            "{:?} backend: out {out_after:?} after SIGSTOP, back {back_after:?} after SIGCONT",
            backend.kind
        );
        assert!(
            back,
            "{:?} backend not back 5 s after SIGCONT: {:?}",
            backend.kind,
            listed(&calling)
        );
        assert!(
            out_after <= Duration::from_secs(2),
            "{:?}: out after {out_after:?}",
            backend.kind
        );
        assert!(
            back_after <= Duration::from_secs(2),
            "{:?}: back after {back_after:?}",
            backend.kind
        );
    }
}
