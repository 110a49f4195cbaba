//! Reading the bearer token, its header, and checking its claims.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};

use crate::{JwtError, JwtSettings};

/// Tokens longer than this are refused unread (Entra ID tokens are a few KiB, even with group claims).
pub(crate) const MAX_TOKEN_BYTES: usize = 32 * 1024;

/// The token in an `Authorization` header value: `Bearer <token>`, the scheme in any case.
pub(crate) fn bearer_token(authorization: Option<&str>) -> Result<&str, JwtError> {
    let value = authorization.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err(JwtError::Missing);
    }
    let (scheme, rest) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(JwtError::Malformed);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(JwtError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES || token.contains(|c: char| c.is_ascii_whitespace()) {
        return Err(JwtError::Malformed);
    }
    Ok(token)
}

/// What the validator needs from a token's header before choosing a key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TokenHeader {
    pub(crate) alg: Algorithm,
    pub(crate) kid: Option<String>,
}

/// Reads the header of a compact JWS: exactly three parts, a base64url JSON header with an allowed `alg`.
pub(crate) fn parse_header(token: &str) -> Result<TokenHeader, JwtError> {
    #[derive(Deserialize)]
    struct RawHeader {
        alg: Option<String>,
        kid: Option<String>,
        crit: Option<IgnoredAny>,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed)?;
    let raw: RawHeader = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    // No header extension is understood, so one marked critical cannot be honoured (RFC 7515 §4.1.11).
    if raw.crit.is_some() {
        return Err(JwtError::Malformed);
    }
    let alg = match raw.alg.as_deref() {
        None => return Err(JwtError::Malformed),
        Some("RS256") => Algorithm::RS256,
        Some("RS384") => Algorithm::RS384,
        Some("RS512") => Algorithm::RS512,
        Some("PS256") => Algorithm::PS256,
        Some(_) => return Err(JwtError::UnsupportedAlgorithm),
    };
    Ok(TokenHeader { alg, kid: raw.kid })
}

