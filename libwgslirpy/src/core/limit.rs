//! Rate-limited warnings for limits reached.
//!
//! When a table is full, new work is refused or old work evicted, and each
//! event is counted in [`super::Stats`]. An operator also needs to hear about
//! it, but a flood must not turn into a flood of log lines: each limit logs
//! at most one line per [`LIMIT_LOG_INTERVAL`], saying how many events it
//! stands for. The first event logs at once.

use std::time::{Duration, Instant};

/// At most one "limit reached" line per limit per this long.
pub const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The log pacing of one limit.
#[derive(Debug, Default)]
pub struct LimitLog {
    last: Option<Instant>,
    since_log: u64,
}

impl LimitLog {
    /// Counts one event at `now`. Returns how many events the line to log
    /// now stands for (this one included), or `None` if a line was logged
    /// less than [`LIMIT_LOG_INTERVAL`] ago.
    #[must_use]
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.since_log += 1;
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < LIMIT_LOG_INTERVAL)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_log))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let t0 = Instant::now();
        let mut log = LimitLog::default();
        assert_eq!(log.hit(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(log.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.hit(t0 + LIMIT_LOG_INTERVAL), Some(1000));
        assert_eq!(log.hit(t0 + LIMIT_LOG_INTERVAL), None);
    }
}
