//! Keeping a session with a discovery system up: sessions run one after
//! another (etcd's list + watch, ZooKeeper's watch, the cluster's
//! membership), with a backoff between failures that doubles up to a limit
//! and starts over after a session that lasted.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Delay before the first retry after a failure; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Backoff between etcd sessions (the registry watch, cluster membership):
/// doubles after each failure up to [`RETRY_MAX`], and starts over after a
/// session that lasted more than 10 s.
pub struct SessionBackoff {
    delay: Duration,
    started: tokio::time::Instant,
}

impl Default for SessionBackoff {
    fn default() -> Self {
        SessionBackoff {
            delay: RETRY_MIN,
            started: tokio::time::Instant::now(),
        }
    }
}

impl SessionBackoff {
    /// Marks the start of a session attempt.
    pub fn attempt(&mut self) {
        self.started = tokio::time::Instant::now();
    }

    /// The delay before the next attempt.
    pub fn delay(&self) -> Duration {
        if self.started.elapsed() > Duration::from_secs(10) {
            RETRY_MIN
        } else {
            self.delay
        }
    }

    /// Sleeps before the next attempt; false if `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.delay();
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        self.delay = (delay * 2).min(RETRY_MAX);
        true
    }
}

/// Runs `session` again and again until one ends with `Ok` (it saw
/// `shutdown`) or `shutdown` fires during a backoff; `failed` hears of every
/// failure with the delay before the next attempt.
pub async fn run_sessions<F, Fut>(
    shutdown: &CancellationToken,
    mut session: F,
    mut failed: impl FnMut(&str, Duration),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut backoff = SessionBackoff::default();
    loop {
        backoff.attempt();
        match session().await {
            Ok(()) => return,
            Err(e) => failed(&e, backoff.delay()),
        }
        if !backoff.wait(shutdown).await {
            return;
        }
    }
}
