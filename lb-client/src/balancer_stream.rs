//! The connection to the load balancer: one `BalanceLoad` stream at a time,
//! moving across the configured LB addresses when a stream breaks.
//!
//! - The first answer must be `initial_response`; its interval schedules
//!   `client_stats` reports.
//! - Each `server_list` replaces the list in force; `fallback_response`
//!   switches to the fallback backends.
//! - When a stream breaks, the last list stays in force and the next LB
//!   address is tried after a short random delay (after a working stream) or
//!   a jittered exponential backoff (after failed attempts). A host name
//!   stands for every address it resolves to (re-resolved on each attempt),
//!   so one DNS name can front all LB replicas.
//! - The stream carries the channel's client id (`lb-client-id` metadata),
//!   which the LB uses to give this client a stable subset of backends.
//! - Beside it, on the same connection, per-backend outcomes go to the same
//!   LB over LRS ([`crate::load_report`]).
//! - If no list arrives within the fallback timeout, or every LB address
//!   fails before any list was received, or (as C-core's grpclb does) the
//!   LB is lost and every backend of its last list has failed, the
//!   fallback backends are used until a list arrives.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lb_proto::grpc::lb::v1::{
    load_balance_request::LoadBalanceRequestType, load_balance_response::LoadBalanceResponseType,
    load_balancer_client::LoadBalancerClient, InitialLoadBalanceRequest, LoadBalanceRequest,
    Server,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::backoff::Backoff;
use crate::state::{ChannelState, ListEntry};
use crate::stats::ZeroReports;
use tokio_util::task::AbortOnDropHandle;

/// Settings of the LB connection.
#[derive(Debug, Clone)]
pub struct LbSettings {
    /// LB addresses (`host:port`), tried in turn.
    pub lb_addrs: Vec<String>,
    /// Sent to the LB as `lb-client-id`: seeds this client's subset.
    pub client_id: String,
    /// Sent to the LB as `lb-client-zone`: the LB keeps this client's calls
    /// in its zone as far as the zone's backends can take them.
    pub zone: Option<String>,
    /// Time allowed for connecting to one LB and receiving `initial_response`.
    pub connect_timeout: Duration,
    /// Reconnect backoff after failed attempts: first delay.
    pub backoff_initial: Duration,
    /// Reconnect backoff: longest delay.
    pub backoff_max: Duration,
    /// Use fallback backends if no list arrived within this time.
    pub fallback_timeout: Duration,
    /// TLS towards the LBs, if they serve it.
    pub tls: Option<crate::TlsConfig>,
    /// Heartbeat asked of the LB (`None`: none asked).
    pub heartbeat: Option<Duration>,
    /// HTTP/2 PINGs towards the LB after `.0` with nothing read, each
    /// allowed `.1` (`None`: no PINGs).
    pub keepalive: Option<(Duration, Duration)>,
}

/// Metadata key naming the client to the LB.
pub use lb_proto::ext::CLIENT_ID_HEADER as CLIENT_ID;

/// Metadata key naming the client's zone to the LB.
pub use lb_proto::ext::CLIENT_ZONE_HEADER as CLIENT_ZONE;

/// How one stream ended.
struct Ended {
    got_list: bool,
    why: String,
}

/// Heartbeat asked of the LB: a message whenever the stream has been quiet
/// this long ([`lb_proto::ext::HEARTBEAT_HEADER`]).
pub const LB_HEARTBEAT: Duration = Duration::from_secs(1);
/// After this long with nothing read (no list, no heartbeat), the client
/// PINGs the LB.
pub const LB_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a PING may go unanswered before the LB counts as gone and the
/// client moves to another one: a hung or cut-off replica is left within
/// interval + timeout (6 s) of its last message. On a lossy link the
/// heartbeats keep coming (late, not lost: TCP retransmits them), so the
/// client PINGs only after a gap of 2 s and gives up only after 6 s of
/// silence, which at 30 % loss takes a segment lost about nine times in a
/// row.
pub const LB_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(4);

