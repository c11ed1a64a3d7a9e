//! One replica's view never judges alone: replicas in a cluster over etcd
//! split the health checks (each backend has one owner replica), and a
//! probe that gets no answer at all (`silent`: connect timeout, no route,
//! heartbeat unanswered) may be only that replica's path that broke, an
//! asymmetric partition. So when the owner finds a backend silent, the
//! other replicas probe it as witnesses; it leaves the lists only when a
//! witness agrees (silent or unreachable there too), or, on one view alone,
//! within `--max-unconfirmed-removal` (default 20 %) of the service.
//! Otherwise it is held listed, with an alert (`lb_backends_held`, a WARN
//! line). Real kernel networking, as in `network_faults.rs`: each process
//! on a host of its own behind one router, the fault packets the router
//! drops.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::netns::{Fault, Host, Net};
use lb_tests::scenario::{
    assert_connected, brief, channel_on, client_listed, is_listed, judge_calls, listed,
    replica_args, replica_in, row, service, wait_formed, StockClients, CHANNEL_ID,
};
use lb_tests::{greeters_in, wait_until, Caller, Etcd};
use serde_json::Value;

/// Lease TTL of the replicas (and of the greeters' registrations).
const REPLICA_TTL: Duration = Duration::from_secs(3);
/// The replicas' health-check interval.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Their limit for a connect and for each health answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The default `--max-unconfirmed-removal`.
const UNCONFIRMED_CAP: f64 = 0.2;
/// The greeters' port on their hosts.
const PORT: u16 = 50051;
/// The alert: backends one view alone would remove, held listed.
const HELD: &str = "lb_backends_held{service=\"greeter\"}";

/// Successful calls to `backend` the caller made in `[from, to)`.
fn calls_between(
    calls: &lb_tests::Calls,
    backend: SocketAddr,
    from: Instant,
    to: Instant,
) -> usize {
    calls
        .times
        .get(&backend.to_string())
        .map_or(0, |t| t.iter().filter(|t| **t >= from && **t < to).count())
}