/// Checks the claims of a token whose signature has been verified, in this order: `exp`, `nbf`, `iss`, `aud`,
/// the client application, the roles. `now` is the time since the Unix epoch.
pub(crate) fn check_claims(
    claims: &Map<String, Value>,
    settings: &JwtSettings,
    now: Duration,
) -> Result<(), JwtError> {
    let now = now.as_secs_f64();
    let skew = settings.clock_skew.as_secs_f64();

    // `exp` is required, as in APIM's validate-jwt (require-expiration-time defaults to true).
    let exp = numeric(claims.get("exp"))?.ok_or(JwtError::Malformed)?;
    if now >= exp + skew {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric(claims.get("nbf"))?
        && now + skew < nbf
    {
        return Err(JwtError::NotYetValid);
    }

    if !settings.issuers.is_empty() {
        let iss = claims.get("iss").and_then(Value::as_str);
        if !iss.is_some_and(|iss| settings.issuers.iter().any(|i| i == iss)) {
            return Err(JwtError::WrongIssuer);
        }
    }

    if !settings.audiences.is_empty() {
        let allowed = |a: &Value| {
            a.as_str()
                .is_some_and(|a| settings.audiences.iter().any(|x| x == a))
        };
        let ok = match claims.get("aud") {
            Some(Value::Array(list)) => list.iter().any(allowed),
            Some(single) => allowed(single),
            None => false,
        };
        if !ok {
            return Err(JwtError::WrongAudience);
        }
    }

    if !settings.client_application_ids.is_empty() {
        let app = claims
            .get("appid")
            .and_then(Value::as_str)
            .or_else(|| claims.get("azp").and_then(Value::as_str));
        let ok = app.is_some_and(|app| {
            settings
                .client_application_ids
                .iter()
                .any(|id| id.eq_ignore_ascii_case(app))
        });
        if !ok {
            return Err(JwtError::AppNotAllowed);
        }
    }

    if !settings.required_roles.is_empty() {
        let has = |role: &str| match claims.get("roles") {
            Some(Value::Array(roles)) => roles.iter().any(|r| r.as_str() == Some(role)),
            Some(Value::String(r)) => r == role,
            _ => false,
        };
        if !settings.required_roles.iter().all(|r| has(r)) {
            return Err(JwtError::MissingRole);
        }
    }
    Ok(())
}

/// A NumericDate claim: absent → `None`; a number → its value; anything else is malformed.
fn numeric(value: Option<&Value>) -> Result<Option<f64>, JwtError> {
    match value {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or(JwtError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeysSource;
    use serde_json::json;

    #[test]
    fn bearer_scheme() {
        assert_eq!(bearer_token(None), Err(JwtError::Missing));
        assert_eq!(bearer_token(Some("")), Err(JwtError::Missing));
        assert_eq!(bearer_token(Some("   ")), Err(JwtError::Missing));
        assert_eq!(bearer_token(Some("Bearer")), Err(JwtError::Missing));
        assert_eq!(bearer_token(Some("Bearer   ")), Err(JwtError::Missing));
        assert_eq!(bearer_token(Some("Bearer a.b.c")), Ok("a.b.c"));
        assert_eq!(bearer_token(Some("bearer a.b.c")), Ok("a.b.c"));
        assert_eq!(bearer_token(Some("BEARER\ta.b.c ")), Ok("a.b.c"));
        assert_eq!(
            bearer_token(Some("Basic dXNlcjpwYXNz")),
            Err(JwtError::Malformed)
        );
        assert_eq!(bearer_token(Some("a.b.c")), Err(JwtError::Malformed));
        assert_eq!(
            bearer_token(Some("Bearer a.b.c d")),
            Err(JwtError::Malformed)
        );
        let huge = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(bearer_token(Some(&huge)), Err(JwtError::Malformed));
    }

    fn token_with_header(header: &str) -> String {
        format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(header))
    }

    #[test]
    fn header_shape_and_algorithm() {
        let ok = parse_header(&token_with_header(
            r#"{"alg":"RS256","kid":"k","typ":"JWT","x5t":"k"}"#,
        ));
        assert_eq!(
            ok,
            Ok(TokenHeader {
                alg: Algorithm::RS256,
                kid: Some("k".into())
            })
        );
        let ps = parse_header(&token_with_header(r#"{"alg":"PS256"}"#));
        assert_eq!(ps.map(|h| (h.alg, h.kid)), Ok((Algorithm::PS256, None)));
        for alg in [
            "none", "None", "HS256", "HS512", "ES256", "EdDSA", "PS512", "",
        ] {
            let h = format!(r#"{{"alg":"{alg}","kid":"k"}}"#);
            assert_eq!(
                parse_header(&token_with_header(&h)),
                Err(JwtError::UnsupportedAlgorithm),
                "{alg}"
            );
        }
        assert_eq!(
            parse_header(&token_with_header(r#"{"kid":"k"}"#)),
            Err(JwtError::Malformed)
        );
        assert_eq!(
            parse_header(&token_with_header(r#"{"alg":"RS256","crit":["b64"]}"#)),
            Err(JwtError::Malformed)
        );
        assert_eq!(
            parse_header(&token_with_header(r#"{"alg":"RS256","kid":7}"#)),
            Err(JwtError::Malformed)
        );
        assert_eq!(
            parse_header(&token_with_header("[1]")),
            Err(JwtError::Malformed)
        );
        assert_eq!(parse_header("a.b"), Err(JwtError::Malformed));
        assert_eq!(parse_header("a.b.c.d.e"), Err(JwtError::Malformed));
        assert_eq!(parse_header("!!!.e30.c2ln"), Err(JwtError::Malformed));
        assert_eq!(parse_header(""), Err(JwtError::Malformed));
    }

    fn settings() -> JwtSettings {
        JwtSettings {
            keys_source: KeysSource::Jwks("http://127.0.0.1:1/keys".into()),
            issuers: vec!["iss-1".into(), "iss-2".into()],
            audiences: vec!["aud-1".into(), "aud-2".into()],
            client_application_ids: vec![],
            required_roles: vec![],
            clock_skew: Duration::from_secs(60),
            refetch_min_interval: Duration::from_secs(30),
        }
    }

    fn check(claims: Value, s: &JwtSettings) -> Result<(), JwtError> {
        let Value::Object(map) = claims else {
            return Err(JwtError::Malformed);
        };
        check_claims(&map, s, Duration::from_secs(1_000_000))
    }

    #[test]
    fn time_claims_with_skew() {
        let s = settings();
        let base = json!({"iss": "iss-1", "aud": "aud-1"});
        let with = |extra: Value| {
            let mut v = base.clone();
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            v
        };
        assert_eq!(check(with(json!({"exp": 1_000_100})), &s), Ok(()));
        assert_eq!(
            check(with(json!({"exp": 999_950})), &s),
            Ok(()),
            "within skew"
        );
        assert_eq!(
            check(with(json!({"exp": 999_940})), &s),
            Err(JwtError::Expired),
            "exactly at exp + skew"
        );
        assert_eq!(
            check(with(json!({"exp": 999_000})), &s),
            Err(JwtError::Expired)
        );
        assert_eq!(check(with(json!({"exp": 1_000_100.5})), &s), Ok(()));
        assert_eq!(
            check(with(json!({})), &s),
            Err(JwtError::Malformed),
            "no exp"
        );
        assert_eq!(
            check(with(json!({"exp": "1000100"})), &s),
            Err(JwtError::Malformed)
        );
        assert_eq!(
            check(with(json!({"exp": 1_000_100, "nbf": 1_000_050})), &s),
            Ok(()),
            "within skew"
        );
        assert_eq!(
            check(with(json!({"exp": 1_000_100, "nbf": 1_000_061})), &s),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(
            check(with(json!({"exp": 1_000_100, "nbf": null})), &s),
            Err(JwtError::Malformed)
        );
    }

    #[test]
    fn issuer_and_audience() {
        let s = settings();
        let ok = |v: Value| check(v, &s);
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": "iss-2", "aud": "aud-2"})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": "iss-3", "aud": "aud-1"})),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": "ISS-1", "aud": "aud-1"})),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "aud": "aud-1"})),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": ["iss-1"], "aud": "aud-1"})),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": "iss-1", "aud": ["x", "aud-2"]})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": "iss-1", "aud": ["x", "y"]})),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": "iss-1", "aud": []})),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": "iss-1"})),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            ok(json!({"exp": 2e6, "iss": "iss-1", "aud": 5})),
            Err(JwtError::WrongAudience)
        );

        let mut open = settings();
        open.issuers.clear();
        open.audiences.clear();
        assert_eq!(
            check(json!({"exp": 2e6}), &open),
            Ok(()),
            "empty lists are not checked"
        );
    }

    #[test]
    fn client_application_and_roles() {
        let mut s = settings();
        s.client_application_ids = vec!["11111111-AAAA-4000-8000-000000000000".into()];
        s.required_roles = vec!["Gateway.Use".into(), "Chat".into()];
        let base = |extra: Value| {
            let mut v = json!({"exp": 2e6, "iss": "iss-1", "aud": "aud-1"});
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            v
        };
        let app = "11111111-aaaa-4000-8000-000000000000";
        let roles = json!(["Chat", "Gateway.Use", "Other"]);
        assert_eq!(
            check(base(json!({"appid": app, "roles": roles})), &s),
            Ok(())
        );
        assert_eq!(check(base(json!({"azp": app, "roles": roles})), &s), Ok(()));
        assert_eq!(
            check(
                base(json!({"appid": "someone-else", "azp": app, "roles": roles})),
                &s
            ),
            Err(JwtError::AppNotAllowed),
            "appid takes precedence over azp"
        );
        assert_eq!(
            check(base(json!({"roles": roles})), &s),
            Err(JwtError::AppNotAllowed)
        );
        assert_eq!(
            check(base(json!({"appid": app, "roles": ["Chat"]})), &s),
            Err(JwtError::MissingRole)
        );
        assert_eq!(
            check(
                base(json!({"appid": app, "roles": ["chat", "gateway.use"]})),
                &s
            ),
            Err(JwtError::MissingRole)
        );
        assert_eq!(
            check(base(json!({"appid": app})), &s),
            Err(JwtError::MissingRole)
        );
        s.required_roles = vec!["Chat".into()];
        assert_eq!(
            check(base(json!({"appid": app, "roles": "Chat"})), &s),
            Ok(())
        );
    }
}
