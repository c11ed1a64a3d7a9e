//! An LB cluster: several `lb-server` replicas over one etcd (DESIGN §4
//! scenario 10). Replicas are killed under load, health checking is shared
//! between replicas, a 3-member etcd loses a member and then its quorum,
//! and per-client subsets are checked for balance and stability.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_tests::{
    channel, greeters, wait_backends, wait_until, Caller, Etcd, Greeter, Lb, ListWatcher,
};
use serde_json::Value;

/// Lb clients (by their open stream) per LB address.
fn clients_on(lb: &Lb) -> usize {
    let (status, body) = lb.get("/api/v1/clients");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("clients JSON");
    v["clients"].as_array().map(Vec::len).unwrap_or(0)
}

/// The listed backends of `service` according to the LB's admin API.
fn listed(lb: &Lb, service: &str) -> usize {
    let (status, body) = lb.get(&format!("/api/v1/services/{service}"));
    if status != 200 {
        return 0;
    }
    let v: Value = serde_json::from_str(&body).expect("service JSON");
    v["listed"].as_u64().unwrap_or(0) as usize
}

/// The replica each backend is checked by, per the LB's admin API.
fn checked_by(lb: &Lb, service: &str) -> BTreeMap<String, String> {
    let (_, body) = lb.get(&format!("/api/v1/services/{service}"));
    let v: Value = serde_json::from_str(&body).expect("service JSON");
    v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_string(),
                b["checked_by"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn cluster_lb_args<'a>(registry: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--registry",
        registry,
        "--replica-ttl",
        "2s",
        "--client-stats-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
    args
}

/// Scenario 10 and the replica-failover item: clients spread over two
/// replicas; one is SIGKILLed under load → zero failed calls and every
/// client is on the survivor within 2 s; restarted, it serves new clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_loses_no_call_and_its_clients_move_within_2s() {
    let etcd = Etcd::start().await;
    let url = etcd.registry_url();
    let lb1 = Lb::start(&cluster_lb_args(&url, &[])).await;
    let lb2 = Lb::start(&cluster_lb_args(&url, &[])).await;
    let _backends = greeters(3, &url, &[]).await;

    // Clients pick a replica at random; add clients until both have some.
    let mut clients: Vec<LbChannel> = Vec::new();
    while clients.len() < 40 && (clients.len() < 10 || clients_on(&lb1) < 3 || clients_on(&lb2) < 3)
    {
        let ch = channel("greeter", &[lb1.addr, lb2.addr]);
        assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
        clients.push(ch);
    }
    let on_lb1 = clients_on(&lb1);
    assert!(
        on_lb1 >= 1 && clients_on(&lb2) >= 1,
        "clients did not spread over both replicas"
    );
    let callers: Vec<Caller> = clients
        .iter()
        .map(|c| Caller::start(c, 1, Duration::from_millis(10)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (lb1_addr, mut lb1) = (lb1.addr, lb1);
    lb1.proc.kill();
    let killed = Instant::now();
    let total = clients.len();
    // Both sides must agree: the survivor lists every stream (it does so on
    // accepting one) and every client has its initial_response from it.
    let all_on_lb2 =
        || clients_on(&lb2) == total && clients.iter().all(|c| c.current_lb() == Some(lb2.addr));
    assert!(
        wait_until(Duration::from_secs(2), all_on_lb2).await,
        "2 s after the kill the survivor lists {} of {total} clients, {} of them know it",
        clients_on(&lb2),
        clients
            .iter()
            .filter(|c| c.current_lb() == Some(lb2.addr))
            .count()
    );
    let moved_in = killed.elapsed();
    eprintln!(
        "{on_lb1} clients of the killed replica (of {total}) on the survivor after {moved_in:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut ok = 0;
    for caller in callers {
        let calls = caller.stop().await;
        assert!(
            calls.failures.is_empty(),
            "calls failed across the replica kill: {:?}",
            &calls.failures[..calls.failures.len().min(5)]
        );
        ok += calls.ok();
    }
    assert!(ok > 100, "too few calls made: {ok}");

    // Restarted on the same address, it serves new clients again.
    let lb1 = lb1.relaunch().await;
    assert_eq!(lb1.addr, lb1_addr);
    let fresh = channel("greeter", &[lb1.addr]);
    assert!(
        wait_backends(&fresh, 3, Duration::from_secs(10)).await,
        "a new client of the restarted replica got no list"
    );
    assert_eq!(fresh.current_lb(), Some(lb1.addr));
    assert_eq!(clients_on(&lb1), 1);
    let tally = lb_tests::call_n(&fresh, 30).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
}

/// With two replicas each backend is watched by one replica at a time
/// (counted on the backend), both replicas agree on the owners and on the
/// list, a SIGKILLed backend leaves the non-owner's list within 1 s too, and
/// a dead replica's backends are taken over by the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_health_checks_one_watcher_per_backend() {
    let etcd = Etcd::start().await;
    let url = etcd.registry_url();
    let lb1 = Lb::start(&cluster_lb_args(&url, &[])).await;
    let lb2 = Lb::start(&cluster_lb_args(&url, &[])).await;
    let mut backends = greeters(4, &url, &[]).await;
    assert!(
        wait_until(Duration::from_secs(10), || listed(&lb1, "greeter") == 4
            && listed(&lb2, "greeter") == 4)
        .await,
        "replicas did not list all backends"
    );
    let one_each = |bs: &[Greeter]| bs.iter().all(|b| b.health_watchers() == 1);
    assert!(
        wait_until(Duration::from_secs(5), || one_each(&backends)).await,
        "health watchers per backend: {:?}",
        backends
            .iter()
            .map(Greeter::health_watchers)
            .collect::<Vec<_>>()
    );
    // And it stays that way: never a second checker.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let counts: Vec<usize> = backends.iter().map(Greeter::health_watchers).collect();
        assert!(
            counts.iter().all(|n| *n == 1),
            "watchers per backend: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let owners = checked_by(&lb1, "greeter");
    assert_eq!(
        owners,
        checked_by(&lb2, "greeter"),
        "replicas disagree on owners"
    );
    assert_eq!(owners.len(), 4);

    // Both replicas send the same list, in the same order.
    let w1 = ListWatcher::start(lb1.addr, "greeter").await;
    let w2 = ListWatcher::start(lb2.addr, "greeter").await;
    assert!(
        wait_until(Duration::from_secs(5), || w1.latest().is_some()
            && w2.latest().is_some())
        .await
    );
    assert_eq!(w1.latest(), w2.latest(), "replicas built different lists");

    // A SIGKILLed backend leaves both lists within 1 s, whoever checks it.
    let victim = backends.remove(0);
    let addr = victim.addr;
    let mut victim = victim;
    let t = Instant::now();
    victim.proc.kill();
    for (w, name) in [(&w1, "lb1"), (&w2, "lb2")] {
        assert!(
            wait_until(Duration::from_secs(3), || w
                .removed_after(addr, t)
                .is_some())
            .await,
            "{name} still lists the killed backend"
        );
        let took = w.removed_after(addr, t).unwrap() - t;
        eprintln!("{name}: killed backend gone after {took:?}");
        assert!(took < Duration::from_secs(1), "{name} took {took:?}");
    }

    // The survivor takes over a dead replica's backends after its lease.
    let mut lb1 = lb1;
    lb1.proc.kill();
    let survivor = lb2.get("/api/v1/cluster").1;
    eprintln!("cluster before takeover: {survivor}");
    assert!(
        wait_until(Duration::from_secs(8), || {
            let owners = checked_by(&lb2, "greeter");
            owners
                .values()
                .all(|o| o.ends_with(&format!(":{}", lb2.addr.port())))
        })
        .await,
        "survivor did not take over: {:?}",
        checked_by(&lb2, "greeter")
    );
    assert!(
        wait_until(Duration::from_secs(5), || one_each(&backends)).await,
        "after takeover, watchers per backend: {:?}",
        backends
            .iter()
            .map(Greeter::health_watchers)
            .collect::<Vec<_>>()
    );
}

/// A 3-member etcd cluster loses one member: LBs and registrations carry
/// on. Then it loses its quorum for 30 s: clients keep calling with zero
/// failures and new clients get the LBs' cached lists. When quorum returns,
/// registrations and removals resume by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_and_quorum_loss_change_nothing_for_clients() {
    let mut members = Etcd::start_cluster(3).await;
    let url = Etcd::cluster_url(&members);
    let lb1 = Lb::start(&cluster_lb_args(&url, &[])).await;
    let lb2 = Lb::start(&cluster_lb_args(&url, &[])).await;
    let lbs = [lb1.addr, lb2.addr];
    let mut backends = greeters(3, &url, &["--ttl", "5s"]).await;
    let ch = channel("greeter", &lbs);
    assert!(wait_backends(&ch, 3, Duration::from_secs(10)).await);
    let caller = Caller::start(&ch, 2, Duration::from_millis(10));

    // One member dies: a new backend still registers and is listed.
    members[0].kill();
    let fourth = Greeter::start(&url, &["--ttl", "5s"]).await;
    assert!(
        fourth.wait_registered(Duration::from_secs(15)).await,
        "registration failed with one etcd member down"
    );
    assert!(
        wait_backends(&ch, 4, Duration::from_secs(10)).await,
        "new backend not listed with one etcd member down"
    );
    // Both replicas, not just the one this channel streams from, must have
    // it before quorum goes: a new client may land on either.
    for lb in [&lb1, &lb2] {
        assert!(
            wait_until(Duration::from_secs(10), || lb
                .knows_backend("greeter", fourth.addr))
            .await,
            "a replica never listed the new backend with one etcd member down"
        );
    }
    backends.push(fourth);

    // Quorum lost for 30 s.
    members[1].kill();
    let lost_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let newcomer = channel("greeter", &lbs);
    if !wait_backends(&newcomer, 4, Duration::from_secs(5)).await {
        let views: Vec<String> = [&lb1, &lb2]
            .iter()
            .map(|lb| lb.get("/api/v1/services/greeter").1)
            .collect();
        panic!(
            "a new client got no cached list without quorum: listed {:?}, ready {:?}, counters {:?}; the LBs say {views:#?}",
            lb_tests::listed(&newcomer),
            newcomer.ready_backends(),
            newcomer.counters(),
        );
    }
    let tally = lb_tests::call_n(&newcomer, 40).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    let rest = Duration::from_secs(30).saturating_sub(lost_at.elapsed());
    tokio::time::sleep(rest).await;
    assert!(
        caller.snapshot().failures.is_empty(),
        "calls failed without quorum: {:?}",
        caller.snapshot().failures
    );

    // Quorum returns: registrations and removals resume.
    members[1].restart().await;
    members[0].restart().await;
    let back_at = Instant::now();
    let fifth = Greeter::start(&url, &["--ttl", "5s"]).await;
    assert!(
        fifth.wait_registered(Duration::from_secs(20)).await,
        "registration did not resume with quorum back"
    );
    assert!(
        wait_backends(&ch, 5, Duration::from_secs(15)).await,
        "registration after quorum returned not listed: {:?}",
        ch.ready_backends()
    );
    let leaving = backends.remove(0);
    let gone = leaving.addr;
    let mut leaving = leaving;
    leaving.proc.terminate(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(10), || !ch
            .ready_backends()
            .contains(&gone))
        .await,
        "graceful removal after quorum returned not applied"
    );
    eprintln!(
        "quorum back -> registrations and removals applied within {:?}",
        back_at.elapsed()
    );
    for lb in [&lb1, &lb2] {
        let (_, body) = lb.get("/api/v1/cluster");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let (_, body) = lb.get("/api/v1/cluster");
                serde_json::from_str::<Value>(&body).unwrap()["view"]["connected"] == true
            })
            .await,
            "replica did not rejoin: {v}"
        );
    }
    let calls = caller.stop().await;
    assert!(
        calls.failures.is_empty(),
        "calls failed across member and quorum loss: {:?}",
        calls.failures
    );
    assert!(calls.ok() > 500, "too few calls: {}", calls.ok());
}

