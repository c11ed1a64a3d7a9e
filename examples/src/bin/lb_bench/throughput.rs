//! Unary calls/s over three backends through each contender, alternating
//! rounds so that machine noise hits all alike:
//! (a) `lb-client` `LbChannel` (lists from an in-process LB),
//! (b) tonic `Channel::balance_list` over the same backends,
//! (c) nginx `grpc_pass` round robin over the same backends (a proxy hop),
//! (d) one plain tonic `Channel` to one backend,
//! (e) Envoy round robin over the same backends, its clusters and endpoints
//!     fed by the LB's xDS (the proxy users pick today).
//! CPU per call counts this process (client, LB and backends) plus the
//! proxies.
//!
//! A second table puts a stock xDS client on both paths, in the same
//! alternating rounds: gRPC C-core (Python grpcio, `tests/interop/xds_client.py`,
//! closed loop with futures) dialing `xds:///greeter` with the LB as its
//! xDS server, and the same client calling through Envoy.

use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_examples::greeter::GreeterOptions;
use lb_proto::helloworld::greeter_client::GreeterClient;
use lb_server::{Config, LbServer};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::measure::{children_of, load, median, process_cpu};
use crate::procs::{greeter_with, Envoy, Nginx};

/// One contender's client.
enum Contender {
    Lb(LbChannel),
    Tonic(Channel),
}

/// CPU used so far by this process, nginx (master and workers) and Envoy.
fn cpu_now(nginx: &Nginx, envoy: &Envoy) -> Duration {
    let mut total = process_cpu(std::process::id());
    total += process_cpu(nginx.pid());
    for child in children_of(nginx.pid()) {
        total += process_cpu(child);
    }
    total + process_cpu(envoy.pid())
}

