//! `lb-bench`: benchmarks of the load balancer, each measured side by side
//! with its baseline in one run.
//!
//! - `throughput`: unary echo calls/s through `LbChannel` (over 3 backends
//!   and over 1) vs a plain tonic `Channel` to one backend, alternating
//!   rounds so that machine noise hits both alike.
//! - `propagation`: `put` / `delete` of a backend in etcd → every connected
//!   client's picker (clients in processes of their own), next to the time
//!   etcd's own watch delivered it; `lb-server` builds side by side, each
//!   over its own etcd (`etcd` on PATH or `$ETCD_BIN`).
//! - `slow-backend`: four backends, one 20 ms slower and reporting high
//!   utilization: client latency through a load-aware LB vs a plain round
//!   robin LB over the same backends, alternating rounds.
//! - `kill-removal`: SIGKILL a backend process, time until the LB's
//!   published list no longer has it, beside the registration lease TTL.
//! - `fanout`: N idle streams on one LB process: its RSS per stream, and
//!   the time one list change takes to reach all of them.
//! - `failover`: N clients over two LB replicas (processes, over etcd); one
//!   replica is SIGKILLed (then, in a second round, stopped with SIGTERM):
//!   time until each of its clients has a stream on the survivor.
//! - `idle`: what LBs do when nothing happens, several `lb-server` builds
//!   side by side (each over its own etcd, two stock backends): etcd
//!   requests, health transitions and WARN lines per minute (all 0 is right).
//! - `zones`: skewed demand over three zones (60/30/10 % of the calls from
//!   zones with equal numbers of clients and backends): cross-zone traffic,
//!   max/mean backend load and client p99 for plain round robin, strict
//!   same-zone, Envoy-style host-count weighting and the LB's plan.
//! - `soak`: one LB over a real etcd under steady churn for a bounded time
//!   (streams, calling clients, a backend replaced every second, stock
//!   grpc-go and C-core backends kept throughout): no failed call, RSS flat
//!   after warm-up, no task or descriptor leak, no transition of the stock
//!   backends, no lost etcd session, no WARN line. Fails when a check fails.
//! - `gray`: a backend failing a share of calls while its health checks
//!   pass, three ways: no detection, gRFC A50 outlier detection in stock
//!   C-core clients, and the LB's pooled detection: time to eject, failed
//!   calls, and false ejections in a noisy run.
//! - `lrs`: the LB's CPU per report of per-backend outcomes (LRS, one
//!   locality per backend) from many clients, beside grpclb's per-service
//!   `client_stats` over the same streams.
//!
//! Results are printed as a Markdown table and written as JSON (`--json`).
//!
//! | module | job |
//! | --- | --- |
//! | [`measure`] | closed-loop load, percentiles, CPU accounting |
//! | [`procs`] | processes and in-process parts a benchmark runs: etcd, lb-server, nginx, greeters |
//! | one module per benchmark | `throughput`, `propagation`, `fanout`, `slow_backend`, `kill_removal`, `failover`, `soak`, `idle`, `zones`, `gray`, `lrs` |

