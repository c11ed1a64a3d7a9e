//! Registration helpers for backends: announce `service → address` in the
//! registry the LB reads, keep it alive, and remove it on graceful shutdown.
//!
//! | module | registry | how the instance lives |
//! | --- | --- | --- |
//! | `etcd` | `etcd://h1:2379,…` | a key on a lease kept alive; a lost lease is replaced and the key written again |
//! | `embedded` | `lb://host:7000,…` | the LB's own `lb.registry.v1.Registry` API; a lease the LB forgot (restart) is registered again |
//! | `zookeeper` | `zk://h1:2181,…/prefix` | an ephemeral provider znode; an expired session is replaced and the znode made again (feature `zookeeper`) |
//! | `consul` | `consul[+https]://host:8500` | an agent service with a gRPC health check; re-registered when the agent forgets it (feature `consul`) |
//!
//! DNS is read-only: records are published in the zone, not by backends.
//! Every helper retries by itself, forever, with jittered backoff: a backend
//! can start while the registry is down and will appear once it is back.

mod embedded;
#[cfg(feature = "etcd")]
mod etcd;

#[cfg(feature = "consul")]
mod consul;
#[cfg(feature = "zookeeper")]
mod zookeeper;

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::Error;

/// How the instance is registered.
#[derive(Debug, Clone)]
pub struct RegistrationOptions {
    /// Lease time to live (default 10 s); ZooKeeper: session timeout;
    /// Consul: health check interval is a third of it.
    pub ttl: Duration,
    /// Metadata stored with the instance, e.g. `{"weight": 2}`.
    pub metadata: Option<serde_json::Value>,
    /// etcd only: write the plain `host:port` layout instead of etcd's naming
    /// JSON (`{"Op":0,"Addr":…}`).
    pub plain_value: bool,
    /// etcd only: key prefix (default `/services/`).
    pub etcd_prefix: String,
    /// Embedded registry: the LB's registration token, sent as
    /// `authorization: Bearer <token>` (needed when the LB sets one);
    /// Consul: the ACL token, sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// Embedded registry only: TLS towards the LBs.
    pub lb_tls: Option<crate::TlsConfig>,
    /// etcd only: TLS towards etcd.
    pub etcd_tls: Option<crate::TlsConfig>,
    /// etcd only: user name and password (etcd authentication).
    pub etcd_user: Option<(String, String)>,
    /// Consul only: TLS towards the agent, for `consul+https://` URLs.
    pub consul_tls: Option<crate::TlsConfig>,
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
            consul_tls: None,
        }
    }
}

/// A registration kept alive in the background: the instance is in the
/// registry while this value lives (and the process with it), and is
/// removed gracefully by [`Registration::deregister`].
///
/// ```no_run
/// use std::time::Duration;
/// use lb_client::{Registration, RegistrationOptions};
///
/// # async fn serve() {}
/// # #[tokio::main]
/// # async fn main() -> Result<(), lb_client::Error> {
/// // In the LB's embedded registry (`lb://`), or etcd (`etcd://h1:2379,h2:2379`).
/// let registration = Registration::start(
///     "lb://127.0.0.1:7000",
///     "greeter",
///     "10.0.0.7:50051",
///     RegistrationOptions { ttl: Duration::from_secs(10), ..Default::default() },
/// )?;
/// registration.wait_registered(Duration::from_secs(5)).await;
/// serve().await;
/// // On shutdown: out of the registry before the server stops.
/// registration.deregister().await;
/// # Ok(()) }
/// ```
pub struct Registration {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    registered: watch::Receiver<bool>,
}

/// What a registration task is given: where to say whether the instance is
/// registered now, and when to deregister.
#[derive(Clone)]
pub(crate) struct Control {
    /// Set true while the instance is registered.
    pub registered: watch::Sender<bool>,
    /// Cancelled to deregister and stop.
    pub cancel: CancellationToken,
}

