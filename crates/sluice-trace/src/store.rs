//! The bounded store of request traces that `listTrace` reads.
//!
//! A traced request registers its trace id when it starts ([`TraceStore::begin`]), so
//! that an operator who asks for it early learns that it is still under way, and hands
//! its trace over when the exchange ends ([`TraceStore::finish`]). The store keeps the
//! most recent finished traces within a count, a byte budget and a time to live.
//!
//! Every operation takes one short lock and does amortised constant work, so the request
//! path is never held up. Time is a monotonic [`Duration`] passed in by the caller (the
//! time since the process started), which keeps the store free of clocks and testable.
//!
//! Both the finished traces and the pending marks are kept in a map by id plus a queue in
//! insertion order. Each entry carries a sequence number; a queue slot whose number no
//! longer matches the map (the trace was replaced, finished or abandoned) is stale and is
//! skipped. Stale slots are dropped when they reach the front, and the queue is compacted
//! when stale slots outnumber live ones, so it stays proportional to the live entries.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// The bounds of a [`TraceStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceLimits {
    /// The most finished traces kept, and also the most requests traced at once
    /// (pending marks). Zero disables tracing.
    pub max_traces: usize,
    /// The most bytes (as estimated by the caller) of finished traces kept.
    pub max_bytes: usize,
    /// How long a finished trace is kept after it finished.
    pub ttl: Duration,
    /// How long a pending mark is believed after it began: longer than any
    /// request runs (a long stream must not lose its mark), so that only a
    /// mark whose request never ended at all is ever swept.
    pub pending_ttl: Duration,
}

/// The answer to a lookup by trace id.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<T> {
    /// The finished trace.
    Found(Arc<T>),
    /// The request is still under way: its trace is not finished yet.
    Pending,
    /// No such trace: never begun, abandoned, expired, evicted or too large to keep.
    Unknown,
}

/// Counters of a [`TraceStore`], for metrics and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Finished traces held now.
    pub traces: usize,
    /// Bytes of the finished traces held now.
    pub bytes: usize,
    /// Requests begun and neither finished nor abandoned (expired marks may still be
    /// counted until they are next swept).
    pub pending: usize,
    /// Finished traces dropped to make room (over the count or the byte budget). Traces
    /// that expire are not counted.
    pub evicted: u64,
    /// Finished traces that could not be kept at all: larger than the byte budget, or
    /// the store holds no traces (`max_traces` is zero).
    pub rejected: u64,
}

/// A finished trace held in the store.
struct Finished<T> {
    value: Arc<T>,
    finished_at: Duration,
    bytes: usize,
    seq: u64,
}

/// A pending mark: when the request began.
struct Pending {
    begun_at: Duration,
    seq: u64,
}

/// Queues are compacted when they hold more than twice the live entries plus this slack.
const COMPACT_SLACK: usize = 16;

/// Everything behind the lock.
struct Inner<T> {
    finished: HashMap<Arc<str>, Finished<T>>,
    /// Finished ids, oldest first, with the sequence number they were stored under.
    finished_order: VecDeque<(Arc<str>, u64)>,
    pending: HashMap<Arc<str>, Pending>,
    /// Pending ids, oldest first, with the sequence number they were begun under.
    pending_order: VecDeque<(Arc<str>, u64)>,
    bytes: usize,
    next_seq: u64,
    evicted: u64,
    rejected: u64,
}

/// The bounded store of request traces, shared by the request path and the management API.
///
/// `T` is the trace type; it is handed out as `Arc<T>` so readers never copy it.
pub struct TraceStore<T> {
    limits: TraceLimits,
    inner: Mutex<Inner<T>>,
    /// Woken on every finish and abandon, for [`TraceStore::get_waiting`].
    changed: Notify,
}

impl<T> fmt::Debug for TraceStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceStore")
            .field("limits", &self.limits)
            .field("stats", &self.lock().stats())
            .finish()
    }
}

/// Whether something that happened at `since` is older than `ttl` at `now`.
fn expired(since: Duration, now: Duration, ttl: Duration) -> bool {
    now.saturating_sub(since) > ttl
}

