//! Hostile and greedy peers: every limit of the LB port is enforced with a
//! clear status and counted, and junk, half-open connections and slowloris
//! senders on both ports leave the LB serving its clients without a failed
//! call.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lb_proto::grpc::lb::v1::{
    load_balance_request::LoadBalanceRequestType, load_balancer_client::LoadBalancerClient,
    ClientStats, ClientStatsPerToken, InitialLoadBalanceRequest, LoadBalanceRequest,
    LoadBalanceResponse,
};
use lb_tests::{channel, wait_backends, wait_until, Caller, Lb};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn initial(name: &str) -> LoadBalanceRequest {
    LoadBalanceRequest {
        load_balance_request_type: Some(LoadBalanceRequestType::InitialRequest(
            InitialLoadBalanceRequest { name: name.into() },
        )),
    }
}

fn stats(tokens: usize) -> LoadBalanceRequest {
    LoadBalanceRequest {
        load_balance_request_type: Some(LoadBalanceRequestType::ClientStats(ClientStats {
            num_calls_started: 1,
            calls_finished_with_drop: (0..tokens)
                .map(|i| ClientStatsPerToken {
                    load_balance_token: format!("token-{i:040}"),
                    num_calls: 1,
                })
                .collect(),
            ..Default::default()
        })),
    }
}

/// A raw BalanceLoad stream from local address `from`.
struct RawStream {
    tx: mpsc::Sender<LoadBalanceRequest>,
    rx: tonic::Streaming<LoadBalanceResponse>,
}

