//! The validator: key cache, fetch pacing, verification.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};

use crate::accepted::{AcceptedTokens, TokenDigest, digest};
use crate::keys::{CachedKey, KeyMap, jwks_uri, parse_jwks};
use crate::token::{TokenHeader, bearer_token, check_claims, parse_header};
use crate::{Caller, Clock, Fetch, JwtError, JwtSettings, KeysSource, SystemClock};

/// Keys older than this are refreshed in the background (Entra ID's guidance is to refresh daily).
const KEYS_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// While no keys are cached, fetches are paced by the smaller of this and `refetch_min_interval`, so that a
/// gateway started before its identity provider was reachable recovers quickly.
const EMPTY_CACHE_RETRY: Duration = Duration::from_secs(5);

/// Validates bearer tokens against one tenant's keys and one set of claim rules. Cheap to share: wrap it in an
/// `Arc` or keep one per route. Meant for a tokio runtime: key fetches run as tasks there, so a caller that goes
/// away does not cancel a fetch other callers wait for (outside a runtime they run inline, without the daily
/// background refresh).
#[derive(Debug)]
pub struct JwtValidator {
    inner: Arc<Inner>,
}

/// The most accepted tokens remembered at once.
const ACCEPTED_CAPACITY: usize = 4096;

#[derive(Debug)]
struct Inner {
    settings: JwtSettings,
    fetch: Arc<dyn Fetch>,
    clock: Arc<dyn Clock>,
    /// The current keys; replaced whole after every fetch attempt. Read on every validation.
    cache: RwLock<Arc<KeySet>>,
    /// Tokens that passed every check, by SHA-256 digest (never the token
    /// itself), with the times they are valid between (skew applied). SDK
    /// clients send the same token for up to an hour, so most requests skip
    /// parsing and the signature check. Bounded (when full, the entry expiring
    /// soonest is forgotten); an entry is never served outside its validity;
    /// emptied when a fetch finds that a key was removed from the JWKS. Its
    /// `Debug` prints sizes only.
    accepted: RwLock<AcceptedTokens>,
    /// Held while fetching, so that concurrent misses share one fetch.
    gate: tokio::sync::Mutex<()>,
    /// Monotonic milliseconds of the last fetch attempt, plus one; 0 means never.
    last_attempt_ms: AtomicU64,
    /// A background refresh of stale keys is queued or running.
    background: AtomicBool,
}

/// One state of the key cache.
#[derive(Debug)]
struct KeySet {
    /// Incremented by every fetch attempt, failed or not.
    generation: u64,
    keys: Arc<KeyMap>,
    /// Monotonic time of the last successful fetch.
    fetched_at: Option<Duration>,
}

/// How a refresh request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refresh {
    /// This request fetched the keys.
    Fetched,
    /// Another fetch attempt finished while this one waited; its result is in the cache.
    Shared,
    /// Too soon after the previous attempt; nothing was fetched.
    Paced,
    /// The fetch failed; the cache keeps its previous keys.
    Failed,
}

/// Why no key verified the token.
enum Lookup {
    /// No cached key fits the token; a refetch may help.
    NotFound,
    /// A key was found and the token is refused.
    Refused(JwtError),
}

impl JwtValidator {
    /// A validator using the system clock. Does no I/O: keys are fetched on first use or by [`Self::prefetch`].
    pub fn new(settings: JwtSettings, fetch: Arc<dyn Fetch>) -> Self {
        Self::with_clock(settings, fetch, Arc::new(SystemClock::new()))
    }

    /// The settings it checks tokens against.
    pub fn settings(&self) -> &JwtSettings {
        &self.inner.settings
    }

    /// A validator reading time from `clock` (tests drive expiry and fetch pacing with a fake clock).
    pub fn with_clock(settings: JwtSettings, fetch: Arc<dyn Fetch>, clock: Arc<dyn Clock>) -> Self {
        let empty = KeySet {
            generation: 0,
            keys: Arc::new(KeyMap::default()),
            fetched_at: None,
        };
        Self {
            inner: Arc::new(Inner {
                settings,
                fetch,
                clock,
                cache: RwLock::new(Arc::new(empty)),
                accepted: RwLock::new(AcceptedTokens::new(ACCEPTED_CAPACITY)),
                gate: tokio::sync::Mutex::new(()),
                last_attempt_ms: AtomicU64::new(0),
                background: AtomicBool::new(false),
            }),
        }
    }

