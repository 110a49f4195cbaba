//! How long a backend asked callers to stay away, read from its response headers.
//!
//! Numbers are parsed by hand rather than through `f64`: the grammar accepted is exactly digits with an optional
//! fractional part (no sign, exponent, `inf` or `NaN`), and the result is exact to the nanosecond.

use std::time::{Duration, UNIX_EPOCH};

const NANOS_PER_SEC: u128 = 1_000_000_000;
const NANOS_PER_MILLI: u128 = 1_000_000;

/// How long a backend asked callers to wait, read from its response headers.
///
/// The headers are consulted in this order, and the first one present with a usable value gives the answer:
///
/// 1. `retry-after-ms`: milliseconds, possibly fractional (`1500.5`);
/// 2. `retry-after`: seconds, possibly fractional, or an HTTP-date, turned into a delay by subtracting `now_unix`
///    (the wall clock's time since the UNIX epoch); a date already past is skipped;
/// 3. `x-ratelimit-reset-requests`, then 4. `x-ratelimit-reset-tokens`: plain seconds (`6`, `1.5`) or duration
///    text as OpenAI writes it (`1s`, `6m0s`, `20ms`, `1m30.5s`), see [`parse_reset`].
///
/// A value that cannot be parsed, or that is negative, is passed over as if it were absent; nothing here is an error.
/// `get` returns a header's value given its lowercase name.
pub fn retry_after_from<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
    now_unix: Duration,
) -> Option<Duration> {
    get("retry-after-ms")
        .and_then(|value| decimal(value.trim(), NANOS_PER_MILLI))
        .or_else(|| get("retry-after").and_then(|value| retry_after_value(value, now_unix)))
        .or_else(|| get("x-ratelimit-reset-requests").and_then(parse_reset))
        .or_else(|| get("x-ratelimit-reset-tokens").and_then(parse_reset))
}

/// Reads a reset time such as `6`, `1.5`, `1s`, `6m0s`, `20ms` or `1h2m3s` as a [`Duration`].
///
/// A bare number is seconds. Otherwise the text is a sequence of numbers, each followed by a unit: `h`, `m`, `s`,
/// `ms`, `us` (or `µs`), `ns`; the parts are added up. Surrounding whitespace is ignored. Anything else (an empty
/// string, a sign, an unknown unit, a number too large for a `Duration`) gives `None`.
pub fn parse_reset(value: &str) -> Option<Duration> {
    let text = value.trim();
    decimal(text, NANOS_PER_SEC).or_else(|| unit_sequence(text))
}

/// The `retry-after` header: delay-seconds (fractions tolerated) or an HTTP-date in the future.
fn retry_after_value(value: &str, now_unix: Duration) -> Option<Duration> {
    let text = value.trim();
    decimal(text, NANOS_PER_SEC).or_else(|| {
        let at = httpdate::parse_http_date(text).ok()?;
        at.duration_since(UNIX_EPOCH).ok()?.checked_sub(now_unix)
    })
}

/// Go-style duration text: `<number><unit>` repeated, at least once.
fn unit_sequence(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !is_number_char(c))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after.find(is_number_char).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos = match unit {
            "h" => 3_600 * NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "s" => NANOS_PER_SEC,
            "ms" => NANOS_PER_MILLI,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        total = total.checked_add(decimal(number, unit_nanos)?)?;
        rest = next;
    }
    Some(total)
}

fn is_number_char(c: char) -> bool {
    c.is_ascii_digit() || c == '.'
}