impl RawStream {
    /// Opens a stream for `name`; `Err` with the status if the LB refused
    /// it before answering.
    async fn open(
        lb: SocketAddr,
        from: IpAddr,
        name: Option<&str>,
    ) -> Result<RawStream, tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{lb}"))
            .unwrap()
            .local_address(Some(from))
            .connect()
            .await
            .expect("connect LB");
        let (tx, rx) = mpsc::channel(64);
        if let Some(name) = name {
            tx.send(initial(name)).await.unwrap();
        }
        let mut stream = LoadBalancerClient::new(channel)
            .balance_load(ReceiverStream::new(rx))
            .await?
            .into_inner();
        if name.is_some() {
            // initial_response, then a list: the stream is fully accepted.
            for _ in 0..2 {
                stream.message().await?.expect("stream ended early");
            }
        }
        Ok(RawStream { tx, rx: stream })
    }

    /// Waits for the stream to end with an error status.
    async fn ended(&mut self) -> tonic::Status {
        let wait = async {
            loop {
                match self.rx.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("stream ended without a status"),
                    Err(s) => return s,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("stream did not end within 5 s")
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Refusal of the next stream: its status.
async fn refused(lb: SocketAddr, from: IpAddr) -> tonic::Status {
    match RawStream::open(lb, from, Some("greeter")).await {
        Err(s) => s,
        Ok(mut s) => s.ended().await,
    }
}

/// Every limit of the gRPC port: streams in total and per peer, the
/// initial-request deadline, message size, client-stats rate, connections
/// per peer and the handshake deadline, each answered with a clear status
/// and counted, while a well-behaved client calls on without a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_port_limits_are_enforced_with_clear_statuses_and_counted() {
    let lb = Lb::embedded(&[
        "--max-streams",
        "8",
        "--max-streams-per-peer",
        "4",
        "--max-connections-per-peer",
        "5",
        "--handshake-timeout",
        "1s",
        "--initial-request-timeout",
        "1s",
        "--max-message-size",
        "2048",
        // Above the 5 reports/s the test LB asks of clients (200 ms).
        "--client-stats-max-rate",
        "6",
    ])
    .await;
    let _greeters = lb_tests::greeters(2, &format!("lb://{}", lb.addr), &[]).await;
    // The well-behaved client: one stream from 127.0.0.1.
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 2, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 2, Duration::from_millis(10));
    let metric =
        |reason: &str| lb.metric(&format!("lb_streams_refused_total{{reason=\"{reason}\"}}"));

    // Per peer: 127.0.0.2 may hold 4 streams, the 5th is refused.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            RawStream::open(lb.addr, ip("127.0.0.2"), Some("greeter"))
                .await
                .expect("within the per-peer limit"),
        );
    }
    let status = refused(lb.addr, ip("127.0.0.2")).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("per peer"),
        "{}",
        status.message()
    );
    assert_eq!(metric("too_many_streams_per_peer"), 1.0);

    // In total: 2 (the client's BalanceLoad stream and the LRS stream of its
    // per-backend outcomes) + 4 + 2 from 127.0.0.3 = 8; the next is refused.
    assert!(
        lb_tests::wait_until(Duration::from_secs(10), || ch.counters().outcome_reports
            > 0)
        .await,
        "the client's outcome reports never started"
    );
    for _ in 0..2 {
        held.push(
            RawStream::open(lb.addr, ip("127.0.0.3"), Some("greeter"))
                .await
                .expect("within the total limit"),
        );
    }
    let status = refused(lb.addr, ip("127.0.0.4")).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("in all"), "{}", status.message());
    assert_eq!(metric("too_many_streams"), 1.0);

    // Slots come back when streams end.
    held.truncate(2);
    let mut again = None;
    for _ in 0..50 {
        if let Ok(s) = RawStream::open(lb.addr, ip("127.0.0.4"), Some("greeter")).await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        again.is_some(),
        "slots of ended streams were not given back"
    );
    drop(again);
    drop(held);

    // A stream that never sends its initial request is closed at the deadline.
    let t = Instant::now();
    // (The LB answers only after the initial request, so the refusal comes
    // as the call's status.)
    let status = match RawStream::open(lb.addr, ip("127.0.0.5"), None).await {
        Err(s) => s,
        Ok(mut s) => s.ended().await,
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t.elapsed()
    );
    assert_eq!(metric("initial_request_timeout"), 1.0);

    // A message over --max-message-size ends the stream.
    let mut big = RawStream::open(lb.addr, ip("127.0.0.5"), Some("greeter"))
        .await
        .unwrap();
    big.tx.send(stats(100)).await.unwrap();
    let status = big.ended().await;
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert_eq!(metric("message_too_large"), 1.0);

    // Client stats faster than --client-stats-max-rate (6/s, burst 12) end the stream.
    let mut chatty = RawStream::open(lb.addr, ip("127.0.0.5"), Some("greeter"))
        .await
        .unwrap();
    for _ in 0..30 {
        if chatty.tx.send(stats(1)).await.is_err() {
            break;
        }
    }
    let status = chatty.ended().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("client_stats"),
        "{}",
        status.message()
    );
    assert_eq!(metric("client_stats_rate"), 1.0);
    // Reports at the allowed rate are fine.
    let polite = RawStream::open(lb.addr, ip("127.0.0.5"), Some("greeter"))
        .await
        .unwrap();
    for _ in 0..20 {
        polite.tx.send(stats(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        metric("client_stats_rate"),
        1.0,
        "a polite reporter was refused"
    );
    drop(polite);

    // Connections per peer: 127.0.0.6 may hold 5; the 6th is closed at once.
    let mut conns: Vec<TcpStream> = (0..5).map(|_| connect_from(lb.addr, "127.0.0.6")).collect();
    let mut sixth = connect_from(lb.addr, "127.0.0.6");
    assert!(
        closed_within(&mut sixth, Duration::from_secs(2)),
        "6th connection stayed open"
    );
    assert!(
        wait_until(Duration::from_secs(2), || lb.metric(
            "lb_connections_refused_total{port=\"lb\",reason=\"too_many_connections_per_peer\"}"
        ) >= 1.0)
        .await
    );
    // The 5 silent ones are closed by the 1 s handshake deadline.
    for c in &mut conns {
        assert!(
            closed_within(c, Duration::from_secs(3)),
            "a silent connection outlived the handshake deadline"
        );
    }
    assert!(
        lb.metric("lb_connections_refused_total{port=\"lb\",reason=\"handshake_timeout\"}") >= 5.0
    );

    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
    assert!(
        calls.ok() > 100,
        "the client made only {} calls",
        calls.ok()
    );
}

fn connect_from(to: SocketAddr, from: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

/// Whether the peer closes `s` within `limit` (EOF or reset on read).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {
                if Instant::now() > deadline {
                    return false;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Random bytes, HTTP/1.1 on the gRPC port, a broken HTTP/2 preface,
/// half-open connections and slowloris senders on both ports, while a
/// client calls: not one call fails, the admin port keeps answering, and the
/// slow senders are cut off at the handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_half_open_and_slowloris_on_both_ports_fail_no_call() {
    let lb = Lb::embedded(&["--handshake-timeout", "1s"]).await;
    let _greeters = lb_tests::greeters(2, &format!("lb://{}", lb.addr), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 2, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 2, Duration::from_millis(5));

    let (lb_addr, admin_addr) = (lb.addr, lb.admin);
    let attack = tokio::task::spawn_blocking(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut held = Vec::new();
        for port in [lb_addr, admin_addr] {
            // Random bytes, 20 connections of up to 64 KiB each.
            for _ in 0..20 {
                let mut s = TcpStream::connect(port).unwrap();
                let len = rng.random_range(1..65536);
                let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let _ = s.write_all(&junk);
                held.push(s);
            }
            for payload in [
                &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
                b"POST /api/v1/services/greeter/backends/1.2.3.4:5/drain HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nxx",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            ] {
                let mut s = TcpStream::connect(port).unwrap();
                let _ = s.write_all(payload);
                held.push(s);
            }
            // Half-open: connect, send nothing, hold.
            for _ in 0..20 {
                held.push(TcpStream::connect(port).unwrap());
            }
        }
        // Slowloris: one byte every 200 ms, on both ports.
        let mut slow: Vec<(TcpStream, &[u8])> = vec![
            (TcpStream::connect(lb_addr).unwrap(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            (
                TcpStream::connect(admin_addr).unwrap(),
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
            ),
        ];
        let started = Instant::now();
        let mut cut_off = [None, None];
        for step in 0..40 {
            for (i, (s, text)) in slow.iter_mut().enumerate() {
                if cut_off[i].is_none()
                    && s.write_all(&text[step.min(text.len() - 1)..][..1]).is_err()
                {
                    cut_off[i] = Some(started.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for (i, (s, _)) in slow.iter_mut().enumerate() {
            if cut_off[i].is_none() && closed_within(s, Duration::from_millis(100)) {
                cut_off[i] = Some(started.elapsed());
            }
        }
        drop(held);
        cut_off
    });
    // The admin port answers while under attack.
    for _ in 0..10 {
        assert_eq!(lb.get("/healthz").0, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cut_off = attack.await.unwrap();
    assert!(
        cut_off
            .iter()
            .all(|c| c.is_some_and(|t| t < Duration::from_secs(4))),
        "slowloris senders were not cut off within 4 s: {cut_off:?}"
    );
    let fresh = channel("greeter", &[lb.addr]);
    assert!(
        wait_backends(&fresh, 2, Duration::from_secs(5)).await,
        "a new client got no list after the attack"
    );
    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
    assert!(
        lb.metric("lb_connections_refused_total{port=\"lb\",reason=\"handshake_timeout\"}") >= 1.0
    );
    assert!(
        lb.metric("lb_connections_refused_total{port=\"admin\",reason=\"handshake_timeout\"}")
            >= 1.0
            || cut_off[1].is_some(),
    );
    eprintln!("slowloris cut off after {cut_off:?}");
}

/// The embedded registry on the gRPC port: with a registration token, calls
/// without it are refused (UNAUTHENTICATED, counted) and cannot touch other
/// registrations; the number of registrations is capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_registry_needs_its_token_and_is_capped() {
    use lb_proto::registry::v1::{
        registry_client::RegistryClient, DeregisterRequest, RegisterRequest,
    };
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("registration-token");
    std::fs::write(&token_file, "registration-token-0123456789\n").unwrap();
    let lb = Lb::embedded(&[
        "--registration-token-file",
        token_file.to_str().unwrap(),
        "--max-registrations",
        "2",
    ])
    .await;
    let with_token = ["--registration-token-file", token_file.to_str().unwrap()];
    let registry = format!("lb://{}", lb.addr);
    let g1 = lb_tests::Greeter::start(&registry, &with_token).await;
    let g2 = lb_tests::Greeter::start(&registry, &with_token).await;
    assert!(g1.wait_registered(Duration::from_secs(10)).await);
    assert!(g2.wait_registered(Duration::from_secs(10)).await);

    // Without the token: refused, counted, nothing registered.
    let anonymous = lb_tests::Greeter::start(&registry, &[]).await;
    assert!(!anonymous.wait_registered(Duration::from_secs(2)).await);
    assert!(lb.metric("lb_registrations_refused_total{reason=\"unauthenticated\"}") >= 1.0);
    let mut raw = RegistryClient::connect(format!("http://{}", lb.addr))
        .await
        .unwrap();
    let err = raw
        .deregister(DeregisterRequest { lease_id: 1 })
        .await
        .expect_err("deregistered without the token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // With the token, beyond --max-registrations 2: RESOURCE_EXHAUSTED.
    let mut request = tonic::Request::new(RegisterRequest {
        service: "greeter".into(),
        address: "127.0.0.1:9".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "authorization",
        "Bearer registration-token-0123456789".parse().unwrap(),
    );
    let err = raw
        .register(request)
        .await
        .expect_err("registered beyond the cap");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(lb.metric("lb_registry_rejects_total{source=\"memory\",kind=\"limit\"}") >= 1.0);

    // The two registered backends serve; the anonymous one was never listed.
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 2, Duration::from_secs(10)).await);
    assert!(!ch.listed_backends().contains(&anonymous.addr));
}

/// Registers `address` for `service` in the embedded registry (a 60 s
/// lease, zone `zone`); returns the lease, or the status refusing it.
async fn register(
    lb: SocketAddr,
    service: &str,
    address: &str,
    zone: &str,
) -> Result<u64, tonic::Status> {
    use lb_proto::registry::v1::{registry_client::RegistryClient, RegisterRequest};
    let mut client = RegistryClient::connect(format!("http://{lb}"))
        .await
        .expect("connect registry");
    let response = client
        .register(RegisterRequest {
            service: service.into(),
            address: address.into(),
            ttl_seconds: 60,
            metadata_json: format!("{{\"zone\":\"{zone}\"}}"),
            ..Default::default()
        })
        .await?;
    Ok(response.into_inner().lease_id)
}

/// Removes the registration `lease` from the embedded registry.
async fn deregister(lb: SocketAddr, lease: u64) {
    use lb_proto::registry::v1::{registry_client::RegistryClient, DeregisterRequest};
    RegistryClient::connect(format!("http://{lb}"))
        .await
        .expect("connect registry")
        .deregister(DeregisterRequest { lease_id: lease })
        .await
        .expect("deregister");
}

/// 20,000 short ADS streams, each from a zone made up for it (the xDS
/// node's locality is whatever the client says): the LB's per-zone state
/// (zone views, cached assignments) stays bounded, and so does its memory.
/// The unit tests of the zone table and the assignment cache check the
/// bounds themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ads_streams_of_made_up_zones_leave_bounded_state() {
    use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
    use envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    };
    const STREAMS: usize = 20_000;
    const CONCURRENCY: usize = 16;
    let lb = Lb::embedded(&["--health-checks", "false"]).await;
    for (i, zone) in ["a", "b", "c"].iter().enumerate() {
        register(lb.addr, "greeter", &format!("127.0.0.1:{}", 9 + i), zone)
            .await
            .expect("register");
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", lb.addr))
        .unwrap()
        .connect()
        .await
        .expect("connect LB");
    let stream = |zone: String| {
        let channel = channel.clone();
        async move {
            let request = DiscoveryRequest {
                node: Some(Node {
                    id: zone.clone(),
                    locality: Some(Locality {
                        zone,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
                    .into(),
                resource_names: vec!["greeter".into()],
                ..Default::default()
            };
            let mut rx = AggregatedDiscoveryServiceClient::new(channel)
                .stream_aggregated_resources(futures::stream::iter([request]))
                .await
                .expect("ADS stream")
                .into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), rx.message())
                .await
                .expect("no assignment within 10 s")
                .expect("ADS stream failed")
                .expect("ADS stream ended");
            assert_eq!(first.resources.len(), 1);
        }
    };
    let rss = |lb: &Lb| lb.metric("lb_process_resident_memory_bytes") / (1 << 20) as f64;
    // Warm up (allocator, tables) before measuring.
    for i in 0..200 {
        stream(format!("warm-{i}")).await;
    }
    let before = rss(&lb);
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for batch in 0..STREAMS / CONCURRENCY {
        let zones: Vec<String> = (0..CONCURRENCY)
            .map(|i| format!("zone-{batch}-{i}-{:08x}", rng.random::<u32>()))
            .collect();
        futures::future::join_all(zones.into_iter().map(&stream)).await;
    }
    let took = started.elapsed();
    // Closed streams leave their zones when the LB sees them go.
    assert!(
        wait_until(Duration::from_secs(5), || lb.metric("lb_xds_streams_open")
            == 0.0)
        .await,
        "streams still open"
    );
    let (_, metrics) = lb.get("/metrics");
    let cached = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lb_xds_assignments_cached "))
        .unwrap_or_else(|| panic!("lb_xds_assignments_cached not exported"));
    let cached: f64 = cached.trim().parse().unwrap();
    let after = rss(&lb);
    eprintln!(
        "{STREAMS} streams in {took:?}; assignments cached {cached}; RSS {before:.1} → {after:.1} MiB"
    );
    assert!(cached <= 64.0, "{cached} assignments cached");
    assert!(
        after - before < 16.0,
        "RSS grew from {before:.1} to {after:.1} MiB"
    );
}

/// A service with no backends and nobody watching it is forgotten after
/// the grace period, so `--max-services` caps the services known at once,
/// not those ever seen: with a cap of 3, four services created and deleted
/// in turn all get in. A service a stream still watches is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_services_are_forgotten_so_max_services_is_not_a_lifetime_cap() {
    let lb = Lb::start_with_env(
        &[
            "--registry",
            "memory",
            "--health-checks",
            "false",
            "--max-services",
            "3",
        ],
        &[("LB_IDLE_SERVICE_GRACE", "1s")],
    )
    .await;
    // A client keeps watching `watched` while its backends come and go.
    let lease = register(lb.addr, "watched", "127.0.0.1:9", "a")
        .await
        .unwrap();
    let watcher = RawStream::open(lb.addr, ip("127.0.0.1"), Some("watched"))
        .await
        .expect("stream for watched");
    deregister(lb.addr, lease).await;
    for service in ["one", "two", "three"] {
        // The catalog refuses a service beyond the cap (counted, logged):
        // register again until it is taken.
        let admitted = async {
            loop {
                let lease = register(lb.addr, service, "127.0.0.1:10", "a")
                    .await
                    .expect("register");
                if wait_until(Duration::from_secs(1), || lb.backends(service).len() == 1).await {
                    return lease;
                }
                deregister(lb.addr, lease).await;
            }
        };
        let lease = tokio::time::timeout(Duration::from_secs(8), admitted)
            .await
            .unwrap_or_else(|_| panic!("{service} still refused by --max-services 3 after 8 s"));
        deregister(lb.addr, lease).await;
    }
    assert_eq!(
        lb.get("/api/v1/services/watched").0,
        200,
        "a service a stream watches is kept"
    );
    assert_eq!(lb.get("/api/v1/services/one").0, 404, "one was forgotten");
    drop(watcher);
}

/// ADS and LRS streams that never send a first request are closed after
/// `--initial-request-timeout`, as BalanceLoad streams are, and counted:
/// silent streams do not hold the shared stream quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_ads_and_lrs_streams_are_closed_after_the_initial_request_timeout() {
    use envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    };
    use envoy_types::pb::envoy::service::load_stats::v3::{
        load_reporting_service_client::LoadReportingServiceClient, LoadStatsRequest,
    };
    let lb = Lb::embedded(&["--initial-request-timeout", "1s"]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", lb.addr))
        .unwrap()
        .connect()
        .await
        .expect("connect LB");
    let started = Instant::now();
    let ads = async {
        let mut rx = AggregatedDiscoveryServiceClient::new(channel.clone())
            .stream_aggregated_resources(futures::stream::pending::<DiscoveryRequest>())
            .await?
            .into_inner();
        rx.message().await.map(|_| ())
    };
    let lrs = async {
        let mut rx = LoadReportingServiceClient::new(channel.clone())
            .stream_load_stats(futures::stream::pending::<LoadStatsRequest>())
            .await?
            .into_inner();
        rx.message().await.map(|_| ())
    };
    let (ads, lrs) = tokio::time::timeout(Duration::from_secs(4), futures::future::join(ads, lrs))
        .await
        .expect("a silent stream was still open after 4 s");
    let took = started.elapsed();
    for (what, ended) in [("ADS", ads), ("LRS", lrs)] {
        let status = ended.expect_err("ended without an error status");
        assert_eq!(
            status.code(),
            tonic::Code::DeadlineExceeded,
            "{what}: {status:?}"
        );
    }
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(
        lb.metric("lb_xds_refused_total{reason=\"initial_request_timeout\"}") >= 2.0,
        "not counted"
    );
}
