//! Load collection: who is busy.
//!
//! Subscribes to a backend's ORCA out-of-band stream
//! (`xds.service.orca.v3.OpenRcaService/StreamCoreMetrics`) on the health
//! probe's connection and hands every report to the [`Reporter`] (the
//! catalog, and the other replicas when clustered). Backends
//! without ORCA (UNIMPLEMENTED) simply have no load: they get the mean
//! weight. The stream ends with the connection; the probe restarts both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lb_proto::xds::data::orca::v3::OrcaLoadReport;
use lb_proto::xds::service::orca::v3::open_rca_service_client::OpenRcaServiceClient;
use lb_proto::xds::service::orca::v3::OrcaLoadReportRequest;
use tonic::transport::Channel;

use super::report::Reporter;
use crate::model::LoadSample;

/// Streams load reports of `addr` to `reporter` until the stream ends.
pub async fn collect(
    reporter: Arc<Reporter>,
    channel: Channel,
    service: String,
    addr: SocketAddr,
    every: Duration,
) {
    let request = OrcaLoadReportRequest {
        report_interval: prost_types::Duration::try_from(every).ok(),
        request_cost_names: Vec::new(),
    };
    let mut stream = match OpenRcaServiceClient::new(channel)
        .stream_core_metrics(request)
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            tracing::debug!(%service, %addr, "backend does not report load (ORCA unimplemented)");
            return;
        }
        Err(status) => {
            tracing::debug!(%service, %addr, code = ?status.code(), "ORCA stream refused");
            return;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(report)) => reporter.load(&service, addr, &sample(&report)),
            Ok(None) | Err(_) => {
                reporter.clear_load(&service, addr);
                return;
            }
        }
    }
}

/// The fields of an ORCA report that weighting and operators use: the one
/// place the wire form is read.
pub fn sample(r: &OrcaLoadReport) -> LoadSample {
    LoadSample {
        cpu_utilization: r.cpu_utilization,
        mem_utilization: r.mem_utilization,
        application_utilization: r.application_utilization,
        qps: r.rps_fractional,
        eps: r.eps,
        named_metrics: r
            .named_metrics
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    }
}