/// Runs until `cancel`: keeps a BalanceLoad stream to one of the LBs.
pub async fn run(state: Arc<ChannelState>, settings: LbSettings, cancel: CancellationToken) {
    let fallback_timer = {
        let state = state.clone();
        let timeout = settings.fallback_timeout;
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(timeout) => {
                    if !state.got_lb_list() {
                        state.fallback_if_waiting(&format!("no list from any load balancer within {timeout:?}"));
                    }
                }
            }
        })
    };
    let mut index = rand::rng().random::<u32>() as usize;
    let mut backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
    let mut failures_in_a_row = 0usize;
    loop {
        let addrs = tokio::select! {
            _ = cancel.cancelled() => break,
            a = expand(&settings.lb_addrs) => a,
        };
        let n = addrs.len().max(1);
        let target = addrs[index % n].clone();
        let addr = target.addr.clone();
        let ended = tokio::select! {
            _ = cancel.cancelled() => break,
            e = session(&state, &target, &settings, &cancel) => e,
        };
        state.lb_lost();
        if cancel.is_cancelled() {
            break;
        }
        let delay = if ended.got_list {
            failures_in_a_row = 0;
            backoff.reset();
            tracing::info!(lb = %addr, why = %ended.why, "load balancer stream ended; keeping the last list");
            // Spread reconnects so that clients of a dead LB do not all hit
            // the survivors at the same instant.
            let spread = settings.backoff_initial.as_millis().max(1) as u64;
            Duration::from_millis(rand::rng().random_range(0..spread))
        } else {
            failures_in_a_row += 1;
            tracing::warn!(lb = %addr, why = %ended.why, "load balancer unavailable");
            if failures_in_a_row >= n && !state.got_lb_list() {
                state.fallback_if_waiting(&format!(
                    "every load balancer failed; last: {}",
                    ended.why
                ));
            }
            backoff.next_delay()
        };
        index += 1;
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    fallback_timer.abort();
}

/// One LB address to try, and the host name it was found under (the name
/// TLS verifies the LB's certificate against).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    addr: String,
    host: Option<String>,
}

/// The LB addresses to try: every configured entry, host names replaced by
/// all the addresses they resolve to (in a stable order). An entry that does
/// not resolve is kept as written, so that its error is reported.
async fn expand(entries: &[String]) -> Vec<Target> {
    let mut out = Vec::new();
    for entry in entries {
        if entry.parse::<SocketAddr>().is_ok() {
            out.push(Target {
                addr: entry.clone(),
                host: None,
            });
            continue;
        }
        let host = entry
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .filter(|h| !h.is_empty());
        let lookup = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(entry));
        let mut found: Vec<SocketAddr> = match lookup.await {
            Ok(Ok(found)) => found.collect(),
            _ => Vec::new(),
        };
        found.sort();
        found.dedup();
        if found.is_empty() {
            out.push(Target {
                addr: entry.clone(),
                host: host.clone(),
            });
        }
        out.extend(found.iter().map(|a| Target {
            addr: a.to_string(),
            host: host.clone(),
        }));
    }
    out
}

/// One BalanceLoad stream, from connect to end.
async fn session(
    state: &Arc<ChannelState>,
    target: &Target,
    settings: &LbSettings,
    cancel: &CancellationToken,
) -> Ended {
    let mut got_list = false;
    let why = match stream(state, target, settings, cancel, &mut got_list).await {
        Ok(()) => "stream closed by the load balancer".to_string(),
        Err(e) => e,
    };
    Ended { got_list, why }
}

