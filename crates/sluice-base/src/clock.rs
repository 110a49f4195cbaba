//! The time source of every decision made by time, replaceable in tests.

use std::fmt;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The time as a component sees it: JWT expiry, token refresh, limit windows.
///
/// Two readings: the wall clock ([`unix_now`](Self::unix_now)), for absolute times that come from outside or that
/// replicas must agree on (a token's `exp`, calendar quota periods), and a monotonic clock
/// ([`monotonic`](Self::monotonic)), for intervals measured inside the process (pacing, cache ages), which must not
/// jump when the wall clock is set. Production code uses [`SystemClock`]; tests use [`ManualClock`].
pub trait Clock: Send + Sync + fmt::Debug {
    /// Wall-clock time since 1970-01-01T00:00:00Z.
    fn unix_now(&self) -> Duration;

    /// Monotonic time since an arbitrary origin fixed for the process; only differences are meaningful.
    fn monotonic(&self) -> Duration;

    /// [`unix_now`](Self::unix_now) in whole milliseconds, saturating at `u64::MAX`.
    fn now_millis(&self) -> u64 {
        u64::try_from(self.unix_now().as_millis()).unwrap_or(u64::MAX)
    }

    /// [`unix_now`](Self::unix_now) as a [`SystemTime`].
    ///
    /// # Panics
    ///
    /// If the time is past what `SystemTime` can hold (about 292 billion years on Unix).
    fn system_time(&self) -> SystemTime {
        UNIX_EPOCH + self.unix_now()
    }
}

/// The real clocks: [`SystemTime`] for the wall clock and [`Instant`] for the monotonic one.
///
/// Every `SystemClock` of a process shares one monotonic origin (the first monotonic reading), so their readings can
/// be compared with one another.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    /// The system clock (the same as `SystemClock`).
    pub const fn new() -> Self {
        SystemClock
    }
}