mod failover;
mod fanout;
mod gray;
mod idle;
mod kill_removal;
mod lrs;
mod measure;
mod procs;
mod propagation;
mod scale;
mod slow_backend;
mod soak;
mod throughput;
mod zones;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

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
    /// Unary calls/s over 3 backends: LbChannel vs tonic balance_list vs nginx grpc_pass (and one plain Channel).
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
        /// Give every Rust client's call this deadline (`grpc-timeout`), to
        /// weigh what keeping it costs (default: none).
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
    /// etcd put/delete → every client's picker, vs etcd's own watch delivery (builds side by side).
    Propagation {
        /// Connected clients (LbChannels, each with its own stream).
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Client processes the clients are spread over.
        #[arg(long, default_value_t = 4)]
        processes: usize,
        /// Number of put/delete cycles.
        #[arg(long, default_value_t = 10)]
        samples: usize,
        /// An `lb-server` binary to run (repeat to compare builds; default: this build's).
        #[arg(long = "lb-server")]
        lb_servers: Vec<PathBuf>,
    },
    /// The client side of `propagation`, one process of several (started by it).
    #[command(hide = true)]
    PropagationClients {
        /// The LB's gRPC address.
        #[arg(long)]
        lb: std::net::SocketAddr,
        /// Channels in this process.
        #[arg(long)]
        clients: usize,
        /// The backend whose arrival and departure are timed.
        #[arg(long)]
        backend: std::net::SocketAddr,
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
    /// SIGKILL / SIGSTOP a backend: time until the LB's list drops it; SIGCONT: until it is back.
    KillRemoval {
        /// Number of kills.
        #[arg(long, default_value_t = 20)]
        samples: usize,
    },
    /// N idle streams on one LB process: RSS per stream, time to push a change to all.
    Fanout {
        /// Idle BalanceLoad streams.
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// Streams per HTTP/2 connection (1 = every stream its own client).
        #[arg(long, default_value_t = 1)]
        per_connection: usize,
        /// List changes pushed.
        #[arg(long, default_value_t = 5)]
        samples: usize,
        /// Stream protocol (repeat to compare BalanceLoad and ADS streams
        /// side by side on the same build).
        #[arg(long = "protocol", value_enum, default_values_t = [fanout::Protocol::Grpclb])]
        protocols: Vec<fanout::Protocol>,
        /// An `lb-server` binary to run (repeat to compare builds; default: this build's).
        #[arg(long = "lb-server")]
        lb_servers: Vec<PathBuf>,
    },
    /// Cost that grows with the catalog: a zone of dead backends, and a big etcd catalog (builds side by side).
    Scale {
        /// Services.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Backends per service.
        #[arg(long, default_value_t = 10)]
        per_service: usize,
        /// How long the dead zone is watched (from the LB's start).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        window: Duration,
        /// Puts (then as many deletes) timed on each etcd catalog.
        #[arg(long, default_value_t = 1000)]
        changes: usize,
        /// Only the dead zone (no etcd catalogs).
        #[arg(long)]
        dead_zone_only: bool,
        /// An `lb-server` binary to run (repeat to compare builds; default: this build's).
        #[arg(long = "lb-server")]
        lb_servers: Vec<PathBuf>,
    },
    /// Skewed demand over three zones: cross-zone traffic and backend load, four list strategies side by side.
    Zones {
        /// Length of one measured round.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        round: Duration,
        /// Rounds per contender (alternated).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Calls before each round's measurement (the plan measures demand).
        #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
        warmup: Duration,
    },
    /// Kill one of two LB replicas: time until its clients are on the survivor.
    Failover {
        /// Connected clients (LbChannels, each with its own stream).
        #[arg(long, default_value_t = 1000)]
        clients: usize,
    },
    /// What idle LBs do, builds side by side: etcd requests, health transitions, WARN lines per minute.
    Idle {
        /// An `lb-server` binary to run (repeat to compare builds; default: this build's).
        #[arg(long = "lb-server")]
        lb_servers: Vec<PathBuf>,
        /// Time before the window (first health checks, ORCA blackout).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// The measured window.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        window: Duration,
        #[command(flatten)]
        peers: StockPeerArgs,
    },
    /// Gray failures: no detection vs A50 in each client vs the LB's pooled detection.
    Gray {
        /// Length of the noisy run (every backend fails 2 %), per detector.
        #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
        noise_run: Duration,
        /// Only this case (1: 30 %, 2: 5 %, 3: A50's ground), without the noisy run.
        #[arg(long)]
        case: Option<usize>,
        #[command(flatten)]
        peers: StockPeerArgs,
    },
    /// LB CPU per LRS report (one locality per backend) vs per grpclb client_stats report.
    Lrs {
        /// Clients, each with a BalanceLoad and an LRS stream (100 per
        /// connection); at most 256 are remembered per backend.
        #[arg(long, default_value_t = 250)]
        streams: usize,
        /// Backends of the service, each a locality in every LRS report.
        #[arg(long, default_value_t = 20)]
        backends: usize,
        /// Length of each phase (quiet, grpclb reports, LRS reports).
        #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
        window: Duration,
        /// Rounds of the three phases.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// One LB under steady churn: no failed call, flat RSS, no task or fd leak.
    Soak {
        /// How long the measured load runs, after the warm-up (bounded; the
        /// run stops by itself).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Load before the measured window (RSS not fitted).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Idle BalanceLoad streams held open (100 per connection).
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        /// Clients calling continuously.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// A new backend registers and the oldest leaves this often.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        churn_every: Duration,
        /// Backends serving at any time.
        #[arg(long, default_value_t = 4)]
        backends: usize,
        /// Largest RSS growth after warm-up, KiB per minute.
        #[arg(long, default_value_t = 512.0)]
        max_rss_slope: f64,
        /// Tasks and descriptors allowed above the baseline at the end.
        #[arg(long, default_value_t = 2.0)]
        leak_tolerance: f64,
        #[command(flatten)]
        peers: StockPeerArgs,
    },
}

/// Where the stock backends come from (paths relative to the workspace).
#[derive(clap::Args)]
struct StockPeerArgs {
    /// The stock grpc-go backend (built by `tests/interop/go/build`).
    #[arg(long, default_value = "target/go/bin/backend")]
    grpc_go_backend: PathBuf,
    /// A Python with grpcio and grpcio-health-checking.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The stock C-core backend script.
    #[arg(long, default_value = "tests/interop/stock_backend.py")]
    grpcio_backend: PathBuf,
}

impl StockPeerArgs {
    fn peers(self) -> soak::StockPeers {
        soak::StockPeers {
            grpc_go_backend: self.grpc_go_backend,
            python: self.python,
            grpcio_backend: self.grpcio_backend,
        }
    }
}

/// The `--lb-server` builds to compare, or this build's own `lb-server`.
fn builds_or_this(mut builds: Vec<PathBuf>) -> anyhow::Result<Vec<PathBuf>> {
    if builds.is_empty() {
        builds.push(std::env::current_exe()?.with_file_name("lb-server"));
    }
    Ok(builds)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    procs::raise_fd_limit();
    let result = match args.bench {
        Bench::Throughput {
            concurrency,
            round,
            rounds,
            deadline,
        } => throughput::throughput(concurrency, round, rounds, deadline).await?,
        Bench::Propagation {
            clients,
            processes,
            samples,
            lb_servers,
        } => {
            let lb_servers = builds_or_this(lb_servers)?;
            propagation::propagation(&lb_servers, clients, processes, samples).await?
        }
        Bench::PropagationClients {
            lb,
            clients,
            backend,
        } => {
            propagation::clients(lb, clients, backend).await?;
            return Ok(());
        }
        Bench::SlowBackend {
            concurrency,
            round,
            rounds,
        } => slow_backend::slow_backend(concurrency, round, rounds).await?,
        Bench::Zones {
            round,
            rounds,
            warmup,
        } => zones::zones(round, rounds, warmup).await?,
        Bench::KillRemoval { samples } => kill_removal::kill_removal(samples).await?,
        Bench::Failover { clients } => failover::failover(clients).await?,
        Bench::Soak {
            duration,
            warmup,
            streams,
            clients,
            churn_every,
            backends,
            max_rss_slope,
            leak_tolerance,
            peers,
        } => {
            let limits = soak::SoakLimits {
                warmup,
                max_rss_slope_kib_per_min: max_rss_slope,
                leak_tolerance,
            };
            let peers = peers.peers();
            soak::soak(
                duration,
                streams,
                clients,
                churn_every,
                backends,
                &peers,
                limits,
            )
            .await?
        }
        Bench::Gray {
            noise_run,
            case,
            peers,
        } => {
            let peers = gray::Peers {
                grpc_go_backend: peers.grpc_go_backend,
                python: peers.python,
            };
            gray::gray(&peers, noise_run, case).await?
        }
        Bench::Lrs {
            streams,
            backends,
            window,
            rounds,
        } => lrs::lrs(streams, backends, window, rounds).await?,
        Bench::Idle {
            lb_servers,
            settle,
            window,
            peers,
        } => {
            let lb_servers = builds_or_this(lb_servers)?;
            idle::idle(lb_servers, &peers.peers(), settle, window).await?
        }
        Bench::Scale {
            services,
            per_service,
            window,
            changes,
            dead_zone_only,
            lb_servers,
        } => {
            let lb_servers = builds_or_this(lb_servers)?;
            scale::scale(
                &lb_servers,
                services,
                per_service,
                window,
                changes,
                dead_zone_only,
            )
            .await?
        }
        Bench::Fanout {
            streams,
            per_connection,
            samples,
            protocols,
            lb_servers,
        } => {
            let lb_servers = builds_or_this(lb_servers)?;
            fanout::fanout(&lb_servers, &protocols, streams, per_connection, samples).await?
        }
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
