//! Limits, windows and the UTC calendar arithmetic behind them.

use std::time::Duration;

use time::util::days_in_year;
use time::{Date, UtcDateTime};

pub(crate) const HOUR_MS: u64 = 3_600_000;
pub(crate) const DAY_MS: u64 = 24 * HOUR_MS;

/// A calendar period in UTC, for token quotas (`token-quota-period`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// From the top of the hour.
    Hourly,
    /// From midnight UTC.
    Daily,
    /// From Monday 00:00 UTC.
    Weekly,
    /// From the first of the month, 00:00 UTC.
    Monthly,
    /// From January 1st, 00:00 UTC.
    Yearly,
}

/// How a counter's window works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// Sliding window of this length (rate_limit: calls per renewal period, ≤ 300 s in APIM; token_limit: tokens per
    /// minute = 60 s). A charge counts for exactly this long after it was made, give or take 1/60 of the window (see
    /// [`MemoryStore`](crate::MemoryStore) for the slot granularity).
    Sliding(Duration),
    /// Fixed windows of this length aligned to the UNIX epoch (quota-by-key's renewal period).
    Fixed(Duration),
    /// Calendar periods in UTC (token_quota_period).
    Calendar(Period),
}

/// A limit: at most `limit` units per window, per counter key.
///
/// The whole limit (value and window) is part of a counter's identity, so two policies that count the same key with
/// different limits keep separate counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Units allowed per window (calls or tokens).
    pub limit: u64,
    /// The window the units are counted over.
    pub window: Window,
}

impl Limit {
    /// `limit` units per `window`.
    pub fn new(limit: u64, window: Window) -> Self {
        Self { limit, window }
    }
}

impl Window {
    /// For fixed and calendar windows, the window `[start, end)` (milliseconds since the UNIX epoch) that contains
    /// `now_millis`; `None` for a sliding window, which has no fixed boundaries.
    ///
    /// A zero-length fixed window is treated as 1 ms; an end past `u64::MAX` is clamped to it.
    pub fn bounds_at(&self, now_millis: u64) -> Option<(u64, u64)> {
        match *self {
            Window::Sliding(_) => None,
            Window::Fixed(len) => {
                let len = duration_millis(len);
                let start = now_millis - now_millis % len;
                Some((start, start.saturating_add(len)))
            }
            Window::Calendar(period) => Some(calendar_bounds(period, now_millis)),
        }
    }
}

/// Whole milliseconds in `d`, saturating at `u64::MAX` and at least 1 (a zero-length window would divide by zero).
pub(crate) fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `[start, end)` in milliseconds of the UTC calendar period containing `now`.
fn calendar_bounds(period: Period, now: u64) -> (u64, u64) {
    let day = now / DAY_MS;
    let (start_day, end_day) = match period {
        Period::Hourly => {
            let start = now - now % HOUR_MS;
            return (start, start.saturating_add(HOUR_MS));
        }
        Period::Daily => (day, day + 1),
        Period::Weekly => {
            // 1970-01-01 was a Thursday: with Monday = 0 its weekday is 3.
            let weekday = (day + 3) % 7;
            // The week holding the first three days of 1970 started in 1969; clamp it to the epoch.
            (day.saturating_sub(weekday), day + 7 - weekday)
        }
        Period::Monthly => {
            let Some(date) = date_of_day(day) else {
                return (CALENDAR_END_MS, u64::MAX);
            };
            let start = day - u64::from(date.day() - 1);
            (start, start + u64::from(date.month().length(date.year())))
        }
        Period::Yearly => {
            let Some(date) = date_of_day(day) else {
                return (CALENDAR_END_MS, u64::MAX);
            };
            let start = day - u64::from(date.ordinal() - 1);
            (start, start + u64::from(days_in_year(date.year())))
        }
    };
    (
        start_day.saturating_mul(DAY_MS),
        end_day.saturating_mul(DAY_MS),
    )
}

