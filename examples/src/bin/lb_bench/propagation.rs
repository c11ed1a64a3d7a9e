//! Registry change → clients, beside etcd's own watch delivery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_examples::greeter::{backend_of, GreeterOptions};
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_server::{Config, LbServer};
use serde_json::json;

use crate::measure::pct;
use crate::procs::{greeter_with, start_etcd};

pub async fn propagation(samples: usize) -> anyhow::Result<serde_json::Value> {
    let (_etcd, endpoint) = start_etcd().await?;
    let mut cfg = Config::with_addrs("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?);
    cfg.registry = format!("etcd://{endpoint}");
    let lb = LbServer::start(cfg).await?;
    let mut etcd = etcd_client::Client::connect([&endpoint], None).await?;

    // One backend always present, one that comes and goes.
    let steady = greeter_with(GreeterOptions::default(), &[], "greeter").await?;
    let mover = greeter_with(GreeterOptions::default(), &[], "greeter").await?;
    etcd.put(
        format!("/services/greeter/{}", steady.addr),
        steady.addr.to_string(),
        None,
    )
    .await?;
    let channel = LbChannel::builder("greeter")
        .lb(lb.lb_addr.to_string())
        .build()?;
    anyhow::ensure!(
        channel.ready_within(Duration::from_secs(5)).await,
        "no list"
    );

    // A client calling continuously (at most one call in flight, ~every 200 µs).
    let seen: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mover_addr = mover.addr.to_string();
    let caller = {
        let (seen, stop, mover_addr, mut client) = (
            seen.clone(),
            stop.clone(),
            mover_addr.clone(),
            GreeterClient::new(channel.clone()),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = client.say_hello(HelloRequest { name: "p".into() }).await {
                    if backend_of(&r.into_inner().message) == mover_addr {
                        seen.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                }
            }
        })
    };

    let mut watcher = etcd.clone();
    let mut to_client = Vec::new();
    let mut to_watch = Vec::new();
    let key = format!("/services/greeter/{}", mover.addr);
    eprintln!("propagation: {samples} put/delete cycles");
    for _ in 0..samples {
        let mut watch = watcher.watch(key.as_str(), None).await?;
        let _created = watch.message().await?;
        *seen.lock().unwrap() = None;
        let t0 = Instant::now();
        etcd.put(key.as_str(), mover_addr.as_str(), None).await?;
        let watched = loop {
            let m = watch
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
            if !m.events().is_empty() {
                break t0.elapsed();
            }
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let arrived = loop {
            if let Some(t) = *seen.lock().unwrap() {
                break t.duration_since(t0);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "client never called the new backend"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        to_watch.push(watched.as_secs_f64() * 1e3);
        to_client.push(arrived.as_secs_f64() * 1e3);
        etcd.delete(key.as_str(), None).await?;
        let gone = Instant::now() + Duration::from_secs(5);
        while channel.ready_backends().contains(&mover.addr) && Instant::now() < gone {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = caller.await;
    to_client.sort_by(|a, b| a.total_cmp(b));
    to_watch.sort_by(|a, b| a.total_cmp(b));
    println!("| measure (ms, {samples} samples) | p50 | p99 | max |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, v) in [
        ("etcd put → etcd watch event (baseline)", &to_watch),
        (
            "etcd put → client's first call on the new backend",
            &to_client,
        ),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            pct(v, 0.5),
            pct(v, 0.99),
            v[v.len() - 1]
        );
    }
    lb.shutdown(Duration::from_secs(2)).await;
    Ok(json!({
        "bench": "propagation",
        "samples": samples,
        "etcd_watch_ms": {"p50": pct(&to_watch, 0.5), "p99": pct(&to_watch, 0.99), "max": to_watch[to_watch.len()-1]},
        "first_call_ms": {"p50": pct(&to_client, 0.5), "p99": pct(&to_client, 0.99), "max": to_client[to_client.len()-1]},
    }))
}
