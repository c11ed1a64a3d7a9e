//! Registration helpers for backends: announce `service → address` in the
//! registry the LB reads, keep it alive, and remove it on graceful shutdown.
//!
//! - etcd: the instance is a key `<prefix><service>/<addr>` attached to a
//!   lease that is kept alive; when the lease is lost (etcd restarted, a
//!   long partition) a new lease is granted and the key written again.
//! - embedded: the LB's own `lb.registry.v1.Registry` API; a lease the LB
//!   no longer knows (it restarted) is registered again.
//!
//! Both retry by themselves, forever, with jittered backoff: a backend can
//! start while the registry is down and will appear once it is back.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, PutOptions};
use lb_proto::registry::v1::{
    registry_client::RegistryClient, DeregisterRequest, KeepAliveRequest, RegisterRequest,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;

use crate::backoff::Backoff;
use crate::Error;

/// How the instance is registered.
#[derive(Debug, Clone)]
pub struct RegistrationOptions {
    /// Lease time to live (default 10 s).
    pub ttl: Duration,
    /// Metadata stored with the instance, e.g. `{"weight": 2}`.
    pub metadata: Option<serde_json::Value>,
    /// etcd only: write the plain `host:port` layout instead of etcd's naming
    /// JSON (`{"Op":0,"Addr":…}`).
    pub plain_value: bool,
    /// etcd only: key prefix (default `/services/`).
    pub etcd_prefix: String,
    /// Embedded registry only: the LB's registration token, sent as
    /// `authorization: Bearer <token>` (needed when the LB sets one).
    pub token: Option<String>,
    /// Embedded registry only: TLS towards the LBs.
    pub lb_tls: Option<crate::TlsConfig>,
    /// etcd only: TLS towards etcd.
    pub etcd_tls: Option<crate::TlsConfig>,
    /// etcd only: user name and password (etcd authentication).
    pub etcd_user: Option<(String, String)>,
}

impl Default for RegistrationOptions {
    fn default() -> Self {
        RegistrationOptions {
            ttl: Duration::from_secs(10),
            metadata: None,
            plain_value: false,
            etcd_prefix: "/services/".into(),
            token: None,
            lb_tls: None,
            etcd_tls: None,
            etcd_user: None,
        }
    }
}

/// A registration kept alive in the background.
pub struct Registration {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    registered: watch::Receiver<bool>,
}

impl Registration {
    /// Registers according to a registry URL, as the LB's `--registry` flag
    /// names it: `etcd://h1:2379,h2:2379` writes to etcd; `lb://host:7000`
    /// (several comma-separated) uses the embedded registry of those LBs.
    pub fn start(
        registry: &str,
        service: &str,
        addr: &str,
        options: RegistrationOptions,
    ) -> Result<Self, Error> {
        let list = |rest: &str| -> Vec<String> {
            rest.split(',')
                .map(|s| s.trim().trim_end_matches('/').to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        if let Some(rest) = registry.strip_prefix("etcd://") {
            return Self::etcd(list(rest), service, addr, options);
        }
        if let Some(rest) = registry.strip_prefix("lb://") {
            return Self::embedded(list(rest), service, addr, options);
        }
        Err(Error::Config(format!(
            "registry {registry:?} is neither etcd://host:port[,…] nor lb://host:port[,…]"
        )))
    }

    /// Registers `addr` as an instance of `service` in etcd.
    pub fn etcd(
        endpoints: Vec<String>,
        service: &str,
        addr: &str,
        options: RegistrationOptions,
    ) -> Result<Self, Error> {
        if endpoints.is_empty() {
            return Err(Error::Config("no etcd endpoint given".into()));
        }
        let key = format!("{}{service}/{addr}", options.etcd_prefix);
        let value = if options.plain_value {
            addr.to_string()
        } else {
            serde_json::json!({"Op": 0, "Addr": addr, "Metadata": options.metadata}).to_string()
        };
        if let Some(tls) = &options.etcd_tls {
            tls.check()?;
        }
        let access = EtcdAccess {
            endpoints,
            tls: options.etcd_tls.map(|t| t.tonic()),
            user: options.etcd_user,
        };
        let (tx, rx) = watch::channel(false);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(etcd_loop(
            access,
            key,
            value,
            options.ttl,
            tx,
            cancel.clone(),
        ));
        Ok(Registration {
            cancel,
            tasks: vec![task],
            registered: rx,
        })
    }

    /// Registers `addr` as an instance of `service` with the embedded
    /// registry of each LB in `lbs`.
    pub fn embedded(
        lbs: Vec<String>,
        service: &str,
        addr: &str,
        options: RegistrationOptions,
    ) -> Result<Self, Error> {
        if lbs.is_empty() {
            return Err(Error::Config("no LB address given".into()));
        }
        let request = RegisterRequest {
            service: service.to_string(),
            address: addr.to_string(),
            ttl_seconds: options.ttl.as_secs().max(1) as u32,
            metadata_json: options.metadata.map(|m| m.to_string()).unwrap_or_default(),
            instance: String::new(),
        };
        if let Some(tls) = &options.lb_tls {
            tls.check()?;
        }
        let tls = options.lb_tls.map(|t| t.tonic());
        let authorization = options
            .token
            .as_deref()
            .map(|t| format!("Bearer {}", t.trim()).parse::<MetadataValue<Ascii>>())
            .transpose()
            .map_err(|_| Error::Config("the registration token is not printable ASCII".into()))?;
        let (tx, rx) = watch::channel(false);
        let cancel = CancellationToken::new();
        let tasks = lbs
            .into_iter()
            .map(|lb| {
                tokio::spawn(embedded_loop(
                    lb,
                    tls.clone(),
                    request.clone(),
                    authorization.clone(),
                    tx.clone(),
                    cancel.clone(),
                ))
            })
            .collect();
        Ok(Registration {
            cancel,
            tasks,
            registered: rx,
        })
    }

    /// Whether the instance is registered now (as last confirmed).
    pub fn is_registered(&self) -> bool {
        *self.registered.borrow()
    }

    /// Waits until the instance is registered, at most `timeout`.
    pub async fn wait_registered(&self, timeout: Duration) -> bool {
        let mut rx = self.registered.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// Removes the instance from the registry and stops keeping it alive.
    pub async fn deregister(mut self) {
        self.cancel.cancel();
        let all = futures::future::join_all(std::mem::take(&mut self.tasks));
        let _ = tokio::time::timeout(Duration::from_secs(5), all).await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Stop keeping the lease alive; the instance expires with its TTL.
        self.cancel.cancel();
    }
}

/// Where etcd is and how to get in.
struct EtcdAccess {
    endpoints: Vec<String>,
    tls: Option<tonic::transport::ClientTlsConfig>,
    user: Option<(String, String)>,
}

impl EtcdAccess {
    fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        options
    }
}

/// How one registration session ended.
enum Outcome {
    /// Deregistered on request.
    Stopped,
}

async fn etcd_loop(
    access: EtcdAccess,
    key: String,
    value: String,
    ttl: Duration,
    registered: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
    let mut previous_lease: Option<i64> = None;
    loop {
        let session = etcd_session(
            &access,
            &key,
            &value,
            ttl,
            &registered,
            &cancel,
            &mut previous_lease,
        );
        let error = match session.await {
            Ok(Outcome::Stopped) => return,
            Err(e) => e,
        };
        registered.send_replace(false);
        tracing::warn!(%key, %error, "etcd registration interrupted; retrying");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn etcd_session(
    access: &EtcdAccess,
    key: &str,
    value: &str,
    ttl: Duration,
    registered: &watch::Sender<bool>,
    cancel: &CancellationToken,
    previous_lease: &mut Option<i64>,
) -> Result<Outcome, String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: etcd_client::Error| format!("{what}: {err}")
    };
    let mut client = Client::connect(&access.endpoints, Some(access.connect_options()))
        .await
        .map_err(e("connect"))?;
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await
        .map_err(e("lease grant"))?
        .id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(e("put"))?;
    if let Some(old) = previous_lease.replace(lease) {
        // The key now hangs on the new lease; the old one is not needed.
        let _ = client.lease_revoke(old).await;
    }
    registered.send_replace(true);
    tracing::info!(%key, lease, "registered in etcd");
    let (mut keeper, mut responses) = client
        .lease_keep_alive(lease)
        .await
        .map_err(e("keep-alive"))?;
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let removal = async {
                    client.delete(key, None).await.map_err(e("delete"))?;
                    client.lease_revoke(lease).await.map_err(e("revoke"))?;
                    Ok::<_, String>(())
                };
                match tokio::time::timeout(Duration::from_secs(3), removal).await {
                    Ok(Ok(())) => tracing::info!(%key, "deregistered from etcd"),
                    Ok(Err(error)) => tracing::warn!(%key, %error, "deregistration failed; the key expires with its lease"),
                    Err(_) => tracing::warn!(%key, "deregistration timed out; the key expires with its lease"),
                }
                return Ok(Outcome::Stopped);
            }
            _ = tick.tick() => keeper.keep_alive().await.map_err(e("keep-alive"))?,
            message = responses.message() => match message.map_err(e("keep-alive"))? {
                Some(r) if r.ttl() > 0 => {}
                Some(_) => return Err(format!("lease {lease} expired")),
                None => return Err("keep-alive stream ended".into()),
            },
        }
    }
}

