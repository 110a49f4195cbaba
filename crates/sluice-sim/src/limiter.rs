//! Per-deployment rate limiting in the style of Azure OpenAI pay-as-you-go deployments.
//!
//! Two sliding windows: token charges over 60 s (the TPM quota) and request count over 10 s,
//! where the 10 s request allowance is `max(1, ceil(tpm / 1000))` (Azure grants 6 RPM per
//! 1000 TPM and enforces it on 10 s windows). The limiter is pure: callers pass the current
//! monotonic time ([`Clock::monotonic`](sluice_base::Clock::monotonic)), so it can be tested under a
//! [`ManualClock`](sluice_base::ManualClock).

use std::collections::VecDeque;
use std::time::Duration;

/// The token window.
pub const TOKEN_WINDOW: Duration = Duration::from_secs(60);
/// The request-count window.
pub const REQUEST_WINDOW: Duration = Duration::from_secs(10);

/// Sliding-window limiter for one deployment.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    tokens_per_minute: u64,
    requests_per_window: u64,
    /// (monotonic time, tokens) of each charge in the token window, oldest first.
    charges: VecDeque<(Duration, u64)>,
    used_tokens: u64,
    /// Monotonic times of the requests in the request window, oldest first.
    requests: VecDeque<Duration>,
}

/// A granted request, with what is left in both windows after charging it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    pub limit_tokens: u64,
    pub limit_requests: u64,
    pub remaining_tokens: u64,
    pub remaining_requests: u64,
    /// Until the oldest token charge leaves its window (tokens come back).
    pub reset_tokens: Duration,
    /// Until the oldest request leaves its window.
    pub reset_requests: Duration,
}

/// Which window refused the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThrottleKind {
    Tokens,
    Requests,
}

/// A refused request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttle {
    pub kind: ThrottleKind,
    /// How long until the request would be admitted (both windows considered).
    pub retry_after: Duration,
    pub limit_tokens: u64,
    pub limit_requests: u64,
    pub remaining_tokens: u64,
    pub remaining_requests: u64,
}

impl Throttle {
    /// `retry-after` value: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let ms = self.retry_after_ms();
        ms.div_ceil(1000).max(1)
    }

    /// `retry-after-ms` value: milliseconds, rounded up, at least 1.
    pub fn retry_after_ms(&self) -> u64 {
        let nanos = self.retry_after.as_nanos();
        let ms = nanos.div_ceil(1_000_000);
        u64::try_from(ms).unwrap_or(u64::MAX).max(1)
    }
}

impl RateLimiter {
    /// A limiter allowing `tokens_per_minute` tokens per 60 s and
    /// `max(1, ceil(tokens_per_minute / 1000))` requests per 10 s.
    pub fn new(tokens_per_minute: u64) -> Self {
        RateLimiter {
            tokens_per_minute,
            requests_per_window: tokens_per_minute.div_ceil(1000).max(1),
            charges: VecDeque::new(),
            used_tokens: 0,
            requests: VecDeque::new(),
        }
    }

    pub fn tokens_per_minute(&self) -> u64 {
        self.tokens_per_minute
    }

    /// Requests allowed per [`REQUEST_WINDOW`].
    pub fn requests_per_window(&self) -> u64 {
        self.requests_per_window
    }

    fn prune(&mut self, now: Duration) {
        while let Some(&(at, cost)) = self.charges.front() {
            if at + TOKEN_WINDOW <= now {
                self.charges.pop_front();
                self.used_tokens = self.used_tokens.saturating_sub(cost);
            } else {
                break;
            }
        }
        while let Some(&at) = self.requests.front() {
            if at + REQUEST_WINDOW <= now {
                self.requests.pop_front();
            } else {
                break;
            }
        }
    }

