//! Jittered exponential backoff, as gRPC clients do it (gRFC A6): each delay
//! is the previous one × 1.6, randomised by ±20 %, capped at a maximum.
//!
//! One implementation serves every retry loop of the project: `lb-client`'s
//! LB stream and backend connections, the registration helpers, and in
//! `lb-server` the health probes and every registry and cluster session.
//!
//! A loop that keeps a *session* up (a watch, a stream, a connection) marks
//! each attempt with [`Backoff::attempt`]; when the session that just ended
//! lived at least [`Backoff::reset_after`], the next delay starts over from
//! the first one. Without that rule one bad minute would leave every later
//! reconnect waiting the longest delay, so a peer that drops a healthy
//! session once an hour would be re-joined late each time.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Growth factor between delays.
const MULTIPLIER: f64 = 1.6;
/// Relative randomisation of each delay.
const JITTER: f64 = 0.2;
/// A session that lived this long earns a fresh backoff, unless the loop
/// says otherwise with [`Backoff::reset_after`].
const DEFAULT_RESET_AFTER: Duration = Duration::from_secs(10);

/// Backoff state of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    reset_after: Duration,
    attempt_started: Option<Instant>,
}

impl Backoff {
    /// Starts at `initial`, grows to at most `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
            reset_after: DEFAULT_RESET_AFTER,
            attempt_started: None,
        }
    }

    /// A session that lived at least `lived` resets the backoff when it ends.
    pub fn reset_after(mut self, lived: Duration) -> Self {
        self.reset_after = lived;
        self
    }

    /// Changes the cap (say, a longer one once an outage has lasted); the
    /// current delay is kept within it.
    pub fn set_max(&mut self, max: Duration) {
        self.max = max.max(self.initial);
        self.current = self.current.min(self.max);
    }

    /// Marks the start of an attempt (a connect, a session).
    pub fn attempt(&mut self) {
        self.attempt_started = Some(Instant::now());
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// The delay [`Backoff::next_delay`] will return, before jitter: the
    /// first one again if the last attempt lived long enough.
    pub fn peek(&self) -> Duration {
        if self.lived_long_enough() {
            self.initial
        } else {
            self.current
        }
    }

    fn lived_long_enough(&self) -> bool {
        self.attempt_started
            .is_some_and(|t| t.elapsed() >= self.reset_after)
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        if self.lived_long_enough() {
            self.reset();
        }
        self.attempt_started = None;
        let base = self.current.as_secs_f64();
        self.current = Duration::from_secs_f64((base * MULTIPLIER).min(self.max.as_secs_f64()));
        let jitter = rand::rng().random_range(-JITTER..=JITTER);
        Duration::from_secs_f64(base * (1.0 + jitter))
    }

    /// Sleeps the next delay; false if `cancel` came first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_and_stop_at_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(
            first >= Duration::from_millis(80) && first <= Duration::from_millis(120),
            "{first:?}"
        );
        let second = b.next_delay();
        assert!(
            second >= Duration::from_millis(128) && second <= Duration::from_millis(192),
            "{second:?}"
        );
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_millis(1200));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_lasted_starts_the_delays_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
            .reset_after(Duration::from_secs(10));
        for _ in 0..10 {
            b.attempt();
            b.next_delay();
        }
        assert!(b.peek() >= Duration::from_secs(4), "{:?}", b.peek());
        // A short session keeps the long delay.
        b.attempt();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(b.peek() >= Duration::from_secs(4));
        // A session that lived past the threshold resets it.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(b.peek(), Duration::from_millis(100));
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