async fn embedded_loop(
    lb: String,
    tls: Option<tonic::transport::ClientTlsConfig>,
    request: RegisterRequest,
    authorization: Option<MetadataValue<Ascii>>,
    registered: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
    loop {
        let session = embedded_session(
            &lb,
            tls.clone(),
            &request,
            authorization.clone(),
            &registered,
            &cancel,
        );
        let error = match session.await {
            Ok(Outcome::Stopped) => return,
            Err(e) => e,
        };
        registered.send_replace(false);
        tracing::warn!(%lb, service = %request.service, %error, "embedded registration interrupted; retrying");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn embedded_session(
    lb: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    request: &RegisterRequest,
    authorization: Option<MetadataValue<Ascii>>,
    registered: &watch::Sender<bool>,
    cancel: &CancellationToken,
) -> Result<Outcome, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{lb}"))
        .map_err(|e| format!("bad LB address {lb:?}: {e}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS settings for {lb}: {e}"))?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect {lb}: {e}"))?;
    let mut client = RegistryClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        if let Some(value) = &authorization {
            r.metadata_mut().insert("authorization", value.clone());
        }
        Ok(r)
    });
    let status = |s: tonic::Status| format!("{lb}: {} {}", s.code(), s.message());
    let reply = client
        .register(request.clone())
        .await
        .map_err(status)?
        .into_inner();
    registered.send_replace(true);
    tracing::info!(%lb, service = %request.service, addr = %request.address, lease = reply.lease_id, "registered with the embedded registry");
    let every = Duration::from_secs(reply.ttl_seconds.max(1) as u64) / 3;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let removal = client.deregister(DeregisterRequest { lease_id: reply.lease_id });
                match tokio::time::timeout(Duration::from_secs(3), removal).await {
                    Ok(Ok(_)) => tracing::info!(%lb, service = %request.service, "deregistered"),
                    _ => tracing::warn!(%lb, service = %request.service, "deregistration failed; the lease expires"),
                }
                return Ok(Outcome::Stopped);
            }
            _ = tick.tick() => {
                client.keep_alive(KeepAliveRequest { lease_id: reply.lease_id }).await.map_err(status)?;
            }
        }
    }
}
