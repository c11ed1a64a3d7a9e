//! One budget for probe reconnects, shared by every probe.
//!
//! Each probe backs off on its own (to a second while an outage is young, to
//! 20 s in a long one). That keeps a few dead backends cheap, but a zone of
//! them is another matter: 100,000 dead backends retried every second ask
//! for 100,000 connects a second, and at tens of microseconds each that is
//! every core the LB has, taken from the streams it serves. So reconnects
//! also queue for a turn here: at most `--probe-reconnect-rate` a second,
//! all probes together. A backend's *first* check is never queued (a new
//! backend is checked at once), and with a handful of failing backends the
//! queue is always empty; in a zone outage the dead are retried in turn, and
//! one that returns is found within `backends / rate` seconds.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Turns for reconnect attempts, handed out at a fixed rate.
#[derive(Debug)]
pub struct Pace {
    /// Time between two turns.
    every: Duration,
    /// The next free turn.
    next: Mutex<Instant>,
}

impl Pace {
    /// At most `rate` turns a second; `None` for 0 (no budget).
    pub fn per_second(rate: u32) -> Option<Pace> {
        (rate > 0).then(|| Pace {
            every: Duration::from_secs(1) / rate,
            next: Mutex::new(Instant::now()),
        })
    }

    /// Waits for this attempt's turn; `false` when cancelled first.
    pub async fn turn(&self, cancel: &CancellationToken) -> bool {
        let slot = {
            let mut next = self.next.lock().expect("pace lock");
            let slot = (*next).max(Instant::now());
            *next = slot + self.every;
            slot
        };
        if slot <= Instant::now() {
            return true;
        }
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep_until(slot) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn turns_come_at_the_rate_and_cancelling_frees_the_waiter() {
        let pace = Pace::per_second(100).expect("a budget");
        let cancel = CancellationToken::new();
        let t0 = Instant::now();
        for _ in 0..11 {
            assert!(pace.turn(&cancel).await);
        }
        // The first turn is at once, the next ten 10 ms apart.
        assert_eq!(t0.elapsed(), Duration::from_millis(100));

        let waiting = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                let pace = Pace::per_second(1).expect("a budget");
                assert!(pace.turn(&cancel).await);
                pace.turn(&cancel).await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        cancel.cancel();
        assert!(!waiting.await.expect("task"), "a cancelled wait got a turn");
        assert!(Pace::per_second(0).is_none());
    }
}
