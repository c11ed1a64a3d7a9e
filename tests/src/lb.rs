//! One `lb-server` process ([`Lb`]) and its admin endpoint.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::*;

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
    /// The test host it runs on (its namespace), if not this machine's.
    ns: Option<crate::netns::Ns>,
}

impl Lb {
    /// Starts `lb-server` with `args` (listen addresses are added) and waits
    /// until its admin port answers `/healthz`.
    pub async fn start(args: &[&str]) -> Lb {
        Self::start_with_env(args, &[]).await
    }

    /// Like [`Lb::start`], with extra environment variables (an empty
    /// value removes the variable).
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
            None,
        )
        .await
    }

    /// Starts an LB whose gRPC port is `addr` (for replicas sharing a port
    /// on different loopback addresses).
    pub async fn start_at(addr: SocketAddr, args: &[&str]) -> Lb {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_on(
            addr,
            admin,
            None,
            args.iter().map(|s| s.to_string()).collect(),
            Vec::new(),
            None,
        )
        .await
    }

    /// Starts an LB on test host `host` (gRPC on port 7000, admin on
    /// 7001 of its address); the harness's admin requests are made there.
    pub async fn start_in(host: &crate::netns::Host, args: &[&str]) -> Lb {
        Self::start_in_with_env(host, args, &[]).await
    }

    /// Like [`Lb::start_in`], with extra environment variables.
    pub async fn start_in_with_env(
        host: &crate::netns::Host,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Lb {
        Self::start_on(
            host.addr(7000),
            host.addr(7001),
            None,
            args.iter().map(|s| s.to_string()).collect(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            Some(host.ns.clone()),
        )
        .await
    }

    async fn start_on(
        addr: SocketAddr,
        admin: SocketAddr,
        admin_tls: Option<AdminTls>,
        args: Vec<String>,
        env: Vec<(String, String)>,
        ns: Option<crate::netns::Ns>,
    ) -> Lb {
        let mut cmd = Command::new(bin("lb-server"));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string());
        cmd.args(&args).env("LB_LOG", "info,lb_server=debug");
        // An empty value removes the variable (e.g. `LB_LOG`, to let a
        // config file's setting through).
        for (k, v) in &env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        if let Some(ns) = &ns {
            cmd = ns.wrap(&cmd);
        }
        let proc = Proc::spawn("lb-server", cmd, false);
        let lb = Lb {
            proc,
            addr,
            admin,
            admin_tls,
            args,
            env,
            ns,
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

    /// An LB with the embedded registry whose admin token (for mutations)
    /// is `token`, read from a file; `extra` flags are added. The file is
    /// returned with it (its path for clients that read it too).
    pub async fn with_admin_token(token: &str, extra: &[&str]) -> (Lb, SecretFile) {
        let file = SecretFile::new(token);
        let path = file.path();
        let mut args = vec!["--registry", "memory", "--admin-token-file", &path];
        args.extend_from_slice(extra);
        (Self::start(&args).await, file)
    }

    /// Starts it again on the same ports after it was killed.
    pub async fn relaunch(self) -> Lb {
        self.again(false).await
    }

    /// Stops it gracefully and starts it again on the same ports.
    pub async fn restart(self) -> Lb {
        self.again(true).await
    }

    async fn again(self, graceful: bool) -> Lb {
        let (addr, admin, tls, args, env, ns) = (
            self.addr,
            self.admin,
            self.admin_tls.clone(),
            self.args.clone(),
            self.env,
            self.ns,
        );
        let mut proc = self.proc;
        if graceful {
            proc.terminate(Duration::from_secs(10));
        }
        drop(proc);
        Self::start_on(addr, admin, tls, args, env, ns).await
    }

    /// GET on the admin port: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_request("GET", path, &[], b"")
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// An admin GET of `path` answered 200 with JSON, parsed (panics
    /// otherwise, showing the answer).
    pub fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
    }

    /// `GET /api/v1/services/<service>`: the service's detail, parsed
    /// (`Null` when it does not answer 200 with JSON, e.g. while the service
    /// is unknown).
    pub fn service_json(&self, service: &str) -> serde_json::Value {
        let (status, body) = self.get(&format!("/api/v1/services/{service}"));
        if status != 200 {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&body).unwrap_or_default()
    }

    /// The backends of `service` as the admin API shows them (empty when
    /// the service is unknown).
    pub fn backends(&self, service: &str) -> Vec<serde_json::Value> {
        let (status, body) = self.get(&format!("/api/v1/services/{service}"));
        if status != 200 {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_str(&body).expect("service JSON");
        v["backends"].as_array().cloned().unwrap_or_default()
    }

    /// A request to the admin port, over TLS when it serves TLS.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, String)> {
        let request = || match &self.admin_tls {
            None => http_request(self.admin, method, path, headers, body),
            Some(tls) => https_request(self.admin, tls, method, path, headers, body),
        };
        match &self.ns {
            None => request(),
            Some(ns) => ns.run(request),
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

    /// Whether the LB keeps `service`'s backend at `addr` after its registry
    /// dropped it (it still passed health checks: `left_registry_s`).
    pub fn departed(&self, service: &str, addr: SocketAddr) -> bool {
        self.backends(service)
            .iter()
            .any(|b| b["address"] == addr.to_string() && b["left_registry_s"].is_number())
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
