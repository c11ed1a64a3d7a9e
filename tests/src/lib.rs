//! Harness for the multi-process integration tests.
//!
//! Everything is real and local: an etcd server started from `etcd` on PATH
//! (or `$ETCD_BIN`) with a temporary data dir, `lb-server` and
//! `greeter-server` processes built from this workspace, all on loopback
//! ports chosen at run time. Every process is started by the harness and
//! stopped by PID when its handle is dropped. Process output goes to log
//! files under `target/test-logs/`.
//!
//! | item | job |
//! | --- | --- |
//! | [`Etcd`] | one etcd member: start, kill, restart, put/delete |
//! | [`Lb`] | one `lb-server` process and its admin endpoint |
//! | [`Greeter`] | one `greeter-server` process |
//! | [`Caller`] | calls in the background, counting where each went |
//! | [`http_get`] | a minimal HTTP GET for the admin port |
//! | [`certs`] | a CA and certificates made at test time |
//! | [`dns`] | a DNS server serving a zone the test rewrites |
//! | [`zookeeper`] | a ZooKeeper server from Debian's package |
//! | [`consul`] | a stand-in for a Consul agent's HTTP API |
//! | [`stock`] | stock gRPC peers: grpc-go and C-core backends, grpclb clients |

pub mod certs;
pub mod consul;
pub mod dns;
pub mod stock;
pub mod zookeeper;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_client::LbChannel;
use lb_examples::greeter::backend_of;
use lb_proto::helloworld::{greeter_client::GreeterClient, HelloRequest};

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Directory of this workspace's built binaries (`target/<profile>`).
pub(crate) fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary; fails loudly if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found. Build the binaries first: `cargo build --workspace --bins` (scripts/test does this).",
        path.display()
    );
    path
}

/// Path of the etcd server binary; fails loudly with a fix-it message.
pub fn etcd_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "ETCD_BIN={} does not exist", p.display());
        return p;
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "etcd not found on PATH and ETCD_BIN is not set. Install it (Debian: `apt-get install etcd-server`), \
             set ETCD_BIN=/path/to/etcd, or run scripts/test, which installs it."
        )
    })
}

fn log_file(name: &str) -> (std::fs::File, PathBuf) {
    let dir = bin_dir().join("..").join("test-logs");
    std::fs::create_dir_all(&dir).expect("create test-logs dir");
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{name}-{}-{n}.log", std::process::id()));
    (std::fs::File::create(&path).expect("create log file"), path)
}

/// A child process stopped (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    /// Where its output goes.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, stdout_piped: bool) -> Proc {
        let (log, path) = log_file(name);
        cmd.stderr(log.try_clone().expect("clone log"));
        cmd.stdout(if stdout_piped {
            Stdio::piped()
        } else {
            Stdio::from(log)
        });
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            child: Some(child),
            log: path,
            name: name.to_string(),
        }
    }

    /// Takes the piped standard output of a process started with it piped.
    pub(crate) fn child_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, signal);
            }
        }
    }

    /// SIGTERM, then wait up to `limit` for exit (SIGKILL after that).
    pub fn terminate(&mut self, limit: Duration) {
        if self.child.is_none() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not exit within {limit:?} of SIGTERM; killing",
            self.name
        );
        self.kill();
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `cond` holds, checking every 10 ms, at most `limit`.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One etcd member on loopback with a temporary data dir.
pub struct Etcd {
    /// TLS and credentials, when this member serves clients over TLS.
    pub secure: Option<SecureEtcd>,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    name: String,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
}

impl Etcd {
    /// Starts a one-member etcd and waits until it answers.
    pub async fn start() -> Etcd {
        let mut etcd = Self::members(1).pop().expect("one member");
        etcd.launch().await;
        etcd
    }

