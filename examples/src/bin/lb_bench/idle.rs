//! Idle: what an LB does when nothing happens, for several `lb-server`
//! builds side by side (say the previous release and this one).
//!
//! Each build gets its own etcd and its own two backends on stock gRPC
//! servers (grpc-go and C-core, default settings), listed under static keys
//! (no lease, so the only etcd client is the LB). All run at once, so they
//! share the machine's conditions. After a settle, over `window`, the run
//! counts per build: gRPC requests the LB made to etcd (from etcd's own
//! `grpc_server_started_total`, per method), health transitions
//! (`lb_health_transitions_total`), and WARN lines in the LB's log. The
//! right answer for all three is 0.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::procs::{start_etcd, EtcdProcess, LbProcess, StockBackend};
use crate::soak::StockPeers;

/// etcd's started-RPC counters, per method.
async fn etcd_requests(endpoint: &str) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(endpoint).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let mut per_method = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_started_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("grpc_method=\""))
            .map(|m| m.trim_end_matches('"').to_string())
            .unwrap_or_default();
        *per_method.entry(method).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(per_method)
}

struct Subject {
    bin: PathBuf,
    lb: LbProcess,
    endpoint: String,
    _etcd: EtcdProcess,
    _backends: Vec<StockBackend>,
}

async fn subject(bin: PathBuf, peers: &StockPeers) -> anyhow::Result<Subject> {
    let (etcd, endpoint) = start_etcd().await?;
    let backends = peers.start(None).await?;
    let mut client = etcd_client::Client::connect([&endpoint], None).await?;
    for b in &backends {
        client
            .put(
                format!("/services/greeter/{}", b.addr),
                b.addr.to_string(),
                None,
            )
            .await?;
    }
    let lb = LbProcess::start_bin(&bin, &format!("etcd://{endpoint}")).await?;
    Ok(Subject {
        bin,
        lb,
        endpoint,
        _etcd: etcd,
        _backends: backends,
    })
}

/// Runs every build in `bins` at once for `settle` + `window`.
pub async fn idle(
    bins: Vec<PathBuf>,
    peers: &StockPeers,
    settle: Duration,
    window: Duration,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(!bins.is_empty(), "give at least one --lb-server");
    let mut subjects = Vec::new();
    for bin in bins {
        subjects.push(subject(bin, peers).await?);
    }
    eprintln!(
        "idle: {} builds, {settle:?} settle + {window:?} window",
        subjects.len()
    );
    tokio::time::sleep(settle).await;
    let mut before = Vec::new();
    for s in &subjects {
        before.push((
            etcd_requests(&s.endpoint).await?,
            s.lb.metric_sum("lb_health_transitions_total").await?,
            s.lb.log_lines("WARN").len(),
        ));
    }
    tokio::time::sleep(window).await;
    let per_min = 60.0 / window.as_secs_f64();
    println!("| `lb-server` build ({window:?} idle, 2 stock backends, real etcd) | etcd requests / min | of which Range / Watch | health transitions / min | WARN lines / min |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut rows = Vec::new();
    for (s, (etcd_before, transitions_before, warns_before)) in subjects.iter().zip(before) {
        let etcd_after = etcd_requests(&s.endpoint).await?;
        let delta = |m: &str| {
            etcd_after.get(m).copied().unwrap_or(0.0) - etcd_before.get(m).copied().unwrap_or(0.0)
        };
        let total: f64 = etcd_after.keys().map(|m| delta(m)).sum();
        let transitions =
            s.lb.metric_sum("lb_health_transitions_total").await? - transitions_before;
        let warns = s.lb.log_lines("WARN").len() - warns_before;
        println!(
            "| {} | {:.1} | {:.1} / {:.1} | {:.1} | {:.1} |",
            s.bin.display(),
            total * per_min,
            delta("Range") * per_min,
            delta("Watch") * per_min,
            transitions * per_min,
            warns as f64 * per_min
        );
        rows.push(json!({
            "lb_server": s.bin.display().to_string(),
            "etcd_requests_per_min": total * per_min,
            "etcd_range_per_min": delta("Range") * per_min,
            "etcd_watch_per_min": delta("Watch") * per_min,
            "health_transitions_per_min": transitions * per_min,
            "warn_lines_per_min": warns as f64 * per_min,
        }));
    }
    Ok(json!({"bench": "idle", "window_s": window.as_secs_f64(), "builds": rows}))
}