impl<T> Inner<T> {
    fn stats(&self) -> StoreStats {
        StoreStats {
            traces: self.finished.len(),
            bytes: self.bytes,
            pending: self.pending.len(),
            evicted: self.evicted,
            rejected: self.rejected,
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Removes a finished trace by id, keeping the byte count exact, and moves it to `gone`
    /// (freed by the caller once the lock is released). Its queue slot turns stale.
    fn remove_finished(&mut self, id: &str, gone: &mut Vec<Finished<T>>) {
        if let Some(old) = self.finished.remove(id) {
            self.bytes -= old.bytes;
            gone.push(old);
        }
    }

    /// Removes the oldest finished trace (skipping stale queue slots) into `gone`. False when
    /// there is none.
    fn pop_oldest_finished(&mut self, gone: &mut Vec<Finished<T>>) -> bool {
        while let Some((id, seq)) = self.finished_order.pop_front() {
            if self.finished.get(&id).is_some_and(|f| f.seq == seq) {
                self.remove_finished(&id, gone);
                return true;
            }
        }
        false
    }

    /// Moves expired finished traces into `gone`, and drops stale queue slots, from the front
    /// of the queue.
    fn sweep_finished(&mut self, now: Duration, ttl: Duration, gone: &mut Vec<Finished<T>>) {
        while let Some((id, seq)) = self.finished_order.front() {
            match self.finished.get(id) {
                Some(f) if f.seq == *seq => {
                    if !expired(f.finished_at, now, ttl) {
                        break;
                    }
                    let id = Arc::clone(id);
                    self.remove_finished(&id, gone);
                }
                _ => {}
            }
            self.finished_order.pop_front();
        }
    }

    /// Drops expired pending marks and stale queue slots from the front of the queue.
    fn sweep_pending(&mut self, now: Duration, ttl: Duration) {
        while let Some((id, seq)) = self.pending_order.front() {
            match self.pending.get(id) {
                Some(p) if p.seq == *seq => {
                    if !expired(p.begun_at, now, ttl) {
                        break;
                    }
                    self.pending.remove(id);
                }
                _ => {}
            }
            self.pending_order.pop_front();
        }
    }

    /// Drops every stale slot from both queues once stale slots outnumber live entries, so
    /// the queues stay proportional to what is held however entries come and go.
    fn compact(&mut self) {
        if self.finished_order.len() > 2 * self.finished.len() + COMPACT_SLACK {
            let finished = &self.finished;
            self.finished_order
                .retain(|(id, seq)| finished.get(id).is_some_and(|f| f.seq == *seq));
        }
        if self.pending_order.len() > 2 * self.pending.len() + COMPACT_SLACK {
            let pending = &self.pending;
            self.pending_order
                .retain(|(id, seq)| pending.get(id).is_some_and(|p| p.seq == *seq));
        }
    }
}

impl<T: Send + Sync> TraceStore<T> {
    /// An empty store with these bounds.
    pub fn new(limits: TraceLimits) -> Self {
        TraceStore {
            limits,
            inner: Mutex::new(Inner {
                finished: HashMap::new(),
                finished_order: VecDeque::new(),
                pending: HashMap::new(),
                pending_order: VecDeque::new(),
                bytes: 0,
                next_seq: 0,
                evicted: 0,
                rejected: 0,
            }),
            changed: Notify::new(),
        }
    }

    /// A traced request starts: mark `id` pending from `now`.
    ///
    /// Returns false, and registers nothing, when `max_traces` requests are already pending;
    /// the request should then go untraced. Beginning an id that is already pending restarts
    /// its mark and always succeeds.
    pub fn begin(&self, id: &str, now: Duration) -> bool {
        let mut inner = self.lock();
        inner.sweep_pending(now, self.limits.pending_ttl);
        let key = match inner.pending.get_key_value(id) {
            Some((key, _)) => Arc::clone(key),
            None if inner.pending.len() < self.limits.max_traces => Arc::from(id),
            None => return false,
        };
        let seq = inner.next_seq();
        inner
            .pending
            .insert(Arc::clone(&key), Pending { begun_at: now, seq });
        inner.pending_order.push_back((key, seq));
        inner.compact();
        true
    }

    /// The exchange ended: store its trace, taking about `bytes` of memory, as finished at `now`.
    ///
    /// Removes the pending mark and drops expired traces. Then, to make room, evicts the
    /// oldest finished traces until the new one fits within `max_traces` and `max_bytes`.
    /// A trace larger than `max_bytes` on its own is not stored (it counts as rejected) and
    /// its id then looks [`Lookup::Unknown`]. Finishing an id a second time replaces the
    /// first trace, which then counts as finished at `now`.
    pub fn finish(&self, id: &str, value: T, bytes: usize, now: Duration) {
        // Traces that leave the store are freed after the lock is released: freeing a trace
        // is costly (it holds many small values), and others wait for the lock meanwhile.
        let mut gone = Vec::new();
        {
            let mut inner = self.lock();
            inner.pending.remove(id);
            inner.sweep_pending(now, self.limits.pending_ttl);
            inner.sweep_finished(now, self.limits.ttl, &mut gone);
            // The earlier trace under this id goes whatever happens to the new one.
            inner.remove_finished(id, &mut gone);
            if bytes > self.limits.max_bytes || self.limits.max_traces == 0 {
                inner.rejected += 1;
            } else {
                let room = self.limits.max_bytes - bytes;
                while (inner.finished.len() >= self.limits.max_traces || inner.bytes > room)
                    && inner.pop_oldest_finished(&mut gone)
                {
                    inner.evicted += 1;
                }
                let seq = inner.next_seq();
                let id: Arc<str> = Arc::from(id);
                inner.finished.insert(
                    Arc::clone(&id),
                    Finished {
                        value: Arc::new(value),
                        finished_at: now,
                        bytes,
                        seq,
                    },
                );
                inner.finished_order.push_back((id, seq));
                inner.bytes += bytes;
            }
            inner.compact();
        }
        drop(gone);
        self.changed.notify_waiters();
    }

    /// The request ended without a trace to keep: forget its pending mark.
    pub fn abandon(&self, id: &str) {
        {
            let mut inner = self.lock();
            inner.pending.remove(id);
            inner.compact();
        }
        self.changed.notify_waiters();
    }

    /// Looks `id` up at `now`.
    ///
    /// [`Lookup::Pending`] while the request is under way (begun, neither finished nor
    /// abandoned, and begun no longer than `pending_ttl` ago); this wins over an earlier finished
    /// trace under the same id. Otherwise [`Lookup::Found`] with the finished trace if it
    /// finished no longer than `ttl` ago, else [`Lookup::Unknown`].
    pub fn get(&self, id: &str, now: Duration) -> Lookup<T> {
        let ttl = self.limits.ttl;
        let pending_ttl = self.limits.pending_ttl;
        // Declared before the guard, so dropped after it: expired traces are freed once the
        // lock is released.
        let mut gone = Vec::new();
        let mut inner = self.lock();
        inner.sweep_pending(now, pending_ttl);
        inner.sweep_finished(now, ttl, &mut gone);
        if inner
            .pending
            .get(id)
            .is_some_and(|p| !expired(p.begun_at, now, pending_ttl))
        {
            return Lookup::Pending;
        }
        match inner.finished.get(id) {
            Some(f) if !expired(f.finished_at, now, ttl) => Lookup::Found(Arc::clone(&f.value)),
            _ => Lookup::Unknown,
        }
    }

    /// Looks `id` up, first waiting up to `wait` for it to stop being pending.
    ///
    /// Returns as soon as the lookup is not [`Lookup::Pending`]; after `wait` it returns
    /// whatever the lookup then says (possibly still `Pending`). `now` gives the monotonic
    /// time used for the lookups; the wait itself is measured with Tokio's clock, so this
    /// must run inside a Tokio runtime with its time driver enabled.
    pub async fn get_waiting(
        &self,
        id: &str,
        wait: Duration,
        now: impl Fn() -> Duration,
    ) -> Lookup<T> {
        let start = tokio::time::Instant::now();
        loop {
            // Registered before the check, so a finish between the check and the wait
            // still wakes us.
            let changed = self.changed.notified();
            let lookup = self.get(id, now());
            if !matches!(lookup, Lookup::Pending) {
                return lookup;
            }
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() || tokio::time::timeout(left, changed).await.is_err() {
                return self.get(id, now());
            }
        }
    }

    /// The store's counters now.
    pub fn stats(&self) -> StoreStats {
        self.lock().stats()
    }
}

impl<T> TraceStore<T> {
    /// The lock. A panic elsewhere while it was held leaves the data consistent enough to
    /// carry on, so poisoning is ignored rather than spread to the request path.
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn store(max_traces: usize, max_bytes: usize, ttl: u64) -> TraceStore<String> {
        TraceStore::new(TraceLimits {
            max_traces,
            max_bytes,
            ttl: S(ttl),
            pending_ttl: S(ttl),
        })
    }

    /// A trace that notes whether the store's lock was free when it was freed.
    struct Probe {
        store: Arc<std::sync::OnceLock<Arc<TraceStore<Probe>>>>,
        freed_under_lock: Arc<std::sync::atomic::AtomicUsize>,
        freed: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            use std::sync::atomic::Ordering::SeqCst;
            self.freed.fetch_add(1, SeqCst);
            if let Some(s) = self.store.get()
                && s.inner.try_lock().is_err()
            {
                self.freed_under_lock.fetch_add(1, SeqCst);
            }
        }
    }

    #[test]
    fn traces_leaving_the_store_are_freed_outside_its_lock() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let cell = Arc::new(std::sync::OnceLock::new());
        let under = Arc::new(AtomicUsize::new(0));
        let freed = Arc::new(AtomicUsize::new(0));
        let store = Arc::new(TraceStore::new(TraceLimits {
            max_traces: 2,
            max_bytes: 100,
            ttl: S(10),
            pending_ttl: S(10),
        }));
        let _ = cell.set(Arc::clone(&store));
        let probe = || Probe {
            store: Arc::clone(&cell),
            freed_under_lock: Arc::clone(&under),
            freed: Arc::clone(&freed),
        };
        // Evicted for count, replaced under the same id, expired on finish and on get.
        store.finish("a", probe(), 1, S(0));
        store.finish("b", probe(), 1, S(0));
        store.finish("c", probe(), 1, S(0));
        store.finish("c", probe(), 1, S(1));
        store.finish("d", probe(), 1, S(20));
        store.finish("e", probe(), 1, S(21));
        assert!(matches!(store.get("e", S(40)), Lookup::Unknown));
        assert_eq!(freed.load(SeqCst), 6);
        assert_eq!(under.load(SeqCst), 0, "freed while the lock was held");
        // Too large to keep: freed at once, outside the lock too.
        store.finish("f", probe(), 1000, S(40));
        assert_eq!(freed.load(SeqCst), 7);
        assert_eq!(under.load(SeqCst), 0);
    }

