//! An etcd member cut off from its quorum while the LB's sessions are on it
//! (scenario 2 of the network faults): a minority member, cut from the two
//! others both ways, or a member cut from them one way only, whichever
//! way. The LB reaches etcd one member at a time and asks for a leader on
//! its streams (etcd's `require-leader`), so the member, once it has had
//! no leader for a few election timeouts, cancels them instead of serving
//! a view that no longer moves. What the LB promises:
//!
//! - its registry watch and its cluster session (lease, replica key,
//!   watch; the session keeps its lease when it can make its connections
//!   again before the lease runs out) move to a majority member within
//!   about 5 s (these tests allow
//!   8 s and print the figure), or the replica reports itself degraded
//!   (`lb_cluster_degraded`) while its session is away; once moved it is
//!   joined and not degraded, and its replica key lives on a lease of the
//!   majority;
//! - a registration made during the fault (through the majority) reaches
//!   clients within 10 s of its confirmation;
//! - keys changed and the history compacted during the fault, while the
//!   LB still watched the cut member, lead to a re-list on the majority
//!   member: the LB ends up knowing exactly etcd's keys, no silent gap;
//! - clients keep calling (≥ 99.9 % success) and no list, the LB's or the
//!   client's, ever goes without a backend that serves;
//! - after the heal (etcd 3.4 campaigns without pre-vote, so the member
//!   comes back with a higher term and the majority elects a leader again)
//!   the LB keeps every serving backend listed, knows exactly etcd's keys,
//!   and is joined and not degraded again within 8 s.
//!
//! Real kernel networking, as in `network_faults.rs`: each etcd member,
//! the LB, each backend and the client on a test host of its own behind
//! one router, the fault packets the router drops between members only
//! (the LB's link to the member it is on stays up).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::netns::{Fault, Host, Net};
use lb_tests::scenario::{
    assert_connected, channel_on, judge_calls, replica_args, replica_in, service, CHANNEL_ID,
};
use lb_tests::{greeters_in, wait_until, Caller, Etcd, Greeter, Lb};
use serde_json::Value;

/// Lease TTL of the replica and of the greeters' registrations.
const TTL: Duration = Duration::from_secs(3);
/// The replica's health-check interval.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The greeters' port on their hosts.
const PORT: u16 = 50051;
/// How soon the LB's sessions should be on a majority member.
const MOVE_PROMISED: Duration = Duration::from_secs(5);
/// How soon they must be, in these tests.
const MOVE_ALLOWED: Duration = Duration::from_secs(8);
/// How soon a registration made during the fault must reach clients.
const REACH_WITHIN: Duration = Duration::from_secs(10);
/// Where the greeters register (`<prefix><addr>`).
const PREFIX: &str = "/services/greeter/";
/// Junk keys written and deleted during the fault, so that revisions move.
const JUNK: usize = 20;

/// How member m1 is cut from m2 and m3 (its link to the LB stays up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberFault {
    /// Both ways: m1 alone is a minority.
    Minority,
    /// m1 receives nothing from m2 and m3 (what it sends still arrives).
    Deaf,
    /// m2 and m3 receive nothing from m1 (it still hears them).
    Mute,
}

impl MemberFault {
    fn strike(self, net: &Net, m1: &Host, others: [&Host; 2]) -> Vec<Fault> {
        others
            .iter()
            .map(|other| match self {
                MemberFault::Minority => net.cut(m1, other),
                MemberFault::Deaf => net.cut_one_way(other, m1),
                MemberFault::Mute => net.cut_one_way(m1, other),
            })
            .collect()
    }
}

/// The addresses of the backends a service detail shows: every one the
/// registry gave (`listed_only` false) or those the policy lists.
fn addrs(v: &Value, listed_only: bool) -> BTreeSet<String> {
    v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| !listed_only || b["decision"]["listed"] == true)
        .filter_map(|b| b["address"].as_str().map(str::to_string))
        .collect()
}

/// Whether `lb`'s cluster session is up (its view says connected).
fn joined(lb: &Lb) -> bool {
    lb.json("/api/v1/cluster")["view"]["connected"] == true
}

