//! Per-backend outcomes to the LB, over LRS
//! (`envoy.service.load_stats.v3.LoadReportingService`).
//!
//! BalanceLoad's `client_stats` count a client's calls all backends
//! together; what a backend did with them needs a report per backend. The
//! LB already reads those from proxyless xDS clients, over LRS, one
//! *locality* per backend (its address as `sub_zone`), so the channel
//! speaks the same protocol and the LB reads one format:
//!
//! 1. While a BalanceLoad stream is open, a second stream, `StreamLoadStats`,
//!    goes to the same LB over the same connection. Its first request names
//!    the client (node id: the channel's client id; its zone; user agent
//!    `lb-client`) and carries the feature
//!    [`lb_proto::ext::LRS_OUTCOMES_ONLY`]: the totals of these calls
//!    already went over BalanceLoad and are not to be counted twice.
//! 2. The LB answers with the interval (at least [`MIN_INTERVAL`] is kept)
//!    and which clusters it wants (all, or the channel's service by name).
//! 3. Every interval, one `ClusterStats` for the service: per backend the
//!    calls issued, succeeded, failed and in progress, and latency, calls
//!    ended by their deadline and calls the caller cancelled as named
//!    metrics ([`crate::outcomes`] says which end counts as what). An
//!    interval with nothing to say sends nothing.
//!
//! An LB that does not serve LRS (`UNIMPLEMENTED`) is not asked again while
//! the BalanceLoad stream lasts; a broken LRS stream is opened again after a
//! backoff. A lost report loses one interval's counts, never a call.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lb_proto::envoy::service::load_stats::v3::{
    load_reporting_service_client::LoadReportingServiceClient, ClusterStats, LoadStatsRequest,
    LoadStatsResponse, Locality, Node,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::state::ChannelState;

/// Shortest report interval obeyed, whatever the LB asks.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Longest report interval obeyed (a larger one would overflow timers).
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Time allowed for the LB's first answer on a report stream.
const FIRST_ANSWER: Duration = Duration::from_secs(10);

/// Who reports: the node of the first request.
pub(crate) fn node(client_id: &str, zone: Option<&str>) -> Node {
    Node {
        id: client_id.to_string(),
        locality: zone.map(|z| Locality {
            zone: z.to_string(),
            ..Default::default()
        }),
        user_agent_name: "lb-client".into(),
        user_agent_version_type: Some(
            lb_proto::envoy::service::load_stats::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        ),
        client_features: vec![lb_proto::ext::LRS_OUTCOMES_ONLY.into()],
        ..Default::default()
    }
}

/// Reports the channel's per-backend outcomes to the LB behind `channel`
/// until dropped (the BalanceLoad stream's task holds it).
pub(crate) async fn run(channel: Channel, state: Arc<ChannelState>, node: Node) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        // A stream that lasted earns a fresh backoff.
        backoff.attempt();
        match stream(&channel, &state, &node).await {
            Ok(()) => backoff.reset(),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::debug!(
                    message = status.message(),
                    "the load balancer takes no outcome reports"
                );
                return;
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "outcome report stream ended");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// What the LB asked for in its last answer.
struct Asked {
    every: Duration,
    wanted: bool,
}

impl Asked {
    fn of(response: &LoadStatsResponse, service: &str) -> Asked {
        let every = response
            .load_reporting_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(MIN_INTERVAL)
            .clamp(MIN_INTERVAL, MAX_INTERVAL);
        Asked {
            every,
            wanted: response.send_all_clusters || response.clusters.iter().any(|c| c == service),
        }
    }
}

/// One report stream, from its first request to its end.
async fn stream(
    channel: &Channel,
    state: &Arc<ChannelState>,
    node: &Node,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<LoadStatsRequest>(2);
    let _ = tx
        .send(LoadStatsRequest {
            node: Some(node.clone()),
            cluster_stats: Vec::new(),
        })
        .await;
    let mut inbound = LoadReportingServiceClient::new(channel.clone())
        .stream_load_stats(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(FIRST_ANSWER, inbound.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer to the first load report"))??
        .ok_or_else(|| tonic::Status::unavailable("report stream ended before its answer"))?;
    let mut asked = Asked::of(&first, &state.service);
    let mut last = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(last + asked.every, asked.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let localities = state.take_outcomes();
                let since = now - std::mem::replace(&mut last, now);
                if !asked.wanted || localities.is_empty() {
                    continue;
                }
                let report = LoadStatsRequest {
                    node: None,
                    cluster_stats: vec![ClusterStats {
                        cluster_name: state.service.clone(),
                        upstream_locality_stats: localities,
                        load_report_interval: prost_types::Duration::try_from(since).ok(),
                        ..Default::default()
                    }],
                };
                if tx.send(report).await.is_err() {
                    return Ok(());
                }
                state.counters.outcome_reports.fetch_add(1, Ordering::Relaxed);
            }
            answer = inbound.message() => {
                let Some(answer) = answer? else { return Ok(()) };
                let next = Asked::of(&answer, &state.service);
                if next.every != asked.every {
                    tick = tokio::time::interval_at(tokio::time::Instant::now() + next.every, next.every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                asked = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_asked_is_kept_above_the_minimum() {
        let mut r = LoadStatsResponse {
            send_all_clusters: true,
            load_reporting_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1,
            }),
            ..Default::default()
        };
        let a = Asked::of(&r, "svc");
        assert_eq!(a.every, MIN_INTERVAL);
        assert!(a.wanted);
        r.send_all_clusters = false;
        r.clusters = vec!["other".into()];
        assert!(!Asked::of(&r, "svc").wanted);
        r.clusters.push("svc".into());
        r.load_reporting_interval = Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        });
        let a = Asked::of(&r, "svc");
        assert!(a.wanted);
        assert_eq!(a.every, Duration::from_secs(5));
    }
}
