//! The in-process counter store.
//!
//! # Sliding windows
//!
//! A sliding counter keeps its charges in at most ~62 slots: time is cut into slots of 1/60 of the window, and the
//! charges made within one slot are merged into it, remembering the time of the slot's latest charge. A slot counts
//! until its latest charge is one window old. So a single charge counts for exactly the window length, and merged
//! charges count for at most one slot (1/60 of the window) longer than they would alone: the limiter never admits
//! more than `limit` in any window, and it is pessimistic by at most 1/60 of the window (1 s for tokens per minute).
//!
//! This was chosen over a sub-bucketed estimate (a sliding log approximated by weighting the previous fixed window),
//! because the Retry-After must be right: it is computed by walking the slots from the oldest until enough units
//! would have expired for the refused amount to fit, which is exactly when a retry without other traffic succeeds.
//!
//! # Fixed and calendar windows
//!
//! A fixed counter holds the current window's bounds and its total; a charge in a later window starts from zero.
//! Retry-After is the time until the window ends.
//!
//! # Memory
//!
//! Counters are kept in a [`DashMap`] keyed by (key, limit), each behind its own mutex: operations on different keys
//! run in parallel and never take a global lock, and looking up an existing key allocates nothing. Counters whose
//! charges have all expired are dropped by [`MemoryStore::purge_expired`], which the store also runs by itself
//! whenever the number of counters has doubled since the last purge (so memory stays within about twice the number
//! of live counters, at an amortised constant cost per new key).

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dashmap::DashMap;

use crate::clock::Clock;
use crate::store::{CounterId, CounterStore, Exceeded, Reservation, Usage};
use crate::window::{Limit, Window, duration_millis};

/// Slots per sliding window.
const SLOTS_PER_WINDOW: u64 = 60;
/// The store purges by itself once it holds at least this many counters (and twice as many as after the last purge).
const MIN_PURGE_THRESHOLD: usize = 1_024;

/// An in-process [`CounterStore`]: exact per replica, shared by nothing else.
pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    counters: DashMap<CounterKey, Mutex<Counter>>,
    /// Number of counters at which a new key triggers a purge.
    purge_threshold: AtomicUsize,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are left out: they may come from request headers.
        f.debug_struct("MemoryStore")
            .field("clock", &self.clock)
            .field("counters", &self.counters.len())
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            counters: DashMap::new(),
            purge_threshold: AtomicUsize::new(MIN_PURGE_THRESHOLD),
        }
    }

    /// Drops every counter that no longer holds a live charge (all of a sliding window's charges expired, or a fixed
    /// window that has ended or is empty), and returns how many were dropped. The store also does this by itself as
    /// it grows; calling it periodically keeps memory tight between bursts of new keys.
    pub fn purge_expired(&self) -> usize {
        let before = self.counters.len();
        let now = self.clock.now_millis();
        self.counters.retain(|key, counter| {
            let counter = counter.get_mut().unwrap_or_else(PoisonError::into_inner);
            !counter.is_idle(&key.0.limit.window, now)
        });
        let after = self.counters.len();
        self.purge_threshold.store(
            after.saturating_mul(2).max(MIN_PURGE_THRESHOLD),
            Ordering::Relaxed,
        );
        before.saturating_sub(after)
    }

    /// Number of counters held (live or not yet purged).
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    /// Whether the store holds no counter.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    fn reserve_now(&self, key: &str, limit: &Limit, amount: u64) -> Result<Reservation, Exceeded> {
        let lookup = Lookup { key, limit };
        if let Some(entry) = self.counters.get(&lookup as &dyn CounterIdView) {
            return self.reserve_in(&entry.key().0, entry.value(), amount);
        }
        let id = Arc::new(CounterId {
            key: key.into(),
            limit: limit.clone(),
        });
        let entry = self
            .counters
            .entry(CounterKey(id))
            .or_insert_with(|| Mutex::new(Counter::new(&limit.window)));
        let result = self.reserve_in(&entry.key().0, entry.value(), amount);
        drop(entry);
        self.purge_if_grown();
        result
    }

    fn reserve_in(
        &self,
        id: &Arc<CounterId>,
        counter: &Mutex<Counter>,
        amount: u64,
    ) -> Result<Reservation, Exceeded> {
        let mut counter = lock(counter);
        let now = self.clock.now_millis();
        let limit = &id.limit;
        counter.advance(&limit.window, now);
        let used = counter.used();
        if !fits(used, amount, limit.limit) {
            let retry_after =
                counter.wait_for(&limit.window, now, used, amount.max(1), limit.limit);
            return Err(Exceeded {
                retry_after,
                limit: limit.limit,
                used,
            });
        }
        let (bucket, charged_at) = counter.charge(&limit.window, now, amount);
        Ok(Reservation {
            id: Arc::clone(id),
            bucket,
            charged_at,
            amount,
            remaining: limit.limit.saturating_sub(counter.used()),
        })
    }

    fn reconcile_now(&self, reservation: &Reservation, actual: u64) {
        if actual == reservation.amount {
            return;
        }
        let id = &reservation.id;
        let window = &id.limit.window;
        let lookup = Lookup {
            key: &id.key,
            limit: &id.limit,
        };
        if let Some(entry) = self.counters.get(&lookup as &dyn CounterIdView) {
            let mut counter = lock(entry.value());
            counter.adjust(window, self.clock.now_millis(), reservation, actual);
            return;
        }
        if actual < reservation.amount {
            // Nothing is counted, so there is nothing to give back.
            return;
        }
        // The counter was purged (it held nothing live, e.g. after a reservation of 0): recreate it for the charge,
        // which `adjust` drops if the reservation's bucket has expired.
        let entry = self
            .counters
            .entry(CounterKey(Arc::clone(id)))
            .or_insert_with(|| Mutex::new(Counter::new(window)));
        lock(entry.value()).adjust(window, self.clock.now_millis(), reservation, actual);
        drop(entry);
        self.purge_if_grown();
    }

    fn peek_now(&self, key: &str, limit: &Limit) -> Usage {
        let lookup = Lookup { key, limit };
        let now = self.clock.now_millis();
        let usage = |counter: &mut Counter| {
            counter.advance(&limit.window, now);
            let used = counter.used();
            let retry_after = (!fits(used, 0, limit.limit))
                .then(|| counter.wait_for(&limit.window, now, used, 1, limit.limit));
            Usage {
                used,
                remaining: limit.limit.saturating_sub(used),
                retry_after,
            }
        };
        match self.counters.get(&lookup as &dyn CounterIdView) {
            Some(entry) => usage(&mut lock(entry.value())),
            None => usage(&mut Counter::new(&limit.window)),
        }
    }

    fn purge_if_grown(&self) {
        if self.counters.len() >= self.purge_threshold.load(Ordering::Relaxed) {
            self.purge_expired();
        }
    }
}

