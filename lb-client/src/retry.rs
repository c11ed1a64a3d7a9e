//! Retries as gRPC defines them (gRFC A6), the policy service owners already
//! write into stock clients' service config:
//!
//! ```json
//! {"retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.1s", "maxBackoff": "1s",
//!   "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
//!  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}
//! ```
//!
//! - **What is retried.** An attempt that failed with a retryable code
//!   before the backend sent its response headers: a call no backend
//!   answered, or a backend's Trailers-Only answer (its status in the
//!   headers, no message). Once a response has started the call is
//!   committed, as A6 says, and its status goes to the caller.
//! - **The request is replayed.** Its body is kept as it goes out, up to
//!   [`REPLAY_LIMIT`] bytes; a longer (streaming) request is committed when
//!   it passes the limit.
//! - **Between attempts**, a random delay up to `initialBackoff ×
//!   backoffMultiplier^(n-1)` (at most `maxBackoff`), or the server's
//!   `grpc-retry-pushback-ms` (a negative or malformed one forbids the
//!   retry), never past the call's deadline. Each retry picks anew, so it
//!   goes to the next backend of the list, and carries
//!   `grpc-previous-rpc-attempts`.
//! - **Throttling**, so that retries cannot amplify an outage: a token
//!   count per channel starts at `maxTokens`; every attempt failing with a
//!   retryable code takes one, every success gives `tokenRatio` back, and
//!   retries stop while the count is at or below half of `maxTokens`. A
//!   response that started counts as a success here (its final status is
//!   the caller's to read), where grpc-go waits for the status.
//! - **Drops are not retried**: a call the LB dropped is load shed on
//!   purpose, as stock clients treat it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::Code;

/// Request bytes kept for replaying a call (A6's per-call buffer; grpc-go
/// keeps 256 KiB by default).
pub const REPLAY_LIMIT: usize = 256 * 1024;

/// Most attempts a policy may ask for (A6 caps `maxAttempts` at 5).
pub const MAX_ATTEMPTS: u32 = 5;

/// A6's `retryPolicy` for a service or method.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (2 to 5; larger is taken as 5).
    pub max_attempts: u32,
    /// Upper bound of the first retry's random delay.
    pub initial_backoff: Duration,
    /// Largest delay bound.
    pub max_backoff: Duration,
    /// Growth of the delay bound per retry.
    pub backoff_multiplier: f64,
    /// Status codes that make an attempt worth another.
    pub retryable_status_codes: Vec<Code>,
}

impl RetryPolicy {
    /// `max_attempts` attempts on `codes`, with the delays of common
    /// service configs (0.1 s growing ×2 up to 1 s).
    pub fn new(max_attempts: u32, codes: impl IntoIterator<Item = Code>) -> Self {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            retryable_status_codes: codes.into_iter().collect(),
        }
    }

    /// The same with other delays.
    pub fn backoff(mut self, initial: Duration, max: Duration, multiplier: f64) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self.backoff_multiplier = multiplier;
        self
    }

    /// Attempts allowed in all.
    fn attempts(&self) -> u32 {
        self.max_attempts.clamp(1, MAX_ATTEMPTS)
    }

    fn retries(&self, code: Code) -> bool {
        self.retryable_status_codes.contains(&code)
    }

    /// A random delay before retry number `n` (1 for the first retry).
    fn delay(&self, n: u32) -> Duration {
        let factor = self
            .backoff_multiplier
            .max(1.0)
            .powi(n.saturating_sub(1) as i32);
        let bound = self
            .initial_backoff
            .mul_f64(factor.min(1e6))
            .min(self.max_backoff);
        bound.mul_f64(rand::random::<f64>())
    }
}

/// A6's `retryThrottling`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryThrottling {
    /// Tokens at the start and at most (1 to 1,000).
    pub max_tokens: u32,
    /// Tokens a success gives back (above 0; three decimals count).
    pub token_ratio: f64,
}

/// Which policy applies to which call: by method (`pkg.Service/Method`),
/// else by service (`pkg.Service`), as a service config's `name` entries.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetryPolicies {
    by_name: HashMap<String, Arc<RetryPolicy>>,
}

