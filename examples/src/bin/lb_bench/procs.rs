//! What benchmarks run against: an etcd process, lb-server processes,
//! in-process greeters, and the proxies (nginx, Envoy) of the baselines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lb_client::{Registration, RegistrationOptions};
use lb_examples::greeter::{GreeterOptions, RunningGreeter};
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
use tonic::transport::Endpoint;

/// An etcd process with a temporary data dir; killed when dropped.
pub struct EtcdProcess {
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

/// Sends `sig` to the process `pid` (one this program started).
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on the PID of a child this program started and has not reaped.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts etcd (`$ETCD_BIN` or `etcd` on PATH); returns it and its endpoint.
pub async fn start_etcd() -> anyhow::Result<(EtcdProcess, String)> {
    let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let (client, peer) = (free_port()?, free_port()?);
    // One data dir per etcd: a second etcd on the same dir would wait on
    // the first one's lock for ever.
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lb-bench-etcd-{}-{n}", std::process::id()));
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
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let probe = async {
            let mut c = etcd_client::Client::connect([&endpoint], None).await?;
            c.get("probe", None).await?;
            Ok::<(), etcd_client::Error>(())
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(500), probe).await {
            return Ok((etcd, endpoint));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("etcd did not come up within 20 s")
}

/// An `lb-server` process of this build; killed when dropped.
pub struct LbProcess {
    /// The process.
    pub child: std::process::Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its admin HTTP address.
    pub admin: SocketAddr,
    /// Its log (standard error), in the temporary directory.
    pub log: PathBuf,
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What a started process announces on `stdout` with `LISTENING <what>`
/// (its port or address), waited for at most `limit`; the rest of its
/// output is drained on a thread so that it never blocks on a full pipe.
pub async fn listening(
    stdout: std::process::ChildStdout,
    limit: Duration,
) -> anyhow::Result<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(what) = l.strip_prefix("LISTENING ") {
                let _ = tx.send(what.trim().to_string());
            }
        }
    });
    tokio::task::spawn_blocking(move || rx.recv_timeout(limit))
        .await?
        .map_err(|_| anyhow::anyhow!("no LISTENING line within {limit:?}"))
}

/// A backend process on a stock gRPC server (grpc-go, or C-core through
/// Python grpcio: `tests/interop/`), default settings; killed when dropped.
pub struct StockBackend {
    child: std::process::Child,
    /// Where it serves.
    pub addr: SocketAddr,
    /// `grpc-go` or `grpcio`.
    pub kind: &'static str,
    _registration: Option<Registration>,
}

impl Drop for StockBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl StockBackend {
    /// Runs `command` (which prints `LISTENING <port>`) and registers it as
    /// `service` in `registry` (`None`: not registered).
    pub async fn start(
        kind: &'static str,
        mut command: std::process::Command,
        registry: Option<&str>,
        service: &str,
    ) -> anyhow::Result<StockBackend> {
        let mut child = command
            .args(["--port", "0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start the {kind} backend: {e}"))?;
        let stdout = child.stdout.take().expect("stdout");
        let port = listening(stdout, Duration::from_secs(20))
            .await
            .map_err(|e| anyhow::anyhow!("the {kind} backend: {e}"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let registration = match registry {
            None => None,
            Some(registry) => {
                let r = Registration::start(
                    registry,
                    service,
                    &addr.to_string(),
                    RegistrationOptions::default(),
                )?;
                anyhow::ensure!(
                    r.wait_registered(Duration::from_secs(5)).await,
                    "the {kind} backend did not register"
                );
                Some(r)
            }
        };
        Ok(StockBackend {
            child,
            addr,
            kind,
            _registration: registration,
        })
    }
}

impl LbProcess {
    /// Starts `lb-server` over `registry` on free loopback ports. Every
    /// client of a benchmark comes from 127.0.0.1, so the per-peer caps are
    /// lifted: benchmarks measure capacity, not protection.
    pub async fn start(registry: &str) -> anyhow::Result<LbProcess> {
        let bin = std::env::current_exe()?.with_file_name("lb-server");
        Self::start_bin(&bin, registry).await
    }

    /// Like [`LbProcess::start`], running the `lb-server` binary at `bin`
    /// (another build, to compare side by side).
    pub async fn start_bin(bin: &std::path::Path, registry: &str) -> anyhow::Result<LbProcess> {
        Self::start_bin_with(bin, registry, "warn", &[]).await
    }

    /// Like [`LbProcess::start_bin`], logging at `log` and with `extra` flags.
    pub async fn start_bin_with(
        bin: &std::path::Path,
        registry: &str,
        log: &str,
        extra: &[&str],
    ) -> anyhow::Result<LbProcess> {
        Self::start_bin_env(bin, registry, log, extra, &[]).await
    }

    /// Like [`LbProcess::start_bin_with`], with extra environment variables
    /// (settings that older builds, compared side by side, simply ignore).
    pub async fn start_bin_env(
        bin: &std::path::Path,
        registry: &str,
        log: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<LbProcess> {
        anyhow::ensure!(
            bin.exists(),
            "{} not found: build it (cargo build --release --bins)",
            bin.display()
        );
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let level = log;
        let log = std::env::temp_dir().join(format!(
            "lb-bench-lb-server-{}-{}.log",
            std::process::id(),
            addr.port()
        ));
        let child = std::process::Command::new(bin)
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--registry", registry, "--log", level])
            .args(extra)
            .envs(env.iter().copied())
            .args(["--max-connections-per-peer", "1000000"])
            .args(["--max-streams-per-peer", "1000000"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let lb = LbProcess {
            child,
            addr,
            admin,
            log,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(lb);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("lb-server did not start")
    }

    /// The body of an admin GET of `path`.
    pub async fn get(&self, path: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.admin).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default())
    }

    /// The sum of every sample of the metric `name` (all label sets).
    pub async fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.get("/metrics").await?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = match rest.as_bytes().first()? {
                    b'{' => rest.split_once('}')?.1,
                    b' ' => rest,
                    _ => return None,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum())
    }

    /// Lines of its log at `level` (`WARN`, `ERROR`).
    pub fn log_lines(&self, level: &str) -> Vec<String> {
        let tag = format!(" {level} ");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&tag))
            .map(str::to_string)
            .collect()
    }

    /// The value of one sample of the LB's `/metrics` (e.g.
    /// `lb_runtime_tasks`), if present.
    pub async fn metric(&self, sample: &str) -> anyhow::Result<Option<f64>> {
        let text = self.get("/metrics").await?;
        Ok(text.lines().find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            rest.starts_with(' ').then(|| rest.trim().parse().ok())?
        }))
    }
}

