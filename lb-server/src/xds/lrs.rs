//! Load reports in: `envoy.service.load_stats.v3.LoadReportingService`.
//!
//! C-core opens this stream when a Cluster names an LRS server (ours do:
//! `lrs_server: {self: {}}`). The LB answers the first request with "report
//! every cluster, every `--load-report-interval`", then folds each report
//! into the service's call totals, the same counters grpclb client stats
//! feed: issued calls are `started`, successes and errors `finished`,
//! successes `known_received`, and drops `dropped` (by category, as grpclb
//! drops are by token). The calls issued also count as demand of the
//! reporting node's zone ([`crate::zones`]).
//!
//! Each locality of a report is one backend (our assignments put its
//! address in `sub_zone`), so a report also says what each backend did
//! with the reporter's calls: those samples are pooled per backend
//! ([`crate::catalog::ServiceOutcomes`]). `LbChannel` reports here too,
//! with its node marked [`lb_proto::ext::LRS_OUTCOMES_ONLY`]: its totals
//! already came over BalanceLoad, so only its per-backend outcomes are
//! read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterStats;
use envoy_types::pb::envoy::service::load_stats::v3::{
    load_reporting_service_server::LoadReportingService, LoadStatsRequest, LoadStatsResponse,
};
use lb_proto::grpc::lb::v1::{ClientStats, ClientStatsPerToken};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Ads, Responses};
use crate::catalog::{reporter_name, Sample};
use crate::model::Locality;
use crate::net::limits::RateBudget;
use crate::streams::first_request::{first_request, timeout_status, FirstRequest};
use crate::zones::ZoneMember;

/// The LRS service, sharing the ADS service's parts and limits.
#[derive(Clone)]
pub struct LoadReporting(pub Arc<Ads>);