impl RetryPolicies {
    /// Sets `policy` for `name` (`pkg.Service` or `pkg.Service/Method`).
    pub(crate) fn insert(&mut self, name: &str, policy: RetryPolicy) {
        self.by_name
            .insert(name.trim_matches('/').to_string(), Arc::new(policy));
    }

    /// The policy for a call to `path` (`/pkg.Service/Method`).
    pub(crate) fn lookup(&self, path: &str) -> Option<Arc<RetryPolicy>> {
        if self.by_name.is_empty() {
            return None;
        }
        let method = path.trim_start_matches('/');
        let service = method.split('/').next().unwrap_or_default();
        self.by_name
            .get(method)
            .or_else(|| self.by_name.get(service))
            .cloned()
    }
}

/// A channel's retry tokens (in thousandths, as A6 counts three decimals).
#[derive(Debug)]
pub(crate) struct Throttle {
    milli_tokens: AtomicI64,
    max: i64,
    ratio: i64,
}

impl Throttle {
    pub(crate) fn new(t: RetryThrottling) -> Self {
        let max = i64::from(t.max_tokens.clamp(1, 1000)) * 1000;
        Throttle {
            milli_tokens: AtomicI64::new(max),
            max,
            ratio: ((t.token_ratio.max(0.0) * 1000.0) as i64).max(1),
        }
    }

    fn failed(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t - 1000).max(0))
            });
    }

    fn succeeded(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + self.ratio).min(self.max))
            });
    }

    fn allows_retry(&self) -> bool {
        self.milli_tokens.load(Ordering::Relaxed) > self.max / 2
    }
}

/// What an attempt came to, for the retry decision.
pub(crate) enum Outcome {
    /// A response whose status is still to come (committed), or OK.
    Committed,
    /// Failed with `code` before any response started; `pushback` is the
    /// server's `grpc-retry-pushback-ms`, if it sent one (`Err` when it
    /// forbids retrying).
    Failed {
        code: Code,
        pushback: Option<Result<Duration, ()>>,
    },
}

impl Outcome {
    /// The outcome of a response: a Trailers-Only answer carries its status
    /// in the headers.
    pub(crate) fn of_response<B>(response: &http::Response<B>) -> Outcome {
        let headers = response.headers();
        let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
        else {
            return Outcome::Committed;
        };
        let code = Code::from_i32(code);
        if code == Code::Ok {
            return Outcome::Committed;
        }
        let pushback = headers.get("grpc-retry-pushback-ms").map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis)
                .ok_or(())
        });
        Outcome::Failed { code, pushback }
    }
}

/// The retry state of one call.
pub(crate) struct Attempts {
    policy: Arc<RetryPolicy>,
    throttle: Option<Arc<Throttle>>,
    made: u32,
}

impl Attempts {
    pub(crate) fn new(policy: Arc<RetryPolicy>, throttle: Option<Arc<Throttle>>) -> Self {
        Attempts {
            policy,
            throttle,
            made: 1,
        }
    }

    /// Attempts made so far.
    pub(crate) fn made(&self) -> u32 {
        self.made
    }

    /// After an attempt: the delay before the next one, or `None` to give
    /// the caller this attempt's result. `replayable` says whether the
    /// request can still be sent again.
    pub(crate) fn next(&mut self, outcome: &Outcome, replayable: bool) -> Option<Duration> {
        let (code, pushback) = match outcome {
            Outcome::Committed => {
                if let Some(t) = &self.throttle {
                    t.succeeded();
                }
                return None;
            }
            Outcome::Failed { code, pushback } => (*code, pushback),
        };
        if !self.policy.retries(code) {
            return None;
        }
        if let Some(t) = &self.throttle {
            t.failed();
            if !t.allows_retry() {
                return None;
            }
        }
        if self.made >= self.policy.attempts() || !replayable {
            return None;
        }
        let delay = match pushback {
            Some(Err(())) => return None,
            Some(Ok(d)) => *d,
            None => self.policy.delay(self.made),
        };
        self.made += 1;
        Some(delay)
    }
}

