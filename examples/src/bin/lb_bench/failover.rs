//! Stop one of two LB replicas: time until its clients are on the survivor.

use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_examples::greeter::GreeterOptions;
use serde_json::json;

use crate::measure::pct;
use crate::procs::{greeter_in, start_etcd, LbProcess};

pub async fn failover(clients: usize) -> anyhow::Result<serde_json::Value> {
    let (_etcd, endpoint) = start_etcd().await?;
    let registry = format!("etcd://{endpoint}");
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(greeter_in(GreeterOptions::default(), Some(&registry), "greeter").await?);
    }
    let mut rows = Vec::new();
    println!("| replica stopped by | its clients (of {clients}) | p50 | p99 | max | clients that lost their list |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for signal in [libc::SIGKILL, libc::SIGTERM] {
        let mut a = LbProcess::start(&registry).await?;
        let b = LbProcess::start(&registry).await?;
        let mut channels = Vec::with_capacity(clients);
        for _ in 0..clients {
            channels.push(
                LbChannel::builder("greeter")
                    .lbs([a.addr.to_string(), b.addr.to_string()])
                    .build()?,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while channels
            .iter()
            .any(|c| c.ready_backends().len() < 3 || c.current_lb().is_none())
        {
            anyhow::ensure!(Instant::now() < deadline, "clients did not all connect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let on_a: Vec<&LbChannel> = channels
            .iter()
            .filter(|c| c.current_lb() == Some(a.addr))
            .collect();
        eprintln!(
            "failover: {} of {clients} clients on the replica to stop",
            on_a.len()
        );
        let t0 = Instant::now();
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe {
            libc::kill(a.child.id() as i32, signal);
        }
        let mut moved: Vec<Option<f64>> = vec![None; on_a.len()];
        let mut lost_list = 0usize;
        let mut lost = vec![false; on_a.len()];
        while moved.iter().any(Option::is_none) {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "clients did not all move"
            );
            for (i, c) in on_a.iter().enumerate() {
                if !lost[i] && c.ready_backends().is_empty() {
                    lost[i] = true;
                    lost_list += 1;
                }
                if moved[i].is_none() && c.current_lb() == Some(b.addr) {
                    moved[i] = Some(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = a.child.wait();
        let mut took: Vec<f64> = moved.into_iter().flatten().collect();
        took.sort_by(|x, y| x.total_cmp(y));
        let how = if signal == libc::SIGKILL {
            "SIGKILL"
        } else {
            "SIGTERM (graceful, 1 s spread)"
        };
        let (p50, p99, max) = (pct(&took, 0.5), pct(&took, 0.99), took[took.len() - 1]);
        println!(
            "| {how} | {} | {p50:.0} ms | {p99:.0} ms | {max:.0} ms | {lost_list} |",
            took.len()
        );
        rows.push(json!({"stop": how, "clients_moved": took.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max, "lost_list": lost_list}));
        drop(channels);
        drop(b);
    }
    for g in backends {
        g.shutdown(Duration::ZERO).await;
    }
    Ok(json!({"bench": "failover", "clients": clients, "rows": rows}))
}
