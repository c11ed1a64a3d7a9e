//! Jittered exponential backoff, as gRPC clients do it: each delay is the
//! previous one × 1.6, randomised by ±20 %, capped at a maximum.

use std::time::Duration;

use rand::Rng;

/// Growth factor between delays.
const MULTIPLIER: f64 = 1.6;
/// Relative randomisation of each delay.
const JITTER: f64 = 0.2;

/// Backoff state of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `initial`, grows to at most `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current.as_secs_f64();
        self.current = Duration::from_secs_f64((base * MULTIPLIER).min(self.max.as_secs_f64()));
        let jitter = rand::rng().random_range(-JITTER..=JITTER);
        Duration::from_secs_f64(base * (1.0 + jitter))
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
}
