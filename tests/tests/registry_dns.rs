//! The DNS registry source against a real DNS server on loopback (dnslib,
//! `tests/interop/zone_server.py`): initial listing, additions, removals,
//! an outage and SERVFAIL (the last answer kept, zero failed calls),
//! recovery, SRV weights and priorities, the TTL floor and ceiling, and
//! malformed records rejected and counted.

use std::time::{Duration, Instant};

use lb_tests::dns::{a, srv, ZoneServer};
use lb_tests::{
    channel, free_port, listed, listed_and_calling, wait_listed, wait_until, Greeter, Lb,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_list_add_remove_and_survive_an_outage_and_servfail() {
    let port = free_port();
    let mut g = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        g.push(Greeter::start_on(&format!("{ip}:{port}"), "none", &[]).await);
    }
    let name = "greeter.svc.test";
    let mut zone = ZoneServer::start(vec![a(name, "127.0.0.2", 1), a(name, "127.0.0.3", 1)]).await;
    let lb = Lb::start(&[
        "--registry",
        &zone.url(),
        "--dns-service",
        &format!("greeter={name}:{port}"),
        "--dns-min-ttl",
        "200ms",
        "--dns-max-ttl",
        "2s",
    ])
    .await;
    let (ch, caller) = listed_and_calling(&lb, &[g[0].addr, g[1].addr]).await;

    // Added: within the 1 s TTL (plus a health check).
    let t = Instant::now();
    zone.set(vec![
        a(name, "127.0.0.2", 1),
        a(name, "127.0.0.3", 1),
        a(name, "127.0.0.4", 1),
    ]);
    assert!(
        wait_listed(
            &ch,
            &[g[0].addr, g[1].addr, g[2].addr],
            Duration::from_secs(5)
        )
        .await,
        "add: {:?}",
        listed(&ch)
    );
    eprintln!("A record added -> listed after {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?} with a 1 s TTL",
        t.elapsed()
    );

    // Removed.
    zone.set(vec![a(name, "127.0.0.3", 1), a(name, "127.0.0.4", 1)]);
    assert!(
        wait_listed(&ch, &[g[1].addr, g[2].addr], Duration::from_secs(5)).await,
        "remove: {:?}",
        listed(&ch)
    );

    // Outage: the server is gone (queries time out); the last answer stays.
    let errors = |lb: &Lb| lb.metric("lb_registry_events_total{source=\"dns\",kind=\"error\"}");
    let before = errors(&lb);
    zone.kill();
    assert!(
        wait_until(Duration::from_secs(10), || errors(&lb) > before).await,
        "the outage was not counted"
    );
    assert_eq!(listed(&ch), {
        let mut v = vec![g[1].addr, g[2].addr];
        v.sort();
        v
    });

    // Recovery: the same server comes back with a changed zone.
    zone.set(vec![
        a(name, "127.0.0.2", 1),
        a(name, "127.0.0.3", 1),
        a(name, "127.0.0.4", 1),
    ]);
    zone.restart().await;
    assert!(
        wait_listed(
            &ch,
            &[g[0].addr, g[1].addr, g[2].addr],
            Duration::from_secs(6)
        )
        .await,
        "recovery: {:?}",
        listed(&ch)
    );

    // SERVFAIL for 2 s: nothing changes; then updates resume.
    zone.fail(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(listed(&ch).len(), 3);
    zone.set(vec![a(name, "127.0.0.2", 1)]);
    zone.fail(false);
    assert!(
        wait_listed(&ch, &[g[0].addr], Duration::from_secs(6)).await,
        "after SERVFAIL: {:?}",
        listed(&ch)
    );

    // An empty answer (NXDOMAIN) keeps the last one rather than emptying the service.
    zone.set(vec![]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(listed(&ch), vec![g[0].addr]);

    let calls = caller.stop().await;
    assert!(calls.failures.is_empty(), "{:?}", calls.failures);
    assert!(calls.ok() > 100);
}

/// SRV records: targets of the lowest priority at their own ports, weighted
/// by SRV weight; a record TTL of an hour is cut to the --dns-max-ttl
/// ceiling, a TTL of 0 raised to the floor; unusable records are rejected
/// and counted while the rest serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_weights_ttl_bounds_and_malformed_records() {
    let g: Vec<Greeter> =
        futures::future::join_all((0..3).map(|_| Greeter::start("none", &[]))).await;
    let (p0, p1, p2) = (g[0].addr.port(), g[1].addr.port(), g[2].addr.port());
    let web = "_grpc._tcp.web.svc.test";
    let hosts = || {
        vec![
            a("a.svc.test", "127.0.0.1", 3600),
            a("b.svc.test", "127.0.0.1", 3600),
        ]
    };
    let mut records = hosts();
    records.extend([
        srv(web, 0, 3, p0, "a.svc.test", 3600),
        srv(web, 0, 1, p1, "b.svc.test", 3600),
        srv(web, 10, 1, p2, "a.svc.test", 3600), // a backup: lower priority, unused
        srv(web, 0, 1, 0, "a.svc.test", 3600),   // port 0: rejected
        srv(web, 0, 1, p2, "nohost.svc.test", 3600), // no address: rejected
        a("fast.svc.test", "127.0.0.1", 0),
    ]);
    let mut zone = ZoneServer::start(records).await;
    let lb = Lb::start(&[
        "--registry",
        &zone.url(),
        "--dns-service",
        "web=web.svc.test",
        "--dns-service",
        &format!("fast=fast.svc.test:{p2}"),
        "--dns-min-ttl",
        "500ms",
        "--dns-max-ttl",
        "1s",
    ])
    .await;
    let ch = channel("web", &[lb.addr]);
    assert!(
        wait_listed(&ch, &[g[0].addr, g[1].addr], Duration::from_secs(10)).await,
        "{:?}",
        listed(&ch)
    );
    let share = |ch: &lb_client::LbChannel, addr| {
        ch.listed_backends().iter().filter(|a| **a == addr).count()
    };
    assert!(
        wait_until(Duration::from_secs(3), || share(&ch, g[0].addr)
            == 3 * share(&ch, g[1].addr))
        .await,
        "SRV weights 3:1 not in the list: {:?}",
        ch.listed_backends()
    );
    for kind in ["bad_address", "unresolvable"] {
        assert!(
            lb.metric(&format!(
                "lb_registry_rejects_total{{source=\"dns\",kind=\"{kind}\"}}"
            )) >= 1.0,
            "{kind} not counted"
        );
    }

    // The records say an hour; the 1 s ceiling still sees a change in time.
    let t = Instant::now();
    let mut records = hosts();
    records.extend([
        srv(web, 0, 1, p0, "a.svc.test", 3600),
        srv(web, 0, 1, p2, "b.svc.test", 3600),
    ]);
    records.push(a("fast.svc.test", "127.0.0.1", 0));
    zone.set(records);
    assert!(
        wait_listed(&ch, &[g[0].addr, g[2].addr], Duration::from_secs(4)).await,
        "{:?}",
        listed(&ch)
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "a 1 s ceiling took {:?}",
        t.elapsed()
    );

    // A TTL of 0 is re-resolved at the 500 ms floor, not in a loop.
    let before = zone.queries("fast.svc.test");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = zone.queries("fast.svc.test") - before;
    eprintln!("TTL 0 with a 500 ms floor: {asked} queries in 3 s (A and AAAA each)");
    assert!((4..=16).contains(&asked), "{asked} queries in 3 s");
}
