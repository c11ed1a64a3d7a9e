//! Registry change → every connected client's picker, beside the time etcd's
//! own watch took to deliver the same change; `lb-server` builds side by side.
//!
//! Per build: its own etcd, an `lb-server` process over it, and the clients
//! spread over several **client processes** of their own
//! (`lb-bench propagation-clients`, `--clients / --processes` `LbChannel`s
//! each, every channel with its own BalanceLoad stream), so that the
//! benchmark times the LB and not a reader sharing its process. Two
//! greeters run here: one steady, one that is `put` and `delete`d. The
//! builds take turns, change by change.
//!
//! One change: every client process subscribes to all its pickers and says
//! `ARMED`; the wall clock is read and the key is written; each process
//! answers with the wall-clock time at which each of its pickers reflected
//! it. A put counts once the new backend is in the picker's list and again
//! once it is *ready* (connection up); a delete once it is gone. Processes
//! on one machine share one wall clock, so the times compare. A direct etcd
//! watch on the key times etcd's own delivery.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lb_client::LbChannel;
use lb_examples::greeter::GreeterOptions;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

use crate::measure::{pct, process_cpu};
use crate::procs::{greeter_with, start_etcd, EtcdProcess, LbProcess};

/// Microseconds since the Unix epoch: the clock every process shares.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------- clients

