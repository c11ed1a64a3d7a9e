//! SIGKILL a backend: time until the LB's list drops it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_examples::greeter::GreeterOptions;
use lb_server::{Config, LbServer};
use serde_json::json;

use crate::measure::pct;
use crate::procs::greeter_with;

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
    cfg.panic_threshold = 0.0;
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
    let mut took = Vec::new();
    eprintln!("kill-removal: {samples} SIGKILLs, lease TTL {ttl:?} (panic mode off)");
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
        // Read the address, then keep draining stdout on the same thread.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if l.starts_with("LISTENING ") {
                    let _ = tx.send(l);
                }
            }
        });
        let line = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
            .await?
            .map_err(|_| anyhow::anyhow!("greeter did not start"))?;
        let addr: SocketAddr = line.trim_start_matches("LISTENING ").trim().parse()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while listed(addr) != Some(true) {
            anyhow::ensure!(Instant::now() < deadline, "backend never listed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let t0 = Instant::now();
        child.kill()?;
        while listed(addr) == Some(true) {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "killed backend never removed"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        took.push(t0.elapsed().as_secs_f64() * 1e3);
        let _ = child.wait();
    }
    took.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99, max) = (pct(&took, 0.5), pct(&took, 0.99), took[took.len() - 1]);
    println!("| measure ({samples} kills) | p50 | p99 | max |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| SIGKILL → gone from the LB's list (health check) | {p50:.1} ms | {p99:.1} ms | {max:.1} ms |");
    println!(
        "| lease TTL (baseline: removal without health checks) | {:.0} ms | | |",
        ttl.as_secs_f64() * 1e3
    );
    println!(
        "| ratio p99 / TTL | {:.4}x | | |",
        p99 / (ttl.as_secs_f64() * 1e3)
    );
    for g in steady {
        g.shutdown(Duration::ZERO).await;
    }
    lb.shutdown(Duration::from_secs(2)).await;
    Ok(
        json!({"bench": "kill_removal", "samples": samples, "p50_ms": p50, "p99_ms": p99, "max_ms": max, "ttl_ms": ttl.as_secs_f64() * 1e3}),
    )
}
