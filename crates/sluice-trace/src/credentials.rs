//! Debug credentials, as APIM's `listDebugCredentials` hands out: a token
//! that lets a data-plane request of one API be traced, for a limited time.
//!
//! Sluice's token is a JWT signed with HS256: `aid` (the API's name), `p`
//! (the purpose, `tracing`), `iat` and `exp` (seconds since the epoch),
//! `iss` (`sluice`). The key comes from configuration (so that replicas
//! accept each other's tokens) or is generated at start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The longest a debug credential may live (APIM's limit too).
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// The only purpose a credential can carry.
pub const PURPOSE_TRACING: &str = "tracing";

const ISSUER: &str = "sluice";

/// The claims of a debug credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugClaims {
    /// The API it is for (its name in `gateway.yaml`).
    pub aid: String,
    /// The purpose: `tracing`.
    pub p: String,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expires at, seconds since the epoch.
    pub exp: u64,
    /// Always `sluice`.
    pub iss: String,
}

/// Why a presented credential does not open tracing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialError {
    /// Well signed, but past its expiry (the expiry, seconds since the epoch).
    Expired(u64),
    /// Well signed and current, but for another API (that API's name).
    WrongApi(String),
    /// Not a credential this gateway issued.
    Invalid,
}

/// Signs and checks debug credentials.
pub struct DebugKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Claims of credentials whose signature was verified, by the whole
    /// credential: an operator replays a call many times with one
    /// credential, and a lookup costs a small part of verifying the
    /// signature and decoding the claims. Only a credential this key signed
    /// gets in, so what it holds is no secret the gateway did not make; its
    /// keys are hashed with a per-process random key, so a caller cannot
    /// choose which cached entry a forged credential is compared with.
    /// Bounded by [`VERIFIED_CAPACITY`] (emptied when full).
    verified: Mutex<HashMap<Box<str>, Arc<DebugClaims>>>,
}

/// The most verified credentials remembered at once.
const VERIFIED_CAPACITY: usize = 256;

impl std::fmt::Debug for DebugKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DebugKey(<redacted>)")
    }
}

