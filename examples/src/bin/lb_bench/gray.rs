//! Gray failures three ways: no detection, the clients' own outlier
//! detection (gRFC A50 in stock gRPC C-core, configured through the
//! Cluster's `outlier_detection`, `--xds-outlier-detection`), and the LB's
//! detection over every client's pooled outcomes (`--gray-ejection`).
//!
//! Each run is one `lb-server` process over a real etcd, five stock grpc-go
//! backends (one failing a share of its calls with INTERNAL while its
//! health checks pass; INTERNAL because xDS routes retry UNAVAILABLE on
//! another backend, which would hide the failures from the count) and
//! stock gRPC C-core xDS clients (Python grpcio, one process each), which
//! log every call. From the clients' own logs:
//! - **time to eject**: from the first call of the run until the start of
//!   the first window of at least 5 s and 40 calls (so that chance alone
//!   misses a fifth of the backends with odds below 1 in 7,000) in
//!   which no client called the failing backend;
//! - **failed calls**: every call that failed, in the whole run;
//! - **false ejections** (a noisy run: every backend fails 2 % of calls):
//!   backends that went 5 s without a call while the clients called, and
//!   the LB's own count of ejections.
//!
//! The cases are the issue's: 20 clients at 1 call/s against a backend
//! failing 30 % of calls, and 10 clients at 5 calls/s (50 calls/s in all)
//! against one failing 5 % beside peers failing 0.5 %. A50 counts per
//! client, per 10 s interval and backend, and needs 100 calls there
//! (success rate) or 50 (failure percentage): these clients send a
//! backend 2 to 10. A third case is A50's own ground, to show it works
//! when it can: 3 clients at 100 calls/s (200 calls per backend per
//! interval each; three, because the pooled detector wants errors seen by
//! `--gray-min-clients` distinct clients) against the 30 % backend.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::procs::{start_etcd, LbProcess, StockBackend};

/// The LB's log in these runs: warnings and the detector's verdicts.
const GRAY_LOG: &str = "warn,lb_server::catalog::ejections=info";

/// What the stock peers are: the grpc-go backend and a Python with grpcio.
pub struct Peers {
    /// `target/go/bin/backend` (`tests/interop/go/build` makes it).
    pub grpc_go_backend: PathBuf,
    /// A Python with grpcio (`.venv/bin/python`).
    pub python: PathBuf,
}

/// One incident: who calls, how often, and how the backends fail.
struct Case {
    name: &'static str,
    clients: usize,
    interval: Duration,
    run: Duration,
    /// The failing backend's error rate.
    bad: f64,
    /// Every other backend's error rate.
    noise: f64,
}

/// Who decides.
#[derive(Clone, Copy)]
enum Mode {
    /// Nobody: the failing backend stays in every list.
    None,
    /// Each client for itself (gRFC A50 in C-core).
    A50,
    /// The LB, over every client's pooled outcomes.
    Pooled,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "no detection",
            Mode::A50 => "A50 in each client",
            Mode::Pooled => "LB, pooled",
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Mode::None => &["--gray-ejection", "false"],
            Mode::A50 => &[
                "--gray-ejection",
                "false",
                "--xds-outlier-detection",
                "true",
            ],
            Mode::Pooled => &[],
        }
    }
}

/// Every call of a run: (seconds since the run's first call, backend, ok).
struct Calls(Vec<(f64, String, bool)>);

impl Calls {
    /// From the clients' summaries (`events`: `[unix time, backend, ok]`).
    fn of(summaries: &[Value]) -> anyhow::Result<Calls> {
        let mut events = Vec::new();
        for s in summaries {
            let Some(e) = s["events"].as_array() else {
                anyhow::bail!("a client's summary has no events: {s}");
            };
            events.extend(e.iter().cloned());
        }
        let mut all: Vec<(f64, String, bool)> = events
            .iter()
            .filter_map(|e| {
                Some((
                    e.get(0)?.as_f64()?,
                    e.get(1)?.as_str()?.to_string(),
                    e.get(2)?.as_u64()? == 1,
                ))
            })
            .collect();
        let t0 = all.iter().map(|c| c.0).fold(f64::INFINITY, f64::min);
        for c in &mut all {
            c.0 -= t0;
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Calls(all))
    }

    /// Calls per whole second, per backend.
    fn per_second(&self) -> Vec<HashMap<&str, usize>> {
        let end = self.0.last().map_or(0, |c| c.0 as usize + 1);
        let mut out = vec![HashMap::new(); end];
        for (t, backend, _) in &self.0 {
            *out[*t as usize].entry(backend.as_str()).or_default() += 1;
        }
        out
    }

    /// The second of `backend`'s first call.
    fn first_call(&self, backend: &str) -> Option<usize> {
        self.0.iter().find(|c| c.1 == backend).map(|c| c.0 as usize)
    }

    /// The first second, from `from` on, from which `backend` had no call
    /// for at least 5 s and 40 calls to the others.
    fn out_from(&self, backend: &str, from: usize) -> Option<usize> {
        let seconds = self.per_second();
        (from..seconds.len()).find(|&s| {
            let mut calls = 0;
            for (i, m) in seconds[s..].iter().enumerate() {
                if m.contains_key(backend) {
                    return false;
                }
                calls += m.values().sum::<usize>();
                if i >= 4 && calls >= 40 {
                    return true;
                }
            }
            false
        })
    }

    fn failed(&self) -> usize {
        self.0.iter().filter(|c| !c.2).count()
    }
}

