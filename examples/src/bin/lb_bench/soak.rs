//! Soak: one `lb-server` process over a real etcd, under steady churn for
//! a bounded time.
//!
//! N idle BalanceLoad streams stay open (100 per connection) and receive
//! every list change; a few `LbChannel` clients call continuously; every
//! churn interval a new backend registers in etcd and the oldest shuts down
//! gracefully (NOT_SERVING, deregister, drain), so lists change all the
//! time. Beside the churn, backends on stock gRPC servers (grpc-go and
//! C-core, default settings, which enforce their keep-alive policies) serve
//! for the whole run: nothing about them changes. The run checks what a
//! long-lived LB must not do:
//! - fail a call (every failure is printed);
//! - move what does not change: a health transition of a stock backend, a
//!   lost etcd session (`lb_upstream_reconnects_total{kind="etcd"}`), a
//!   WARN line in the LB's log, or a gray-failure verdict (every client
//!   reports its per-backend outcomes, and none fails);
//! - grow: the LB's resident memory is sampled every second and a straight
//!   line fitted after the warm-up; its slope is reported (KiB/min);
//! - leak tasks or file descriptors: both are read from the LB's `/metrics`
//!   before the streams and clients start and after they have gone.
//!
//! Exits with an error when a check fails, so that CI can run it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_examples::greeter::{GreeterOptions, RunningGreeter};
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use serde_json::json;

use crate::measure::rss_kib;
use crate::procs::{greeter_in, open_balance_stream, start_etcd, LbProcess, StockBackend};

/// The LB's log filter in the soak: warnings, and the gray-failure
/// detector's verdicts.
const GRAY_LOG: &str = "warn,lb_server::catalog::ejections=info";

/// The stock backends kept through the run: how to start each.
pub struct StockPeers {
    /// The grpc-go backend (`tests/interop/go/build` makes it).
    pub grpc_go_backend: std::path::PathBuf,
    /// A Python with grpcio and grpcio-health-checking.
    pub python: std::path::PathBuf,
    /// `tests/interop/stock_backend.py`.
    pub grpcio_backend: std::path::PathBuf,
}

impl StockPeers {
    /// Starts one backend of each, registered as `greeter` in `registry`
    /// (`None`: not registered).
    pub async fn start(&self, registry: Option<&str>) -> anyhow::Result<Vec<StockBackend>> {
        let go = std::process::Command::new(&self.grpc_go_backend);
        let mut core = std::process::Command::new(&self.python);
        core.arg(&self.grpcio_backend);
        Ok(vec![
            StockBackend::start("grpc-go", go, registry, "greeter").await?,
            StockBackend::start("grpcio", core, registry, "greeter").await?,
        ])
    }
}

/// Health transitions of the last 10 minutes of each of `addrs`, as the LB
/// reports them (an address it does not list counts as a transition).
async fn transitions(lb: &LbProcess, addrs: &[std::net::SocketAddr]) -> anyhow::Result<Vec<u64>> {
    let body = lb.get("/api/v1/services/greeter").await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let backends = v["backends"].as_array().cloned().unwrap_or_default();
    Ok(addrs
        .iter()
        .map(|a| {
            backends
                .iter()
                .find(|b| b["address"] == a.to_string())
                .and_then(|b| b["health_transitions_10m"].as_u64())
                .unwrap_or(u64::MAX)
        })
        .collect())
}

/// Limits a soak run must stay within.
pub struct SoakLimits {
    /// Load before the measured window (buffers and allocator arenas grow
    /// to their working size); RSS is sampled but not fitted.
    pub warmup: Duration,
    /// Largest RSS slope after warm-up, KiB per minute.
    pub max_rss_slope_kib_per_min: f64,
    /// Tasks and descriptors allowed above the baseline at the end.
    pub leak_tolerance: f64,
}

/// Calls made by the soak clients.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

