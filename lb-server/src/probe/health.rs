//! Active health checking: who works.
//!
//! One probe per (service, backend address) in the catalog, started and
//! stopped as membership changes. A probe keeps one HTTP/2 connection to its
//! backend and on it:
//! - a `grpc.health.v1.Health/Watch` stream: every status change is written
//!   to the catalog at once; a broken stream or refused connection means
//!   *unreachable now* (no waiting for a lease to expire), which is how a
//!   killed backend leaves the lists within milliseconds;
//! - a `Check` call every `check_interval`, the **heartbeat**: a backend that
//!   leaves it unanswered for `timeout` is *hung* (SIGSTOPped, deadlocked,
//!   partitioned: its sockets stay open, nothing answers) and counts as
//!   unreachable. While `Watch` is open only its answers set the status; the
//!   heartbeat proves the backend answers at all. When `Watch` is
//!   UNIMPLEMENTED, the same `Check` calls carry the status too;
//! - the ORCA load stream ([`crate::probe::load`]), when enabled.
//!
//! Why a heartbeat call and not HTTP/2 PINGs: stock gRPC servers refuse
//! PINGs more often than every 5 minutes (grpc-go's
//! `EnforcementPolicy{MinTime: 5m}`, C-core's
//! `grpc.http2.min_ping_interval_without_data_ms`, grpc-java's
//! `permitKeepAliveTime`) and answer the third with GOAWAY `too_many_pings`,
//! which would tear the probe down every few seconds and flap the backend.
//! A `Check` is an ordinary call that every server must answer, costs one
//! small request, and measures what matters (the server answers gRPC), as
//! Envoy's active checks do with their own interval and timeout. So the
//! probe connection sends no PINGs at all.
//!
//! A lost backend is *unreachable* when its host answered (refused, reset,
//! a broken stream, a TLS refusal) and *silent* when nothing answered at
//! all (a timeout, no route): silence may be this replica's path only, so
//! the policy weighs it as one view ([`crate::policy`]), and other replicas
//! are asked to witness it ([`crate::cluster`]).
//!
//! Reconnects use the shared jittered backoff (`lb_client::internals::Backoff`),
//! capped at one second so that a backend that comes back (SIGCONT, a
//! restart on the same address) is listed again within about two seconds.
//! After 30 s down the cap grows to 20 s: a zone of dead backends costs a
//! twentieth of the connects, and the log says it once per service (see the
//! catalog). All reconnects together also wait for a turn of one shared
//! budget ([`super::pace`]), so that a zone outage cannot take every core.
//! Connects are made bare (a TCP connect, then the channel over it): a
//! refused one costs a socket, not a channel's setup. Every reconnect is counted (`lb_upstream_reconnects_total{kind="health"}`).
//!
//! With replicas ([`crate::cluster`]), a replica probes only the backends it
//! owns; results go through a [`Reporter`], which also publishes them, and
//! the results of backends owned by others are read from the cluster. A
//! backend whose owner finds it silent is probed by every other replica
//! too, as a witness, until the owner hears it again: the witness's result
//! is published as its opinion, a second view of the silence.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_client::internals::Backoff;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::pace::Pace;
use super::report::Reporter;
use crate::catalog::Catalog;
use crate::cluster::Cluster;
use crate::model::HealthState;
use tokio_util::task::AbortOnDropHandle;

/// Health-checking settings.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Health service name per registry service (default "": whole server).
    pub service_names: HashMap<String, String>,
    /// Interval of `Check` calls: the heartbeat beside `Watch`, and the
    /// status poll when `Watch` is unimplemented.
    pub check_interval: Duration,
    /// Connect timeout and per-answer timeout (a heartbeat unanswered this
    /// long means the backend is hung).
    pub timeout: Duration,
    /// Subscribe to ORCA load reports on the same connection.
    pub orca: bool,
    /// ORCA report interval asked of backends.
    pub orca_interval: Duration,
    /// Reconnect attempts per second, all probes together (0: no limit).
    pub reconnect_rate: u32,
    /// TLS towards backends, when they serve it.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Runs probes for every catalog member this replica owns until `shutdown`.