/// The client side, run in a process of its own: `clients` channels to the
/// LB at `lb`, reporting when their pickers reflect changes of `backend`.
///
/// Reads `present 1` / `present 0` lines on stdin; for each, prints
/// `ARMED`, then `TIMES {"listed": [...], "ready": [...]}` (µs since the
/// epoch, one per channel). Ends at end of input.
pub async fn clients(lb: SocketAddr, clients: usize, backend: SocketAddr) -> anyhow::Result<()> {
    let channels: Vec<LbChannel> = (0..clients)
        .map(|_| LbChannel::builder("greeter").lb(lb.to_string()).build())
        .collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while channels.iter().any(|c| c.ready_backends().is_empty()) {
        anyhow::ensure!(Instant::now() < deadline, "clients did not all get a list");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = tokio::io::stdout();
    out.write_all(b"READY\n").await?;
    out.flush().await?;
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = commands.next_line().await? {
        let present = match line.trim() {
            "present 1" => true,
            "present 0" => false,
            other => anyhow::bail!("unknown command {other:?}"),
        };
        let receivers: Vec<_> = channels.iter().map(|c| c.picker().subscribe()).collect();
        out.write_all(b"ARMED\n").await?;
        out.flush().await?;
        let waits = channels
            .iter()
            .zip(receivers)
            .map(|(ch, rx)| reflected(ch, rx, backend, present));
        let times =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(waits)).await;
        let line = match times {
            Ok(times) => {
                let (listed, ready): (Vec<u64>, Vec<u64>) = times.into_iter().unzip();
                format!("TIMES {}\n", json!({"listed": listed, "ready": ready}))
            }
            Err(_) => "TIMEOUT\n".to_string(),
        };
        out.write_all(line.as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

/// When `ch`'s picker first listed `addr` and when it had it ready (for a
/// removal: both when it was gone), in µs since the epoch.
async fn reflected(
    ch: &LbChannel,
    mut rx: tokio::sync::watch::Receiver<u64>,
    addr: SocketAddr,
    present: bool,
) -> (u64, u64) {
    let mut listed = None;
    loop {
        let now = wall_us();
        if present && listed.is_none() && ch.listed_backends().contains(&addr) {
            listed = Some(now);
        }
        if ch.ready_backends().contains(&addr) == present {
            return (listed.unwrap_or(now), now);
        }
        if rx.changed().await.is_err() {
            // The channel closed: never reflected; counted as the limit.
            return (u64::MAX, u64::MAX);
        }
    }
}

// ----------------------------------------------------------------- parent

/// One client process: its input and its announcements.
struct ClientProcess {
    child: tokio::process::Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ClientProcess {
    async fn start(lb: SocketAddr, clients: usize, backend: SocketAddr) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["propagation-clients", "--lb", &lb.to_string()])
            .args(["--clients", &clients.to_string()])
            .args(["--backend", &backend.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        Ok(ClientProcess {
            child,
            stdin,
            lines,
        })
    }

    /// The next line, which must start with `word`; its remainder.
    async fn expect(&mut self, word: &str, limit: Duration) -> anyhow::Result<String> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("no {word} from a client process within {limit:?}"))??
            .ok_or_else(|| anyhow::anyhow!("a client process ended"))?;
        line.strip_prefix(word)
            .map(|rest| rest.trim().to_string())
            .ok_or_else(|| anyhow::anyhow!("client process said {line:?}, expected {word}"))
    }
}

/// One build under test: its etcd, its LB and its client processes.
struct Build {
    _etcd: EtcdProcess,
    etcd: etcd_client::Client,
    lb: LbProcess,
    procs: Vec<ClientProcess>,
    times: Times,
}

/// Everything measured for one build, in ms after the write.
#[derive(Default)]
struct Times {
    watch_put: Vec<f64>,
    watch_del: Vec<f64>,
    listed: Vec<f64>,
    listed_last: Vec<f64>,
    ready: Vec<f64>,
    ready_last: Vec<f64>,
    gone: Vec<f64>,
    gone_last: Vec<f64>,
    /// CPU (ms) the LB and the client processes spent per change, from
    /// the write until every client answered.
    lb_cpu: Vec<f64>,
    clients_cpu: Vec<f64>,
}

impl Build {
    async fn start(
        bin: &std::path::Path,
        steady: SocketAddr,
        mover: SocketAddr,
        clients: usize,
        processes: usize,
    ) -> anyhow::Result<Build> {
        let (etcd_proc, endpoint) = start_etcd().await?;
        let mut etcd = etcd_client::Client::connect([&endpoint], None).await?;
        etcd.put(
            format!("/services/greeter/{steady}"),
            steady.to_string(),
            None,
        )
        .await?;
        // The mover is deleted while it serves: removed at once, not kept
        // for the deregistration grace (the LB's default for a backend
        // whose entry vanishes while it passes health checks).
        let lb = LbProcess::start_bin_env(
            bin,
            &format!("etcd://{endpoint}"),
            "warn",
            &[],
            &[("LB_DEREGISTRATION_GRACE", "0s")],
        )
        .await?;
        let mut procs = Vec::new();
        for p in 0..processes {
            let n = clients / processes + usize::from(p < clients % processes);
            procs.push(ClientProcess::start(lb.addr, n, mover).await?);
        }
        for p in &mut procs {
            p.expect("READY", Duration::from_secs(90)).await?;
        }
        Ok(Build {
            _etcd: etcd_proc,
            etcd,
            lb,
            procs,
            times: Times::default(),
        })
    }

    /// Puts (`present`) or deletes the mover's key and records how long
    /// etcd's watch and every client took to see it.
    async fn change(&mut self, key: &str, mover: SocketAddr, present: bool) -> anyhow::Result<()> {
        let mut watch = self.etcd.watch(key, None).await?;
        let _created = watch.message().await?;
        let command = format!("present {}\n", u8::from(present));
        for p in &mut self.procs {
            p.stdin.write_all(command.as_bytes()).await?;
            p.stdin.flush().await?;
        }
        for p in &mut self.procs {
            p.expect("ARMED", Duration::from_secs(10)).await?;
        }
        let cpu = |b: &Build| {
            let clients: Duration = b
                .procs
                .iter()
                .filter_map(|p| p.child.id())
                .map(process_cpu)
                .sum();
            (process_cpu(b.lb.child.id()), clients)
        };
        let (lb_before, clients_before) = cpu(self);
        let t0 = wall_us();
        let started = Instant::now();
        if present {
            self.etcd.put(key, mover.to_string(), None).await?;
        } else {
            self.etcd.delete(key, None).await?;
        }
        let watched = loop {
            let m = watch
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
            if !m.events().is_empty() {
                break started.elapsed().as_secs_f64() * 1e3;
            }
        };
        let ms = |us: u64| us.saturating_sub(t0) as f64 / 1e3;
        let (mut listed, mut ready) = (Vec::new(), Vec::new());
        for p in &mut self.procs {
            let answer = p.expect("TIMES", Duration::from_secs(40)).await?;
            let v: serde_json::Value = serde_json::from_str(&answer)?;
            let field = |k: &str| -> Vec<f64> {
                v[k].as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_u64()).map(ms).collect())
                    .unwrap_or_default()
            };
            listed.extend(field("listed"));
            ready.extend(field("ready"));
        }
        let (lb_after, clients_after) = cpu(self);
        let last = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let t = &mut self.times;
        t.lb_cpu.push((lb_after - lb_before).as_secs_f64() * 1e3);
        t.clients_cpu
            .push((clients_after - clients_before).as_secs_f64() * 1e3);
        if present {
            t.watch_put.push(watched);
            t.listed_last.push(last(&listed));
            t.ready_last.push(last(&ready));
            t.listed.extend(listed);
            t.ready.extend(ready);
        } else {
            t.watch_del.push(watched);
            t.gone_last.push(last(&ready));
            t.gone.extend(ready);
        }
        Ok(())
    }
}

