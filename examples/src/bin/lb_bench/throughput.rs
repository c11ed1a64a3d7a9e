//! Unary calls/s through each contender, alternating rounds.

use std::time::Duration;

use lb_client::LbChannel;
use lb_examples::greeter::GreeterOptions;
use lb_proto::helloworld::greeter_client::GreeterClient;
use lb_server::{Config, LbServer};
use serde_json::json;

use crate::measure::{load, median};
use crate::procs::greeter_with;

pub async fn throughput(
    concurrency: usize,
    round: Duration,
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    let lb = LbServer::start(Config::with_addrs(
        "127.0.0.1:0".parse()?,
        "127.0.0.1:0".parse()?,
    ))
    .await?;
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(greeter_with(GreeterOptions::default(), &[lb.lb_addr], "greeter").await?);
    }
    let solo = greeter_with(GreeterOptions::default(), &[lb.lb_addr], "solo").await?;

    let lb3 = LbChannel::builder("greeter")
        .lb(lb.lb_addr.to_string())
        .build()?;
    let lb1 = LbChannel::builder("solo")
        .lb(lb.lb_addr.to_string())
        .build()?;
    anyhow::ensure!(
        lb3.ready_within(Duration::from_secs(5)).await
            && lb1.ready_within(Duration::from_secs(5)).await
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // all three connected
    let tonic1 = tonic::transport::Endpoint::from_shared(format!("http://{}", solo.addr))?
        .tcp_nodelay(true)
        .connect()
        .await?;

    let names = [
        "LbChannel, 3 backends",
        "LbChannel, 1 backend",
        "tonic Channel, 1 backend",
    ];
    let mut results: Vec<Vec<(f64, u64, u64, u64)>> = vec![Vec::new(); 3];
    eprintln!(
        "throughput: concurrency {concurrency}, {rounds} alternating rounds of {round:?} each"
    );
    // Warm-up, unmeasured.
    load(
        GreeterClient::new(lb3.clone()),
        concurrency,
        Duration::from_millis(500),
    )
    .await;
    for r in 0..rounds {
        results[0].push(load(GreeterClient::new(lb3.clone()), concurrency, round).await);
        results[1].push(load(GreeterClient::new(lb1.clone()), concurrency, round).await);
        results[2].push(load(GreeterClient::new(tonic1.clone()), concurrency, round).await);
        eprintln!(
            "  round {}: {:.0} / {:.0} / {:.0} calls/s",
            r + 1,
            results[0][r].0,
            results[1][r].0,
            results[2][r].0
        );
    }
    let baseline = median(results[2].iter().map(|x| x.0).collect());
    println!("| contender | calls/s (median) | p50 µs | p99 µs | ratio to tonic Channel |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut rows = Vec::new();
    for (name, runs) in names.iter().zip(&results) {
        let cps = median(runs.iter().map(|x| x.0).collect());
        let p50 = median(runs.iter().map(|x| x.1 as f64).collect());
        let p99 = median(runs.iter().map(|x| x.2 as f64).collect());
        println!(
            "| {name} | {cps:.0} | {p50:.0} | {p99:.0} | {:.2}x |",
            cps / baseline
        );
        rows.push(json!({"contender": name, "calls_per_s": cps, "p50_us": p50, "p99_us": p99, "ratio": cps / baseline}));
    }
    drop((lb3, lb1));
    for b in backends {
        b.shutdown(Duration::ZERO).await;
    }
    solo.shutdown(Duration::ZERO).await;
    lb.shutdown(Duration::from_secs(2)).await;
    Ok(
        json!({"bench": "throughput", "concurrency": concurrency, "round_s": round.as_secs_f64(), "rounds": rounds, "rows": rows}),
    )
}