async fn stream(
    state: &Arc<ChannelState>,
    target: &Target,
    settings: &LbSettings,
    cancel: &CancellationToken,
    got_list: &mut bool,
) -> Result<(), String> {
    let addr = target.addr.as_str();
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("bad LB address {addr:?}: {e}"))?;
    if let Some(tls) = &settings.tls {
        let mut config = tls.tonic();
        if let (None, Some(host)) = (tls.server_name_override(), &target.host) {
            config = config.domain_name(host.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS settings for {addr}: {e}"))?;
    }
    let endpoint = endpoint
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true);
    let endpoint = match settings.keepalive {
        Some((interval, timeout)) => endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout),
        None => endpoint,
    };
    let (tx, rx) = mpsc::channel::<LoadBalanceRequest>(4);
    tx.send(LoadBalanceRequest {
        load_balance_request_type: Some(LoadBalanceRequestType::InitialRequest(
            InitialLoadBalanceRequest {
                name: state.service.clone(),
            },
        )),
    })
    .await
    .map_err(|_| "request channel closed".to_string())?;

    let opening = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Ok(id) = settings.client_id.parse() {
            request.metadata_mut().insert(CLIENT_ID, id);
        }
        if let Some(Ok(zone)) = settings.zone.as_deref().map(str::parse) {
            request.metadata_mut().insert(CLIENT_ZONE, zone);
        }
        if let Some(every) = settings.heartbeat {
            let ms = every.as_millis().max(1).to_string();
            if let Ok(ms) = ms.parse() {
                request
                    .metadata_mut()
                    .insert(lb_proto::ext::HEARTBEAT_HEADER, ms);
            }
        }
        let mut inbound = LoadBalancerClient::new(channel.clone())
            .balance_load(request)
            .await
            .map_err(|s| format!("{addr}: {} {}", s.code(), s.message()))?
            .into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|s| format!("{addr}: {} {}", s.code(), s.message()))?
            .ok_or_else(|| format!("{addr}: stream ended before initial_response"))?;
        match first.load_balance_response_type {
            Some(LoadBalanceResponseType::InitialResponse(r)) => {
                Ok((channel, inbound, r.client_stats_report_interval))
            }
            other => Err(format!(
                "{addr}: expected initial_response first, got {other:?}"
            )),
        }
    };
    let (channel, mut inbound, interval) = tokio::time::timeout(settings.connect_timeout, opening)
        .await
        .map_err(|_| {
            format!(
                "{addr}: no initial_response within {:?}",
                settings.connect_timeout
            )
        })??;

    let interval = interval
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero());
    let reporter =
        interval.map(|every| tokio::spawn(report_stats(state.clone(), tx.clone(), every)));
    let _reporter = reporter.map(AbortOnDropHandle::new);
    // Per-backend outcomes go to the same LB, over LRS on this connection.
    let _outcomes = state.count_outcomes.then(|| {
        let node = crate::load_report::node(&settings.client_id, settings.zone.as_deref());
        AbortOnDropHandle::new(tokio::spawn(crate::load_report::run(
            channel,
            state.clone(),
            node,
        )))
    });
    state.counters.lb_streams.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(lb = %addr, service = %state.service, ?interval, "load balancer stream open");
    *state.current_lb.lock().expect("lb lock") = addr.parse().ok();

    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = inbound.message() => m.map_err(|s| format!("{addr}: {} {}", s.code(), s.message()))?,
        };
        match message.and_then(|m| m.load_balance_response_type) {
            Some(LoadBalanceResponseType::ServerList(list)) => {
                let entries = to_entries(&list.servers);
                tracing::debug!(lb = %addr, service = %state.service, entries = entries.len(), "server list");
                state.set_lb_list(entries);
                *got_list = true;
            }
            Some(LoadBalanceResponseType::FallbackResponse(_)) => {
                state.enter_fallback("the load balancer asked for fallback");
            }
            Some(LoadBalanceResponseType::InitialResponse(_)) => {
                // The heartbeat asked for: reading it is all it is for.
                tracing::trace!(lb = %addr, "heartbeat");
            }
            None => return Ok(()),
        }
    }
}

