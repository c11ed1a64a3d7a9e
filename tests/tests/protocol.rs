//! The grpc.lb.v1 protocol as a raw client sees it, hostile bytes on the LB
//! port, and the embedded registry (no etcd).

use std::io::Write;
use std::time::{Duration, Instant};

use lb_proto::grpc::lb::v1::{
    load_balance_request::LoadBalanceRequestType, load_balance_response::LoadBalanceResponseType,
    load_balancer_client::LoadBalancerClient, InitialLoadBalanceRequest, LoadBalanceRequest,
    LoadBalanceResponse,
};
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::{call_n, channel, wait_backends, wait_until, Greeter, Lb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn initial(name: &str) -> LoadBalanceRequest {
    LoadBalanceRequest {
        load_balance_request_type: Some(LoadBalanceRequestType::InitialRequest(
            InitialLoadBalanceRequest { name: name.into() },
        )),
    }
}

/// Opens a raw BalanceLoad stream; returns the sender and the response stream.
async fn open(
    lb: &Lb,
    name: &str,
) -> (
    mpsc::Sender<LoadBalanceRequest>,
    Result<tonic::Streaming<LoadBalanceResponse>, tonic::Status>,
) {
    let mut client = LoadBalancerClient::connect(format!("http://{}", lb.addr))
        .await
        .expect("connect LB");
    let (tx, rx) = mpsc::channel(4);
    tx.send(initial(name)).await.unwrap();
    let result = client
        .balance_load(ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner());
    (tx, result)
}

async fn embedded_lb_with_greeters(n: usize, ttl: &str) -> (Lb, Vec<Greeter>) {
    let lb = Lb::embedded(&[]).await;
    let greeters = lb_tests::greeters(n, &format!("lb://{}", lb.addr), &["--ttl", ttl]).await;
    (lb, greeters)
}

/// A raw client sees initial_response first, then the list; an unknown
/// name gets NOT_FOUND at once, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_answers_initial_response_then_lists_and_refuses_unknown_names() {
    let (lb, greeters) = embedded_lb_with_greeters(2, "10s").await;

    // The name as stock clients send it: authority with port and domain.
    let (_tx, stream) = open(&lb, "greeter.svc.test:8443").await;
    let mut stream = stream.expect("stream opened");
    let first = stream
        .message()
        .await
        .unwrap()
        .unwrap()
        .load_balance_response_type;
    match first {
        Some(LoadBalanceResponseType::InitialResponse(r)) => {
            let interval = r.client_stats_report_interval.expect("interval set");
            assert_eq!((interval.seconds, interval.nanos), (0, 200_000_000));
        }
        other => panic!("first response must be initial_response, got {other:?}"),
    }
    match stream
        .message()
        .await
        .unwrap()
        .unwrap()
        .load_balance_response_type
    {
        Some(LoadBalanceResponseType::ServerList(list)) => {
            assert_eq!(list.servers.len(), 2);
            for s in &list.servers {
                assert_eq!(s.ip_address, vec![127, 0, 0, 1]);
                assert!(!s.load_balance_token.is_empty() && s.load_balance_token.len() < 50);
                assert!(!s.drop);
                assert!(greeters.iter().any(|g| g.addr.port() as i32 == s.port));
            }
        }
        other => panic!("expected a server list, got {other:?}"),
    }

    let t = Instant::now();
    let (_tx, refused) = open(&lb, "nope.example:443").await;
    let status = match refused {
        Err(s) => s,
        Ok(mut s) => s.message().await.expect_err("unknown service got a stream"),
    };
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("unknown service"),
        "{}",
        status.message()
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        t.elapsed()
    );
    assert_eq!(
        lb.metric("lb_streams_refused_total{reason=\"unknown_service\"}"),
        1.0
    );

    // An oversized name is refused too.
    let (_tx, refused) = open(&lb, &"x".repeat(300)).await;
    let status = match refused {
        Err(s) => s,
        Ok(mut s) => s.message().await.expect_err("oversized name got a stream"),
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // lb-client callers of an unknown service fail fast with UNAVAILABLE.
    let ch = lb_client::LbChannel::builder("nope")
        .lb(lb.addr.to_string())
        .build()
        .unwrap();
    let mut req = tonic::Request::new(HelloRequest { name: "x".into() });
    req.set_timeout(Duration::from_secs(5));
    let err = GreeterClient::new(ch)
        .say_hello(req)
        .await
        .expect_err("call to an unknown service succeeded");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

/// Junk bytes, an HTTP/1.1 request and a half-open connection on the LB port
/// do not disturb clients already being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_lb_port_disturbs_nobody() {
    let (lb, _greeters) = embedded_lb_with_greeters(2, "10s").await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 2, Duration::from_secs(10)).await);
    let caller = lb_tests::Caller::start(&ch, 2, Duration::from_millis(5));

    let mut held = Vec::new();
    for payload in [
        &b"\x00\x01\x02garbage\xff\xfe\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        b"",
    ] {
        let mut s = std::net::TcpStream::connect(lb.addr).unwrap();
        let _ = s.write_all(payload);
        held.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(held);

    let fresh = channel("greeter", &[lb.addr]);
    assert!(
        wait_backends(&fresh, 2, Duration::from_secs(5)).await,
        "a new client got no list after junk"
    );
    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
    assert_eq!(lb.get("/healthz").0, 200);
}

