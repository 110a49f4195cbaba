//! The memory of accepted tokens, so that a token sent again skips parsing and the signature check.
//!
//! Keyed by the SHA-256 digest of the token, never the token itself: the memory (and anything that might print
//! or dump it) holds no credential. A 256-bit digest keeps lookups exact in practice: two different tokens share
//! an entry only on a SHA-256 collision.
//!
//! Bounded by a capacity. When full, it forgets **the entry that expires soonest** (ties broken by digest): that
//! entry would be gone soonest anyway, so it is the one whose loss costs the fewest re-validations, and since
//! expired entries expire before any live one, the same order also serves to forget them. The token being
//! inserted is always remembered (it is in use right now), even if it expires sooner than every other.
//!
//! Costs: a lookup is one hash-map probe; an insert is O(log n) plus O(log n) per expired entry it forgets
//! (each entry is forgotten once, so that is amortised O(log n) too). Nothing scans the whole memory.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::Caller;

/// The SHA-256 digest of a token: the memory's key.
pub(crate) type TokenDigest = [u8; 32];

/// The memory's key for `token`.
pub(crate) fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// A token that passed every check, and the times (skew applied, seconds since the Unix epoch) it may be served
/// between: from `valid_from` inclusive to `valid_until` exclusive.
struct Entry {
    caller: Caller,
    valid_from: f64,
    valid_until: f64,
}

/// A `valid_until`, totally ordered (`f64::total_cmp`), as the first half of an expiry-index key.
#[derive(Clone, Copy)]
struct Expiry(f64);

impl PartialEq for Expiry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Expiry {}

impl PartialOrd for Expiry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Expiry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Accepted tokens by digest, at most `capacity` of them. See the module documentation.
pub(crate) struct AcceptedTokens {
    capacity: usize,
    entries: HashMap<TokenDigest, Entry>,
    /// Every key of `entries`, ordered by its `valid_until`: the first is the next one to forget.
    by_expiry: BTreeSet<(Expiry, TokenDigest)>,
}

