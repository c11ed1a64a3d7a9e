//! Cost that grows with the catalog, builds side by side.
//!
//! - **A dead zone**: a file registry of `backends` backends in `services`
//!   services, none of which answers (nothing listens on their addresses:
//!   every connect is refused, as when a zone is gone). Per build: time from
//!   start to ready, then over a window: RSS, CPU used, log lines written,
//!   and how long the admin port takes to answer meanwhile.
//! - **A big etcd catalog**: the same sizes in a real etcd (plain layout),
//!   health checks off so that only the catalog's own work is measured:
//!   time from start to ready, RSS, and the LB's CPU per put and per delete,
//!   beside the same changes to a catalog of 10 services.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::measure::{median, process_cpu, rss_kib};
use crate::procs::{raise_fd_limit, start_etcd, LbProcess};

/// Address of dead backend `i`: its own loopback IP, a port nobody serves.
fn dead_addr(i: usize) -> String {
    format!("127.{}.{}.{}:9", 1 + i / 65536, (i / 256) % 256, i % 256)
}

/// Waits until the LB says it is ready; returns how long that took from `t0`.
async fn ready(lb: &LbProcess, t0: Instant, limit: Duration) -> anyhow::Result<Duration> {
    while t0.elapsed() < limit {
        if let Ok(body) = lb.get("/readyz").await {
            if serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|v| v["ready"] == json!(true))
            {
                return Ok(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("lb-server not ready within {limit:?}")
}

/// TCP connects this machine has attempted so far (`ActiveOpens` of
/// `/proc/net/snmp`): in the dead zone, the LB's probes are nearly all of them.
fn tcp_active_opens() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ActiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn log_line_count(lb: &LbProcess) -> usize {
    std::fs::read_to_string(&lb.log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// One build over the dead zone, watched for `window` from its start:
/// CPU and log lines in the first 30 s (registering and first probes) and
/// in the last 20 s (the outage has lasted), and the admin port's answer
/// times throughout.
async fn dead_zone(
    bin: &Path,
    file: &Path,
    services: usize,
    window: Duration,
) -> anyhow::Result<serde_json::Value> {
    let registry = format!("file://{}", file.display());
    let t0 = Instant::now();
    let lb = LbProcess::start_bin_with(bin, &registry, "info", &[]).await?;
    let pid = lb.child.id();
    let started = (Duration::ZERO, Duration::ZERO, 0, tcp_active_opens());
    let ready_in = ready(&lb, t0, Duration::from_secs(120)).await?;
    let early = Duration::from_secs(30).min(window);
    let late = window.saturating_sub(Duration::from_secs(20)).max(early);
    let mut admin_ms = Vec::new();
    let (mut at_early, mut at_late) = (None, None);
    while t0.elapsed() < window {
        let path = format!("/api/v1/services/svc-{}", admin_ms.len() % services);
        let asked = Instant::now();
        let body = lb.get(&path).await?;
        admin_ms.push(asked.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            serde_json::from_str::<serde_json::Value>(&body).is_ok(),
            "the admin port answered {path} with no JSON"
        );
        let sample = (
            t0.elapsed(),
            process_cpu(pid),
            log_line_count(&lb),
            tcp_active_opens(),
        );
        if at_early.is_none() && sample.0 >= early {
            at_early = Some(sample);
        }
        if at_late.is_none() && sample.0 >= late {
            at_late = Some(sample);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let end = (
        t0.elapsed(),
        process_cpu(pid),
        log_line_count(&lb),
        tcp_active_opens(),
    );
    let first = at_early.unwrap_or(end);
    let last = at_late.unwrap_or(first);
    type Sample = (Duration, Duration, usize, u64);
    let rate = |a: Sample, b: Sample| {
        let secs = (b.0 - a.0).as_secs_f64().max(1e-3);
        (
            b.1.saturating_sub(a.1).as_secs_f64() / secs,
            b.2.saturating_sub(a.2) as f64 * 30.0 / secs,
            b.3.saturating_sub(a.3) as f64 / secs,
        )
    };
    let (cores_early, lines_early, connects_early) = rate(started, first);
    let (cores_late, lines_late, connects_late) = rate(last, end);
    let cpu_us_per_connect = |cores: f64, connects: f64| cores * 1e6 / connects.max(1.0);
    let worst = admin_ms.iter().cloned().fold(0.0, f64::max);
    Ok(json!({
        "ready_s": ready_in.as_secs_f64(),
        "rss_kib": rss_kib(pid),
        "cores_busy_first_30s": cores_early,
        "cores_busy_last_20s": cores_late,
        "connects_per_s_first_30s": connects_early,
        "connects_per_s_last_20s": connects_late,
        "cpu_us_per_connect_first_30s": cpu_us_per_connect(cores_early, connects_early),
        "cpu_us_per_connect_last_20s": cpu_us_per_connect(cores_late, connects_late),
        "log_lines_first_30s": lines_early,
        "log_lines_per_30s_later": lines_late,
        "admin_median_ms": median(admin_ms),
        "admin_worst_ms": worst,
    }))
}

/// Writes `services × per_service` keys under `prefix` in etcd, 128 per txn.
async fn load_etcd(
    etcd: &mut etcd_client::Client,
    prefix: &str,
    services: usize,
    per_service: usize,
) -> anyhow::Result<()> {
    let mut ops = Vec::new();
    for i in 0..services * per_service {
        let key = format!("{prefix}svc-{}/b{}", i / per_service, i % per_service);
        ops.push(etcd_client::TxnOp::put(key, dead_addr(i), None));
        if ops.len() == 128 {
            etcd.txn(etcd_client::Txn::new().and_then(std::mem::take(&mut ops)))
                .await?;
        }
    }
    if !ops.is_empty() {
        etcd.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// LB CPU (ms) per change while `changes` run, less what it burns idle.
async fn cpu_per_change<F, Fut>(pid: u32, n: usize, mut change: F) -> anyhow::Result<f64>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let settle = Duration::from_secs(2);
    let idle0 = process_cpu(pid);
    tokio::time::sleep(settle).await;
    let idle = process_cpu(pid).saturating_sub(idle0);
    let busy0 = process_cpu(pid);
    let started = Instant::now();
    for i in 0..n {
        change(i).await?;
    }
    let spent = started.elapsed();
    tokio::time::sleep(settle).await;
    let busy = process_cpu(pid).saturating_sub(busy0);
    let idle_share = idle.as_secs_f64() * (spent + settle).as_secs_f64() / settle.as_secs_f64();
    Ok(((busy.as_secs_f64() - idle_share).max(0.0) * 1e3) / n as f64)
}

/// One build over an etcd catalog under `prefix` of `services` services.
async fn etcd_catalog(
    bin: &Path,
    endpoint: &str,
    prefix: &str,
    services: usize,
    changes: usize,
) -> anyhow::Result<serde_json::Value> {
    let registry = format!("etcd://{endpoint}");
    let t0 = Instant::now();
    let lb = LbProcess::start_bin_with(
        bin,
        &registry,
        "warn",
        &[
            "--etcd-prefix",
            prefix,
            "--health-checks",
            "false",
            "--cluster",
            "false",
        ],
    )
    .await?;
    let pid = lb.child.id();
    let ready_in = match ready(&lb, t0, Duration::from_secs(60)).await {
        Ok(t) => t,
        Err(_) => {
            let why = lb.log_lines("WARN").into_iter().last().unwrap_or_default();
            eprintln!("  not ready within 60 s; its last WARN line: {why}");
            return Ok(json!({"services": services, "ready_s": null, "not_ready": why}));
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(pid);
    let etcd = etcd_client::Client::connect([endpoint], None).await?;
    let key = |i: usize| format!("{prefix}svc-{}/new-{i}", i % services);
    let put_ms = cpu_per_change(pid, changes, |i| {
        let (mut etcd, key) = (etcd.clone(), key(i));
        async move {
            etcd.put(key, dead_addr(900_000 + i), None).await?;
            Ok(())
        }
    })
    .await?;
    let delete_ms = cpu_per_change(pid, changes, |i| {
        let (mut etcd, key) = (etcd.clone(), key(i));
        async move {
            etcd.delete(key, None).await?;
            Ok(())
        }
    })
    .await?;
    Ok(json!({
        "services": services,
        "ready_s": ready_in.as_secs_f64(),
        "rss_kib": rss,
        "cpu_ms_per_put": put_ms,
        "cpu_ms_per_delete": delete_ms,
    }))
}

/// Runs both parts for each build and prints them side by side.
pub async fn scale(
    bins: &[PathBuf],
    services: usize,
    per_service: usize,
    window: Duration,
    changes: usize,
    dead_zone_only: bool,
) -> anyhow::Result<serde_json::Value> {
    raise_fd_limit();
    let backends = services * per_service;
    let file = std::env::temp_dir().join(format!("lb-bench-dead-zone-{}.json", std::process::id()));
    let zone: serde_json::Map<String, serde_json::Value> = (0..services)
        .map(|s| {
            let addrs: Vec<String> = (0..per_service)
                .map(|b| dead_addr(s * per_service + b))
                .collect();
            (format!("svc-{s}"), json!(addrs))
        })
        .collect();
    std::fs::write(&file, serde_json::to_vec(&zone)?)?;

    let etcd = if dead_zone_only {
        None
    } else {
        let (etcd_proc, endpoint) = start_etcd().await?;
        let mut etcd = etcd_client::Client::connect([&endpoint], None).await?;
        eprintln!("scale: writing {backends} keys to etcd");
        load_etcd(&mut etcd, "/big/", services, per_service).await?;
        load_etcd(&mut etcd, "/small/", 10, per_service).await?;
        Some((etcd_proc, endpoint))
    };

    let mut runs = Vec::new();
    for bin in bins {
        eprintln!("scale: dead zone with {}", bin.display());
        let dead = dead_zone(bin, &file, services, window).await?;
        let Some((_, endpoint)) = &etcd else {
            runs.push(json!({ "dead_zone": dead }));
            continue;
        };
        eprintln!("scale: etcd catalogs with {}", bin.display());
        let big = etcd_catalog(bin, endpoint, "/big/", services, changes).await?;
        let small = etcd_catalog(bin, endpoint, "/small/", 10, changes).await?;
        runs.push(json!({"dead_zone": dead, "etcd_big": big, "etcd_small": small}));
    }
    let _ = std::fs::remove_file(&file);

    let header: Vec<String> = bins.iter().map(|b| b.display().to_string()).collect();
    println!(
        "| measure ({backends} backends in {services} services) | {} |",
        header.join(" | ")
    );
    println!("|---|{}", "---:|".repeat(bins.len()));
    let rows: [(&str, &str, &str, &str); 18] = [
        ("dead zone: start → ready", "dead_zone", "ready_s", "s"),
        ("dead zone: RSS at the end", "dead_zone", "rss_kib", "KiB"),
        (
            "dead zone: cores busy, first 30 s",
            "dead_zone",
            "cores_busy_first_30s",
            "",
        ),
        (
            "dead zone: cores busy, last 20 s",
            "dead_zone",
            "cores_busy_last_20s",
            "",
        ),
        (
            "dead zone: probe connects per s, first 30 s",
            "dead_zone",
            "connects_per_s_first_30s",
            "",
        ),
        (
            "dead zone: probe connects per s, last 20 s",
            "dead_zone",
            "connects_per_s_last_20s",
            "",
        ),
        (
            "dead zone: LB CPU per probe connect, first 30 s",
            "dead_zone",
            "cpu_us_per_connect_first_30s",
            "µs",
        ),
        (
            "dead zone: LB CPU per probe connect, last 20 s",
            "dead_zone",
            "cpu_us_per_connect_last_20s",
            "µs",
        ),
        (
            "dead zone: log lines, first 30 s",
            "dead_zone",
            "log_lines_first_30s",
            "",
        ),
        (
            "dead zone: log lines per 30 s, last 20 s",
            "dead_zone",
            "log_lines_per_30s_later",
            "",
        ),
        (
            "dead zone: admin answer, median",
            "dead_zone",
            "admin_median_ms",
            "ms",
        ),
        (
            "dead zone: admin answer, worst",
            "dead_zone",
            "admin_worst_ms",
            "ms",
        ),
        (
            "etcd, big catalog: start → ready",
            "etcd_big",
            "ready_s",
            "s",
        ),
        ("etcd, big catalog: RSS", "etcd_big", "rss_kib", "KiB"),
        (
            "etcd, big catalog: LB CPU per put",
            "etcd_big",
            "cpu_ms_per_put",
            "ms",
        ),
        (
            "etcd, big catalog: LB CPU per delete",
            "etcd_big",
            "cpu_ms_per_delete",
            "ms",
        ),
        (
            "etcd, 10 services: LB CPU per put",
            "etcd_small",
            "cpu_ms_per_put",
            "ms",
        ),
        (
            "etcd, 10 services: LB CPU per delete",
            "etcd_small",
            "cpu_ms_per_delete",
            "ms",
        ),
    ];
    for (label, part, key, unit) in rows {
        let cells: Vec<String> = runs
            .iter()
            .map(|r| match r[part][key].as_f64() {
                Some(v) => format!("{v:.3} {unit}"),
                None if r.get(part).is_none() => "not run".to_string(),
                None => "never ready".to_string(),
            })
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
    Ok(
        json!({"bench": "scale", "builds": header, "services": services, "per_service": per_service, "runs": runs}),
    )
}
