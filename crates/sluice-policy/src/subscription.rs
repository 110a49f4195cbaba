//! Subscription keys (APIM's `subscriptionRequired` / `subscriptionKeyParameterNames`).
//!
//! A key is read from the first configured header that is present (`api-key`,
//! then `Ocp-Apim-Subscription-Key` by default) or, only when no such header
//! is present, from the configured query parameter (`subscription-key`).
//! Keys are looked up by a keyed hash (SipHash with a key drawn at random
//! when the index is built, so no caller can aim at a stored key's bucket;
//! no scan over subscriptions) and then compared in constant time with the
//! stored key.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use http::HeaderMap;
use sluice_config::{Secret, Subscription, SubscriptionSettings};
use smallvec::SmallVec;
use subtle::ConstantTimeEq;

use crate::error::GatewayError;
use crate::route::query_param;

const MISSING: &str = "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.";
const INVALID: &str = "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.";

/// Which of a subscription's two keys matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    Primary,
    Secondary,
}

impl KeySlot {
    /// `primary` or `secondary`.
    pub fn label(self) -> &'static str {
        match self {
            KeySlot::Primary => "primary",
            KeySlot::Secondary => "secondary",
        }
    }
}

/// The caller's subscription, as the later steps (limits, metrics) key on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionMatch {
    /// Position in `gateway.yaml`'s `subscriptions` list.
    pub index: usize,
    /// The subscription's name (its id).
    pub name: Arc<str>,
    pub slot: KeySlot,
}

#[derive(Debug)]
struct Entry {
    index: usize,
    slot: KeySlot,
    /// Compared in constant time on a hash hit; prints redacted.
    key: Secret,
}

#[derive(Debug)]
struct SubInfo {
    name: Arc<str>,
    active: bool,
    /// `None`: every API.
    apis: Option<Vec<String>>,
}

/// Why the subscription step refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// No key in the configured headers or query parameter.
    Missing,
    /// An unknown key, a suspended subscription, or one not allowed on the API.
    Invalid,
}

impl KeyError {
    /// APIM's 401. `realm` is the API's public URL; the challenge names the
    /// first configured header as written.
    pub fn response(self, realm: &str, settings: &SubscriptionSettings) -> GatewayError {
        match self {
            KeyError::Missing => missing_key_error(realm, &settings.challenge_name),
            KeyError::Invalid => invalid_key_error(realm, &settings.challenge_name),
        }
    }
}

/// All subscriptions' keys, indexed by a keyed hash.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    /// The hash's random key.
    keyed: RandomState,
    by_hash: ByHash,
    subs: Vec<SubInfo>,
}

/// Keys by their keyed hash, sorted by it (found by binary search: the hash
/// is already a good spread, and hashing it again for a map costs more).
/// Distinct keys with the same 64-bit hash (about one chance in 2^64 per
/// pair) share a bucket, each compared in turn.
type ByHash = Vec<(u64, SmallVec<[Entry; 1]>)>;

/// Every subscription's keys by their hash under `keyed`. The same key given
/// twice is held by the later one.
fn keys_by_hash(keyed: &impl BuildHasher, subscriptions: &[Subscription]) -> ByHash {
    let mut by_hash: HashMap<u64, SmallVec<[Entry; 1]>> = HashMap::new();
    for (i, s) in subscriptions.iter().enumerate() {
        let keys = std::iter::once((&s.primary_key, KeySlot::Primary))
            .chain(s.secondary_key.iter().map(|k| (k, KeySlot::Secondary)));
        for (key, slot) in keys {
            let entry = Entry {
                index: i,
                slot,
                key: key.clone(),
            };
            let bucket = by_hash
                .entry(keyed.hash_one(key.expose().as_bytes()))
                .or_default();
            match bucket.iter_mut().find(|e| e.key.expose() == key.expose()) {
                Some(same) => *same = entry,
                None => bucket.push(entry),
            }
        }
    }
    let mut sorted: ByHash = by_hash.into_iter().collect();
    sorted.sort_unstable_by_key(|(hash, _)| *hash);
    sorted
}