/// Least-squares slope of `(seconds, KiB)` samples, in KiB per minute.
fn slope_per_minute(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in samples {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den * 60.0
    }
}

/// Opens `streams` idle BalanceLoad streams, 100 per connection; returns
/// the tasks holding them (abort to close) and a counter of lists received.
async fn open_streams(
    lb: &LbProcess,
    streams: usize,
) -> anyhow::Result<(Vec<tokio::task::JoinHandle<()>>, Arc<AtomicU64>)> {
    let lists = Arc::new(AtomicU64::new(0));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", lb.addr))?;
    let mut holders = Vec::with_capacity(streams);
    let mut channel = None;
    for i in 0..streams {
        if i % 100 == 0 {
            channel = Some(endpoint.connect().await?);
        }
        let (tx, mut inbound) = open_balance_stream(channel.clone().expect("connected")).await?;
        let lists = lists.clone();
        holders.push(tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(_)) = inbound.message().await {
                lists.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    Ok((holders, lists))
}

/// Starts `clients` channels calling continuously until `stop`.
fn start_callers(
    lb: &LbProcess,
    clients: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    limit: Instant,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let channel = LbChannel::builder("greeter")
            .lb(lb.addr.to_string())
            .lb_backoff(Duration::from_millis(100), Duration::from_secs(1))
            .build()?;
        let (stop, tally) = (stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = GreeterClient::new(channel);
            while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                let mut req = tonic::Request::new(HelloRequest {
                    name: "soak".into(),
                });
                req.set_timeout(Duration::from_secs(5));
                match client.say_hello(req).await {
                    Ok(_) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        let mut first = tally.first_failures.lock().expect("tally lock");
                        if first.len() < 10 {
                            first.push(format!("{:?}: {}", status.code(), status.message()));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    Ok(tasks)
}

/// Reads the LB's task and descriptor counts.
async fn tasks_and_fds(lb: &LbProcess) -> anyhow::Result<(f64, f64)> {
    let tasks = lb.metric("lb_runtime_tasks").await?.unwrap_or(f64::NAN);
    let fds = lb.metric("lb_process_open_fds").await?.unwrap_or(f64::NAN);
    Ok((tasks, fds))
}

/// Runs the soak.
pub async fn soak(
    duration: Duration,
    streams: usize,
    clients: usize,
    churn_every: Duration,
    backends: usize,
    peers: &StockPeers,
    limits: SoakLimits,
) -> anyhow::Result<serde_json::Value> {
    let (_etcd, endpoint) = start_etcd().await?;
    let registry = format!("etcd://{endpoint}");
    // WARN and up, and the gray-failure detector's INFO lines: every
    // verdict it changes (de-weightings and probation too) is logged there.
    let bin = std::env::current_exe()?.with_file_name("lb-server");
    let lb = LbProcess::start_bin_with(&bin, &registry, GRAY_LOG, &[]).await?;
    let pid = lb.child.id();
    let stock = peers.start(Some(&registry)).await?;
    let stock_addrs: Vec<std::net::SocketAddr> = stock.iter().map(|b| b.addr).collect();
    let churned = || greeter_in(GreeterOptions::default(), Some(&registry), "greeter");
    let mut live: VecDeque<RunningGreeter> = VecDeque::new();
    for _ in 0..backends.max(2) {
        live.push_back(churned().await?);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stock_before = transitions(&lb, &stock_addrs).await?;
    anyhow::ensure!(
        stock_before.iter().all(|n| *n == 0),
        "stock backends not listed or already flapping before the run: {stock_before:?}"
    );
    let mut stock_worst = stock_before.clone();
    let (tasks_before, fds_before) = tasks_and_fds(&lb).await?;
    let rss_start = rss_kib(pid);

    let warmup = limits.warmup;
    eprintln!("soak: {streams} idle streams, {clients} calling clients, a backend replaced every {churn_every:?}, for {warmup:?} warm-up + {duration:?}");
    let duration_total = warmup + duration;
    let (holders, lists) = open_streams(&lb, streams).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let limit = started + duration_total + Duration::from_secs(60);
    let callers = start_callers(&lb, clients, stop.clone(), tally.clone(), limit)?;

    let mut rss: Vec<(f64, f64)> = Vec::new();
    let mut churns = 0u64;
    let mut retiring = Vec::new();
    let mut next_churn = Instant::now() + churn_every;
    let mut next_sample = Instant::now();
    while started.elapsed() < duration_total {
        let now = Instant::now();
        if now >= next_sample {
            rss.push((started.elapsed().as_secs_f64(), rss_kib(pid) as f64));
            next_sample += Duration::from_secs(1);
            // Every 5 s: the stock backends' transitions (counted over the
            // last 10 minutes, so none is missed between two readings).
            if rss.len().is_multiple_of(5) {
                let seen = transitions(&lb, &stock_addrs).await?;
                for (worst, now) in stock_worst.iter_mut().zip(seen) {
                    *worst = (*worst).max(now);
                }
            }
        }
        if now >= next_churn {
            live.push_back(churned().await?);
            if let Some(old) = live.pop_front() {
                retiring.push(tokio::spawn(old.shutdown(Duration::from_millis(1000))));
            }
            retiring.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
            churns += 1;
            next_churn += churn_every;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await?;
    }
    for r in retiring {
        r.await?;
    }
    for (worst, now) in stock_worst
        .iter_mut()
        .zip(transitions(&lb, &stock_addrs).await?)
    {
        *worst = (*worst).max(now);
    }
    let etcd_reconnects = lb
        .metric("lb_upstream_reconnects_total{kind=\"etcd\"}")
        .await?
        .unwrap_or(0.0);
    let warn_lines = lb.log_lines("WARN");
    // Every client reports its per-backend outcomes (LRS) and no call
    // fails: the gray-failure detector must say nothing all run long.
    let gray_verdicts: Vec<String> = ["INFO", "WARN"]
        .iter()
        .flat_map(|level| lb.log_lines(level))
        .filter(|l| {
            l.contains("gray-failure verdict")
                || l.contains("backend ejected")
                || l.contains("held in the list")
        })
        .collect();
    let rss_end = rss_kib(pid);
    for h in &holders {
        h.abort();
    }
    drop(holders);
    // Wait for the LB to see every stream and connection go.
    let deadline = Instant::now() + Duration::from_secs(15);
    while lb.metric("lb_streams_open").await?.unwrap_or(0.0) > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (tasks_after, fds_after) = tasks_and_fds(&lb).await?;

    let warm: Vec<(f64, f64)> = rss
        .iter()
        .copied()
        .filter(|(t, _)| *t >= warmup.as_secs_f64())
        .collect();
    let slope = slope_per_minute(&warm);
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let first_failures = tally.first_failures.lock().expect("tally lock").clone();
    let lists_received = lists.load(Ordering::Relaxed);

    println!("| soak ({streams} streams, {clients} clients, {churns} backend replacements, {warmup:?} warm-up + {duration:?}) | value |");
    println!("| --- | ---: |");
    println!("| calls ok / failed | {ok} / {failed} |");
    println!("| lists received by the idle streams | {lists_received} |");
    let rss_warm = warm.first().map(|(_, v)| *v as u64).unwrap_or(rss_end);
    println!("| LB RSS before load / after warm-up / at the end | {rss_start} / {rss_warm} / {rss_end} KiB |");
    println!("| LB RSS slope after warm-up | {slope:.1} KiB/min |");
    println!("| LB tasks before / after | {tasks_before} / {tasks_after} |");
    println!("| LB open fds before / after | {fds_before} / {fds_after} |");
    let stock_names: Vec<String> = stock
        .iter()
        .map(|b| format!("{} {}", b.kind, b.addr))
        .collect();
    println!(
        "| health transitions of the stock backends ({}) | {stock_worst:?} |",
        stock_names.join(", ")
    );
    println!("| etcd sessions lost | {etcd_reconnects} |");
    println!("| WARN lines in the LB's log | {} |", warn_lines.len());
    println!(
        "| gray-failure verdicts (ejections, holds, de-weightings) | {} |",
        gray_verdicts.len()
    );

    let mut problems = Vec::new();
    if failed > 0 {
        problems.push(format!("{failed} calls failed, first: {first_failures:?}"));
    }
    if ok == 0 {
        problems.push("no call succeeded".to_string());
    }
    if lists_received < streams as u64 * (churns / 2).max(1) {
        problems.push(format!(
            "idle streams received only {lists_received} lists for {churns} changes"
        ));
    }
    if slope > limits.max_rss_slope_kib_per_min {
        problems.push(format!(
            "RSS grows {slope:.1} KiB/min after warm-up (limit {})",
            limits.max_rss_slope_kib_per_min
        ));
    }
    if stock_worst.iter().any(|n| *n > 0) {
        problems.push(format!(
            "stock backends that never changed had health transitions: {stock_names:?} {stock_worst:?}"
        ));
    }
    if etcd_reconnects > 0.0 {
        problems.push(format!("the etcd session was lost {etcd_reconnects} times"));
    }
    if !warn_lines.is_empty() {
        problems.push(format!(
            "{} WARN lines in the LB's log, first: {:?}",
            warn_lines.len(),
            &warn_lines[..warn_lines.len().min(5)]
        ));
    }
    if !gray_verdicts.is_empty() {
        problems.push(format!(
            "{} gray-failure verdicts on healthy backends, first: {:?}",
            gray_verdicts.len(),
            &gray_verdicts[..gray_verdicts.len().min(5)]
        ));
    }
    // A count that could not be read (NaN) counts as a leak.
    let leaked = |before: f64, after: f64| {
        before.is_nan() || after.is_nan() || after > before + limits.leak_tolerance
    };
    if leaked(tasks_before, tasks_after) {
        problems.push(format!(
            "tasks leaked: {tasks_before} before, {tasks_after} after"
        ));
    }
    if leaked(fds_before, fds_after) {
        problems.push(format!(
            "descriptors leaked: {fds_before} before, {fds_after} after"
        ));
    }
    for g in live {
        g.shutdown(Duration::ZERO).await;
    }
    let result = json!({
        "bench": "soak", "warmup_s": warmup.as_secs_f64(), "duration_s": duration.as_secs_f64(), "rss_after_warmup_kib": rss_warm, "streams": streams, "clients": clients,
        "churns": churns, "calls_ok": ok, "calls_failed": failed, "first_failures": first_failures,
        "lists_received": lists_received, "rss_start_kib": rss_start, "rss_end_kib": rss_end,
        "rss_slope_kib_per_min": slope, "rss_samples": rss,
        "tasks_before": tasks_before, "tasks_after": tasks_after,
        "fds_before": fds_before, "fds_after": fds_after,
        "stock_backends": stock_names, "stock_transitions": stock_worst,
        "etcd_reconnects": etcd_reconnects, "warn_lines": warn_lines.len(),
        "gray_verdicts": gray_verdicts.len(), "problems": problems,
    });
    if !problems.is_empty() {
        eprintln!("{}", serde_json::to_string_pretty(&result)?);
        anyhow::bail!("soak failed: {}", problems.join("; "));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::slope_per_minute;

    #[test]
    fn slope_is_per_minute() {
        let flat: Vec<(f64, f64)> = (0..10).map(|t| (t as f64, 100.0)).collect();
        assert_eq!(slope_per_minute(&flat), 0.0);
        let rising: Vec<(f64, f64)> = (0..10).map(|t| (t as f64, 100.0 + t as f64)).collect();
        assert!((slope_per_minute(&rising) - 60.0).abs() < 1e-9);
    }
}