pub async fn run(
    catalog: Arc<Catalog>,
    cluster: Option<Arc<Cluster>>,
    settings: HealthSettings,
    shutdown: CancellationToken,
) {
    let witness_settings = Arc::new(HealthSettings {
        orca: false,
        ..settings.clone()
    });
    let settings = Arc::new(settings);
    let reporter = Arc::new(Reporter::new(catalog.clone(), cluster.clone()));
    let witness_reporter = cluster
        .as_ref()
        .map(|c| Arc::new(Reporter::witness(catalog.clone(), c.clone())));
    let mut suspects = cluster.as_ref().map(|c| c.subscribe_suspects());
    let mut witnesses: HashMap<(String, SocketAddr), CancellationToken> = HashMap::new();
    let pace = Pace::per_second(settings.reconnect_rate).map(Arc::new);
    let mut members = catalog.subscribe_members();
    let mut view = cluster.as_ref().map(|c| c.subscribe());
    let mut probes: HashMap<(String, SocketAddr), CancellationToken> = HashMap::new();
    let mut remote: std::collections::HashSet<(String, SocketAddr)> = Default::default();
    loop {
        let now: Vec<(String, SocketAddr)> = catalog.members();
        let owned =
            |key: &(String, SocketAddr)| cluster.as_ref().is_none_or(|c| c.owns(&key.0, key.1));
        probes.retain(|key, cancel| {
            let present = now.binary_search(key).is_ok();
            let keep = present && owned(key);
            if !keep {
                cancel.cancel();
                if let Some(c) = &cluster {
                    if present {
                        tracing::debug!(service = %key.0, addr = %key.1, "probe handed over to its owner");
                        c.release(&key.0, key.1);
                    } else {
                        c.withdraw(&key.0, key.1);
                    }
                }
            }
            keep
        });
        remote.retain(|key| now.binary_search(key).is_ok() && !owned(key));
        if let (Some(c), Some(reporter)) = (&cluster, &witness_reporter) {
            witnesses.retain(|key, cancel| {
                let keep = now.binary_search(key).is_ok() && c.needs_witness(&key.0, key.1);
                if !keep {
                    cancel.cancel();
                    c.withdraw_opinion(&key.0, key.1);
                }
                keep
            });
            for key in &now {
                if witnesses.contains_key(key) || !c.needs_witness(&key.0, key.1) {
                    continue;
                }
                tracing::debug!(service = %key.0, addr = %key.1, "witnessing a backend its owner finds silent");
                let cancel = shutdown.child_token();
                witnesses.insert(key.clone(), cancel.clone());
                tokio::spawn(probe(
                    reporter.clone(),
                    witness_settings.clone(),
                    pace.clone(),
                    key.0.clone(),
                    key.1,
                    cancel,
                ));
            }
        }
        for key in now {
            if !owned(&key) {
                if let Some(c) = &cluster {
                    if remote.insert(key.clone()) {
                        c.apply_remote(&key);
                    }
                }
                continue;
            }
            remote.remove(&key);
            if probes.contains_key(&key) {
                continue;
            }
            let cancel = shutdown.child_token();
            probes.insert(key.clone(), cancel.clone());
            tokio::spawn(probe(
                reporter.clone(),
                settings.clone(),
                pace.clone(),
                key.0,
                key.1,
                cancel,
            ));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = members.changed() => if changed.is_err() { return },
            changed = async { view.as_mut().expect("guarded").changed().await }, if view.is_some() => {
                if changed.is_err() { return }
            }
            changed = async { suspects.as_mut().expect("guarded").changed().await }, if suspects.is_some() => {
                if changed.is_err() { return }
            }
        }
    }
}

/// First reconnect delay of a probe.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay while an outage is young: a backend that returns
/// (a restart, a pause) is probed again soon.
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// An outage this old is no blip: the backend, or its whole zone, is down.
const LONG_OUTAGE: Duration = Duration::from_secs(30);
/// Longest reconnect delay in a long outage. Each attempt is a socket, a
/// connect and a close: 100,000 dead backends retried every second keep two
/// cores busy, every 20 s about a tenth of one. A backend that returns
/// after a long outage is listed again within about 20 s.
const RECONNECT_MAX_LONG: Duration = Duration::from_secs(20);
/// A session that lived this long resets the reconnect delay.
const RECONNECT_RESET: Duration = Duration::from_secs(5);

