//! Server-side ORCA helper: backends record their load and serve it as
//! `xds.service.orca.v3.OpenRcaService/StreamCoreMetrics`, which the LB
//! subscribes to (out-of-band load reports).
//!
//! ```no_run
//! # async fn demo() {
//! use lb_client::orca::LoadRecorder;
//! let recorder = LoadRecorder::new();
//! recorder.set_application_utilization(0.42);
//! // in each handler: recorder.record_call(); on failure: recorder.record_error();
//! let orca = recorder.service(); // add to the tonic Server next to your services
//! # }
//! ```
//!
//! Queries and errors per second are computed from `record_call` /
//! `record_error` over each reporting interval, per subscriber.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use lb_proto::xds::data::orca::v3::OrcaLoadReport;
use lb_proto::xds::service::orca::v3::open_rca_service_server::{
    OpenRcaService, OpenRcaServiceServer,
};
use lb_proto::xds::service::orca::v3::OrcaLoadReportRequest;
use tonic::{Request, Response, Status};

/// Shortest reporting interval served, whatever a subscriber asks for.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Gauges {
    cpu: f64,
    mem: f64,
    application: f64,
    capacity: Option<f64>,
    named: HashMap<String, f64>,
}

#[derive(Default)]
struct Inner {
    gauges: Mutex<Gauges>,
    calls: AtomicU64,
    errors: AtomicU64,
}

/// A backend's load, shared by its handlers and its ORCA service. Cheap to clone.
#[derive(Clone, Default)]
pub struct LoadRecorder {
    inner: Arc<Inner>,
}

impl LoadRecorder {
    /// A recorder with everything at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one call served (for qps).
    #[inline]
    pub fn record_call(&self) {
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one failed call (for eps).
    #[inline]
    pub fn record_error(&self) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// CPU utilization, a fraction of the available CPU.
    pub fn set_cpu_utilization(&self, v: f64) {
        self.inner.gauges.lock().expect("gauges").cpu = v.max(0.0);
    }

    /// Memory utilization, a fraction of the available memory.
    pub fn set_mem_utilization(&self, v: f64) {
        self.inner.gauges.lock().expect("gauges").mem = v.max(0.0);
    }

    /// Application utilization (used by weighting in preference to CPU).
    pub fn set_application_utilization(&self, v: f64) {
        self.inner.gauges.lock().expect("gauges").application = v.max(0.0);
    }

    /// Calls per second this backend can serve at 100 % utilization. When
    /// set, application utilization is reported as measured qps / capacity
    /// (so weighted round robin converges on capacity), instead of the value
    /// given to [`LoadRecorder::set_application_utilization`].
    pub fn set_capacity(&self, qps: Option<f64>) {
        self.inner.gauges.lock().expect("gauges").capacity = qps.filter(|c| *c > 0.0);
    }

    /// An application-defined metric.
    pub fn set_named_metric(&self, name: &str, v: f64) {
        self.inner
            .gauges
            .lock()
            .expect("gauges")
            .named
            .insert(name.to_string(), v);
    }

    /// The report for the window since `(calls, errors, at)`; updates it.
    fn report(&self, last: &mut (u64, u64, Instant)) -> OrcaLoadReport {
        let now = Instant::now();
        let calls = self.inner.calls.load(Ordering::Relaxed);
        let errors = self.inner.errors.load(Ordering::Relaxed);
        let secs = now.duration_since(last.2).as_secs_f64().max(1e-3);
        let (qps, eps) = (
            (calls - last.0) as f64 / secs,
            (errors - last.1) as f64 / secs,
        );
        *last = (calls, errors, now);
        let g = self.inner.gauges.lock().expect("gauges");
        OrcaLoadReport {
            cpu_utilization: g.cpu,
            mem_utilization: g.mem,
            application_utilization: g.capacity.map(|c| qps / c).unwrap_or(g.application),
            rps_fractional: qps,
            eps,
            named_metrics: g.named.clone(),
            ..Default::default()
        }
    }

    /// The gRPC service to mount on the backend's server.
    pub fn service(&self) -> OpenRcaServiceServer<OrcaService> {
        self.service_with_min_interval(DEFAULT_MIN_INTERVAL)
    }

    /// Like [`LoadRecorder::service`], never reporting more often than `min`.
    pub fn service_with_min_interval(&self, min: Duration) -> OpenRcaServiceServer<OrcaService> {
        OpenRcaServiceServer::new(OrcaService {
            recorder: self.clone(),
            min_interval: min,
        })
    }
}

/// `OpenRcaService` over a [`LoadRecorder`].
pub struct OrcaService {
    recorder: LoadRecorder,
    min_interval: Duration,
}

type ReportStream = Pin<Box<dyn Stream<Item = Result<OrcaLoadReport, Status>> + Send>>;

#[tonic::async_trait]
impl OpenRcaService for OrcaService {
    type StreamCoreMetricsStream = ReportStream;

    async fn stream_core_metrics(
        &self,
        request: Request<OrcaLoadReportRequest>,
    ) -> Result<Response<Self::StreamCoreMetricsStream>, Status> {
        let asked = request
            .into_inner()
            .report_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(1));
        let every = asked.max(self.min_interval);
        let recorder = self.recorder.clone();
        let calls = recorder.inner.calls.load(Ordering::Relaxed);
        let errors = recorder.inner.errors.load(Ordering::Relaxed);
        let start = (calls, errors, Instant::now());
        let stream = futures::stream::unfold(
            (recorder, start, true),
            move |(recorder, mut last, first)| async move {
                if !first {
                    tokio::time::sleep(every).await;
                }
                let report = recorder.report(&mut last);
                Some((Ok(report), (recorder, last, false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_compute_rates_over_the_window() {
        let r = LoadRecorder::new();
        r.set_application_utilization(0.5);
        r.set_named_metric("queue", 3.0);
        let mut last = (0, 0, Instant::now() - Duration::from_secs(2));
        for _ in 0..10 {
            r.record_call();
        }
        r.record_error();
        let report = r.report(&mut last);
        assert!(
            (report.rps_fractional - 5.0).abs() < 0.1,
            "{}",
            report.rps_fractional
        );
        assert!((report.eps - 0.5).abs() < 0.05, "{}", report.eps);
        assert_eq!(report.application_utilization, 0.5);
        assert_eq!(report.named_metrics["queue"], 3.0);
        let again = r.report(&mut last);
        assert_eq!(again.rps_fractional, 0.0, "counters are per window");
        r.set_capacity(Some(10.0));
        last.2 = Instant::now() - Duration::from_secs(1);
        for _ in 0..5 {
            r.record_call();
        }
        let by_capacity = r.report(&mut last);
        assert!(
            (by_capacity.application_utilization - 0.5).abs() < 0.05,
            "{}",
            by_capacity.application_utilization
        );
    }
}