    #[test]
    fn a_long_request_keeps_its_pending_mark_past_the_ttl() {
        let s: TraceStore<String> = TraceStore::new(TraceLimits {
            max_traces: 4,
            max_bytes: 1000,
            ttl: S(60),
            pending_ttl: S(86_400),
        });
        assert!(s.begin("stream", S(0)));
        // A stream running for an hour is still pending, not unknown.
        assert_eq!(s.get("stream", S(3600)), Lookup::Pending);
        s.finish("stream", "t".into(), 1, S(3600));
        assert_eq!(found(s.get("stream", S(3660))), "t");
        assert_eq!(s.get("stream", S(3661)), Lookup::Unknown);
        // A mark whose request never ended goes after pending_ttl.
        assert!(s.begin("lost", S(0)));
        assert_eq!(s.get("lost", S(86_400)), Lookup::Pending);
        assert_eq!(s.get("lost", S(86_401)), Lookup::Unknown);
        assert_eq!(s.stats().pending, 0);
    }

    fn found(l: Lookup<String>) -> String {
        match l {
            Lookup::Found(t) => t.to_string(),
            other => panic!("expected a trace, got {other:?}"),
        }
    }

    fn finished_slots(s: &TraceStore<String>) -> usize {
        s.lock().finished_order.len()
    }