async fn probe(
    reporter: Arc<Reporter>,
    s: Arc<HealthSettings>,
    pace: Option<Arc<Pace>>,
    service: String,
    addr: SocketAddr,
    cancel: CancellationToken,
) {
    let name = s.service_names.get(&service).cloned().unwrap_or_default();
    let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX).reset_after(RECONNECT_RESET);
    tracing::debug!(%service, %addr, health_service = %name, "probe started");
    let mut down_since: Option<Instant> = None;
    // What the catalog already has for this backend while it is down: a
    // refused connect in a long outage then touches nothing but the counter.
    let mut reported_down: Option<HealthState> = None;
    loop {
        backoff.attempt();
        let started = Instant::now();
        let attempt = async {
            let tcp = connect(addr, s.timeout).await?;
            // Boxed: a probe waiting out its backoff keeps only a pointer,
            // not the room of a whole session.
            Box::pin(session(tcp, &reporter, &s, &service, addr, &name))
                .await
                .map_err(|lost| (true, lost))
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => r,
        };
        if started.elapsed() >= RECONNECT_RESET {
            // It was up for a while: this is a new outage.
            down_since = None;
        }
        let down_for = down_since.get_or_insert_with(Instant::now).elapsed();
        backoff.set_max(if down_for >= LONG_OUTAGE {
            RECONNECT_MAX_LONG
        } else {
            RECONNECT_MAX
        });
        let (connected, lost) = match result {
            Ok(()) => (true, Lost::answered("health stream ended")),
            Err(e) => e,
        };
        let state = lost.state();
        if connected || reported_down != Some(state) {
            reporter.health(&service, addr, state, &lost.detail);
            reported_down = Some(state);
        }
        if connected {
            reporter.clear_load(&service, addr);
        }
        reporter.reconnect();
        if !backoff.wait(&cancel).await {
            return;
        }
        if let Some(pace) = &pace {
            if !pace.turn(&cancel).await {
                return;
            }
        }
    }
}

/// Why a probe's connection to its backend ended.
#[derive(Debug)]
struct Lost {
    /// Nothing answered (a timeout, no route): one replica's view.
    silent: bool,
    detail: String,
}

impl Lost {
    /// The backend's host answered, and not with SERVING.
    fn answered(detail: impl Into<String>) -> Lost {
        Lost {
            silent: false,
            detail: detail.into(),
        }
    }

    /// Nothing answered within the time allowed.
    fn silent(detail: impl Into<String>) -> Lost {
        Lost {
            silent: true,
            detail: detail.into(),
        }
    }

    fn state(&self) -> HealthState {
        if self.silent {
            HealthState::Silent
        } else {
            HealthState::Unreachable
        }
    }
}

/// Whether a connect error means no answer (a timeout, no route) rather
/// than the host's refusal.
fn is_silence(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{HostUnreachable, NetworkUnreachable, TimedOut};
    matches!(e.kind(), TimedOut | HostUnreachable | NetworkUnreachable)
}

/// One connection to the backend: health (and load) until it breaks.
async fn session(
    tcp: tokio::net::TcpStream,
    reporter: &Arc<Reporter>,
    s: &HealthSettings,
    service: &str,
    addr: SocketAddr,
    name: &str,
) -> Result<(), Lost> {
    let scheme = if s.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| Lost::answered(e.to_string()))?;
    if let Some(tls) = &s.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| Lost::answered(format!("TLS settings: {e}")))?;
    }
    // The channel gets this one connection and no other: when it breaks,
    // the session ends and the probe's own backoff decides when to retry.
    let once = std::sync::Mutex::new(Some(tcp));
    let connector = tower::service_fn(move |_: http::Uri| {
        let io = once.lock().expect("connection slot").take();
        async move {
            io.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotConnected, "probe connection closed")
            })
        }
    });
    let channel: Channel = endpoint
        .connect_timeout(s.timeout)
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            let chain = error_chain(&e);
            let detail = format!("connect: {chain}");
            if chain.contains("timed out") {
                Lost::silent(detail)
            } else {
                Lost::answered(detail)
            }
        })?;
    let _load = s.orca.then(|| {
        let task = tokio::spawn(crate::probe::load::collect(
            reporter.clone(),
            channel.clone(),
            service.to_string(),
            addr,
            s.orca_interval,
        ));
        AbortOnDropHandle::new(task)
    });
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: name.to_string(),
    };
    let watch = tokio::time::timeout(s.timeout, client.watch(request.clone())).await;
    let mut stream = match watch {
        Err(_) => {
            return Err(Lost::silent(format!(
                "no answer to Watch within {:?}",
                s.timeout
            )))
        }
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            return check_loop(reporter, s, service, addr, &mut client, request).await;
        }
        Ok(Err(status)) => {
            return Err(Lost::answered(format!(
                "Watch: {} {}",
                status.code(),
                status.message()
            )))
        }
    };
    let heartbeat = heartbeat(client, request, s.check_interval, s.timeout);
    tokio::pin!(heartbeat);
    loop {
        let message = tokio::select! {
            m = stream.message() => m,
            hung = &mut heartbeat => return Err(hung),
        };
        match message {
            Ok(Some(answer)) => apply(reporter, service, addr, answer.status),
            Ok(None) => return Err(Lost::answered("Watch stream ended")),
            Err(status) => {
                return Err(Lost::answered(format!(
                    "Watch stream broke: {} {}",
                    status.code(),
                    status.message()
                )))
            }
        }
    }
}