/// `digits[.digits]` (either side may be empty, not both) times a unit of `unit_nanos` nanoseconds. Fractional
/// digits finer than a nanosecond are dropped.
fn decimal(text: &str, unit_nanos: u128) -> Option<Duration> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let mut units: u128 = 0;
    for digit in whole.bytes() {
        units = units
            .checked_mul(10)?
            .checked_add(u128::from(digit - b'0'))?;
    }
    let mut nanos = units.checked_mul(unit_nanos)?;
    let mut place = unit_nanos;
    for digit in fraction.bytes() {
        place /= 10;
        nanos = nanos.checked_add(u128::from(digit - b'0') * place)?;
    }
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, subsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// A header lookup over a fixed list.
    fn headers<'a>(list: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| {
            list.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| *value)
        }
    }

    #[test]
    fn plain_numbers_are_seconds() {
        assert_eq!(parse_reset("6"), Some(secs(6)));
        assert_eq!(parse_reset("0"), Some(Duration::ZERO));
        assert_eq!(parse_reset(" 12 "), Some(secs(12)));
        assert_eq!(parse_reset("1.5"), Some(ms(1_500)));
        assert_eq!(parse_reset(".25"), Some(ms(250)));
        assert_eq!(parse_reset("2."), Some(secs(2)));
        assert_eq!(parse_reset("0.000000001"), Some(Duration::from_nanos(1)));
        assert_eq!(parse_reset("0.0000000019"), Some(Duration::from_nanos(1)));
        assert_eq!(parse_reset("86400"), Some(secs(86_400)));
    }

    #[test]
    fn go_durations_add_up_their_parts() {
        assert_eq!(parse_reset("1s"), Some(secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(secs(360)));
        assert_eq!(parse_reset("20ms"), Some(ms(20)));
        assert_eq!(parse_reset("1m30.5s"), Some(ms(90_500)));
        assert_eq!(parse_reset("1h2m3s"), Some(secs(3_723)));
        assert_eq!(parse_reset("1.5h"), Some(secs(5_400)));
        assert_eq!(parse_reset("7us"), Some(Duration::from_micros(7)));
        assert_eq!(parse_reset("7µs"), Some(Duration::from_micros(7)));
        assert_eq!(parse_reset("7μs"), Some(Duration::from_micros(7)));
        assert_eq!(parse_reset("9ns"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_reset("1s500ms"), Some(ms(1_500)));
        assert_eq!(parse_reset(" 2m "), Some(secs(120)));
    }

    #[test]
    fn anything_else_is_not_a_reset() {
        for bad in [
            "", " ", ".", "-1", "-1s", "+1", "1e3", "inf", "NaN", "s", "ms", "1x", "1 s", "1s2",
            "1..5", "1.2.3", "abc", "1,5", "0x10", "1m-3s",
        ] {
            assert_eq!(parse_reset(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn numbers_too_large_are_not_a_reset() {
        assert_eq!(parse_reset("18446744073709551615"), Some(secs(u64::MAX)));
        assert_eq!(parse_reset("18446744073709551616"), None);
        assert_eq!(
            parse_reset("999999999999999999999999999999999999999999"),
            None
        );
        assert_eq!(parse_reset("99999999999999999999999999999h"), None);
        assert_eq!(parse_reset("18446744073709551615s1s"), None);
    }

    #[test]
    fn retry_after_ms_comes_first() {
        let list = [
            ("retry-after", "9"),
            ("retry-after-ms", "1500.5"),
            ("x-ratelimit-reset-requests", "3"),
        ];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(Duration::from_micros(1_500_500))
        );
        let list = [("retry-after-ms", " 20 ")];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(ms(20))
        );
    }

    #[test]
    fn retry_after_takes_seconds() {
        let list = [("retry-after", "7"), ("x-ratelimit-reset-requests", "3")];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(secs(7))
        );
        let list = [("retry-after", "0.5")];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(ms(500))
        );
    }

    #[test]
    fn retry_after_takes_an_http_date_against_the_wall_clock() {
        // Sun, 06 Nov 1994 08:49:37 GMT is 784111777 s after the epoch.
        let list = [("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")];
        assert_eq!(
            retry_after_from(headers(&list), secs(784_111_777 - 30)),
            Some(secs(30))
        );
        assert_eq!(
            retry_after_from(headers(&list), secs(784_111_777)),
            Some(Duration::ZERO)
        );
        // A date already past is skipped, and the next header answers instead.
        assert_eq!(retry_after_from(headers(&list), secs(784_111_778)), None);
        let list = [
            ("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("x-ratelimit-reset-tokens", "4s"),
        ];
        assert_eq!(
            retry_after_from(headers(&list), secs(784_111_778)),
            Some(secs(4))
        );
    }

    #[test]
    fn rate_limit_resets_come_last_requests_before_tokens() {
        let list = [
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("x-ratelimit-reset-requests", "1s"),
        ];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(secs(1))
        );
        let list = [("x-ratelimit-reset-tokens", "6m0s")];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(secs(360))
        );
    }

    #[test]
    fn unusable_values_are_passed_over() {
        let list = [
            ("retry-after-ms", "-5"),
            ("retry-after", "soon"),
            ("x-ratelimit-reset-requests", "1e3"),
            ("x-ratelimit-reset-tokens", "20ms"),
        ];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(ms(20))
        );
        let list = [("retry-after-ms", "NaN"), ("retry-after", "2")];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(secs(2))
        );
        let list = [("retry-after", "-1"), ("x-ratelimit-reset-requests", "3")];
        assert_eq!(
            retry_after_from(headers(&list), Duration::ZERO),
            Some(secs(3))
        );
        let list = [("retry-after", "1m"), ("retry-after-ms", "1ms")];
        assert_eq!(retry_after_from(headers(&list), Duration::ZERO), None);
        assert_eq!(retry_after_from(headers(&[]), Duration::ZERO), None);
    }
}
