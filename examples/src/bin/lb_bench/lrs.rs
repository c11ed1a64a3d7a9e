//! LRS: what pooling every client's per-backend outcomes costs the LB.
//!
//! `streams` clients report once a second about one service of `backends`
//! backends, two ways, over the same open streams:
//! - **grpclb** (the baseline): a BalanceLoad `client_stats` message, one
//!   set of counters for the whole service, as stock grpclb clients send;
//! - **LRS**: a `LoadStatsRequest` with one locality per backend (its
//!   address as `sub_zone`), as xDS clients and `LbChannel` send, which the
//!   LB folds into each backend's evidence for the gray-failure detector.
//!
//! Every stream of both kinds stays open for the whole run; phases of
//! `window` take turns (nothing reported, grpclb reports, LRS reports) for
//! `rounds` rounds, so machine noise falls on all of them alike. The LB's
//! own CPU time is read from `/proc` for each phase (the reporters run in
//! this process, not in the LB's); a report's cost is its phase's CPU above
//! the quiet phase's, over the reports sent. The backends are registered
//! under static keys with health checks off: what is measured is the
//! evidence, not probing. The LB keeps at most 256 reporters per backend
//! (`catalog::outcomes::MAX_REPORTERS`); with more clients, the reports of
//! those beyond are counted in the backend's totals but not remembered
//! per reporter, a cheaper path, so the default stays below the cap.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lb_proto::envoy::service::load_stats::v3::{
    load_reporting_service_client::LoadReportingServiceClient, ClusterStats, LoadStatsRequest,
    Locality, Node, UpstreamLocalityStats,
};
use lb_proto::grpc::lb::v1::{
    load_balance_request::LoadBalanceRequestType, ClientStats, LoadBalanceRequest,
};
use serde_json::json;
use tonic::transport::Endpoint;

use crate::measure::process_cpu;
use crate::procs::{open_balance_stream, start_etcd, LbProcess};

/// Streams per connection, as many clients' streams would share a proxy's.
const PER_CONNECTION: usize = 100;

/// Which reports are being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Quiet = 0,
    Grpclb = 1,
    Lrs = 2,
}

/// Reports sent, per phase.
#[derive(Default)]
struct Sent([AtomicU64; 3]);

