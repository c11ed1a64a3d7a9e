//! Per-backend outcomes: what each backend did with this channel's calls,
//! counted per call and taken as one report per interval
//! ([`crate::load_report`] sends it to the LB over LRS).
//!
//! A call is *issued* when it is sent to its backend and *in progress*
//! until it ends. It ends in one of four ways, and only one of them is held
//! against the backend:
//!
//! | end | counted as |
//! | --- | --- |
//! | `OK`, or a status that is the application's answer (`NOT_FOUND`, `INVALID_ARGUMENT`, …) | success |
//! | `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS`, `UNIMPLEMENTED`, `RESOURCE_EXHAUSTED`, a reset stream or a lost connection, a response with no status | error of the backend |
//! | `DEADLINE_EXCEEDED` (the caller's deadline, here or at the backend) | deadline: the caller's budget, with its latency |
//! | the caller dropped the call (or its response) before the end, or `CANCELLED` | cancelled by the caller |
//! | never written (its connection had closed; it goes to the next backend) | issued only |
//!
//! Latency runs from the request sent to the response's end (its
//! trailers), for every call that ended by itself or by its deadline.
//! Counting costs a call two clock reads and a few relaxed atomic adds on
//! counters of its own backend.

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use lb_proto::envoy::service::load_stats::v3::{EndpointLoadMetricStats, UpstreamLocalityStats};
use lb_proto::ext::{METRIC_CANCELLED, METRIC_DEADLINE, METRIC_LATENCY_MS};
use tonic::Code;

/// One backend's counters since the last report (in progress: now).
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    issued: AtomicU64,
    in_progress: AtomicI64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    deadline: AtomicU64,
    cancelled: AtomicU64,
    /// Calls whose latency was measured, and the sum, in microseconds.
    timed: AtomicU64,
    latency_us: AtomicU64,
}

/// How a call ended, as far as its backend is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The backend answered.
    Success,
    /// The backend (or the way to it) failed the call.
    Error,
    /// The caller's deadline ended it.
    Deadline,
    /// The caller gave it up.
    Cancelled,
    /// It was never written to the backend (its connection had closed): it
    /// goes to the next backend, and says nothing of this one beyond what
    /// its health checks see.
    NotSent,
}

impl End {
    /// The end a call's gRPC status means.
    pub(crate) fn of_code(code: Code) -> End {
        match code {
            Code::Unavailable
            | Code::Internal
            | Code::Unknown
            | Code::DataLoss
            | Code::Unimplemented
            | Code::ResourceExhausted => End::Error,
            Code::DeadlineExceeded => End::Deadline,
            Code::Cancelled => End::Cancelled,
            _ => End::Success,
        }
    }

    /// The end the `grpc-status` in `headers` (trailers, or a
    /// trailers-only response's headers) means; `None` without one.
    fn of_headers(headers: &http::HeaderMap) -> Option<End> {
        let status = headers.get("grpc-status")?;
        let code = status
            .to_str()
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .map_or(Code::Unknown, Code::from);
        Some(End::of_code(code))
    }
}

impl Outcomes {
    /// Calls in progress now.
    pub(crate) fn in_progress(&self) -> i64 {
        self.in_progress.load(Ordering::Relaxed)
    }

    /// The counters as one locality's stats (the backend's address as its
    /// `sub_zone`), reset for the next interval; `None` when nothing
    /// happened and nothing is in progress.
    pub(crate) fn take(&self, addr: std::net::SocketAddr) -> Option<UpstreamLocalityStats> {
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        let issued = take(&self.issued);
        let succeeded = take(&self.succeeded);
        let failed = take(&self.failed);
        let deadline = take(&self.deadline);
        let cancelled = take(&self.cancelled);
        let timed = take(&self.timed);
        let latency_us = take(&self.latency_us);
        let in_progress = self.in_progress.load(Ordering::Relaxed).max(0) as u64;
        if issued + succeeded + failed + deadline + cancelled + in_progress == 0 {
            return None;
        }
        let metric = |name: &str, n: u64, total: f64| EndpointLoadMetricStats {
            metric_name: name.to_string(),
            num_requests_finished_with_metric: n,
            total_metric_value: total,
        };
        let mut metrics = Vec::with_capacity(3);
        if timed > 0 {
            metrics.push(metric(METRIC_LATENCY_MS, timed, latency_us as f64 / 1e3));
        }
        if deadline > 0 {
            metrics.push(metric(METRIC_DEADLINE, deadline, deadline as f64));
        }
        if cancelled > 0 {
            metrics.push(metric(METRIC_CANCELLED, cancelled, cancelled as f64));
        }
        Some(UpstreamLocalityStats {
            locality: Some(lb_proto::envoy::service::load_stats::v3::Locality {
                sub_zone: addr.to_string(),
                ..Default::default()
            }),
            total_successful_requests: succeeded,
            total_requests_in_progress: in_progress,
            total_error_requests: failed,
            total_issued_requests: issued,
            load_metric_stats: metrics,
        })
    }
}

/// One call's record on its backend, opened when the call is sent and
/// closed by how it ended; dropped while open, it counts as the caller's
/// cancellation.
pub(crate) struct CallOutcome {
    outcomes: Arc<Outcomes>,
    sent: Instant,
    open: bool,
}

impl CallOutcome {
    /// Opens a record: the call is issued and in progress.
    pub(crate) fn start(outcomes: Arc<Outcomes>) -> Self {
        outcomes.issued.fetch_add(1, Ordering::Relaxed);
        outcomes.in_progress.fetch_add(1, Ordering::Relaxed);
        CallOutcome {
            outcomes,
            sent: Instant::now(),
            open: true,
        }
    }

    /// Closes the record with `end`.
    pub(crate) fn finish(mut self, end: End) {
        self.close(end);
    }

