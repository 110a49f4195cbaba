//! Limits, windows and the UTC calendar arithmetic behind them.

use std::time::Duration;

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
            let (year, month, _) = civil_from_days(day);
            let (next_year, next_month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            (
                days_from_civil(year, month, 1),
                days_from_civil(next_year, next_month, 1),
            )
        }
        Period::Yearly => {
            let (year, _, _) = civil_from_days(day);
            (days_from_civil(year, 1, 1), days_from_civil(year + 1, 1, 1))
        }
    };
    (
        start_day.saturating_mul(DAY_MS),
        end_day.saturating_mul(DAY_MS),
    )
}

// Civil (proleptic Gregorian) calendar arithmetic for dates on or after 1970-01-01.
//
// Years are counted from March 1st so that the leap day is the last day of the counting year; the calendar then
// repeats every 400 years (146 097 days), and inside a 400-year cycle a counting year's first day is
// 365·y + y/4 − y/100 days after the cycle's start. Months from March have the lengths 31 30 31 30 31 31 30 31 30 31
// 31 28/29, whose running totals are (153·m + 2) / 5 for m = 0 (March) … 11 (February).

/// Days from 0000-03-01 (the start of a 400-year cycle) to 1970-01-01.
const EPOCH_FROM_CYCLE_START: u64 = 719_468;
const DAYS_PER_400_YEARS: u64 = 146_097;

/// Days since 1970-01-01 of the date `year-month-day` (month 1..=12, day 1..=31); the date must not precede 1970.
pub(crate) fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    // Counting years start in March: January and February belong to the previous counting year.
    let counting_year = if month <= 2 { year - 1 } else { year };
    let cycle = counting_year / 400;
    let year_of_cycle = counting_year % 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_cycle = 365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100 + day_of_year;
    (cycle * DAYS_PER_400_YEARS + day_of_cycle).saturating_sub(EPOCH_FROM_CYCLE_START)
}

/// The date `(year, month 1..=12, day 1..=31)` that is `days` days after 1970-01-01.
pub(crate) fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let from_cycle_start = days + EPOCH_FROM_CYCLE_START;
    let cycle = from_cycle_start / DAYS_PER_400_YEARS;
    let day_of_cycle = from_cycle_start % DAYS_PER_400_YEARS;
    // Remove the leap days (one per 4 years, none per 100, one per 400) to find the counting year in the cycle.
    let year_of_cycle = (day_of_cycle - day_of_cycle / 1_460 + day_of_cycle / 36_524
        - day_of_cycle / 146_096)
        / 365;
    let day_of_year =
        day_of_cycle - (365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = cycle * 400 + year_of_cycle + u64::from(month <= 2);
    (year, month, day)
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

    /// Milliseconds of `year-month-day hh:mm:ss` UTC.
    fn at(year: u64, month: u64, day: u64, h: u64, m: u64, s: u64) -> u64 {
        days_from_civil(year, month, day) * DAY_MS + h * HOUR_MS + m * 60_000 + s * 1_000
    }

    #[test]
    fn civil_conversion_matches_a_day_by_day_walk() {
        // Walk every day from 1970 to 2400 with plain month lengths and compare both directions.
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for days in 0..days_from_civil(2400, 3, 1) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
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
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        // 2000-03-01 is day 11 017; 2024-02-29 is day 19 782 (both from `date -u -d ... +%s` / 86400).
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        // 1_700_000_000 s = 2023-11-14T22:13:20Z.
        assert_eq!(at(2023, 11, 14, 22, 13, 20), 1_700_000_000_000);
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