/// Two replicas, six backends, a client host with clients of replica lb1.
/// lb1 alone loses its path to the backends it health-checks (a cut both
/// ways between lb1's host and theirs, 20 s); its clients still reach
/// them. lb1 reports them `silent` (never `unreachable`: nothing
/// answered), lb2 witnesses them serving within 5 s (lb1's JSON shows
/// `opinions: {"lb2": "serving"}`), and they stay listed on both replicas:
/// at most max(1, 20 % of 6) = 1 leaves briefly before the witnesses
/// answer, none after 5 s, and every one of them ends `held:` with
/// `lb_backends_held` ≥ 1 and a WARN line. The LbChannel keeps ≥ 99.9 %
/// success and every backend ≥ 90 % of its fair share of its calls; the
/// stock grpc-go grpclb and grpcio xDS clients of lb1 ≥ 99.9 %. Then lb2
/// loses one of them too: both views agree, and it leaves the lists of
/// both replicas within 5 s (a confirmed removal) while the others stay.
/// After the heal, within 2 × TTL, both replicas list all six and hold
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asymmetric_view_never_removes_what_clients_can_reach() {
    let net = Net::new();
    // Hosts are numbered in the order they are made, so every run has the
    // same addresses: etcd 198.18.1.2, lb1 198.18.2.2, lb2 198.18.3.2, the
    // backends 198.18.4.2 to 198.18.9.2, the client 198.18.10.2. With the
    // replica ids lb1 and lb2, rendezvous hashing of `greeter|<addr>` gives
    // lb1 three of the six (198.18.4.2, 198.18.7.2 and 198.18.9.2): the
    // split is read from the admin API below all the same.
    let etcd_host = net.host();
    let (lb1_host, lb2_host) = (net.host(), net.host());
    let backend_hosts: Vec<Host> = (0..6).map(|_| net.host()).collect();
    let client_host = net.host();
    let n = backend_hosts.len();
    let backends: Vec<SocketAddr> = backend_hosts.iter().map(|h| h.addr(PORT)).collect();

    let etcd = Etcd::start_in(&etcd_host).await;
    let registry = etcd.registry_url();
    let ttl = format!("{}s", REPLICA_TTL.as_secs());
    let greeters = greeters_in(&backend_hosts, PORT, &registry, &["--ttl", &ttl]).await;
    let timeout = format!("{}ms", PROBE_TIMEOUT.as_millis());
    let lb_args = |id| {
        replica_args(
            &registry,
            id,
            REPLICA_TTL,
            PROBE_INTERVAL,
            &["--health-timeout", &timeout],
        )
    };
    let lb1 = replica_in(&lb1_host, &lb_args("lb1"), &[]).await;
    let lb2 = replica_in(&lb2_host, &lb_args("lb2"), &[]).await;
    wait_formed(&[&lb1, &lb2], n, Duration::from_secs(15)).await;

    // The backends lb1 checks: lb1 is cut from these.
    let before = service(&lb1);
    let owned: Vec<SocketAddr> = backends
        .iter()
        .copied()
        .filter(|a| row(&before, *a).is_some_and(|b| b["checked_by"] == "lb1"))
        .collect();
    eprintln!(
        "partial views: lb1 checks {} of {n}: {owned:?}",
        owned.len()
    );
    assert!(
        !owned.is_empty(),
        "lb1 checks none of the backends, nothing to cut: {}",
        brief(&before)
    );
    let owned_hosts: Vec<&Host> = backend_hosts
        .iter()
        .filter(|h| owned.contains(&h.addr(PORT)))
        .collect();

    // The clients, on their own host, know lb1 only: an LbChannel calling
    // steadily (each reply names the backend that answered), and stock
    // grpc-go grpclb and grpcio xDS clients, for the whole run.
    let rt = client_host.ns.runtime();
    let channel = channel_on(&rt, &[lb1.addr], Some(CHANNEL_ID));
    assert_connected(
        &channel,
        n,
        Duration::from_secs(10),
        "the client never connected to every backend",
    )
    .await;
    let caller = Caller::start_on(&rt, &channel, 1, Duration::from_millis(20));
    let stock_for = Duration::from_secs(50);
    let every = Duration::from_millis(50);
    let stock = StockClients::start_in(&client_host, lb1.addr, stock_for, every);
    stock.wait_reached(&lb1, &client_host, "lb1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warns_before = lb1.log_lines("WARN").len();

    // Phase 1: lb1 and the backends it checks, both ways, for 20 s. Every
    // 100 ms: both replicas' lists, lb1's view of the cut backends and the
    // witnesses' opinions, the alert, the client's list.
    let hold = Duration::from_secs(20);
    let settle = Duration::from_secs(5);
    let may_drop = ((n as f64 * UNCONFIRMED_CAP).floor() as usize).max(1);
    let t0 = Instant::now();
    let cuts: Vec<Fault> = owned_hosts.iter().map(|h| net.cut(&lb1_host, h)).collect();
    let mut silent_after: BTreeMap<SocketAddr, Duration> = BTreeMap::new();
    let mut witnessed_after: BTreeMap<SocketAddr, Duration> = BTreeMap::new();
    let mut healths_seen: BTreeMap<SocketAddr, BTreeSet<String>> = BTreeMap::new();
    let (mut early_min1, mut early_min2) = (n, n);
    let (mut settled_min1, mut settled_min2, mut settled_min_client) = (n, n, n);
    let mut first_short: Option<(Duration, String)> = None;
    let mut max_held = 0.0f64;
    let mut settled_samples = 0;
    while t0.elapsed() < hold {
        let at = t0.elapsed();
        let (v1, v2) = (service(&lb1), service(&lb2));
        let (l1, l2) = (listed(&v1), listed(&v2));
        if at < settle {
            early_min1 = early_min1.min(l1);
            early_min2 = early_min2.min(l2);
        } else {
            settled_samples += 1;
            settled_min1 = settled_min1.min(l1);
            settled_min2 = settled_min2.min(l2);
            settled_min_client = settled_min_client.min(client_listed(&channel));
            if (l1 < n || l2 < n) && first_short.is_none() {
                first_short = Some((at, format!("lb1 {} / lb2 {}", brief(&v1), brief(&v2))));
            }
        }
        for &a in &owned {
            let Some(b) = row(&v1, a) else { continue };
            let health = b["health"].as_str().unwrap_or("?").to_string();
            if health == "silent" {
                silent_after.entry(a).or_insert(at);
            }
            if b["opinions"]["lb2"] == "serving" {
                witnessed_after.entry(a).or_insert(at);
            }
            healths_seen.entry(a).or_default().insert(health);
        }
        max_held = max_held.max(lb1.metric(HELD));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t_end1 = Instant::now();
    let end1 = service(&lb1);
    let held_now = lb1.metric(HELD);
    eprintln!(
        "partial views: silent on lb1 after {silent_after:?}; lb2 witnessed serving after \
         {witnessed_after:?}; healths lb1 showed for the cut backends: {healths_seen:?}"
    );
    eprintln!(
        "partial views: smallest lists in the first {settle:?}: lb1 {early_min1}, lb2 {early_min2} \
         (at most {may_drop} may drop); after: lb1 {settled_min1}, lb2 {settled_min2}, client \
         {settled_min_client} over {settled_samples} samples; most held {max_held}, held at the \
         end {held_now}"
    );
    eprintln!("partial views: lb1 at the end of phase 1: {}", brief(&end1));

    for &a in &owned {
        let seen = healths_seen.get(&a).cloned().unwrap_or_default();
        let after = silent_after.get(&a).copied();
        assert!(
            after.is_some_and(|d| d <= settle),
            "lb1 reported {a} silent after {after:?} (want ≤ {settle:?}); it showed {seen:?}"
        );
        assert!(
            !seen.contains("unreachable") && !seen.contains("not_serving"),
            "nothing answered lb1's probes of {a}, yet it showed {seen:?} (want silent, not \
             unreachable or not_serving)"
        );
        let witnessed = witnessed_after.get(&a).copied();
        assert!(
            witnessed.is_some_and(|d| d <= settle),
            "lb1's JSON showed lb2's witness finding {a} serving after {witnessed:?} (want ≤ \
             {settle:?}): {}",
            brief(&end1)
        );
    }
    assert!(
        early_min1 + may_drop >= n && early_min2 + may_drop >= n,
        "one view alone took out more than {may_drop} backend(s) before the witnesses answered: \
         smallest lists lb1 {early_min1}, lb2 {early_min2} of {n}"
    );
    assert!(
        settled_min1 == n && settled_min2 == n,
        "a backend every client can reach left a replica's list after {settle:?}: smallest lb1 \
         {settled_min1}, lb2 {settled_min2} of {n}; first short sample: {first_short:?}"
    );
    assert_eq!(
        settled_min_client, n,
        "the client's list shrank after {settle:?}; first short sample: {first_short:?}"
    );
    assert!(
        max_held >= 1.0,
        "{HELD} never reached 1 during the cut (most {max_held})"
    );
    for &a in &owned {
        let b = row(&end1, a).cloned().unwrap_or_default();
        assert!(
            b["decision"]["listed"] == true
                && b["decision"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("held:")),
            "{a}, silent on lb1 and serving on lb2's witness, is not held listed: {b}"
        );
    }
    let held_rows = end1["backends"].as_array().map_or(0, |bs| {
        bs.iter()
            .filter(|b| {
                b["decision"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("held:"))
            })
            .count()
    });
    assert_eq!(
        held_now,
        held_rows as f64,
        "{HELD} does not count the held backends lb1 shows: {}",
        brief(&end1)
    );
    let new_warns = lb1.log_lines("WARN")[warns_before..].to_vec();
    assert!(
        new_warns.iter().any(|l| l.contains("held")),
        "no WARN line of lb1 says it held backends: {new_warns:?}"
    );

    // Every backend kept its fair share of the LbChannel's calls once the
    // witnesses had answered (the first seconds may see one backend out
    // briefly, within the cap).
    let calls = caller.snapshot();
    let from = t0 + settle;
    let share: Vec<(SocketAddr, usize)> = backends
        .iter()
        .map(|a| (*a, calls_between(&calls, *a, from, t_end1)))
        .collect();
    let whole: Vec<(SocketAddr, usize)> = backends
        .iter()
        .map(|a| (*a, calls_between(&calls, *a, t0, t_end1)))
        .collect();
    let total: usize = share.iter().map(|(_, c)| c).sum();
    let fair = total as f64 / n as f64;
    eprintln!(
        "partial views: LbChannel calls per backend from {settle:?} into the cut to its end: \
         {share:?} (fair share {fair:.1}); over the whole cut: {whole:?}"
    );
    assert!(
        total as f64 >= (hold - settle).as_secs_f64() * 20.0,
        "too few calls to judge the shares: {total}"
    );
    for (a, c) in &share {
        assert!(
            *c as f64 >= 0.9 * fair,
            "{a} got {c} of {total} calls during the cut (fair share {fair:.1}, want ≥ 90 %): \
             {share:?}"
        );
    }

    // Phase 2: lb2 loses one of them too. Both views agree: it leaves
    // both replicas' lists within 5 s and stays out; the others stay.
    let victim = owned[0];
    let victim_host = owned_hosts[0];
    let t2 = Instant::now();
    let cut2 = net.cut(&lb2_host, victim_host);
    let mut removed_after: Option<Duration> = None;
    let mut opinion_at_removal = Value::Null;
    let mut relisted: Option<(Duration, String)> = None;
    let mut others_dropped: Option<(Duration, String)> = None;
    let confirm_within = Duration::from_secs(5);
    let stay_out = Duration::from_secs(3);
    while t2.elapsed() < confirm_within + stay_out {
        let at = t2.elapsed();
        let (v1, v2) = (service(&lb1), service(&lb2));
        let gone = !is_listed(&v1, victim) && !is_listed(&v2, victim);
        match removed_after {
            None if gone => {
                removed_after = Some(at);
                opinion_at_removal = row(&v1, victim)
                    .map(|b| b["opinions"]["lb2"].clone())
                    .unwrap_or_default();
            }
            Some(_) if !gone && relisted.is_none() => {
                relisted = Some((at, format!("lb1 {} / lb2 {}", brief(&v1), brief(&v2))));
            }
            _ => {}
        }
        let others = backends
            .iter()
            .filter(|a| **a != victim)
            .all(|a| is_listed(&v1, *a) && is_listed(&v2, *a));
        if !others && others_dropped.is_none() {
            others_dropped = Some((at, format!("lb1 {} / lb2 {}", brief(&v1), brief(&v2))));
        }
        if removed_after.is_some_and(|r| at >= r + stay_out) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end2 = (service(&lb1), service(&lb2));
    eprintln!(
        "partial views: with lb2 cut from {victim} too, it left both lists after \
         {removed_after:?} (lb2's opinion then: {opinion_at_removal}); held on lb1 now {}",
        lb1.metric(HELD)
    );
    let removed_after = removed_after.unwrap_or_else(|| {
        panic!(
            "{victim}, silent on both replicas, never left both lists in {:?}: lb1 {} / lb2 {}",
            confirm_within + stay_out,
            brief(&end2.0),
            brief(&end2.1)
        )
    });
    assert!(
        removed_after <= confirm_within,
        "the confirmed removal of {victim} took {removed_after:?} (want ≤ {confirm_within:?})"
    );
    assert!(
        opinion_at_removal == "silent" || opinion_at_removal == "unreachable",
        "{victim} left the lists, but lb1's JSON showed lb2's opinion {opinion_at_removal} \
         (want silent or unreachable)"
    );
    assert!(
        relisted.is_none(),
        "{victim} came back while both views found it silent: {relisted:?}"
    );
    assert!(
        others_dropped.is_none(),
        "a backend lb2 still reaches left a list with the confirmed one: {others_dropped:?}"
    );

    // Heal: within 2 × TTL both replicas list every backend and hold none.
    let t3 = Instant::now();
    drop(cut2);
    drop(cuts);
    let healed = wait_until(2 * REPLICA_TTL, || {
        listed(&service(&lb1)) == n
            && listed(&service(&lb2)) == n
            && lb1.metric(HELD) == 0.0
            && lb2.metric(HELD) == 0.0
    })
    .await;
    let healed_after = t3.elapsed();
    eprintln!("partial views: after the heal, whole and nothing held after {healed_after:?}");
    assert!(
        healed,
        "{healed_after:?} after the heal: lb1 {} (held {}) / lb2 {} (held {})",
        brief(&service(&lb1)),
        lb1.metric(HELD),
        brief(&service(&lb2)),
        lb2.metric(HELD)
    );

    let calls = caller.stop().await;
    judge_calls(&calls, hold.as_secs_f64() * 20.0, "partial views");
    stock
        .finish(
            Duration::from_secs(60),
            hold.as_secs_f64() * 10.0,
            "partial views",
        )
        .await;
    drop((channel, rt, lb1, lb2, greeters, etcd));
    drop(net);
}