/// The established TCP connections from `host` to etcd's client port, by
/// member address, as the host's kernel lists them (`ss`): where the LB's
/// sessions are, seen from outside the LB.
fn etcd_peers(host: &Host) -> BTreeMap<Ipv4Addr, usize> {
    let out = Command::new("ip")
        .args(["netns", "exec", host.ns.name()])
        .args(["ss", "-Htn", "state", "established"])
        .args(["(", "dport", "=", ":2379", ")"])
        .output()
        .expect("run ss");
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut peers = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let peer = line
            .split_whitespace()
            .last()
            .and_then(|p| p.parse::<SocketAddr>().ok());
        if let Some(SocketAddr::V4(peer)) = peer {
            *peers.entry(*peer.ip()).or_insert(0) += 1;
        }
    }
    peers
}

/// The LB's INFO lines saying `what` so far.
fn info_lines(lb: &Lb, what: &str) -> Vec<String> {
    lb.log_lines("INFO")
        .into_iter()
        .filter(|l| l.contains(what))
        .collect()
}

/// The `revision=` field of a log line.
fn revision_of(line: &str) -> Option<i64> {
    let rest = line.split(" revision=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Runs `job` on a thread of its own inside `host`, on a runtime of its
/// own, so that it does not hold up the test's sampling.
fn spawn_in<T, F>(host: &Host, job: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let ns = host.ns.clone();
    std::thread::spawn(move || {
        ns.enter();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(job)
    })
}

/// Runs `$op` (a future of an etcd result) until it succeeds, each try
/// within 3 s, for at most 20 s (a majority without a leader elects one
/// within a couple of seconds).
macro_rules! retrying {
    ($what:expr, $op:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let error = match tokio::time::timeout(Duration::from_secs(3), $op).await {
                Ok(Ok(v)) => break v,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 3 s".to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "{} through a majority member: {error}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

/// The value a registration of `addr` holds (etcd's naming JSON).
fn naming_value(addr: SocketAddr) -> String {
    serde_json::json!({"Op": 0, "Addr": addr.to_string()}).to_string()
}

/// Writes `key = value` through the member at `endpoint`.
async fn put_key(endpoint: String, key: String, value: String) {
    let mut c = retrying!(
        "connect",
        etcd_client::Client::connect([endpoint.clone()], None)
    );
    retrying!("put", c.put(key.as_str(), value.as_str(), None));
}

/// The instances (`<addr>`) registered under [`PREFIX`], read through the
/// member at `endpoint` (retried: a member that just rejoined may call an
/// election, and a read during one fails).
async fn read_instances(endpoint: String) -> BTreeSet<String> {
    let mut c = retrying!(
        "connect",
        etcd_client::Client::connect([endpoint.clone()], None)
    );
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let answer = retrying!("list", c.get(PREFIX, Some(options.clone())));
    answer
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key()[PREFIX.len()..]).into_owned())
        .collect()
}

/// Through the member at `endpoint`: moves the revision on with junk keys
/// written and deleted, deletes `gone`, writes `new = value`, then
/// compacts the whole history at the revision reached (physically: the
/// answer comes once it is gone). Returns that revision.
async fn churn_and_compact(endpoint: String, gone: String, new: String, value: String) -> i64 {
    let mut c = retrying!(
        "connect",
        etcd_client::Client::connect([endpoint.clone()], None)
    );
    for i in 0..JUNK {
        retrying!("put junk", c.put(format!("/junk/{i}"), "x", None));
    }
    for i in 0..JUNK {
        retrying!("delete junk", c.delete(format!("/junk/{i}"), None));
    }
    retrying!("delete", c.delete(gone.as_str(), None));
    retrying!("put", c.put(new.as_str(), value.as_str(), None));
    let revision = retrying!("read the revision", c.get(new.as_str(), None))
        .header()
        .map_or(0, |h| h.revision());
    let physical = etcd_client::CompactionOptions::new().with_physical();
    retrying!("compact", async {
        match c.compact(revision, Some(physical.clone())).await {
            // A try that timed out may have compacted all the same.
            Err(e) if e.to_string().contains("compacted") => Ok(()),
            other => other.map(|_| ()),
        }
    });
    revision
}

/// What the test saw during the fault, by time since the fault began.
#[derive(Debug, Default)]
struct Seen {
    /// The LB's first new `etcd listed` line (a registry session listed
    /// again) and when it was seen.
    relisted: Option<(Duration, String)>,
    /// Its first new `joined the cluster` line.
    rejoined: Option<(Duration, String)>,
    /// When the LB host first held etcd connections none of which went to
    /// m1.
    off_m1: Option<Duration>,
    /// Each change of the LB host's etcd connections (member → count).
    peers: Vec<(Duration, BTreeMap<String, usize>)>,
    /// First and last sample with `lb_cluster_degraded` 1.
    degraded: Option<(Duration, Duration)>,
    /// First and last sample with the cluster view not connected.
    disconnected: Option<(Duration, Duration)>,
    /// Samples where `/readyz` did not answer 200.
    not_ready: usize,
    /// When the third greeter said REGISTERED.
    registered: Option<Duration>,
    /// When the LB first listed it.
    listed_by_lb: Option<Duration>,
    /// When the client first had it ready.
    ready_in_client: Option<Duration>,
    /// When the churn and the compaction were done, and the revision.
    compacted: Option<(Duration, i64)>,
    /// When the LB first knew exactly the expected keys after them.
    matched: Option<Duration>,
    /// Samples where a list went without a backend that serves.
    shrunk: Vec<(Duration, String)>,
    /// Smallest client list.
    min_client: usize,
    /// Samples taken.
    samples: usize,
}

/// Records `d` as the first or, after that, the last time of a window.
fn window(w: &mut Option<(Duration, Duration)>, d: Duration) {
    match w {
        Some((_, last)) => *last = d,
        None => *w = Some((d, d)),
    }
}

/// The scenario: 3 etcd members (m1, m2, m3) on hosts of their own; an LB
/// replica listing m1 first, so that its registry watch and its cluster
/// session start there; two greeters registering through m2 and m3; a
/// client host with an LbChannel calling steadily. m1 leads (or m2 does)
/// when `kind` strikes between m1 and the others for `hold`. During the
/// fault a third greeter registers, and, while the LB still watches m1,
/// the keys change (junk written and deleted, a never-serving key deleted,
/// another written) and the history is compacted through m2. Then the
/// fault heals and the LB must stay right.
async fn member_fault(kind: MemberFault, m1_leads: bool, hold: Duration) {
    let tag = format!("{kind:?}{}", if m1_leads { ", m1 leading" } else { "" });
    let net = Net::new();
    // m1 198.18.1.2, m2 .2.2, m3 .3.2, the LB .4.2, the greeters .5.2 to
    // .7.2, the client .8.2.
    let member_hosts: Vec<Host> = (0..3).map(|_| net.host()).collect();
    let lb_host = net.host();
    let backend_hosts: Vec<Host> = (0..3).map(|_| net.host()).collect();
    let client_host = net.host();
    let (m1_host, m2_host, m3_host) = (&member_hosts[0], &member_hosts[1], &member_hosts[2]);
    let member_name = |ip: Ipv4Addr| {
        member_hosts
            .iter()
            .position(|h| h.ip == ip)
            .map_or(ip.to_string(), |i| format!("m{}", i + 1))
    };

    let etcd = Etcd::start_cluster_in(&member_hosts.iter().collect::<Vec<_>>()).await;
    Etcd::lead(&etcd, if m1_leads { 0 } else { 1 }).await;
    let m2 = &etcd[1];
    // The LB knows every member, m1 first; the greeters only the majority.
    let lb_registry = Etcd::cluster_url(&etcd);
    let greeter_registry = format!("etcd://{},{}", etcd[1].endpoint(), etcd[2].endpoint());
    let ttl = format!("{}s", TTL.as_secs());
    let greeters = greeters_in(
        &backend_hosts[..2],
        PORT,
        &greeter_registry,
        &["--ttl", &ttl],
    )
    .await;
    let serving: BTreeSet<String> = greeters.iter().map(|g| g.addr.to_string()).collect();
    // Keys of addresses where nothing serves (a closed port on the client
    // host): the LB knows them and never lists them, so deleting one takes
    // it out at once (no grace period, which a serving backend gets).
    let (old_dummy, new_dummy) = (client_host.addr(59998), client_host.addr(59999));
    let key = |a: SocketAddr| format!("{PREFIX}{a}");
    let put = spawn_in(
        m2_host,
        put_key(m2.endpoint(), key(old_dummy), naming_value(old_dummy)),
    );
    tokio::task::block_in_place(|| put.join()).expect("put the first dummy key");

    let lb_args = replica_args(&lb_registry, "lb1", TTL, PROBE_INTERVAL, &[]);
    let lb = replica_in(&lb_host, &lb_args, &[]).await;
    let mut known_before = serving.clone();
    known_before.insert(old_dummy.to_string());
    assert!(
        wait_until(Duration::from_secs(15), || {
            let v = service(&lb);
            joined(&lb) && addrs(&v, true) == serving && addrs(&v, false) == known_before
        })
        .await,
        "{tag}: the LB never joined and listed the two greeters (knowing the dummy key): {} / {}",
        lb.get("/api/v1/cluster").1,
        service(&lb)
    );
    // Its sessions started on m1: every etcd connection of its host goes
    // there (the admin API does not say which member a session is on).
    let peers = etcd_peers(&lb_host);
    assert!(
        !peers.is_empty() && peers.keys().all(|ip| *ip == m1_host.ip),
        "{tag}: the LB's etcd connections before the fault are not all on m1: {peers:?}"
    );

    // The client, on its own host, calling through the LB.
    let rt = client_host.ns.runtime();
    let channel = channel_on(&rt, &[lb.addr], Some(CHANNEL_ID));
    assert_connected(
        &channel,
        2,
        Duration::from_secs(10),
        &format!("{tag}: the client never connected to both greeters"),
    )
    .await;
    let caller = Caller::start_on(&rt, &channel, 1, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed_lines = info_lines(&lb, "etcd listed").len();
    let joined_lines = info_lines(&lb, "joined the cluster").len();
    let resumed_lines = info_lines(&lb, "lease keep-alive resumed").len();
    let reconnects =
        |kind: &str| lb.metric(&format!("lb_upstream_reconnects_total{{kind=\"{kind}\"}}"));
    // A session that ends counts under "cluster"; one that keeps its lease
    // and makes its connections again, under "cluster_lease" and
    // "cluster_watch".
    let cluster_reconnects =
        || reconnects("cluster") + reconnects("cluster_lease") + reconnects("cluster_watch");
    let (registry_before, cluster_before) = (reconnects("etcd"), cluster_reconnects());
    let mut statuses = Vec::new();
    for m in &etcd {
        statuses.push(m.status().await);
    }
    let leader = statuses
        .iter()
        .position(|(id, leader)| id == leader)
        .map_or("none".to_string(), |i| format!("m{}", i + 1));
    eprintln!("{tag}: before the fault the LB is on m1 ({peers:?}); the etcd leader is {leader}");
    assert_eq!(
        leader,
        if m1_leads { "m1" } else { "m2" },
        "{tag}: the leader moved before the fault"
    );

    // The fault. At once, through m2, while the LB still watches m1: the
    // churn and the compaction (on a thread of their own), and a third
    // greeter registering through the majority.
    let t0 = Instant::now();
    let faults = kind.strike(&net, m1_host, [m2_host, m3_host]);
    let mut churn = Some(spawn_in(
        m2_host,
        churn_and_compact(
            m2.endpoint(),
            key(old_dummy),
            key(new_dummy),
            naming_value(new_dummy),
        ),
    ));
    let g3 = Greeter::start_in(&backend_hosts[2], PORT, &greeter_registry, &["--ttl", &ttl]).await;
    let g3_addr = g3.addr.to_string();
    let mut all_serving = serving.clone();
    all_serving.insert(g3_addr.clone());
    let mut expected = all_serving.clone();
    expected.insert(new_dummy.to_string());

    // Every 100 ms: the LB's log, connections, gauges and lists, the
    // client's list, the third greeter.
    let mut seen = Seen {
        min_client: usize::MAX,
        ..Seen::default()
    };
    let mut last_peers = None;
    while t0.elapsed() < hold {
        let at = t0.elapsed();
        seen.samples += 1;
        if seen.relisted.is_none() {
            seen.relisted = info_lines(&lb, "etcd listed")
                .get(listed_lines)
                .map(|l| (at, l.clone()));
        }
        let peers: BTreeMap<String, usize> = etcd_peers(&lb_host)
            .into_iter()
            .map(|(ip, n)| (member_name(ip), n))
            .collect();
        // The session moves by joining again (a new lease), or by keeping
        // its lease on a new connection and making its watch again there.
        if seen.rejoined.is_none() {
            let off_m1 = !peers.is_empty() && !peers.contains_key("m1");
            seen.rejoined = info_lines(&lb, "joined the cluster")
                .get(joined_lines)
                .cloned()
                .or_else(|| {
                    info_lines(&lb, "lease keep-alive resumed")
                        .get(resumed_lines)
                        .filter(|_| off_m1)
                        .cloned()
                })
                .map(|l| (at, l));
        }
        if seen.off_m1.is_none() && !peers.is_empty() && !peers.contains_key("m1") {
            seen.off_m1 = Some(at);
        }
        if last_peers.as_ref() != Some(&peers) {
            seen.peers.push((at, peers.clone()));
            last_peers = Some(peers);
        }
        if lb.metric("lb_cluster_degraded ") == 1.0 {
            window(&mut seen.degraded, at);
        }
        if !joined(&lb) {
            window(&mut seen.disconnected, at);
        }
        if lb.get("/readyz").0 != 200 {
            seen.not_ready += 1;
        }
        if seen.registered.is_none() && g3.is_registered() {
            seen.registered = Some(at);
        }
        if seen.compacted.is_none() && churn.as_ref().is_some_and(|c| c.is_finished()) {
            let revision = churn.take().unwrap().join().expect("churn and compaction");
            seen.compacted = Some((at, revision));
        }
        let v = service(&lb);
        let (listed, known) = (addrs(&v, true), addrs(&v, false));
        if seen.listed_by_lb.is_none() && listed.contains(&g3_addr) {
            seen.listed_by_lb = Some(at);
        }
        // Every greeter the LB listed serves all along: none may leave.
        let mut must_list = serving.clone();
        if seen.listed_by_lb.is_some() {
            must_list.insert(g3_addr.clone());
        }
        if !must_list.is_subset(&listed) {
            seen.shrunk
                .push((at, format!("LB lists {listed:?} of {must_list:?}")));
        }
        let client_ready = channel.ready_backends();
        if seen.ready_in_client.is_none() && client_ready.contains(&g3.addr) {
            seen.ready_in_client = Some(at);
        }
        let client_listed: BTreeSet<String> = channel
            .listed_backends()
            .iter()
            .map(SocketAddr::to_string)
            .collect();
        seen.min_client = seen.min_client.min(client_listed.len());
        if !serving.is_subset(&client_listed) {
            seen.shrunk
                .push((at, format!("the client lists {client_listed:?}")));
        }
        if seen.matched.is_none()
            && seen.compacted.is_some()
            && seen.registered.is_some()
            && known == expected
        {
            seen.matched = Some(at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The end of the fault: etcd's keys (asked of the majority) and the
    // LB's.
    let read = spawn_in(m2_host, read_instances(m2.endpoint()));
    let truth = tokio::task::block_in_place(|| read.join()).expect("read the majority's keys");
    let replica_keys = m2.keys("/lb-cluster/replicas/").await;
    let end = service(&lb);
    let end_peers = etcd_peers(&lb_host);
    let end_degraded = lb.metric("lb_cluster_degraded ");
    let end_joined = joined(&lb);
    let (registry_moves, cluster_moves) = (
        reconnects("etcd") - registry_before,
        cluster_reconnects() - cluster_before,
    );
    let calls = caller.snapshot();
    eprintln!(
        "{tag}: registry re-listed after {:?}; cluster session rejoined after {:?}; no etcd \
         connection to m1 after {:?}; reconnects: registry {registry_moves}, cluster \
         {cluster_moves}",
        seen.relisted, seen.rejoined, seen.off_m1
    );
    eprintln!(
        "{tag}: the LB host's etcd connections over time: {:?}",
        seen.peers
    );
    eprintln!(
        "{tag}: degraded (first, last sample) {:?}, cluster view disconnected {:?}, /readyz not \
         200 in {} of {} samples; at the end degraded {end_degraded}, joined {end_joined}, \
         replica keys in the majority {replica_keys:?}",
        seen.degraded, seen.disconnected, seen.not_ready, seen.samples
    );
    let reach = seen
        .registered
        .zip(seen.ready_in_client)
        .map(|(r, c)| c.saturating_sub(r));
    eprintln!(
        "{tag}: third greeter REGISTERED after {:?}, listed by the LB after {:?}, ready in the \
         client after {:?} (reach {reach:?}); churn and compaction done after {:?}; the LB \
         knew exactly etcd's keys after {:?}",
        seen.registered, seen.listed_by_lb, seen.ready_in_client, seen.compacted, seen.matched
    );
    eprintln!(
        "{tag}: smallest client list {}; {} short samples {:?}; calls so far {} ok, {} failed",
        seen.min_client,
        seen.shrunk.len(),
        seen.shrunk.first(),
        calls.ok(),
        calls.failures.len()
    );

    // The sessions moved to the majority.
    let lines_after = lb.log_lines("WARN");
    let (relisted_after, relisted_line) = seen.relisted.clone().unwrap_or_else(|| {
        panic!(
            "{tag}: the registry watch never listed again during {hold:?}; connections {:?}; \
             WARN lines {lines_after:?}",
            seen.peers
        )
    });
    let (rejoined_after, _) = seen.rejoined.clone().unwrap_or_else(|| {
        panic!(
            "{tag}: the cluster session never joined again during {hold:?}; degraded {:?}; \
             connections {:?}; WARN lines {lines_after:?}",
            seen.degraded, seen.peers
        )
    });
    for (what, after) in [
        ("registry watch", relisted_after),
        ("cluster session", rejoined_after),
    ] {
        if after > MOVE_PROMISED {
            eprintln!("{tag}: the {what} moved after {after:?}, later than {MOVE_PROMISED:?}");
        }
        assert!(
            after <= MOVE_ALLOWED,
            "{tag}: the {what} moved to a majority member after {after:?} (want ≤ \
             {MOVE_ALLOWED:?}, promised ~{MOVE_PROMISED:?}); connections {:?}",
            seen.peers
        );
    }
    assert!(
        !end_peers.is_empty() && !end_peers.contains_key(&m1_host.ip),
        "{tag}: at the end of the fault the LB's etcd connections are {end_peers:?} (want none \
         to m1 {})",
        m1_host.ip
    );
    assert!(
        registry_moves >= 1.0 && cluster_moves >= 1.0,
        "{tag}: lb_upstream_reconnects_total rose by {registry_moves} (etcd) and {cluster_moves} \
         (cluster)"
    );
    assert!(
        end_joined && end_degraded == 0.0,
        "{tag}: after the move the replica is joined {end_joined}, degraded {end_degraded}: {}",
        lb.get("/api/v1/cluster").1
    );
    assert_eq!(
        replica_keys,
        vec!["/lb-cluster/replicas/lb1".to_string()],
        "{tag}: the replica's key is not on a lease of the majority"
    );
    assert_eq!(seen.not_ready, 0, "{tag}: /readyz did not stay 200");

    // The registration made during the fault reached the client in time.
    let registered = seen
        .registered
        .expect("the third greeter never registered through the majority");
    let reach = reach.unwrap_or_else(|| {
        panic!(
            "{tag}: the third greeter, REGISTERED after {registered:?}, never became ready in \
             the client (the LB listed it after {:?})",
            seen.listed_by_lb
        )
    });
    assert!(
        reach <= REACH_WITHIN,
        "{tag}: the third greeter reached the client {reach:?} after its REGISTERED line (want \
         ≤ {REACH_WITHIN:?})"
    );

    // The changes and the compaction: a re-list, no gap.
    let (compacted_after, revision) = seen.compacted.expect("the churn never finished");
    assert_eq!(
        truth, expected,
        "{tag}: etcd's keys are not what the test wrote"
    );
    assert_eq!(
        addrs(&end, false),
        truth,
        "{tag}: the LB's catalog differs from etcd's keys at the end of the fault (a silent gap)"
    );
    let matched = seen.matched.expect("matched, as just asserted");
    let since = matched.saturating_sub(compacted_after.max(registered));
    assert!(
        since <= REACH_WITHIN,
        "{tag}: the LB knew etcd's keys {since:?} after the changes (want ≤ {REACH_WITHIN:?})"
    );
    if compacted_after < relisted_after {
        // The compaction came while the LB still watched m1: only a listing
        // at or after it could have told the LB of the changes.
        let listed_at = revision_of(&relisted_line);
        eprintln!(
            "{tag}: compacted at revision {revision} before the re-list, which read revision \
             {listed_at:?}"
        );
        assert!(
            listed_at.is_some_and(|r| r >= revision),
            "{tag}: the re-list read revision {listed_at:?}, before the compaction at {revision}: \
             {relisted_line}"
        );
    } else {
        eprintln!(
            "{tag}: the compaction (revision {revision}) came after the re-list: the majority \
             member's watch carried the changes"
        );
    }
    assert!(
        seen.shrunk.is_empty(),
        "{tag}: a list went without a serving backend: {:?}",
        seen.shrunk
    );

    // Heal. etcd 3.4 campaigns without pre-vote, so m1 comes back with a
    // term far ahead and the majority elects a leader again: the LB rides
    // that out. For 8 s: its lists, its cluster session, its gauges.
    let t1 = Instant::now();
    drop(faults);
    let heal_for = Duration::from_secs(8);
    let (mut heal_shrunk, mut heal_degraded, mut heal_disconnected) = (Vec::new(), None, None);
    while t1.elapsed() < heal_for {
        let at = t1.elapsed();
        let listed = addrs(&service(&lb), true);
        if !all_serving.is_subset(&listed) {
            heal_shrunk.push((at, listed));
        }
        if lb.metric("lb_cluster_degraded ") == 1.0 {
            window(&mut heal_degraded, at);
        }
        if !joined(&lb) {
            window(&mut heal_disconnected, at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_heal = service(&lb);
    let read = spawn_in(m1_host, read_instances(etcd[0].endpoint()));
    let m1_keys = tokio::task::block_in_place(|| read.join()).expect("read m1's keys");
    eprintln!(
        "{tag}: after the heal: degraded {heal_degraded:?}, disconnected {heal_disconnected:?}, \
         {} short samples; reconnects since the fault: registry {}, cluster {}; the LB knows \
         {:?}, m1 has {m1_keys:?}; connections {:?}",
        heal_shrunk.len(),
        reconnects("etcd") - registry_before,
        reconnects("cluster") - cluster_before,
        addrs(&after_heal, false),
        etcd_peers(&lb_host)
    );
    assert_eq!(
        addrs(&after_heal, false),
        truth,
        "{tag}: after the heal the LB's catalog differs from etcd's keys"
    );
    assert_eq!(m1_keys, truth, "{tag}: m1 did not catch up after the heal");
    assert!(
        heal_shrunk.is_empty(),
        "{tag}: after the heal a serving backend left the LB's list: {heal_shrunk:?}"
    );
    assert!(
        joined(&lb) && lb.metric("lb_cluster_degraded ") == 0.0,
        "{tag}: {heal_for:?} after the heal the replica is not joined, or degraded: {}",
        lb.get("/api/v1/cluster").1
    );

    let calls = caller.stop().await;
    judge_calls(&calls, hold.as_secs_f64() * 25.0, &tag);
    drop((channel, rt, lb, g3, greeters, etcd));
    drop(net);
}

/// m1, a follower, is cut from m2 and m3 both ways for 25 s: a minority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_member_hands_the_lbs_sessions_to_the_majority() {
    member_fault(MemberFault::Minority, false, Duration::from_secs(25)).await;
}

/// m1 leads when it is cut from m2 and m3 both ways, for 25 s: it steps
/// down and the majority elects another leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_into_a_minority_hands_the_lbs_sessions_to_the_majority() {
    member_fault(MemberFault::Minority, true, Duration::from_secs(25)).await;
}

/// m1, a follower, receives nothing from m2 and m3 for 20 s (what it sends
/// still arrives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_hears_nothing_hands_the_lbs_sessions_to_the_majority() {
    member_fault(MemberFault::Deaf, false, Duration::from_secs(20)).await;
}

/// m2 and m3 receive nothing from m1, a follower, for 20 s (it still hears
/// them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_nobody_hears_hands_the_lbs_sessions_to_the_majority() {
    member_fault(MemberFault::Mute, false, Duration::from_secs(20)).await;
}