    /// Starts a one-member etcd serving clients over TLS only, demanding a
    /// client certificate signed by `pki`'s CA.
    pub async fn start_secure(pki: &certs::Pki) -> Etcd {
        let mut etcd = Self::members(1).pop().expect("one member");
        etcd.secure = Some(SecureEtcd {
            ca: pki.ca.clone(),
            server_cert: pki.server_cert.clone(),
            server_key: pki.server_key.clone(),
            client_cert: pki.client_cert.clone(),
            client_key: pki.client_key.clone(),
            user: None,
        });
        etcd.launch().await;
        etcd
    }

    /// Turns on etcd authentication with a `root` user of this password;
    /// the harness's own client logs in from then on.
    pub async fn enable_auth(&mut self, password: &str) {
        let mut c = self.client().await;
        c.user_add("root", password, None)
            .await
            .expect("add root user");
        c.user_grant_role("root", "root")
            .await
            .expect("grant root role");
        c.auth_enable().await.expect("enable auth");
        if let Some(s) = &mut self.secure {
            s.user = Some(("root".into(), password.into()));
        }
    }

    fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        let s = self.secure.as_ref()?;
        let read = |p: &PathBuf| std::fs::read(p).expect("read PEM");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&s.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&s.client_cert),
                read(&s.client_key),
            ));
        let mut options = etcd_client::ConnectOptions::new().with_tls(tls);
        if let Some((user, password)) = &s.user {
            options = options.with_user(user.clone(), password.clone());
        }
        Some(options)
    }

    /// Starts an `n`-member etcd cluster and waits until every member answers.
    pub async fn start_cluster(n: usize) -> Vec<Etcd> {
        let mut members = Self::members(n);
        for m in &mut members {
            m.spawn();
        }
        for m in &members {
            m.wait_up().await;
        }
        members
    }

    fn members(n: usize) -> Vec<Etcd> {
        let mut members: Vec<Etcd> = (0..n)
            .map(|i| Etcd {
                proc: None,
                dir: tempfile::tempdir().expect("temp dir"),
                name: format!("m{i}"),
                secure: None,
                client_port: free_port(),
                peer_port: free_port(),
                initial_cluster: String::new(),
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial.clone();
        }
        members
    }

    /// The `--registry` value naming every member of a cluster.
    pub fn cluster_url(members: &[Etcd]) -> String {
        let endpoints: Vec<String> = members.iter().map(Etcd::endpoint).collect();
        format!("etcd://{}", endpoints.join(","))
    }

    async fn launch(&mut self) {
        self.spawn();
        self.wait_up().await;
    }

    fn spawn(&mut self) {
        let scheme = if self.secure.is_some() {
            "https"
        } else {
            "http"
        };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_bin());
        cmd.args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-token",
                "lb-test",
                "--log-level",
                "warn",
            ]);
        if let Some(s) = &self.secure {
            cmd.arg("--cert-file")
                .arg(&s.server_cert)
                .arg("--key-file")
                .arg(&s.server_key)
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&s.ca);
        }
        self.proc = Some(Proc::spawn("etcd", cmd, false));
    }

    /// Waits until this member answers a read (which needs a quorum).
    async fn wait_up(&self) {
        let up = async {
            loop {
                if let Ok(mut c) =
                    etcd_client::Client::connect([self.endpoint()], self.connect_options()).await
                {
                    if c.get("probe", None).await.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let log = self
            .proc
            .as_ref()
            .map(|p| p.log.display().to_string())
            .unwrap_or_default();
        tokio::time::timeout(Duration::from_secs(20), up)
            .await
            .unwrap_or_else(|_| panic!("etcd did not come up within 20 s; see {log}"));
    }

    /// `host:port` of the client URL.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The `--registry` value for this etcd.
    pub fn registry_url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    /// SIGKILLs etcd (its data stays).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// A client.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], self.connect_options())
            .await
            .expect("connect etcd")
    }

    /// Writes `key = value`.
    pub async fn put(&self, key: &str, value: &str) {
        self.client()
            .await
            .put(key, value, None)
            .await
            .expect("etcd put");
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) {
        self.client()
            .await
            .delete(key, None)
            .await
            .expect("etcd delete");
    }
}

/// TLS material and credentials of a secure etcd member.
#[derive(Debug, Clone)]
pub struct SecureEtcd {
    /// CA of servers and clients.
    pub ca: PathBuf,
    /// etcd's certificate.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// The certificate clients present.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// User and password once authentication is on.
    pub user: Option<(String, String)>,
}

/// One `lb-server` process.
pub struct Lb {
    /// The process.
    pub proc: Proc,
    /// gRPC address.
    pub addr: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// How the admin port is reached over TLS, when it serves TLS.
    admin_tls: Option<AdminTls>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Lb {
    /// Starts `lb-server` with `args` (listen addresses are added) and waits
    /// until its admin port answers `/healthz`.
    pub async fn start(args: &[&str]) -> Lb {
        Self::start_with_env(args, &[]).await
    }

    /// Like [`Lb::start`], with extra environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Lb {
        Self::start_full(args, env, None).await
    }

    /// Like [`Lb::start`] for an LB serving its admin port over TLS (its
    /// `args` carry the `--admin-tls-*` flags); the harness's admin
    /// requests use `admin_tls`.
    pub async fn start_admin_tls(args: &[&str], admin_tls: AdminTls) -> Lb {
        Self::start_full(args, &[], Some(admin_tls)).await
    }

    async fn start_full(args: &[&str], env: &[(&str, &str)], admin_tls: Option<AdminTls>) -> Lb {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_on(
            addr,
            admin,
            admin_tls,
            args.iter().map(|s| s.to_string()).collect(),
            env,
        )
        .await
    }

    async fn start_on(
        addr: SocketAddr,
        admin: SocketAddr,
        admin_tls: Option<AdminTls>,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Lb {
        let mut cmd = Command::new(bin("lb-server"));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string());
        cmd.args(&args)
            .env("LB_LOG", "info,lb_server=debug")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn("lb-server", cmd, false);
        let lb = Lb {
            proc,
            addr,
            admin,
            admin_tls,
            args,
            env,
        };
        let log = lb.proc.log.display().to_string();
        assert!(
            wait_until(Duration::from_secs(10), || lb
                .try_request("GET", "/healthz", &[], b"")
                .map(|r| r.0 == 200)
                .unwrap_or(false))
            .await,
            "lb-server did not answer /healthz within 10 s; see {log}"
        );
        lb
    }

    /// An LB with the embedded registry, answering names under `.svc.test`
    /// and asking clients for stats every 200 ms; `extra` flags are added.
    pub async fn embedded(extra: &[&str]) -> Lb {
        let mut args = vec![
            "--registry",
            "memory",
            "--domain-suffix",
            ".svc.test",
            "--client-stats-interval",
            "200ms",
        ];
        args.extend_from_slice(extra);
        Self::start(&args).await
    }

    /// Starts it again on the same ports after it was killed.
    pub async fn relaunch(self) -> Lb {
        let (addr, admin, tls, args, env) = (
            self.addr,
            self.admin,
            self.admin_tls.clone(),
            self.args.clone(),
            self.env,
        );
        drop(self.proc);
        Self::start_on(addr, admin, tls, args, env).await
    }

    /// Stops it gracefully and starts it again on the same ports.
    pub async fn restart(self) -> Lb {
        let (addr, admin, tls, args, env) = (
            self.addr,
            self.admin,
            self.admin_tls.clone(),
            self.args.clone(),
            self.env,
        );
        let mut proc = self.proc;
        proc.terminate(Duration::from_secs(10));
        Self::start_on(addr, admin, tls, args, env).await
    }

    /// GET on the admin port: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_request("GET", path, &[], b"")
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// A request to the admin port, over TLS when it serves TLS.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, String)> {
        match &self.admin_tls {
            None => http_request(self.admin, method, path, headers, body),
            Some(tls) => https_request(self.admin, tls, method, path, headers, body),
        }
    }

    /// Waits until `/readyz` answers 200 (every registry source listed);
    /// panics with the LB's explanation after `limit`.
    pub async fn wait_ready(&self, limit: Duration) {
        let ready = wait_until(limit, || self.get("/readyz").0 == 200).await;
        assert!(
            ready,
            "LB not ready after {limit:?}: {}",
            self.get("/readyz").1
        );
    }

    /// Whether the LB's catalog holds a backend at `addr` for `service`
    /// (listed or not: what its registry says).
    pub fn knows_backend(&self, service: &str, addr: SocketAddr) -> bool {
        self.get(&format!("/api/v1/services/{service}"))
            .1
            .contains(&format!("\"address\":\"{addr}\""))
    }

    /// The sum of every sample of the metric `name` (all label sets), e.g.
    /// `lb_upstream_reconnects_total`; 0 if absent.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = if rest.starts_with('{') {
                    rest.split_once('}')?.1
                } else if rest.starts_with(' ') {
                    rest
                } else {
                    return None;
                };
                value.trim().parse::<f64>().ok()
            })
            .sum()
    }

    /// Lines of the LB's log written at `level` (`WARN`, `ERROR`) so far.
    pub fn log_lines(&self, level: &str) -> Vec<String> {
        let text = std::fs::read_to_string(&self.proc.log).unwrap_or_default();
        let tag = format!(" {level} ");
        text.lines()
            .filter(|l| l.contains(&tag))
            .map(str::to_string)
            .collect()
    }

    /// The value of one Prometheus sample, e.g.
    /// `lb_registry_rejects_total{source="etcd",kind="bad_value"}`; 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    }
}