/// Runs `case` under `mode`; returns its row.
async fn run(
    peers: &Peers,
    registry: &str,
    service: &str,
    case: &Case,
    mode: Mode,
) -> anyhow::Result<Value> {
    let bin = std::env::current_exe()?.with_file_name("lb-server");
    let lb = LbProcess::start_bin_with(&bin, registry, GRAY_LOG, mode.flags()).await?;
    let mut backends = Vec::new();
    for i in 0..5 {
        let rate = if i == 2 { case.bad } else { case.noise };
        let mut cmd = std::process::Command::new(&peers.grpc_go_backend);
        if rate > 0.0 {
            cmd.args(["-fail-code", "13", "-fail-rate", &rate.to_string()]);
        }
        backends.push(StockBackend::start("grpc-go", cmd, Some(registry), service).await?);
    }
    let bad = backends[2].addr.to_string();
    let mut clients = Vec::new();
    for i in 0..case.clients {
        clients.push(
            tokio::process::Command::new(&peers.python)
                .arg(Path::new("tests/interop/xds_client.py"))
                .args(["--lb", &lb.addr.to_string(), "--name", service])
                .args(["--node-id", &format!("gray-{i}"), "--events"])
                .args(["--duration", &case.run.as_secs_f64().to_string()])
                .args(["--interval", &case.interval.as_secs_f64().to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start the grpcio xDS client: {e}"))?,
        );
    }
    let mut summaries = Vec::new();
    for c in clients {
        let out = tokio::time::timeout(case.run + Duration::from_secs(60), c.wait_with_output())
            .await
            .map_err(|_| anyhow::anyhow!("a grpcio xDS client did not finish"))??;
        let text = String::from_utf8_lossy(&out.stdout);
        let summary: Value = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| anyhow::anyhow!("a grpcio xDS client printed no summary: {text}"))?;
        anyhow::ensure!(
            summary.get("error").is_none(),
            "a grpcio xDS client failed: {summary}"
        );
        summaries.push(summary);
    }
    let calls = Calls::of(&summaries)?;
    let ejections = lb.metric_sum("lb_gray_ejections_total").await?;
    // Clients connect to the backends one by one as they start: a window
    // counts from the second every backend had its first call.
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let from = addrs
        .iter()
        .map(|a| calls.first_call(a).unwrap_or(0))
        .max()
        .unwrap_or(0);
    let mut silent: BTreeMap<&str, usize> = BTreeMap::new();
    for addr in &addrs {
        if let Some(s) = calls.out_from(addr, from) {
            silent.insert(addr, s);
        }
    }
    let to_bad = calls.0.iter().filter(|c| c.1 == bad).count();
    let failed_at_bad = calls.0.iter().filter(|c| c.1 == bad && !c.2).count();
    let row = json!({
        "case": case.name,
        "mode": mode.name(),
        "calls": calls.0.len(),
        "failed_calls": calls.failed(),
        "failed_at_the_failing_backend": failed_at_bad,
        "calls_to_the_failing_backend": to_bad,
        "time_to_eject_s": silent.get(bad.as_str()),
        "all_called_after_s": from,
        "backends_out_5s": silent.len(),
        "lb_ejections": ejections.max(0.0),
    });
    eprintln!("gray: {row}");
    Ok(row)
}

/// The benchmark: every case three ways, then the noisy run two ways
/// (`only`: just that case, 1-based, three ways).
pub async fn gray(
    peers: &Peers,
    noise_run: Duration,
    only: Option<usize>,
) -> anyhow::Result<Value> {
    let (_etcd, endpoint) = start_etcd().await?;
    let registry = format!("etcd://{endpoint}");
    let cases = [
        Case {
            name: "30 % errors, 20 clients × 1 call/s",
            clients: 20,
            interval: Duration::from_secs(1),
            run: Duration::from_secs(60),
            bad: 0.3,
            noise: 0.0,
        },
        Case {
            name: "5 % errors beside 0.5 %, 10 clients × 5 calls/s",
            clients: 10,
            interval: Duration::from_millis(200),
            run: Duration::from_secs(90),
            bad: 0.05,
            noise: 0.005,
        },
        Case {
            name: "30 % errors, 3 clients × 100 calls/s (A50's ground)",
            clients: 3,
            interval: Duration::from_millis(10),
            run: Duration::from_secs(60),
            bad: 0.3,
            noise: 0.0,
        },
    ];
    let mut rows = Vec::new();
    let mut n = 0;
    for (i, case) in cases.iter().enumerate() {
        if only.is_some_and(|o| o != i + 1) {
            continue;
        }
        for mode in [Mode::None, Mode::A50, Mode::Pooled] {
            n += 1;
            rows.push(run(peers, &registry, &format!("gray{n}"), case, mode).await?);
        }
    }
    let noisy = Case {
        name: "noise only: 2 % errors everywhere, 10 clients × 5 calls/s",
        clients: 10,
        interval: Duration::from_millis(200),
        run: noise_run,
        bad: 0.02,
        noise: 0.02,
    };
    for mode in [Mode::A50, Mode::Pooled] {
        if only.is_some() {
            break;
        }
        n += 1;
        rows.push(run(peers, &registry, &format!("gray{n}"), &noisy, mode).await?);
    }
    println!("| case | who decides | time to eject | failed calls (at the failing backend) | calls to the failing backend | backends out ≥ 5 s | LB ejections |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let eject = r["time_to_eject_s"]
            .as_u64()
            .map_or("never".to_string(), |s| format!("{s} s"));
        println!(
            "| {} | {} | {} | {} of {} ({}) | {} | {} | {} |",
            r["case"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            eject,
            r["failed_calls"],
            r["calls"],
            r["failed_at_the_failing_backend"],
            r["calls_to_the_failing_backend"],
            r["backends_out_5s"],
            r["lb_ejections"],
        );
    }
    Ok(json!({ "runs": rows }))
}