/// Prints sizes only: neither digests nor callers.
impl fmt::Debug for AcceptedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcceptedTokens")
            .field("len", &self.entries.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl AcceptedTokens {
    /// An empty memory holding at most `capacity` tokens (0 remembers nothing).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    /// The caller of the token with this digest, if it was accepted and `now` is within its validity.
    pub(crate) fn get(&self, key: &TokenDigest, now: f64) -> Option<Caller> {
        let e = self.entries.get(key)?;
        (now >= e.valid_from && now < e.valid_until).then(|| e.caller.clone())
    }

    /// Remembers an accepted token. Forgets the entries expired at `now` first, then, if still full, the one
    /// that expires soonest. A token not valid at `now` or later (`valid_until <= now`, or NaN) is not
    /// remembered.
    pub(crate) fn insert(
        &mut self,
        key: TokenDigest,
        caller: Caller,
        valid_from: f64,
        valid_until: f64,
        now: f64,
    ) {
        // Only a token still valid after `now` (false for a NaN `valid_until`).
        if valid_until.partial_cmp(&now) != Some(Ordering::Greater) {
            return;
        }
        if let Some(old) = self.entries.remove(&key) {
            self.by_expiry.remove(&(Expiry(old.valid_until), key));
        }
        self.forget_expired(now);
        while self.entries.len() >= self.capacity {
            let Some((_, soonest)) = self.by_expiry.pop_first() else {
                return; // capacity 0
            };
            self.entries.remove(&soonest);
        }
        self.by_expiry.insert((Expiry(valid_until), key));
        self.entries.insert(
            key,
            Entry {
                caller,
                valid_from,
                valid_until,
            },
        );
    }

    /// Forgets everything (the signing keys changed).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.by_expiry.clear();
    }

    /// How many tokens are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Forgets the entries no longer valid at `now`: a prefix of the expiry order.
    fn forget_expired(&mut self, now: f64) {
        while let Some(&(Expiry(until), key)) = self.by_expiry.first() {
            if now < until {
                break;
            }
            self.by_expiry.pop_first();
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    fn caller(sub: &str) -> Caller {
        let mut claims = Map::new();
        claims.insert("sub".into(), json!(sub));
        Caller::from_claims(claims)
    }

    fn sub(c: Option<Caller>) -> Option<String> {
        c.and_then(|c| c.subject)
    }

    /// The two indexes describe the same entries.
    fn assert_consistent(m: &AcceptedTokens) {
        assert_eq!(m.entries.len(), m.by_expiry.len());
        for (Expiry(until), key) in &m.by_expiry {
            let e = m.entries.get(key).expect("indexed entry exists");
            assert_eq!(e.valid_until.to_bits(), until.to_bits());
        }
    }

    #[test]
    fn the_key_is_the_sha256_of_the_token() {
        // FIPS 180-2 test vector.
        let abc = digest("abc");
        let hex: String = abc.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(digest("abc"), digest("abd"));
    }

    #[test]
    fn the_memory_never_holds_the_raw_token() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZWNyZXQtc3ViIn0.c2lnbmF0dXJl";
        let mut m = AcceptedTokens::new(8);
        m.insert(digest(token), caller("s"), 0.0, 100.0, 10.0);
        let keys: Vec<&TokenDigest> = m.entries.keys().collect();
        assert_eq!(keys, vec![&digest(token)]);
        for key in m.entries.keys().chain(m.by_expiry.iter().map(|(_, k)| k)) {
            assert_eq!(key.len(), 32);
            assert!(
                !key.windows(8)
                    .any(|w| token.as_bytes().windows(8).any(|t| t == w)),
                "a key holds token bytes"
            );
        }
        let debug = format!("{m:?}");
        assert_eq!(debug, "AcceptedTokens { len: 1, capacity: 8, .. }");
        for part in std::iter::once(token).chain(token.split('.')) {
            assert!(!debug.contains(part), "{debug}");
        }
    }

    #[test]
    fn a_token_hits_only_its_own_entry_within_its_validity() {
        let mut m = AcceptedTokens::new(8);
        m.insert(digest("a.b.c"), caller("one"), 50.0, 100.0, 60.0);
        assert_eq!(sub(m.get(&digest("a.b.c"), 60.0)).as_deref(), Some("one"));
        assert_eq!(m.get(&digest("a.b.d"), 60.0), None, "another token");
        assert_eq!(m.get(&digest("a.b.c"), 49.9), None, "before valid_from");
        assert!(m.get(&digest("a.b.c"), 50.0).is_some(), "at valid_from");
        assert!(
            m.get(&digest("a.b.c"), 99.9).is_some(),
            "before valid_until"
        );
        assert_eq!(m.get(&digest("a.b.c"), 100.0), None, "at valid_until");
        assert_eq!(m.get(&digest("a.b.c"), 150.0), None, "after valid_until");
    }

    #[test]
    fn expired_entries_are_forgotten_by_the_next_insert() {
        let mut m = AcceptedTokens::new(8);
        m.insert(digest("t1"), caller("1"), 0.0, 100.0, 10.0);
        m.insert(digest("t2"), caller("2"), 0.0, 200.0, 10.0);
        m.insert(digest("t3"), caller("3"), 0.0, 300.0, 10.0);
        assert_eq!(m.len(), 3);
        // At 200, t1 and t2 have expired (valid_until is exclusive); t3 has not.
        m.insert(digest("t4"), caller("4"), 0.0, 400.0, 200.0);
        assert_eq!(m.len(), 2);
        assert!(!m.entries.contains_key(&digest("t1")));
        assert!(!m.entries.contains_key(&digest("t2")));
        assert_eq!(sub(m.get(&digest("t3"), 200.0)).as_deref(), Some("3"));
        assert_eq!(sub(m.get(&digest("t4"), 200.0)).as_deref(), Some("4"));
        assert_consistent(&m);
    }

    #[test]
    fn a_token_already_expired_is_not_remembered() {
        let mut m = AcceptedTokens::new(8);
        m.insert(digest("t"), caller("t"), 0.0, 100.0, 100.0);
        m.insert(digest("u"), caller("u"), 0.0, f64::NAN, 10.0);
        assert_eq!(m.len(), 0);
        assert_consistent(&m);
    }

    #[test]
    fn when_full_only_the_entry_expiring_soonest_is_evicted() {
        let mut m = AcceptedTokens::new(4);
        // Inserted out of expiry order, so insertion order and expiry order differ.
        for (token, until) in [
            ("t300", 300.0),
            ("t100", 100.0),
            ("t400", 400.0),
            ("t200", 200.0),
        ] {
            m.insert(digest(token), caller(token), 0.0, until, 10.0);
        }
        assert_eq!(m.len(), 4);
        m.insert(digest("t500"), caller("t500"), 0.0, 500.0, 10.0);
        assert_eq!(m.len(), 4, "one evicted, one added");
        assert_eq!(m.get(&digest("t100"), 10.0), None, "the soonest to expire");
        for token in ["t200", "t300", "t400", "t500"] {
            assert_eq!(sub(m.get(&digest(token), 10.0)).as_deref(), Some(token));
        }
        // The new token is remembered even when it expires sooner than the rest.
        m.insert(digest("t50"), caller("t50"), 0.0, 50.0, 10.0);
        assert_eq!(m.len(), 4);
        assert_eq!(m.get(&digest("t200"), 10.0), None);
        for token in ["t50", "t300", "t400", "t500"] {
            assert_eq!(sub(m.get(&digest(token), 10.0)).as_deref(), Some(token));
        }
        assert_consistent(&m);
    }

    #[test]
    fn remembering_a_token_again_replaces_its_entry() {
        let mut m = AcceptedTokens::new(2);
        m.insert(digest("a"), caller("a"), 0.0, 100.0, 10.0);
        m.insert(digest("b"), caller("b"), 0.0, 200.0, 10.0);
        // Full, but `a` is already there: nothing else is evicted.
        m.insert(digest("a"), caller("a2"), 0.0, 300.0, 10.0);
        assert_eq!(m.len(), 2);
        assert_eq!(sub(m.get(&digest("a"), 150.0)).as_deref(), Some("a2"));
        assert_eq!(sub(m.get(&digest("b"), 150.0)).as_deref(), Some("b"));
        assert_consistent(&m);
        // `b` now expires first.
        m.insert(digest("c"), caller("c"), 0.0, 400.0, 10.0);
        assert_eq!(m.get(&digest("b"), 10.0), None);
        assert!(m.get(&digest("a"), 10.0).is_some());
        assert_consistent(&m);
    }

    #[test]
    fn clear_forgets_everything_and_capacity_zero_remembers_nothing() {
        let mut m = AcceptedTokens::new(4);
        m.insert(digest("a"), caller("a"), 0.0, 100.0, 10.0);
        m.clear();
        assert_eq!(m.len(), 0);
        assert_eq!(m.get(&digest("a"), 10.0), None);
        assert_consistent(&m);

        let mut none = AcceptedTokens::new(0);
        none.insert(digest("a"), caller("a"), 0.0, 100.0, 10.0);
        assert_eq!(none.len(), 0);
        assert_consistent(&none);
    }

    #[test]
    fn stays_bounded_and_consistent_under_many_inserts() {
        let cap = 10_000;
        let mut m = AcceptedTokens::new(cap);
        for i in 0..3 * cap {
            let now = i as f64;
            // Lifetimes vary, so evictions and expiries interleave.
            let until = now + 1.0 + ((i * 7919) % 20_000) as f64;
            m.insert(digest(&format!("token-{i}")), caller("x"), 0.0, until, now);
            assert!(m.len() <= cap);
        }
        assert_consistent(&m);
        let last = 3 * cap - 1;
        assert!(
            m.get(&digest(&format!("token-{last}")), last as f64)
                .is_some()
        );
    }

    #[test]
    fn expiry_orders_totally() {
        let mut v = [
            Expiry(2.0),
            Expiry(f64::INFINITY),
            Expiry(-1.0),
            Expiry(0.5),
        ];
        v.sort();
        let got: Vec<f64> = v.iter().map(|e| e.0).collect();
        assert_eq!(got, vec![-1.0, 0.5, 2.0, f64::INFINITY]);
        assert!(Expiry(1.0) == Expiry(1.0));
        assert!(Expiry(1.0) != Expiry(2.0));
        assert_eq!(Expiry(1.0).partial_cmp(&Expiry(2.0)), Some(Ordering::Less));
    }
}
