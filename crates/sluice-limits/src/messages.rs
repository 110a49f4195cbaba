//! APIM's texts for limit refusals (reference: apim.md §3.1–3.3).
//!
//! Every duration is first rounded up to whole seconds, at least 1, exactly as [`retry_after_secs`] does for the
//! `Retry-After` header, so the header and the message always agree.
//!
//! The unit words are always plural ("1 seconds"), as APIM's fixed templates print them.

use std::time::Duration;

/// The `Retry-After` value for `d`: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .max(1)
}

/// rate_limit's 429 message: `Rate limit is exceeded. Try again in N seconds.`
pub fn rate_limit_message(retry_after: Duration) -> String {
    format!(
        "Rate limit is exceeded. Try again in {} seconds.",
        retry_after_secs(retry_after)
    )
}

/// quota's 403 message: `Out of call volume quota. Quota will be replenished in hh:mm:ss.`
///
/// The duration is printed like a .NET `TimeSpan`: `hh:mm:ss`, with a day count in front when it is a day or more
/// (`d.hh:mm:ss`, e.g. `20.09:58:55`).
pub fn call_quota_message(retry_after: Duration) -> String {
    let secs = retry_after_secs(retry_after);
    let (days, h, m, s) = split(secs);
    let span = if days > 0 {
        format!("{days}.{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    };
    format!("Out of call volume quota. Quota will be replenished in {span}.")
}

/// token_limit's 429 message (tokens per minute): `Token limit is exceeded. Try again in N seconds.`
pub fn token_limit_message(retry_after: Duration) -> String {
    format!(
        "Token limit is exceeded. Try again in {} seconds.",
        retry_after_secs(retry_after)
    )
}

/// token_limit's 403 message (token quota): `Token quota is exceeded. Try again in M minutes and S seconds.`
///
/// The observed APIM text names minutes and seconds ("in 21 minutes and 33 seconds"); longer waits are unverified.
/// The rule here: minutes and seconds are always given (so under a minute reads "0 minutes and 45 seconds"); hours are
/// added from one hour on and days from one day on, with every smaller unit listed even when zero
/// ("2 hours, 5 minutes and 3 seconds", "1 days, 0 hours, 0 minutes and 1 seconds").
pub fn token_quota_message(retry_after: Duration) -> String {
    let secs = retry_after_secs(retry_after);
    let (days, h, m, s) = split(secs);
    let lead = if days > 0 {
        format!("{days} days, {h} hours, {m} minutes")
    } else if h > 0 {
        format!("{h} hours, {m} minutes")
    } else {
        format!("{m} minutes")
    };
    format!("Token quota is exceeded. Try again in {lead} and {s} seconds.")
}

/// Splits seconds into (days, hours, minutes, seconds).
fn split(secs: u64) -> (u64, u64, u64, u64) {
    (
        secs / 86_400,
        secs % 86_400 / 3_600,
        secs % 3_600 / 60,
        secs % 60,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one_second() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(ms(1_000)), 1);
        assert_eq!(retry_after_secs(ms(1_001)), 2);
        assert_eq!(retry_after_secs(ms(56_200)), 57);
        assert_eq!(retry_after_secs(Duration::from_secs(57)), 57);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
    }

    #[test]
    fn rate_and_token_limit_messages() {
        assert_eq!(
            rate_limit_message(ms(56_001)),
            "Rate limit is exceeded. Try again in 57 seconds."
        );
        assert_eq!(
            rate_limit_message(ms(10)),
            "Rate limit is exceeded. Try again in 1 seconds."
        );
        assert_eq!(
            token_limit_message(ms(52_000)),
            "Token limit is exceeded. Try again in 52 seconds."
        );
        assert_eq!(
            token_limit_message(ms(40_500)),
            "Token limit is exceeded. Try again in 41 seconds."
        );
    }

    #[test]
    fn the_429_body_of_the_reference_has_its_exact_length() {
        // apim.md §3.2: this body is 84 bytes.
        let body = format!(
            "{{ \"statusCode\": 429, \"message\": \"{}\" }}",
            rate_limit_message(ms(57_000))
        );
        assert_eq!(body.len(), 84);
    }

    #[test]
    fn call_quota_message_is_a_timespan() {
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(
            call_quota_message(secs(3 * 3600 + 14 * 60 + 17)),
            "Out of call volume quota. Quota will be replenished in 03:14:17."
        );
        assert_eq!(
            call_quota_message(secs(20 * 86_400 + 9 * 3600 + 58 * 60 + 55)),
            "Out of call volume quota. Quota will be replenished in 20.09:58:55."
        );
        assert_eq!(
            call_quota_message(ms(200)),
            "Out of call volume quota. Quota will be replenished in 00:00:01."
        );
        assert_eq!(
            call_quota_message(ms(59_001)),
            "Out of call volume quota. Quota will be replenished in 00:01:00."
        );
        assert_eq!(
            call_quota_message(secs(86_400)),
            "Out of call volume quota. Quota will be replenished in 1.00:00:00."
        );
    }

    #[test]
    fn token_quota_message_names_the_units() {
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(
            token_quota_message(secs(21 * 60 + 33)),
            "Token quota is exceeded. Try again in 21 minutes and 33 seconds."
        );
        assert_eq!(
            token_quota_message(ms(44_100)),
            "Token quota is exceeded. Try again in 0 minutes and 45 seconds."
        );
        assert_eq!(
            token_quota_message(secs(2 * 3600 + 5 * 60 + 3)),
            "Token quota is exceeded. Try again in 2 hours, 5 minutes and 3 seconds."
        );
        assert_eq!(
            token_quota_message(secs(3600)),
            "Token quota is exceeded. Try again in 1 hours, 0 minutes and 0 seconds."
        );
        assert_eq!(
            token_quota_message(secs(86_401)),
            "Token quota is exceeded. Try again in 1 days, 0 hours, 0 minutes and 1 seconds."
        );
        assert_eq!(
            token_quota_message(secs(30 * 86_400 + 23 * 3600 + 59 * 60 + 59)),
            "Token quota is exceeded. Try again in 30 days, 23 hours, 59 minutes and 59 seconds."
        );
    }
}
