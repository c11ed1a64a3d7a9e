//! The xDS frontend against stock clients nobody here wrote: gRPC C-core
//! (Python grpcio) and grpc-js with `@grpc/grpc-js-xds` dialing
//! `xds:///greeter`, and a real Envoy fed clusters and endpoints over ADS.
//! Backends register in a real etcd; the LB serves ADS on its gRPC port.
//! Hostile streams are driven with envoy-types' generated ADS client.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::dns::{self, ZoneServer};
use lb_tests::fleet::BusyFleet;
use lb_tests::stock::{xds_client, xds_client_with, Envoy, StockClient, XdsClientKind};
use lb_tests::{greeters, wait_until, Etcd, Greeter, Lb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn per_backend(summary: &serde_json::Value, addr: SocketAddr) -> u64 {
    summary["per_backend"][addr.to_string()]
        .as_u64()
        .unwrap_or(0)
}

fn assert_no_failures(summary: &serde_json::Value) {
    assert_eq!(
        summary["failures"].as_array().map(Vec::len),
        Some(0),
        "failed calls: {summary}"
    );
}

/// Waits until the LB lists exactly `want` for `service`.
async fn wait_lb_lists(lb: &Lb, service: &str, want: &[SocketAddr]) -> bool {
    let want: BTreeSet<String> = want.iter().map(|a| a.to_string()).collect();
    wait_until(Duration::from_secs(10), || {
        let listed: BTreeSet<String> = lb
            .backends(service)
            .iter()
            .filter(|b| b["list_entries"].as_u64().unwrap_or(0) > 0)
            .filter_map(|b| b["address"].as_str().map(str::to_string))
            .collect();
        listed == want
    })
    .await
}

/// A fresh etcd, an LB over it, and `n` greeters registered there (30 s
/// leases, 500 ms drain), all listed.
async fn listed_cluster(n: usize) -> (Etcd, Lb, Vec<Greeter>, Vec<SocketAddr>) {
    let (etcd, lb, gs) = lb_tests::etcd_cluster(n, &["--ttl", "30s", "--drain", "500ms"]).await;
    let addrs: Vec<SocketAddr> = gs.iter().map(|g| g.addr).collect();
    assert!(wait_lb_lists(&lb, "greeter", &addrs).await);
    (etcd, lb, gs, addrs)
}

/// Both stock xDS clients spread calls evenly over three backends in etcd,
/// then keep calling with no failure while one backend stops gracefully,
/// one is SIGKILLed and one turns NOT_SERVING; afterwards every call goes
/// to the two left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_xds_clients_balance_and_move_off_removed_backends() {
    let (etcd, lb, mut gs, addrs) = listed_cluster(3).await;
    let reg = etcd.registry_url();
    let server = lb.addr.to_string();

    for kind in [XdsClientKind::Grpcio, XdsClientKind::GrpcJs] {
        let summary = xds_client(kind, &server, "greeter", 300).await;
        eprintln!("{kind:?} balance: {summary}");
        assert_no_failures(&summary);
        for a in &addrs {
            let n = per_backend(&summary, *a);
            assert!(
                (60..=140).contains(&n),
                "{kind:?}: {a} got {n} of 300 calls (fair 100): {summary}"
            );
        }
    }

    gs.extend(greeters(2, &reg, &["--ttl", "30s", "--drain", "500ms"]).await);
    let all: Vec<SocketAddr> = gs.iter().map(|g| g.addr).collect();
    assert!(wait_lb_lists(&lb, "greeter", &all).await);
    let (run, pace) = (Duration::from_secs(10), Duration::from_millis(50));
    let core = StockClient::xds_grpcio(&server, "greeter", "core-1", run, pace);
    let js = StockClient::xds_grpc_js(&server, "greeter", "js-1", run, pace);
    // Let both be calling before anything changes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut stopped = gs.remove(0);
    tokio::task::block_in_place(|| stopped.proc.terminate(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut killed = gs.remove(0);
    killed.proc.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sick = gs.remove(0);
    assert!(
        !sick.toggle_health().await,
        "the greeter turned NOT_SERVING"
    );
    let left: Vec<SocketAddr> = gs.iter().map(|g| g.addr).collect();
    assert!(wait_lb_lists(&lb, "greeter", &left).await);
    for (name, client) in [("grpcio", core), ("grpc-js", js)] {
        let summary = client.finish(Duration::from_secs(60)).await;
        eprintln!("{name} through the removals: {summary}");
        assert_no_failures(&summary);
    }
    for kind in [XdsClientKind::Grpcio, XdsClientKind::GrpcJs] {
        let summary = xds_client(kind, &server, "greeter", 100).await;
        assert_no_failures(&summary);
        let total: u64 = left.iter().map(|a| per_backend(&summary, *a)).sum();
        assert_eq!(
            total, 100,
            "{kind:?}: calls went to removed backends: {summary}"
        );
    }
    // Both stock clients accepted every resource they were sent.
    let nacks = lb.metric_sum("lb_xds_nacks_total");
    assert_eq!(
        nacks,
        0.0,
        "stock clients rejected resources: {}",
        lb.get("/metrics").1
    );
    drop((stopped, killed, sick));
}

/// A registry weight of 3 gets three times the calls of weight 1, and a
/// backend at four times the utilization for the same traffic gets clearly
/// less, through both stock xDS clients: the policy's weights reach them
/// as locality weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_weights_reach_stock_xds_clients() {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&["--registry", &etcd.registry_url()]).await;
    let reg = etcd.registry_url();
    let light = greeters(2, &reg, &[]).await;
    let heavy = Greeter::start(&reg, &["--weight", "3"]).await;
    let mut all: Vec<SocketAddr> = light.iter().map(|g| g.addr).collect();
    all.push(heavy.addr);
    assert!(wait_lb_lists(&lb, "greeter", &all).await);
    for kind in [XdsClientKind::Grpcio, XdsClientKind::GrpcJs] {
        let summary = xds_client(kind, &lb.addr.to_string(), "greeter", 500).await;
        assert_no_failures(&summary);
        let h = per_backend(&summary, heavy.addr) as f64;
        let l = light
            .iter()
            .map(|g| per_backend(&summary, g.addr))
            .sum::<u64>() as f64
            / 2.0;
        eprintln!("{kind:?}: weight 3 got {h}, weight 1 got {l} on average: {summary}");
        let ratio = h / l.max(1.0);
        assert!(
            (2.2..=4.0).contains(&ratio),
            "{kind:?}: ratio {ratio:.2}, want about 3: {summary}"
        );
    }
    drop((light, heavy));

    // Load: each backend reports utilization = its qps / its capacity; the
    // busy one has a quarter of the others' capacity.
    let BusyFleet {
        lb,
        calm,
        busy,
        caller,
    } = BusyFleet::start().await;
    for kind in [XdsClientKind::Grpcio, XdsClientKind::GrpcJs] {
        let summary = xds_client(kind, &lb.addr.to_string(), "greeter", 400).await;
        assert_no_failures(&summary);
        let n = per_backend(&summary, busy.addr);
        eprintln!("{kind:?}: busy backend {n} of 400 calls (fair 100): {summary}");
        assert!(
            n < 50,
            "{kind:?}: busy backend got {n} of 400 calls: {summary}"
        );
        for g in &calm {
            assert!(per_backend(&summary, g.addr) > 60, "{summary}");
        }
    }
    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
}

/// C-core reports load over LRS (the Cluster names the LB as its LRS
/// server): its calls reach the service's call totals, as grpclb client
/// stats do. With per-client subsets, each node gets its own stable subset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_fold_into_call_totals_and_nodes_get_subsets() {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&[
        "--registry",
        &etcd.registry_url(),
        "--client-stats-interval",
        "1s",
        "--subset-size",
        "2",
    ])
    .await;
    let gs = greeters(4, &etcd.registry_url(), &[]).await;
    let addrs: Vec<SocketAddr> = gs.iter().map(|g| g.addr).collect();
    assert!(wait_lb_lists(&lb, "greeter", &addrs).await);
    let server = lb.addr.to_string();
    let flags = ["--calls", "300", "--node-id", "reporter", "--linger", "2.5"];
    let summary = xds_client_with(XdsClientKind::Grpcio, &server, "greeter", &flags).await;
    assert_no_failures(&summary);
    let used: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| per_backend(&summary, *a) > 0)
        .collect();
    assert_eq!(
        used.len(),
        2,
        "a subset of 2 backends, got calls on {used:?}: {summary}"
    );
    let flags = ["--calls", "100", "--node-id", "reporter"];
    let again = xds_client_with(XdsClientKind::Grpcio, &server, "greeter", &flags).await;
    let used_again: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| per_backend(&again, *a) > 0)
        .collect();
    assert_eq!(used, used_again, "the same node id got another subset");
    let service = lb.json("/api/v1/services/greeter");
    let started = service["calls"]["started"].as_i64().unwrap_or(0);
    assert!(
        started >= 300,
        "LRS reports did not reach the call totals: {}",
        service["calls"]
    );
    assert!(lb.metric("lb_xds_load_reports_total") >= 1.0);
    drop(gs);
}