/// The entry of `key` in its bucket (`hash` is `key`'s), each stored key
/// compared with it in constant time.
fn find<'i>(by_hash: &'i ByHash, hash: u64, key: &[u8]) -> Option<&'i Entry> {
    let at = by_hash.binary_search_by_key(&hash, |(h, _)| *h).ok()?;
    by_hash[at]
        .1
        .iter()
        .find(|e| same_bytes(e.key.expose().as_bytes(), key))
}

/// Whether `a` and `b` are equal, in time that depends only on their
/// lengths (which are not secret). Eight bytes are compared at a time, each
/// word with `subtle`'s constant-time equality: a key of 32 bytes is four
/// steps instead of 32.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.as_chunks::<8>();
    let (b_words, b_rest) = b.as_chunks::<8>();
    let mut equal = subtle::Choice::from(1);
    for (x, y) in a_words.iter().zip(b_words) {
        equal &= u64::from_ne_bytes(*x).ct_eq(&u64::from_ne_bytes(*y));
    }
    equal &= a_rest.ct_eq(b_rest);
    bool::from(equal)
}

/// APIM's 401 for a request without a key.
pub fn missing_key_error(realm: &str, header_name: &str) -> GatewayError {
    GatewayError::new(401, MISSING).with_header(
        "www-authenticate",
        format!("AzureApiManagementKey realm=\"{realm}\",name=\"{header_name}\",type=\"header\""),
    )
}

/// APIM's 401 for a key that is unknown, suspended, or not valid for the API.
pub fn invalid_key_error(realm: &str, header_name: &str) -> GatewayError {
    GatewayError::new(401, INVALID).with_header(
        "www-authenticate",
        format!("AzureApiManagementKey realm=\"{realm}\",name=\"{header_name}\",type=\"header\""),
    )
}

