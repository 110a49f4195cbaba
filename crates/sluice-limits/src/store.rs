//! The store interface the limit policies code against.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::window::Limit;

/// A counter's identity: the caller's key and the limit it is counted against.
///
/// One `CounterId` is shared by a [`MemoryStore`](crate::MemoryStore) counter and the reservations charged to it, so
/// that a reservation can tell whether *its* counter was evicted.
pub(crate) struct CounterId {
    pub(crate) key: Box<str>,
    pub(crate) limit: Limit,
    /// Set (under the shard's write lock) when the store evicts this counter to make room: a later reconcile of a
    /// reservation charged to it is dropped, since the key has started afresh.
    pub(crate) evicted: AtomicBool,
}

impl CounterId {
    pub(crate) fn new(key: &str, limit: &Limit) -> Self {
        Self {
            key: key.into(),
            limit: limit.clone(),
            evicted: AtomicBool::new(false),
        }
    }
}

/// A successful reservation: what was charged where, so that [`CounterStore::reconcile`] can correct it later.
///
/// Its `Debug` output leaves out the counter key, which may be derived from a request header.
#[derive(Clone)]
pub struct Reservation {
    pub(crate) id: Arc<CounterId>,
    pub(crate) bucket: u64,
    pub(crate) charged_at: u64,
    pub(crate) amount: u64,
    pub(crate) remaining: u64,
}

impl Reservation {
    /// Builds a reservation; for [`CounterStore`] implementations outside this crate.
    ///
    /// `bucket` identifies the window bucket charged (the store decides its meaning: [`MemoryStore`](crate::MemoryStore)
    /// uses the sliding slot index or the fixed window's start), `charged_at_millis` when the charge counts from,
    /// `remaining` the units left in the window right after the charge.
    pub fn new(
        key: &str,
        limit: &Limit,
        bucket: u64,
        charged_at_millis: u64,
        amount: u64,
        remaining: u64,
    ) -> Self {
        Self {
            id: Arc::new(CounterId::new(key, limit)),
            bucket,
            charged_at: charged_at_millis,
            amount,
            remaining,
        }
    }

    /// Units charged by this reservation.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// Units left in the window right after this charge.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The counter key that was charged.
    pub fn key(&self) -> &str {
        &self.id.key
    }

    /// The limit that was charged.
    pub fn limit(&self) -> &Limit {
        &self.id.limit
    }

    /// The window bucket that was charged (store-specific, see [`Reservation::new`]).
    pub fn bucket(&self) -> u64 {
        self.bucket
    }

    /// When the charge counts from, in milliseconds since the UNIX epoch.
    pub fn charged_at_millis(&self) -> u64 {
        self.charged_at
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("limit", &self.id.limit)
            .field("bucket", &self.bucket)
            .field("charged_at", &self.charged_at)
            .field("amount", &self.amount)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

/// A refusal: the window is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// How long until a charge of the refused amount would fit, assuming no other traffic (for an amount that can
    /// never fit: until the window is empty).
    pub retry_after: Duration,
    /// The limit that refused.
    pub limit: u64,
    /// Units already counted in the window.
    pub used: u64,
}

/// A counter's current state, read without charging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Units counted in the current window.
    pub used: u64,
    /// Units left before the limit (0 when the window is at or over its limit).
    pub remaining: u64,
    /// When the window is full (`used >= limit`), how long until it is not; `None` otherwise.
    pub retry_after: Option<Duration>,
}

/// Where limit counters live; the policies use only this interface.
///
/// Every operation on one counter is atomic. A counter is identified by the key together with the whole [`Limit`].
#[async_trait::async_trait]
pub trait CounterStore: Send + Sync + std::fmt::Debug {
    /// Atomically: if `used + amount <= limit`, charges `amount` and returns a [`Reservation`]; otherwise charges
    /// nothing and returns [`Exceeded`] with the time after which a charge of `amount` would fit (assuming no other
    /// traffic).
    ///
    /// `amount` may be 0: a check that the window is not already spent (`used >= limit` is refused), as APIM's token
    /// limit blocks once the window is spent even when the estimate is 0. An `amount` above the limit can never fit; it
    /// is refused with the time until the window is completely empty.
    async fn reserve(&self, key: &str, limit: &Limit, amount: u64)
    -> Result<Reservation, Exceeded>;

    /// Corrects a reservation once the real amount is known. `actual` may be lower or higher than the amount reserved;
    /// higher may push the window over its limit, which later requests then wait out.
    ///
    /// Fixed and calendar windows: the correction applies to the window the reservation was charged to; once that
    /// window has ended it is dropped. Sliding windows: unused units are given back from the slot they were charged to
    /// (if it still counts); units beyond the reservation are charged now, since they were consumed while the request
    /// ran — so a response that outlives the window is still charged in full.
    async fn reconcile(&self, reservation: &Reservation, actual: u64);

    /// The counter's current state, without charging.
    async fn peek(&self, key: &str, limit: &Limit) -> Usage;

    /// Charges `amount` now, whatever the window holds (units already consumed: a Realtime session's response
    /// reports its usage after the fact), and returns the counter's state after the charge. The window may end up
    /// over its limit; later reservations then wait it out.
    async fn charge(&self, key: &str, limit: &Limit, amount: u64) -> Usage;
}