#[async_trait::async_trait]
impl CounterStore for MemoryStore {
    async fn reserve(
        &self,
        key: &str,
        limit: &Limit,
        amount: u64,
    ) -> Result<Reservation, Exceeded> {
        self.reserve_now(key, limit, amount)
    }

    async fn reconcile(&self, reservation: &Reservation, actual: u64) {
        self.reconcile_now(reservation, actual);
    }

    async fn peek(&self, key: &str, limit: &Limit) -> Usage {
        self.peek_now(key, limit)
    }
}

/// Whether a charge of `amount` fits: `used + amount <= limit`, and a charge of 0 needs `used < limit`.
fn fits(used: u64, amount: u64, limit: u64) -> bool {
    used.checked_add(amount.max(1))
        .is_some_and(|total| total <= limit)
}

fn lock(counter: &Mutex<Counter>) -> MutexGuard<'_, Counter> {
    // Nothing panics while holding the lock; if something ever did, the counter's numbers are still consistent.
    counter.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

// ---- Map keys: (key, limit), looked up by borrowed parts without allocating. ----

/// A view of a counter's identity, so the map (keyed by an owned id) can be searched with a borrowed `&str`.
trait CounterIdView {
    fn parts(&self) -> (&str, &Limit);
}

impl CounterIdView for CounterId {
    fn parts(&self) -> (&str, &Limit) {
        (&self.key, &self.limit)
    }
}

struct Lookup<'a> {
    key: &'a str,
    limit: &'a Limit,
}

impl CounterIdView for Lookup<'_> {
    fn parts(&self) -> (&str, &Limit) {
        (self.key, self.limit)
    }
}

fn hash_parts<H: Hasher>((key, limit): (&str, &Limit), state: &mut H) {
    key.hash(state);
    limit.hash(state);
}

impl Hash for dyn CounterIdView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_parts(self.parts(), state);
    }
}

impl PartialEq for dyn CounterIdView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn CounterIdView + '_ {}

/// The map's key: the shared id that reservations also hold.
struct CounterKey(Arc<CounterId>);