impl DebugKey {
    /// A key from secret bytes (configured, or random at start).
    pub fn new(secret: &[u8]) -> Self {
        DebugKey {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// A credential for API `api`, valid from `now_unix` for `lifetime`
    /// (at most [`MAX_LIFETIME`]).
    pub fn issue(&self, api: &str, lifetime: Duration, now_unix: u64) -> String {
        let claims = DebugClaims {
            aid: api.to_string(),
            p: PURPOSE_TRACING.to_string(),
            iat: now_unix,
            exp: now_unix + lifetime.min(MAX_LIFETIME).as_secs(),
            iss: ISSUER.to_string(),
        };
        // HS256 over a small struct cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Check a presented credential for API `api` at `now_unix`.
    pub fn check(
        &self,
        token: &str,
        api: &str,
        now_unix: u64,
    ) -> Result<Arc<DebugClaims>, CredentialError> {
        let known = self.lock().get(token).cloned();
        let claims = match known {
            Some(c) => c,
            None => {
                let c = Arc::new(self.verify(token)?);
                let mut cache = self.lock();
                if cache.len() >= VERIFIED_CAPACITY {
                    cache.clear();
                }
                cache.insert(Box::from(token), c.clone());
                c
            }
        };
        // Expiry and API are judged on every use, cached or not.
        if claims.exp <= now_unix {
            return Err(CredentialError::Expired(claims.exp));
        }
        if claims.aid != api {
            return Err(CredentialError::WrongApi(claims.aid.clone()));
        }
        Ok(claims)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<DebugClaims>>> {
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The claims of a credential this key signed for tracing.
    fn verify(&self, token: &str) -> Result<DebugClaims, CredentialError> {
        let mut v = Validation::new(Algorithm::HS256);
        // Expiry is judged here, so that an expired token can be told apart.
        v.validate_exp = false;
        v.required_spec_claims.clear();
        v.set_issuer(&[ISSUER]);
        let claims = jsonwebtoken::decode::<DebugClaims>(token, &self.decoding, &v)
            .map_err(|_| CredentialError::Invalid)?
            .claims;
        if claims.p != PURPOSE_TRACING {
            return Err(CredentialError::Invalid);
        }
        Ok(claims)
    }
}

/// Parse an ISO-8601 duration of days, hours, minutes and seconds
/// (`PT1H`, `PT30M`, `PT90S`, `P0DT0H5M`, `PT0.5S`); years, months and weeks
/// are refused. `None` when it does not parse.
pub fn parse_iso_duration(text: &str) -> Option<Duration> {
    let rest = text.trim().strip_prefix('P')?;
    if rest.is_empty() {
        return None;
    }
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) if !t.is_empty() => (d, Some(t)),
        Some(_) => return None,
        None => (rest, None),
    };
    let mut total = 0f64;
    let mut any = false;
    let mut take = |part: &str, units: &[(char, f64)]| -> Option<()> {
        let mut number = String::new();
        let mut allowed = units.iter();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                number.push(c);
                continue;
            }
            // Units must come in order, each once.
            let &(_, scale) = allowed.by_ref().find(|(u, _)| *u == c)?;
            let value: f64 = number.parse().ok()?;
            total += value * scale;
            number.clear();
            any = true;
        }
        number.is_empty().then_some(())
    };
    take(date, &[('D', 86_400.0)])?;
    if let Some(t) = time {
        take(t, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)])?;
    }
    if !any {
        return None;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_durations() {
        let s = |n: u64| Some(Duration::from_secs(n));
        assert_eq!(parse_iso_duration("PT1H"), s(3600));
        assert_eq!(parse_iso_duration("PT30M"), s(1800));
        assert_eq!(parse_iso_duration("PT90S"), s(90));
        assert_eq!(parse_iso_duration("P0DT0H5M"), s(300));
        assert_eq!(parse_iso_duration("P1D"), s(86_400));
        assert_eq!(parse_iso_duration("PT1H2M3S"), s(3723));
        // Too long for a Duration: no answer rather than a panic.
        assert_eq!(parse_iso_duration("P99999999999999999999D"), None);
        assert_eq!(parse_iso_duration("PT1e400S"), None);
        assert_eq!(
            parse_iso_duration("PT0.5S"),
            Some(Duration::from_millis(500))
        );
        for bad in [
            "", "P", "PT", "1H", "PT1", "PTH", "P1Y", "P1W", "PT1S1M", "PT1H1H", "PTxS", "P1DT",
        ] {
            assert_eq!(parse_iso_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn credentials_are_checked_for_signature_expiry_and_api() {
        let key = DebugKey::new(b"a-secret-of-enough-length-0123456789");
        let t = key.issue("azure-openai", Duration::from_secs(600), 1_000);
        let claims = key.check(&t, "azure-openai", 1_500).unwrap();
        assert_eq!(claims.exp, 1_600);
        assert_eq!(claims.iat, 1_000);
        assert_eq!(claims.p, "tracing");
        assert_eq!(
            key.check(&t, "other", 1_500),
            Err(CredentialError::WrongApi("azure-openai".into()))
        );
        assert_eq!(
            key.check(&t, "azure-openai", 1_600),
            Err(CredentialError::Expired(1_600))
        );
        // Another key's token, or garbage, is invalid.
        let other = DebugKey::new(b"another-secret-entirely-0123456789");
        assert_eq!(
            other.check(&t, "azure-openai", 1_500),
            Err(CredentialError::Invalid)
        );
        assert_eq!(
            key.check("p=tracing&aid=x", "x", 1),
            Err(CredentialError::Invalid)
        );
        // The lifetime is capped at an hour.
        let long = key.issue("a", Duration::from_secs(7200), 0);
        assert_eq!(key.check(&long, "a", 1).unwrap().exp, 3600);
        assert_eq!(format!("{key:?}"), "DebugKey(<redacted>)");
    }

    #[test]
    fn verified_credentials_are_remembered_but_still_judged() {
        let key = DebugKey::new(b"a-secret-of-enough-length-0123456789");
        let t = key.issue("api", Duration::from_secs(600), 1_000);
        assert!(key.check(&t, "api", 1_100).is_ok());
        assert_eq!(key.lock().len(), 1);
        // From the cache: expiry and API are judged each time.
        assert_eq!(
            key.check(&t, "api", 1_600),
            Err(CredentialError::Expired(1_600))
        );
        assert_eq!(
            key.check(&t, "other", 1_100),
            Err(CredentialError::WrongApi("api".into()))
        );
        assert_eq!(key.check(&t, "api", 1_599).unwrap().exp, 1_600);
        // A credential with one character changed is not the cached one.
        let mut forged = t.clone().into_bytes();
        let i = t.find('.').unwrap() + 3;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(
            key.check(&forged, "api", 1_100),
            Err(CredentialError::Invalid)
        );
        // Invalid ones are not remembered; the cache stays bounded.
        assert_eq!(key.lock().len(), 1);
        for n in 0..9 {
            let t = key.issue("api", Duration::from_secs(600), 1_001 + n);
            assert!(key.check(&t, "api", 1_100).is_ok());
        }
        assert_eq!(key.lock().len(), 10, "kept until the cache is full");
        for n in 0..VERIFIED_CAPACITY as u64 + 5 {
            let t = key.issue("api", Duration::from_secs(600), 2_000 + n);
            assert!(key.check(&t, "api", 2_100).is_ok());
        }
        assert!(key.lock().len() <= VERIFIED_CAPACITY);
        assert!(!key.lock().is_empty());
    }
}
