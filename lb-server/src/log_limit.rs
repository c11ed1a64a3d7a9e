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

/// Above this many subjects, those quiet for a whole interval are swept
/// (at most once per interval), so that a stream of one-off subjects (keys
/// of churning backends) does not hold memory until the cap.
const SWEEP_ABOVE: usize = 256;

struct Seen {
    last: Instant,
    suppressed: u64,
}

/// Lets one log line per subject through per interval.
pub struct LogLimiter {
    every: Duration,
    seen: Mutex<HashMap<String, Seen>>,
    swept: Mutex<Instant>,
}

impl LogLimiter {
    /// A limiter allowing one line per subject every `every`.
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            seen: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
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
        let every = self.every;
        if seen.len() >= SWEEP_ABOVE {
            let mut swept = self.swept.lock().expect("log limiter lock");
            if now.duration_since(*swept) >= every || seen.len() >= MAX_SUBJECTS {
                // A subject quiet for an interval would be let through
                // anyway; forgetting it loses only its held-back count.
                seen.retain(|_, s| now.duration_since(s.last) < every || s.suppressed > 0);
                *swept = now;
            }
        }
        if seen.len() >= MAX_SUBJECTS {
            seen.clear();
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
    fn quiet_subjects_are_swept() {
        let l = LogLimiter::new(Duration::from_millis(20));
        for i in 0..SWEEP_ABOVE {
            l.allow(&i.to_string());
        }
        std::thread::sleep(Duration::from_millis(30));
        l.allow("new");
        assert!(l.seen.lock().unwrap().len() < 10, "quiet subjects kept");
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