/// Subsets: 200 clients, 20 backends, K = 5 → every client gets 5, each
/// backend serves the mean ±25 %; removing a backend changes only the
/// subsets that held it.
/// Whichever etcd member dies, and whenever, every session moves to a live
/// one within a couple of seconds: both LBs' registry watches and cluster
/// sessions, and the registration helper of a backend starting meanwhile.
/// Each member is killed in turn (and brought back before the next), a new
/// backend registers while it is down, and both LBs must list it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_reach_a_live_etcd_member_whichever_dies() {
    let mut members = Etcd::start_cluster(3).await;
    let url = Etcd::cluster_url(&members);
    let lb1 = Lb::start(&cluster_lb_args(&url, &[])).await;
    let lb2 = Lb::start(&cluster_lb_args(&url, &[])).await;
    let mut backends = greeters(2, &url, &["--ttl", "5s"]).await;
    let per_lb = [
        channel("greeter", &[lb1.addr]),
        channel("greeter", &[lb2.addr]),
    ];
    for ch in &per_lb {
        assert!(wait_backends(ch, 2, Duration::from_secs(10)).await);
    }
    let caller = Caller::start(&per_lb[0], 2, Duration::from_millis(10));
    let connected = |lb: &Lb| {
        serde_json::from_str::<Value>(&lb.get("/api/v1/cluster").1).unwrap()["view"]["connected"]
            == true
    };
    for (i, member) in members.iter_mut().enumerate() {
        // Let every session settle on whatever member it chose.
        tokio::time::sleep(Duration::from_secs(2)).await;
        member.kill();
        let killed = Instant::now();
        let newcomer = Greeter::start(&url, &["--ttl", "5s"]).await;
        assert!(
            newcomer.wait_registered(Duration::from_secs(4)).await,
            "member {i} down: the registration helper did not reach a live member"
        );
        let registered = killed.elapsed();
        for (n, ch) in per_lb.iter().enumerate() {
            assert!(
                wait_until(Duration::from_secs(3), || ch.ready_backends().contains(&newcomer.addr)).await,
                "member {i} down: LB {} did not list a backend registered {registered:?} after the kill \
                 (its registry watch stayed on the dead member?); LB logs {} {}",
                n + 1,
                lb1.proc.log.display(),
                lb2.proc.log.display()
            );
        }
        let listed = killed.elapsed();
        for lb in [&lb1, &lb2] {
            assert!(
                wait_until(Duration::from_secs(3), || connected(lb)).await,
                "member {i} down: a cluster session did not reconnect to a live member: {}",
                lb.get("/api/v1/cluster").1
            );
        }
        eprintln!(
            "member {i} killed: newcomer registered {registered:?}, listed by both LBs {listed:?}, \
             cluster sessions connected {:?} after the kill",
            killed.elapsed()
        );
        backends.push(newcomer);
        member.restart().await;
    }
    let calls = caller.stop().await;
    assert!(
        calls.failures.is_empty(),
        "calls failed: {:?}",
        calls.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsets_are_balanced_and_change_minimally() {
    let etcd = Etcd::start().await;
    let url = etcd.registry_url();
    // A removed entry leaves at once (its backend still serves: by default
    // it would be kept for the deregistration grace).
    let lb = Lb::start(&[
        "--registry",
        &url,
        "--subset-size",
        "5",
        "--deregistration-grace",
        "0s",
    ])
    .await;
    let backends = greeters(20, &url, &[]).await;
    assert!(
        wait_until(Duration::from_secs(15), || listed(&lb, "greeter") == 20).await,
        "not every backend listed"
    );
    let mut watchers = Vec::new();
    for i in 0..200 {
        watchers
            .push(ListWatcher::start_as(lb.addr, "greeter", Some(&format!("client-{i}"))).await);
    }
    let subset = |w: &ListWatcher| -> BTreeSet<SocketAddr> {
        w.latest().unwrap_or_default().into_iter().collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || watchers.iter().all(|w| subset(
            w
        )
        .len()
            == 5))
        .await,
        "not every client got 5 backends"
    );
    let before: Vec<BTreeSet<SocketAddr>> = watchers.iter().map(subset).collect();
    let mut per_backend: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for s in &before {
        for a in s {
            *per_backend.entry(*a).or_default() += 1;
        }
    }
    assert_eq!(per_backend.len(), 20, "some backend is in no subset");
    let mean = 200.0 * 5.0 / 20.0;
    let (min, max) = (
        *per_backend.values().min().unwrap(),
        *per_backend.values().max().unwrap(),
    );
    eprintln!("clients per backend: min {min}, max {max}, mean {mean}");
    for (a, n) in &per_backend {
        assert!(
            (*n as f64 - mean).abs() <= 0.25 * mean,
            "{a} is in {n} subsets; mean {mean}"
        );
    }
    // The admin API agrees.
    let (_, body) = lb.get("/api/v1/services/greeter");
    let v: Value = serde_json::from_str(&body).unwrap();
    let admin_total: u64 = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["subset_clients"].as_u64().unwrap())
        .sum();
    assert_eq!(admin_total, 1000);

    // Remove one backend: only the subsets that held it change.
    let gone = backends[7].addr;
    let holders = before.iter().filter(|s| s.contains(&gone)).count();
    etcd.delete(&format!("/services/greeter/{gone}")).await;
    assert!(
        wait_until(Duration::from_secs(10), || watchers
            .iter()
            .all(|w| !subset(w).contains(&gone) && subset(w).len() == 5))
        .await,
        "subsets were not repaired"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut changed = 0;
    for (w, b) in watchers.iter().zip(&before) {
        let a = subset(w);
        if b.contains(&gone) {
            changed += 1;
            assert_eq!(
                a.intersection(b).count(),
                4,
                "more than the removed backend replaced"
            );
        } else {
            assert_eq!(&a, b, "a subset without the removed backend changed");
        }
    }
    assert_eq!(changed, holders);
    eprintln!("removing one backend changed {changed} of 200 subsets (those holding it)");
}

