//! The rate-limit room a backend last reported.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::parse_reset;

/// The rate-limit room a backend last reported in its `x-ratelimit-remaining-tokens` and
/// `x-ratelimit-remaining-requests` headers. Selection uses it to steer a request away from a backend that could not
/// fit it, before that backend has to answer 429.
#[derive(Debug, Default)]
pub struct Headroom {
    reading: Mutex<Option<HeadroomView>>,
}

/// A backend's reported room, as [`Headroom::view`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadroomView {
    /// Tokens left in the backend's current rate-limit window, if known.
    pub remaining_tokens: Option<u64>,
    /// Requests left in the backend's current rate-limit window, if known.
    pub remaining_requests: Option<u64>,
    /// When the reading stops counting (a monotonic reading).
    pub expires: Duration,
}

/// Whether a request fits in a backend's reported room ([`Headroom::fits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The backend has room for it, as far as it said.
    Yes,
    /// The backend said it has no room for it.
    No,
    /// Nothing current is known about the backend's room.
    Unknown,
}

impl Headroom {
    fn lock(&self) -> MutexGuard<'_, Option<HeadroomView>> {
        // Every update is one assignment, so a poisoned lock still holds a whole reading.
        self.reading.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a new reading from a response's headers (`get` returns a header's value given its lowercase name).
    ///
    /// `x-ratelimit-remaining-tokens` and `x-ratelimit-remaining-requests` are known when they are non-negative
    /// integers; `-1`, anything unparsable, or a missing header leaves that value unknown. A 0 counts only when the
    /// matching reset (`x-ratelimit-reset-tokens` or `x-ratelimit-reset-requests`, read by [`parse_reset`]) is given:
    /// a 0 with no word on when the room comes back is treated as unknown.
    ///
    /// The reading expires at the earliest reset given for a known value, but never later than `max_age` from
    /// `now` (nor later than that when no reset is given). A response with neither value known clears the reading.
    pub fn observe<'a>(
        &self,
        get: impl Fn(&str) -> Option<&'a str>,
        now: Duration,
        max_age: Duration,
    ) {
        let tokens = known(
            get("x-ratelimit-remaining-tokens"),
            get("x-ratelimit-reset-tokens"),
        );
        let requests = known(
            get("x-ratelimit-remaining-requests"),
            get("x-ratelimit-reset-requests"),
        );
        let reading = if tokens.is_none() && requests.is_none() {
            None
        } else {
            let reset = [tokens, requests]
                .into_iter()
                .filter_map(|value| value?.1)
                .min();
            let age = reset.map_or(max_age, |reset| reset.min(max_age));
            Some(HeadroomView {
                remaining_tokens: tokens.map(|(value, _)| value),
                remaining_requests: requests.map(|(value, _)| value),
                expires: now.saturating_add(age),
            })
        };
        *self.lock() = reading;
    }

    /// Marks the backend as having no room at all until `until` (a monotonic reading), as after a 429 that said
    /// when to come back. The caller works out `until` (now plus the Retry-After, capped as it sees fit).
    pub fn exhaust(&self, until: Duration) {
        *self.lock() = Some(HeadroomView {
            remaining_tokens: Some(0),
            remaining_requests: Some(0),
            expires: until,
        });
    }

    /// The current reading; `None` when nothing is known or the reading has expired.
    pub fn view(&self, now: Duration) -> Option<HeadroomView> {
        self.lock().filter(|reading| now < reading.expires)
    }

    /// Whether a request needing `tokens` (`None` when its size is not known) fits in the reported room.
    ///
    /// [`Fit::Unknown`] without a current reading; [`Fit::No`] when no requests are left, or when both the request's
    /// tokens and the remaining tokens are known and the request needs more; [`Fit::Yes`] otherwise.
    pub fn fits(&self, tokens: Option<u64>, now: Duration) -> Fit {
        let Some(reading) = self.view(now) else {
            return Fit::Unknown;
        };
        let no_requests = reading.remaining_requests == Some(0);
        let too_big =
            matches!((tokens, reading.remaining_tokens), (Some(need), Some(room)) if need > room);
        if no_requests || too_big {
            Fit::No
        } else {
            Fit::Yes
        }
    }
}