/// A minimal HTTP GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], b"")
}

/// A minimal HTTP/1.0 request (so the body is never chunked): (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    exchange(connect(addr)?, addr, method, path, headers, body)
}

/// A TCP connection for one request: 2 s to connect, 5 s per read.
fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Client TLS settings for an admin port: what to trust and present.
pub type AdminTls = Arc<tokio_rustls::rustls::ClientConfig>;

/// Admin-port TLS from lb-client's settings (HTTP/1.1 by ALPN).
pub fn admin_tls(tls: &lb_client::TlsConfig) -> AdminTls {
    let mut config = (*tls.rustls().expect("client TLS")).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// [`http_request`] over TLS, verifying the server as `localhost`.
pub fn https_request(
    addr: SocketAddr,
    tls: &AdminTls,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use tokio_rustls::rustls;
    let tcp = connect(addr)?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(std::io::Error::other)?;
    exchange(
        rustls::StreamOwned::new(conn, tcp),
        addr,
        method,
        path,
        headers,
        body,
    )
}

fn exchange(
    mut s: impl Read + Write,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        // A TLS peer closing without close_notify: the answer is complete
        // anyway (HTTP/1.0, connection closed).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        other => {
            other?;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// One `greeter-server` process.
pub struct Greeter {
    /// The process.
    pub proc: Proc,
    /// Where it serves.
    pub addr: SocketAddr,
    registered: Arc<AtomicBool>,
    serving: Arc<AtomicBool>,
    watchers: Arc<std::sync::atomic::AtomicUsize>,
}

impl Greeter {
    /// Starts a greeter registering with `registry` (`etcd://…`, `lb://…`,
    /// `none`); extra flags in `args`. Waits until it serves.
    pub async fn start(registry: &str, args: &[&str]) -> Greeter {
        Self::start_on("127.0.0.1:0", registry, args).await
    }

    /// Like [`Greeter::start`], on a given address.
    pub async fn start_on(listen: &str, registry: &str, args: &[&str]) -> Greeter {
        Self::start_with_env(listen, registry, args, &[]).await
    }

    /// Like [`Greeter::start_on`], with extra environment variables.
    pub async fn start_with_env(
        listen: &str,
        registry: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Greeter {
        let mut cmd = Command::new(bin("greeter-server"));
        cmd.args(["--listen", listen, "--registry", registry, "--log", "info"])
            .args(args)
            .envs(env.iter().copied());
        let mut proc = Proc::spawn("greeter", cmd, true);
        let stdout = proc
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        let registered = Arc::new(AtomicBool::new(false));
        let serving = Arc::new(AtomicBool::new(true));
        let flag = registered.clone();
        let health = serving.clone();
        let watchers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let watching = watchers.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("LISTENING ") {
                    let _ = tx.send(addr.trim().parse().expect("LISTENING address"));
                } else if line.trim() == "REGISTERED" {
                    flag.store(true, Ordering::SeqCst);
                } else if let Some(n) = line.strip_prefix("HEALTH_WATCHERS ") {
                    watching.store(n.trim().parse().unwrap_or(0), Ordering::SeqCst);
                } else if let Some(status) = line.strip_prefix("HEALTH ") {
                    health.store(status.trim() == "SERVING", Ordering::SeqCst);
                }
            }
        });
        let log = proc.log.display().to_string();
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
            .await
            .expect("join")
            .unwrap_or_else(|_| panic!("greeter did not start within 10 s; see {log}"));
        Greeter {
            proc,
            addr,
            registered,
            serving,
            watchers,
        }
    }

    /// Health `Watch` streams open on this greeter now (as it last printed).
    pub fn health_watchers(&self) -> usize {
        self.watchers.load(Ordering::SeqCst)
    }

    /// Flips the greeter's reported health (SIGUSR1) and waits until it
    /// confirms the new status; returns it (true = serving).
    pub async fn toggle_health(&self) -> bool {
        let before = self.serving.load(Ordering::SeqCst);
        self.proc.signal(libc::SIGUSR1);
        assert!(
            wait_until(Duration::from_secs(5), || self
                .serving
                .load(Ordering::SeqCst)
                != before)
            .await,
            "greeter did not confirm its health toggle"
        );
        !before
    }

    /// Whether the greeter reported its registration as confirmed.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
    }

    /// Waits until registered.
    pub async fn wait_registered(&self, limit: Duration) -> bool {
        wait_until(limit, || self.is_registered()).await
    }
}