impl Hash for CounterKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must hash exactly as `dyn CounterIdView` does.
        hash_parts(self.0.parts(), state);
    }
}

impl PartialEq for CounterKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.parts() == other.0.parts()
    }
}

impl Eq for CounterKey {}

impl<'a> Borrow<dyn CounterIdView + 'a> for CounterKey {
    fn borrow(&self) -> &(dyn CounterIdView + 'a) {
        &*self.0
    }
}

// ---- Counters ----

/// Charges merged into one slot of a sliding window.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// `time / slot width`: which slot of time the charges were made in.
    index: u64,
    /// Time of the slot's latest charge; the slot counts until `last + window`.
    last: u64,
    amount: u64,
}

#[derive(Debug)]
enum Counter {
    Sliding {
        /// Ordered by index (and so by `last`), oldest first.
        slots: VecDeque<Slot>,
        used: u64,
    },
    Fixed {
        /// Bounds `[start, end)` of the window `used` belongs to.
        start: u64,
        end: u64,
        used: u64,
    },
}

impl Counter {
    fn new(window: &Window) -> Self {
        match window {
            Window::Sliding(_) => Counter::Sliding {
                slots: VecDeque::new(),
                used: 0,
            },
            // Empty bounds: the first `advance` moves to the current window.
            Window::Fixed(_) | Window::Calendar(_) => Counter::Fixed {
                start: 0,
                end: 0,
                used: 0,
            },
        }
    }

    fn used(&self) -> u64 {
        match self {
            Counter::Sliding { used, .. } | Counter::Fixed { used, .. } => *used,
        }
    }

    /// Forgets what has expired at `now`.
    fn advance(&mut self, window: &Window, now: u64) {
        match self {
            Counter::Sliding { slots, used } => {
                let len = sliding_len(window);
                while let Some(front) = slots.front() {
                    if front.last.saturating_add(len) > now {
                        break;
                    }
                    *used = used.saturating_sub(front.amount);
                    slots.pop_front();
                }
                if slots.is_empty() {
                    *used = 0;
                }
            }
            Counter::Fixed { start, end, used } => {
                if now < *start || now >= *end {
                    let (s, e) = window
                        .bounds_at(now)
                        .unwrap_or((now, now.saturating_add(1)));
                    (*start, *end, *used) = (s, e, 0);
                }
            }
        }
    }

    /// How long until `needed` units fit, given `used` units counted after [`advance`](Self::advance) at `now`;
    /// for `needed > limit`, how long until the window is empty.
    fn wait_for(&self, window: &Window, now: u64, used: u64, needed: u64, limit: u64) -> Duration {
        match self {
            Counter::Sliding { slots, .. } => {
                let len = sliding_len(window);
                let expiry =
                    |slot: &Slot| millis(slot.last.saturating_add(len).saturating_sub(now));
                if needed > limit {
                    // Never fits: until the last charge expires (a whole window if nothing is counted).
                    return slots.back().map_or(millis(len), expiry);
                }
                let must_free = used.saturating_add(needed).saturating_sub(limit);
                let mut freed = 0u64;
                for slot in slots {
                    freed = freed.saturating_add(slot.amount);
                    if freed >= must_free {
                        return expiry(slot);
                    }
                }
                // Unreachable while `used` is the slots' sum; a whole window is a safe answer.
                slots.back().map_or(millis(len), expiry)
            }
            Counter::Fixed { end, .. } => millis(end.saturating_sub(now)),
        }
    }

    /// Charges `amount` at `now` (after a successful check); returns the bucket charged and when the charge counts
    /// from.
    fn charge(&mut self, window: &Window, now: u64, amount: u64) -> (u64, u64) {
        match self {
            Counter::Sliding { slots, used } => {
                let index = now / slot_width(window);
                if amount == 0 {
                    return (index, now);
                }
                *used = used.saturating_add(amount);
                match slots.back_mut() {
                    // Same slot, or a clock that stepped back: merge into the newest slot to keep the order.
                    Some(back) if back.index >= index => {
                        back.amount = back.amount.saturating_add(amount);
                        back.last = back.last.max(now);
                        (back.index, back.last)
                    }
                    _ => {
                        slots.push_back(Slot {
                            index,
                            last: now,
                            amount,
                        });
                        (index, now)
                    }
                }
            }
            Counter::Fixed { start, used, .. } => {
                *used = used.saturating_add(amount);
                (*start, now)
            }
        }
    }

