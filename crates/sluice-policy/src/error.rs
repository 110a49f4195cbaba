//! Gateway-made errors: one type, one function that turns it into bytes.
//!
//! Expected outcomes (401, 404, 413, 429 ...) are values of [`GatewayError`],
//! not failures: callers must not log them as errors. The body is APIM's
//! `{ "statusCode": N, "message": "..." }`, with the spaces inside the braces
//! that APIM writes.

use std::borrow::Cow;

/// A response the gateway makes itself instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    pub status: u16,
    pub message: Cow<'static, str>,
    /// Extra response headers (for example `WWW-Authenticate`, `Retry-After`).
    pub headers: Vec<(http::HeaderName, String)>,
}

impl GatewayError {
    pub fn new(status: u16, message: impl Into<Cow<'static, str>>) -> Self {
        GatewayError {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Add a header; `name` must be a lowercase static header name.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers
            .push((http::HeaderName::from_static(name), value.into()));
        self
    }

    /// Add a header whose name comes from configuration.
    pub fn with_header_name(mut self, name: http::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// 404 for a path no API serves, with APIM's text.
    pub fn not_found() -> Self {
        GatewayError::new(404, "Resource not found")
    }

    /// 413 for a request body over the API's limit.
    pub fn body_too_large(limit: u64) -> Self {
        GatewayError::new(
            413,
            format!("Request body is too large. The limit is {limit} bytes."),
        )
    }

    /// 502 when the backend could not be reached or dropped the connection.
    pub fn bad_gateway(what: &str) -> Self {
        GatewayError::new(502, format!("Bad gateway: {what}"))
    }

    /// 504 when the backend did not answer within the configured timeout.
    pub fn gateway_timeout(what: &str) -> Self {
        GatewayError::new(504, format!("Gateway timeout: {what}"))
    }

    /// The JSON body, `{ "statusCode": N, "message": "..." }`.
    pub fn body(&self) -> Vec<u8> {
        error_body(self.status, &self.message)
    }

    /// The reason phrase APIM uses for this status.
    pub fn reason(&self) -> &'static str {
        reason_phrase(self.status)
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

/// Serialise APIM's error body. The message is JSON-escaped; the layout
/// (spaces inside the braces) is APIM's.
pub fn error_body(status: u16, message: &str) -> Vec<u8> {
    let escaped = serde_json::to_string(message).unwrap_or_else(|_| "\"\"".to_string());
    let mut out = Vec::with_capacity(40 + escaped.len());
    out.extend_from_slice(b"{ \"statusCode\": ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.extend_from_slice(b", \"message\": ");
    out.extend_from_slice(escaped.as_bytes());
    out.extend_from_slice(b" }");
    out
}

/// Reason phrases as APIM sends them (401 is "Access Denied", not "Unauthorized").
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Access Denied",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_matches_apim_byte_for_byte() {
        // The captured 429 from APIM has Content-Length 84 for this exact text.
        let b = error_body(429, "Rate limit is exceeded. Try again in 57 seconds.");
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            "{ \"statusCode\": 429, \"message\": \"Rate limit is exceeded. Try again in 57 seconds.\" }"
        );
        assert_eq!(b.len(), 84);
    }

    #[test]
    fn missing_key_body_has_apim_length() {
        let e = crate::subscription::missing_key_error("https://h/openai", "api-key");
        assert_eq!(e.body().len(), 152);
        assert_eq!(e.reason(), "Access Denied");
    }

    #[test]
    fn message_is_escaped() {
        let b = error_body(400, "bad \"quote\"\n");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["message"], "bad \"quote\"\n");
        assert_eq!(v["statusCode"], 400);
    }
}