/// Shortest client-stats interval obeyed, whatever the LB asks (C-core's
/// `kMinClientLoadReportingInterval`): an LB asking for 1 ns must not make
/// the client spin.
pub const MIN_STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Sends the channel's call counters every `every` (at least
/// [`MIN_STATS_INTERVAL`]), skipping repeated all-zero reports.
async fn report_stats(
    state: Arc<ChannelState>,
    tx: mpsc::Sender<LoadBalanceRequest>,
    every: Duration,
) {
    let every = every.max(MIN_STATS_INTERVAL);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut zeros = ZeroReports::default();
    loop {
        tick.tick().await;
        let stats = state.stats.take();
        if !zeros.should_send(&stats) {
            continue;
        }
        let report = LoadBalanceRequest {
            load_balance_request_type: Some(LoadBalanceRequestType::ClientStats(stats)),
        };
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

/// Converts received servers to list entries, skipping malformed ones.
pub fn to_entries(servers: &[Server]) -> Vec<ListEntry> {
    servers
        .iter()
        .filter_map(|s| {
            let token = (!s.load_balance_token.is_empty())
                .then(|| Arc::from(s.load_balance_token.as_str()));
            if s.drop {
                return Some(ListEntry {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    token,
                    drop: true,
                });
            }
            let Some(addr) = s.socket_addr() else {
                tracing::warn!(
                    ip_len = s.ip_address.len(),
                    port = s.port,
                    "server entry with a bad address skipped"
                );
                return None;
            };
            Some(ListEntry {
                addr,
                token,
                drop: false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use lb_proto::grpc::lb::v1::ClientStats;

    use super::*;

    #[tokio::test]
    async fn lb_names_expand_to_every_address_and_unresolvable_ones_stay() {
        let entries = [
            "127.0.0.2:7000".to_string(),
            "localhost:7001".to_string(),
            "no-such-lb.invalid:7002".to_string(),
        ];
        let targets = expand(&entries).await;
        let addrs: Vec<&str> = targets.iter().map(|t| t.addr.as_str()).collect();
        assert_eq!(addrs[0], "127.0.0.2:7000");
        assert_eq!(targets[0].host, None);
        assert!(addrs.contains(&"127.0.0.1:7001"), "{addrs:?}");
        assert!(!addrs.contains(&"localhost:7001"));
        assert_eq!(*addrs.last().unwrap(), "no-such-lb.invalid:7002");
        // TLS verifies an LB found by name against that name.
        let local = targets.iter().find(|t| t.addr == "127.0.0.1:7001").unwrap();
        assert_eq!(local.host.as_deref(), Some("localhost"));
    }

    #[test]
    fn servers_convert_and_bad_ones_are_skipped() {
        let servers = vec![
            Server {
                ip_address: vec![127, 0, 0, 1],
                port: 80,
                load_balance_token: "a".into(),
                drop: false,
            },
            Server {
                ip_address: vec![1, 2, 3],
                port: 80,
                load_balance_token: "bad".into(),
                drop: false,
            },
            Server {
                ip_address: vec![127, 0, 0, 1],
                port: 70000,
                load_balance_token: "bad".into(),
                drop: false,
            },
            Server {
                ip_address: vec![],
                port: 0,
                load_balance_token: "d".into(),
                drop: true,
            },
            Server {
                ip_address: std::net::Ipv6Addr::LOCALHOST.octets().to_vec(),
                port: 81,
                load_balance_token: String::new(),
                drop: false,
            },
        ];
        let entries = to_entries(&servers);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].addr, "127.0.0.1:80".parse().unwrap());
        assert_eq!(entries[0].token.as_deref(), Some("a"));
        assert!(entries[1].drop);
        assert_eq!(entries[2].addr, "[::1]:81".parse().unwrap());
        assert_eq!(entries[2].token, None);
    }

    /// The reports `report_stats` sends within `run` (virtual time), with
    /// one call started every 100 ms when `calling`.
    async fn reports_within(every: Duration, run: Duration, calling: bool) -> Vec<ClientStats> {
        let state = ChannelState::new("svc".into(), Vec::new(), Default::default(), false);
        let (tx, mut rx) = mpsc::channel(10_000);
        let reporter = AbortOnDropHandle::new(tokio::spawn(report_stats(state.clone(), tx, every)));
        let end = tokio::time::Instant::now() + run;
        while tokio::time::Instant::now() < end {
            if calling {
                state.stats.started();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(reporter);
        let mut reports = Vec::new();
        while let Ok(r) = rx.try_recv() {
            if let Some(LoadBalanceRequestType::ClientStats(s)) = r.load_balance_request_type {
                reports.push(s);
            }
        }
        reports
    }

    /// An LB asking for reports every nanosecond gets one a second, as
    /// from C-core (its minimum is 1 s), not a client spinning.
    #[tokio::test(start_paused = true)]
    async fn stats_interval_below_one_second_is_raised_to_it() {
        let reports =
            reports_within(Duration::from_nanos(1), Duration::from_millis(3_050), true).await;
        assert!(
            (2..=4).contains(&reports.len()),
            "{} reports in 3 s",
            reports.len()
        );
    }

    /// As C-core: a report whose counters are all zero is sent once after
    /// calls stop, then skipped while they stay zero.
    #[tokio::test(start_paused = true)]
    async fn all_zero_reports_are_not_repeated() {
        let reports =
            reports_within(Duration::from_secs(1), Duration::from_millis(10_050), false).await;
        assert_eq!(reports.len(), 1, "{} reports in 10 s", reports.len());
        assert_eq!(reports[0].num_calls_started, 0);
    }
}