    /// Replaces `reservation`'s amount by `actual` in the bucket it was charged to, unless that bucket has expired.
    fn adjust(&mut self, window: &Window, now: u64, reservation: &Reservation, actual: u64) {
        self.advance(window, now);
        let reserved = reservation.amount;
        if actual > reserved && matches!(self, Counter::Sliding { .. }) {
            // Units beyond the reservation were consumed while the request ran (a
            // response's tokens): they count from now, so a response that outlives
            // the window is still charged in full.
            self.charge(window, now, actual - reserved);
            return;
        }
        match self {
            Counter::Sliding { slots, used } => {
                // Give back what was reserved but not used, from the slot it was
                // charged to, if that slot still counts.
                if let Some(slot) = slots
                    .iter_mut()
                    .find(|slot| slot.index == reservation.bucket)
                {
                    let give_back = reserved.saturating_sub(actual).min(slot.amount);
                    slot.amount -= give_back;
                    *used = used.saturating_sub(give_back);
                }
            }
            Counter::Fixed { start, used, .. } => {
                if *start != reservation.bucket {
                    return;
                }
                *used = if actual < reserved {
                    used.saturating_sub(reserved - actual)
                } else {
                    used.saturating_add(actual - reserved)
                };
            }
        }
    }

    /// Whether the counter holds nothing that still counts at `now`.
    fn is_idle(&self, window: &Window, now: u64) -> bool {
        match self {
            Counter::Sliding { slots, .. } => slots
                .back()
                .is_none_or(|back| back.last.saturating_add(sliding_len(window)) <= now),
            Counter::Fixed { start, end, used } => *used == 0 || now < *start || now >= *end,
        }
    }
}

/// Length in milliseconds of a sliding window (other windows never reach the sliding code).
fn sliding_len(window: &Window) -> u64 {
    match window {
        Window::Sliding(len) => duration_millis(*len),
        Window::Fixed(_) | Window::Calendar(_) => 1,
    }
}

