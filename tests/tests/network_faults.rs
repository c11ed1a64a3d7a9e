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
use lb_tests::netns::{Host, Net};
use lb_tests::stock::StockClient;
use lb_tests::{wait_until, Greeter, Lb};

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

/// The sessions an LB lists from `peer`'s address.
fn sessions_from(lb: &Lb, peer: &Host) -> usize {
    let clients = lb.json("/api/v1/clients");
    let prefix = format!("{}:", peer.ip);
    clients["clients"].as_array().map_or(0, |c| {
        c.iter()
            .filter(|c| c["peer"].as_str().is_some_and(|p| p.starts_with(&prefix)))
            .count()
    })
}

/// The xDS streams an LB lists from `peer`'s address.
fn xds_sessions_from(lb: &Lb, peer: &Host) -> usize {
    let clients = lb.json("/api/v1/clients");
    let prefix = format!("{}:", peer.ip);
    clients["xds_clients"].as_array().map_or(0, |c| {
        c.iter()
            .filter(|c| c["peer"].as_str().is_some_and(|p| p.starts_with(&prefix)))
            .count()
    })
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

/// The LbChannel under test names itself to the LBs with this id.
const CHANNEL_ID: &str = "channel-under-test";

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
    let channel = {
        let _in = rt.enter();
        LbChannel::builder("greeter")
            .lbs([lb1.addr.to_string(), lb2.addr.to_string()])
            .client_id(CHANNEL_ID)
            .build()
            .expect("channel")
    };
    assert!(
        wait_until(Duration::from_secs(10), || channel.ready_backends().len()
            == 2)
        .await,
        "the client never connected to both backends: {:?}",
        channel.ready_backends()
    );
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
    let go = StockClient::go_in(&client_host, used, "greeter", stock_for, interval);
    let xds = StockClient::xds_grpcio_in(
        &client_host,
        &used.to_string(),
        "greeter",
        stock_for,
        interval,
    );
    let all_connected = wait_until(Duration::from_secs(20), || {
        sessions_from(used_lb, &client_host) == 2 && xds_sessions_from(used_lb, &client_host) == 1
    })
    .await;
    assert!(
        all_connected,
        "the stock clients never reached the LB: {}",
        used_lb.get("/api/v1/clients").1
    );
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
    for (name, client) in [("grpc-go grpclb", go), ("grpcio xDS", xds)] {
        let summary = client.finish(Duration::from_secs(60)).await;
        let calls = summary["calls"].as_u64().unwrap_or(0);
        let failed = summary["failures"].as_array().map_or(0, Vec::len) as u64;
        eprintln!("{kind:?}: {name}: {calls} calls, {failed} failed");
        assert!(
            calls as f64 >= hold.as_secs_f64() * 10.0,
            "{name}: too few calls to judge: {summary}"
        );
        assert!(
            failed * 1000 <= calls,
            "{kind:?}: {name}: {failed} of {calls} calls failed: {summary}"
        );
    }

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
