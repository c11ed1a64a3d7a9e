//! What benchmarks run against: an etcd process, lb-server processes, and
//! in-process greeters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lb_client::{Registration, RegistrationOptions};
use lb_examples::greeter::{GreeterOptions, RunningGreeter};
use tokio::net::TcpListener;

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

/// An `lb-server` process of this build; killed when dropped.
pub struct LbProcess {
    /// The process.
    pub child: std::process::Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LbProcess {
    /// Starts `lb-server` over `registry` on free loopback ports.
    pub async fn start(registry: &str) -> anyhow::Result<LbProcess> {
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

/// Starts an in-process greeter behaving as `options`, registered as
/// `service` with the embedded registry of every LB in `lbs` (none: not
/// registered).
pub async fn greeter_with(
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