/// Starts `n` greeters registering with `registry` (extra flags in `args`)
/// and waits until every one is registered.
pub async fn greeters(n: usize, registry: &str, args: &[&str]) -> Vec<Greeter> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        let g = Greeter::start(registry, args).await;
        assert!(
            g.wait_registered(Duration::from_secs(10)).await,
            "greeter did not register; see {}",
            g.proc.log.display()
        );
        all.push(g);
    }
    all
}

/// A fresh etcd, an LB reading it, and `n` greeters registered in it (extra
/// greeter flags in `greeter_args`).
pub async fn etcd_cluster(n: usize, greeter_args: &[&str]) -> (Etcd, Lb, Vec<Greeter>) {
    let etcd = Etcd::start().await;
    let lb = Lb::start(&["--registry", &etcd.registry_url()]).await;
    let greeters = greeters(n, &etcd.registry_url(), greeter_args).await;
    (etcd, lb, greeters)
}

/// Result of background calls.
#[derive(Debug, Default, Clone)]
pub struct Calls {
    /// Successful calls per backend.
    pub per_backend: BTreeMap<String, u64>,
    /// First success per backend.
    pub first_seen: BTreeMap<String, Instant>,
    /// Last success per backend.
    pub last_seen: BTreeMap<String, Instant>,
    /// Failures: (when, code, message).
    pub failures: Vec<(Instant, tonic::Code, String)>,
    /// Times of every successful call, per backend.
    pub times: BTreeMap<String, Vec<Instant>>,
}