    fn close(&mut self, end: End) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        let o = &self.outcomes;
        o.in_progress.fetch_sub(1, Ordering::Relaxed);
        let counter = match end {
            End::Success => &o.succeeded,
            End::Error => &o.failed,
            End::Deadline => &o.deadline,
            End::Cancelled => &o.cancelled,
            End::NotSent => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if end != End::Cancelled {
            let us = self.sent.elapsed().as_micros().min(u64::MAX as u128) as u64;
            o.timed.fetch_add(1, Ordering::Relaxed);
            o.latency_us.fetch_add(us, Ordering::Relaxed);
        }
    }
}

impl Drop for CallOutcome {
    fn drop(&mut self) {
        self.close(End::Cancelled);
    }
}

/// A response body that closes its call's record when it ends: by the
/// status in its trailers, by its error, or, dropped before its end, as
/// the caller's cancellation.
pub(crate) struct OutcomeBody<B> {
    inner: B,
    record: Option<CallOutcome>,
}

impl<B> OutcomeBody<B> {
    /// `inner`, closing `record` at its end. A trailers-only response (its
    /// status in `headers`) closes the record at once.
    pub(crate) fn new(inner: B, headers: &http::HeaderMap, record: CallOutcome) -> Self {
        let record = match End::of_headers(headers) {
            Some(end) => {
                record.finish(end);
                None
            }
            None => Some(record),
        };
        OutcomeBody { inner, record }
    }

    fn close(&mut self, end: End) {
        if let Some(record) = self.record.take() {
            record.finish(end);
        }
    }
}

impl<B> Body for OutcomeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(end) = f.trailers_ref().and_then(End::of_headers) {
                    this.close(end);
                }
            }
            Some(Err(_)) => this.close(End::Error),
            // A body that ends without a status is a broken answer.
            None => this.close(End::Error),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> std::net::SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn metric(stats: &UpstreamLocalityStats, name: &str) -> u64 {
        stats
            .load_metric_stats
            .iter()
            .find(|m| m.metric_name == name)
            .map_or(0, |m| m.num_requests_finished_with_metric)
    }

    #[test]
    fn codes_split_into_the_backends_errors_and_the_callers_doing() {
        assert_eq!(End::of_code(Code::Ok), End::Success);
        assert_eq!(End::of_code(Code::NotFound), End::Success);
        assert_eq!(End::of_code(Code::InvalidArgument), End::Success);
        assert_eq!(End::of_code(Code::Unavailable), End::Error);
        assert_eq!(End::of_code(Code::Internal), End::Error);
        assert_eq!(End::of_code(Code::DeadlineExceeded), End::Deadline);
        assert_eq!(End::of_code(Code::Cancelled), End::Cancelled);
    }

    #[test]
    fn records_count_once_and_a_dropped_one_is_the_callers_cancellation() {
        let o = Arc::new(Outcomes::default());
        CallOutcome::start(o.clone()).finish(End::Success);
        CallOutcome::start(o.clone()).finish(End::Error);
        CallOutcome::start(o.clone()).finish(End::Deadline);
        drop(CallOutcome::start(o.clone()));
        let open = CallOutcome::start(o.clone());
        let r = o.take(addr()).unwrap();
        assert_eq!(r.total_issued_requests, 5);
        assert_eq!(r.total_successful_requests, 1);
        assert_eq!(r.total_error_requests, 1);
        assert_eq!(r.total_requests_in_progress, 1);
        assert_eq!(metric(&r, METRIC_DEADLINE), 1);
        assert_eq!(metric(&r, METRIC_CANCELLED), 1);
        assert_eq!(
            metric(&r, METRIC_LATENCY_MS),
            3,
            "cancelled calls have no latency"
        );
        assert_eq!(r.locality.unwrap().sub_zone, "127.0.0.1:9");
        // Reset, except what is still in progress.
        let r = o.take(addr()).unwrap();
        assert_eq!(r.total_issued_requests, 0);
        assert_eq!(r.total_requests_in_progress, 1);
        open.finish(End::Success);
        let r = o.take(addr()).unwrap();
        assert_eq!(r.total_successful_requests, 1);
        assert!(o.take(addr()).is_none(), "nothing happened: no report");
    }

    #[tokio::test]
    async fn a_body_closes_its_record_by_its_trailers_or_as_cancelled() {
        use http_body_util::BodyExt;
        let o = Arc::new(Outcomes::default());
        let with_trailers = |code: &'static str| {
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static(code));
            http_body_util::StreamBody::new(futures::stream::iter(vec![
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
                Ok(Frame::trailers(t)),
            ]))
        };
        let none = http::HeaderMap::new();
        let body = OutcomeBody::new(with_trailers("14"), &none, CallOutcome::start(o.clone()));
        body.collect().await.unwrap();
        let body = OutcomeBody::new(with_trailers("5"), &none, CallOutcome::start(o.clone()));
        body.collect().await.unwrap();
        // Dropped before its end: the caller's doing.
        drop(OutcomeBody::new(
            with_trailers("0"),
            &none,
            CallOutcome::start(o.clone()),
        ));
        // Trailers-only: closed by the headers.
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("13"));
        drop(OutcomeBody::new(
            http_body_util::Empty::<Bytes>::new(),
            &headers,
            CallOutcome::start(o.clone()),
        ));
        let r = o.take(addr()).unwrap();
        assert_eq!(r.total_issued_requests, 4);
        assert_eq!(r.total_error_requests, 2, "UNAVAILABLE and INTERNAL");
        assert_eq!(r.total_successful_requests, 1, "NOT_FOUND is an answer");
        assert_eq!(metric(&r, METRIC_CANCELLED), 1);
        assert_eq!(r.total_requests_in_progress, 0);
    }
}