/// The embedded registry: registration, graceful deregistration, lease
/// expiry of a SIGKILLed backend, lb-token delivery, and client stats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_registry_leases_tokens_and_client_stats() {
    let (lb, mut greeters) = embedded_lb_with_greeters(3, "2s").await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let tally = call_n(&ch, 60).await;
    assert_eq!(tally.failed(), 0);
    assert_eq!(
        tally.per_backend.values().copied().collect::<Vec<_>>(),
        vec![20, 20, 20]
    );

    // Backends receive the token the LB listed for them.
    let backends = lb.backends("greeter");
    let mut req = tonic::Request::new(HelloRequest { name: "t".into() });
    req.set_timeout(Duration::from_secs(5));
    let reply = GreeterClient::new(ch.clone()).say_hello(req).await.unwrap();
    let token = reply
        .metadata()
        .get(lb_examples::greeter::TOKEN_ECHO)
        .expect("lb-token reached the backend");
    assert!(
        backends
            .iter()
            .any(|b| b["token"] == token.to_str().unwrap()),
        "token {token:?} not listed by the LB: {backends:?}"
    );

    // Client stats reach the LB (interval 200 ms).
    assert!(
        wait_until(Duration::from_secs(5), || lb.metric(
            "lb_client_calls_total{service=\"greeter\",kind=\"started\"}"
        ) >= 61.0)
        .await,
        "client stats not aggregated: {}",
        lb.metric("lb_client_calls_total{service=\"greeter\",kind=\"started\"}")
    );

    // A SIGKILLed backend (no deregistration) leaves when its 2 s lease expires.
    let dead = greeters.remove(0);
    let mut dead_proc = dead.proc;
    dead_proc.kill();
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(6), || !lb
            .get("/api/v1/services/greeter")
            .1
            .contains(&dead.addr.to_string()))
        .await,
        "lease of a killed backend never expired"
    );
    eprintln!(
        "SIGKILL -> lease expiry removed it from the LB: {:?}",
        t.elapsed()
    );

    // A graceful stop deregisters at once.
    let mut leaving = greeters.remove(0);
    let addr = leaving.addr.to_string();
    tokio::task::block_in_place(|| leaving.proc.terminate(Duration::from_secs(10)));
    assert!(
        !lb.get("/api/v1/services/greeter").1.contains(&addr),
        "graceful stop did not deregister"
    );
}

/// The registration API refuses registrations when the LB reads etcd, with
/// a message that says where to register instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_api_refuses_when_registry_is_not_embedded() {
    let lb = Lb::start(&["--registry", "file:///nonexistent/services.json"]).await;
    let mut client = lb_proto::registry::v1::registry_client::RegistryClient::connect(format!(
        "http://{}",
        lb.addr
    ))
    .await
    .unwrap();
    let err = client
        .register(lb_proto::registry::v1::RegisterRequest {
            service: "greeter".into(),
            address: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .expect_err("registration accepted");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("file:///nonexistent"),
        "{}",
        err.message()
    );
    assert_eq!(
        lb.get("/readyz").0,
        503,
        "a registry that never listed must not be ready"
    );
}
