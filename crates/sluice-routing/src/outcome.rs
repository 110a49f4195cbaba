//! What an attempt at a backend came to.

use std::borrow::Cow;
use std::time::Duration;

/// What one attempt at a backend came to, as far as breakers and failover care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this status. `retry_after` is how long the answer asked callers to wait, if it said
    /// (see [`retry_after_from`](crate::retry_after_from)).
    Status {
        /// The HTTP status of the backend's answer.
        status: u16,
        /// The wait the backend asked for, if any.
        retry_after: Option<Duration>,
    },
    /// No connection was made (refused, name resolution or TLS failure, reset while connecting): the request was
    /// never sent.
    ConnectFailed,
    /// Connecting took too long, or the response head did not arrive in time (first-byte timeout).
    Timeout,
    /// The connection broke after the request was (perhaps) sent: reset, or closed without an answer.
    ConnectionLost,
}

/// The status codes backends commonly answer with, as labels that need no
/// allocation (the label is taken for every attempt's metric).
fn common_status(status: u16) -> Option<&'static str> {
    Some(match status {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => return None,
    })
}

impl Outcome {
    /// A short label for metrics and logs: the status code itself ("200", "429", "503"), or "connect_failed",
    /// "timeout", "connection_lost".
    pub fn label(&self) -> Cow<'static, str> {
        match self {
            Outcome::Status { status, .. } => match common_status(*status) {
                Some(label) => Cow::Borrowed(label),
                None => Cow::Owned(status.to_string()),
            },
            Outcome::ConnectFailed => Cow::Borrowed("connect_failed"),
            Outcome::Timeout => Cow::Borrowed("timeout"),
            Outcome::ConnectionLost => Cow::Borrowed("connection_lost"),
        }
    }

    /// Whether a breaker counts this as a healthy answer when none of its rules matches: any status below 500
    /// except 429 (throttled) and 408 (request timeout). Connection-level failures are never healthy.
    pub fn is_success(&self) -> bool {
        match *self {
            Outcome::Status { status, .. } => status < 500 && status != 429 && status != 408,
            Outcome::ConnectFailed | Outcome::Timeout | Outcome::ConnectionLost => false,
        }
    }

    /// The wait the backend asked for, when the outcome is an answer that carried one.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match *self {
            Outcome::Status { retry_after, .. } => retry_after,
            Outcome::ConnectFailed | Outcome::Timeout | Outcome::ConnectionLost => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> Outcome {
        Outcome::Status {
            status,
            retry_after: None,
        }
    }

    #[test]
    fn labels_are_the_status_code_or_the_failure_kind() {
        assert_eq!(status(200).label(), "200");
        assert_eq!(status(429).label(), "429");
        assert_eq!(status(503).label(), "503");
        for code in [
            201, 204, 400, 401, 403, 404, 408, 409, 413, 415, 422, 500, 502, 504,
        ] {
            assert_eq!(status(code).label(), code.to_string());
            assert!(matches!(status(code).label(), Cow::Borrowed(_)));
        }
        assert_eq!(status(418).label(), "418");
        assert_eq!(status(599).label(), "599");
        assert_eq!(Outcome::ConnectFailed.label(), "connect_failed");
        assert_eq!(Outcome::Timeout.label(), "timeout");
        assert_eq!(Outcome::ConnectionLost.label(), "connection_lost");
    }

    #[test]
    fn success_is_below_500_except_throttling_and_request_timeout() {
        for ok in [200, 201, 204, 301, 400, 401, 404, 407, 409, 428, 430, 499] {
            assert!(status(ok).is_success(), "{ok}");
        }
        for bad in [408, 429, 500, 503, 599, 600] {
            assert!(!status(bad).is_success(), "{bad}");
        }
        assert!(!Outcome::ConnectFailed.is_success());
        assert!(!Outcome::Timeout.is_success());
        assert!(!Outcome::ConnectionLost.is_success());
    }

    #[test]
    fn only_an_answer_carries_a_retry_after() {
        let answer = Outcome::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(answer.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(status(429).retry_after(), None);
        assert_eq!(Outcome::ConnectFailed.retry_after(), None);
        assert_eq!(Outcome::Timeout.retry_after(), None);
        assert_eq!(Outcome::ConnectionLost.retry_after(), None);
    }
}
