//! Turning an OpenID configuration and a JWKS into verification keys.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

/// RSA keys shorter than this are skipped.
const MIN_RSA_BITS: usize = 2048;

/// One verification key from the JWKS.
pub(crate) struct CachedKey {
    /// The one algorithm this key verifies: the JWK's `alg`, or RS256 when it has none.
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
    /// jsonwebtoken's validation, pinned to `alg`, with its own claim checks off (the validator does them).
    pub(crate) validation: Validation,
}

impl fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The usable keys of one JWKS.
#[derive(Debug, Default)]
pub(crate) struct KeyMap {
    keys: Vec<CachedKey>,
    by_kid: HashMap<String, usize>,
}

impl KeyMap {
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether some key of `self` is no longer published in `next` (a key was
    /// retired or revoked).
    pub(crate) fn drops_any_of(&self, next: &KeyMap) -> bool {
        self.by_kid.keys().any(|kid| !next.by_kid.contains_key(kid))
            || self.keys.len() > next.keys.len()
    }

    /// The key published under `kid`.
    pub(crate) fn get(&self, kid: &str) -> Option<&CachedKey> {
        self.by_kid.get(kid).map(|&i| &self.keys[i])
    }

    /// Every key, for tokens that name none.
    pub(crate) fn all(&self) -> &[CachedKey] {
        &self.keys
    }
}

/// The `jwks_uri` of an OpenID configuration document.
pub(crate) fn jwks_uri(config: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct OpenIdConfiguration {
        jwks_uri: Option<String>,
    }
    let doc: OpenIdConfiguration = serde_json::from_slice(config)
        .map_err(|e| format!("the OpenID configuration is not valid JSON: {e}"))?;
    match doc.jwks_uri {
        Some(uri) if !uri.trim().is_empty() => Ok(uri),
        _ => Err("the OpenID configuration has no jwks_uri".to_owned()),
    }
}

/// The usable keys of a JWKS document: RSA signing keys of at least 2048 bits whose algorithm (if given) is
/// RS256, RS384, RS512 or PS256. Other keys are skipped; a set with no usable key is an error.
pub(crate) fn parse_jwks(doc: &[u8]) -> Result<KeyMap, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let raw: RawSet =
        serde_json::from_slice(doc).map_err(|e| format!("the JWKS is not a JSON key set: {e}"))?;
    let mut map = KeyMap::default();
    for value in raw.keys {
        let Some((kid, key)) = usable_key(value) else {
            continue;
        };
        match kid {
            Some(kid) => {
                if map.by_kid.contains_key(&kid) {
                    continue; // the first key under a kid wins
                }
                map.by_kid.insert(kid, map.keys.len());
                map.keys.push(key);
            }
            None => map.keys.push(key),
        }
    }
    if map.is_empty() {
        return Err("the JWKS has no usable RSA signing key".to_owned());
    }
    Ok(map)
}

/// One JWK as a verification key, or `None` if it is not one Sluice accepts.
fn usable_key(value: Value) -> Option<(Option<String>, CachedKey)> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
        return None;
    };
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return None;
    }
    let alg = match jwk.common.key_algorithm {
        None | Some(KeyAlgorithm::RS256) => Algorithm::RS256,
        Some(KeyAlgorithm::RS384) => Algorithm::RS384,
        Some(KeyAlgorithm::RS512) => Algorithm::RS512,
        Some(KeyAlgorithm::PS256) => Algorithm::PS256,
        Some(_) => return None,
    };
    if modulus_bits(&rsa.n)? < MIN_RSA_BITS {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some((
        jwk.common.key_id.clone(),
        CachedKey {
            alg,
            key,
            validation: validation_for(alg),
        },
    ))
}

/// The bit length of a base64url-encoded big-endian modulus.
fn modulus_bits(n: &str) -> Option<usize> {
    let bytes = URL_SAFE_NO_PAD.decode(n.trim_end_matches('=')).ok()?;
    let first = bytes.iter().position(|&b| b != 0)?;
    let significant = &bytes[first..];
    Some(significant.len() * 8 - significant[0].leading_zeros() as usize)
}

