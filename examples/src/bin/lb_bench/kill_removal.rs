//! SIGKILL a backend: time until the LB's list drops it (a broken `Watch`
//! stream). SIGSTOP a backend (hung: sockets open, nothing answers): time
//! until the list drops it (the `Check` heartbeat goes unanswered), and
//! after SIGCONT, time until it is listed again. The baseline of both is the
//! lease TTL: without health checks a dead or hung backend stays listed
//! until its registration expires.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_examples::greeter::GreeterOptions;
use lb_server::{Config, LbServer};
use serde_json::json;

use crate::measure::pct;
use crate::procs::greeter_with;
use crate::procs::{listening, signal};

pub async fn kill_removal(samples: usize) -> anyhow::Result<serde_json::Value> {
    let greeter_bin = std::env::current_exe()?.with_file_name("greeter-server");
    anyhow::ensure!(
        greeter_bin.exists(),
        "{} not found: build it (cargo build --release --bins)",
        greeter_bin.display()
    );
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut cfg = Config::with_addrs(any, any);
    // Killed backends stay registered until their lease expires; at one kill
    // every few ms they soon outnumber the live ones, and panic mode (rightly)
    // lists everyone. Panic mode is off here so each kill is measured alone.
    cfg.policy.panic_threshold = 0.0;
    let lb = LbServer::start(cfg).await?;
    // Steady backends keep the service non-empty.
    let mut steady = Vec::new();
    for _ in 0..2 {
        steady.push(greeter_with(GreeterOptions::default(), &[lb.lb_addr], "greeter").await?);
    }
    let listed = |addr: SocketAddr| {
        lb.catalog.service("greeter").map(|e| {
            let list = e.current_list();
            list.servers
                .iter()
                .any(|s| s.port == addr.port() as i32 && s.ip_address == [127, 0, 0, 1])
        })
    };
    let ttl = Duration::from_secs(10);
    let (mut took, mut stopped, mut resumed) = (Vec::new(), Vec::new(), Vec::new());
    eprintln!(
        "kill-removal: {samples} SIGSTOP/SIGCONT/SIGKILL, lease TTL {ttl:?} (panic mode off)"
    );
    for _ in 0..samples {
        let mut child = std::process::Command::new(&greeter_bin)
            .args([
                "--registry",
                &format!("lb://{}", lb.lb_addr),
                "--ttl",
                "10s",
                "--log",
                "error",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().expect("stdout");
        let addr: SocketAddr = listening(stdout, Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("greeter did not start: {e}"))?
            .parse()?;
        let wait_for = |want: bool, what: &'static str, limit: Duration| async move {
            let t0 = Instant::now();
            while listed(addr) != Some(want) {
                anyhow::ensure!(t0.elapsed() < limit, "{what} within {limit:?}");
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            Ok::<f64, anyhow::Error>(t0.elapsed().as_secs_f64() * 1e3)
        };
        wait_for(true, "backend listed", Duration::from_secs(5)).await?;
        // Hung: stopped, then continued.
        let pid = child.id() as i32;
        signal(pid, libc::SIGSTOP);
        stopped.push(wait_for(false, "stopped backend removed", Duration::from_secs(30)).await?);
        signal(pid, libc::SIGCONT);
        resumed.push(
            wait_for(
                true,
                "continued backend listed again",
                Duration::from_secs(30),
            )
            .await?,
        );
        // Dead.
        child.kill()?;
        took.push(wait_for(false, "killed backend removed", Duration::from_secs(30)).await?);
        let _ = child.wait();
    }
    for v in [&mut took, &mut stopped, &mut resumed] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let summary = |v: &[f64]| (pct(v, 0.5), pct(v, 0.99), v[v.len() - 1]);
    let (p50, p99, max) = summary(&took);
    let (stop50, stop99, stop_max) = summary(&stopped);
    let (cont50, cont99, cont_max) = summary(&resumed);
    println!(
        "| measure ({samples} backends, each stopped, continued, then killed) | p50 | p99 | max |"
    );
    println!("| --- | ---: | ---: | ---: |");
    println!("| SIGKILL → gone from the LB's list (broken Watch) | {p50:.1} ms | {p99:.1} ms | {max:.1} ms |");
    println!("| SIGSTOP → gone from the LB's list (unanswered Check heartbeat) | {stop50:.1} ms | {stop99:.1} ms | {stop_max:.1} ms |");
    println!("| SIGCONT → listed again | {cont50:.1} ms | {cont99:.1} ms | {cont_max:.1} ms |");
    println!(
        "| lease TTL (baseline: removal without health checks) | {:.0} ms | | |",
        ttl.as_secs_f64() * 1e3
    );
    let ttl_ms = ttl.as_secs_f64() * 1e3;
    println!(
        "| ratio p99 / TTL: SIGKILL, SIGSTOP | {:.4}x, {:.3}x | | |",
        p99 / ttl_ms,
        stop99 / ttl_ms
    );
    for g in steady {
        g.shutdown(Duration::ZERO).await;
    }
    lb.shutdown(Duration::from_secs(2)).await;
    Ok(
        json!({"bench": "kill_removal", "samples": samples, "p50_ms": p50, "p99_ms": p99, "max_ms": max,
            "sigstop_p50_ms": stop50, "sigstop_p99_ms": stop99, "sigstop_max_ms": stop_max,
            "sigcont_p50_ms": cont50, "sigcont_p99_ms": cont99, "sigcont_max_ms": cont_max,
            "ttl_ms": ttl_ms}),
    )
}