    /// Validates the raw `Authorization` header value (`Bearer <token>`, the scheme in any case) and says who the
    /// caller is. A cached key makes this a read lock plus one signature check.
    pub async fn validate(&self, authorization: Option<&str>) -> Result<Caller, JwtError> {
        let token = bearer_token(authorization)?;
        let inner = &self.inner;
        let now = inner.clock.unix_now().as_secs_f64();
        let key = digest(token);
        if let Some(caller) = inner.accepted_caller(&key, now) {
            return Ok(caller);
        }
        let header = parse_header(token)?;
        let snapshot = inner.snapshot();
        inner.refresh_if_stale(&snapshot);
        let claims = match verify(&snapshot.keys, token, &header) {
            Ok(claims) => claims,
            Err(Lookup::Refused(e)) => return Err(e),
            Err(Lookup::NotFound) => {
                inner.refresh(snapshot.generation).await;
                let snapshot = inner.snapshot();
                match verify(&snapshot.keys, token, &header) {
                    Ok(claims) => claims,
                    Err(Lookup::Refused(e)) => return Err(e),
                    Err(Lookup::NotFound) if snapshot.keys.is_empty() => {
                        return Err(JwtError::KeysUnavailable);
                    }
                    Err(Lookup::NotFound) => return Err(JwtError::UnknownKey),
                }
            }
        };
        check_claims(&claims, &inner.settings, inner.clock.unix_now())?;
        let skew = inner.settings.clock_skew.as_secs_f64();
        let valid_until = claims.get("exp").and_then(Value::as_f64).map(|e| e + skew);
        let valid_from = claims
            .get("nbf")
            .and_then(Value::as_f64)
            .map_or(f64::NEG_INFINITY, |n| n - skew);
        let caller = Caller::from_claims(claims);
        if let Some(valid_until) = valid_until {
            inner.remember(key, &caller, valid_from, valid_until, now);
        }
        Ok(caller)
    }

    /// Fetches the keys now, to warm the cache at startup. Subject to the same pacing as refetches. Returns
    /// `KeysUnavailable` if this fetch failed (the reason is logged), or if it was paced and no keys are cached.
    pub async fn prefetch(&self) -> Result<(), JwtError> {
        let seen = self.inner.snapshot().generation;
        match self.inner.refresh(seen).await {
            Refresh::Fetched => Ok(()),
            Refresh::Failed => Err(JwtError::KeysUnavailable),
            Refresh::Shared | Refresh::Paced if self.inner.snapshot().keys.is_empty() => {
                Err(JwtError::KeysUnavailable)
            }
            Refresh::Shared | Refresh::Paced => Ok(()),
        }
    }
}

impl Inner {
    /// The caller of a token accepted earlier, if it is still within its validity.
    fn accepted_caller(&self, key: &TokenDigest, now: f64) -> Option<Caller> {
        self.accepted
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key, now)
    }

    fn remember(
        &self,
        key: TokenDigest,
        caller: &Caller,
        valid_from: f64,
        valid_until: f64,
        now: f64,
    ) {
        self.accepted
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, caller.clone(), valid_from, valid_until, now);
    }
}