/// Runs the throughput benchmark.
pub async fn throughput(
    concurrency: usize,
    round: Duration,
    rounds: usize,
    deadline: Option<Duration>,
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
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let nginx = Nginx::start(&addrs).await?;
    let envoy = Envoy::start(lb.lb_addr, addrs.len()).await?;

    let lb3 = LbChannel::builder("greeter")
        .lb(lb.lb_addr.to_string())
        .build()?;
    let ready_by = Instant::now() + Duration::from_secs(5);
    while {
        let mut r = lb3.ready_backends();
        r.sort();
        r.dedup();
        r.len() < 3
    } {
        anyhow::ensure!(Instant::now() < ready_by, "LbChannel not ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let endpoint = |addr: std::net::SocketAddr| {
        Endpoint::from_shared(format!("http://{addr}")).map(|e| e.tcp_nodelay(true))
    };
    let balanced = Channel::balance_list(
        addrs
            .iter()
            .map(|a| endpoint(*a))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter(),
    );
    let proxied = endpoint(nginx.addr)?.connect().await?;
    let single = endpoint(addrs[0])?.connect().await?;
    let via_envoy = endpoint(envoy.addr)?.connect().await?;

    let contenders = [
        ("(a) lb-client LbChannel, 3 backends", Contender::Lb(lb3)),
        (
            "(b) tonic Channel::balance_list, 3 backends",
            Contender::Tonic(balanced),
        ),
        (
            "(c) nginx grpc_pass round robin, 3 backends",
            Contender::Tonic(proxied),
        ),
        ("(d) tonic Channel, 1 backend", Contender::Tonic(single)),
        (
            "(e) Envoy round robin (fed by the LB's xDS), 3 backends",
            Contender::Tonic(via_envoy),
        ),
    ];
    // Per contender: (calls/s, p50, p99, p99.9, CPU µs per call) per round.
    let mut results: Vec<Vec<[f64; 5]>> = vec![Vec::new(); contenders.len()];
    eprintln!(
        "throughput: concurrency {concurrency}, {rounds} alternating rounds of {round:?} per contender"
    );
    for (_, c) in &contenders {
        // Warm-up, unmeasured (connections, nginx upstream keep-alive pool).
        run(c, concurrency, Duration::from_millis(300), deadline).await;
    }
    let mut stock: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    let stock_targets = [String::new(), envoy.addr.to_string()];
    for r in 0..rounds {
        for (k, target) in stock_targets.iter().enumerate() {
            stock[k].push(grpcio_load(lb.lb_addr, target, concurrency.min(32), round).await?);
        }
        let mut line = Vec::new();
        for (i, (_, c)) in contenders.iter().enumerate() {
            let cpu0 = cpu_now(&nginx, &envoy);
            let t0 = Instant::now();
            let (cps, p50, p99, p999) = run(c, concurrency, round, deadline).await;
            let calls = cps * t0.elapsed().as_secs_f64();
            let cpu = (cpu_now(&nginx, &envoy) - cpu0).as_secs_f64() * 1e6 / calls.max(1.0);
            results[i].push([cps, p50 as f64, p99 as f64, p999 as f64, cpu]);
            line.push(format!("{cps:.0}"));
        }
        eprintln!("  round {}: {} calls/s", r + 1, line.join(" / "));
    }
    let med = |i: usize, k: usize| median(results[i].iter().map(|x| x[k]).collect());
    let (tonic_cps, nginx_cps, nginx_p99) = (med(1, 0), med(2, 0), med(2, 2));
    let (envoy_cps, envoy_p99) = (med(4, 0), med(4, 2));
    println!("| contender | calls/s | p50 µs | p99 µs | p99.9 µs | CPU µs/call | calls/s vs (b) | calls/s vs (c) | p99 vs (c) | calls/s vs (e) | p99 vs (e) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut rows = Vec::new();
    for (i, (name, _)) in contenders.iter().enumerate() {
        let (cps, p50, p99, p999, cpu) = (med(i, 0), med(i, 1), med(i, 2), med(i, 3), med(i, 4));
        println!(
            "| {name} | {cps:.0} | {p50:.0} | {p99:.0} | {p999:.0} | {cpu:.1} | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            cps / tonic_cps,
            cps / nginx_cps,
            p99 / nginx_p99,
            cps / envoy_cps,
            p99 / envoy_p99
        );
        rows.push(json!({
            "contender": name, "calls_per_s": cps, "p50_us": p50, "p99_us": p99, "p999_us": p999,
            "cpu_us_per_call": cpu, "vs_balance_list": cps / tonic_cps, "vs_nginx": cps / nginx_cps,
            "p99_vs_nginx": p99 / nginx_p99, "vs_envoy": cps / envoy_cps, "p99_vs_envoy": p99 / envoy_p99,
        }));
    }
    let smed = |k: usize, i: usize| median(stock[k].iter().map(|x| x[i]).collect());
    let (e_cps, e_p99) = (smed(1, 0), smed(1, 2));
    println!();
    println!("| stock client (grpcio, {} in flight) | calls/s | p50 µs | p99 µs | calls/s vs Envoy | p99 vs Envoy |", concurrency.min(32));
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let mut stock_rows = Vec::new();
    for (k, name) in [
        "(f) grpcio xds:///greeter, direct to 3 backends",
        "(g) grpcio through Envoy (fed by the LB's xDS)",
    ]
    .iter()
    .enumerate()
    {
        let (cps, p50, p99) = (smed(k, 0), smed(k, 1), smed(k, 2));
        println!(
            "| {name} | {cps:.0} | {p50:.0} | {p99:.0} | {:.2}x | {:.2}x |",
            cps / e_cps,
            p99 / e_p99
        );
        stock_rows.push(
            json!({"contender": name, "calls_per_s": cps, "p50_us": p50, "p99_us": p99,
            "vs_envoy": cps / e_cps, "p99_vs_envoy": p99 / e_p99}),
        );
    }
    drop(contenders);
    drop(nginx);
    drop(envoy);
    for b in backends {
        b.shutdown(Duration::ZERO).await;
    }
    lb.shutdown(Duration::from_secs(2)).await;
    Ok(json!({
        "bench": "throughput", "concurrency": concurrency, "round_s": round.as_secs_f64(),
        "rounds": rounds, "rows": rows, "stock_rows": stock_rows,
    }))
}

async fn run(
    c: &Contender,
    concurrency: usize,
    d: Duration,
    deadline: Option<Duration>,
) -> (f64, u64, u64, u64) {
    match c {
        Contender::Lb(ch) => load(GreeterClient::new(ch.clone()), concurrency, d, deadline).await,
        Contender::Tonic(ch) => {
            load(GreeterClient::new(ch.clone()), concurrency, d, deadline).await
        }
    }
}

/// One closed-loop round of the stock C-core client: `xds:///greeter`
/// through the LB at `lb` when `target` is empty, else straight to
/// `target`. Returns (calls/s, p50 µs, p99 µs).
async fn grpcio_load(
    lb: std::net::SocketAddr,
    target: &str,
    concurrency: usize,
    round: Duration,
) -> anyhow::Result<[f64; 3]> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} is missing: run scripts/setup (it makes the .venv with grpcio)",
        python.display()
    );
    let out = tokio::process::Command::new(python)
        .arg(root.join("tests/interop/xds_client.py"))
        .args(["--lb", &lb.to_string(), "--target", target])
        .args(["--load-seconds", &round.as_secs_f64().to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .env("GRPC_VERBOSITY", "ERROR")
        .kill_on_drop(true)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        anyhow::anyhow!(
            "grpcio load: {e}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    anyhow::ensure!(
        v["failures"].as_u64() == Some(0),
        "grpcio load had failed calls: {v}"
    );
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok([f("calls_per_s"), f("p50_us"), f("p99_us")])
}