impl SubscriptionIndex {
    pub fn new(subscriptions: &[Subscription]) -> Self {
        let keyed = RandomState::new();
        SubscriptionIndex {
            by_hash: keys_by_hash(&keyed, subscriptions),
            keyed,
            subs: subscriptions
                .iter()
                .map(|s| SubInfo {
                    name: Arc::from(s.name.as_str()),
                    active: s.active,
                    apis: s.apis.clone(),
                })
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Find the subscription a raw key belongs to, comparing in constant time.
    pub fn lookup(&self, key: &[u8]) -> Option<(usize, KeySlot)> {
        find(&self.by_hash, self.keyed.hash_one(key), key).map(|e| (e.index, e.slot))
    }

    /// The subscription step for one request to `api_name`.
    ///
    /// `Ok(None)`: the API does not require a subscription and none was sent.
    /// On failure, [`KeyError::response`] builds APIM's 401 (only then is the
    /// realm needed).
    pub fn check(
        &self,
        api_name: &str,
        settings: &SubscriptionSettings,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<SubscriptionMatch>, KeyError> {
        self.check_with_bearer(api_name, settings, headers, query, false)
    }

    /// [`Self::check`], also taking the key from `Authorization: Bearer
    /// <key>` when `bearer` (v1 paths, where the plain `OpenAI` client sends
    /// its key so) and no other place carries one. A bearer that looks like
    /// a JWT is never taken for a key.
    pub fn check_with_bearer(
        &self,
        api_name: &str,
        settings: &SubscriptionSettings,
        headers: &HeaderMap,
        query: Option<&str>,
        bearer: bool,
    ) -> Result<Option<SubscriptionMatch>, KeyError> {
        let key = presented_key(settings, headers, query, bearer, false);
        self.check_presented(api_name, settings, key.as_deref())
    }

    /// Check the key the caller presented (found by [`presented_key`]).
    pub fn check_presented(
        &self,
        api_name: &str,
        settings: &SubscriptionSettings,
        key: Option<&[u8]>,
    ) -> Result<Option<SubscriptionMatch>, KeyError> {
        let Some(key) = key else {
            return if settings.required {
                Err(KeyError::Missing)
            } else {
                Ok(None)
            };
        };
        let (index, slot) = self.lookup(key).ok_or(KeyError::Invalid)?;
        let sub = &self.subs[index];
        if !sub.active {
            return Err(KeyError::Invalid);
        }
        if let Some(apis) = &sub.apis
            && !apis.iter().any(|a| a == api_name)
        {
            return Err(KeyError::Invalid);
        }
        Ok(Some(SubscriptionMatch {
            index,
            name: sub.name.clone(),
            slot,
        }))
    }
}

/// The key a request presents: [`extract_key`]'s places, then (`bearer`,
/// v1 paths) `Authorization: Bearer <key>`, then (`realtime`, a Realtime
/// handshake, which a browser cannot give headers) Azure's `api-key` query
/// parameter.
///
/// A key in a header is borrowed from it; only a query parameter's (which
/// may be percent-encoded) is decoded into a copy.
pub fn presented_key<'a>(
    settings: &SubscriptionSettings,
    headers: &'a HeaderMap,
    query: Option<&str>,
    bearer: bool,
    realtime: bool,
) -> Option<Cow<'a, [u8]>> {
    extract_key(settings, headers, query)
        .or_else(|| {
            bearer
                .then(|| bearer_key(headers).map(Cow::Borrowed))
                .flatten()
        })
        .or_else(|| {
            realtime
                .then(|| query_param(query?, crate::realtime::KEY_PARAM))
                .flatten()
                .filter(|v| !v.is_empty())
                .map(Cow::Owned)
        })
}

/// The value of `Authorization: Bearer <value>` when it is not a JWT (three
/// dot-separated parts, the first a base64url JSON header, `eyJ...`): a
/// subscription key as the plain `OpenAI` client sends it on v1 paths.
pub fn bearer_key(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers
        .get(http::header::AUTHORIZATION)?
        .as_bytes()
        .trim_ascii();
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    let jwt = token.starts_with(b"eyJ") && token.iter().filter(|&&c| c == b'.').count() == 2;
    (!token.is_empty() && !jwt).then_some(token)
}

/// The key a request carries, headers first (in configured order), then the
/// query parameter only when no header carries one. An empty value counts as
/// absent.
pub fn extract_key<'a>(
    settings: &SubscriptionSettings,
    headers: &'a HeaderMap,
    query: Option<&str>,
) -> Option<Cow<'a, [u8]>> {
    for name in &settings.header_names {
        if let Some(v) = headers.get(name) {
            let v = v.as_bytes().trim_ascii();
            if !v.is_empty() {
                return Some(Cow::Borrowed(v));
            }
        }
    }
    let v = query_param(query?, &settings.query_name)?;
    (!v.is_empty()).then_some(Cow::Owned(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_realtime_handshake_may_carry_its_key_in_the_query() {
        let s = settings();
        let none = HeaderMap::new();
        let key = |query: &str, realtime: bool| {
            presented_key(&s, &none, Some(query), false, realtime).map(|k| k.into_owned())
        };
        assert_eq!(key("api-key=k1", true), Some(b"k1".to_vec()));
        assert_eq!(key("model=m&api-key=k%31", true), Some(b"k1".to_vec()));
        // Empty counts as absent; only the Realtime handshake reads it.
        assert_eq!(key("api-key=", true), None);
        assert_eq!(key("api-key=k1", false), None);
        // The API's own parameter comes first.
        assert_eq!(
            key("api-key=k1&subscription-key=k2", true),
            Some(b"k2".to_vec())
        );
        // A header key is borrowed, not copied.
        let h = hdr("api-key", "k3");
        assert!(matches!(
            presented_key(&s, &h, None, false, false),
            Some(Cow::Borrowed(b"k3"))
        ));
    }

    #[test]
    fn same_bytes_is_equality() {
        for len in 0..20usize {
            let a: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
            assert!(same_bytes(&a, &a.clone()), "{len}");
            for i in 0..len {
                for bit in [1u8, 0x80] {
                    let mut b = a.clone();
                    b[i] ^= bit;
                    assert!(!same_bytes(&a, &b), "len {len}, byte {i}");
                    assert!(!same_bytes(&b, &a), "len {len}, byte {i}");
                }
            }
            let mut longer = a.clone();
            longer.push(0);
            assert!(!same_bytes(&a, &longer), "{len}");
            assert!(!same_bytes(&longer, &a), "{len}");
        }
    }

    fn sub(name: &str, p: &str, s: Option<&str>) -> Subscription {
        Subscription {
            name: name.into(),
            primary_key: Secret::new(p),
            secondary_key: s.map(Secret::new),
            active: true,
            apis: None,
        }
    }

    fn settings() -> SubscriptionSettings {
        // api-key, then Ocp-Apim-Subscription-Key; query subscription-key.
        SubscriptionSettings::default()
    }

    fn hdr(name: &'static str, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn a_bearer_key_counts_only_where_asked_and_only_when_not_a_jwt() {
        let idx = SubscriptionIndex::new(&[sub("a", "k1", Some("k2"))]);
        let s = settings();
        let bearer = hdr("authorization", "Bearer k2");
        let m = idx
            .check_with_bearer("api", &s, &bearer, None, true)
            .unwrap()
            .unwrap();
        assert_eq!((&*m.name, m.slot), ("a", KeySlot::Secondary));
        // Not asked (deployments paths): as if no key were sent.
        assert!(matches!(
            idx.check("api", &s, &bearer, None),
            Err(KeyError::Missing)
        ));
        // A header key wins over the bearer.
        let mut both = bearer.clone();
        both.insert("api-key", HeaderValue::from_static("k1"));
        let m = idx
            .check_with_bearer("api", &s, &both, None, true)
            .unwrap()
            .unwrap();
        assert_eq!(m.slot, KeySlot::Primary);
        // Unknown key: invalid, as any other place would be.
        assert!(matches!(
            idx.check_with_bearer("api", &s, &hdr("authorization", "bearer nope"), None, true),
            Err(KeyError::Invalid)
        ));
        assert_eq!(
            bearer_key(&hdr("authorization", "bearer  k9 ")),
            Some(&b"k9"[..])
        );
        for not_a_key in [
            "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
            "Basic azE6cA==",
            "Bearer ",
            "Bearer",
            "k1",
        ] {
            assert_eq!(
                bearer_key(&hdr("authorization", not_a_key)),
                None,
                "{not_a_key}"
            );
        }
        // Something shaped like a key that happens to hold dots is a key.
        assert_eq!(
            bearer_key(&hdr("authorization", "Bearer a.b.c")),
            Some(&b"a.b.c"[..])
        );
        assert_eq!(bearer_key(&HeaderMap::new()), None);
    }

    #[test]
    fn primary_and_secondary_keys_match() {
        let idx = SubscriptionIndex::new(&[sub("a", "k1", Some("k2")), sub("b", "k3", None)]);
        let s = settings();
        let m = idx
            .check("api", &s, &hdr("api-key", "k2"), None)
            .unwrap()
            .unwrap();
        assert_eq!((m.index, &*m.name, m.slot), (0, "a", KeySlot::Secondary));
        let m = idx
            .check("api", &s, &hdr("ocp-apim-subscription-key", "k3"), None)
            .unwrap()
            .unwrap();
        assert_eq!((&*m.name, m.slot), ("b", KeySlot::Primary));
    }

    #[test]
    fn keys_are_found_by_their_keyed_hash_and_only_by_an_equal_key() {
        let subs = [
            sub("a", "key-a-primary", Some("key-a-secondary")),
            sub("b", "key-b", None),
        ];
        let idx = SubscriptionIndex::new(&subs);
        assert_eq!(idx.lookup(b"key-a-primary"), Some((0, KeySlot::Primary)));
        assert_eq!(
            idx.lookup(b"key-a-secondary"),
            Some((0, KeySlot::Secondary))
        );
        assert_eq!(idx.lookup(b"key-b"), Some((1, KeySlot::Primary)));
        for other in [&b"key-b "[..], b"key-", b"", b"KEY-B", b"key-a-primar"] {
            assert_eq!(idx.lookup(other), None, "{other:?}");
        }
        // Two indexes of the same keys draw different hash keys; both find
        // every key.
        let again = SubscriptionIndex::new(&subs);
        assert_eq!(again.lookup(b"key-b"), Some((1, KeySlot::Primary)));
    }

    /// Puts every key in one bucket.
    #[derive(Default)]
    struct OneBucket;

    impl std::hash::Hasher for OneBucket {
        fn finish(&self) -> u64 {
            7
        }

        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn keys_that_share_a_bucket_are_told_apart_and_a_repeated_key_is_held_by_the_later() {
        let one = std::hash::BuildHasherDefault::<OneBucket>::default();
        let subs = [
            sub("a", "k1", Some("k2")),
            sub("b", "k3", None),
            sub("c", "k1", None),
        ];
        let by_hash = keys_by_hash(&one, &subs);
        assert_eq!(by_hash.len(), 1);
        // k1 twice: one entry, the later subscription's.
        assert_eq!(by_hash[0].0, 7);
        assert_eq!(by_hash[0].1.len(), 3);
        let found = |k: &[u8]| find(&by_hash, 7, k).map(|e| (e.index, e.slot));
        assert_eq!(found(b"k1"), Some((2, KeySlot::Primary)));
        assert_eq!(found(b"k2"), Some((0, KeySlot::Secondary)));
        assert_eq!(found(b"k3"), Some((1, KeySlot::Primary)));
        assert_eq!(found(b"k4"), None);
        assert_eq!(found(b"k"), None);
        // Another hash finds no bucket.
        assert!(find(&by_hash, 8, b"k1").is_none());
        // With the real hash, the later holder of a repeated key is found too.
        let idx = SubscriptionIndex::new(&subs);
        assert_eq!(idx.lookup(b"k1"), Some((2, KeySlot::Primary)));
        assert_eq!(idx.lookup(b"k3"), Some((1, KeySlot::Primary)));
    }

    /// A key's hash is its first byte (the last bytes written: a slice's
    /// length goes first).
    #[derive(Default)]
    struct FirstByte(u64);

    impl std::hash::Hasher for FirstByte {
        fn finish(&self) -> u64 {
            self.0
        }

        fn write(&mut self, bytes: &[u8]) {
            self.0 = bytes.first().map_or(0, |&b| u64::from(b));
        }
    }

    #[test]
    fn buckets_are_found_by_their_hash_in_any_order_of_the_subscriptions() {
        let first = std::hash::BuildHasherDefault::<FirstByte>::default();
        // Given out of order: the index sorts them.
        let keys = ["m", "c", "x", "a", "q", "e", "z", "k"];
        let subs: Vec<_> = keys.iter().map(|k| sub(k, k, None)).collect();
        let by_hash = keys_by_hash(&first, &subs);
        assert_eq!(by_hash.len(), keys.len());
        for (i, k) in keys.iter().enumerate() {
            let hash = u64::from(k.as_bytes()[0]);
            assert_eq!(
                find(&by_hash, hash, k.as_bytes()).map(|e| e.index),
                Some(i),
                "{k}"
            );
        }
        // Hashes below, between and above the stored ones find nothing.
        for absent in [b"0", b"b", b"n", b"y", b"~"] {
            let hash = u64::from(absent[0]);
            assert!(find(&by_hash, hash, absent).is_none());
        }
    }

    #[test]
    fn the_index_never_prints_a_key() {
        let idx =
            SubscriptionIndex::new(&[sub("a", "sk-primary-sentinel", Some("sk-second-sentinel"))]);
        let printed = format!("{idx:?} {idx:#?}");
        assert!(!printed.contains("sentinel"), "{printed}");
        // The bytes of a key, as a derived Debug of a byte slice would list them (`115, 107, 45` is "sk-").
        assert!(!printed.contains("115, 107, 45"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn missing_and_invalid_get_apim_401s() {
        let idx = SubscriptionIndex::new(&[sub("a", "k1", None)]);
        let s = settings();
        let e = idx.check("api", &s, &HeaderMap::new(), None).unwrap_err();
        assert_eq!(e, KeyError::Missing);
        let e = e.response("http://h/openai", &s);
        assert_eq!(e.status, 401);
        assert!(
            e.message
                .starts_with("Access denied due to missing subscription key")
        );
        assert_eq!(
            e.headers[0].1,
            "AzureApiManagementKey realm=\"http://h/openai\",name=\"api-key\",type=\"header\""
        );
        let e = idx
            .check("api", &s, &hdr("api-key", "nope"), None)
            .unwrap_err()
            .response("r", &s);
        assert_eq!(e.status, 401);
        assert!(
            e.message
                .starts_with("Access denied due to invalid subscription key")
        );
        // A key that shares a prefix is still invalid.
        assert!(idx.check("api", &s, &hdr("api-key", "k"), None).is_err());
        assert!(idx.check("api", &s, &hdr("api-key", "k11"), None).is_err());
    }

    #[test]
    fn query_parameter_only_without_header() {
        let idx = SubscriptionIndex::new(&[sub("a", "k/1", None)]);
        let s = settings();
        let h = HeaderMap::new();
        let m = idx
            .check("api", &s, &h, Some("api-version=1&subscription-key=k%2F1"))
            .unwrap();
        assert_eq!(m.unwrap().index, 0);
        // A (wrong) header wins over a right query key.
        let e = idx
            .check(
                "api",
                &s,
                &hdr("api-key", "bad"),
                Some("subscription-key=k%2F1"),
            )
            .unwrap_err();
        assert_eq!(e, KeyError::Invalid);
        // An empty header is no key: the query parameter is used.
        let m = idx
            .check(
                "api",
                &s,
                &hdr("api-key", " "),
                Some("subscription-key=k%2F1"),
            )
            .unwrap();
        assert_eq!(m.unwrap().index, 0);
    }

    #[test]
    fn suspended_or_out_of_scope_subscriptions_are_invalid() {
        let mut a = sub("a", "k1", None);
        a.active = false;
        let mut b = sub("b", "k2", None);
        b.apis = Some(vec!["other".into()]);
        let idx = SubscriptionIndex::new(&[a, b]);
        let s = settings();
        assert!(idx.check("api", &s, &hdr("api-key", "k1"), None).is_err());
        assert!(idx.check("api", &s, &hdr("api-key", "k2"), None).is_err());
        assert!(idx.check("other", &s, &hdr("api-key", "k2"), None).is_ok());
    }

    #[test]
    fn the_challenge_names_the_header_as_configured() {
        let idx = SubscriptionIndex::new(&[]);
        let mut s = settings();
        s.header_names.reverse();
        s.challenge_name = "Ocp-Apim-Subscription-Key".into();
        let e = idx
            .check("api", &s, &HeaderMap::new(), None)
            .unwrap_err()
            .response("r", &s);
        assert!(
            e.headers[0]
                .1
                .contains("name=\"Ocp-Apim-Subscription-Key\"")
        );
    }

    #[test]
    fn optional_subscription_allows_anonymous() {
        let idx = SubscriptionIndex::new(&[]);
        let mut s = settings();
        s.required = false;
        assert_eq!(idx.check("api", &s, &HeaderMap::new(), None).unwrap(), None);
        assert!(idx.check("api", &s, &hdr("api-key", "x"), None).is_err());
    }
}