/// The origin of [`SystemClock::monotonic`].
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Clock for SystemClock {
    fn unix_now(&self) -> Duration {
        // A clock set before 1970 reads as the epoch rather than failing: tokens look not yet valid, counters start
        // in the first window.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }

    fn monotonic(&self) -> Duration {
        origin().elapsed()
    }
}

/// A clock that only moves when told to; for tests of every crate.
///
/// [`advance`](Self::advance) moves both readings, as time passing does; [`set_unix`](Self::set_unix) moves only the
/// wall clock (forwards or backwards), as setting a system's clock does. The monotonic reading starts at zero.
#[derive(Debug)]
pub struct ManualClock {
    /// (wall clock since the epoch, monotonic reading)
    now: Mutex<(Duration, Duration)>,
}

impl ManualClock {
    /// A clock whose wall clock reads `unix_now` since the epoch.
    pub fn new(unix_now: Duration) -> Self {
        ManualClock {
            now: Mutex::new((unix_now, Duration::ZERO)),
        }
    }

    /// A clock reading `millis` milliseconds since the epoch.
    pub fn from_millis(millis: u64) -> Self {
        Self::new(Duration::from_millis(millis))
    }

    /// A clock whose wall clock starts at the real current time (for tests that also talk to real time, such as a
    /// fake identity endpoint stamping tokens with the system's clock).
    pub fn starting_now() -> Self {
        Self::new(SystemClock.unix_now())
    }

    fn lock(&self) -> MutexGuard<'_, (Duration, Duration)> {
        // Every update is a single assignment: the readings stay consistent even if a holder panicked.
        self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets `by` pass: both readings move forward (saturating at [`Duration::MAX`]).
    pub fn advance(&self, by: Duration) {
        let mut now = self.lock();
        now.0 = now.0.saturating_add(by);
        now.1 = now.1.saturating_add(by);
    }

    /// Sets the wall clock to `unix_now` since the epoch; it may go backwards. The monotonic reading does not move.
    pub fn set_unix(&self, unix_now: Duration) {
        self.lock().0 = unix_now;
    }

    /// Sets the wall clock to `millis` milliseconds since the epoch, like [`set_unix`](Self::set_unix).
    pub fn set_millis(&self, millis: u64) {
        self.set_unix(Duration::from_millis(millis));
    }
}

impl Clock for ManualClock {
    fn unix_now(&self) -> Duration {
        self.lock().0
    }

    fn monotonic(&self) -> Duration {
        self.lock().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::from_millis(1_000);
        assert_eq!(clock.now_millis(), 1_000);
        assert_eq!(clock.unix_now(), SEC);
        assert_eq!(clock.monotonic(), Duration::ZERO);
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.now_millis(), 1_250);
        assert_eq!(clock.monotonic(), Duration::from_millis(250));
        clock.advance(2 * SEC);
        assert_eq!(clock.now_millis(), 3_250);
        assert_eq!(clock.monotonic(), Duration::from_millis(2_250));
    }

    #[test]
    fn setting_the_wall_clock_leaves_the_monotonic_one_alone() {
        let clock = ManualClock::new(100 * SEC);
        clock.advance(5 * SEC);
        clock.set_millis(10);
        assert_eq!(clock.now_millis(), 10);
        assert_eq!(clock.monotonic(), 5 * SEC);
        clock.set_unix(7 * SEC);
        assert_eq!(clock.unix_now(), 7 * SEC);
        assert_eq!(clock.monotonic(), 5 * SEC);
    }

    #[test]
    fn readings_saturate() {
        let clock = ManualClock::from_millis(u64::MAX - 1);
        clock.advance(SEC);
        assert_eq!(clock.now_millis(), u64::MAX);
        clock.set_unix(Duration::MAX - SEC);
        clock.advance(2 * SEC);
        assert_eq!(clock.unix_now(), Duration::MAX);
        clock.advance(Duration::MAX);
        assert_eq!(clock.monotonic(), Duration::MAX);
    }

    #[test]
    fn now_millis_truncates_to_whole_milliseconds() {
        let clock = ManualClock::new(Duration::from_micros(1_999));
        assert_eq!(clock.now_millis(), 1);
    }

    #[test]
    fn system_time_is_the_wall_clock_from_the_epoch() {
        let clock = ManualClock::new(Duration::new(1_700_000_000, 5));
        assert_eq!(
            clock.system_time(),
            UNIX_EPOCH + Duration::new(1_700_000_000, 5)
        );
        clock.advance(SEC);
        assert_eq!(
            clock.system_time(),
            UNIX_EPOCH + Duration::new(1_700_000_001, 5)
        );
    }

    #[test]
    fn starting_now_is_the_real_time() {
        let before = SystemTime::now();
        let clock = ManualClock::starting_now();
        let after = SystemTime::now();
        assert!(before <= clock.system_time() && clock.system_time() <= after);
        assert_eq!(clock.monotonic(), Duration::ZERO);
    }

    #[test]
    fn system_clock_reads_the_real_clocks() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let before = SystemTime::now();
        let wall = clock.system_time();
        let after = SystemTime::now();
        assert!(before <= wall && wall <= after);
        // 2020-01-01T00:00:00Z: a sanity lower bound for the millisecond reading.
        assert!(clock.now_millis() > 1_577_836_800_000);
        let a = clock.monotonic();
        std::thread::sleep(Duration::from_millis(2));
        let b = SystemClock.monotonic();
        assert!(b >= a + Duration::from_millis(2), "{a:?} then {b:?}");
    }

    #[test]
    fn a_manual_clock_is_shared_behind_the_trait() {
        let clock = Arc::new(ManualClock::from_millis(0));
        let seen: Arc<dyn Clock> = clock.clone();
        clock.advance(SEC);
        assert_eq!(seen.now_millis(), 1_000);
        assert_eq!(seen.monotonic(), SEC);
    }
}