/// jsonwebtoken's validation for one algorithm: signature only. Time, issuer and audience are checked by the
/// validator, which needs a message per failure and an injected clock.
fn validation_for(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.leeway = 0;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A 2048-bit modulus (all bits set, so exactly 2048 significant bits).
    fn n2048() -> String {
        URL_SAFE_NO_PAD.encode([0xffu8; 256])
    }

    fn set(keys: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).unwrap_or_default()
    }

    #[test]
    fn reads_jwks_uri() {
        let doc = br#"{"issuer":"x","jwks_uri":"https://login.example/keys"}"#;
        assert_eq!(jwks_uri(doc).as_deref(), Ok("https://login.example/keys"));
        assert!(jwks_uri(br#"{"issuer":"x"}"#).is_err());
        assert!(jwks_uri(br#"{"jwks_uri":" "}"#).is_err());
        assert!(jwks_uri(b"<html>").is_err());
    }

    #[test]
    fn keeps_rsa_signing_keys_and_their_algorithm() {
        let doc = set(json!([
            {"kty": "RSA", "kid": "a", "use": "sig", "n": n2048(), "e": "AQAB", "x5t": "t", "x5c": ["Zm9v"]},
            {"kty": "RSA", "kid": "b", "alg": "PS256", "n": n2048(), "e": "AQAB"},
            {"kty": "RSA", "kid": "c", "alg": "RS512", "n": n2048(), "e": "AQAB"},
            {"kty": "RSA", "n": n2048(), "e": "AQAB"},
        ]));
        let map = parse_jwks(&doc).unwrap_or_default();
        assert_eq!(map.len(), 4);
        assert_eq!(map.get("a").map(|k| k.alg), Some(Algorithm::RS256));
        assert_eq!(map.get("b").map(|k| k.alg), Some(Algorithm::PS256));
        assert_eq!(map.get("c").map(|k| k.alg), Some(Algorithm::RS512));
        assert_eq!(
            map.get("b").map(|k| k.validation.algorithms.clone()),
            Some(vec![Algorithm::PS256])
        );
        assert!(map.get("d").is_none());
    }

    #[test]
    fn skips_keys_it_must_not_use() {
        let doc = set(json!([
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": n2048(), "e": "AQAB"},
            {"kty": "RSA", "kid": "ops", "key_ops": ["encrypt"], "n": n2048(), "e": "AQAB"},
            {"kty": "RSA", "kid": "hs", "alg": "HS256", "n": n2048(), "e": "AQAB"},
            {"kty": "RSA", "kid": "odd", "alg": "XYZ", "n": n2048(), "e": "AQAB"},
            {"kty": "RSA", "kid": "short", "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB"},
            {"kty": "RSA", "kid": "badb64", "n": "***", "e": "AQAB"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kid": "nokty"},
            "not an object",
            {"kty": "RSA", "kid": "good", "n": n2048(), "e": "AQAB"},
            {"kty": "RSA", "kid": "good", "alg": "PS256", "n": n2048(), "e": "AQAB"},
        ]));
        let map = parse_jwks(&doc).unwrap_or_default();
        assert_eq!(map.len(), 1, "{map:?}");
        assert_eq!(map.get("good").map(|k| k.alg), Some(Algorithm::RS256));
    }

    #[test]
    fn a_set_without_usable_keys_is_an_error() {
        assert!(parse_jwks(&set(json!([]))).is_err());
        assert!(parse_jwks(&set(json!([{"kty": "oct", "k": "AA"}]))).is_err());
        assert!(parse_jwks(b"{}").is_err());
        assert!(parse_jwks(b"not json").is_err());
    }

    #[test]
    fn counts_modulus_bits() {
        assert_eq!(modulus_bits(&n2048()), Some(2048));
        assert_eq!(
            modulus_bits(&URL_SAFE_NO_PAD.encode([0x00, 0x01, 0x00])),
            Some(9)
        );
        assert_eq!(modulus_bits(&URL_SAFE_NO_PAD.encode([0x00])), None);
        assert_eq!(modulus_bits("!"), None);
    }
}
