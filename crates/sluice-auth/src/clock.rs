//! Time sources. The validator reads time only through [`Clock`], so tests can drive it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The time as the validator sees it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Wall-clock time since the Unix epoch, compared with `exp` and `nbf`.
    fn unix_now(&self) -> Duration;
    /// Monotonic time since an arbitrary fixed origin, used to pace key fetches and age the key cache.
    fn monotonic(&self) -> Duration;
}

/// The real clock: [`SystemTime`] for the wall clock and [`Instant`] for the monotonic one.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose monotonic time starts now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn unix_now(&self) -> Duration {
        // A clock set before 1970 reads as the epoch, which only makes tokens look not yet valid.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_after_2020_and_monotonic_does_not_go_back() {
        let c = SystemClock::new();
        assert!(c.unix_now() > Duration::from_secs(1_577_836_800));
        let a = c.monotonic();
        let b = c.monotonic();
        assert!(b >= a);
    }
}