impl Registration {
    /// Registers according to a registry URL, as the LB's `--registry` flag
    /// names it: `etcd://h1:2379,h2:2379`, `lb://host:7000[,…]` (the embedded
    /// registry of those LBs), `zk://h1:2181,…/prefix`, `consul://host:8500`
    /// (`consul+https://host:8501` with [`RegistrationOptions::consul_tls`]).
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
            #[cfg(feature = "etcd")]
            return Self::etcd(list(rest), service, addr, options);
            #[cfg(not(feature = "etcd"))]
            return Err(Error::Config(format!(
                "registry etcd://{rest}: lb-client was built without its `etcd` feature"
            )));
        }
        if let Some(rest) = registry.strip_prefix("lb://") {
            return Self::embedded(list(rest), service, addr, options);
        }
        if let Some(rest) = registry.strip_prefix("zk://") {
            #[cfg(feature = "zookeeper")]
            return zookeeper::start(rest, service, addr, options);
            #[cfg(not(feature = "zookeeper"))]
            return Err(Error::Config(format!(
                "registry zk://{rest}: lb-client was built without its `zookeeper` feature"
            )));
        }
        if registry.starts_with("consul://") || registry.starts_with("consul+https://") {
            #[cfg(feature = "consul")]
            return consul::start(registry, service, addr, options);
            #[cfg(not(feature = "consul"))]
            return Err(Error::Config(format!(
                "registry {registry}: lb-client was built without its `consul` feature"
            )));
        }
        if registry.starts_with("dns://") {
            return Err(Error::Config(
                "a DNS registry is read-only: publish the backend's A/AAAA or SRV records in the zone"
                    .into(),
            ));
        }
        Err(Error::Config(format!(
            "registry {registry:?} is none of etcd://host:port[,…], lb://host:port[,…], \
             zk://host:port[,…]/prefix, consul[+https]://host:port"
        )))
    }

    /// Registers `addr` as an instance of `service` in etcd.
    #[cfg(feature = "etcd")]
    pub fn etcd(
        endpoints: Vec<String>,
        service: &str,
        addr: &str,
        options: RegistrationOptions,
    ) -> Result<Self, Error> {
        etcd::start(endpoints, service, addr, options)
    }

    /// Registers `addr` as an instance of `service` with the embedded
    /// registry of each LB in `lbs`.
    pub fn embedded(
        lbs: Vec<String>,
        service: &str,
        addr: &str,
        options: RegistrationOptions,
    ) -> Result<Self, Error> {
        embedded::start(lbs, service, addr, options)
    }

    /// Starts `tasks` registration tasks, each made by `task` from its
    /// index and the shared [`Control`].
    pub(crate) fn spawn<F>(tasks: usize, mut task: impl FnMut(usize, Control) -> F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = watch::channel(false);
        let control = Control {
            registered: tx,
            cancel: CancellationToken::new(),
        };
        let handles = (0..tasks)
            .map(|i| tokio::spawn(task(i, control.clone())))
            .collect();
        Registration {
            cancel: control.cancel,
            tasks: handles,
            registered: rx,
        }
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

/// The loop around registration sessions: after a session that ended
/// because the registration was cancelled (`Ok`) it stops; after a failed
/// one (`Err`) the instance counts as unregistered and the next session
/// starts after a jittered backoff.
pub(crate) struct Retry<'a> {
    what: &'a str,
    control: &'a Control,
    backoff: Backoff,
}

impl<'a> Retry<'a> {
    /// A loop for the registration `what`.
    pub(crate) fn new(what: &'a str, control: &'a Control) -> Self {
        Retry {
            what,
            control,
            backoff: {
                // The first session starts now; each later one when `again`
                // returns, so one that lasted resets the delays.
                let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
                b.attempt();
                b
            },
        }
    }

    /// Takes a session's outcome; true when another session should start.
    pub(crate) async fn again(&mut self, outcome: Result<(), String>) -> bool {
        let Err(error) = outcome else {
            return false;
        };
        self.control.registered.send_replace(false);
        tracing::warn!(registration = %self.what, %error, "registration interrupted; retrying");
        let again = self.backoff.wait(&self.control.cancel).await;
        self.backoff.attempt();
        again
    }
}

/// Runs `removal` with a time limit, logging how it went.
pub(crate) async fn deregister_within(
    what: &str,
    removal: impl std::future::Future<Output = Result<(), String>>,
) {
    match tokio::time::timeout(Duration::from_secs(3), removal).await {
        Ok(Ok(())) => tracing::info!(registration = %what, "deregistered"),
        Ok(Err(error)) => {
            tracing::warn!(registration = %what, %error, "deregistration failed; the instance expires")
        }
        Err(_) => {
            tracing::warn!(registration = %what, "deregistration timed out; the instance expires")
        }
    }
}