/// A TCP connection to `addr` within `timeout`. Made bare, before any
/// gRPC machinery: a refused connect (a dead backend, a zone of them) then
/// costs a socket and a syscall, not the setup of a whole channel.
/// Fails with `(false, why)`: not connected.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, (bool, Lost)> {
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            (
                false,
                Lost::silent(format!("connect: no answer within {timeout:?}")),
            )
        })?
        .map_err(|e| {
            let detail = format!("connect: {e}");
            let lost = if is_silence(&e) {
                Lost::silent(detail)
            } else {
                Lost::answered(detail)
            };
            (false, lost)
        })?;
    tcp.set_nodelay(true)
        .map_err(|e| (false, Lost::answered(format!("connect: {e}"))))?;
    Ok(tcp)
}

/// `Check` every `every` beside an open `Watch`; returns why the backend
/// counts as gone: no answer within `timeout`, or no connection. Any answer
/// the server itself gives (even an error status) proves it alive; the
/// status comes from `Watch`.
async fn heartbeat(
    mut client: HealthClient<Channel>,
    request: HealthCheckRequest,
    every: Duration,
    timeout: Duration,
) -> Lost {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match tokio::time::timeout(timeout, client.check(request.clone())).await {
            Err(_) => {
                return Lost::silent(format!(
                    "hung: no answer to the Check heartbeat within {timeout:?}"
                ))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Lost::answered(format!(
                    "Check heartbeat: {} {}",
                    status.code(),
                    status.message()
                ))
            }
            Ok(_) => {}
        }
    }
}

/// Periodic `Check`, for backends without `Watch`.
async fn check_loop(
    reporter: &Reporter,
    s: &HealthSettings,
    service: &str,
    addr: SocketAddr,
    client: &mut HealthClient<Channel>,
    request: HealthCheckRequest,
) -> Result<(), Lost> {
    tracing::debug!(service, %addr, "Watch unimplemented; polling Check");
    let mut tick = tokio::time::interval(s.check_interval);
    loop {
        tick.tick().await;
        match tokio::time::timeout(s.timeout, client.check(request.clone())).await {
            Err(_) => {
                return Err(Lost::silent(format!(
                    "no answer to Check within {:?}",
                    s.timeout
                )))
            }
            Ok(Ok(answer)) => apply(reporter, service, addr, answer.into_inner().status),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => reporter.health(
                service,
                addr,
                HealthState::NotServing,
                "health service unknown to the backend",
            ),
            Ok(Err(status)) => {
                return Err(Lost::answered(format!(
                    "Check: {} {}",
                    status.code(),
                    status.message()
                )))
            }
        }
    }
}

fn apply(reporter: &Reporter, service: &str, addr: SocketAddr, status: i32) {
    let (state, detail) = match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => (HealthState::Serving, "SERVING"),
        Ok(ServingStatus::NotServing) => (HealthState::NotServing, "NOT_SERVING"),
        Ok(ServingStatus::ServiceUnknown) => (HealthState::NotServing, "SERVICE_UNKNOWN"),
        _ => (HealthState::NotServing, "UNKNOWN"),
    };
    reporter.health(service, addr, state, detail);
}

/// An error and its sources, `outer: inner: innermost` (tonic's transport
/// errors say little at the top: the TLS or socket cause is below).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
