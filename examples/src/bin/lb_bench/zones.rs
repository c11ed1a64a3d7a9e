//! Skewed demand over three zones: cross-zone traffic, backend load and
//! client latency for four ways of choosing lists, side by side.
//!
//! Three zones of three backends each; two clients per zone, so every zone
//! has the same number of clients, but the clients of zone a call six times
//! as much as those of zone c (60/30/10 % of the calls). Contenders, each an
//! in-process LB over the same backends, measured in alternating rounds:
//!
//! - **plain round robin**: zone lists off; every client gets every backend;
//! - **strict same-zone**: every call kept in its zone (a tolerance so large
//!   that no zone is ever full), what topology hints do;
//! - **Envoy-style host counts**: the local share is the zone's share of
//!   backends over its share of *clients*, the rest spread over zones with
//!   more backends than clients (Envoy's zone-aware routing). That is the
//!   LB's plan fed client counts instead of call rates (client stats off)
//!   with no tolerance, which is the same arithmetic;
//! - **the LB's plan**: demand from client stats, 10 % tolerance.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_client::RegistrationOptions;
use lb_examples::greeter::{backend_of, GreeterOptions};
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_server::{Config, LbServer};
use serde_json::json;

use crate::measure::{median, pct};
use crate::procs::greeter_registered;

const ZONES: [&str; 3] = ["a", "b", "c"];
/// Callers per client of each zone: 6/3/1 → 60/30/10 % of the calls.
const WORKERS: [usize; 3] = [6, 3, 1];
const CLIENTS_PER_ZONE: usize = 2;
const BACKENDS_PER_ZONE: usize = 3;
/// Pause between a caller's calls (closed loop).
const PAUSE: Duration = Duration::from_millis(20);

struct Contender {
    name: &'static str,
    lb: LbServer,
    channels: Vec<(usize, LbChannel)>,
}

/// One round's calls: (client zone, backend, latency µs).
type Calls = Vec<(usize, String, u64)>;

pub async fn zones(
    round: Duration,
    rounds: usize,
    warmup: Duration,
) -> anyhow::Result<serde_json::Value> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let base = {
        let mut c = Config::with_addrs(any, any);
        c.grpc.client_stats_interval = Duration::from_secs(1);
        c.probes.health_check_interval = Duration::from_millis(500);
        c
    };
    let mut configs: Vec<(&'static str, Config)> = Vec::new();
    let mut rr = base.clone();
    rr.zones.zone_aware = false;
    configs.push(("plain round robin", rr));
    let mut strict = base.clone();
    strict.zones.zone_overload_tolerance = 10.0;
    configs.push(("strict same-zone", strict));
    let mut envoy = base.clone();
    envoy.grpc.client_stats_interval = Duration::ZERO;
    envoy.zones.zone_overload_tolerance = 0.0;
    configs.push(("Envoy-style host counts", envoy));
    configs.push(("lookaside plan (ours)", base));
    let mut lbs = Vec::new();
    for (name, cfg) in configs {
        lbs.push((name, LbServer::start(cfg).await?));
    }
    let lb_addrs: Vec<String> = lbs.iter().map(|(_, l)| l.lb_addr.to_string()).collect();
    let registry = format!("lb://{}", lb_addrs.join(","));
    let mut backends = Vec::new();
    let mut zone_of: BTreeMap<String, usize> = BTreeMap::new();
    for (z, zone) in ZONES.iter().enumerate() {
        for _ in 0..BACKENDS_PER_ZONE {
            let registration = RegistrationOptions {
                metadata: Some(json!({ "zone": zone })),
                ..Default::default()
            };
            let g = greeter_registered(
                GreeterOptions::default(),
                Some(&registry),
                "greeter",
                registration,
            )
            .await?;
            zone_of.insert(g.addr.to_string(), z);
            backends.push(g);
        }
    }
    let mut contenders = Vec::new();
    for (name, lb) in lbs {
        let mut channels = Vec::new();
        for (z, zone) in ZONES.iter().enumerate() {
            for _ in 0..CLIENTS_PER_ZONE {
                let ch = LbChannel::builder("greeter")
                    .lb(lb.lb_addr.to_string())
                    .zone(*zone)
                    .build()?;
                anyhow::ensure!(
                    ch.ready_within(Duration::from_secs(10)).await,
                    "{name}: no list"
                );
                channels.push((z, ch));
            }
        }
        contenders.push(Contender { name, lb, channels });
    }
    eprintln!(
        "zones: 3 zones × {BACKENDS_PER_ZONE} backends, {CLIENTS_PER_ZONE} clients per zone calling 60/30/10 %; {rounds} rounds of {round:?} after {warmup:?} warm-up"
    );
    let mut results: Vec<Vec<Summary>> = contenders.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (k, c) in contenders.iter().enumerate() {
            let calls = run(&c.channels, warmup, round).await;
            let s = Summary::of(&calls, &zone_of, round);
            eprintln!(
                "  round {}: {}: cross-zone {:.1} %, max/mean {:.2}, p99 {} µs",
                r + 1,
                c.name,
                s.cross * 100.0,
                s.max_over_mean,
                s.p99
            );
            results[k].push(s);
        }
    }
    let demand = results
        .iter()
        .flatten()
        .map(|s| s.demand)
        .fold([0.0; 3], |acc, d| {
            [acc[0] + d[0], acc[1] + d[1], acc[2] + d[2]]
        })
        .map(|x| x / (results.len() * rounds) as f64);
    // The least cross-zone traffic with no zone above m × its capacity share.
    let least = |m: f64| demand.iter().map(|d| (d - m / 3.0).max(0.0)).sum::<f64>();
    let (least_115, least_110) = (least(1.15), least(1.10));
    println!(
        "demand {:.1} / {:.1} / {:.1} % from zones a/b/c over 3/3/3 backends; least cross-zone possible: {:.1} % (max load ≤ 1.15 × mean), {:.1} % (≤ 1.10 ×)\n",
        demand[0] * 100.0,
        demand[1] * 100.0,
        demand[2] * 100.0,
        least_115 * 100.0,
        least_110 * 100.0
    );
    println!("| lists | cross-zone | vs least possible (1.15×) | max / mean backend load | client p99 | calls/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let mut rows = Vec::new();
    for (c, runs) in contenders.iter().zip(&results) {
        let cross = median(runs.iter().map(|s| s.cross).collect());
        let ratio = median(runs.iter().map(|s| s.max_over_mean).collect());
        let p99 = median(runs.iter().map(|s| s.p99 as f64).collect());
        let rate = median(runs.iter().map(|s| s.rate).collect());
        println!(
            "| {} | {:.1} % | {:+.1} points | {:.2} | {:.0} µs | {:.0} |",
            c.name,
            cross * 100.0,
            (cross - least_115) * 100.0,
            ratio,
            p99,
            rate
        );
        rows.push(json!({"lists": c.name, "cross_zone": cross, "max_over_mean": ratio, "p99_us": p99, "calls_per_s": rate}));
    }
    for c in contenders {
        drop(c.channels);
        c.lb.shutdown(Duration::from_secs(2)).await;
    }
    for b in backends {
        b.shutdown(Duration::ZERO).await;
    }
    Ok(json!({
        "bench": "zones", "rounds": rounds, "round_s": round.as_secs_f64(),
        "demand": demand, "least_cross_zone_115": least_115, "least_cross_zone_110": least_110,
        "contenders": rows,
    }))
}