/// A real Envoy, fed clusters and endpoints by the LB over ADS, balances a
/// gRPC route over the backends and follows a backend joining and one
/// leaving, with no failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_balances_through_the_lbs_xds_and_follows_changes() {
    let (etcd, lb, mut gs, addrs) = listed_cluster(3).await;
    let reg = etcd.registry_url();
    let envoy = Envoy::start(lb.addr, "greeter").await;
    let want = |gs: &[Greeter]| {
        let mut v: Vec<String> = gs.iter().map(|g| g.addr.to_string()).collect();
        v.sort();
        v
    };
    assert!(
        wait_until(Duration::from_secs(10), || envoy.endpoints("greeter")
            == want(&gs))
        .await,
        "Envoy's endpoints {:?}, want {:?}",
        envoy.endpoints("greeter"),
        want(&gs)
    );
    let mut client = GreeterClient::connect(format!("http://{}", envoy.addr))
        .await
        .expect("connect to Envoy");
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..300 {
        let backend = backend_called(&mut client, format!("envoy-{i}")).await;
        *counts.entry(backend).or_default() += 1;
    }
    eprintln!("through Envoy: {counts:?}");
    for a in &addrs {
        let n = counts.get(&a.to_string()).copied().unwrap_or(0);
        assert!(
            (70..=130).contains(&n),
            "{a} got {n} of 300 calls through Envoy: {counts:?}"
        );
    }

    // A backend joins, one leaves (graceful): Envoy follows; calls go on.
    let calling = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut seen = BTreeSet::new();
        let end = Instant::now() + Duration::from_secs(6);
        while Instant::now() < end {
            match client
                .say_hello(HelloRequest {
                    name: "follow".into(),
                })
                .await
            {
                Ok(r) => {
                    seen.insert(
                        lb_examples::greeter::backend_of(&r.into_inner().message).to_string(),
                    );
                }
                Err(e) => failures.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (failures, seen, client)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    gs.push(Greeter::start(&reg, &["--ttl", "30s", "--drain", "500ms"]).await);
    let joined = gs.last().expect("joined").addr.to_string();
    let mut leaving = gs.remove(0);
    tokio::task::block_in_place(|| leaving.proc.terminate(Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(10), || envoy.endpoints("greeter")
            == want(&gs))
        .await,
        "Envoy's endpoints {:?}, want {:?}",
        envoy.endpoints("greeter"),
        want(&gs)
    );
    let (failures, seen, mut client) = calling.await.expect("caller");
    assert!(
        failures.is_empty(),
        "calls through Envoy failed: {failures:?}"
    );
    assert!(
        seen.contains(&joined),
        "the new backend got no call through Envoy: {seen:?}"
    );
    for i in 0..60 {
        let b = backend_called(&mut client, format!("after-{i}")).await;
        assert_ne!(
            b,
            leaving.addr.to_string(),
            "a call reached the backend that left"
        );
    }
    let (_, clients) = lb.get("/api/v1/clients");
    assert!(
        clients.contains("envoy-test"),
        "Envoy's ADS stream is not in /api/v1/clients: {clients}"
    );
}

/// Envoy subscribes to clusters by a legacy wildcard (an empty
/// `resource_names` on every request, ACKs included): on an empty catalog
/// it is answered at once, not after its 15 s initial fetch timeout; a
/// service registered after its first answer reaches its clusters, with
/// endpoints, and one whose backends leave the registry leaves them, each
/// within 2 s of the LB seeing the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_learns_services_registered_and_removed_after_it_connected() {
    let etcd = Etcd::start().await;
    let reg = etcd.registry_url();
    let lb = Lb::start(&["--registry", &reg]).await;
    let envoy = Envoy::spawn(lb.addr, "greeter");
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || envoy.is_live()).await,
        "Envoy never finished initializing against an empty catalog"
    );
    let live_after = started.elapsed();
    eprintln!("Envoy live after {live_after:?}");
    assert!(
        live_after < Duration::from_secs(8),
        "Envoy waited {live_after:?} for its first CDS answer (initial fetch timeout)"
    );

    for round in 0..2 {
        let service = format!("late{round}");
        let greeter = Greeter::start(
            &reg,
            &["--service", &service, "--ttl", "30s", "--drain", "200ms"],
        )
        .await;
        assert!(wait_lb_lists(&lb, &service, &[greeter.addr]).await);
        let listed = Instant::now();
        let want = vec![greeter.addr.to_string()];
        assert!(
            wait_until(Duration::from_secs(2), || envoy.endpoints(&service) == want).await,
            "Envoy did not learn {service} within 2 s of the LB listing it: clusters {:?}, endpoints {:?}",
            envoy.clusters(),
            envoy.endpoints(&service)
        );
        eprintln!("{service} reached Envoy in {:?}", listed.elapsed());

        let mut greeter = greeter;
        tokio::task::block_in_place(|| greeter.proc.terminate(Duration::from_secs(10)));
        assert!(
            wait_until(Duration::from_secs(10), || lb.backends(&service).is_empty()).await,
            "the LB still lists {service}'s backend: {:?}",
            lb.backends(&service)
        );
        let gone = Instant::now();
        assert!(
            wait_until(Duration::from_secs(2), || !envoy
                .clusters()
                .contains(&service))
            .await,
            "{service} left the registry but stayed in Envoy's clusters: {:?}",
            envoy.clusters()
        );
        eprintln!("{service} left Envoy in {:?}", gone.elapsed());
    }
    assert!(
        envoy.clusters().contains("lb"),
        "Envoy lost its static cluster"
    );
}

