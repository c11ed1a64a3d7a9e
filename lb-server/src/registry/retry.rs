//! Keeping a session with a discovery system up: sessions run one after
//! another (etcd's list + watch, ZooKeeper's watch), with the shared
//! jittered backoff between failures (`lb_client::internals::Backoff`), which starts
//! over after a session that lasted.

use std::future::Future;
use std::time::Duration;

use lb_client::internals::Backoff;
use tokio_util::sync::CancellationToken;

/// Delay before the first retry after a failure; grows up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A session that lived this long resets the delay.
const RETRY_RESET: Duration = Duration::from_secs(10);

/// The backoff of registry and cluster sessions.
pub fn session_backoff() -> Backoff {
    Backoff::new(RETRY_MIN, RETRY_MAX).reset_after(RETRY_RESET)
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
    let mut backoff = session_backoff();
    loop {
        backoff.attempt();
        match session().await {
            Ok(()) => return,
            Err(e) => failed(&e, backoff.peek()),
        }
        if !backoff.wait(shutdown).await {
            return;
        }
    }
}
