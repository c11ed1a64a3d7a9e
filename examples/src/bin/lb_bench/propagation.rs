//! Registry change → every connected client's picker, beside the time etcd's
//! own watch took to deliver the same change.
//!
//! K `LbChannel`s (each its own BalanceLoad stream) in this process, an
//! in-process LB over a real etcd, one steady backend and one that is `put`
//! and `delete`d. For each change, every client waits on its picker: a put
//! counts once the new backend is *ready* in the picker (list received and
//! connection up), a delete once it is gone. A direct etcd watch on the key
//! times etcd's delivery.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_examples::greeter::GreeterOptions;
use lb_server::{Config, LbServer};
use serde_json::json;

use crate::measure::pct;
use crate::procs::{greeter_with, start_etcd};

/// Times (ms since the change) at which each client's picker reflected it:
/// `(listed, ready)`; for a removal both are the time it left the picker.
async fn picker_times(
    channels: &[LbChannel],
    addr: SocketAddr,
    present: bool,
    t0: Instant,
    mut receivers: Vec<tokio::sync::watch::Receiver<u64>>,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let waits = channels
        .iter()
        .zip(receivers.iter_mut())
        .map(|(ch, rx)| async move {
            let mut listed = None;
            loop {
                let now = t0.elapsed().as_secs_f64() * 1e3;
                if present && listed.is_none() && ch.listed_backends().contains(&addr) {
                    listed = Some(now);
                }
                if ch.ready_backends().contains(&addr) == present {
                    return Some((listed.unwrap_or(now), now));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        });
    let all = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(waits))
        .await
        .map_err(|_| anyhow::anyhow!("not every client saw the change within 30 s"))?;
    all.into_iter()
        .collect::<Option<Vec<(f64, f64)>>>()
        .ok_or_else(|| anyhow::anyhow!("a channel closed"))
}

/// Runs the propagation benchmark.
pub async fn propagation(clients: usize, samples: usize) -> anyhow::Result<serde_json::Value> {
    let (_etcd, endpoint) = start_etcd().await?;
    let mut cfg = Config::with_addrs("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?);
    cfg.registry.registry = vec![format!("etcd://{endpoint}")];
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
    let channels: Vec<LbChannel> = (0..clients)
        .map(|_| {
            LbChannel::builder("greeter")
                .lb(lb.lb_addr.to_string())
                .build()
        })
        .collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while channels.iter().any(|c| c.ready_backends().is_empty()) {
        anyhow::ensure!(Instant::now() < deadline, "clients did not all get a list");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let key = format!("/services/greeter/{}", mover.addr);
    let (mut put_all, mut del_all, mut watch_put, mut watch_del) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut put_last, mut del_last) = (Vec::new(), Vec::new());
    let (mut listed_all, mut listed_last) = (Vec::new(), Vec::new());
    eprintln!("propagation: {clients} clients, {samples} put/delete cycles");
    for _ in 0..samples {
        for present in [true, false] {
            let mut watch = etcd.watch(key.as_str(), None).await?;
            let _created = watch.message().await?;
            let receivers = channels.iter().map(|c| c.picker().subscribe()).collect();
            let t0 = Instant::now();
            if present {
                etcd.put(key.as_str(), mover.addr.to_string(), None).await?;
            } else {
                etcd.delete(key.as_str(), None).await?;
            }
            let clients_done = picker_times(&channels, mover.addr, present, t0, receivers);
            let watched = async {
                loop {
                    let m = watch
                        .message()
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
                    if !m.events().is_empty() {
                        return anyhow::Ok(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
            };
            let (times, watched) = tokio::join!(clients_done, watched);
            let (times, watched) = (times?, watched?);
            let last = |f: fn(&(f64, f64)) -> f64| times.iter().map(f).fold(0.0, f64::max);
            if present {
                listed_all.extend(times.iter().map(|t| t.0));
                listed_last.push(last(|t| t.0));
                put_all.extend(times.iter().map(|t| t.1));
                put_last.push(last(|t| t.1));
                watch_put.push(watched);
            } else {
                del_all.extend(times.iter().map(|t| t.1));
                del_last.push(last(|t| t.1));
                watch_del.push(watched);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for v in [
        &mut put_all,
        &mut del_all,
        &mut watch_put,
        &mut watch_del,
        &mut put_last,
        &mut del_last,
        &mut listed_all,
        &mut listed_last,
    ] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let row =
        |v: &Vec<f64>| json!({"p50": pct(v, 0.5), "p99": pct(v, 0.99), "max": v[v.len() - 1]});
    println!("| measure (ms; {clients} clients, {samples} changes each way) | p50 | p99 | max |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, v) in [
        ("etcd put → etcd watch event (baseline)", &watch_put),
        (
            "etcd put → a client has the backend in its list",
            &listed_all,
        ),
        (
            "etcd put → the last of all clients has it in its list",
            &listed_last,
        ),
        (
            "etcd put → a client's picker has the backend ready (incl. connect)",
            &put_all,
        ),
        ("etcd put → the last of all clients ready", &put_last),
        ("etcd delete → etcd watch event (baseline)", &watch_del),
        (
            "etcd delete → a client's picker dropped the backend",
            &del_all,
        ),
        (
            "etcd delete → the last of all clients dropped it",
            &del_last,
        ),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            pct(v, 0.5),
            pct(v, 0.99),
            v[v.len() - 1]
        );
    }
    drop(channels);
    lb.shutdown(Duration::from_secs(2)).await;
    Ok(json!({
        "bench": "propagation", "clients": clients, "samples": samples,
        "etcd_watch_put_ms": row(&watch_put), "put_listed_per_client_ms": row(&listed_all), "put_listed_last_client_ms": row(&listed_last), "put_per_client_ms": row(&put_all), "put_last_client_ms": row(&put_last),
        "etcd_watch_delete_ms": row(&watch_del), "delete_per_client_ms": row(&del_all), "delete_last_client_ms": row(&del_last),
    }))
}
