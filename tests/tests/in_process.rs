//! The in-process tier: an `LbServer` on port 0 with its embedded registry,
//! backends and clients in the test's own process. Fast checks of the way
//! from the catalog to a stream, beside the multi-process tests.

use std::net::SocketAddr;
use std::time::Duration;

use lb_client::{LbChannel, Registration, RegistrationOptions};
use lb_examples::greeter::{GreeterOptions, RunningGreeter};
use lb_proto::grpc::lb::v1::load_balance_request::LoadBalanceRequestType;
use lb_proto::grpc::lb::v1::load_balance_response::LoadBalanceResponseType;
use lb_proto::grpc::lb::v1::load_balancer_client::LoadBalancerClient;
use lb_proto::grpc::lb::v1::{InitialLoadBalanceRequest, LoadBalanceRequest, Server};
use lb_server::{Config, LbServer};
use lb_tests::{call_n, wait_backends, wait_until};

/// The next message of a BalanceLoad stream (within 5 s).
async fn next(
    inbound: &mut tonic::Streaming<lb_proto::grpc::lb::v1::LoadBalanceResponse>,
) -> Option<LoadBalanceResponseType> {
    tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("a message within 5 s")
        .expect("stream healthy")
        .expect("stream open")
        .load_balance_response_type
}

async fn lb() -> LbServer {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    LbServer::start(Config::with_addrs(any, any))
        .await
        .expect("an embedded LB starts")
}

async fn greeter(lb: &LbServer) -> RunningGreeter {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = format!("lb://{}", lb.lb_addr);
    let g = RunningGreeter::start(listener, GreeterOptions::default(), |addr| {
        Registration::start(
            &registry,
            "greeter",
            &addr.to_string(),
            RegistrationOptions::default(),
        )
        .ok()
    })
    .await
    .expect("greeter starts");
    assert!(g.wait_registered(Duration::from_secs(5)).await);
    g
}

/// What the catalog publishes is what a stock grpclb stream reads, frame by
/// frame: `initial_response` first, then the list (the snapshot's own
/// encoded bytes), then each change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_grpclb_stream_reads_the_published_list_and_its_changes() {
    let lb = lb().await;
    let gs = [greeter(&lb).await, greeter(&lb).await];
    let catalog = lb.catalog.clone();
    let entry = catalog.service("greeter").expect("service known");
    assert!(
        wait_until(Duration::from_secs(5), || entry
            .current_list()
            .servers
            .len()
            == 2)
        .await
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", lb.lb_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(LoadBalanceRequest {
        load_balance_request_type: Some(LoadBalanceRequestType::InitialRequest(
            InitialLoadBalanceRequest {
                name: "greeter".into(),
            },
        )),
    })
    .await
    .unwrap();
    let mut inbound = LoadBalancerClient::new(channel)
        .balance_load(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream accepted")
        .into_inner();
    assert!(matches!(
        next(&mut inbound).await,
        Some(LoadBalanceResponseType::InitialResponse(_))
    ));
    let listed = |servers: &[Server]| {
        let mut a: Vec<SocketAddr> = servers.iter().filter_map(Server::socket_addr).collect();
        a.sort();
        a
    };
    let Some(LoadBalanceResponseType::ServerList(first)) = next(&mut inbound).await else {
        panic!("a server list after initial_response")
    };
    let mut want = vec![gs[0].addr, gs[1].addr];
    want.sort();
    assert_eq!(listed(&first.servers), want);
    assert_eq!(first.servers, entry.current_list().servers);

    gs[0].set_serving(false).await;
    let Some(LoadBalanceResponseType::ServerList(second)) = next(&mut inbound).await else {
        panic!("a new list after a health change")
    };
    assert_eq!(listed(&second.servers), vec![gs[1].addr]);
    assert_eq!(second.servers, entry.current_list().servers);
    lb.shutdown(Duration::from_secs(2)).await;
}

/// An `LbChannel` follows the catalog: calls spread over the listed
/// backends, a drained backend gets none, and it is back once undrained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_follows_drains_within_the_process() {
    let lb = lb().await;
    let gs = [greeter(&lb).await, greeter(&lb).await];
    let ch = LbChannel::builder("greeter")
        .lb(lb.lb_addr.to_string())
        .build()
        .unwrap();
    assert!(wait_backends(&ch, 2, Duration::from_secs(5)).await);
    let tally = call_n(&ch, 40).await;
    assert_eq!(tally.failed(), 0);
    assert_eq!(tally.per_backend.len(), 2, "{:?}", tally.per_backend);

    assert!(lb.catalog.set_drained("greeter", gs[0].addr, true));
    assert!(wait_until(Duration::from_secs(5), || lb_tests::listed(&ch).len() == 1).await);
    let tally = call_n(&ch, 20).await;
    assert_eq!(tally.failed(), 0);
    assert_eq!(
        tally.per_backend.get(&gs[0].addr.to_string()),
        None,
        "a drained backend got calls: {:?}",
        tally.per_backend
    );
    assert!(lb.catalog.set_drained("greeter", gs[0].addr, false));
    assert!(wait_backends(&ch, 2, Duration::from_secs(5)).await);
    lb.shutdown(Duration::from_secs(2)).await;
}
