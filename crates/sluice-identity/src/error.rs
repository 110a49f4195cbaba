//! The error a backend's token could not be obtained with, scrubbed of secrets.

use std::fmt;

/// The longest message an [`IdentityError`] carries; longer ones are cut (they come from remote error bodies).
const MAX_MESSAGE_CHARS: usize = 600;

/// A token could not be obtained. `kind` is the credential type (see
/// [`CredentialConfig::kind`](crate::CredentialConfig::kind)); `message` says why and never contains a token or a
/// secret: known secret values and anything shaped like a JWT are replaced with `[redacted]`.
///
/// Displays as `could not obtain an Entra ID token with <kind>: <message>`.
#[derive(Debug, Clone)]
pub struct IdentityError {
    /// The credential type, e.g. `managed_identity`.
    pub kind: &'static str,
    /// What went wrong, without secrets, on one line.
    pub message: String,
}

impl IdentityError {
    /// An error whose message is scrubbed of JWT-shaped text and of every value in `secrets`.
    pub(crate) fn new(kind: &'static str, message: impl AsRef<str>, secrets: &[String]) -> Self {
        IdentityError {
            kind,
            message: scrub(message.as_ref(), secrets),
        }
    }
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not obtain an Entra ID token with {}: {}",
            self.kind, self.message
        )
    }
}

impl std::error::Error for IdentityError {}

/// The text of an azure_core error and of its sources, on one line.
pub(crate) fn describe(error: &azure_core::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// Replace secrets and JWT-shaped runs with `[redacted]`, fold whitespace onto one line, and cap the length.
fn scrub(message: &str, secrets: &[String]) -> String {
    let mut text = message.to_string();
    for secret in secrets {
        if !secret.is_empty() {
            text = text.replace(secret.as_str(), "[redacted]");
        }
    }
    let text = redact_jwts(&text);
    let mut one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > MAX_MESSAGE_CHARS {
        one_line = one_line.chars().take(MAX_MESSAGE_CHARS).collect();
        one_line.push_str(" [truncated]");
    }
    one_line
}

/// Entra ID access tokens and Kubernetes service-account tokens are JWTs: `eyJ` followed by base64url segments
/// separated by dots. Any such run that contains a dot is replaced.
fn redact_jwts(text: &str) -> String {
    fn is_token_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=')
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("eyJ") {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let end = candidate
            .find(|c: char| !is_token_char(c))
            .unwrap_or(candidate.len());
        let run = &candidate[..end];
        if run.trim_end_matches('.').contains('.') {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        rest = &candidate[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_credential_type() {
        let error = IdentityError::new("managed_identity", "endpoint returned 500", &[]);
        assert_eq!(
            error.to_string(),
            "could not obtain an Entra ID token with managed_identity: endpoint returned 500"
        );
    }

    #[test]
    fn known_secrets_are_redacted() {
        let secrets = vec!["s3cr3t-value".to_string(), String::new()];
        let error = IdentityError::new(
            "client_secret",
            "bad request for s3cr3t-value (s3cr3t-value)",
            &secrets,
        );
        assert_eq!(error.message, "bad request for [redacted] ([redacted])");
    }

    #[test]
    fn jwt_shaped_text_is_redacted() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl-_";
        let error = IdentityError::new("azure_cli", format!("got {jwt}, and \"{jwt}\"."), &[]);
        assert_eq!(error.message, "got [redacted], and \"[redacted]\".");
        // Without a dot it is not a JWT; it stays.
        let plain = IdentityError::new("azure_cli", "eyJustAWord here", &[]);
        assert_eq!(plain.message, "eyJustAWord here");
    }

    #[test]
    fn messages_are_one_line_and_capped() {
        let error = IdentityError::new("managed_identity", "first\nsecond\t third", &[]);
        assert_eq!(error.message, "first second third");
        let long = "x".repeat(5000);
        let error = IdentityError::new("managed_identity", &long, &[]);
        assert!(error.message.ends_with(" [truncated]"));
        assert_eq!(
            error.message.chars().count(),
            MAX_MESSAGE_CHARS + " [truncated]".len()
        );
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let long = "é".repeat(MAX_MESSAGE_CHARS + 10);
        let error = IdentityError::new("managed_identity", &long, &[]);
        assert!(error.message.starts_with('é'));
    }

    #[test]
    fn describe_includes_sources() {
        let inner =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let error = azure_core::Error::with_error(
            azure_core::error::ErrorKind::Io,
            inner,
            "request failed",
        );
        let text = describe(&error);
        assert!(text.contains("request failed"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
    }
}