    fn pending_slots(s: &TraceStore<String>) -> usize {
        s.lock().pending_order.len()
    }

    #[test]
    fn lookups_follow_a_request() {
        let s = store(10, 1000, 60);
        assert_eq!(s.get("a", S(0)), Lookup::Unknown);
        assert!(s.begin("a", S(0)));
        assert_eq!(s.get("a", S(1)), Lookup::Pending);
        assert_eq!(s.get("b", S(1)), Lookup::Unknown);
        s.finish("a", "trace a".into(), 10, S(2));
        assert_eq!(found(s.get("a", S(3))), "trace a");
        assert_eq!(
            s.stats(),
            StoreStats {
                traces: 1,
                bytes: 10,
                pending: 0,
                evicted: 0,
                rejected: 0
            }
        );
    }

    #[test]
    fn finish_without_begin_is_stored() {
        let s = store(10, 1000, 60);
        s.finish("a", "x".into(), 1, S(0));
        assert_eq!(found(s.get("a", S(0))), "x");
    }

    #[test]
    fn abandon_forgets_the_pending_mark() {
        let s = store(10, 1000, 60);
        assert!(s.begin("a", S(0)));
        assert!(s.begin("b", S(0)));
        s.abandon("a");
        assert_eq!(s.get("a", S(1)), Lookup::Unknown);
        assert_eq!(s.get("b", S(1)), Lookup::Pending);
        assert_eq!(s.stats().pending, 1);
        s.abandon("never begun");
        assert_eq!(s.stats().pending, 1);
    }

