//! `lb-bench`: benchmarks of the load balancer, each measured side by side
//! with its baseline in one run.
//!
//! - `throughput`: unary echo calls/s through `LbChannel` (over 3 backends
//!   and over 1) vs a plain tonic `Channel` to one backend, alternating
//!   rounds so that machine noise hits both alike.
//! - `propagation`: `put` of a new backend in etcd → first call a connected
//!   client makes to it, next to the time etcd's own watch delivered the put.
//!   Starts its own etcd (`etcd` on PATH or `$ETCD_BIN`) and an in-process LB.
//! - `slow-backend`: four backends, one 20 ms slower and reporting high
//!   utilization: client latency through a load-aware LB vs a plain round
//!   robin LB over the same backends, alternating rounds.
//! - `kill-removal`: SIGKILL a backend process, time until the LB's
//!   published list no longer has it, beside the registration lease TTL.
//! - `failover`: N clients over two LB replicas (processes, over etcd); one
//!   replica is SIGKILLed (then, in a second round, stopped with SIGTERM):
//!   time until each of its clients has a stream on the survivor.
//!
//! Results are printed as a Markdown table and written as JSON (`--json`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use lb_client::{LbChannel, Registration, RegistrationOptions};
use lb_examples::greeter::{backend_of, GreeterOptions, RunningGreeter};
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use lb_server::{Config, LbServer};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::codegen::{Body, Bytes, StdError};

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "Benchmarks of the lookaside load balancer, each beside its baseline."
)]
struct Args {
    #[command(subcommand)]
    bench: Bench,
    /// Write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Bench {
    /// Unary calls/s: LbChannel (3 backends, 1 backend) vs tonic Channel (1 backend).
    Throughput {
        /// Calls in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Length of one measured round.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        round: Duration,
        /// Rounds per contender (alternated).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// etcd put → first call on the new backend, vs etcd's own watch delivery.
    Propagation {
        /// Number of put/delete cycles.
        #[arg(long, default_value_t = 20)]
        samples: usize,
    },
    /// One slow, busy backend of four: load-aware lists vs plain round robin.
    SlowBackend {
        /// Calls in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Length of one measured round.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        round: Duration,
        /// Rounds per contender (alternated).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// SIGKILL a backend, time until the LB's list drops it.
    KillRemoval {
        /// Number of kills.
        #[arg(long, default_value_t = 20)]
        samples: usize,
    },
    /// Kill one of two LB replicas: time until its clients are on the survivor.
    Failover {
        /// Connected clients (LbChannels, each with its own stream).
        #[arg(long, default_value_t = 1000)]
        clients: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let result = match args.bench {
        Bench::Throughput {
            concurrency,
            round,
            rounds,
        } => throughput(concurrency, round, rounds).await?,
        Bench::Propagation { samples } => propagation(samples).await?,
        Bench::SlowBackend {
            concurrency,
            round,
            rounds,
        } => slow_backend(concurrency, round, rounds).await?,
        Bench::KillRemoval { samples } => kill_removal(samples).await?,
        Bench::Failover { clients } => failover(clients).await?,
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Runs `concurrency` callers for `duration`; returns calls/s and p50, p99,
/// p99.9 latency (µs).
async fn load<T>(
    client: GreeterClient<T>,
    concurrency: usize,
    duration: Duration,
) -> (f64, u64, u64, u64)
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut client, stop, failures) = (client.clone(), stop.clone(), failures.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(100_000);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match client
                        .say_hello(HelloRequest {
                            name: "bench".into(),
                        })
                        .await
                    {
                        Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "calls failed during the benchmark"
    );
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    (all.len() as f64 / elapsed, pct(0.50), pct(0.99), pct(0.999))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn throughput(
    concurrency: usize,
    round: Duration,
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    let lb = LbServer::start(Config::with_addrs(
        "127.0.0.1:0".parse()?,
        "127.0.0.1:0".parse()?,
    ))
    .await?;
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(greeter_with(GreeterOptions::default(), &[lb.lb_addr], "greeter").await?);
    }
    let solo = greeter_with(GreeterOptions::default(), &[lb.lb_addr], "solo").await?;

    let lb3 = LbChannel::builder("greeter")
        .lb(lb.lb_addr.to_string())
        .build()?;
    let lb1 = LbChannel::builder("solo")
        .lb(lb.lb_addr.to_string())
        .build()?;
    anyhow::ensure!(
        lb3.ready_within(Duration::from_secs(5)).await
            && lb1.ready_within(Duration::from_secs(5)).await
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // all three connected
    let tonic1 = tonic::transport::Endpoint::from_shared(format!("http://{}", solo.addr))?
        .tcp_nodelay(true)
        .connect()
        .await?;

    let names = [
        "LbChannel, 3 backends",
        "LbChannel, 1 backend",
        "tonic Channel, 1 backend",
    ];
    let mut results: Vec<Vec<(f64, u64, u64, u64)>> = vec![Vec::new(); 3];
    eprintln!(
        "throughput: concurrency {concurrency}, {rounds} alternating rounds of {round:?} each"
    );
    // Warm-up, unmeasured.
    load(
        GreeterClient::new(lb3.clone()),
        concurrency,
        Duration::from_millis(500),
    )
    .await;
    for r in 0..rounds {
        results[0].push(load(GreeterClient::new(lb3.clone()), concurrency, round).await);
        results[1].push(load(GreeterClient::new(lb1.clone()), concurrency, round).await);
        results[2].push(load(GreeterClient::new(tonic1.clone()), concurrency, round).await);
        eprintln!(
            "  round {}: {:.0} / {:.0} / {:.0} calls/s",
            r + 1,
            results[0][r].0,
            results[1][r].0,
            results[2][r].0
        );
    }
    let baseline = median(results[2].iter().map(|x| x.0).collect());
    println!("| contender | calls/s (median) | p50 µs | p99 µs | ratio to tonic Channel |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut rows = Vec::new();
    for (name, runs) in names.iter().zip(&results) {
        let cps = median(runs.iter().map(|x| x.0).collect());
        let p50 = median(runs.iter().map(|x| x.1 as f64).collect());
        let p99 = median(runs.iter().map(|x| x.2 as f64).collect());
        println!(
            "| {name} | {cps:.0} | {p50:.0} | {p99:.0} | {:.2}x |",
            cps / baseline
        );
        rows.push(json!({"contender": name, "calls_per_s": cps, "p50_us": p50, "p99_us": p99, "ratio": cps / baseline}));
    }
    drop((lb3, lb1));
    for b in backends {
        b.shutdown(Duration::ZERO).await;
    }
    solo.shutdown(Duration::ZERO).await;
    lb.shutdown(Duration::from_secs(2)).await;
    Ok(
        json!({"bench": "throughput", "concurrency": concurrency, "round_s": round.as_secs_f64(), "rounds": rounds, "rows": rows}),
    )
}

struct EtcdProcess {
    child: std::process::Child,
    _dir: PathBuf,
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_etcd() -> anyhow::Result<(EtcdProcess, String)> {
    let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let (client, peer) = (free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("lb-bench-etcd-{}", std::process::id()));
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = std::process::Command::new(&bin)
        .args(["--name", "bench", "--data-dir"])
        .arg(&dir)
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args([
            "--initial-cluster",
            &format!("bench={peer_url}"),
            "--log-level",
            "error",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("cannot start {bin} (install etcd-server or set ETCD_BIN): {e}")
        })?;
    let etcd = EtcdProcess { child, _dir: dir };
    let endpoint = format!("127.0.0.1:{client}");
    for _ in 0..200 {
        if let Ok(mut c) = etcd_client::Client::connect([&endpoint], None).await {
            if c.get("probe", None).await.is_ok() {
                return Ok((etcd, endpoint));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("etcd did not come up")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn propagation(samples: usize) -> anyhow::Result<serde_json::Value> {
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

/// Starts an in-process greeter behaving as `options`, registered as
/// `service` with the embedded registry of every LB in `lbs` (none: not
/// registered).
async fn greeter_with(
    options: GreeterOptions,
    lbs: &[SocketAddr],
    service: &str,
) -> anyhow::Result<RunningGreeter> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let lbs: Vec<String> = lbs.iter().map(|a| a.to_string()).collect();
    let g = RunningGreeter::start(listener, options, |addr| {
        if lbs.is_empty() {
            return None;
        }
        Registration::embedded(
            lbs,
            service,
            &addr.to_string(),
            RegistrationOptions::default(),
        )
        .ok()
    })
    .await?;
    anyhow::ensure!(
        g.wait_registered(Duration::from_secs(5)).await,
        "greeter did not register"
    );
    Ok(g)
}

async fn slow_backend(
    concurrency: usize,
    round: Duration,
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut aware_cfg = Config::with_addrs(any, any);
    aware_cfg.weight_blackout = Duration::from_secs(1);
    aware_cfg.orca_interval = Duration::from_millis(200);
    aware_cfg.weight_update_period = Duration::from_millis(200);
    let mut plain_cfg = aware_cfg.clone();
    plain_cfg.orca = false;
    let aware = LbServer::start(aware_cfg).await?;
    let plain = LbServer::start(plain_cfg).await?;
    let lbs = [aware.lb_addr, plain.lb_addr];
    // Capacity model: utilization = measured qps / capacity. The slow
    // backend (+20 ms) has a small capacity, so under load it reports a
    // utilization far above 1.
    let mut backends = Vec::new();
    for i in 0..4 {
        let options = if i == 0 {
            GreeterOptions {
                delay: Duration::from_millis(20),
                capacity: Some(50.0),
                ..Default::default()
            }
        } else {
            GreeterOptions {
                capacity: Some(20_000.0),
                ..Default::default()
            }
        };
        backends.push(greeter_with(options, &lbs, "greeter").await?);
    }
    let slow_addr = backends[0].addr;
    let aware_ch = LbChannel::builder("greeter")
        .lb(aware.lb_addr.to_string())
        .build()?;
    let plain_ch = LbChannel::builder("greeter")
        .lb(plain.lb_addr.to_string())
        .build()?;
    anyhow::ensure!(
        aware_ch.ready_within(Duration::from_secs(5)).await
            && plain_ch.ready_within(Duration::from_secs(5)).await
    );
    eprintln!("slow-backend: 4 backends, {slow_addr} +20 ms; concurrency {concurrency}; warming up load weights");
    load(
        GreeterClient::new(aware_ch.clone()),
        concurrency,
        Duration::from_secs(3),
    )
    .await;
    let mut plain_runs = Vec::new();
    let mut aware_runs = Vec::new();
    for r in 0..rounds {
        plain_runs.push(load(GreeterClient::new(plain_ch.clone()), concurrency, round).await);
        aware_runs.push(load(GreeterClient::new(aware_ch.clone()), concurrency, round).await);
        eprintln!(
            "  round {}: plain p99 {} µs, load-aware p99 {} µs",
            r + 1,
            plain_runs[r].2,
            aware_runs[r].2
        );
    }
    let slow_share = {
        let list = aware
            .catalog
            .service("greeter")
            .map(|e| e.current_list())
            .expect("service");
        let port = slow_addr.port() as i32;
        list.servers.iter().filter(|s| s.port == port).count() as f64
            / list.servers.len().max(1) as f64
    };
    let summary = |runs: &[(f64, u64, u64, u64)]| {
        (
            median(runs.iter().map(|x| x.0).collect()),
            median(runs.iter().map(|x| x.1 as f64).collect()),
            median(runs.iter().map(|x| x.2 as f64).collect()),
            median(runs.iter().map(|x| x.3 as f64).collect()),
        )
    };
    let (pc, p50p, p99p, p999p) = summary(&plain_runs);
    let (ac, p50a, p99a, p999a) = summary(&aware_runs);
    println!("| lists | calls/s | p50 µs | p99 µs | p99.9 µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!("| plain round robin (baseline) | {pc:.0} | {p50p:.0} | {p99p:.0} | {p999p:.0} |");
    println!("| load-aware (ORCA weights) | {ac:.0} | {p50a:.0} | {p99a:.0} | {p999a:.0} |");
    println!(
        "| ratio load-aware / plain | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
        ac / pc,
        p50a / p50p,
        p99a / p99p,
        p999a / p999p
    );
    println!(
        "\nslow backend's share of the load-aware list: {:.1} %",
        slow_share * 100.0
    );
    drop((aware_ch, plain_ch));
    for b in backends {
        b.shutdown(Duration::ZERO).await;
    }
    aware.shutdown(Duration::from_secs(2)).await;
    plain.shutdown(Duration::from_secs(2)).await;
    Ok(json!({
        "bench": "slow_backend", "concurrency": concurrency, "rounds": rounds,
        "plain": {"calls_per_s": pc, "p50_us": p50p, "p99_us": p99p, "p999_us": p999p},
        "load_aware": {"calls_per_s": ac, "p50_us": p50a, "p99_us": p99a, "p999_us": p999a},
        "p99_ratio": p99a / p99p, "slow_share_of_list": slow_share,
    }))
}

async fn kill_removal(samples: usize) -> anyhow::Result<serde_json::Value> {
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

/// An `lb-server` process of this build; killed when dropped.
struct LbProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LbProcess {
    async fn start(registry: &str) -> anyhow::Result<LbProcess> {
        let bin = std::env::current_exe()?.with_file_name("lb-server");
        anyhow::ensure!(
            bin.exists(),
            "{} not found: build it (cargo build --release --bins)",
            bin.display()
        );
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin = format!("127.0.0.1:{}", free_port()?);
        let child = std::process::Command::new(bin)
            .args(["--listen", &addr.to_string(), "--admin-listen", &admin])
            .args(["--registry", registry, "--log", "warn"])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let lb = LbProcess { child, addr };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(lb);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("lb-server did not start")
    }
}

async fn failover(clients: usize) -> anyhow::Result<serde_json::Value> {
    let (_etcd, endpoint) = start_etcd().await?;
    let registry = format!("etcd://{endpoint}");
    let mut backends = Vec::new();
    for _ in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let registry = registry.clone();
        let g = RunningGreeter::start(listener, GreeterOptions::default(), |addr| {
            Registration::start(
                &registry,
                "greeter",
                &addr.to_string(),
                RegistrationOptions::default(),
            )
            .ok()
        })
        .await?;
        anyhow::ensure!(g.wait_registered(Duration::from_secs(5)).await);
        backends.push(g);
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