impl Inner {
    fn snapshot(&self) -> Arc<KeySet> {
        self.cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a fetch may start at `now`, given the previous attempt.
    fn may_fetch(&self, now: Duration, cache_empty: bool) -> bool {
        let last = self.last_attempt_ms.load(Ordering::Acquire);
        if last == 0 {
            return true;
        }
        let pace = if cache_empty {
            self.settings.refetch_min_interval.min(EMPTY_CACHE_RETRY)
        } else {
            self.settings.refetch_min_interval
        };
        let since = now.saturating_sub(Duration::from_millis(last - 1));
        since >= pace
    }

    /// Refreshes the keys unless another attempt finished since `seen` was the current generation. The fetch
    /// runs as its own task, so it completes (for everyone waiting) even if this caller is dropped.
    async fn refresh(self: &Arc<Self>, seen: u64) -> Refresh {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let inner = Arc::clone(self);
                handle
                    .spawn(async move { inner.refresh_now(seen).await })
                    .await
                    .unwrap_or(Refresh::Failed)
            }
            Err(_) => self.refresh_now(seen).await,
        }
    }

    async fn refresh_now(&self, seen: u64) -> Refresh {
        let _gate = self.gate.lock().await;
        let current = self.snapshot();
        if current.generation != seen {
            return Refresh::Shared;
        }
        let now = self.clock.monotonic();
        if !self.may_fetch(now, current.keys.is_empty()) {
            return Refresh::Paced;
        }
        let millis = u64::try_from(now.as_millis()).unwrap_or(u64::MAX - 1);
        self.last_attempt_ms.store(millis + 1, Ordering::Release);

        let result = self.load().await;

        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        let previous = Arc::clone(&cache);
        match result {
            Ok(keys) => {
                if previous.keys.drops_any_of(&keys) {
                    // A retired (possibly revoked) key: tokens it signed are
                    // checked again instead of being served from memory.
                    self.accepted
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                }
                tracing::info!(
                    keys = keys.len(),
                    source = self.source_url(),
                    "loaded JWT signing keys"
                );
                *cache = Arc::new(KeySet {
                    generation: previous.generation + 1,
                    keys: Arc::new(keys),
                    fetched_at: Some(now),
                });
                Refresh::Fetched
            }
            Err(reason) => {
                tracing::warn!(
                    %reason,
                    cached_keys = previous.keys.len(),
                    "cannot load JWT signing keys"
                );
                *cache = Arc::new(KeySet {
                    generation: previous.generation + 1,
                    keys: Arc::clone(&previous.keys),
                    fetched_at: previous.fetched_at,
                });
                Refresh::Failed
            }
        }
    }

    /// Starts a background refresh when the cached keys are older than a day (at most one at a time, paced like
    /// any fetch). The cached keys stay in use meanwhile, and after a failure.
    fn refresh_if_stale(self: &Arc<Self>, snapshot: &KeySet) {
        let Some(fetched_at) = snapshot.fetched_at else {
            return;
        };
        let now = self.clock.monotonic();
        if now.saturating_sub(fetched_at) < KEYS_MAX_AGE || !self.may_fetch(now, false) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.background.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(self);
        let seen = snapshot.generation;
        handle.spawn(async move {
            let _clear = ClearOnDrop(&inner.background);
            inner.refresh_now(seen).await;
        });
    }

    fn source_url(&self) -> &str {
        match &self.settings.keys_source {
            KeysSource::OpenIdConfiguration(url) | KeysSource::Jwks(url) => url,
        }
    }

    /// Fetches the OpenID configuration (if configured) and the key set.
    async fn load(&self) -> Result<KeyMap, String> {
        let jwks_url = match &self.settings.keys_source {
            KeysSource::Jwks(url) => url.clone(),
            KeysSource::OpenIdConfiguration(url) => {
                let doc = self
                    .fetch
                    .get(url)
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?;
                jwks_uri(&doc).map_err(|e| format!("{url}: {e}"))?
            }
        };
        let doc = self
            .fetch
            .get(&jwks_url)
            .await
            .map_err(|e| format!("GET {jwks_url}: {e}"))?;
        parse_jwks(&doc).map_err(|e| format!("{jwks_url}: {e}"))
    }
}

/// Clears a flag when dropped (also when the task holding it is cancelled).
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Verifies the token with the key it names (or, without a `kid`, with each key of its algorithm).
fn verify(keys: &KeyMap, token: &str, header: &TokenHeader) -> Result<Map<String, Value>, Lookup> {
    match &header.kid {
        Some(kid) => {
            let key = keys.get(kid).ok_or(Lookup::NotFound)?;
            if key.alg != header.alg {
                return Err(Lookup::Refused(JwtError::UnsupportedAlgorithm));
            }
            decode(token, key).map_err(Lookup::Refused)
        }
        None => {
            if keys.is_empty() {
                return Err(Lookup::NotFound);
            }
            let mut candidates = keys.all().iter().filter(|k| k.alg == header.alg).peekable();
            if candidates.peek().is_none() {
                return Err(Lookup::Refused(JwtError::UnsupportedAlgorithm));
            }
            for key in candidates {
                match decode(token, key) {
                    Err(JwtError::BadSignature) => continue,
                    other => return other.map_err(Lookup::Refused),
                }
            }
            Err(Lookup::Refused(JwtError::BadSignature))
        }
    }
}

