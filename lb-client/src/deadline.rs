//! A call's deadline, enforced for the whole call.
//!
//! gRPC's deadline is a promise to the caller: whatever the backend does, the
//! call ends with DEADLINE_EXCEEDED when its time is up. Stock clients keep
//! it themselves (tonic layers `GrpcTimeout` on every connection), because a
//! backend that stopped answering (a paused process, a lost link) never
//! says so. [`LbChannel`](crate::LbChannel) keeps it in three places: while
//! it waits for a pick, while it waits for the response headers (the future
//! is dropped, which resets the HTTP/2 stream), and while the body streams
//! ([`DeadlineBody`] ends it with a DEADLINE_EXCEEDED status in its
//! trailers, as a server would).
//!
//! The deadline is the earlier of the call's `grpc-timeout` header and the
//! channel's default [`timeout`](crate::LbChannelBuilder::timeout); a
//! default the call did not carry is sent to the backend as its
//! `grpc-timeout`, so that both ends keep the same deadline. A call still
//! sending its request stream at the deadline has that stream failed too
//! ([`RequestDeadline`]): the connection then resets the backend's stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The instant a call must end by: the earlier of its `grpc-timeout`
/// header and the channel's default timeout (`None`: no deadline).
pub(crate) fn deadline_of(headers: &http::HeaderMap, default: Option<Duration>) -> Option<Instant> {
    let timeout = match (grpc_timeout(headers), default) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }?;
    // A deadline past what the clock can count is no deadline.
    Instant::now().checked_add(timeout)
}

/// `d` as a `grpc-timeout` value: at most 8 digits and a unit, rounded up
/// to the millisecond (so that a server never sees a shorter deadline).
pub(crate) fn encode_grpc_timeout(d: Duration) -> http::HeaderValue {
    const MAX: u128 = 99_999_999;
    let ms = d.as_nanos().div_ceil(1_000_000).max(1);
    let value = [(1, "m"), (1_000, "S"), (60_000, "M"), (3_600_000, "H")]
        .iter()
        .find_map(|(per, unit)| {
            let n = ms.div_ceil(*per);
            (n <= MAX).then(|| format!("{n}{unit}"))
        })
        .unwrap_or_else(|| format!("{MAX}H"));
    http::HeaderValue::from_str(&value).expect("digits and a unit")
}

/// Parses the `grpc-timeout` header (e.g. `100m`, `5S`).
pub(crate) fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    // The protocol allows at most 8 digits.
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The status a call ends with when its deadline passes.
pub(crate) fn exceeded(what: &str) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("deadline exceeded {what}"))
}

/// A response body that ends with a DEADLINE_EXCEEDED status (in its
/// trailers) if its deadline passes before the backend finishes it. The
/// backend's body is dropped then, which resets its HTTP/2 stream.
pub(crate) struct DeadlineBody<B> {
    inner: Option<B>,
    cutoff: Cutoff,
}

impl<B> DeadlineBody<B> {
    /// `inner`, cut off at `deadline`.
    pub(crate) fn new(inner: B, deadline: Instant) -> Self {
        DeadlineBody {
            inner: Some(inner),
            cutoff: Cutoff::new(deadline),
        }
    }
}

/// One body's deadline, shared by the response and request sides.
struct Cutoff {
    deadline: Instant,
    /// The timer, armed the first time the body has to wait (a unary call's
    /// bodies are usually whole at once and never need it).
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The deadline passed before the body ended.
struct Expired;

/// What a body's `poll_frame` gives.
type NextFrame<B> = Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>;

impl Cutoff {
    fn new(deadline: Instant) -> Self {
        Cutoff {
            deadline,
            sleep: None,
        }
    }