/// A request body that can be sent again: the frames sent so far are kept
/// (up to [`REPLAY_LIMIT`] bytes), and each attempt's body replays them
/// before reading on from the caller's body. Attempts follow one another,
/// so only one reads at a time.
#[derive(Clone)]
pub(crate) struct Replay(Arc<Mutex<Recorded>>);

struct Recorded {
    source: Body,
    /// The attempt whose body may read on from `source`: an abandoned
    /// attempt's body (hyper may still poll it) must not take frames from
    /// the next one.
    current: u64,
    frames: Vec<Bytes>,
    kept: usize,
    /// More than the limit went out: the call can no longer be replayed.
    overflowed: bool,
    ended: bool,
}

impl Replay {
    pub(crate) fn new(source: Body) -> Self {
        Replay(Arc::new(Mutex::new(Recorded {
            source,
            current: 0,
            frames: Vec::new(),
            kept: 0,
            overflowed: false,
            ended: false,
        })))
    }

    /// Whether another attempt can send the whole request again.
    pub(crate) fn replayable(&self) -> bool {
        !self.0.lock().expect("replay lock").overflowed
    }

    /// The body of the next attempt (earlier attempts' bodies stop).
    pub(crate) fn attempt(&self) -> Body {
        let attempt = {
            let mut r = self.0.lock().expect("replay lock");
            r.current += 1;
            r.current
        };
        Body::new(ReplayBody {
            recorded: self.clone(),
            attempt,
            next: 0,
        })
    }
}

