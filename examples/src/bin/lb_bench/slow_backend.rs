//! One slow, busy backend of four: load-aware lists vs plain round robin.

use std::net::SocketAddr;
use std::time::Duration;

use lb_client::LbChannel;
use lb_examples::greeter::GreeterOptions;
use lb_proto::helloworld::greeter_client::GreeterClient;
use lb_server::{Config, LbServer};
use serde_json::json;

use crate::measure::{load, median};
use crate::procs::greeter_with;

pub async fn slow_backend(
    concurrency: usize,
    round: Duration,
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut aware_cfg = Config::with_addrs(any, any);
    aware_cfg.policy.weight_blackout = Duration::from_secs(1);
    aware_cfg.probes.orca_interval = Duration::from_millis(200);
    aware_cfg.policy.weight_update_period = Duration::from_millis(200);
    let mut plain_cfg = aware_cfg.clone();
    plain_cfg.probes.orca = false;
    let aware = LbServer::start(aware_cfg).await?;
    let plain = LbServer::start(plain_cfg).await?;
    let lbs = [aware.lb_addr, plain.lb_addr];
    // Capacity model: utilization = measured qps / capacity. The slow
    // backend (+20 ms) has a small capacity, so under load it reports a
    // utilization far above 1.
    let mut backends = Vec::new();
    for i in 0..4 {
        let options = if i == 0 {
            GreeterOptions {
                delay: Duration::from_millis(20),
                capacity: Some(50.0),
                ..Default::default()
            }
        } else {
            GreeterOptions {
                capacity: Some(20_000.0),
                ..Default::default()
            }
        };
        backends.push(greeter_with(options, &lbs, "greeter").await?);
    }
    let slow_addr = backends[0].addr;
    let aware_ch = LbChannel::builder("greeter")
        .lb(aware.lb_addr.to_string())
        .build()?;
    let plain_ch = LbChannel::builder("greeter")
        .lb(plain.lb_addr.to_string())
        .build()?;
    anyhow::ensure!(
        aware_ch.ready_within(Duration::from_secs(5)).await
            && plain_ch.ready_within(Duration::from_secs(5)).await
    );
    eprintln!("slow-backend: 4 backends, {slow_addr} +20 ms; concurrency {concurrency}; warming up load weights");
    load(
        GreeterClient::new(aware_ch.clone()),
        concurrency,
        Duration::from_secs(3),
        None,
    )
    .await;
    let mut plain_runs = Vec::new();
    let mut aware_runs = Vec::new();
    for r in 0..rounds {
        plain_runs.push(
            load(
                GreeterClient::new(plain_ch.clone()),
                concurrency,
                round,
                None,
            )
            .await,
        );
        aware_runs.push(
            load(
                GreeterClient::new(aware_ch.clone()),
                concurrency,
                round,
                None,
            )
            .await,
        );
        eprintln!(
            "  round {}: plain p99 {} µs, load-aware p99 {} µs",
            r + 1,
            plain_runs[r].2,
            aware_runs[r].2
        );
    }
    let slow_share = {
        let list = aware
            .catalog
            .service("greeter")
            .map(|e| e.current_list())
            .expect("service");
        let port = slow_addr.port() as i32;
        list.servers.iter().filter(|s| s.port == port).count() as f64
            / list.servers.len().max(1) as f64
    };
    let summary = |runs: &[(f64, u64, u64, u64)]| {
        (
            median(runs.iter().map(|x| x.0).collect()),
            median(runs.iter().map(|x| x.1 as f64).collect()),
            median(runs.iter().map(|x| x.2 as f64).collect()),
            median(runs.iter().map(|x| x.3 as f64).collect()),
        )
    };
    let (pc, p50p, p99p, p999p) = summary(&plain_runs);
    let (ac, p50a, p99a, p999a) = summary(&aware_runs);
    println!("| lists | calls/s | p50 µs | p99 µs | p99.9 µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!("| plain round robin (baseline) | {pc:.0} | {p50p:.0} | {p99p:.0} | {p999p:.0} |");
    println!("| load-aware (ORCA weights) | {ac:.0} | {p50a:.0} | {p99a:.0} | {p999a:.0} |");
    println!(
        "| ratio load-aware / plain | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
        ac / pc,
        p50a / p50p,
        p99a / p99p,
        p999a / p999p
    );
    println!(
        "\nslow backend's share of the load-aware list: {:.1} %",
        slow_share * 100.0
    );
    drop((aware_ch, plain_ch));
    for b in backends {
        b.shutdown(Duration::ZERO).await;
    }
    aware.shutdown(Duration::from_secs(2)).await;
    plain.shutdown(Duration::from_secs(2)).await;
    Ok(json!({
        "bench": "slow_backend", "concurrency": concurrency, "rounds": rounds,
        "plain": {"calls_per_s": pc, "p50_us": p50p, "p99_us": p99p, "p999_us": p999p},
        "load_aware": {"calls_per_s": ac, "p50_us": p50a, "p99_us": p99a, "p999_us": p999a},
        "p99_ratio": p99a / p99p, "slow_share_of_list": slow_share,
    }))
}