// Dates come from the `time` crate, whose calendar is proleptic Gregorian and ends with 9999-12-31. Later instants
// (no one's quota period) fall into one last month or year, from 10000-01-01, that never ends.

/// The julian day number of 1970-01-01.
const EPOCH_JULIAN_DAY: i32 = UtcDateTime::UNIX_EPOCH.to_julian_day();
/// Milliseconds since the epoch of 10000-01-01, the day after the calendar's last day.
const CALENDAR_END_MS: u64 = (Date::MAX.to_julian_day() + 1 - EPOCH_JULIAN_DAY) as u64 * DAY_MS;

/// The UTC date `days` days after 1970-01-01; `None` past the calendar's last day.
fn date_of_day(days: u64) -> Option<Date> {
    let julian = i32::try_from(days).ok()?.checked_add(EPOCH_JULIAN_DAY)?;
    Date::from_julian_day(julian).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_leap(year: u64) -> bool {
        (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
    }

    fn month_len(year: u64, month: u64) -> u64 {
        match month {
            2 if is_leap(year) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    /// `year-month-day` as the `time` crate has it.
    fn date(year: u64, month: u64, day: u64) -> Date {
        let month = time::Month::try_from(u8::try_from(month).unwrap()).unwrap();
        Date::from_calendar_date(year as i32, month, day as u8).unwrap()
    }

    /// Days since 1970-01-01 of `year-month-day`.
    fn days(year: u64, month: u64, day: u64) -> u64 {
        u64::try_from(date(year, month, day).to_julian_day() - EPOCH_JULIAN_DAY).unwrap()
    }

    /// Milliseconds of `year-month-day hh:mm:ss` UTC.
    fn at(year: u64, month: u64, day: u64, h: u64, m: u64, s: u64) -> u64 {
        days(year, month, day) * DAY_MS + h * HOUR_MS + m * 60_000 + s * 1_000
    }

    #[test]
    fn day_numbers_match_a_day_by_day_walk() {
        // Walk every day from 1970 to 2400 with plain month lengths and compare both directions.
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for n in 0..days(2400, 3, 1) {
            assert_eq!(date_of_day(n), Some(date(y, m, d)), "day {n}");
            assert_eq!(days(y, m, d), n, "{y}-{m}-{d}");
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn known_dates() {
        assert_eq!(days(1970, 1, 1), 0);
        // 2000-03-01 is day 11 017; 2024-02-29 is day 19 782 (both from `date -u -d ... +%s` / 86400).
        assert_eq!(days(2000, 3, 1), 11_017);
        assert_eq!(days(2024, 2, 29), 19_782);
        assert_eq!(date_of_day(19_782), Some(date(2024, 2, 29)));
        // 1_700_000_000 s = 2023-11-14T22:13:20Z.
        assert_eq!(at(2023, 11, 14, 22, 13, 20), 1_700_000_000_000);
        // 253_402_300_800 s = 10000-01-01T00:00:00Z, the day after the calendar's last.
        assert_eq!(CALENDAR_END_MS, 253_402_300_800_000);
        assert_eq!(CALENDAR_END_MS, at(9999, 12, 31, 0, 0, 0) + DAY_MS);
    }

    #[test]
    fn days_past_the_calendar_have_no_date() {
        let last = days(9999, 12, 31);
        assert_eq!(date_of_day(last), Some(date(9999, 12, 31)));
        assert_eq!(date_of_day(last + 1), None);
        // Past i32 (the julian day's type), and where adding the epoch's julian day overflows it.
        assert_eq!(date_of_day(u64::from(u32::MAX)), None);
        assert_eq!(date_of_day(i32::MAX as u64), None);
        assert_eq!(date_of_day(u64::MAX), None);
    }

    #[test]
    fn sliding_windows_have_no_bounds() {
        assert_eq!(
            Window::Sliding(Duration::from_secs(60)).bounds_at(123),
            None
        );
    }

    #[test]
    fn fixed_windows_align_to_the_epoch() {
        let w = Window::Fixed(Duration::from_secs(300));
        assert_eq!(w.bounds_at(0), Some((0, 300_000)));
        assert_eq!(w.bounds_at(299_999), Some((0, 300_000)));
        assert_eq!(w.bounds_at(300_000), Some((300_000, 600_000)));
        // Zero length is treated as 1 ms; a huge length saturates.
        assert_eq!(Window::Fixed(Duration::ZERO).bounds_at(42), Some((42, 43)));
        assert_eq!(
            Window::Fixed(Duration::MAX).bounds_at(42),
            Some((0, u64::MAX))
        );
    }

    #[test]
    fn hourly_and_daily_bounds() {
        let now = at(2024, 5, 17, 13, 45, 10) + 123;
        let hourly = Window::Calendar(Period::Hourly);
        assert_eq!(
            hourly.bounds_at(now),
            Some((at(2024, 5, 17, 13, 0, 0), at(2024, 5, 17, 14, 0, 0)))
        );
        assert_eq!(
            hourly.bounds_at(at(2024, 5, 17, 14, 0, 0) - 1),
            Some((at(2024, 5, 17, 13, 0, 0), at(2024, 5, 17, 14, 0, 0)))
        );
        assert_eq!(
            hourly.bounds_at(at(2024, 5, 17, 14, 0, 0)),
            Some((at(2024, 5, 17, 14, 0, 0), at(2024, 5, 17, 15, 0, 0)))
        );
        let daily = Window::Calendar(Period::Daily);
        assert_eq!(
            daily.bounds_at(now),
            Some((at(2024, 5, 17, 0, 0, 0), at(2024, 5, 18, 0, 0, 0)))
        );
        // The last day of a year rolls into the next year.
        assert_eq!(
            daily.bounds_at(at(2023, 12, 31, 23, 59, 59)),
            Some((at(2023, 12, 31, 0, 0, 0), at(2024, 1, 1, 0, 0, 0)))
        );
    }

    #[test]
    fn weeks_start_on_monday() {
        let weekly = Window::Calendar(Period::Weekly);
        // 2024-05-13 is a Monday; 2024-05-19 a Sunday.
        let week = Some((at(2024, 5, 13, 0, 0, 0), at(2024, 5, 20, 0, 0, 0)));
        assert_eq!(weekly.bounds_at(at(2024, 5, 13, 0, 0, 0)), week);
        assert_eq!(weekly.bounds_at(at(2024, 5, 16, 9, 0, 0)), week);
        assert_eq!(weekly.bounds_at(at(2024, 5, 20, 0, 0, 0) - 1), week);
        assert_eq!(
            weekly.bounds_at(at(2024, 5, 20, 0, 0, 0)),
            Some((at(2024, 5, 20, 0, 0, 0), at(2024, 5, 27, 0, 0, 0)))
        );
        // A week across a year end: 2024-12-30 (Monday) to 2025-01-06.
        assert_eq!(
            weekly.bounds_at(at(2025, 1, 1, 12, 0, 0)),
            Some((at(2024, 12, 30, 0, 0, 0), at(2025, 1, 6, 0, 0, 0)))
        );
        // 1970-01-01 (Thursday) belongs to the week of Monday 1969-12-29, clamped at the epoch; it still ends on
        // Monday 1970-01-05.
        assert_eq!(weekly.bounds_at(0), Some((0, at(1970, 1, 5, 0, 0, 0))));
        assert_eq!(
            weekly.bounds_at(at(1970, 1, 5, 0, 0, 0)),
            Some((at(1970, 1, 5, 0, 0, 0), at(1970, 1, 12, 0, 0, 0)))
        );
    }

    #[test]
    fn months_including_a_leap_february() {
        let monthly = Window::Calendar(Period::Monthly);
        let feb = Some((at(2024, 2, 1, 0, 0, 0), at(2024, 3, 1, 0, 0, 0)));
        assert_eq!(monthly.bounds_at(at(2024, 2, 1, 0, 0, 0)), feb);
        assert_eq!(monthly.bounds_at(at(2024, 2, 29, 23, 59, 59)), feb);
        assert_eq!(feb.map(|(s, e)| (e - s) / DAY_MS), Some(29));
        assert_eq!(
            monthly.bounds_at(at(2024, 3, 1, 0, 0, 0)),
            Some((at(2024, 3, 1, 0, 0, 0), at(2024, 4, 1, 0, 0, 0)))
        );
        // A common-year February has 28 days, and 1900 (divisible by 100) and 2100 are not leap years; 2000 is.
        for (year, days) in [(2023, 28), (2000, 29), (2100, 28)] {
            let (s, e) = monthly
                .bounds_at(at(year, 2, 10, 0, 0, 0))
                .unwrap_or_default();
            assert_eq!((e - s) / DAY_MS, days, "{year}");
        }
        // December rolls into January.
        assert_eq!(
            monthly.bounds_at(at(2024, 12, 31, 23, 0, 0)),
            Some((at(2024, 12, 1, 0, 0, 0), at(2025, 1, 1, 0, 0, 0)))
        );
    }

    #[test]
    fn years() {
        let yearly = Window::Calendar(Period::Yearly);
        let y2024 = Some((at(2024, 1, 1, 0, 0, 0), at(2025, 1, 1, 0, 0, 0)));
        assert_eq!(yearly.bounds_at(at(2024, 1, 1, 0, 0, 0)), y2024);
        assert_eq!(yearly.bounds_at(at(2024, 12, 31, 23, 59, 59) + 999), y2024);
        assert_eq!(
            yearly.bounds_at(at(2025, 1, 1, 0, 0, 0)),
            Some((at(2025, 1, 1, 0, 0, 0), at(2026, 1, 1, 0, 0, 0)))
        );
        assert_eq!(y2024.map(|(s, e)| (e - s) / DAY_MS), Some(366));
    }

    #[test]
    fn the_last_month_and_year_of_the_calendar_end_where_it_ends() {
        let monthly = Window::Calendar(Period::Monthly);
        let yearly = Window::Calendar(Period::Yearly);
        let december = Some((at(9999, 12, 1, 0, 0, 0), CALENDAR_END_MS));
        assert_eq!(monthly.bounds_at(at(9999, 12, 15, 0, 0, 0)), december);
        assert_eq!(monthly.bounds_at(CALENDAR_END_MS - 1), december);
        let year = Some((at(9999, 1, 1, 0, 0, 0), CALENDAR_END_MS));
        assert_eq!(yearly.bounds_at(at(9999, 6, 1, 0, 0, 0)), year);
        assert_eq!(yearly.bounds_at(CALENDAR_END_MS - 1), year);
        // From 10000-01-01 on: one period that never ends.
        for now in [CALENDAR_END_MS, CALENDAR_END_MS + 40 * DAY_MS, u64::MAX] {
            assert_eq!(monthly.bounds_at(now), Some((CALENDAR_END_MS, u64::MAX)));
            assert_eq!(yearly.bounds_at(now), Some((CALENDAR_END_MS, u64::MAX)));
        }
        // Hours, days and weeks need no calendar and go on.
        let after = CALENDAR_END_MS + 40 * DAY_MS + 5;
        assert_eq!(
            Window::Calendar(Period::Daily).bounds_at(after),
            Some((after - 5, after - 5 + DAY_MS))
        );
    }

    #[test]
    fn extreme_times_do_not_panic() {
        for period in [
            Period::Hourly,
            Period::Daily,
            Period::Weekly,
            Period::Monthly,
            Period::Yearly,
        ] {
            for now in [0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
                let (start, end) = Window::Calendar(period).bounds_at(now).unwrap_or_default();
                assert!(
                    start <= now && (now < end || end == u64::MAX),
                    "{period:?} {now}"
                );
            }
        }
    }
}