/// Starts an in-process greeter behaving as `options`, registered as
/// `service` with the embedded registry of every LB in `lbs` (none: not
/// registered).
pub async fn greeter_with(
    options: GreeterOptions,
    lbs: &[SocketAddr],
    service: &str,
) -> anyhow::Result<RunningGreeter> {
    let lbs: Vec<String> = lbs.iter().map(|a| a.to_string()).collect();
    let registry = (!lbs.is_empty()).then(|| format!("lb://{}", lbs.join(",")));
    greeter_in(options, registry.as_deref(), service).await
}

/// Starts an in-process greeter behaving as `options`, registered as
/// `service` in `registry` (`etcd://…` or `lb://…`; `None`: not registered),
/// and waits until the registration is confirmed.
pub async fn greeter_in(
    options: GreeterOptions,
    registry: Option<&str>,
    service: &str,
) -> anyhow::Result<RunningGreeter> {
    greeter_registered(options, registry, service, RegistrationOptions::default()).await
}

/// Like [`greeter_in`], registered with `registration` (metadata, TTL).
pub async fn greeter_registered(
    options: GreeterOptions,
    registry: Option<&str>,
    service: &str,
    registration: RegistrationOptions,
) -> anyhow::Result<RunningGreeter> {
    // A deep accept queue: a benchmark's thousand clients connect at once,
    // and an overflowing queue costs a SYN retransmit (1 s), not the LB.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(4096)?;
    let mut refused = None;
    let g = RunningGreeter::start(listener, options, |addr| {
        let registry = registry?;
        Registration::start(registry, service, &addr.to_string(), registration.clone())
            .map_err(|e| refused = Some(e))
            .ok()
    })
    .await?;
    if let Some(e) = refused {
        anyhow::bail!("cannot register in {registry:?}: {e}");
    }
    anyhow::ensure!(
        g.wait_registered(Duration::from_secs(5)).await,
        "greeter did not register"
    );
    Ok(g)
}

/// An nginx process proxying gRPC (`grpc_pass`, round robin) to backends;
/// config and logs in a temporary directory; stopped when dropped.
pub struct Nginx {
    child: std::process::Child,
    dir: PathBuf,
    /// Where it listens (HTTP/2 cleartext).
    pub addr: SocketAddr,
}