    #[test]
    fn count_bound_evicts_the_oldest() {
        let s = store(3, 1000, 60);
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            s.finish(id, id.into(), 10, S(i as u64));
        }
        assert_eq!(s.get("a", S(5)), Lookup::Unknown);
        for id in ["b", "c", "d"] {
            assert_eq!(found(s.get(id, S(5))), id);
        }
        let st = s.stats();
        assert_eq!((st.traces, st.bytes, st.evicted), (3, 30, 1));
        s.finish("e", "e".into(), 10, S(6));
        assert_eq!(s.get("b", S(6)), Lookup::Unknown);
        assert_eq!(s.stats().evicted, 2);
    }

    #[test]
    fn byte_bound_evicts_the_oldest_until_the_new_one_fits() {
        let s = store(100, 100, 60);
        s.finish("a", "a".into(), 30, S(0));
        s.finish("b", "b".into(), 30, S(1));
        s.finish("c", "c".into(), 40, S(2));
        // Exactly the budget: all kept.
        assert_eq!(s.stats().bytes, 100);
        assert_eq!(s.stats().evicted, 0);
        s.finish("d", "d".into(), 1, S(3));
        assert_eq!(s.get("a", S(3)), Lookup::Unknown);
        assert_eq!(found(s.get("b", S(3))), "b");
        assert_eq!(s.stats().bytes, 71);
        // Needs two evictions to fit.
        s.finish("e", "e".into(), 60, S(4));
        assert_eq!(s.get("b", S(4)), Lookup::Unknown);
        assert_eq!(s.get("c", S(4)), Lookup::Unknown);
        assert_eq!(found(s.get("d", S(4))), "d");
        let st = s.stats();
        assert_eq!((st.traces, st.bytes, st.evicted), (2, 61, 3));
    }

    #[test]
    fn a_trace_larger_than_the_budget_is_rejected() {
        let s = store(10, 100, 60);
        assert!(s.begin("big", S(0)));
        s.finish("big", "big".into(), 101, S(1));
        assert_eq!(s.get("big", S(1)), Lookup::Unknown);
        assert_eq!(
            s.stats(),
            StoreStats {
                traces: 0,
                bytes: 0,
                pending: 0,
                evicted: 0,
                rejected: 1
            }
        );
        // Exactly the budget is fine.
        s.finish("full", "full".into(), 100, S(2));
        assert_eq!(found(s.get("full", S(2))), "full");
        // An oversize second finish drops the first trace too.
        s.finish("full", "again".into(), 101, S(3));
        assert_eq!(s.get("full", S(3)), Lookup::Unknown);
        assert_eq!(s.stats().bytes, 0);
        assert_eq!(s.stats().traces, 0);
        assert_eq!(s.stats().rejected, 2);
    }

    #[test]
    fn a_store_of_no_traces_keeps_nothing() {
        let s = store(0, 100, 60);
        assert!(!s.begin("a", S(0)));
        s.finish("a", "a".into(), 1, S(0));
        assert_eq!(s.get("a", S(0)), Lookup::Unknown);
        let st = s.stats();
        assert_eq!(
            (st.traces, st.pending, st.rejected, st.evicted),
            (0, 0, 1, 0)
        );
    }

    #[test]
    fn finished_traces_expire_after_the_ttl() {
        let s = store(10, 1000, 10);
        s.finish("a", "a".into(), 5, S(5));
        s.finish("b", "b".into(), 7, S(8));
        assert_eq!(found(s.get("a", S(15))), "a"); // exactly the ttl: kept
        assert_eq!(s.get("a", S(16)), Lookup::Unknown);
        // Removed, not just hidden.
        assert_eq!(s.stats().traces, 1);
        assert_eq!(s.stats().bytes, 7);
        assert_eq!(found(s.get("b", S(18))), "b");
        // A finish sweeps too, and expiry is not eviction.
        s.finish("c", "c".into(), 1, S(19));
        let st = s.stats();
        assert_eq!((st.traces, st.bytes, st.evicted), (1, 1, 0));
    }

    #[test]
    fn expiry_is_checked_even_out_of_order() {
        // A clock that goes backwards leaves a newer entry behind an older one in the
        // queue; the lookup still checks the entry it returns.
        let s = store(10, 1000, 10);
        s.finish("late", "late".into(), 1, S(100));
        s.finish("early", "early".into(), 1, S(50));
        assert_eq!(s.get("early", S(70)), Lookup::Unknown);
        assert_eq!(found(s.get("late", S(70))), "late");
    }

    #[test]
    fn pending_marks_expire_after_the_ttl() {
        let s = store(10, 1000, 10);
        assert!(s.begin("a", S(0)));
        assert!(s.begin("b", S(5)));
        assert_eq!(s.get("a", S(10)), Lookup::Pending); // exactly the ttl
        assert_eq!(s.get("a", S(11)), Lookup::Unknown);
        assert_eq!(s.stats().pending, 1);
        assert_eq!(s.get("b", S(15)), Lookup::Pending);
        assert_eq!(s.get("b", S(16)), Lookup::Unknown);
        assert_eq!(s.stats().pending, 0);
    }

    #[test]
    fn a_pending_mark_expires_even_out_of_order() {
        let s = store(10, 1000, 10);
        assert!(s.begin("late", S(100)));
        assert!(s.begin("early", S(50)));
        assert_eq!(s.get("early", S(70)), Lookup::Unknown);
        assert_eq!(s.get("late", S(70)), Lookup::Pending);
    }

    #[test]
    fn a_trace_finished_late_counts_its_ttl_from_the_finish() {
        let s = store(10, 1000, 10);
        assert!(s.begin("a", S(0)));
        s.finish("a", "a".into(), 1, S(9));
        assert_eq!(found(s.get("a", S(19))), "a");
        assert_eq!(s.get("a", S(20)), Lookup::Unknown);
    }

    #[test]
    fn a_second_finish_replaces_the_first() {
        let s = store(2, 1000, 10);
        s.finish("a", "first".into(), 10, S(0));
        s.finish("b", "b".into(), 20, S(1));
        s.finish("a", "second".into(), 30, S(2));
        assert_eq!(found(s.get("a", S(2))), "second");
        let st = s.stats();
        assert_eq!((st.traces, st.bytes, st.evicted), (2, 50, 0));
        // "a" is now newer than "b", so "b" goes first.
        s.finish("c", "c".into(), 1, S(3));
        assert_eq!(s.get("b", S(3)), Lookup::Unknown);
        assert_eq!(found(s.get("a", S(3))), "second");
        assert_eq!(s.stats().bytes, 31);
        // And its ttl runs from the second finish.
        assert_eq!(found(s.get("a", S(12))), "second");
        assert_eq!(s.get("a", S(13)), Lookup::Unknown);
        assert_eq!(s.stats().bytes, 1);
    }

    #[test]
    fn a_replaced_trace_leaves_no_stale_slot_behind_to_evict() {
        // Count bound 2: the stale slot of the first "a" must not count as an eviction.
        let s = store(2, 1000, 60);
        s.finish("a", "a1".into(), 1, S(0));
        s.finish("a", "a2".into(), 1, S(1));
        s.finish("b", "b".into(), 1, S(2));
        assert_eq!(s.stats().evicted, 0);
        s.finish("c", "c".into(), 1, S(3));
        assert_eq!(s.get("a", S(3)), Lookup::Unknown);
        assert_eq!(found(s.get("b", S(3))), "b");
        assert_eq!(s.stats().evicted, 1);
        assert_eq!(s.stats().traces, 2);
    }

    #[test]
    fn stale_slots_in_front_do_not_stop_expiry() {
        let s = store(10, 1000, 10);
        s.finish("a", "a1".into(), 1, S(0));
        s.finish("b", "b".into(), 1, S(1));
        s.finish("a", "a2".into(), 1, S(2));
        // The first slot is stale; "b" behind it has expired and goes.
        assert_eq!(s.get("zzz", S(12)), Lookup::Unknown);
        assert_eq!(s.stats().traces, 1);
        assert_eq!(finished_slots(&s), 1);
        assert_eq!(found(s.get("a", S(12))), "a2");
    }

    #[test]
    fn the_pending_set_is_bounded() {
        let s = store(2, 1000, 10);
        assert!(s.begin("a", S(0)));
        assert!(s.begin("b", S(1)));
        assert!(!s.begin("c", S(2)));
        assert_eq!(s.get("c", S(2)), Lookup::Unknown);
        assert_eq!(s.stats().pending, 2);
        // Beginning a pending id again is no new mark.
        assert!(s.begin("b", S(3)));
        s.abandon("a");
        assert!(s.begin("c", S(4)));
        assert!(!s.begin("d", S(4)));
        s.finish("c", "c".into(), 1, S(5));
        assert!(s.begin("d", S(5)));
        // Expired marks make room: "b" restarted at 3, "d" began at 5.
        assert!(!s.begin("e", S(13)));
        assert!(s.begin("e", S(14)));
        assert_eq!(s.get("b", S(14)), Lookup::Unknown);
        assert_eq!(s.get("d", S(14)), Lookup::Pending);
    }

    #[test]
    fn a_restarted_mark_in_front_does_not_stop_the_sweep() {
        let s = store(10, 1000, 10);
        assert!(s.begin("a", S(0)));
        assert!(s.begin("b", S(1)));
        assert!(s.begin("a", S(5)));
        // The first slot of "a" is stale; "b" behind it has expired and goes.
        assert_eq!(s.get("zzz", S(12)), Lookup::Unknown);
        assert_eq!(s.stats().pending, 1);
        assert_eq!(pending_slots(&s), 1);
        assert_eq!(s.get("a", S(12)), Lookup::Pending);
    }

    #[test]
    fn beginning_again_restarts_the_mark() {
        let s = store(10, 1000, 10);
        assert!(s.begin("a", S(0)));
        assert!(s.begin("a", S(8)));
        assert_eq!(s.get("a", S(18)), Lookup::Pending);
        assert_eq!(s.get("a", S(19)), Lookup::Unknown);
    }

    #[test]
    fn a_pending_mark_hides_an_earlier_trace_of_the_same_id() {
        let s = store(10, 1000, 60);
        s.finish("a", "old".into(), 1, S(0));
        assert!(s.begin("a", S(1)));
        assert_eq!(s.get("a", S(1)), Lookup::Pending);
        s.abandon("a");
        assert_eq!(found(s.get("a", S(2))), "old");
        assert!(s.begin("a", S(3)));
        s.finish("a", "new".into(), 1, S(4));
        assert_eq!(found(s.get("a", S(4))), "new");
    }

    #[test]
    fn queues_stay_proportional_to_what_is_held() {
        let s = store(100, 1_000_000, 1000);
        // A long request at the front of both queues keeps stale slots from reaching it.
        assert!(s.begin("long", S(0)));
        s.finish("kept", "kept".into(), 1, S(0));
        for i in 0..1000 {
            let id = format!("r{}", i % 3);
            assert!(s.begin(&id, S(1)));
            assert!(s.begin(&id, S(1)));
            s.finish(&id, id.clone(), 1, S(1));
            s.finish(&id, id.clone(), 1, S(1));
            assert!(s.begin("gone", S(1)));
            s.abandon("gone");
        }
        let st = s.stats();
        assert_eq!((st.traces, st.pending, st.bytes), (4, 1, 4));
        assert!(finished_slots(&s) <= 2 * 4 + COMPACT_SLACK + 1);
        assert!(pending_slots(&s) <= 2 + COMPACT_SLACK + 1);
        // Live slots survive compaction.
        assert_eq!(s.get("long", S(2)), Lookup::Pending);
        assert_eq!(found(s.get("kept", S(2))), "kept");
        assert_eq!(found(s.get("r0", S(2))), "r0");
        // And keep their order: with a count bound, the oldest goes first.
        let s2 = store(3, 1_000_000, 1000);
        s2.finish("first", "first".into(), 1, S(0));
        for i in 0..100 {
            s2.finish("x", "x".into(), 1, S(i));
        }
        s2.finish("y", "y".into(), 1, S(101));
        s2.finish("z", "z".into(), 1, S(102));
        assert_eq!(s2.get("first", S(102)), Lookup::Unknown);
        assert_eq!(found(s2.get("x", S(102))), "x");
    }

    #[test]
    fn compaction_waits_for_enough_stale_slots() {
        let s = store(100, 1_000_000, 1000);
        for id in ["front", "middle"] {
            s.finish(id, id.into(), 1, S(0));
            assert!(s.begin(id, S(0)));
        }
        // Three live entries each, so up to 2 * 3 + slack slots are allowed.
        let most = 2 * 3 + COMPACT_SLACK;
        for _ in 0..most - 2 {
            s.finish("x", "x".into(), 1, S(0));
            assert!(s.begin("p", S(0)));
        }
        assert_eq!(finished_slots(&s), most);
        assert_eq!(pending_slots(&s), most);
        // One more, and only the live slots remain.
        s.finish("x", "x".into(), 1, S(0));
        assert!(s.begin("p", S(0)));
        assert_eq!(finished_slots(&s), 3);
        assert_eq!(pending_slots(&s), 3);
    }

    #[test]
    fn stats_and_debug() {
        let s = store(10, 1000, 60);
        assert_eq!(s.stats(), StoreStats::default());
        assert!(s.begin("p", S(0)));
        s.finish("a", "a".into(), 7, S(0));
        let text = format!("{s:?}");
        assert!(text.contains("max_traces: 10"), "{text}");
        assert!(text.contains("traces: 1"), "{text}");
        assert!(text.contains("pending: 1"), "{text}");
    }

    fn shared(max_traces: usize) -> (Arc<TraceStore<String>>, impl Fn() -> Duration + Clone) {
        let origin = tokio::time::Instant::now();
        (Arc::new(store(max_traces, 1000, 3600)), move || {
            origin.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn get_waiting_returns_at_once_when_not_pending() {
        let (s, now) = shared(10);
        assert_eq!(s.get_waiting("a", S(5), now.clone()).await, Lookup::Unknown);
        s.finish("a", "a".into(), 1, now());
        assert_eq!(found(s.get_waiting("a", S(5), now.clone()).await), "a");
    }

    #[tokio::test(start_paused = true)]
    async fn get_waiting_is_woken_by_the_finish() {
        let (s, now) = shared(10);
        assert!(s.begin("a", now()));
        let writer = {
            let (s, now) = (Arc::clone(&s), now.clone());
            tokio::spawn(async move {
                tokio::time::sleep(S(1)).await;
                // Another request's finish wakes the waiter, which waits on.
                s.finish("other", "other".into(), 1, now());
                tokio::time::sleep(S(1)).await;
                s.finish("a", "a".into(), 1, now());
            })
        };
        assert_eq!(found(s.get_waiting("a", S(3600), now).await), "a");
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn get_waiting_is_woken_by_an_abandon() {
        let (s, now) = shared(10);
        assert!(s.begin("a", now()));
        let writer = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                tokio::time::sleep(S(1)).await;
                s.abandon("a");
            })
        };
        assert_eq!(s.get_waiting("a", S(3600), now).await, Lookup::Unknown);
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn get_waiting_gives_up_after_the_wait() {
        let (s, now) = shared(10);
        assert!(s.begin("a", now()));
        assert_eq!(s.get_waiting("a", S(2), now.clone()).await, Lookup::Pending);
        assert_eq!(
            s.get_waiting("a", Duration::ZERO, now.clone()).await,
            Lookup::Pending
        );
        // Even with a clock that never moves and other requests finishing meanwhile.
        let writer = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                for i in 0..5 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    s.finish(&format!("o{i}"), "o".into(), 1, S(0));
                }
            })
        };
        assert_eq!(s.get_waiting("a", S(1), || S(0)).await, Lookup::Pending);
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn get_waiting_sees_a_result_that_lands_as_the_wait_ends() {
        let (s, now) = shared(10);
        assert!(s.begin("a", now()));
        let writer = {
            let (s, now) = (Arc::clone(&s), now.clone());
            tokio::spawn(async move {
                tokio::time::sleep(S(2)).await;
                s.finish("a", "a".into(), 1, now());
            })
        };
        // Whichever of the timer and the finish comes first, the final lookup is taken
        // after the wait, so a finished trace is never reported as pending past it.
        let got = s.get_waiting("a", S(2), now.clone()).await;
        writer.await.unwrap();
        assert!(matches!(got, Lookup::Found(_) | Lookup::Pending), "{got:?}");
        assert_eq!(found(s.get_waiting("a", S(2), now).await), "a");
    }

    #[test]
    fn many_threads_share_a_store() {
        let s = Arc::new(store(50, 1_000_000, 3600));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let id = format!("{t}-{i}");
                        if s.begin(&id, S(0)) {
                            s.finish(&id, id.clone(), 3, S(0));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = s.stats();
        assert_eq!((st.traces, st.bytes, st.pending), (50, 150, 0));
        assert_eq!(st.evicted, 2000 - 50);
    }
}
