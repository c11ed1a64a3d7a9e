//! The ZooKeeper registry source against a real ZooKeeper server (Debian's
//! `zookeeper` package): backends registering themselves as ephemeral
//! Dubbo-style provider znodes, a provider written by another framework,
//! graceful removal, an instance's session dying with its process, an
//! ensemble outage (last known list kept, zero failed calls), recovery,
//! and malformed znodes rejected and counted.

use std::time::{Duration, Instant};

use lb_tests::zookeeper::{create_all, ZooKeeper};
use lb_tests::{channel, wait_until, Caller, Greeter, Lb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_lists_adds_removes_and_survives_an_outage() {
    let mut zk = ZooKeeper::start().await;
    let registry = zk.url("/dubbo");
    let lb = Lb::start(&["--registry", &registry, "--zk-session-timeout", "4s"]).await;
    // Sessions of 10 s outlive the outage below.
    let mut g = lb_tests::greeters(2, &registry, &["--ttl", "10s"]).await;
    lb.wait_ready(Duration::from_secs(10)).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(
        lb_tests::wait_backends(&ch, 2, Duration::from_secs(10)).await,
        "initial listing"
    );
    let caller = Caller::start(&ch, 2, Duration::from_millis(5));

    // A provider written by another framework: the URL-encoded provider URL
    // as the znode name (Dubbo's layout), a bare IP as its data.
    let other = Greeter::start("none", &[]).await;
    let client = zk.client().await;
    let node = format!(
        "/dubbo/greeter/providers/dubbo%3A%2F%2F127.0.0.1%3A{}%2Fcom.example.Greeter%3Fanyhost%3Dtrue%26weight%3D1",
        other.addr.port()
    );
    let t = Instant::now();
    create_all(&client, &node, b"127.0.0.1").await;
    assert!(
        lb_tests::wait_backends(&ch, 3, Duration::from_secs(5)).await,
        "added provider not listed"
    );
    eprintln!("znode created -> listed after {:?}", t.elapsed());

    // Malformed znodes: rejected, counted; nothing else changes.
    create_all(
        &client,
        "/dubbo/greeter/providers/instance-junk",
        b"not an address",
    )
    .await;
    create_all(
        &client,
        "/dubbo/greeter/providers/dubbo%3A%2F%2F127.0.0.1%2Fno-port",
        b"",
    )
    .await;
    let rejects = |lb: &Lb| {
        lb.metric("lb_registry_rejects_total{source=\"zk\",kind=\"bad_address\"}")
            + lb.metric("lb_registry_rejects_total{source=\"zk\",kind=\"bad_value\"}")
    };
    assert!(
        wait_until(Duration::from_secs(5), || rejects(&lb) >= 2.0).await,
        "{}",
        rejects(&lb)
    );

    // Removed: a graceful stop deletes its znode.
    let mut leaving = g.remove(0);
    let gone = leaving.addr;
    tokio::task::block_in_place(|| leaving.proc.terminate(Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(5), || !lb
            .knows_backend("greeter", gone))
        .await,
        "graceful stop not seen"
    );

    // Outage: ZooKeeper is killed for 4 s; the LB keeps its list.
    zk.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        lb_tests::wait_backends(&ch, 2, Duration::from_millis(100)).await,
        "list lost in the outage: {:?}",
        ch.ready_backends()
    );
    assert!(
        lb.metric("lb_registry_events_total{source=\"zk\",kind=\"error\"}") >= 1.0,
        "the outage was not counted"
    );

    // Recovery: a newcomer registers and is listed; a deletion is seen.
    zk.restart().await;
    let newcomer = Greeter::start(&registry, &["--ttl", "10s"]).await;
    assert!(
        newcomer.wait_registered(Duration::from_secs(15)).await,
        "newcomer could not register"
    );
    assert!(
        wait_until(Duration::from_secs(10), || lb
            .knows_backend("greeter", newcomer.addr))
        .await,
        "recovery not seen"
    );
    let client = zk.client().await;
    client.delete(&node, None).await.expect("delete provider");
    // It still serves: kept, departed (registry_gone.rs).
    assert!(
        wait_until(Duration::from_secs(5), || lb
            .departed("greeter", other.addr))
        .await,
        "deletion after recovery not seen: {:?}",
        lb.backends("greeter")
    );

    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
}

/// A backend SIGKILLed: its ephemeral znode goes when its 1 s session
/// expires, and the LB drops it from the registry (not just from lists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_leaves_with_its_session() {
    let zk = ZooKeeper::start().await;
    let registry = zk.url("/services");
    let lb = Lb::start(&["--registry", &registry]).await;
    let mut g = Greeter::start(&registry, &["--ttl", "1s"]).await;
    assert!(g.wait_registered(Duration::from_secs(10)).await);
    assert!(
        wait_until(Duration::from_secs(5), || lb
            .knows_backend("greeter", g.addr))
        .await
    );
    let t = Instant::now();
    g.proc.kill();
    assert!(
        wait_until(Duration::from_secs(8), || !lb
            .knows_backend("greeter", g.addr))
        .await,
        "the dead instance's znode never went"
    );
    eprintln!(
        "SIGKILL -> session expired, znode gone, removed from the registry after {:?}",
        t.elapsed()
    );
    assert!(lb.metric("lb_registry_events_total{source=\"zk\",kind=\"delete\"}") >= 1.0);
}