fn slot_width(window: &Window) -> u64 {
    sliding_len(window).div_ceil(SLOTS_PER_WINDOW).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::window::{DAY_MS, Period, days_from_civil};

    /// 2023-11-14T22:14:00Z, a multiple of 60 s (so slot boundaries of 1-minute windows fall on whole seconds).
    const T0: u64 = 1_700_000_040_000;

    fn store_at(start: u64) -> (Arc<ManualClock>, MemoryStore) {
        let clock = Arc::new(ManualClock::new(start));
        let store = MemoryStore::new(clock.clone());
        (clock, store)
    }

    fn sliding(limit: u64, secs: u64) -> Limit {
        Limit::new(limit, Window::Sliding(Duration::from_secs(secs)))
    }

    fn reserve(
        store: &MemoryStore,
        key: &str,
        limit: &Limit,
        amount: u64,
    ) -> Result<Reservation, Exceeded> {
        store.reserve_now(key, limit, amount)
    }

    fn retry_ms(result: Result<Reservation, Exceeded>) -> u64 {
        match result {
            Err(e) => u64::try_from(e.retry_after.as_millis()).unwrap_or(u64::MAX),
            Ok(r) => panic!("expected a refusal, got {r:?}"),
        }
    }

    fn slot_count(store: &MemoryStore, key: &str, limit: &Limit) -> usize {
        let lookup = Lookup { key, limit };
        let entry = store
            .counters
            .get(&lookup as &dyn CounterIdView)
            .expect("counter exists");
        match &*lock(entry.value()) {
            Counter::Sliding { slots, .. } => slots.len(),
            Counter::Fixed { .. } => 1,
        }
    }

    #[test]
    fn sliding_window_admits_up_to_the_limit_then_exactly_after_retry_after() {
        let (clock, store) = store_at(T0);
        let limit = sliding(3, 10);
        for (offset, remaining) in [(0, 2), (2_000, 1), (4_000, 0)] {
            clock.set(T0 + offset);
            let r = reserve(&store, "k", &limit, 1).expect("fits");
            assert_eq!((r.amount(), r.remaining()), (1, remaining));
        }
        clock.set(T0 + 5_000);
        let refused = reserve(&store, "k", &limit, 1).expect_err("full");
        assert_eq!(
            refused,
            Exceeded {
                retry_after: Duration::from_millis(5_000),
                limit: 3,
                used: 3
            }
        );
        // One millisecond before the oldest charge expires the window is still full ...
        clock.set(T0 + 9_999);
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 1)), 1);
        // ... and exactly at Retry-After it fits.
        clock.set(T0 + 10_000);
        assert_eq!(
            reserve(&store, "k", &limit, 1)
                .expect("fits again")
                .remaining(),
            0
        );
        // The next opening is when the second charge expires.
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 1)), 2_000);
    }

    #[test]
    fn retry_after_waits_for_enough_units_to_expire() {
        let (clock, store) = store_at(T0);
        let limit = sliding(10, 60);
        for (offset, amount) in [(0, 4), (10_000, 3), (20_000, 3)] {
            clock.set(T0 + offset);
            reserve(&store, "k", &limit, amount).expect("fits");
        }
        clock.set(T0 + 30_000);
        // 5 more need 5 freed: the first slot frees 4, the second brings it to 7.
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 5)), 40_000);
        // 4 more need only the first slot.
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 4)), 30_000);
        clock.set(T0 + 69_999);
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 5)), 1);
        clock.set(T0 + 70_000);
        assert_eq!(
            reserve(&store, "k", &limit, 5).expect("fits").remaining(),
            2
        );
    }

    #[test]
    fn charges_in_one_slot_are_merged_and_memory_is_bounded() {
        let (clock, store) = store_at(T0);
        // A 60 s window has 1 s slots.
        let limit = sliding(2, 60);
        reserve(&store, "k", &limit, 1).expect("fits");
        clock.set(T0 + 400);
        reserve(&store, "k", &limit, 1).expect("fits");
        assert_eq!(slot_count(&store, "k", &limit), 1);
        // The merged slot counts until its latest charge is a window old: at most one slot longer than exact.
        clock.set(T0 + 500);
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 1)), 59_900);
        clock.set(T0 + 60_399);
        assert!(reserve(&store, "k", &limit, 1).is_err());
        clock.set(T0 + 60_400);
        reserve(&store, "k", &limit, 1).expect("fits");

        // A charge every 7 ms for several windows never holds more than ~62 slots.
        let busy = sliding(u64::MAX, 1);
        for i in 0..2_000 {
            clock.set(T0 + 100_000 + i * 7);
            reserve(&store, "busy", &busy, 1).expect("fits");
            assert!(slot_count(&store, "busy", &busy) <= 62);
        }
    }

    #[test]
    fn reconcile_down_frees_capacity_and_up_consumes_more() {
        let (clock, store) = store_at(T0);
        let limit = sliding(100, 60);
        let first = reserve(&store, "k", &limit, 80).expect("fits");
        assert_eq!(first.remaining(), 20);
        assert!(reserve(&store, "k", &limit, 30).is_err());
        store.reconcile_now(&first, 50);
        assert_eq!(
            reserve(&store, "k", &limit, 30)
                .expect("fits after reconcile")
                .remaining(),
            20
        );

        // Up: the window may go over its limit; later requests wait, even a check of 0.
        clock.set(T0 + 10_000);
        let second = reserve(&store, "k", &limit, 10).expect("fits");
        store.reconcile_now(&second, 150);
        let usage = store.peek_now("k", &limit);
        assert_eq!((usage.used, usage.remaining), (230, 0));
        // 230 - 100 + 1 = 131 must expire: the first slot (80) is not enough, the second (150) is.
        assert_eq!(
            usage.retry_after,
            Some(Duration::from_millis(70_000 - 10_000))
        );
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 0)), 60_000);
    }

    #[test]
    fn reconcile_up_counts_the_extra_from_now_and_down_gives_back_from_the_slot_charged() {
        let (clock, store) = store_at(T0);
        let limit = sliding(1_000, 60);
        let early = reserve(&store, "k", &limit, 10).expect("fits");
        clock.set(T0 + 30_000);
        reserve(&store, "k", &limit, 10).expect("fits");
        store.reconcile_now(&early, 40);
        assert_eq!(store.peek_now("k", &limit).used, 50);
        // The early reservation (10) expires a window after it was charged; the
        // extra 30, consumed at T0+30s, counts until T0+90s.
        clock.set(T0 + 60_000);
        assert_eq!(store.peek_now("k", &limit).used, 40);
        // Giving back from an expired slot changes nothing.
        store.reconcile_now(&early, 0);
        assert_eq!(store.peek_now("k", &limit).used, 40);
        clock.set(T0 + 90_000);
        assert_eq!(store.peek_now("k", &limit).used, 0);
    }

    #[test]
    fn a_response_that_outlives_the_window_is_still_charged() {
        let (clock, store) = store_at(T0);
        let limit = sliding(1_000, 60);
        // A long stream: reserved at the start, reconciled 90 s later.
        let r = reserve(&store, "k", &limit, 20).expect("fits");
        clock.set(T0 + 90_000);
        store.reconcile_now(&r, 900);
        let u = store.peek_now("k", &limit);
        assert_eq!((u.used, u.remaining), (880, 120));
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 200)), 60_000);
    }

    #[test]
    fn reconcile_of_a_zero_reservation_charges_the_usage_even_after_a_purge() {
        let (clock, store) = store_at(T0);
        let limit = sliding(1_000, 60);
        // A token limit that does not estimate reserves 0 and charges the usage afterwards.
        let zero = reserve(&store, "k", &limit, 0).expect("fits");
        assert_eq!((zero.amount(), zero.remaining()), (0, 1_000));
        clock.set(T0 + 20_000);
        reserve(&store, "k", &limit, 5).expect("fits");
        store.reconcile_now(&zero, 300);
        assert_eq!(store.peek_now("k", &limit).used, 305);
        clock.set(T0 + 80_000);
        assert_eq!(store.peek_now("k", &limit).used, 0);

        // The counter of an idle key is purged while its request runs; the usage still counts.
        let zero = reserve(&store, "idle", &limit, 0).expect("fits");
        assert!(store.purge_expired() >= 1);
        store.reconcile_now(&zero, 700);
        assert_eq!(store.peek_now("idle", &limit).used, 700);
        // Reconciling down a counter that no longer exists changes nothing and creates nothing.
        clock.set(T0 + 200_000);
        assert!(store.purge_expired() >= 1);
        let gone = Reservation::new("gone", &limit, 0, T0, 10, 0);
        store.reconcile_now(&gone, 1);
        assert!(
            store
                .counters
                .get(&Lookup {
                    key: "gone",
                    limit: &limit
                } as &dyn CounterIdView)
                .is_none()
        );
    }

    #[test]
    fn amount_zero_checks_that_the_window_is_not_spent() {
        let (clock, store) = store_at(T0);
        let limit = sliding(2, 60);
        assert_eq!(
            reserve(&store, "k", &limit, 0)
                .expect("empty window")
                .remaining(),
            2
        );
        reserve(&store, "k", &limit, 1).expect("fits");
        assert_eq!(
            reserve(&store, "k", &limit, 0)
                .expect("one left")
                .remaining(),
            1
        );
        clock.set(T0 + 1_000);
        reserve(&store, "k", &limit, 1).expect("fits");
        clock.set(T0 + 2_000);
        let refused = reserve(&store, "k", &limit, 0).expect_err("spent");
        // One unit must expire for the window not to be spent.
        assert_eq!(
            refused,
            Exceeded {
                retry_after: Duration::from_millis(58_000),
                limit: 2,
                used: 2
            }
        );
        assert_eq!(
            store.peek_now("k", &limit).used,
            2,
            "a refused check charges nothing"
        );
    }

    #[test]
    fn an_amount_above_the_limit_waits_for_an_empty_window() {
        let (clock, store) = store_at(T0);
        let limit = sliding(10, 60);
        // Empty: a whole window.
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 11)), 60_000);
        reserve(&store, "k", &limit, 3).expect("fits");
        clock.set(T0 + 5_000);
        reserve(&store, "k", &limit, 3).expect("fits");
        clock.set(T0 + 6_000);
        let refused = reserve(&store, "k", &limit, 11).expect_err("never fits");
        assert_eq!(
            refused,
            Exceeded {
                retry_after: Duration::from_millis(59_000),
                limit: 10,
                used: 6
            }
        );
        // A limit of 0 refuses even a check, for a window.
        let none = sliding(0, 60);
        assert_eq!(retry_ms(reserve(&store, "k", &none, 0)), 60_000);
        assert_eq!(
            store.peek_now("k", &none),
            Usage {
                used: 0,
                remaining: 0,
                retry_after: Some(Duration::from_secs(60))
            }
        );
        // Fixed windows: until the window ends.
        let fixed = Limit::new(5, Window::Fixed(Duration::from_secs(300)));
        clock.set(T0 + 60_000);
        assert_eq!(
            retry_ms(reserve(&store, "k", &fixed, 6)),
            300_000 - (T0 + 60_000) % 300_000
        );
    }

    #[test]
    fn huge_amounts_saturate_instead_of_overflowing() {
        let (_clock, store) = store_at(T0);
        let limit = sliding(u64::MAX, 60);
        let all = reserve(&store, "k", &limit, u64::MAX).expect("exactly the limit");
        assert_eq!(all.remaining(), 0);
        assert!(reserve(&store, "k", &limit, 1).is_err());
        assert!(reserve(&store, "k", &limit, u64::MAX).is_err());
        store.reconcile_now(&all, u64::MAX);
        let fixed = Limit::new(u64::MAX, Window::Fixed(Duration::MAX));
        let r = reserve(&store, "k", &fixed, u64::MAX).expect("exactly the limit");
        store.reconcile_now(&r, 0);
        assert_eq!(store.peek_now("k", &fixed).used, 0);
    }

    #[test]
    fn fixed_windows_reset_at_their_boundaries() {
        let window_start = T0 - T0 % 300_000;
        let (clock, store) = store_at(window_start + 299_000);
        let limit = Limit::new(2, Window::Fixed(Duration::from_secs(300)));
        let first = reserve(&store, "k", &limit, 1).expect("fits");
        assert_eq!(first.remaining(), 1);
        reserve(&store, "k", &limit, 1).expect("fits");
        let refused = reserve(&store, "k", &limit, 1).expect_err("full");
        assert_eq!(
            refused,
            Exceeded {
                retry_after: Duration::from_secs(1),
                limit: 2,
                used: 2
            }
        );
        clock.set(window_start + 299_999);
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 1)), 1);
        clock.set(window_start + 300_000);
        assert_eq!(
            reserve(&store, "k", &limit, 1)
                .expect("new window")
                .remaining(),
            1
        );
        // A correction to the previous window is dropped; one to the current window applies.
        store.reconcile_now(&first, 2);
        assert_eq!(store.peek_now("k", &limit).used, 1);
        let current = reserve(&store, "k", &limit, 1).expect("fits");
        store.reconcile_now(&current, 0);
        assert_eq!(
            store.peek_now("k", &limit),
            Usage {
                used: 1,
                remaining: 1,
                retry_after: None
            }
        );
    }

    /// Milliseconds of `year-month-day hh:mm:ss` UTC.
    fn at(year: u64, month: u64, day: u64, h: u64, m: u64, s: u64) -> u64 {
        days_from_civil(year, month, day) * DAY_MS + ((h * 60 + m) * 60 + s) * 1_000
    }

    #[test]
    fn calendar_windows_reset_at_utc_boundaries() {
        let cases = [
            (
                Period::Hourly,
                at(2024, 5, 17, 13, 59, 30),
                at(2024, 5, 17, 14, 0, 0),
            ),
            (
                Period::Daily,
                at(2024, 5, 17, 23, 0, 0),
                at(2024, 5, 18, 0, 0, 0),
            ),
            // 2024-05-19 is a Sunday; the next week starts on Monday the 20th.
            (
                Period::Weekly,
                at(2024, 5, 19, 22, 0, 0),
                at(2024, 5, 20, 0, 0, 0),
            ),
            // A leap-year February ends on the 29th.
            (
                Period::Monthly,
                at(2024, 2, 28, 12, 0, 0),
                at(2024, 3, 1, 0, 0, 0),
            ),
            (
                Period::Yearly,
                at(2024, 12, 31, 23, 59, 59),
                at(2025, 1, 1, 0, 0, 0),
            ),
        ];
        for (period, now, boundary) in cases {
            let (clock, store) = store_at(now);
            let limit = Limit::new(100, Window::Calendar(period));
            reserve(&store, "k", &limit, 100).expect("fits");
            let refused = reserve(&store, "k", &limit, 1).expect_err("full");
            assert_eq!(
                refused.retry_after,
                Duration::from_millis(boundary - now),
                "{period:?}"
            );
            clock.set(boundary - 1);
            assert!(reserve(&store, "k", &limit, 1).is_err(), "{period:?}");
            clock.set(boundary);
            assert_eq!(
                reserve(&store, "k", &limit, 1)
                    .expect("new period")
                    .remaining(),
                99,
                "{period:?}"
            );
        }
        // Feb 29th of a leap year is still February.
        let (clock, store) = store_at(at(2024, 2, 29, 23, 59, 59));
        let monthly = Limit::new(1, Window::Calendar(Period::Monthly));
        reserve(&store, "k", &monthly, 1).expect("fits");
        assert_eq!(retry_ms(reserve(&store, "k", &monthly, 1)), 1_000);
        clock.set(at(2024, 3, 1, 0, 0, 0));
        reserve(&store, "k", &monthly, 1).expect("March");
    }

    #[test]
    fn counters_are_separate_per_key_and_per_limit() {
        let (_clock, store) = store_at(T0);
        let per_minute = sliding(1, 60);
        let per_five = sliding(1, 300);
        let bigger = sliding(2, 60);
        let quota = Limit::new(1, Window::Fixed(Duration::from_secs(60)));
        for limit in [&per_minute, &per_five, &bigger, &quota] {
            reserve(&store, "a", limit, 1).expect("own counter");
        }
        reserve(&store, "b", &per_minute, 1).expect("own key");
        assert!(reserve(&store, "a", &per_minute, 1).is_err());
        assert_eq!(store.peek_now("a", &bigger).used, 1);
        assert_eq!(store.len(), 5);
    }

    #[test]
    fn peek_neither_charges_nor_creates() {
        let (_clock, store) = store_at(T0);
        let limit = sliding(5, 60);
        assert_eq!(
            store.peek_now("k", &limit),
            Usage {
                used: 0,
                remaining: 5,
                retry_after: None
            }
        );
        assert!(store.is_empty());
        reserve(&store, "k", &limit, 5).expect("fits");
        let usage = store.peek_now("k", &limit);
        assert_eq!(
            usage,
            Usage {
                used: 5,
                remaining: 0,
                retry_after: Some(Duration::from_secs(60))
            }
        );
        assert_eq!(store.peek_now("k", &limit), usage);
    }

    #[test]
    fn purge_drops_idle_counters_only() {
        let (clock, store) = store_at(T0);
        let short = sliding(10, 1);
        let long = sliding(10, 60);
        let quota = Limit::new(10, Window::Fixed(Duration::from_secs(60)));
        for i in 0..100 {
            reserve(&store, &format!("short-{i}"), &short, 1).expect("fits");
            reserve(&store, &format!("quota-{i}"), &quota, 1).expect("fits");
        }
        reserve(&store, "long", &long, 1).expect("fits");
        reserve(&store, "checked", &long, 0).expect("fits");
        assert_eq!(
            store.purge_expired(),
            1,
            "only the key that never charged is idle"
        );
        clock.set(T0 + 1_000);
        assert_eq!(store.purge_expired(), 100);
        // The fixed windows end at the next minute boundary (T0 is on one).
        clock.set(T0 + 60_000);
        assert_eq!(store.purge_expired(), 101);
        assert!(store.is_empty());
    }

    #[test]
    fn the_store_purges_by_itself_as_keys_come_and_go() {
        let (clock, store) = store_at(T0);
        let limit = sliding(10, 1);
        for batch in 0..50u64 {
            clock.set(T0 + batch * 1_000);
            for i in 0..100 {
                reserve(&store, &format!("{batch}-{i}"), &limit, 1).expect("fits");
                assert!(store.len() <= MIN_PURGE_THRESHOLD);
            }
        }
        assert!(store.len() >= 100, "the live batch is kept");
    }

    #[test]
    fn a_clock_stepping_back_does_not_break_the_order() {
        let (clock, store) = store_at(T0 + 10_000);
        let limit = sliding(3, 60);
        reserve(&store, "k", &limit, 1).expect("fits");
        clock.set(T0);
        let back = reserve(&store, "k", &limit, 1).expect("fits");
        assert_eq!(slot_count(&store, "k", &limit), 1);
        assert_eq!(back.charged_at_millis(), T0 + 10_000);
        store.reconcile_now(&back, 2);
        assert!(reserve(&store, "k", &limit, 1).is_err());
        clock.set(T0 + 70_000);
        assert_eq!(store.peek_now("k", &limit).used, 0);
        // A fixed window whose clock went back simply starts that window again.
        let quota = Limit::new(1, Window::Fixed(Duration::from_secs(60)));
        reserve(&store, "q", &quota, 1).expect("fits");
        clock.set(T0);
        reserve(&store, "q", &quota, 1).expect("the earlier window");
    }

    #[test]
    fn debug_output_leaves_out_keys() {
        let (_clock, store) = store_at(T0);
        let limit = sliding(5, 60);
        let reservation = reserve(&store, "sk-very-secret-header-value", &limit, 1).expect("fits");
        let printed = format!("{reservation:?} {store:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(printed.contains("amount: 1"), "{printed}");
        assert_eq!(reservation.key(), "sk-very-secret-header-value");
        assert_eq!(reservation.limit(), &limit);
    }
}
