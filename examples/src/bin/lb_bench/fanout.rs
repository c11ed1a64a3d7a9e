//! Fan-out and footprint: N idle streams on one `lb-server` process,
//! BalanceLoad streams (`--protocol grpclb`) or ADS streams subscribed to
//! the service's ClusterLoadAssignment, each answering with an ACK as
//! proxyless gRPC does (`--protocol xds`). Reports the LB's resident memory
//! per stream, and the time from one list change (a backend's health flips,
//! so the published list changes) until every stream has received it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lb_examples::greeter::GreeterOptions;
use lb_proto::grpc::lb::v1::load_balance_response::LoadBalanceResponseType;
use serde_json::json;
use tonic::transport::Endpoint;

use crate::measure::{pct, rss_kib};
use crate::procs::{greeter_with, open_balance_stream, LbProcess};

/// Lists received per stream, and when the latest arrived (ns since `base`).
struct Arrivals {
    base: Instant,
    count: Vec<AtomicU32>,
    at: Vec<AtomicU64>,
}

impl Arrivals {
    fn all_have(&self, n: u32) -> bool {
        self.count.iter().all(|c| c.load(Ordering::Relaxed) >= n)
    }
}

/// Which frontend the streams use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// `grpc.lb.v1.LoadBalancer/BalanceLoad`.
    Grpclb,
    /// ADS, subscribed to the ClusterLoadAssignment `greeter`.
    Xds,
}

/// Opens stream `i` and records what it receives until it ends.
async fn open_any(
    protocol: Protocol,
    channel: tonic::transport::Channel,
    i: usize,
    arrivals: Arc<Arrivals>,
) -> anyhow::Result<()> {
    match protocol {
        Protocol::Grpclb => open_stream(channel, i, arrivals).await,
        Protocol::Xds => open_ads_stream(channel, i, arrivals).await,
    }
}

/// Opens ADS stream `i`: asks for the assignment of `greeter`, records each
/// response and ACKs it.
async fn open_ads_stream(
    channel: tonic::transport::Channel,
    i: usize,
    arrivals: Arc<Arrivals>,
) -> anyhow::Result<()> {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    };
    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: format!("bench-{i}"),
            ..Default::default()
        }),
        type_url: EDS.into(),
        resource_names: vec!["greeter".into()],
        ..Default::default()
    })
    .await?;
    let mut inbound = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            let ns = arrivals.base.elapsed().as_nanos() as u64;
            arrivals.at[i].store(ns, Ordering::Relaxed);
            arrivals.count[i].fetch_add(1, Ordering::Release);
            let ack = DiscoveryRequest {
                version_info: m.version_info,
                response_nonce: m.nonce,
                type_url: EDS.into(),
                resource_names: vec!["greeter".into()],
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Opens stream `i` on `channel` and records its lists until it ends.
async fn open_stream(
    channel: tonic::transport::Channel,
    i: usize,
    arrivals: Arc<Arrivals>,
) -> anyhow::Result<()> {
    let (tx, mut inbound) = open_balance_stream(channel).await?;
    tokio::spawn(async move {
        let _keep_open = tx;
        while let Ok(Some(m)) = inbound.message().await {
            if let Some(LoadBalanceResponseType::ServerList(_)) = m.load_balance_response_type {
                let ns = arrivals.base.elapsed().as_nanos() as u64;
                arrivals.at[i].store(ns, Ordering::Relaxed);
                arrivals.count[i].fetch_add(1, Ordering::Release);
            }
        }
    });
    Ok(())
}

/// Runs the fan-out benchmark on each `lb-server` build in turn (the same
/// sizes, one after the other in one run) and prints them side by side.
pub async fn fanout(
    bins: &[std::path::PathBuf],
    protocols: &[Protocol],
    streams: usize,
    per_connection: usize,
    samples: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut runs = Vec::new();
    let mut header = Vec::new();
    for bin in bins {
        for &protocol in protocols {
            eprintln!("fan-out with {} ({protocol:?})", bin.display());
            runs.push(fanout_one(bin, protocol, streams, per_connection, samples).await?);
            header.push(format!("{} ({protocol:?})", bin.display()));
        }
    }
    let cell = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "| measure ({streams} streams, {per_connection} per connection, {samples} changes) | {} |",
        header.join(" | ")
    );
    println!("|---|{}", "---:|".repeat(runs.len()));
    let rows: [(&str, &str, f64, &str); 7] = [
        ("LB RSS before the streams", "rss_before_kib", 1.0, "KiB"),
        ("LB RSS with the streams open", "rss_after_kib", 1.0, "KiB"),
        (
            "LB RSS per idle stream",
            "rss_per_stream_bytes",
            1.0 / 1024.0,
            "KiB",
        ),
        (
            "one change → half of the streams have it (median over changes)",
            "push_half_ms",
            1.0,
            "ms",
        ),
        (
            "one change → 99 % of the streams have it (median over changes)",
            "push_p99_ms",
            1.0,
            "ms",
        ),
        (
            "one change → every stream has it (median over changes)",
            "push_all_ms",
            1.0,
            "ms",
        ),
        (
            "one change → every stream has it (worst change)",
            "push_all_worst_ms",
            1.0,
            "ms",
        ),
    ];
    for (label, key, scale, unit) in rows {
        let cells: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.1} {unit}", cell(r, key) * scale))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
    Ok(json!({ "bench": "fanout", "builds": header, "runs": runs }))
}