/// A replica's connections to etcd reset (`ss -K` on its host, as a
/// middlebox dropping their state would): the session is as alive as its
/// lease, so it makes its connections again and keeps the lease. No new
/// session, no "degraded", no check changing hands, no new list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_etcd_connections_keep_the_session_and_its_lease() {
    let net = lb_tests::netns::Net::new();
    let (etcd_host, lb_host) = (net.host(), net.host());
    let backend_hosts = [net.host(), net.host()];
    let etcd = Etcd::start_in(&etcd_host).await;
    let url = etcd.registry_url();
    let greeters = lb_tests::greeters_in(&backend_hosts, 50051, &url, &["--ttl", "5s"]).await;
    let lb = Lb::start_in(&lb_host, &cluster_lb_args(&url, &["--replica-id", "lb1"])).await;
    assert!(
        wait_until(Duration::from_secs(15), || lb.json("/api/v1/cluster")
            ["view"]["connected"]
            == true
            && listed(&lb, "greeter") == greeters.len())
        .await,
        "the replica never joined and listed the backends"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let info = |what: &str| {
        lb.log_lines("INFO")
            .into_iter()
            .filter(|l| l.contains(what))
            .count()
    };
    let joined = info("joined the cluster");
    let reconnects =
        |kind: &str| lb.metric(&format!("lb_upstream_reconnects_total{{kind=\"{kind}\"}}"));
    let sessions_lost = reconnects("cluster");
    let list_version = lb.json("/api/v1/services/greeter")["list_version"].clone();

    lb_host.ns.kill_sockets_to(etcd_host.ip);
    let t0 = Instant::now();
    let resumed = wait_until(Duration::from_secs(5), || {
        info("lease keep-alive resumed on a new connection") >= 1
            && info("cluster watch resumed on a new connection") >= 1
    })
    .await;
    let took = t0.elapsed();
    let mut degraded = false;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        degraded |= lb.metric("lb_cluster_degraded") != 0.0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("reset etcd connections: lease keep-alive and watch made again after {took:?}");
    assert!(
        resumed,
        "the session did not make its connections again within 5 s"
    );
    assert_eq!(
        info("joined the cluster"),
        joined,
        "a new session (a lost lease)"
    );
    assert_eq!(reconnects("cluster"), sessions_lost, "the session ended");
    assert!(reconnects("cluster_lease") >= 1.0 && reconnects("cluster_watch") >= 1.0);
    assert!(!degraded, "the replica reported itself degraded");
    assert_eq!(
        lb.json("/api/v1/services/greeter")["list_version"],
        list_version,
        "a new list for clients"
    );
    let warns = lb.log_lines("WARN");
    assert!(warns.is_empty(), "WARN lines: {warns:?}");
    drop((lb, greeters, etcd));
    drop(net);
}
