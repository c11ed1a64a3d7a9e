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

use lb_proto::xds::service::orca::v3::open_rca_service_client::OpenRcaServiceClient;
use lb_proto::xds::service::orca::v3::OrcaLoadReportRequest;
use tonic::transport::Channel;

use crate::health::Reporter;

/// Streams load reports of `addr` to `reporter` until the stream ends.
pub async fn collect(
    reporter: Arc<Reporter>,
    channel: Channel,
    service: String,
    addr: SocketAddr,
    every: Duration,
) {
    let request = OrcaLoadReportRequest {
        report_interval: Some(prost_types::Duration {
            seconds: every.as_secs() as i64,
            nanos: every.subsec_nanos() as i32,
        }),
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
            Ok(Some(report)) => reporter.load(&service, addr, &report),
            Ok(None) | Err(_) => {
                reporter.clear_load(&service, addr);
                return;
            }
        }
    }
}