    /// Polls `inner` for its next frame, unless the deadline has passed.
    /// Checked before the body too: a peer streaming faster than it is read
    /// has a frame ready at every poll.
    fn poll_frame<B: Body + Unpin>(
        &mut self,
        inner: &mut B,
        cx: &mut Context<'_>,
    ) -> Poll<Result<NextFrame<B>, Expired>> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(Err(Expired));
        }
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            return Poll::Ready(Ok(frame));
        }
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(Expired)),
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match std::task::ready!(this.cutoff.poll_frame(inner, cx)) {
            Ok(frame) => {
                if frame.is_none() {
                    this.inner = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Err(Expired) => {
                this.inner = None;
                let status = exceeded("while the response was streaming");
                let mut trailers = http::HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => {
                // Cut short at the deadline: an exact size is no promise.
                let mut hint = SizeHint::new();
                hint.set_lower(0);
                if let Some(upper) = b.size_hint().upper() {
                    hint.set_upper(upper);
                }
                hint
            }
            None => SizeHint::with_exact(0),
        }
    }
}

/// A request body that fails at `deadline` if the caller is still sending
/// it (client and bidirectional streams): the connection then resets the
/// backend's stream, which dropping the response alone would not do while
/// the request half is open.
pub(crate) struct RequestDeadline<B> {
    inner: B,
    cutoff: Cutoff,
}

impl<B> RequestDeadline<B> {
    /// `inner`, failed at `deadline`.
    pub(crate) fn new(inner: B, deadline: Instant) -> Self {
        RequestDeadline {
            inner,
            cutoff: Cutoff::new(deadline),
        }
    }
}

impl<B> Body for RequestDeadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match std::task::ready!(this.cutoff.poll_frame(&mut this.inner, cx)) {
            Ok(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Err(Expired) => Poll::Ready(Some(Err(
                exceeded("while the request was streaming").into()
            ))),
        }
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
    use http_body_util::BodyExt;

    #[test]
    fn grpc_timeouts_parse() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_timeout(&h), None);
        h.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&h), Some(Duration::from_secs(3)));
        h.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&h), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_earlier_of_header_and_default_wins() {
        let mut h = http::HeaderMap::new();
        let now = Instant::now();
        assert_eq!(deadline_of(&h, None), None);
        assert_eq!(
            deadline_of(&h, Some(Duration::from_secs(2))),
            Some(now + Duration::from_secs(2))
        );
        h.insert("grpc-timeout", "500m".parse().unwrap());
        assert_eq!(
            deadline_of(&h, Some(Duration::from_secs(2))),
            Some(now + Duration::from_millis(500))
        );
        h.insert("grpc-timeout", "5S".parse().unwrap());
        assert_eq!(
            deadline_of(&h, Some(Duration::from_secs(2))),
            Some(now + Duration::from_secs(2))
        );
    }

    /// A body that sends one frame and then nothing, ever.
    struct Stalled(bool);

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_ends_with_deadline_exceeded_at_its_deadline() {
        let start = Instant::now();
        let mut body = DeadlineBody::new(Stalled(false), start + Duration::from_secs(1));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"x"));
        let last = body.frame().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let trailers = last.into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "4");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    /// A body that always has a frame ready.
    struct Busy;

    impl Body for Busy {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_stream_still_ends_at_its_deadline() {
        let start = Instant::now();
        let mut body = DeadlineBody::new(Busy, start + Duration::from_secs(1));
        assert!(body.frame().await.unwrap().unwrap().is_data());
        tokio::time::advance(Duration::from_secs(1)).await;
        let last = body.frame().await.unwrap().unwrap();
        assert_eq!(last.into_trailers().unwrap()["grpc-status"], "4");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_still_streaming_at_its_deadline_fails() {
        let start = Instant::now();
        let mut body = RequestDeadline::new(Stalled(false), start + Duration::from_secs(1));
        assert!(body.frame().await.unwrap().unwrap().is_data());
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert!(err.to_string().contains("deadline exceeded"), "{err}");
    }

    #[test]
    fn timeouts_encode_in_at_most_8_digits_rounded_up() {
        let enc = |d| encode_grpc_timeout(d).to_str().unwrap().to_string();
        assert_eq!(enc(Duration::from_millis(1500)), "1500m");
        assert_eq!(enc(Duration::from_micros(1)), "1m");
        assert_eq!(enc(Duration::from_secs(200_000)), "200000S");
        assert_eq!(enc(Duration::from_secs(100_000_000)), "1666667M");
        assert_eq!(enc(Duration::MAX), "99999999H");
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", "123456789S".parse().unwrap());
        assert_eq!(grpc_timeout(&h), None, "9 digits");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_past_the_clock_is_none() {
        assert_eq!(
            deadline_of(&http::HeaderMap::new(), Some(Duration::MAX)),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_in_time_is_untouched() {
        let full = http_body_util::Full::new(Bytes::from_static(b"done"));
        let mut body = DeadlineBody::new(full, Instant::now() + Duration::from_secs(1));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"done"));
        assert!(body.frame().await.is_none());
    }
}