/// Calls through every channel (its zone's number of callers) for
/// `warmup`, then records `round` of calls.
async fn run(channels: &[(usize, LbChannel)], warmup: Duration, round: Duration) -> Calls {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring_from = Instant::now() + warmup;
    let mut tasks = Vec::new();
    for (z, ch) in channels {
        for _ in 0..WORKERS[*z] {
            let (stop, mut client, z) = (stop.clone(), GreeterClient::new(ch.clone()), *z);
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let reply = client
                        .say_hello(HelloRequest {
                            name: "zones".into(),
                        })
                        .await;
                    let latency = t.elapsed().as_micros() as u64;
                    if let Ok(r) = reply {
                        if t >= measuring_from {
                            out.push((z, backend_of(&r.into_inner().message).to_string(), latency));
                        }
                    }
                    tokio::time::sleep(PAUSE).await;
                }
                out
            }));
        }
    }
    tokio::time::sleep(warmup + round).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

struct Summary {
    cross: f64,
    max_over_mean: f64,
    p99: u64,
    rate: f64,
    demand: [f64; 3],
}

impl Summary {
    fn of(calls: &Calls, zone_of: &BTreeMap<String, usize>, round: Duration) -> Summary {
        let total = calls.len().max(1) as f64;
        let cross = calls
            .iter()
            .filter(|(z, b, _)| zone_of.get(b) != Some(z))
            .count() as f64;
        let mut per_backend: BTreeMap<&str, usize> =
            zone_of.keys().map(|b| (b.as_str(), 0)).collect();
        let mut demand = [0.0; 3];
        for (z, b, _) in calls {
            *per_backend.entry(b.as_str()).or_default() += 1;
            demand[*z] += 1.0 / total;
        }
        let mean = total / per_backend.len().max(1) as f64;
        let max = per_backend.values().copied().max().unwrap_or(0) as f64;
        let mut latencies: Vec<f64> = calls.iter().map(|(_, _, l)| *l as f64).collect();
        latencies.sort_by(|a, b| a.total_cmp(b));
        Summary {
            cross: cross / total,
            max_over_mean: max / mean,
            p99: pct(&latencies, 0.99) as u64,
            rate: total / round.as_secs_f64(),
            demand,
        }
    }
}