/// One LRS report about every backend: 10 calls each, one of them failed.
fn lrs_report(node: Option<Node>, backends: &[String]) -> LoadStatsRequest {
    LoadStatsRequest {
        node,
        cluster_stats: vec![ClusterStats {
            cluster_name: "greeter".into(),
            upstream_locality_stats: backends
                .iter()
                .map(|addr| UpstreamLocalityStats {
                    locality: Some(Locality {
                        sub_zone: addr.clone(),
                        ..Default::default()
                    }),
                    total_successful_requests: 9,
                    total_error_requests: 1,
                    total_issued_requests: 10,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
    }
}

/// One grpclb `client_stats` report of as many calls.
fn grpclb_report(backends: usize) -> LoadBalanceRequest {
    let calls = 10 * backends as i64;
    LoadBalanceRequest {
        load_balance_request_type: Some(LoadBalanceRequestType::ClientStats(ClientStats {
            num_calls_started: calls,
            num_calls_finished: calls,
            num_calls_finished_known_received: calls - backends as i64,
            num_calls_finished_with_client_failed_to_send: backends as i64,
            ..Default::default()
        })),
    }
}

/// Opens client `i`'s two streams on `channel` and reports on the one the
/// phase names, once a second, until `phase` is dropped (the task ends
/// with the run).
async fn client(
    channel: tonic::transport::Channel,
    i: usize,
    clients: usize,
    backends: Arc<Vec<String>>,
    phase: Arc<AtomicU8>,
    sent: Arc<Sent>,
) -> anyhow::Result<()> {
    let (balance_tx, mut balance_in) = open_balance_stream(channel.clone()).await?;
    let (lrs_tx, lrs_rx) = tokio::sync::mpsc::channel(1);
    let node = Node {
        id: format!("lrs-bench-{i}"),
        ..Default::default()
    };
    lrs_tx.send(lrs_report(Some(node), &[])).await?;
    let mut lrs_in = LoadReportingServiceClient::new(channel)
        .stream_load_stats(tokio_stream::wrappers::ReceiverStream::new(lrs_rx))
        .await?
        .into_inner();
    // Spread the clients over the second.
    let offset = Duration::from_millis((1000 * i / clients.max(1)) as u64);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + offset, Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = phase.load(Ordering::Relaxed);
                if now == Phase::Grpclb as u8 {
                    balance_tx.send(grpclb_report(backends.len())).await?;
                } else if now == Phase::Lrs as u8 {
                    lrs_tx.send(lrs_report(None, &backends)).await?;
                } else {
                    continue;
                }
                sent.0[now as usize].fetch_add(1, Ordering::Relaxed);
            }
            m = balance_in.message() => { m?.ok_or_else(|| anyhow::anyhow!("BalanceLoad stream ended"))?; }
            m = lrs_in.message() => { m?.ok_or_else(|| anyhow::anyhow!("LRS stream ended"))?; }
        }
    }
}

/// The first client that ended (with an error, or panicking), if any: no
/// client ends on its own while the run lasts.
fn failed(tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>, when: &str) -> anyhow::Result<()> {
    match tasks.try_join_next() {
        None => Ok(()),
        Some(Ok(Ok(()))) => anyhow::bail!("a client ended {when}"),
        Some(Ok(Err(e))) => anyhow::bail!("a client failed {when}: {e}"),
        Some(Err(e)) => anyhow::bail!("a client panicked {when}: {e}"),
    }
}

/// Runs the benchmark: `streams` clients, a service of `backends`
/// backends, `rounds` rounds of three phases of `window` each.
pub async fn lrs(
    streams: usize,
    backends: usize,
    window: Duration,
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    let (_etcd, endpoint) = start_etcd().await?;
    let mut etcd = etcd_client::Client::connect([&endpoint], None).await?;
    let addrs: Vec<String> = (0..backends)
        .map(|i| format!("127.0.0.2:{}", 20_000 + i))
        .collect();
    for addr in &addrs {
        etcd.put(format!("/services/greeter/{addr}"), addr.clone(), None)
            .await?;
    }
    let lb = LbProcess::start_bin_with(
        &std::env::current_exe()?.with_file_name("lb-server"),
        &format!("etcd://{endpoint}"),
        "warn",
        &["--health-checks", "false"],
    )
    .await?;
    let pid = lb.child.id();
    let listed = async {
        loop {
            let body = lb.get("/api/v1/services/greeter").await.unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if v["listed"].as_u64() == Some(backends as u64) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), listed)
        .await
        .map_err(|_| anyhow::anyhow!("the LB never listed the {backends} backends"))?;

    let phase = Arc::new(AtomicU8::new(Phase::Quiet as u8));
    let sent = Arc::new(Sent::default());
    let addrs = Arc::new(addrs);
    let endpoint = Endpoint::from_shared(format!("http://{}", lb.addr))?.tcp_nodelay(true);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..streams.div_ceil(PER_CONNECTION) {
        let channel = endpoint.connect().await?;
        for i in c * PER_CONNECTION..((c + 1) * PER_CONNECTION).min(streams) {
            tasks.spawn(client(
                channel.clone(),
                i,
                streams,
                addrs.clone(),
                phase.clone(),
                sent.clone(),
            ));
        }
    }
    eprintln!("lrs: {streams} clients, each with a BalanceLoad and an LRS stream; settling");
    tokio::time::sleep(Duration::from_secs(5)).await;
    failed(&mut tasks, "while opening")?;

    // CPU seconds and reports per phase, summed over the rounds.
    let mut cpu = [Duration::ZERO; 3];
    let mut reports = [0u64; 3];
    for round in 0..rounds {
        for p in [Phase::Quiet, Phase::Grpclb, Phase::Lrs] {
            phase.store(p as u8, Ordering::Relaxed);
            // One second for the previous phase's last reports to land.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (cpu0, sent0) = (process_cpu(pid), sent.0[p as usize].load(Ordering::Relaxed));
            tokio::time::sleep(window).await;
            cpu[p as usize] += process_cpu(pid).saturating_sub(cpu0);
            reports[p as usize] += sent.0[p as usize].load(Ordering::Relaxed) - sent0;
            eprintln!("lrs: round {} {p:?}: done", round + 1);
        }
    }
    phase.store(Phase::Quiet as u8, Ordering::Relaxed);
    failed(&mut tasks, "during the run")?;
    let outcomes = lb
        .metric_sum("lb_backend_outcomes_total")
        .await
        .unwrap_or(0.0);
    tasks.abort_all();

    let seconds = window.as_secs_f64() * rounds as f64;
    let share = |p: Phase| cpu[p as usize].as_secs_f64() / seconds * 100.0;
    let per_report = |p: Phase| {
        let extra = cpu[p as usize].as_secs_f64() - cpu[Phase::Quiet as usize].as_secs_f64();
        extra.max(0.0) / reports[p as usize].max(1) as f64 * 1e6
    };
    let (grpclb_us, lrs_us) = (per_report(Phase::Grpclb), per_report(Phase::Lrs));
    println!("\n### LRS evidence vs grpclb client stats: {streams} clients × 1 report/s, {backends} backends, {rounds} × {window:?} per phase\n");
    println!("| phase | reports | LB CPU (% of a core) | LB CPU per report above quiet | per backend in it |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| quiet (streams open) | {} | {:.1} | | |",
        reports[0],
        share(Phase::Quiet)
    );
    println!(
        "| grpclb `client_stats` (one per service) | {} | {:.1} | {grpclb_us:.1} µs | |",
        reports[1],
        share(Phase::Grpclb)
    );
    println!(
        "| LRS, one locality per backend | {} | {:.1} | {lrs_us:.1} µs | {:.2} µs |",
        reports[2],
        share(Phase::Lrs),
        lrs_us / backends.max(1) as f64
    );
    let ratio = if grpclb_us > 0.0 {
        format!("{:.1}×", lrs_us / grpclb_us)
    } else {
        "not measured (too few reports for the CPU clock's ticks)".into()
    };
    println!("\nLRS / grpclb per report: {ratio}; the LB counted {outcomes:.0} outcomes in all");
    Ok(json!({
        "streams": streams,
        "backends": backends,
        "window_s": window.as_secs_f64(),
        "rounds": rounds,
        "quiet": {"reports": reports[0], "cpu_pct": share(Phase::Quiet)},
        "grpclb": {"reports": reports[1], "cpu_pct": share(Phase::Grpclb), "us_per_report": grpclb_us},
        "lrs": {"reports": reports[2], "cpu_pct": share(Phase::Lrs), "us_per_report": lrs_us,
                "us_per_locality": lrs_us / backends.max(1) as f64},
    }))
}