/// Runs the propagation benchmark on each `lb-server` build, the builds
/// taking turns change by change, and prints them side by side.
pub async fn propagation(
    bins: &[PathBuf],
    clients: usize,
    processes: usize,
    samples: usize,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        processes >= 1 && clients >= processes,
        "need clients >= processes >= 1"
    );
    let steady = greeter_with(GreeterOptions::default(), &[], "greeter").await?;
    let mover = greeter_with(GreeterOptions::default(), &[], "greeter").await?;
    let mut builds = Vec::new();
    for bin in bins {
        eprintln!(
            "propagation: starting {} with {clients} clients in {processes} processes",
            bin.display()
        );
        builds.push(Build::start(bin, steady.addr, mover.addr, clients, processes).await?);
    }
    let key = format!("/services/greeter/{}", mover.addr);
    for s in 0..samples {
        eprintln!("propagation: change {} of {samples}", s + 1);
        for present in [true, false] {
            for b in &mut builds {
                b.change(&key, mover.addr, present).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    let header: Vec<String> = bins.iter().map(|b| b.display().to_string()).collect();
    println!(
        "| ms after the write ({clients} clients in {processes} processes, {samples} changes each way; p50 / p99) | {} |",
        header.join(" | ")
    );
    println!("| --- |{}", " ---: |".repeat(bins.len()));
    let mut out = Vec::new();
    for b in &mut builds {
        let t = &mut b.times;
        for v in [
            &mut t.watch_put,
            &mut t.watch_del,
            &mut t.listed,
            &mut t.listed_last,
            &mut t.ready,
            &mut t.ready_last,
            &mut t.gone,
            &mut t.gone_last,
        ] {
            v.sort_by(|a, b| a.total_cmp(b));
        }
    }
    type Pick = fn(&Times) -> &Vec<f64>;
    let rows: [(&str, &str, Pick); 8] = [
        (
            "etcd put → etcd watch event (baseline)",
            "etcd_watch_put_ms",
            |t| &t.watch_put,
        ),
        (
            "etcd put → a client's picker lists the backend",
            "put_listed_per_client_ms",
            |t| &t.listed,
        ),
        (
            "etcd put → the last client lists it",
            "put_listed_last_client_ms",
            |t| &t.listed_last,
        ),
        (
            "etcd put → a client's picker has it ready (incl. connect)",
            "put_ready_per_client_ms",
            |t| &t.ready,
        ),
        (
            "etcd put → the last client has it ready",
            "put_ready_last_client_ms",
            |t| &t.ready_last,
        ),
        (
            "etcd delete → etcd watch event (baseline)",
            "etcd_watch_delete_ms",
            |t| &t.watch_del,
        ),
        (
            "etcd delete → a client's picker dropped the backend",
            "delete_per_client_ms",
            |t| &t.gone,
        ),
        (
            "etcd delete → the last client dropped it",
            "delete_last_client_ms",
            |t| &t.gone_last,
        ),
    ];
    for b in &builds {
        let mut m = serde_json::Map::new();
        for (_, key, pick) in rows {
            let v = pick(&b.times);
            m.insert(
                key.into(),
                json!({"p50": pct(v, 0.5), "p99": pct(v, 0.99), "max": v.last().copied().unwrap_or(f64::NAN)}),
            );
        }
        out.push(serde_json::Value::Object(m));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for (i, b) in builds.iter().enumerate() {
        out[i]["lb_cpu_ms_per_change"] = json!(mean(&b.times.lb_cpu));
        out[i]["clients_cpu_ms_per_change"] = json!(mean(&b.times.clients_cpu));
    }
    for (name, _, pick) in rows {
        let cells: Vec<String> = builds
            .iter()
            .map(|b| {
                let v = pick(&b.times);
                format!("{:.1} / {:.1}", pct(v, 0.5), pct(v, 0.99))
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let cpu_cells = |f: fn(&Times) -> &Vec<f64>| -> String {
        builds
            .iter()
            .map(|b| format!("{:.1}", mean(f(&b.times))))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!(
        "| CPU of the LB per change (ms) | {} |",
        cpu_cells(|t| &t.lb_cpu)
    );
    println!(
        "| CPU of the client processes per change (ms) | {} |",
        cpu_cells(|t| &t.clients_cpu)
    );
    Ok(json!({
        "bench": "propagation", "clients": clients, "processes": processes, "samples": samples,
        "builds": header, "results": out,
    }))
}
