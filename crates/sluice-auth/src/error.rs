//! Why a token was refused.

use std::fmt;

/// Why a token was refused. [`Display`](fmt::Display) gives the message for APIM's 401 body; it never contains
/// the token or any part of it (each variant has a fixed text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// No `Authorization` header, an empty one, or `Bearer` without a token.
    Missing,
    /// Not a `Bearer` credential, not three dot-separated parts, bad base64 or JSON, or no numeric `exp`.
    Malformed,
    /// The token's `kid` is not in the key set, even after a refetch (or a refetch was not yet allowed).
    UnknownKey,
    /// The signature does not verify with the key the token names.
    BadSignature,
    /// `exp` is in the past, beyond the clock skew.
    Expired,
    /// `nbf` is in the future, beyond the clock skew.
    NotYetValid,
    /// `iss` is missing or not one of the accepted issuers.
    WrongIssuer,
    /// `aud` is missing or contains none of the accepted audiences.
    WrongAudience,
    /// `appid`/`azp` is missing or not one of the allowed client applications.
    AppNotAllowed,
    /// `roles` lacks at least one required role.
    MissingRole,
    /// The header's `alg` is not an allowed algorithm (e.g. `none`, `HS256`), or not the one the key is for.
    UnsupportedAlgorithm,
    /// The keys could not be fetched and none are cached. Recommended response: 503, since the caller's token
    /// may be fine and SDKs retry a 503 but not a 401.
    KeysUnavailable,
}

impl JwtError {
    /// The fixed message, as [`Display`](fmt::Display) writes it.
    pub fn message(self) -> &'static str {
        match self {
            JwtError::Missing => "JWT not present.",
            JwtError::Malformed => "JWT is malformed.",
            JwtError::UnknownKey => "JWT signature key is unknown.",
            JwtError::BadSignature => "JWT signature is invalid.",
            JwtError::Expired => "JWT has expired.",
            JwtError::NotYetValid => "JWT is not yet valid.",
            JwtError::WrongIssuer => "JWT issuer is not allowed.",
            JwtError::WrongAudience => "JWT audience is not allowed.",
            JwtError::AppNotAllowed => "JWT client application is not allowed.",
            JwtError::MissingRole => "JWT is missing a required role.",
            JwtError::UnsupportedAlgorithm => "JWT algorithm is not allowed.",
            JwtError::KeysUnavailable => "Unable to validate JWT: signing keys are unavailable.",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for JwtError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_fixed_and_distinct() {
        let all = [
            JwtError::Missing,
            JwtError::Malformed,
            JwtError::UnknownKey,
            JwtError::BadSignature,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::WrongIssuer,
            JwtError::WrongAudience,
            JwtError::AppNotAllowed,
            JwtError::MissingRole,
            JwtError::UnsupportedAlgorithm,
            JwtError::KeysUnavailable,
        ];
        let texts: std::collections::HashSet<String> = all.iter().map(|e| e.to_string()).collect();
        assert_eq!(texts.len(), all.len());
        assert_eq!(JwtError::Missing.to_string(), "JWT not present.");
        assert_eq!(
            JwtError::KeysUnavailable.to_string(),
            "Unable to validate JWT: signing keys are unavailable."
        );
    }
}