impl Calls {
    /// Successful calls.
    pub fn ok(&self) -> u64 {
        self.per_backend.values().sum()
    }

    /// The first successful call to `backend` after `t`.
    pub fn first_after(&self, backend: &str, t: Instant) -> Option<Instant> {
        self.times.get(backend)?.iter().copied().find(|x| *x > t)
    }

    /// Successful calls to `backend` after `t`.
    pub fn count_after(&self, backend: &str, t: Instant) -> usize {
        self.times
            .get(backend)
            .map(|v| v.iter().filter(|x| **x > t).count())
            .unwrap_or(0)
    }
}

/// Calls the greeter continuously from `concurrency` tasks until stopped.
pub struct Caller {
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Calls>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Caller {
    /// Starts calling through `channel`; each task pauses `pause` between calls.
    /// Calls run until [`Caller::stop`], and never longer than 5 minutes.
    pub fn start(channel: &LbChannel, concurrency: usize, pause: Duration) -> Caller {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(Calls::default()));
        let limit = Instant::now() + Duration::from_secs(300);
        let tasks = (0..concurrency)
            .map(|_| {
                let (stop, calls, mut client) = (
                    stop.clone(),
                    calls.clone(),
                    GreeterClient::new(channel.clone()),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                        let mut req = tonic::Request::new(HelloRequest { name: "bg".into() });
                        req.set_timeout(Duration::from_secs(5));
                        let result = client.say_hello(req).await;
                        let now = Instant::now();
                        {
                            let mut c = calls.lock().unwrap();
                            match result {
                                Ok(r) => {
                                    let b = backend_of(&r.into_inner().message).to_string();
                                    *c.per_backend.entry(b.clone()).or_default() += 1;
                                    c.first_seen.entry(b.clone()).or_insert(now);
                                    c.last_seen.insert(b.clone(), now);
                                    c.times.entry(b).or_default().push(now);
                                }
                                Err(s) => c.failures.push((now, s.code(), s.message().to_string())),
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Caller { stop, calls, tasks }
    }

    /// What happened so far.
    pub fn snapshot(&self) -> Calls {
        self.calls.lock().unwrap().clone()
    }

    /// Stops and returns what happened.
    pub async fn stop(self) -> Calls {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let calls = self.calls.lock().unwrap().clone();
        calls
    }
}

/// A channel to `service` through the LB(s) at `lbs`, with short backoffs
/// suited to tests.
pub fn channel(service: &str, lbs: &[SocketAddr]) -> LbChannel {
    LbChannel::builder(service)
        .lbs(lbs.iter().map(|a| a.to_string()))
        .lb_backoff(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("build channel")
}

/// Waits until `lb` is ready and a `greeter` client of it lists exactly
/// `want` (panics with the list otherwise), then starts 2 callers on it.
pub async fn listed_and_calling(lb: &Lb, want: &[SocketAddr]) -> (LbChannel, Caller) {
    lb.wait_ready(Duration::from_secs(10)).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(
        wait_listed(&ch, want, Duration::from_secs(10)).await,
        "initial listing: {:?}",
        listed(&ch)
    );
    let caller = Caller::start(&ch, 2, Duration::from_millis(5));
    (ch, caller)
}

/// Waits until `channel` has exactly `n` distinct ready backends.
pub async fn wait_backends(channel: &LbChannel, n: usize, limit: Duration) -> bool {
    wait_until(limit, || {
        let mut b = channel.ready_backends();
        b.sort();
        b.dedup();
        b.len() == n
    })
    .await
}

/// The distinct backends of the list `channel` has in force, sorted
/// (connected or not).
pub fn listed(channel: &LbChannel) -> Vec<SocketAddr> {
    let mut l = channel.listed_backends();
    l.sort();
    l.dedup();
    l
}

/// Waits until the list in force holds exactly the backends `want`.
pub async fn wait_listed(channel: &LbChannel, want: &[SocketAddr], limit: Duration) -> bool {
    let mut want = want.to_vec();
    want.sort();
    wait_until(limit, || listed(channel) == want).await
}

/// Makes `n` calls one after another; returns per-backend counts and failures.
pub async fn call_n(channel: &LbChannel, n: u64) -> lb_examples::drive::Tally {
    lb_examples::drive::drive(channel, n, 1, Duration::from_secs(5)).await
}

/// Lists received, with their arrival times.
type ListLog = Arc<Mutex<Vec<(Instant, Vec<SocketAddr>)>>>;

/// Records every server list an LB sends on one raw BalanceLoad stream.
pub struct ListWatcher {
    lists: ListLog,
    task: tokio::task::JoinHandle<()>,
}

impl ListWatcher {
    /// Opens a stream for `name` to the LB at `lb` and records lists.
    pub async fn start(lb: SocketAddr, name: &str) -> ListWatcher {
        Self::start_as(lb, name, None).await
    }

    /// Like [`ListWatcher::start`], naming the client (`lb-client-id`).
    pub async fn start_as(lb: SocketAddr, name: &str, client_id: Option<&str>) -> ListWatcher {
        use lb_proto::grpc::lb::v1::{
            load_balance_request::LoadBalanceRequestType,
            load_balance_response::LoadBalanceResponseType,
            load_balancer_client::LoadBalancerClient, InitialLoadBalanceRequest,
            LoadBalanceRequest,
        };
        let mut client = LoadBalancerClient::connect(format!("http://{lb}"))
            .await
            .expect("connect LB");
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(LoadBalanceRequest {
            load_balance_request_type: Some(LoadBalanceRequestType::InitialRequest(
                InitialLoadBalanceRequest { name: name.into() },
            )),
        })
        .await
        .unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(id) = client_id {
            request
                .metadata_mut()
                .insert("lb-client-id", id.parse().expect("ascii client id"));
        }
        let mut stream = client
            .balance_load(request)
            .await
            .expect("BalanceLoad")
            .into_inner();
        let lists: ListLog = Arc::default();
        let sink = lists.clone();
        let task = tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(m)) = stream.message().await {
                if let Some(LoadBalanceResponseType::ServerList(l)) = m.load_balance_response_type {
                    let addrs = lb_client::balancer_stream::to_entries(&l.servers)
                        .into_iter()
                        .filter(|e| !e.drop)
                        .map(|e| e.addr)
                        .collect();
                    sink.lock().unwrap().push((Instant::now(), addrs));
                }
            }
        });
        ListWatcher { lists, task }
    }

    /// Every list received so far, with its arrival time.
    pub fn all(&self) -> Vec<(Instant, Vec<SocketAddr>)> {
        self.lists.lock().unwrap().clone()
    }

    /// The latest list, if any.
    pub fn latest(&self) -> Option<Vec<SocketAddr>> {
        self.lists.lock().unwrap().last().map(|(_, l)| l.clone())
    }

    /// When the first list after `t` without `addr` arrived.
    pub fn removed_after(&self, addr: SocketAddr, t: Instant) -> Option<Instant> {
        self.lists
            .lock()
            .unwrap()
            .iter()
            .find(|(at, l)| *at >= t && !l.contains(&addr))
            .map(|(at, _)| *at)
    }
}

impl Drop for ListWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The Python interpreter with `grpcio` and `dnslib`: `$LB_TEST_PYTHON`, or
/// the `.venv` that `scripts/test` creates. Missing: a loud failure.
pub fn python() -> PathBuf {
    let python = std::env::var_os("LB_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run scripts/test (it creates .venv with grpcio and dnslib), \
         or set LB_TEST_PYTHON to a Python that has them",
        python.display()
    );
    python
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
    let out = tokio::process::Command::new(python())
        .arg(workspace().join("tests/interop/grpclb_client.py"))
        .args(["--lb-port", &lb.port().to_string(), "--host", host])
        .args([
            "--calls",
            &calls.to_string(),
            "--linger",
            &linger_s.to_string(),
        ])
        .env("GRPC_DNS_RESOLVER", "ares")
        .env("GRPC_VERBOSITY", "ERROR")
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
