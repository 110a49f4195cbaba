//! The memory request bodies held for replay may use together
//! (`server.body_buffer_bytes`), and what one request holds of it.
//!
//! A request's hold lives in its context (no box: it is two words) and is
//! given back when the context drops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The memory request bodies held for replay may use together
/// (`server.body_buffer_bytes`).
#[derive(Debug)]
pub struct BodyBudget {
    limit: u64,
    used: AtomicU64,
}

impl BodyBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(BodyBudget {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Hold `n` bytes until the guard drops; `None` when they do not fit.
    pub fn reserve(self: &Arc<Self>, n: u64) -> Option<BodyHold> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .ok()?;
        Some(BodyHold {
            budget: self.clone(),
            bytes: n,
        })
    }
}

/// Bytes of [`BodyBudget`] held by one request's body; given back on drop.
#[derive(Debug)]
pub struct BodyHold {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl BodyHold {
    /// Give back what is held beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.budget
                .used
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
        }
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_budget_holds_and_gives_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.reserve(60).unwrap();
        assert!(budget.reserve(41).is_none());
        let b = budget.reserve(40).unwrap();
        assert_eq!(budget.used(), 100);
        a.shrink_to(10);
        assert_eq!(budget.used(), 50);
        a.shrink_to(20);
        assert_eq!(budget.used(), 50, "shrinking never grows");
        drop(b);
        assert_eq!(budget.used(), 10);
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(BodyBudget::new(0).reserve(1).is_none());
        assert!(BodyBudget::new(0).reserve(0).is_some());
    }
}