/// One build's fan-out run.
async fn fanout_one(
    bin: &std::path::Path,
    protocol: Protocol,
    streams: usize,
    per_connection: usize,
    samples: usize,
) -> anyhow::Result<serde_json::Value> {
    let per_connection = per_connection.max(1);
    let lb = LbProcess::start_bin(bin, "memory").await?;
    let pid = lb.child.id();
    let greeters = [
        greeter_with(GreeterOptions::default(), &[lb.addr], "greeter").await?,
        greeter_with(GreeterOptions::default(), &[lb.addr], "greeter").await?,
    ];
    // Let the LB see both backends healthy before the baseline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_before = rss_kib(pid);

    let arrivals = Arc::new(Arrivals {
        base: Instant::now(),
        count: (0..streams).map(|_| AtomicU32::new(0)).collect(),
        at: (0..streams).map(|_| AtomicU64::new(0)).collect(),
    });
    let connections = streams.div_ceil(per_connection);
    eprintln!("fan-out: opening {streams} streams over {connections} connections");
    let opened = Instant::now();
    let endpoint = Endpoint::from_shared(format!("http://{}", lb.addr))?.tcp_nodelay(true);
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..connections)
        .map(|c| {
            let (endpoint, arrivals) = (endpoint.clone(), arrivals.clone());
            async move {
                let channel = endpoint.connect().await?;
                for s in 0..per_connection {
                    let i = c * per_connection + s;
                    if i < streams {
                        open_any(protocol, channel.clone(), i, arrivals.clone()).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !arrivals.all_have(1) {
        anyhow::ensure!(Instant::now() < deadline, "not every stream got a list");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "  all {streams} streams have a list after {:?}",
        opened.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(pid);
    let per_stream = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / streams as f64;

    let mut last_ms = Vec::new();
    let mut median_ms = Vec::new();
    let mut p99_ms = Vec::new();
    for k in 0..samples {
        let serving = k % 2 == 1;
        let t0 = arrivals.base.elapsed().as_nanos() as u64;
        greeters[0].set_serving(serving).await;
        let want = 2 + k as u32;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !arrivals.all_have(want) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "a list change did not reach every stream"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut ms: Vec<f64> = arrivals
            .at
            .iter()
            .map(|a| a.load(Ordering::Relaxed).saturating_sub(t0) as f64 / 1e6)
            .collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        median_ms.push(pct(&ms, 0.5));
        p99_ms.push(pct(&ms, 0.99));
        last_ms.push(ms[ms.len() - 1]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last_ms.sort_by(|a, b| a.total_cmp(b));
    median_ms.sort_by(|a, b| a.total_cmp(b));
    p99_ms.sort_by(|a, b| a.total_cmp(b));
    drop(lb);
    for g in greeters {
        g.shutdown(Duration::ZERO).await;
    }
    Ok(json!({
        "bench": "fanout", "protocol": format!("{protocol:?}"), "streams": streams, "per_connection": per_connection, "samples": samples,
        "rss_before_kib": rss_before, "rss_after_kib": rss_after, "rss_per_stream_bytes": per_stream,
        "push_half_ms": pct(&median_ms, 0.5), "push_p99_ms": pct(&p99_ms, 0.5), "push_all_ms": pct(&last_ms, 0.5),
        "push_all_worst_ms": last_ms[last_ms.len() - 1],
    }))
}
