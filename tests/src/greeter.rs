//! `greeter-server` processes ([`Greeter`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::*;

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
        Self::start_full(listen, registry, args, env, None).await
    }

    /// Starts a greeter on test host `host`, serving on port `port` of its
    /// address.
    pub async fn start_in(
        host: &crate::netns::Host,
        port: u16,
        registry: &str,
        args: &[&str],
    ) -> Greeter {
        let listen = host.addr(port).to_string();
        Self::start_full(&listen, registry, args, &[], Some(&host.ns)).await
    }

    async fn start_full(
        listen: &str,
        registry: &str,
        args: &[&str],
        env: &[(&str, &str)],
        ns: Option<&crate::netns::Ns>,
    ) -> Greeter {
        let mut cmd = Command::new(bin("greeter-server"));
        cmd.args(["--listen", listen, "--registry", registry, "--log", "info"])
            .args(args)
            .envs(env.iter().copied());
        if let Some(ns) = ns {
            cmd = ns.wrap(&cmd);
        }
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
        all.push(registered(Greeter::start(registry, args).await).await);
    }
    all
}

/// Starts a greeter on each of `hosts`, serving on port `port` of its
/// address and registering with `registry` (extra flags in `args`), and
/// waits until every one is registered.
pub async fn greeters_in(
    hosts: &[crate::netns::Host],
    port: u16,
    registry: &str,
    args: &[&str],
) -> Vec<Greeter> {
    let mut all = Vec::with_capacity(hosts.len());
    for h in hosts {
        all.push(registered(Greeter::start_in(h, port, registry, args).await).await);
    }
    all
}

/// `greeter` once it is registered (panics, pointing at its log, when it
/// is not within 10 s).
async fn registered(greeter: Greeter) -> Greeter {
    assert!(
        greeter.wait_registered(Duration::from_secs(10)).await,
        "a greeter did not register; see {}",
        greeter.proc.log.display()
    );
    greeter
}
