//! Rate limits for log lines about things outsiders control.
//!
//! A bad registry key rewritten a thousand times a second, or a peer
//! hammering the LB port, must not turn into a thousand log lines a second.
//! A [`LogLimiter`] lets the first line about a subject through, then at most
//! one per interval, and reports how many it held back in between. Counters
//! (metrics) are kept for every event; only the log lines are thinned.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Subjects remembered at most; beyond that, stale ones are forgotten first.
const MAX_SUBJECTS: usize = 10_000;

struct Seen {
    last: Instant,
    suppressed: u64,
}

/// Lets one log line per subject through per interval.
pub struct LogLimiter {
    every: Duration,
    seen: Mutex<HashMap<String, Seen>>,
}

impl LogLimiter {
    /// A limiter allowing one line per subject every `every`.
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line about `subject` may be written now: `Some(n)` with the
    /// number of lines held back since the last one written, or `None` to
    /// stay quiet.
    pub fn allow(&self, subject: &str) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("log limiter lock");
        if let Some(s) = seen.get_mut(subject) {
            if now.duration_since(s.last) < self.every {
                s.suppressed += 1;
                return None;
            }
            let held = s.suppressed;
            s.last = now;
            s.suppressed = 0;
            return Some(held);
        }
        if seen.len() >= MAX_SUBJECTS {
            let every = self.every;
            seen.retain(|_, s| now.duration_since(s.last) < every);
            if seen.len() >= MAX_SUBJECTS {
                seen.clear();
            }
        }
        seen.insert(
            subject.to_string(),
            Seen {
                last: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

impl Default for LogLimiter {
    /// One line per subject per minute.
    fn default() -> Self {
        LogLimiter::new(Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_passes_then_one_per_interval_with_the_count_held_back() {
        let l = LogLimiter::new(Duration::from_millis(50));
        assert_eq!(l.allow("k"), Some(0));
        assert_eq!(l.allow("k"), None);
        assert_eq!(l.allow("k"), None);
        assert_eq!(l.allow("other"), Some(0), "subjects are independent");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow("k"), Some(2));
    }

    #[test]
    fn memory_stays_bounded() {
        let l = LogLimiter::new(Duration::from_secs(60));
        for i in 0..(MAX_SUBJECTS * 2) {
            l.allow(&i.to_string());
        }
        assert!(l.seen.lock().unwrap().len() <= MAX_SUBJECTS);
    }
}