    /// Try to admit a request costing `cost` tokens at monotonic time `now` (a reading of one
    /// [`Clock`](sluice_base::Clock), as every call to this limiter must use).
    ///
    /// A cost larger than the whole quota is clamped to the quota: such a request is admitted
    /// only into an empty window (and then fills it), rather than being refused forever.
    /// A zero quota refuses everything with a 60 s retry.
    pub fn try_acquire(&mut self, now: Duration, cost: u64) -> Result<Admission, Throttle> {
        self.prune(now);
        let limit = self.tokens_per_minute;
        let rpw = self.requests_per_window;
        let count = self.requests.len() as u64;

        let token_wait = if limit == 0 {
            Some(TOKEN_WINDOW)
        } else {
            let cost = cost.min(limit);
            if self.used_tokens.saturating_add(cost) <= limit {
                None
            } else {
                let mut freed = 0u64;
                let mut wait = TOKEN_WINDOW;
                for &(at, c) in &self.charges {
                    freed = freed.saturating_add(c);
                    if self.used_tokens.saturating_sub(freed).saturating_add(cost) <= limit {
                        wait = (at + TOKEN_WINDOW).saturating_sub(now);
                        break;
                    }
                }
                Some(wait)
            }
        };

        let request_wait = if count < rpw {
            None
        } else {
            // Free enough of the oldest requests to leave room for one more.
            let idx = usize::try_from(count - rpw).unwrap_or(0);
            let wait = self
                .requests
                .get(idx)
                .map(|&at| (at + REQUEST_WINDOW).saturating_sub(now))
                .unwrap_or(REQUEST_WINDOW);
            Some(wait)
        };

        if token_wait.is_some() || request_wait.is_some() {
            let kind = if token_wait.is_some() {
                ThrottleKind::Tokens
            } else {
                ThrottleKind::Requests
            };
            let retry_after = token_wait
                .unwrap_or_default()
                .max(request_wait.unwrap_or_default());
            return Err(Throttle {
                kind,
                retry_after,
                limit_tokens: limit,
                limit_requests: rpw,
                remaining_tokens: limit.saturating_sub(self.used_tokens),
                remaining_requests: rpw.saturating_sub(count),
            });
        }

        let cost = cost.min(limit);
        self.charges.push_back((now, cost));
        self.used_tokens = self.used_tokens.saturating_add(cost);
        self.requests.push_back(now);
        let until = |at: Option<Duration>, window: Duration| {
            at.map_or(Duration::ZERO, |at| (at + window).saturating_sub(now))
        };
        Ok(Admission {
            limit_tokens: limit,
            limit_requests: rpw,
            remaining_tokens: limit.saturating_sub(self.used_tokens),
            remaining_requests: rpw.saturating_sub(self.requests.len() as u64),
            reset_tokens: until(self.charges.front().map(|c| c.0), TOKEN_WINDOW),
            reset_requests: until(self.requests.front().copied(), REQUEST_WINDOW),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_base::{Clock, ManualClock};

    #[test]
    fn request_allowance_derives_from_tpm() {
        assert_eq!(RateLimiter::new(1).requests_per_window(), 1);
        assert_eq!(RateLimiter::new(1000).requests_per_window(), 1);
        assert_eq!(RateLimiter::new(1001).requests_per_window(), 2);
        assert_eq!(RateLimiter::new(20_000).requests_per_window(), 20);
    }

    #[test]
    fn tokens_run_out_and_come_back_after_a_minute() {
        let clock = ManualClock::new(Duration::ZERO);
        // 100k TPM → 100 requests per 10 s, so only tokens matter here.
        let mut l = RateLimiter::new(100_000);
        let a = l.try_acquire(clock.monotonic(), 60_000).unwrap();
        assert_eq!(a.remaining_tokens, 40_000);
        assert_eq!(a.remaining_requests, 99);

        clock.advance(Duration::from_secs(20));
        let a = l.try_acquire(clock.monotonic(), 40_000).unwrap();
        assert_eq!(a.remaining_tokens, 0);

        clock.advance(Duration::from_secs(5));
        let t = l.try_acquire(clock.monotonic(), 1).unwrap_err();
        assert_eq!(t.kind, ThrottleKind::Tokens);
        // The first charge (at t=0) expires at t=60; now is t=25.
        assert_eq!(t.retry_after, Duration::from_secs(35));
        assert_eq!(t.retry_after_secs(), 35);
        assert_eq!(t.retry_after_ms(), 35_000);
        assert_eq!(t.remaining_tokens, 0);

        // A refused request is not charged.
        clock.advance(Duration::from_millis(34_999));
        assert!(l.try_acquire(clock.monotonic(), 1).is_err());
        clock.advance(Duration::from_millis(1));
        let a = l.try_acquire(clock.monotonic(), 60_000).unwrap();
        assert_eq!(a.remaining_tokens, 0);
    }

    #[test]
    fn retry_after_skips_to_the_charge_that_frees_enough() {
        let clock = ManualClock::new(Duration::ZERO);
        let mut l = RateLimiter::new(100_000);
        for _ in 0..4 {
            l.try_acquire(clock.monotonic(), 25_000).unwrap();
            clock.advance(Duration::from_secs(10));
        }
        // t=40, window full with charges at 0,10,20,30. 50k needs the first two to expire.
        let t = l.try_acquire(clock.monotonic(), 50_000).unwrap_err();
        assert_eq!(t.retry_after, Duration::from_secs(30));
    }

    #[test]
    fn request_window_limits_calls() {
        let clock = ManualClock::new(Duration::ZERO);
        let mut l = RateLimiter::new(2_000); // 2 requests per 10 s
        l.try_acquire(clock.monotonic(), 1).unwrap();
        clock.advance(Duration::from_secs(3));
        let a = l.try_acquire(clock.monotonic(), 1).unwrap();
        assert_eq!(a.remaining_requests, 0);
        clock.advance(Duration::from_millis(500));
        let t = l.try_acquire(clock.monotonic(), 1).unwrap_err();
        assert_eq!(t.kind, ThrottleKind::Requests);
        assert_eq!(t.retry_after, Duration::from_millis(6_500));
        assert_eq!(t.retry_after_secs(), 7);
        assert_eq!(t.retry_after_ms(), 6_500);
        clock.advance(Duration::from_millis(6_500));
        l.try_acquire(clock.monotonic(), 1).unwrap();
    }

    #[test]
    fn oversized_request_fills_an_empty_window() {
        let clock = ManualClock::new(Duration::ZERO);
        let mut l = RateLimiter::new(100);
        let a = l.try_acquire(clock.monotonic(), 500).unwrap();
        assert_eq!(a.remaining_tokens, 0);
        clock.advance(Duration::from_secs(30));
        let t = l.try_acquire(clock.monotonic(), 500).unwrap_err();
        assert_eq!(t.retry_after, Duration::from_secs(30));
    }

    #[test]
    fn zero_quota_always_refuses() {
        let clock = ManualClock::new(Duration::ZERO);
        let mut l = RateLimiter::new(0);
        let t = l.try_acquire(clock.monotonic(), 0).unwrap_err();
        assert_eq!(t.kind, ThrottleKind::Tokens);
        assert_eq!(t.retry_after_secs(), 60);
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one() {
        let t = Throttle {
            kind: ThrottleKind::Tokens,
            retry_after: Duration::from_micros(10),
            limit_tokens: 1,
            limit_requests: 1,
            remaining_tokens: 0,
            remaining_requests: 0,
        };
        assert_eq!(t.retry_after_secs(), 1);
        assert_eq!(t.retry_after_ms(), 1);
        let t = Throttle {
            retry_after: Duration::from_millis(1001),
            ..t
        };
        assert_eq!(t.retry_after_secs(), 2);
        assert_eq!(t.retry_after_ms(), 1001);
        let t = Throttle {
            retry_after: Duration::ZERO,
            ..t
        };
        assert_eq!(t.retry_after_secs(), 1);
    }

    #[test]
    fn time_going_backwards_does_not_panic() {
        let clock = ManualClock::new(Duration::ZERO);
        clock.advance(Duration::from_secs(100));
        let mut l = RateLimiter::new(1000);
        l.try_acquire(clock.monotonic(), 1000).unwrap();
        let earlier = Duration::ZERO;
        let t = l.try_acquire(earlier, 10).unwrap_err();
        assert!(t.retry_after >= Duration::from_secs(60));
    }
}
