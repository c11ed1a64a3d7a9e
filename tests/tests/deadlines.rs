//! Deadlines and dead links through `LbChannel` (DESIGN §4.13), against
//! stock grpc-go backends: a call's deadline holds for the whole call, as in
//! every stock client, and a call without one still ends when its backend is
//! black-holed, within the channel's TCP settings.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_tests::blackhole::Blackhole;
use lb_tests::stock::{stock_fleet, StockBackend};
use lb_tests::{bin, wait_until};

/// Waits until `channel` has a ready connection to each of `addrs`.
async fn connected(channel: &LbChannel, addrs: &[SocketAddr]) {
    let ok = wait_until(Duration::from_secs(10), || {
        let ready = channel.ready_backends();
        addrs.iter().all(|a| ready.contains(a))
    })
    .await;
    assert!(
        ok,
        "the channel never connected to {addrs:?}: ready {:?}",
        channel.ready_backends()
    );
}

/// Sends SIGCONT on drop, so that a stopped backend can be stopped for good.
struct Resume<'a>(&'a StockBackend);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.proc.signal(libc::SIGCONT);
    }
}

/// Two backends, one SIGSTOPped (its kernel keeps the connection open and
/// acknowledges; nothing answers): 20 calls with a 1 s deadline, two at a
/// time, end in about the time the LB takes to drop the hung backend plus
/// a deadline or two; each call to the hung backend ends with
/// DEADLINE_EXCEEDED at its deadline, the rest succeed. The same, at the
/// same time, through `greeter-client`, a fresh process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_a_hung_backend_end_at_their_deadline() {
    let (lb, backends, _registrations) = stock_fleet(2, &[]).await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let channel = LbChannel::builder("greeter")
        .lb(lb.addr.to_string())
        .build()
        .expect("channel");
    connected(&channel, &addrs).await;
    let warm = lb_examples::drive::drive(&channel, 10, 2, Duration::from_secs(5)).await;
    assert_eq!(warm.failed(), 0, "warm-up failed: {}", warm.table());

    let hung = &backends[1];
    hung.proc.signal(libc::SIGSTOP);
    let _resume = Resume(hung);
    let started = Instant::now();
    // The command line client, a fresh process, at the same time: it may
    // connect to the hung backend while the LB still lists it.
    let cli = tokio::spawn(
        tokio::process::Command::new(bin("greeter-client"))
            .args(["--lb", &lb.addr.to_string(), "--service", "greeter"])
            .args(["--calls", "20", "--concurrency", "2", "--timeout", "1s"])
            .kill_on_drop(true)
            .output(),
    );
    let tally = tokio::time::timeout(
        Duration::from_secs(60),
        lb_examples::drive::drive(&channel, 20, 2, Duration::from_secs(1)),
    )
    .await
    .expect("20 calls with a 1 s deadline still running after 60 s");
    let took = started.elapsed();
    eprintln!("in-process: {took:?}\n{}", tally.table());
    assert!(
        tally.ok() >= 15,
        "{} of 20 calls ok: {}",
        tally.ok(),
        tally.table()
    );
    for failure in tally.failures.keys() {
        assert!(
            failure.starts_with("DeadlineExceeded"),
            "a call failed otherwise than by its deadline: {}",
            tally.table()
        );
    }
    assert!(
        took < Duration::from_secs(15),
        "20 calls took {took:?}: {}",
        tally.table()
    );

    let out = tokio::time::timeout(Duration::from_secs(60), cli)
        .await
        .expect("greeter-client still running after 60 s")
        .expect("join")
        .expect("run greeter-client");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("greeter-client: {took:?}\n{text}");
    let ok: u64 = text
        .lines()
        .find_map(|l| l.split(": ").nth(1)?.split(" ok").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary line in greeter-client's output: {text}"));
    assert!(ok >= 15, "greeter-client: {ok} of 20 calls ok\n{text}");
    assert!(
        took < Duration::from_secs(15),
        "greeter-client took {took:?}"
    );
}

/// A call without a deadline on a connection whose backend is black-holed
/// (packets dropped, nothing acknowledged: no RST, no answer) fails with
/// UNAVAILABLE once `TCP_USER_TIMEOUT` runs out, instead of waiting for
/// TCP's ~15 minutes of retransmissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_deadline_to_a_black_holed_backend_fails_within_the_user_timeout() {
    let (lb, backends, _registrations) = stock_fleet(1, &[]).await;
    let addr = backends[0].addr;
    let user_timeout = Duration::from_secs(3);
    let channel = LbChannel::builder("greeter")
        .lb(lb.addr.to_string())
        .tcp_keepalive(Some(Duration::from_secs(1)))
        .tcp_keepalive_interval(Some(Duration::from_secs(1)))
        .tcp_user_timeout(Some(user_timeout))
        .build()
        .expect("channel");
    connected(&channel, &[addr]).await;
    let mut client = GreeterClient::new(channel.clone());
    client
        .say_hello(HelloRequest {
            name: "before".into(),
        })
        .await
        .expect("a call before the black hole");

    let _hole = Blackhole::inbound(addr.port());
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        client.say_hello(HelloRequest {
            name: "into the hole".into(),
        }),
    )
    .await
    .expect("a call without deadline to a black-holed backend still waiting after 60 s");
    let took = started.elapsed();
    eprintln!("ended after {took:?}: {result:?}");
    let status = result.expect_err("a black-holed backend answered");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        took <= user_timeout + Duration::from_secs(3),
        "the call ended after {took:?}, the user timeout is {user_timeout:?}"
    );
}