/// Checks the signature with jsonwebtoken (pinned to the key's one algorithm) and returns the claims.
fn decode(token: &str, key: &CachedKey) -> Result<Map<String, Value>, JwtError> {
    match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey => JwtError::BadSignature,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::InvalidAlgorithmName => JwtError::UnsupportedAlgorithm,
            _ => JwtError::Malformed,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    #[derive(Debug, Default)]
    struct MemoryFetch {
        docs: HashMap<String, Vec<u8>>,
        calls: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Fetch for MemoryFetch {
        async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.docs.get(url).cloned().ok_or_else(|| "404".to_owned())
        }
    }

    fn validator(
        docs: &[(&str, &str)],
        interval: Duration,
    ) -> (JwtValidator, Arc<MemoryFetch>, Arc<ManualClock>) {
        validator_with_skew(docs, interval, Duration::ZERO)
    }

    fn validator_with_skew(
        docs: &[(&str, &str)],
        interval: Duration,
        clock_skew: Duration,
    ) -> (JwtValidator, Arc<MemoryFetch>, Arc<ManualClock>) {
        let fetch = Arc::new(MemoryFetch {
            docs: docs
                .iter()
                .map(|(u, d)| (u.to_string(), d.as_bytes().to_vec()))
                .collect(),
            calls: AtomicUsize::new(0),
        });
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1000)));
        let settings = JwtSettings {
            keys_source: KeysSource::OpenIdConfiguration("mem://config".into()),
            issuers: vec![],
            audiences: vec![],
            client_application_ids: vec![],
            required_roles: vec![],
            clock_skew,
            refetch_min_interval: interval,
        };
        let v = JwtValidator::with_clock(settings, fetch.clone(), clock.clone());
        (v, fetch, clock)
    }

    #[test]
    fn pacing_is_shorter_while_nothing_is_cached() {
        let (v, _, _) = validator(&[], Duration::from_secs(30));
        let t = Duration::from_secs(100);
        assert!(v.inner.may_fetch(t, true), "never fetched");
        v.inner.last_attempt_ms.store(100_000 + 1, Ordering::SeqCst);
        assert!(!v.inner.may_fetch(t + Duration::from_secs(4), true));
        assert!(v.inner.may_fetch(t + EMPTY_CACHE_RETRY, true));
        assert!(!v.inner.may_fetch(t + Duration::from_secs(29), false));
        assert!(v.inner.may_fetch(t + Duration::from_secs(30), false));
        // A clock reading before the last attempt never allows a fetch early.
        assert!(!v.inner.may_fetch(Duration::ZERO, false));

        let (short, _, _) = validator(&[], Duration::from_secs(1));
        short
            .inner
            .last_attempt_ms
            .store(100_000 + 1, Ordering::SeqCst);
        assert!(short.inner.may_fetch(t + Duration::from_secs(1), true));
    }

    fn claims_caller(sub: &str) -> Caller {
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::String(sub.into()));
        Caller::from_claims(claims)
    }

    /// A validator whose tenant publishes the test-only key `a` under `key-a`, and a token it signed.
    fn validator_with_key(
        claims: &Value,
    ) -> (JwtValidator, Arc<MemoryFetch>, Arc<ManualClock>, String) {
        validator_with_key_and_skew(claims, Duration::ZERO)
    }

    fn validator_with_key_and_skew(
        claims: &Value,
        clock_skew: Duration,
    ) -> (JwtValidator, Arc<MemoryFetch>, Arc<ManualClock>, String) {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
        use rsa::traits::PublicKeyParts;

        let pem = include_str!("../tests/fixtures/test_only_signing_a.pem");
        let private = rsa::RsaPrivateKey::from_pkcs1_pem(pem).expect("fixture key");
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "use": "sig", "kid": "key-a",
            "n": URL_SAFE_NO_PAD.encode(private.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(private.e().to_bytes_be()),
        }]})
        .to_string();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("key-a".into());
        let der = private.to_pkcs1_der().expect("DER");
        let signing = jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes());
        let token = jsonwebtoken::encode(&header, claims, &signing).expect("sign");
        let (v, fetch, clock) = validator_with_skew(
            &[
                ("mem://config", r#"{"jwks_uri":"mem://keys"}"#),
                ("mem://keys", &jwks),
            ],
            Duration::from_secs(30),
            clock_skew,
        );
        (v, fetch, clock, token)
    }

    #[tokio::test]
    async fn the_memory_serves_a_token_within_its_validity_widened_by_the_skew() {
        let claims = serde_json::json!({"sub": "s-1", "nbf": 900, "exp": 2000});
        let (v, _, _, token) = validator_with_key_and_skew(&claims, Duration::from_secs(300));
        v.validate(Some(&format!("Bearer {token}")))
            .await
            .expect("valid");
        let accepted = v
            .inner
            .accepted
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let key = digest(&token);
        assert!(accepted.get(&key, 600.0).is_some(), "nbf - skew");
        assert!(accepted.get(&key, 599.9).is_none());
        assert!(
            accepted.get(&key, 2299.9).is_some(),
            "exp + skew (exclusive)"
        );
        assert!(accepted.get(&key, 2300.0).is_none());
    }

    #[tokio::test]
    async fn an_accepted_token_is_remembered_by_digest_and_served_without_keys() {
        let claims = serde_json::json!({"sub": "s-1", "nbf": 900, "exp": 2000});
        let (v, fetch, clock, token) = validator_with_key(&claims);
        let auth = format!("Bearer {token}");
        let caller = v.validate(Some(&auth)).await.expect("valid");
        assert_eq!(caller.subject.as_deref(), Some("s-1"));
        {
            let accepted = v
                .inner
                .accepted
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            assert_eq!(accepted.len(), 1);
            assert_eq!(accepted.get(&digest(&token), 1000.0), Some(caller.clone()));
            assert_eq!(accepted.get(&digest(&token), 899.0), None, "nbf kept");
            assert_eq!(accepted.get(&digest(&token), 2000.0), None, "exp kept");
        }
        // With the keys gone, only the memory can accept it.
        *v.inner
            .cache
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(KeySet {
            generation: 99,
            keys: Arc::new(KeyMap::default()),
            fetched_at: None,
        });
        let calls = fetch.calls.load(Ordering::SeqCst);
        assert_eq!(v.validate(Some(&auth)).await, Ok(caller));
        assert_eq!(
            fetch.calls.load(Ordering::SeqCst),
            calls,
            "no fetch on a hit"
        );
        // Once expired it is not served, and falls through to the full check.
        clock.advance(Duration::from_secs(1000)); // to 2000 s
        assert_eq!(v.validate(Some(&auth)).await, Err(JwtError::Expired));
    }

    #[tokio::test]
    async fn a_token_without_exp_is_not_remembered() {
        // check_claims refuses a token without `exp`, so it never reaches the memory either way.
        let (v, _, _, token) = validator_with_key(&serde_json::json!({"sub": "s"}));
        assert_eq!(
            v.validate(Some(&format!("Bearer {token}"))).await,
            Err(JwtError::Malformed)
        );
        let accepted = v
            .inner
            .accepted
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        assert_eq!(accepted.len(), 0);
    }

    #[tokio::test]
    async fn a_remembered_token_hits_only_within_its_validity_and_never_for_another_token() {
        let (v, fetch, clock) = validator(&[], Duration::from_secs(30));
        // Clock at 1000 s; not a real token: only the memory can accept it.
        v.inner
            .remember(digest("a.b.c"), &claims_caller("m"), 900.0, 1100.0, 1000.0);
        let hit = v
            .validate(Some("Bearer a.b.c"))
            .await
            .expect("served from memory");
        assert_eq!(hit.subject.as_deref(), Some("m"));
        assert_eq!(fetch.calls.load(Ordering::SeqCst), 0);
        assert_eq!(
            v.validate(Some("Bearer a.b.d")).await,
            Err(JwtError::Malformed),
            "another token is checked in full"
        );
        clock.advance(Duration::from_secs(100)); // to 1100 s
        assert_eq!(
            v.validate(Some("Bearer a.b.c")).await,
            Err(JwtError::Malformed)
        );
    }

    #[tokio::test]
    async fn debug_output_holds_no_token() {
        let claims = serde_json::json!({"sub": "s-1", "exp": 2000});
        let (v, _, _, token) = validator_with_key(&claims);
        let caller = v
            .validate(Some(&format!("Bearer {token}")))
            .await
            .expect("valid");
        let mut key_hex = String::new();
        for b in digest(&token) {
            key_hex.push_str(&format!("{b:02x}"));
        }
        let texts = [
            format!("{v:?}"),
            format!("{v:#?}"),
            format!("{:?}", v.inner.accepted),
            format!("{:?}", parse_header(&token)),
            format!("{caller:?}"),
        ];
        for text in &texts {
            for part in std::iter::once(token.as_str()).chain(token.split('.')) {
                assert!(!text.contains(part), "{text} holds part of the token");
            }
            assert!(!text.contains(&key_hex), "{text} holds the digest");
            assert!(!text.contains(&format!("{:?}", digest(&token))), "{text}");
        }
        assert!(
            texts[0].contains("AcceptedTokens { len: 1, capacity: 4096, .. }"),
            "{}",
            texts[0]
        );
    }

    #[tokio::test]
    async fn a_configuration_without_a_usable_key_set_leaves_keys_unavailable() {
        let (v, fetch, _) = validator(
            &[("mem://config", r#"{"issuer":"x"}"#)],
            Duration::from_secs(30),
        );
        assert_eq!(v.prefetch().await, Err(JwtError::KeysUnavailable));
        assert_eq!(fetch.calls.load(Ordering::SeqCst), 1);

        let (v, fetch, _) = validator(
            &[
                ("mem://config", r#"{"jwks_uri":"mem://keys"}"#),
                ("mem://keys", r#"{"keys":[]}"#),
            ],
            Duration::from_secs(30),
        );
        assert_eq!(v.prefetch().await, Err(JwtError::KeysUnavailable));
        assert_eq!(fetch.calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            v.inner.snapshot().generation,
            1,
            "a failed attempt is a generation"
        );
    }
}