impl Drop for Nginx {
    /// SIGTERM to the master (nginx's fast shutdown stops its workers),
    /// then SIGKILL to whatever of the master and its workers is left: a
    /// SIGKILLed master would leave its workers running.
    fn drop(&mut self) {
        let pid = self.child.id();
        let workers = crate::measure::children_of(pid);
        // SAFETY: kill(2) on the PID of the child we started and have not reaped.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            // Only the workers this master forked; gone already if it shut
            // down cleanly (the signal then finds no such process).
            // SAFETY: kill(2) with a PID read from /proc as a child of ours.
            unsafe {
                libc::kill(w as i32, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Nginx {
    /// Writes a config balancing over `backends` and starts nginx
    /// (`$NGINX_BIN`, else `nginx` on PATH, else `/usr/sbin/nginx`).
    pub async fn start(backends: &[SocketAddr]) -> anyhow::Result<Nginx> {
        let bin = std::env::var("NGINX_BIN").ok().or_else(|| {
            ["/usr/sbin/nginx", "/usr/bin/nginx"]
                .iter()
                .find(|p| std::path::Path::new(p).exists())
                .map(|p| p.to_string())
        });
        let bin = bin.ok_or_else(|| {
            anyhow::anyhow!(
                "nginx not found: install it (Debian: apt-get install nginx-light; scripts/setup does) or set NGINX_BIN"
            )
        })?;
        let dir = std::env::temp_dir().join(format!("lb-bench-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let servers: String = backends
            .iter()
            .map(|b| format!("        server {b};\n"))
            .collect();
        let d = dir.display();
        // Running as root, workers would drop to `nobody`; keep them as the
        // invoking user so they can use the temp dir.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n    access_log off;\n\
             \x20   client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
             \x20   upstream greeters {{\n{servers}        keepalive 256;\n        keepalive_requests 100000000;\n    }}\n\
             \x20   server {{\n        listen {addr} http2;\n        http2_max_concurrent_streams 1024;\n\
             \x20       keepalive_requests 100000000;\n        keepalive_timeout 600s;\n\
             \x20       location / {{ grpc_pass grpc://greeters; }}\n    }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = std::process::Command::new(&bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {bin}: {e}"))?;
        let nginx = Nginx { child, dir, addr };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(nginx);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
        anyhow::bail!("nginx did not start: {log}")
    }

    /// The master's PID (workers are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A real Envoy proxying gRPC to `greeter`'s backends, its clusters and
/// endpoints fed by the LB's xDS; stopped when dropped.
pub struct Envoy {
    child: std::process::Child,
    dir: PathBuf,
    /// Where it listens (HTTP/2 cleartext).
    pub addr: SocketAddr,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Envoy {
    /// Starts Envoy fed by the LB at `lb`; waits until its listener routes
    /// calls to `expect` backends.
    pub async fn start(lb: SocketAddr, expect: usize) -> anyhow::Result<Envoy> {
        let bin = lb_examples::envoy::binary()?;
        let dir = std::env::temp_dir().join(format!("lb-bench-envoy-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (listen, admin) = (free_port()?, free_port()?);
        std::fs::write(
            dir.join("envoy.yaml"),
            lb_examples::envoy::bootstrap(listen, admin, lb, "greeter"),
        )?;
        let log = std::fs::File::create(dir.join("envoy.log"))?;
        let child = std::process::Command::new(&bin)
            .arg("-c")
            .arg(dir.join("envoy.yaml"))
            .args(["--log-level", "warn", "--disable-hot-restart", "--base-id"])
            .arg(listen.to_string())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
        let envoy = Envoy {
            child,
            dir,
            addr: format!("127.0.0.1:{listen}").parse()?,
        };
        let channel = Endpoint::from_shared(format!("http://{}", envoy.addr))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut seen = std::collections::HashSet::new();
            if let Ok(ch) = channel.connect().await {
                let mut client = GreeterClient::new(ch);
                for _ in 0..30 {
                    if let Ok(r) = client
                        .say_hello(HelloRequest {
                            name: "warm".into(),
                        })
                        .await
                    {
                        seen.insert(r.into_inner().message);
                    }
                }
            }
            if seen.len() >= expect {
                return Ok(envoy);
            }
            if std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(envoy.dir.join("envoy.log")).unwrap_or_default();
                anyhow::bail!("Envoy never routed to {expect} backends: {log}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Envoy's PID (one process; its workers are threads).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Opens one BalanceLoad stream for `greeter` on `channel`; returns the
/// request sender (the stream stays open while it lives) and the answers.
pub async fn open_balance_stream(
    channel: tonic::transport::Channel,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<lb_proto::grpc::lb::v1::LoadBalanceRequest>,
    tonic::Streaming<lb_proto::grpc::lb::v1::LoadBalanceResponse>,
)> {
    use lb_proto::grpc::lb::v1::{
        load_balance_request::LoadBalanceRequestType, load_balancer_client::LoadBalancerClient,
        InitialLoadBalanceRequest, LoadBalanceRequest,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(LoadBalanceRequest {
        load_balance_request_type: Some(LoadBalanceRequestType::InitialRequest(
            InitialLoadBalanceRequest {
                name: "greeter".into(),
            },
        )),
    })
    .await?;
    let inbound = LoadBalancerClient::new(channel)
        .balance_load(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

/// Raises this process's open-file limit to its hard limit: benchmarks hold
/// thousands of connections (children started later inherit it).
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