/// A remaining count with its reset, when the count is known: an integer, and not a 0 without a reset.
fn known(remaining: Option<&str>, reset: Option<&str>) -> Option<(u64, Option<Duration>)> {
    let text = remaining?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = text.parse().ok()?;
    let reset = reset.and_then(parse_reset);
    if value == 0 && reset.is_none() {
        None
    } else {
        Some((value, reset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    const NANO: Duration = Duration::from_nanos(1);
    const MAX_AGE: Duration = Duration::from_secs(60);

    fn observe(headroom: &Headroom, list: &[(&str, &str)], now: Duration) {
        headroom.observe(
            |name| {
                list.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| *value)
            },
            now,
            MAX_AGE,
        );
    }

    fn view(tokens: Option<u64>, requests: Option<u64>, expires: Duration) -> Option<HeadroomView> {
        Some(HeadroomView {
            remaining_tokens: tokens,
            remaining_requests: requests,
            expires,
        })
    }

    #[test]
    fn nothing_is_known_at_first() {
        let headroom = Headroom::default();
        assert_eq!(headroom.view(Duration::ZERO), None);
        assert_eq!(headroom.fits(Some(1), Duration::ZERO), Fit::Unknown);
        assert_eq!(headroom.fits(None, Duration::ZERO), Fit::Unknown);
    }

    #[test]
    fn a_full_reading_expires_at_the_earliest_reset() {
        let headroom = Headroom::default();
        let now = 100 * SEC;
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-tokens", "149000"),
                ("x-ratelimit-remaining-requests", "899"),
                ("x-ratelimit-reset-tokens", "6m0s"),
                ("x-ratelimit-reset-requests", "1s"),
            ],
            now,
        );
        assert_eq!(
            headroom.view(now),
            view(Some(149_000), Some(899), now + SEC)
        );
        assert_eq!(
            headroom.view(now + SEC - NANO).map(|v| v.expires),
            Some(now + SEC)
        );
        assert_eq!(headroom.view(now + SEC), None);
        assert_eq!(headroom.fits(Some(1), now + SEC), Fit::Unknown);

        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-tokens", "10"),
                ("x-ratelimit-remaining-requests", "5"),
                ("x-ratelimit-reset-tokens", "2s"),
                ("x-ratelimit-reset-requests", "30s"),
            ],
            now,
        );
        assert_eq!(headroom.view(now), view(Some(10), Some(5), now + 2 * SEC));
    }

    #[test]
    fn without_a_reset_a_reading_lasts_max_age() {
        let headroom = Headroom::default();
        observe(&headroom, &[("x-ratelimit-remaining-tokens", " 500 ")], SEC);
        assert_eq!(headroom.view(SEC), view(Some(500), None, SEC + MAX_AGE));
        assert!(headroom.view(SEC + MAX_AGE - NANO).is_some());
        assert_eq!(headroom.view(SEC + MAX_AGE), None);
    }

    #[test]
    fn a_reset_longer_than_max_age_is_capped() {
        let headroom = Headroom::default();
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-requests", "3"),
                ("x-ratelimit-reset-requests", "1h"),
            ],
            SEC,
        );
        assert_eq!(headroom.view(SEC), view(None, Some(3), SEC + MAX_AGE));
    }

    #[test]
    fn only_the_reset_of_a_known_value_counts() {
        let headroom = Headroom::default();
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-tokens", "-1"),
                ("x-ratelimit-reset-tokens", "1s"),
                ("x-ratelimit-remaining-requests", "7"),
                ("x-ratelimit-reset-requests", "20s"),
            ],
            Duration::ZERO,
        );
        assert_eq!(headroom.view(Duration::ZERO), view(None, Some(7), 20 * SEC));
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-tokens", "70"),
                ("x-ratelimit-reset-tokens", "4s"),
                ("x-ratelimit-reset-requests", "1s"),
            ],
            Duration::ZERO,
        );
        assert_eq!(headroom.view(Duration::ZERO), view(Some(70), None, 4 * SEC));
    }

    #[test]
    fn zero_counts_only_with_a_reset() {
        let headroom = Headroom::default();
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-remaining-requests", "12"),
            ],
            Duration::ZERO,
        );
        assert_eq!(headroom.view(Duration::ZERO), view(None, Some(12), MAX_AGE));
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "3s"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "soon"),
            ],
            Duration::ZERO,
        );
        assert_eq!(headroom.view(Duration::ZERO), view(Some(0), None, 3 * SEC));
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "5"),
            ],
            Duration::ZERO,
        );
        assert_eq!(headroom.view(Duration::ZERO), view(None, Some(0), 5 * SEC));
    }

    #[test]
    fn unusable_values_are_unknown_and_nothing_known_clears_the_reading() {
        let headroom = Headroom::default();
        observe(
            &headroom,
            &[("x-ratelimit-remaining-tokens", "9")],
            Duration::ZERO,
        );
        assert!(headroom.view(Duration::ZERO).is_some());
        for garbage in [
            "-1",
            "",
            " ",
            "+5",
            "1.5",
            "abc",
            "99999999999999999999999",
            "0",
        ] {
            observe(
                &headroom,
                &[("x-ratelimit-remaining-tokens", "9")],
                Duration::ZERO,
            );
            observe(
                &headroom,
                &[
                    ("x-ratelimit-remaining-tokens", garbage),
                    ("x-ratelimit-remaining-requests", garbage),
                ],
                Duration::ZERO,
            );
            assert_eq!(headroom.view(Duration::ZERO), None, "{garbage:?}");
        }
        observe(
            &headroom,
            &[("x-ratelimit-remaining-tokens", "9")],
            Duration::ZERO,
        );
        observe(&headroom, &[], Duration::ZERO);
        assert_eq!(headroom.view(Duration::ZERO), None);
    }

    #[test]
    fn fitting_a_request() {
        let headroom = Headroom::default();
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-tokens", "100"),
                ("x-ratelimit-remaining-requests", "2"),
            ],
            Duration::ZERO,
        );
        assert_eq!(headroom.fits(Some(99), Duration::ZERO), Fit::Yes);
        assert_eq!(headroom.fits(Some(100), Duration::ZERO), Fit::Yes);
        assert_eq!(headroom.fits(Some(101), Duration::ZERO), Fit::No);
        assert_eq!(headroom.fits(None, Duration::ZERO), Fit::Yes);
        assert_eq!(headroom.fits(Some(101), MAX_AGE), Fit::Unknown);

        // Requests left but tokens unknown: any size fits.
        observe(
            &headroom,
            &[("x-ratelimit-remaining-requests", "1")],
            Duration::ZERO,
        );
        assert_eq!(headroom.fits(Some(1_000_000), Duration::ZERO), Fit::Yes);

        // No requests left: nothing fits, whatever its size.
        observe(
            &headroom,
            &[
                ("x-ratelimit-remaining-tokens", "100"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "2s"),
            ],
            Duration::ZERO,
        );
        assert_eq!(headroom.fits(Some(1), Duration::ZERO), Fit::No);
        assert_eq!(headroom.fits(None, Duration::ZERO), Fit::No);
        assert_eq!(headroom.fits(None, 2 * SEC), Fit::Unknown);
    }

    #[test]
    fn exhausting_leaves_no_room_until_then() {
        let headroom = Headroom::default();
        observe(
            &headroom,
            &[("x-ratelimit-remaining-tokens", "100")],
            Duration::ZERO,
        );
        headroom.exhaust(10 * SEC);
        assert_eq!(headroom.view(SEC), view(Some(0), Some(0), 10 * SEC));
        assert_eq!(headroom.fits(None, SEC), Fit::No);
        assert_eq!(headroom.fits(Some(0), 10 * SEC - NANO), Fit::No);
        assert_eq!(headroom.fits(Some(0), 10 * SEC), Fit::Unknown);
    }

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let headroom = std::sync::Arc::new(Headroom::default());
        let holder = headroom.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = holder.reading.lock();
            panic!("poison the headroom's lock");
        })
        .join();
        assert!(panicked.is_err());
        headroom.exhaust(SEC);
        assert_eq!(headroom.fits(None, Duration::ZERO), Fit::No);
    }
}