struct ReplayBody {
    recorded: Replay,
    /// Which attempt this body belongs to.
    attempt: u64,
    /// Index of the next kept frame to replay.
    next: usize,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let mut r = this.recorded.0.lock().expect("replay lock");
        if r.current != this.attempt {
            return Poll::Ready(Some(Err(tonic::Status::cancelled(
                "attempt abandoned for a retry",
            ))));
        }
        if !r.overflowed && this.next < r.frames.len() {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(r.frames[this.next - 1].clone()))));
        }
        if r.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut r.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                r.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !r.overflowed {
                        r.kept += data.len();
                        if r.kept > REPLAY_LIMIT {
                            r.overflowed = true;
                            r.frames = Vec::new();
                        } else {
                            r.frames.push(data.clone());
                            this.next = r.frames.len();
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let r = self.recorded.0.lock().expect("replay lock");
        r.ended && self.next >= r.frames.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn failed(code: Code) -> Outcome {
        Outcome::Failed {
            code,
            pushback: None,
        }
    }

    #[test]
    fn attempts_stop_at_max_attempts_and_on_codes_not_listed() {
        let policy = Arc::new(RetryPolicy::new(3, [Code::Unavailable]));
        let mut a = Attempts::new(policy.clone(), None);
        assert!(a.next(&failed(Code::Unavailable), true).is_some());
        assert!(a.next(&failed(Code::Unavailable), true).is_some());
        assert_eq!(a.made(), 3);
        assert!(a.next(&failed(Code::Unavailable), true).is_none());
        let mut a = Attempts::new(policy.clone(), None);
        assert!(a.next(&failed(Code::Internal), true).is_none());
        assert!(a.next(&Outcome::Committed, true).is_none());
        let mut a = Attempts::new(policy, None);
        assert!(
            a.next(&failed(Code::Unavailable), false).is_none(),
            "not replayable"
        );
    }

    #[test]
    fn max_attempts_is_capped_at_five() {
        let mut a = Attempts::new(Arc::new(RetryPolicy::new(100, [Code::Unavailable])), None);
        let mut n = 1;
        while a.next(&failed(Code::Unavailable), true).is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_ATTEMPTS);
    }

    #[test]
    fn delays_stay_under_the_growing_bound() {
        let p = RetryPolicy::new(5, [Code::Unavailable]).backoff(
            Duration::from_millis(100),
            Duration::from_millis(250),
            2.0,
        );
        for _ in 0..200 {
            assert!(p.delay(1) <= Duration::from_millis(100));
            assert!(p.delay(2) <= Duration::from_millis(200));
            assert!(p.delay(4) <= Duration::from_millis(250));
        }
    }

    #[test]
    fn pushback_sets_the_delay_or_forbids_the_retry() {
        let policy = Arc::new(RetryPolicy::new(5, [Code::Unavailable]));
        let mut a = Attempts::new(policy.clone(), None);
        let wait = Outcome::Failed {
            code: Code::Unavailable,
            pushback: Some(Ok(Duration::from_millis(700))),
        };
        assert_eq!(a.next(&wait, true), Some(Duration::from_millis(700)));
        let stop = Outcome::Failed {
            code: Code::Unavailable,
            pushback: Some(Err(())),
        };
        assert_eq!(Attempts::new(policy, None).next(&stop, true), None);
    }

    #[test]
    fn throttling_stops_retries_at_half_the_tokens_and_successes_refill() {
        let throttle = Arc::new(Throttle::new(RetryThrottling {
            max_tokens: 10,
            token_ratio: 0.5,
        }));
        let policy = Arc::new(RetryPolicy::new(2, [Code::Unavailable]));
        let mut retried = 0;
        for _ in 0..20 {
            let mut a = Attempts::new(policy.clone(), Some(throttle.clone()));
            if a.next(&failed(Code::Unavailable), true).is_some() {
                retried += 1;
            }
        }
        // 10 → 9, 8, 7, 6 allow; at 5 (half) the retries stop.
        assert_eq!(retried, 4);
        // The count fell to 0; 14 successes give 7 tokens back, and after
        // the next failure 6 remain: over half, so that one is retried.
        for _ in 0..14 {
            Attempts::new(policy.clone(), Some(throttle.clone())).next(&Outcome::Committed, true);
        }
        let mut a = Attempts::new(policy, Some(throttle));
        assert!(a.next(&failed(Code::Unavailable), true).is_some());
    }

    #[test]
    fn policies_are_found_by_method_then_service() {
        let mut p = RetryPolicies::default();
        p.insert(
            "helloworld.Greeter",
            RetryPolicy::new(2, [Code::Unavailable]),
        );
        p.insert(
            "helloworld.Greeter/SayHello",
            RetryPolicy::new(4, [Code::Unavailable]),
        );
        assert_eq!(
            p.lookup("/helloworld.Greeter/SayHello")
                .unwrap()
                .max_attempts,
            4
        );
        assert_eq!(
            p.lookup("/helloworld.Greeter/Other").unwrap().max_attempts,
            2
        );
        assert!(p.lookup("/other.Service/SayHello").is_none());
    }

    #[test]
    fn trailers_only_answers_are_failures_others_commit() {
        let r = http::Response::builder()
            .header("grpc-status", "14")
            .header("grpc-retry-pushback-ms", "x")
            .body(())
            .unwrap();
        match Outcome::of_response(&r) {
            Outcome::Failed { code, pushback } => {
                assert_eq!(code, Code::Unavailable);
                assert_eq!(pushback, Some(Err(())));
            }
            Outcome::Committed => panic!("a Trailers-Only UNAVAILABLE is a failure"),
        }
        let ok = http::Response::builder().body(()).unwrap();
        assert!(matches!(Outcome::of_response(&ok), Outcome::Committed));
    }

    #[tokio::test]
    async fn every_attempt_sends_the_whole_request() {
        let source = Body::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
        let replay = Replay::new(source);
        let first = replay.attempt().collect().await.unwrap().to_bytes();
        let second = replay.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(first, Bytes::from_static(b"hello"));
        assert_eq!(second, first);
        assert!(replay.replayable());
    }

    #[tokio::test]
    async fn an_abandoned_attempt_reads_nothing_more() {
        let replay = Replay::new(Body::new(http_body_util::Full::new(Bytes::from_static(
            b"hello",
        ))));
        let mut first = replay.attempt();
        let _second = replay.attempt();
        assert!(first.frame().await.unwrap().is_err());
    }
}