#[tonic::async_trait]
impl LoadReportingService for LoadReporting {
    type StreamLoadStatsStream = Responses<LoadStatsResponse>;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Self::StreamLoadStatsStream>, Status> {
        let ads = self.0.clone();
        let interval = ads.settings.load_report_interval;
        if interval.is_zero() {
            return Err(ads.refuse(
                "lrs_off",
                Status::unimplemented("load reports are off (--load-report-interval 0)"),
            ));
        }
        let peer = request.remote_addr();
        let permit = ads.permit(peer)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _permit = permit;
            let mut budget = RateBudget::new(ads.settings.request_max_rate);
            let mut answered = false;
            let mut reporter = Reporter::default();
            let timeout = ads.settings.initial_request_timeout;
            let mut first = Some(tokio::select! {
                _ = ads.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                first = first_request(&mut inbound, timeout) => first,
            });
            loop {
                let message = match first.take() {
                    Some(FirstRequest::Received(r)) => Ok(Some(r)),
                    Some(FirstRequest::TimedOut) => {
                        let status = ads.refuse(
                            "initial_request_timeout",
                            timeout_status(timeout, "LoadStatsRequest"),
                        );
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Some(FirstRequest::Ended) => Ok(None),
                    Some(FirstRequest::Failed(status)) => Err(status),
                    None => tokio::select! {
                        _ = ads.shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                        m = inbound.message() => m,
                    },
                };
                let report = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(status) => return read_failed(&ads, status),
                };
                if !budget.spend() {
                    let status = ads.refuse(
                        "lrs_rate",
                        Status::resource_exhausted(format!(
                            "load reports sent faster than {} per second",
                            budget.rate
                        )),
                    );
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                // The node is read from the first request only (as LRS
                // says), so one stream cannot pose as many reporters.
                if let Some(node) = report.node.as_ref().filter(|_| !reporter.named) {
                    reporter.named = true;
                    let zone = node.locality.clone().unwrap_or_default();
                    reporter.locality = ads
                        .parts
                        .zones
                        .client_zone(Locality::new(&zone.region, &zone.zone), peer);
                    reporter.name = match (node.id.as_str(), peer) {
                        ("", Some(peer)) => reporter_name(&peer.to_string()),
                        (id, _) => reporter_name(id),
                    };
                    reporter.outcomes_only = node
                        .client_features
                        .iter()
                        .any(|f| f == lb_proto::ext::LRS_OUTCOMES_ONLY);
                }
                for cluster in &report.cluster_stats {
                    fold(&ads, cluster, &mut reporter);
                }
                if !answered {
                    answered = true;
                    let response = LoadStatsResponse {
                        send_all_clusters: true,
                        load_reporting_interval: Some(super::resources::duration(interval)),
                        ..Default::default()
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Says why an LRS stream broke: at debug level when the client went away
/// (the common end of a stream), else counted and logged as a warning, one
/// line per minute.
fn read_failed(ads: &Ads, status: Status) {
    if matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown) {
        tracing::debug!(code = ?status.code(), message = status.message(), "LRS stream ended");
        return;
    }
    ads.parts.metrics.xds.refuse("lrs_stream_error");
    if let Some(held) = ads.log.allow("lrs_stream_error") {
        tracing::warn!(
            code = ?status.code(),
            message = status.message(),
            errors_not_logged = held,
            "LRS stream broken"
        );
    }
}

/// Most clusters one LRS stream's calls are counted for, per zone.
const MAX_REPORTED_CLUSTERS: usize = 1024;

/// Most localities (backends) of one cluster read from one report.
const MAX_REPORTED_LOCALITIES: usize = 4096;

/// Who reports on one LRS stream: its node's name and zone, whether its
/// calls are counted elsewhere, and its place in the zone table of each
/// cluster it reported.
#[derive(Default)]
struct Reporter {
    name: Arc<str>,
    locality: Locality,
    /// Its node was read (from its first request).
    named: bool,
    /// Its node said [`lb_proto::ext::LRS_OUTCOMES_ONLY`]: its totals
    /// came over BalanceLoad; only its per-backend outcomes are read here.
    outcomes_only: bool,
    members: HashMap<String, ZoneMember>,
}

/// One cluster's load report as grpclb client stats (sums saturate:
/// counts are the client's to choose).
pub(crate) fn client_stats(cluster: &ClusterStats) -> ClientStats {
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let (mut issued, mut ok, mut errors) = (0u64, 0u64, 0u64);
    for l in &cluster.upstream_locality_stats {
        issued = issued.saturating_add(l.total_issued_requests);
        ok = ok.saturating_add(l.total_successful_requests);
        errors = errors.saturating_add(l.total_error_requests);
    }
    ClientStats {
        num_calls_started: clamp(issued),
        num_calls_finished: clamp(ok.saturating_add(errors)),
        num_calls_finished_known_received: clamp(ok),
        calls_finished_with_drop: cluster
            .dropped_requests
            .iter()
            .take(16)
            .map(|d| ClientStatsPerToken {
                load_balance_token: d.category.clone(),
                num_calls: clamp(d.dropped_count),
            })
            .collect(),
        ..Default::default()
    }
}

/// One cluster's report per backend: each locality whose `sub_zone` is a
/// backend's address (as our assignments name them), as a sample of its
/// outcomes (at most [`MAX_REPORTED_LOCALITIES`]).
pub(crate) fn outcomes(cluster: &ClusterStats) -> Vec<(SocketAddr, Sample)> {
    use lb_proto::ext::{METRIC_CANCELLED, METRIC_DEADLINE, METRIC_LATENCY_MS};
    cluster
        .upstream_locality_stats
        .iter()
        .take(MAX_REPORTED_LOCALITIES)
        .filter_map(|l| {
            let addr = l.locality.as_ref()?.sub_zone.parse::<SocketAddr>().ok()?;
            let mut sample = Sample {
                issued: l.total_issued_requests,
                successes: l.total_successful_requests,
                errors: l.total_error_requests,
                in_progress: l.total_requests_in_progress,
                ..Default::default()
            };
            for m in &l.load_metric_stats {
                let n = m.num_requests_finished_with_metric;
                match m.metric_name.as_str() {
                    METRIC_LATENCY_MS => {
                        sample.timed = n;
                        sample.latency_ms = m.total_metric_value;
                    }
                    METRIC_DEADLINE => sample.deadline = n,
                    METRIC_CANCELLED => sample.cancelled = n,
                    _ => {}
                }
            }
            Some((addr, sample))
        })
        .collect()
}

/// Adds one cluster's report to its service's call totals, and to the
/// demand of the reporter's zone.
fn fold(ads: &Ads, cluster: &ClusterStats, reporter: &mut Reporter) {
    let Some(entry) = ads.parts.catalog.service(&cluster.cluster_name) else {
        ads.parts.metrics.xds.refuse("lrs_unknown_cluster");
        return;
    };
    ads.parts.metrics.xds.load_reports.inc();
    let samples = outcomes(cluster);
    if ads
        .parts
        .catalog
        .record_outcomes(&entry, &reporter.name, &samples)
        > 0
        || cluster.upstream_locality_stats.len() > samples.len()
    {
        ads.parts.metrics.xds.refuse("lrs_unknown_backend");
    }
    if reporter.outcomes_only {
        return;
    }
    let stats = client_stats(cluster);
    ads.parts.catalog.record_client_stats(&entry, &stats);
    if !reporter.members.contains_key(&cluster.cluster_name)
        && reporter.members.len() < MAX_REPORTED_CLUSTERS
    {
        if let Some(m) = ads.parts.zones.join_reporter(&entry, &reporter.locality) {
            reporter.members.insert(cluster.cluster_name.clone(), m);
        }
    }
    if let Some(m) = reporter.members.get(&cluster.cluster_name) {
        m.record_calls(stats.num_calls_started);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::time::SystemTime;

    use envoy_types::pb::envoy::config::endpoint::v3::{
        cluster_stats::DroppedRequests, UpstreamLocalityStats,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::catalog::Catalog;
    use crate::metrics::Metrics;
    use crate::model::Instance;
    use crate::policy::Policy;

    fn count() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(u64::MAX),
            Just(i64::MAX as u64),
            Just(0u64),
            0..1_000u64,
            any::<u64>()
        ]
    }

    fn cluster_stats() -> impl Strategy<Value = ClusterStats> {
        (
            prop::collection::vec([count(), count(), count()], 0..4),
            prop::collection::vec((0..3usize, count()), 0..20),
        )
            .prop_map(|(localities, drops)| ClusterStats {
                cluster_name: "svc".into(),
                upstream_locality_stats: localities
                    .into_iter()
                    .map(|[issued, ok, errors]| UpstreamLocalityStats {
                        total_issued_requests: issued,
                        total_successful_requests: ok,
                        total_error_requests: errors,
                        ..Default::default()
                    })
                    .collect(),
                dropped_requests: drops
                    .into_iter()
                    .map(|(c, n)| DroppedRequests {
                        category: format!("category-{c}"),
                        dropped_count: n,
                    })
                    .collect(),
                ..Default::default()
            })
    }

    proptest! {
        /// LRS reports with counts up to `u64::MAX` fold into the service's
        /// totals without a panic, and the totals only grow, up to
        /// `i64::MAX`.
        #[test]
        fn load_reports_fold_saturating(reports in prop::collection::vec(cluster_stats(), 1..6)) {
            let c = Catalog::new(Policy::default(), Arc::new(Metrics::new()), 1, false);
            c.upsert("memory", Instance {
                service: "svc".into(),
                key: "k".into(),
                addr: SocketAddr::from(([127, 0, 0, 1], 1)),
                weight: 1,
                metadata: None,
                registered_at: SystemTime::now(),
            }).unwrap();
            let entry = c.service("svc").unwrap();
            let mut before = [0i64; 5];
            for report in &reports {
                let stats = client_stats(report);
                prop_assert!(stats.num_calls_started >= 0 && stats.num_calls_finished >= 0);
                c.record_client_stats(&entry, &stats);
                let calls = &entry.calls;
                let after = [
                    &calls.started,
                    &calls.finished,
                    &calls.failed_to_send,
                    &calls.known_received,
                    &calls.dropped,
                ]
                .map(|a| a.load(Ordering::Relaxed));
                for (a, b) in after.iter().zip(&before) {
                    prop_assert!(a >= b && *a >= 0, "{before:?} → {after:?}");
                }
                before = after;
            }
        }
    }
}
