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
//! # Memory: a cap on the number of counters
//!
//! Counter keys come from clients (a header, a claim, the client address), so the number of counters is what a client
//! decides. The store therefore holds at most `max_keys` counters ([`MemoryStore::with_max_keys`]; 1,000,000 by
//! default, [`MemoryStore::DEFAULT_MAX_KEYS`]). At the cap, a new key makes room by evicting the *least recently used*
//! counter; that key starts afresh if it comes back (its window forgets what it had counted), and
//! [`MemoryStore::evictions`] counts the evictions. A counter is *used* by [`reserve`](CounterStore::reserve) and
//! [`reconcile`](CounterStore::reconcile); [`peek`](CounterStore::peek) does not count as a use.
//!
//! ## Layout, and what "least recently used" means exactly
//!
//! Counters are spread over shards by a hash of (key, limit) keyed at random in each process (so clients cannot aim
//! their keys at one shard). Each shard is a read-write lock over a hash index and a dense vector of counters, each
//! counter behind its own mutex. Looking up an existing key takes only its shard's read lock, so operations on
//! different keys run in parallel and no lock is global, and it allocates nothing. Each use stamps the counter with
//! the next value of its shard's logical clock (one relaxed atomic add on the shard, which the read lock already
//! touches), so recency is a strict order within a shard.
//!
//! The cap is split between the shards (`max_keys / shards`, the remainder spread one each over the first shards), and
//! a new key is inserted under its shard's write lock: if that shard holds its share, it evicts one of its own
//! counters first. So [`len`](MemoryStore::len) never exceeds the cap, and an eviction locks one shard only. The counter
//! evicted is chosen as follows:
//!
//! - a shard holding at most `EVICTION_SAMPLE` (16) counters compares all of them and evicts its least recently used
//!   exactly;
//! - a larger shard compares 16 of its counters drawn uniformly at random (with replacement) and evicts the least
//!   recently used of those (the approximation of Redis's `allkeys-lru`, with 16 samples). The counter evicted is
//!   among the shard's least recently used fraction `p` with probability `1 − (1 − p)^16`: among the oldest quarter
//!   99% of the time, and more recent than the median with probability `2^-16`.
//!
//! The number of shards is four per CPU rounded up to a power of two (as `dashmap` does), but at most one per 1,024
//! keys of cap, and at least one. So a store with a cap below 2,048 has a single shard, and with a cap of at most 16
//! its eviction is the exact least recently used of the whole store. With several shards, recency is compared within
//! the new key's shard, which holds a uniformly random share of the keys (at the default cap on 16 CPUs: 64 shards of
//! 15,625), and a shard can reach its share slightly before the store reaches the cap: the shards' counts vary by
//! about `1/sqrt(share)` (0.8% for 15,625, 3% for the smallest share of 1,024).
//!
//! The work an eviction adds to a request is bounded: 16 random draws and atomic loads, and the removal of one entry
//! (under the write lock of one shard, which any new key takes anyway). Nothing on the request path scans the store.
//!
//! ## Idle counters are purged off the request path
//!
//! Counters whose charges have all expired are dropped by [`MemoryStore::purge_expired`], which the store never runs
//! by itself: call it periodically from a background task (the proxy does, every `server.counters.purge_interval`).
//! It takes each shard's write lock in turn for one pass over that shard, so it never blocks requests on other shards,
//! and gives memory back when a shard has shrunk to less than half its allocation.
//!
//! A counter with a live charge is never purged. A counter holding only a reservation of 0 (a token limit that does
//! not estimate) is idle and may be purged while its request runs; reconciling that reservation upwards recreates the
//! counter and charges the usage. Reconciling a reservation whose counter was *evicted* changes nothing (the key
//! started afresh, and the new counter never held that charge), and reconciling down a counter that is gone gives
//! nothing back: no panic, no count below zero.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use rand::Rng;

use crate::Clock;
use crate::store::{CounterId, CounterStore, Exceeded, Reservation, Usage};
use crate::window::{Limit, Window, duration_millis};

/// Slots per sliding window.
const SLOTS_PER_WINDOW: u64 = 60;
/// Counters compared to choose the one to evict: all of them in a shard this small, else this many at random.
pub(crate) const EVICTION_SAMPLE: usize = 16;
/// A shard is given at least this many keys of the cap (so a cap below twice this means one shard).
const MIN_KEYS_PER_SHARD: usize = 1_024;