/// One call through `client` (Envoy); the backend that answered it.
async fn backend_called(
    client: &mut GreeterClient<tonic::transport::Channel>,
    name: String,
) -> String {
    let reply = client
        .say_hello(HelloRequest { name })
        .await
        .expect("call through Envoy");
    lb_examples::greeter::backend_of(&reply.into_inner().message).to_string()
}

/// A raw ADS stream driven by the test.
struct RawAds {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl RawAds {
    async fn open(lb: SocketAddr, node: &str) -> RawAds {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{lb}"))
            .await
            .expect("connect ADS");
        let (tx, out) = mpsc::channel(16);
        let node = Node {
            id: node.into(),
            ..Default::default()
        };
        tx.send(DiscoveryRequest {
            node: Some(node),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(out))
            .await
            .expect("ADS stream")
            .into_inner();
        RawAds { tx, rx }
    }

    async fn send(&self, type_url: &str, names: &[&str], nonce: &str, nack: bool) {
        let _ = self
            .tx
            .send(DiscoveryRequest {
                type_url: type_url.into(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                response_nonce: nonce.into(),
                error_detail: nack.then(|| RpcStatus {
                    code: 3,
                    message: "rejected by test".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
    }

    /// The next response within `limit`, or `None`.
    async fn next(&mut self, limit: Duration) -> Option<Result<DiscoveryResponse, tonic::Status>> {
        tokio::time::timeout(limit, self.rx.message())
            .await
            .ok()?
            .transpose()
    }
}

/// Unknown type URLs, a client that NACKs everything, one that never ACKs,
/// one subscribing to 100,000 names, and junk bytes: each refused or
/// bounded, and counted, while a stock client beside them keeps calling.
/// Also: a Listener that does not exist is answered at once, and sent when
/// its service appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ads_streams_are_bounded_and_leave_others_alone() {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&["--registry", &etcd.registry_url()]).await;
    let reg = etcd.registry_url();
    let gs = greeters(2, &reg, &[]).await;
    let addrs: Vec<SocketAddr> = gs.iter().map(|g| g.addr).collect();
    assert!(wait_lb_lists(&lb, "greeter", &addrs).await);
    let bystander = StockClient::xds_grpcio(
        &lb.addr.to_string(),
        "greeter",
        "bystander",
        Duration::from_secs(12),
        Duration::from_millis(20),
    );

    // Absent at once, then present when the service appears.
    let mut absent = RawAds::open(lb.addr, "absent").await;
    let first = absent
        .next(Duration::from_secs(2))
        .await
        .expect("CDS answer")
        .expect("ok");
    absent.send(CDS, &[], &first.nonce, false).await;
    let started = Instant::now();
    absent.send(LDS, &["later.svc"], "", false).await;
    let lds = absent
        .next(Duration::from_secs(2))
        .await
        .expect("LDS answered at once")
        .expect("ok");
    assert_eq!(lds.type_url, LDS);
    assert!(
        lds.resources.is_empty(),
        "a listener for an unknown service: {lds:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    absent.send(LDS, &["later.svc"], &lds.nonce, false).await;
    let _later = Greeter::start(&reg, &["--service", "later.svc"]).await;
    let appeared = loop {
        let r = absent
            .next(Duration::from_secs(10))
            .await
            .expect("a response when the service appeared")
            .expect("ok");
        if r.type_url == LDS {
            break r;
        }
        // The wildcard CDS learns of the new cluster too: ACK it.
        absent.send(&r.type_url, &[], &r.nonce, false).await;
    };
    assert_eq!(appeared.resources.len(), 1, "{appeared:?}");

    // Unknown type URL: counted, ignored; the stream still serves.
    let mut junk_type = RawAds::open(lb.addr, "junk-type").await;
    let cds = junk_type
        .next(Duration::from_secs(2))
        .await
        .expect("CDS")
        .expect("ok");
    junk_type
        .send("type.googleapis.com/no.such.Type", &["x"], "", false)
        .await;
    junk_type.send(CDS, &[], &cds.nonce, false).await;
    junk_type.send(EDS, &["greeter"], "", false).await;
    let eds = junk_type
        .next(Duration::from_secs(2))
        .await
        .expect("EDS after junk")
        .expect("ok");
    assert_eq!(eds.type_url, EDS);

    // NACK everything: each version once, never resent in a loop.
    let mut nacker = RawAds::open(lb.addr, "nacker").await;
    let cds = nacker
        .next(Duration::from_secs(2))
        .await
        .expect("CDS")
        .expect("ok");
    nacker.send(CDS, &[], &cds.nonce, true).await;
    nacker.send(EDS, &["greeter"], "", false).await;
    let eds = nacker
        .next(Duration::from_secs(2))
        .await
        .expect("EDS")
        .expect("ok");
    nacker.send(EDS, &["greeter"], &eds.nonce, true).await;
    assert!(
        nacker.next(Duration::from_secs(2)).await.is_none(),
        "a NACKed version was sent again"
    );

    // Never ACK: one response per type, whatever changes.
    let mut silent = RawAds::open(lb.addr, "silent").await;
    let _ = silent.next(Duration::from_secs(2)).await.expect("CDS");
    let extra = Greeter::start(&reg, &[]).await;
    assert!(wait_lb_lists(&lb, "greeter", &[addrs[0], addrs[1], extra.addr]).await);
    assert!(
        silent.next(Duration::from_secs(1)).await.is_none(),
        "a stream that never answered got a second CDS response"
    );

    // 100,000 names: refused with RESOURCE_EXHAUSTED.
    let mut greedy = RawAds::open(lb.addr, "greedy").await;
    let _ = greedy.next(Duration::from_secs(2)).await;
    let names: Vec<String> = (0..100_000).map(|i| format!("svc-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    greedy.send(EDS, &refs, "", false).await;
    let status = loop {
        match greedy.next(Duration::from_secs(5)).await {
            Some(Err(s)) => break s,
            Some(Ok(_)) => continue,
            None => panic!("100,000 names were neither refused nor answered"),
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // Junk bytes as a request: the stream is closed, the LB serves on.
    let raw = raw_junk_call(lb.addr).await;
    assert!(raw.is_err(), "junk request accepted");

    let summary = bystander.finish(Duration::from_secs(60)).await;
    eprintln!("bystander: {summary}");
    assert_no_failures(&summary);
    for (line, at_least) in [
        ("lb_xds_refused_total{reason=\"unknown_type\"}", 1.0),
        ("lb_xds_refused_total{reason=\"too_many_names\"}", 1.0),
        ("lb_xds_nacks_total{type=\"eds\"}", 1.0),
        ("lb_xds_nacks_total{type=\"cds\"}", 1.0),
    ] {
        let v = lb.metric(line);
        assert!(v >= at_least, "{line} is {v}");
    }
    let clients = lb.json("/api/v1/clients");
    let nacker_row = clients["xds_clients"]
        .as_array()
        .expect("xds_clients")
        .iter()
        .find(|c| c["node"]["id"] == "nacker")
        .cloned()
        .unwrap_or_else(|| panic!("nacker not listed: {clients}"));
    assert_eq!(
        nacker_row["types"]["eds"]["last_nack"]["error"], "rejected by test",
        "{nacker_row}"
    );
    drop((gs, extra));
}

/// Sends a request body that is not a DiscoveryRequest on the ADS method;
/// returns how the stream ended.
async fn raw_junk_call(lb: SocketAddr) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{lb}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, out) = mpsc::channel::<JunkRequest>(1);
    tx.send(JunkRequest {
        bytes: vec![0xff, 0xfe, 0xfd],
    })
    .await
    .unwrap();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let codec = tonic_prost::ProstCodec::<JunkRequest, DiscoveryResponse>::default();
    let mut stream = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(out)), path, codec)
        .await?
        .into_inner();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(status)) => return Err(status),
        }
    }
}

/// Field 2 (`node`) of a DiscoveryRequest, filled with bytes that are not
/// a Node.
#[derive(Clone, PartialEq, prost::Message)]
struct JunkRequest {
    #[prost(bytes = "vec", tag = "2")]
    bytes: Vec<u8>,
}

/// Two LB replicas over one etcd, on one port of 127.0.0.1 and 127.0.0.2,
/// both behind one DNS name (the zone stand-in answers its A records); the
/// clients' bootstrap names `dns://<zone>/lb.svc.test:<port>`. One replica
/// is SIGKILLed while they call: no call fails, and they follow a change
/// made after the kill (so they reconnected to the other replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_clients_keep_calling_through_an_lb_replica_kill() {
    let etcd = Etcd::start().await;
    let port = loop {
        let p = lb_tests::free_port();
        if std::net::TcpListener::bind(("127.0.0.2", p)).is_ok() {
            break p;
        }
    };
    let registry = ["--registry", &etcd.registry_url()];
    let mut a = Lb::start_at(SocketAddr::from(([127, 0, 0, 1], port)), &registry).await;
    let b = Lb::start_at(SocketAddr::from(([127, 0, 0, 2], port)), &registry).await;
    let zone = ZoneServer::start(vec![
        dns::a("lb.svc.test", "127.0.0.1", 1),
        dns::a("lb.svc.test", "127.0.0.2", 1),
    ])
    .await;
    let reg = etcd.registry_url();
    let mut gs = greeters(2, &reg, &["--ttl", "30s", "--drain", "500ms"]).await;
    let addrs: Vec<SocketAddr> = gs.iter().map(|g| g.addr).collect();
    assert!(wait_lb_lists(&a, "greeter", &addrs).await);
    assert!(wait_lb_lists(&b, "greeter", &addrs).await);
    let server = format!("{}/lb.svc.test:{port}", zone.url());
    let (run, pace) = (Duration::from_secs(14), Duration::from_millis(20));
    let core = StockClient::xds_grpcio(&server, "greeter", "core-kill", run, pace);
    let js = StockClient::xds_grpc_js(&server, "greeter", "js-kill", run, pace);
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.proc.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A change only the surviving replica can tell them about.
    gs.push(Greeter::start(&reg, &["--ttl", "30s"]).await);
    let joined = gs.last().unwrap().addr;
    assert!(wait_lb_lists(&b, "greeter", &[addrs[0], addrs[1], joined]).await);
    let moved = wait_until(Duration::from_secs(10), || {
        let c = b.json("/api/v1/clients");
        let ids: Vec<String> = c["xds_clients"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["node"]["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        ids.contains(&"core-kill".to_string()) && ids.contains(&"js-kill".to_string())
    })
    .await;
    assert!(
        moved,
        "the clients did not reconnect to the other replica: {}",
        b.json("/api/v1/clients")
    );
    for (name, client) in [("grpcio", core), ("grpc-js", js)] {
        let summary = client.finish(Duration::from_secs(60)).await;
        eprintln!("{name} through the replica kill: {summary}");
        assert_no_failures(&summary);
        assert!(
            per_backend(&summary, joined) > 0,
            "{name} never called the backend that joined after the kill: {summary}"
        );
    }
}
