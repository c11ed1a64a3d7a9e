//! One etcd member ([`Etcd`]): start, kill, restart, put and delete; and
//! an etcd with TLS and authentication ([`SecureEtcd`]). A member runs on
//! loopback, or on a test host ([`Etcd::start_in`]) where the network
//! between it and its clients can be cut; a cluster runs on loopback
//! ([`Etcd::start_cluster`]) or with each member on a test host of its own
//! ([`Etcd::start_cluster_in`]), where the network between members can be
//! cut too.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::*;

/// One etcd member with a temporary data dir, on loopback or on a test
/// host.
pub struct Etcd {
    /// TLS and credentials, when this member serves clients over TLS.
    pub secure: Option<SecureEtcd>,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    name: String,
    /// The address it listens on and advertises (clients and peers).
    ip: IpAddr,
    /// The test host's namespace it runs in (`None`: the test's own).
    ns: Option<crate::netns::Ns>,
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

    /// Starts a one-member etcd on test host `host` (clients on port 2379
    /// and peers on 2380 of its address) and waits until it answers there.
    pub async fn start_in(host: &crate::netns::Host) -> Etcd {
        let mut etcd = Self::members_at(1, IpAddr::V4(host.ip), Some(host.ns.clone()))
            .pop()
            .expect("one member");
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

    /// Starts a cluster of one member on each of `hosts` (member `m<i>` on
    /// `hosts[i]`, clients on port 2379 and peers on 2380 of its address,
    /// so that a cut between two hosts parts two members) and waits until
    /// every member answers a read from its own host.
    pub async fn start_cluster_in(hosts: &[&crate::netns::Host]) -> Vec<Etcd> {
        let mut members: Vec<Etcd> = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| Etcd {
                proc: None,
                dir: tempfile::tempdir().expect("temp dir"),
                name: format!("m{i}"),
                secure: None,
                ip: IpAddr::V4(host.ip),
                ns: Some(host.ns.clone()),
                client_port: 2379,
                peer_port: 2380,
                initial_cluster: String::new(),
            })
            .collect();
        Self::join(&mut members);
        for m in &mut members {
            m.spawn();
        }
        for m in &members {
            m.wait_up().await;
        }
        members
    }

    fn members(n: usize) -> Vec<Etcd> {
        Self::members_at(n, IpAddr::V4(Ipv4Addr::LOCALHOST), None)
    }

    /// `n` members on `ip`: on loopback each on free ports; on a test
    /// host (which has the address to itself) on etcd's own ports.
    fn members_at(n: usize, ip: IpAddr, ns: Option<crate::netns::Ns>) -> Vec<Etcd> {
        let mut members: Vec<Etcd> = (0..n)
            .map(|i| {
                let (client_port, peer_port) = match &ns {
                    None => (free_port(), free_port()),
                    Some(_) => (2379 + 2 * i as u16, 2380 + 2 * i as u16),
                };
                Etcd {
                    proc: None,
                    dir: tempfile::tempdir().expect("temp dir"),
                    name: format!("m{i}"),
                    secure: None,
                    ip,
                    ns: ns.clone(),
                    client_port,
                    peer_port,
                    initial_cluster: String::new(),
                }
            })
            .collect();
        Self::join(&mut members);
        members
    }

    /// Gives every one of `members` the same initial cluster: all of them.
    fn join(members: &mut [Etcd]) {
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.ip, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in members {
            m.initial_cluster = initial.clone();
        }
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
        let client = format!("{scheme}://{}:{}", self.ip, self.client_port);
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
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
        if let Some(ns) = &self.ns {
            cmd = ns.wrap(&cmd);
        }
        self.proc = Some(Proc::spawn("etcd", cmd, false));
    }

    /// Waits until this member answers a read (which needs a quorum), asked
    /// from its own host when it runs on one.
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
        let limit = Duration::from_secs(20);
        // The timeout is made inside the job, on the runtime that runs it.
        let answered = self
            .on_host(async { tokio::time::timeout(limit, up).await })
            .await;
        answered.unwrap_or_else(|_| panic!("etcd did not come up within 20 s; see {log}"));
    }

    /// `host:port` of the client URL.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.ip, self.client_port)
    }

    /// Its log file (`None` once killed).
    pub fn log(&self) -> Option<std::path::PathBuf> {
        self.proc.as_ref().map(|p| p.log.clone())
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

    /// The keys under `prefix` now, sorted. Asked from the member's own
    /// host when it runs on one (unlike [`Etcd::put`] and
    /// [`Etcd::delete`], which ask from the test's own namespace).
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.on_host(async {
            let mut c = self.client().await;
            let options = etcd_client::GetOptions::new()
                .with_prefix()
                .with_keys_only();
            let answer = c.get(prefix, Some(options)).await.expect("etcd get prefix");
            let mut keys: Vec<String> = answer
                .kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .collect();
            keys.sort();
            keys
        })
        .await
    }

    /// Deletes every key under `prefix` (whatever lease holds them);
    /// returns how many went. Like [`Etcd::keys`], from the member's own
    /// host when it runs on one.
    pub async fn delete_prefix(&self, prefix: &str) -> i64 {
        self.on_host(async {
            let mut c = self.client().await;
            c.delete(
                prefix,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .expect("etcd delete prefix")
            .deleted()
        })
        .await
    }

    /// This member's id and the id of the leader it follows (0 when it
    /// knows none), from its own status (which needs no quorum). Like
    /// [`Etcd::keys`], from the member's own host when it runs on one.
    pub async fn status(&self) -> (u64, u64) {
        self.on_host(async {
            let mut c = self.client().await;
            let status = c.status().await.expect("etcd status");
            (
                status.header().map_or(0, |h| h.member_id()),
                status.leader(),
            )
        })
        .await
    }

    /// Makes `members[to]` the leader of their cluster (a leadership
    /// transfer asked of the current leader) and waits until every member
    /// follows it; panics after 20 s.
    pub async fn lead(members: &[Etcd], to: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut statuses = Vec::with_capacity(members.len());
            for m in members {
                statuses.push(m.status().await);
            }
            let target = statuses[to].0;
            if statuses.iter().all(|(_, leader)| *leader == target) {
                return;
            }
            let leader = members
                .iter()
                .zip(&statuses)
                .find(|(_, (id, leader))| *id != 0 && id == leader);
            if let Some((leader, _)) = leader {
                leader
                    .on_host(async {
                        // A refusal (e.g. a transfer already under way) is
                        // retried below.
                        let _ = leader.client().await.move_leader(target).await;
                    })
                    .await;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "etcd member {} did not become the leader within 20 s: (id, leader) of each \
                 member: {statuses:?}",
                members[to].name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `job` where this member's clients are: here on loopback, or on
    /// a thread inside its test host (with a runtime of its own: the
    /// test's own sockets live outside the host).
    async fn on_host<T: Send>(&self, job: impl std::future::Future<Output = T> + Send) -> T {
        match &self.ns {
            None => job.await,
            Some(ns) => tokio::task::block_in_place(|| {
                ns.run(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(job)
                })
            }),
        }
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