/// An in-process [`CounterStore`]: exact per replica, shared by nothing else, holding at most a fixed number of
/// counters.
///
/// At the cap ([`with_max_keys`](Self::with_max_keys), 1,000,000 by default) a new key evicts the least recently
/// used counter (exactly, in a store whose cap is at most 16; else the least recently used of 16 counters of the new
/// key's shard drawn at random), and [`evictions`](Self::evictions) counts it. A reserve or a reconcile is a use, a
/// peek is not. Nothing on the request path scans the store: idle counters are dropped only by
/// [`purge_expired`](Self::purge_expired), which a background task should call periodically. Lookups of existing keys
/// take one shard's read lock and allocate nothing.
pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    /// Picks a counter's shard; keyed at random per store.
    shard_hasher: RandomState,
    shards: Box<[Padded<RwLock<Shard>>]>,
    max_keys: usize,
    evictions: AtomicU64,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are left out: they may come from request headers.
        f.debug_struct("MemoryStore")
            .field("clock", &self.clock)
            .field("counters", &self.len())
            .field("max_keys", &self.max_keys)
            .field("shards", &self.shards.len())
            .field("evictions", &self.evictions())
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// The cap of [`MemoryStore::new`]: 1,000,000 counters.
    pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

    /// An empty store reading time from `clock`, holding at most [`DEFAULT_MAX_KEYS`](Self::DEFAULT_MAX_KEYS)
    /// counters.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self::with_max_keys(clock, Self::DEFAULT_MAX_KEYS)
    }

    /// An empty store reading time from `clock`, holding at most `max_keys` counters (a cap of 0 is taken as 1). At
    /// the cap, a new key evicts the least recently used counter (see [`MemoryStore`]).
    pub fn with_max_keys(clock: Arc<dyn Clock>, max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        Self::with_shards(clock, max_keys, shard_count(max_keys, cpus))
    }

    /// `max_keys` (at least 1) split over `shards` (at least 1, at most `max_keys`).
    fn with_shards(clock: Arc<dyn Clock>, max_keys: usize, shards: usize) -> Self {
        let shards = shards.clamp(1, max_keys);
        let (share, extra) = (max_keys / shards, max_keys % shards);
        Self {
            clock,
            shard_hasher: RandomState::new(),
            shards: (0..shards)
                .map(|i| Padded(RwLock::new(Shard::new(share + usize::from(i < extra)))))
                .collect(),
            max_keys,
            evictions: AtomicU64::new(0),
        }
    }

    /// Drops every counter that no longer holds a live charge (all of a sliding window's charges expired, or a fixed
    /// window that has ended or is empty), and returns how many were dropped.
    ///
    /// The store never calls this by itself (requests never pay for a scan): call it periodically from a background
    /// task. It locks one shard at a time for a pass over it, and gives memory back from shards that shrank.
    pub fn purge_expired(&self) -> usize {
        let now = self.clock.now_millis();
        let mut dropped = 0;
        for shard in &self.shards {
            let mut shard = write(&shard.0);
            let mut i = 0;
            while let Some(entry) = shard.entries.get_mut(i) {
                let counter = entry
                    .counter
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner);
                if counter.is_idle(&entry.id.limit.window, now) {
                    shard.remove(i);
                    dropped += 1;
                } else {
                    i += 1;
                }
            }
            let keep = shard.entries.len() * 2;
            shard.entries.shrink_to(keep);
            shard.index.shrink_to(keep);
        }
        dropped
    }

    /// Number of counters held (live or not yet purged); never more than the cap.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| read(&shard.0).entries.len())
            .sum()
    }

    /// Whether the store holds no counter.
    pub fn is_empty(&self) -> bool {
        self.shards
            .iter()
            .all(|shard| read(&shard.0).entries.is_empty())
    }

    /// How many counters have been evicted to make room for new keys since the store was created (a monotonic
    /// count, for a `sluice_counter_evictions_total` metric). Purges are not counted.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn shard_of(&self, lookup: &Lookup<'_>) -> &RwLock<Shard> {
        let mut hasher = self.shard_hasher.build_hasher();
        hash_parts(lookup.parts(), &mut hasher);
        let n = self.shards.len();
        // The remainder is below `n`, so the cast back is lossless.
        let i = (hasher.finish() % n as u64) as usize;
        &self.shards[i].0
    }

    /// Inserts a new counter for `id` into `shard` (evicting one at its share of the cap); returns its position.
    fn insert(&self, shard: &mut Shard, id: Arc<CounterId>) -> usize {
        if shard.insert(id) {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        shard.entries.len() - 1
    }

    /// Runs `f` on the counter for `key` under `limit` (at its position in its shard), creating the counter first
    /// when there is none.
    fn with_counter<T>(&self, key: &str, limit: &Limit, f: impl Fn(&Shard, usize) -> T) -> T {
        let lookup = Lookup { key, limit };
        let shard = self.shard_of(&lookup);
        {
            let shard = read(shard);
            if let Some(i) = shard.position(&lookup) {
                return f(&shard, i);
            }
        }
        let mut shard = write(shard);
        let i = match shard.position(&lookup) {
            // Another request created it meanwhile.
            Some(i) => i,
            None => self.insert(&mut shard, Arc::new(CounterId::new(key, limit))),
        };
        f(&shard, i)
    }

    fn reserve_now(&self, key: &str, limit: &Limit, amount: u64) -> Result<Reservation, Exceeded> {
        self.with_counter(key, limit, |shard, i| self.reserve_in(shard, i, amount))
    }

    fn reserve_in(&self, shard: &Shard, i: usize, amount: u64) -> Result<Reservation, Exceeded> {
        let entry = shard.touch(i);
        let mut counter = lock(&entry.counter);
        let now = self.clock.now_millis();
        let limit = &entry.id.limit;
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
            id: Arc::clone(&entry.id),
            bucket,
            charged_at,
            amount,
            remaining: limit.limit.saturating_sub(counter.used()),
        })
    }

    fn charge_now(&self, key: &str, limit: &Limit, amount: u64) -> Usage {
        self.with_counter(key, limit, |shard, i| self.charge_in(shard, i, amount))
    }

    fn charge_in(&self, shard: &Shard, i: usize, amount: u64) -> Usage {
        let entry = shard.touch(i);
        let mut counter = lock(&entry.counter);
        let now = self.clock.now_millis();
        let limit = &entry.id.limit;
        counter.advance(&limit.window, now);
        if amount > 0 {
            counter.charge(&limit.window, now, amount);
        }
        usage_of(&mut counter, limit, now)
    }

    fn reconcile_now(&self, reservation: &Reservation, actual: u64) {
        let up = match actual.cmp(&reservation.amount) {
            std::cmp::Ordering::Equal => return,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Greater => true,
        };
        let id = &reservation.id;
        let lookup = Lookup {
            key: &id.key,
            limit: &id.limit,
        };
        let shard = self.shard_of(&lookup);
        {
            let shard = read(shard);
            let found = shard.position(&lookup);
            // Read after the lookup, under the read lock: an eviction sets the flag before it releases the write
            // lock, so a counter missing (or recreated) because it was evicted is seen as evicted here.
            if id.evicted.load(Ordering::Relaxed) {
                // The key started afresh; the new counter (if any) never held this charge.
                return;
            }
            if let Some(i) = found {
                self.adjust_in(&shard, i, reservation, actual);
                return;
            }
        }
        if !up {
            // Nothing is counted, so there is nothing to give back.
            return;
        }
        // The counter was purged (it held nothing live, e.g. after a reservation of 0): recreate it for the charge,
        // which `adjust` drops if the reservation's bucket has expired.
        let mut shard = write(shard);
        let i = match shard.position(&lookup) {
            Some(i) => i,
            None => self.insert(&mut shard, Arc::clone(id)),
        };
        self.adjust_in(&shard, i, reservation, actual);
    }

    fn adjust_in(&self, shard: &Shard, i: usize, reservation: &Reservation, actual: u64) {
        let entry = shard.touch(i);
        let window = &entry.id.limit.window;
        lock(&entry.counter).adjust(window, self.clock.now_millis(), reservation, actual);
    }

    fn peek_now(&self, key: &str, limit: &Limit) -> Usage {
        let lookup = Lookup { key, limit };
        let now = self.clock.now_millis();
        let usage = |counter: &mut Counter| {
            counter.advance(&limit.window, now);
            usage_of(counter, limit, now)
        };
        let shard = read(self.shard_of(&lookup));
        match shard.position(&lookup) {
            // Not a use: the counter's recency is left alone.
            Some(i) => usage(&mut lock(&shard.entries[i].counter)),
            None => usage(&mut Counter::new(&limit.window)),
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

    async fn charge(&self, key: &str, limit: &Limit, amount: u64) -> Usage {
        self.charge_now(key, limit, amount)
    }
}

/// The state of a counter already advanced to `now`: what it holds, what is
/// left, and how long it stays full when it is.
fn usage_of(counter: &mut Counter, limit: &Limit, now: u64) -> Usage {
    let used = counter.used();
    let retry_after = (!fits(used, 0, limit.limit))
        .then(|| counter.wait_for(&limit.window, now, used, 1, limit.limit));
    Usage {
        used,
        remaining: limit.limit.saturating_sub(used),
        retry_after,
    }
}

/// Shards for a cap of `max_keys` on a machine with `cpus` CPUs: four per CPU rounded up to a power of two (as
/// `dashmap` does), but at most one per [`MIN_KEYS_PER_SHARD`] keys, and at least one.
fn shard_count(max_keys: usize, cpus: usize) -> usize {
    let by_cpu = cpus.saturating_mul(4).next_power_of_two();
    (max_keys / MIN_KEYS_PER_SHARD).clamp(1, by_cpu)
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

fn read(shard: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    // As for `lock`: a shard's index and entries are updated together without anything that panics in between.
    shard.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(shard: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    shard.write().unwrap_or_else(PoisonError::into_inner)
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

// ---- Shards ----

/// Keeps each shard's lock on its own cache lines, so that traffic on one shard does not slow its neighbours.
#[repr(align(128))]
struct Padded<T>(T);

/// A part of the store: its counters, indexed by (key, limit).
struct Shard {
    /// Where each counter is in `entries`.
    index: HashMap<CounterKey, usize>,
    /// The counters, densely (so that eviction can draw them at random), in no particular order.
    entries: Vec<Entry>,
    /// The most counters this shard holds: its share of the store's cap.
    cap: usize,
    /// Logical clock of this shard's counters' uses.
    tick: AtomicU64,
}

struct Entry {
    id: Arc<CounterId>,
    /// The shard's `tick` at this counter's latest use.
    last_used: AtomicU64,
    counter: Mutex<Counter>,
}

impl Shard {
    fn new(cap: usize) -> Self {
        Self {
            index: HashMap::new(),
            entries: Vec::new(),
            cap,
            tick: AtomicU64::new(0),
        }
    }

    fn position(&self, lookup: &Lookup<'_>) -> Option<usize> {
        self.index.get(lookup as &dyn CounterIdView).copied()
    }

    /// Marks the counter at `i` as used now, and returns it.
    fn touch(&self, i: usize) -> &Entry {
        let entry = &self.entries[i];
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        entry.last_used.store(now, Ordering::Relaxed);
        entry
    }

    /// Appends a new counter for `id` (whose caller then [`touch`](Self::touch)es it), first evicting the least recently
    /// used counter if the shard is full; returns whether one was evicted.
    fn insert(&mut self, id: Arc<CounterId>) -> bool {
        let victim = if self.entries.len() >= self.cap {
            self.victim()
        } else {
            None
        };
        if let Some(victim) = victim {
            let gone = self.remove(victim);
            gone.id.evicted.store(true, Ordering::Relaxed);
        }
        let counter = Mutex::new(Counter::new(&id.limit.window));
        self.index
            .insert(CounterKey(Arc::clone(&id)), self.entries.len());
        self.entries.push(Entry {
            id,
            last_used: AtomicU64::new(0),
            counter,
        });
        victim.is_some()
    }

    /// The position of the counter to evict: the least recently used of all counters if there are at most
    /// [`EVICTION_SAMPLE`], else of that many drawn at random. `None` if the shard is empty.
    fn victim(&self) -> Option<usize> {
        let n = self.entries.len();
        let last_used = |i: &usize| self.entries[*i].last_used.load(Ordering::Relaxed);
        if n <= EVICTION_SAMPLE {
            return (0..n).min_by_key(last_used);
        }
        let mut rng = rand::rng();
        (0..EVICTION_SAMPLE)
            .map(|_| rng.random_range(0..n))
            .min_by_key(last_used)
    }

    /// Removes the counter at `i` (moving the last one into its place).
    fn remove(&mut self, i: usize) -> Entry {
        let entry = self.entries.swap_remove(i);
        self.index.remove(&*entry.id as &dyn CounterIdView);
        if let Some(moved) = self.entries.get(i)
            && let Some(position) = self.index.get_mut(&*moved.id as &dyn CounterIdView)
        {
            *position = i;
        }
        entry
    }
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
                // Exact (in u128): what must expire for `needed` more to fit.
                let must_free =
                    (u128::from(used) + u128::from(needed)).saturating_sub(u128::from(limit));
                let mut freed = 0u128;
                for slot in slots {
                    freed += u128::from(slot.amount);
                    if freed >= must_free {
                        return expiry(slot);
                    }
                }
                // `needed > limit` never fits (more than `used` must expire): until the last charge expires, a whole
                // window if nothing is counted.
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
        // At most one of them is not 0.
        let unused = reserved.saturating_sub(actual);
        let extra = actual.saturating_sub(reserved);
        match self {
            Counter::Sliding { slots, used } => {
                // Give back what was reserved but not used, from the slot it was
                // charged to, if that slot still counts.
                if let Some(slot) = slots
                    .iter_mut()
                    .find(|slot| slot.index == reservation.bucket)
                {
                    let give_back = unused.min(slot.amount);
                    slot.amount -= give_back;
                    *used = used.saturating_sub(give_back);
                }
            }
            Counter::Fixed { start, used, .. } => {
                if *start == reservation.bucket {
                    *used = used.saturating_sub(unused).saturating_add(extra);
                }
                return;
            }
        }
        // Sliding: units beyond the reservation were consumed while the request
        // ran (a response's tokens): they count from now, so a response that
        // outlives the window is still charged in full.
        self.charge(window, now, extra);
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
    use crate::ManualClock;
    use crate::window::Period;

    /// 2023-11-14T22:14:00Z, a multiple of 60 s (so slot boundaries of 1-minute windows fall on whole seconds).
    const T0: u64 = 1_700_000_040_000;

    fn store_at(start: u64) -> (Arc<ManualClock>, MemoryStore) {
        let clock = Arc::new(ManualClock::from_millis(start));
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
        let shard = read(store.shard_of(&lookup));
        let i = shard.position(&lookup).expect("counter exists");
        match &*lock(&shard.entries[i].counter) {
            Counter::Sliding { slots, .. } => slots.len(),
            Counter::Fixed { .. } => 1,
        }
    }

    /// Whether the store holds a counter for `key` under `limit`.
    fn holds(store: &MemoryStore, key: &str, limit: &Limit) -> bool {
        let lookup = Lookup { key, limit };
        read(store.shard_of(&lookup)).position(&lookup).is_some()
    }

    /// Counters held by each shard.
    fn shard_lens(store: &MemoryStore) -> Vec<usize> {
        store
            .shards
            .iter()
            .map(|shard| read(&shard.0).entries.len())
            .collect()
    }

    #[test]
    fn a_charge_counts_whatever_the_window_holds_and_reports_the_state_after() {
        let (clock, store) = store_at(T0);
        let limit = sliding(100, 10);
        let u = store.charge_now("k", &limit, 60);
        assert_eq!((u.used, u.remaining, u.retry_after), (60, 40, None));
        // Over the limit: charged all the same, and the window says how long it is full.
        clock.set_millis(T0 + 2_000);
        let u = store.charge_now("k", &limit, 70);
        assert_eq!((u.used, u.remaining), (130, 0));
        // It stays full until the first charge leaves the window (at T0 + 10 s).
        assert_eq!(u.retry_after, Some(Duration::from_millis(8_000)));
        // A reservation now waits the charge out; 0 is a pure look.
        assert!(reserve(&store, "k", &limit, 0).is_err());
        let u = store.charge_now("k", &limit, 0);
        assert_eq!(u.used, 130);
        // Exactly at the limit is full too.
        let other = sliding(50, 10);
        let u = store.charge_now("k", &other, 50);
        assert_eq!((u.used, u.remaining), (50, 0));
        assert!(u.retry_after.is_some());
        let u = store.charge_now("k2", &other, 49);
        assert_eq!((u.used, u.remaining, u.retry_after), (49, 1, None));
        // The first charge ages out of the sliding window; the second stays.
        clock.set_millis(T0 + 10_000);
        assert_eq!(store.charge_now("k", &limit, 0).used, 70);
        assert!(holds(&store, "k", &limit));
    }

    #[test]
    fn sliding_window_admits_up_to_the_limit_then_exactly_after_retry_after() {
        let (clock, store) = store_at(T0);
        let limit = sliding(3, 10);
        for (offset, remaining) in [(0, 2), (2_000, 1), (4_000, 0)] {
            clock.set_millis(T0 + offset);
            let r = reserve(&store, "k", &limit, 1).expect("fits");
            assert_eq!((r.amount(), r.remaining()), (1, remaining));
        }
        clock.set_millis(T0 + 5_000);
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
        clock.set_millis(T0 + 9_999);
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 1)), 1);
        // ... and exactly at Retry-After it fits.
        clock.set_millis(T0 + 10_000);
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
            clock.set_millis(T0 + offset);
            reserve(&store, "k", &limit, amount).expect("fits");
        }
        clock.set_millis(T0 + 30_000);
        // 5 more need 5 freed: the first slot frees 4, the second brings it to 7.
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 5)), 40_000);
        // 4 more need only the first slot.
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 4)), 30_000);
        clock.set_millis(T0 + 69_999);
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 5)), 1);
        clock.set_millis(T0 + 70_000);
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
        clock.set_millis(T0 + 400);
        reserve(&store, "k", &limit, 1).expect("fits");
        assert_eq!(slot_count(&store, "k", &limit), 1);
        // The merged slot counts until its latest charge is a window old: at most one slot longer than exact.
        clock.set_millis(T0 + 500);
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 1)), 59_900);
        clock.set_millis(T0 + 60_399);
        assert!(reserve(&store, "k", &limit, 1).is_err());
        clock.set_millis(T0 + 60_400);
        reserve(&store, "k", &limit, 1).expect("fits");

        // A charge every 7 ms for several windows never holds more than ~62 slots.
        let busy = sliding(u64::MAX, 1);
        for i in 0..2_000 {
            clock.set_millis(T0 + 100_000 + i * 7);
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
        clock.set_millis(T0 + 10_000);
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
        clock.set_millis(T0 + 30_000);
        reserve(&store, "k", &limit, 10).expect("fits");
        store.reconcile_now(&early, 40);
        assert_eq!(store.peek_now("k", &limit).used, 50);
        // The early reservation (10) expires a window after it was charged; the
        // extra 30, consumed at T0+30s, counts until T0+90s.
        clock.set_millis(T0 + 60_000);
        assert_eq!(store.peek_now("k", &limit).used, 40);
        // Giving back from an expired slot changes nothing.
        store.reconcile_now(&early, 0);
        assert_eq!(store.peek_now("k", &limit).used, 40);
        clock.set_millis(T0 + 90_000);
        assert_eq!(store.peek_now("k", &limit).used, 0);
    }

    #[test]
    fn a_response_that_outlives_the_window_is_still_charged() {
        let (clock, store) = store_at(T0);
        let limit = sliding(1_000, 60);
        // A long stream: reserved at the start, reconciled 90 s later.
        let r = reserve(&store, "k", &limit, 20).expect("fits");
        clock.set_millis(T0 + 90_000);
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
        clock.set_millis(T0 + 20_000);
        reserve(&store, "k", &limit, 5).expect("fits");
        store.reconcile_now(&zero, 300);
        assert_eq!(store.peek_now("k", &limit).used, 305);
        clock.set_millis(T0 + 80_000);
        assert_eq!(store.peek_now("k", &limit).used, 0);

        // The counter of an idle key is purged while its request runs; the usage still counts.
        let zero = reserve(&store, "idle", &limit, 0).expect("fits");
        assert!(store.purge_expired() >= 1);
        store.reconcile_now(&zero, 700);
        assert_eq!(store.peek_now("idle", &limit).used, 700);
        // Reconciling down a counter that no longer exists changes nothing and creates nothing.
        clock.set_millis(T0 + 200_000);
        assert!(store.purge_expired() >= 1);
        let gone = Reservation::new("gone", &limit, 0, T0, 10, 0);
        store.reconcile_now(&gone, 1);
        assert!(!holds(&store, "gone", &limit));
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
        clock.set_millis(T0 + 1_000);
        reserve(&store, "k", &limit, 1).expect("fits");
        clock.set_millis(T0 + 2_000);
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
        clock.set_millis(T0 + 5_000);
        reserve(&store, "k", &limit, 3).expect("fits");
        clock.set_millis(T0 + 6_000);
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
        clock.set_millis(T0 + 60_000);
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
        assert_eq!(first.bucket(), window_start);
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
        clock.set_millis(window_start + 299_999);
        assert_eq!(retry_ms(reserve(&store, "k", &limit, 1)), 1);
        clock.set_millis(window_start + 300_000);
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
        let small = |n: u64| u8::try_from(n).unwrap();
        let month = time::Month::try_from(small(month)).unwrap();
        let date = time::Date::from_calendar_date(i32::try_from(year).unwrap(), month, small(day));
        let t = date
            .unwrap()
            .with_hms(small(h), small(m), small(s))
            .unwrap();
        u64::try_from(t.as_utc().unix_timestamp()).unwrap() * 1_000
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
            clock.set_millis(boundary - 1);
            assert!(reserve(&store, "k", &limit, 1).is_err(), "{period:?}");
            clock.set_millis(boundary);
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
        clock.set_millis(at(2024, 3, 1, 0, 0, 0));
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
        let r = reserve(&store, "k", &limit, 5).expect("fits");
        assert!(!store.is_empty());
        // A 60 s window has 1 s slots; the bucket is the slot's index.
        assert_eq!(r.bucket(), T0 / 1_000);
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
        reserve(&store, "quota-checked", &quota, 0).expect("fits");
        let returned = reserve(&store, "quota-returned", &quota, 3).expect("fits");
        store.reconcile_now(&returned, 0);
        assert_eq!(
            store.purge_expired(),
            3,
            "only the keys that hold no charge are idle"
        );
        clock.set_millis(T0 + 1_000);
        assert_eq!(store.purge_expired(), 100);
        // The fixed windows end at the next minute boundary (T0 is on one).
        clock.set_millis(T0 + 60_000);
        assert_eq!(store.purge_expired(), 101);
        assert!(store.is_empty());
    }

    #[test]
    fn a_clock_stepping_back_does_not_break_the_order() {
        let (clock, store) = store_at(T0 + 10_000);
        let limit = sliding(3, 60);
        reserve(&store, "k", &limit, 1).expect("fits");
        clock.set_millis(T0);
        let back = reserve(&store, "k", &limit, 1).expect("fits");
        assert_eq!(slot_count(&store, "k", &limit), 1);
        assert_eq!(back.charged_at_millis(), T0 + 10_000);
        store.reconcile_now(&back, 2);
        assert!(reserve(&store, "k", &limit, 1).is_err());
        clock.set_millis(T0 + 70_000);
        assert_eq!(store.peek_now("k", &limit).used, 0);
        // A fixed window whose clock went back simply starts that window again.
        let quota = Limit::new(1, Window::Fixed(Duration::from_secs(60)));
        reserve(&store, "q", &quota, 1).expect("fits");
        clock.set_millis(T0);
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
        assert!(
            printed.contains("counters: 1, max_keys: 1000000, shards: "),
            "{printed}"
        );
        assert!(printed.contains("evictions: 0"), "{printed}");
        assert_eq!(reservation.key(), "sk-very-secret-header-value");
        assert_eq!(reservation.limit(), &limit);
    }

    // ---- The cap, eviction and purging ----

    fn capped(max_keys: usize) -> (Arc<ManualClock>, MemoryStore) {
        let clock = Arc::new(ManualClock::from_millis(T0));
        let store = MemoryStore::with_max_keys(clock.clone(), max_keys);
        (clock, store)
    }

    #[test]
    fn at_the_cap_the_least_recently_used_counter_is_evicted() {
        let limit = sliding(10, 60);
        // A store of at most 16 counters compares them all: the eviction order is exact every time.
        for _ in 0..20 {
            let (_clock, store) = capped(4);
            assert_eq!(store.shards.len(), 1);
            let mut reservations = Vec::new();
            for key in ["a", "b", "c", "d"] {
                reservations.push(reserve(&store, key, &limit, 1).expect("fits"));
            }
            reserve(&store, "a", &limit, 1).expect("fits");
            assert_eq!((store.len(), store.evictions()), (4, 0));
            reserve(&store, "e", &limit, 1).expect("fits");
            assert!(!holds(&store, "b", &limit), "b was the least recently used");
            assert_eq!((store.len(), store.evictions()), (4, 1));
            // A reconcile is a use; a peek and a reconcile that changes nothing are not.
            store.reconcile_now(&reservations[2], 3);
            assert_eq!(store.peek_now("d", &limit).used, 1);
            store.reconcile_now(&reservations[3], 1);
            reserve(&store, "f", &limit, 1).expect("fits");
            assert!(!holds(&store, "d", &limit), "d was the least recently used");
            reserve(&store, "g", &limit, 1).expect("fits");
            assert!(!holds(&store, "a", &limit), "then a");
            for key in ["c", "e", "f", "g"] {
                assert!(holds(&store, key, &limit), "{key}");
            }
            assert_eq!((store.len(), store.evictions()), (4, 3));
        }
    }

    #[test]
    fn a_shard_of_sample_size_is_still_exact() {
        let limit = sliding(10, 60);
        for _ in 0..20 {
            let (_clock, store) = capped(EVICTION_SAMPLE);
            for i in 0..EVICTION_SAMPLE {
                reserve(&store, &format!("k{i}"), &limit, 1).expect("fits");
            }
            // Use all but k7 again: k7 is now the least recently used.
            for i in (0..EVICTION_SAMPLE).filter(|&i| i != 7) {
                reserve(&store, &format!("k{i}"), &limit, 1).expect("fits");
            }
            reserve(&store, "new", &limit, 1).expect("fits");
            assert!(!holds(&store, "k7", &limit));
            assert_eq!(store.len(), EVICTION_SAMPLE);
        }
    }

    #[test]
    fn an_evicted_key_starts_afresh() {
        let (_clock, store) = capped(1);
        let limit = sliding(1, 60);
        reserve(&store, "a", &limit, 1).expect("fits");
        assert!(reserve(&store, "a", &limit, 1).is_err());
        reserve(&store, "b", &limit, 1).expect("fits");
        assert_eq!((store.len(), store.evictions()), (1, 1));
        reserve(&store, "a", &limit, 1).expect("a starts afresh");
        assert_eq!(store.evictions(), 2);
        // A cap of 0 is taken as 1.
        let (_clock, none) = capped(0);
        reserve(&none, "a", &limit, 1).expect("fits");
        reserve(&none, "b", &limit, 1).expect("fits");
        assert_eq!((none.len(), none.evictions()), (1, 1));
    }

    #[test]
    fn the_cap_holds_under_many_distinct_keys() {
        let limit = sliding(10, 60);
        let (_clock, store) = capped(100);
        for i in 0..10_000 {
            reserve(&store, &format!("k{i}"), &limit, 1).expect("fits");
            assert!(store.len() <= 100);
        }
        assert_eq!((store.len(), store.evictions()), (100, 9_900));

        // Several shards: each holds its share of the cap, which sums to the cap.
        let clock = Arc::new(ManualClock::from_millis(T0));
        let store = MemoryStore::with_shards(clock, 4_099, 4);
        let caps: Vec<usize> = store.shards.iter().map(|s| read(&s.0).cap).collect();
        assert_eq!(caps, [1_025, 1_025, 1_025, 1_024]);
        for i in 0..20_000 {
            reserve(&store, &format!("k{i}"), &limit, 1).expect("fits");
            if i % 100 == 0 {
                assert!(store.len() <= 4_099);
            }
        }
        assert_eq!(shard_lens(&store), caps);
        assert_eq!(store.len(), 4_099);
        assert_eq!(store.evictions(), 20_000 - 4_099);
        // Every counter is found again through its shard.
        for i in 19_000..20_000 {
            assert!(holds(&store, &format!("k{i}"), &limit), "k{i}");
        }
    }

    #[test]
    fn sampled_eviction_keeps_the_recently_used_counters() {
        // 1,000 counters in one shard: each eviction draws 16 at random.
        let (_clock, store) = capped(1_000);
        assert_eq!(store.shards.len(), 1);
        let limit = sliding(10, 60);
        for i in 0..1_000 {
            reserve(&store, &format!("k{i}"), &limit, 1).expect("fits");
        }
        for i in 0..100 {
            reserve(&store, &format!("new{i}"), &limit, 1).expect("fits");
        }
        assert_eq!((store.len(), store.evictions()), (1_000, 100));
        // Evicting one of the newest 10% needs all 16 draws among them: about 1e-16 per eviction.
        for i in 900..1_000 {
            assert!(holds(&store, &format!("k{i}"), &limit), "k{i}");
        }
        for i in 0..100 {
            assert!(holds(&store, &format!("new{i}"), &limit), "new{i}");
        }
    }

    #[test]
    fn reconciling_an_evicted_counter_changes_nothing() {
        let (clock, store) = capped(2);
        let limit = sliding(100, 60);
        let old = reserve(&store, "a", &limit, 10).expect("fits");
        reserve(&store, "b", &limit, 1).expect("fits");
        reserve(&store, "c", &limit, 1).expect("fits");
        assert!(!holds(&store, "a", &limit));
        // Up: the counter is not recreated (it would evict another).
        store.reconcile_now(&old, 100);
        assert!(!holds(&store, "a", &limit));
        assert_eq!((store.len(), store.evictions()), (2, 1));
        store.reconcile_now(&old, 0);
        assert!(!holds(&store, "a", &limit));

        // The key comes back in the same slot: the old reservation does not touch the new counter.
        clock.set_millis(T0 + 100);
        let new = reserve(&store, "a", &limit, 5).expect("fits");
        assert_eq!(new.bucket(), old.bucket());
        store.reconcile_now(&old, 0);
        assert_eq!(store.peek_now("a", &limit).used, 5);
        store.reconcile_now(&old, 50);
        assert_eq!(store.peek_now("a", &limit).used, 5);
        // A purged (not evicted) counter is still recreated by a reconcile up.
        clock.set_millis(T0 + 60_100);
        assert_eq!(store.purge_expired(), 2);
        store.reconcile_now(&new, 40);
        assert_eq!(store.peek_now("a", &limit).used, 35);
        assert_eq!(store.evictions(), 2);
    }

    #[test]
    fn reserve_never_purges() {
        let (clock, store) = capped(10_000);
        let limit = sliding(10, 1);
        for batch in 0..30u64 {
            clock.set_millis(T0 + batch * 1_000);
            for i in 0..100 {
                reserve(&store, &format!("{batch}-{i}"), &limit, 1).expect("fits");
            }
        }
        // Every earlier batch has expired, yet nothing was dropped until a purge.
        assert_eq!(store.len(), 3_000);
        assert_eq!(store.purge_expired(), 2_900);
        assert_eq!(store.len(), 100);
        assert_eq!(store.evictions(), 0);
    }

    #[test]
    fn purge_keeps_counters_with_live_charges_and_gives_memory_back() {
        let clock = Arc::new(ManualClock::from_millis(T0));
        let store = MemoryStore::with_shards(clock.clone(), 10_000, 1);
        let limit = sliding(10, 1);
        let long = sliding(10, 60);
        for i in 0..1_000 {
            reserve(&store, &format!("k{i}"), &limit, 1).expect("fits");
        }
        let live: Vec<Reservation> = (0..100)
            .map(|i| reserve(&store, &format!("live{i}"), &long, 2).expect("fits"))
            .collect();
        clock.set_millis(T0 + 1_000);
        assert_eq!(store.purge_expired(), 1_000);
        assert_eq!(store.len(), 100);
        {
            let shard = read(&store.shards[0].0);
            assert!(
                (200..=256).contains(&shard.entries.capacity()),
                "{}",
                shard.entries.capacity()
            );
            assert!(shard.index.capacity() >= 200 && shard.index.capacity() < 1_000);
            // The index still points at the right entries after the moves.
            for (key, &i) in &shard.index {
                assert!(Arc::ptr_eq(&key.0, &shard.entries[i].id));
            }
        }
        for (i, r) in live.iter().enumerate() {
            store.reconcile_now(r, 1);
            assert_eq!(store.peek_now(&format!("live{i}"), &long).used, 1);
        }
    }

    #[test]
    fn map_keys_compare_and_hash_as_their_borrowed_lookups() {
        let limit = sliding(10, 60);
        let key = |k: &str, l: &Limit| CounterKey(Arc::new(CounterId::new(k, l)));
        assert!(key("a", &limit) == key("a", &limit));
        assert!(key("a", &limit) != key("b", &limit));
        assert!(key("a", &limit) != key("a", &sliding(11, 60)));
        let state = RandomState::new();
        let lookup = Lookup {
            key: "a",
            limit: &limit,
        };
        assert_eq!(
            state.hash_one(key("a", &limit)),
            state.hash_one(&lookup as &dyn CounterIdView)
        );
    }

    #[test]
    fn shards_scale_with_the_cap_and_the_cpus() {
        assert_eq!(shard_count(1_000_000, 16), 64);
        assert_eq!(shard_count(1_000_000, 2), 8);
        assert_eq!(shard_count(1_000_000, 3), 16);
        assert_eq!(shard_count(1_000_000, 0), 1);
        assert_eq!(shard_count(2_047, 64), 1);
        assert_eq!(shard_count(2_048, 64), 2);
        assert_eq!(shard_count(10_240, 64), 10);
        assert_eq!(shard_count(1, 64), 1);
        let (_clock, store) = capped(1_000_000);
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(store.shards.len(), shard_count(1_000_000, cpus));
        assert_eq!(
            store.shards.iter().map(|s| read(&s.0).cap).sum::<usize>(),
            1_000_000
        );
        let (_clock, default) = store_at(T0);
        assert_eq!(default.max_keys, MemoryStore::DEFAULT_MAX_KEYS);
        // More shards than keys are not made.
        let store = MemoryStore::with_shards(Arc::new(ManualClock::from_millis(T0)), 3, 8);
        assert_eq!(store.shards.len(), 3);
    }
}
