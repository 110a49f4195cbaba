//! Pools of backends, and the live state of each backend.

use std::sync::atomic::AtomicUsize;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::{Breaker, BreakerRule, Headroom};

/// One member of a pool, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The backend's index in the gateway's list of backends (and in the `health` slice given to
    /// [`select`](crate::select)).
    pub backend: usize,
    /// Lower priorities are used first; higher ones only when no member of a lower one can take the request.
    pub priority: u32,
    /// The member's share of its priority group's traffic; at least 1 (a 0 is taken as 1).
    pub weight: u32,
}

/// A pool of backends: members grouped by priority (lowest first), traffic spread within a group by smooth weighted
/// round robin (the algorithm of nginx's upstreams).
///
/// Each group keeps one round-robin counter per member. A pick adds weights only to the members taking part in it
/// (those eligible at that moment) and takes the total of their weights off the winner, so members that sit out a
/// pick neither gain nor lose ground, and the others keep their proportions among themselves.
#[derive(Debug)]
pub struct Pool {
    name: String,
    /// All members, ordered by priority (members of equal priority in their configured order).
    pub(crate) members: Vec<Member>,
    pub(crate) groups: Vec<Group>,
    pub(crate) steering: bool,
    headroom_max_age: Duration,
}

/// The members of one priority: `members[start..start + weights.len()]` of the pool.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) priority: u32,
    pub(crate) start: usize,
    pub(crate) weights: Vec<u32>,
    /// The round-robin counters, one per member of the group.
    current: Mutex<Vec<i64>>,
}

impl Group {
    pub(crate) fn current(&self) -> MutexGuard<'_, Vec<i64>> {
        // A round-robin step only shifts counters; any state it leaves is a valid one.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pool {
    /// A pool named `name` of `members` (any order; a weight of 0 is taken as 1). `steering` turns on steering by
    /// headroom in [`select`](crate::select); `headroom_max_age` is how long this pool's proxy should trust a
    /// headroom reading (see [`Headroom::observe`]).
    pub fn new(
        name: impl Into<String>,
        mut members: Vec<Member>,
        steering: bool,
        headroom_max_age: Duration,
    ) -> Self {
        members.sort_by_key(|member| member.priority);
        for member in &mut members {
            member.weight = member.weight.max(1);
        }
        let mut groups: Vec<Group> = Vec::new();
        for (index, member) in members.iter().enumerate() {
            match groups.last_mut() {
                Some(group) if group.priority == member.priority => {
                    group.weights.push(member.weight)
                }
                _ => groups.push(Group {
                    priority: member.priority,
                    start: index,
                    weights: vec![member.weight],
                    current: Mutex::new(Vec::new()),
                }),
            }
        }
        for group in &mut groups {
            *group.current() = vec![0; group.weights.len()];
        }
        Pool {
            name: name.into(),
            members,
            groups,
            steering,
            headroom_max_age,
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// All members, lowest priority first (equal priorities in their configured order).
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter()
    }

    /// Whether [`select`](crate::select) steers by headroom in this pool.
    pub fn steering(&self) -> bool {
        self.steering
    }

    /// How long a headroom reading from this pool's backends stays good, at most.
    pub fn headroom_max_age(&self) -> Duration {
        self.headroom_max_age
    }

    /// The group holding the member at `index` (in [`members`](Self::members) order).
    pub(crate) fn group_of(&self, index: usize) -> Option<&Group> {
        self.groups
            .iter()
            .find(|group| (group.start..group.start + group.weights.len()).contains(&index))
    }
}

/// The live state of one backend that selection reads: one per configured backend, shared by every pool that
/// names it and by every worker thread.
#[derive(Debug)]
pub struct BackendHealth {
    /// The backend's circuit breaker.
    pub breaker: Breaker,
    /// The rate-limit room it last reported.
    pub headroom: Headroom,
    /// Requests in flight to the backend; the proxy counts them up and down.
    pub in_flight: AtomicUsize,
}

impl BackendHealth {
    /// A healthy backend (breaker closed, room unknown, nothing in flight) judged by `rules`.
    pub fn new(rules: Vec<BreakerRule>) -> Self {
        BackendHealth {
            breaker: Breaker::new(rules),
            headroom: Headroom::default(),
            in_flight: AtomicUsize::new(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn member(backend: usize, priority: u32, weight: u32) -> Member {
        Member {
            backend,
            priority,
            weight,
        }
    }

    #[test]
    fn members_are_ordered_by_priority_keeping_their_order_within_one() {
        let pool = Pool::new(
            "chat",
            vec![
                member(0, 2, 1),
                member(1, 1, 3),
                member(2, 2, 0),
                member(3, 1, 1),
            ],
            true,
            Duration::from_secs(30),
        );
        assert_eq!(pool.name(), "chat");
        assert!(pool.steering());
        assert_eq!(pool.headroom_max_age(), Duration::from_secs(30));
        assert_eq!(
            pool.members().cloned().collect::<Vec<_>>(),
            vec![
                member(1, 1, 3),
                member(3, 1, 1),
                member(0, 2, 1),
                member(2, 2, 1),
            ]
        );
        let groups: Vec<_> = pool
            .groups
            .iter()
            .map(|g| (g.priority, g.start, g.weights.clone(), g.current().clone()))
            .collect();
        assert_eq!(
            groups,
            vec![
                (1, 0, vec![3, 1], vec![0, 0]),
                (2, 2, vec![1, 1], vec![0, 0])
            ]
        );
        for (index, priority) in [(0, 1), (1, 1), (2, 2), (3, 2)] {
            assert_eq!(pool.group_of(index).map(|g| g.priority), Some(priority));
        }
        assert!(pool.group_of(4).is_none());
    }

    #[test]
    fn an_empty_pool() {
        let pool = Pool::new(String::from("none"), Vec::new(), false, Duration::ZERO);
        assert_eq!(pool.members().count(), 0);
        assert!(pool.groups.is_empty());
        assert!(!pool.steering());
        assert!(pool.group_of(0).is_none());
    }

    #[test]
    fn a_backend_starts_healthy() {
        let health = BackendHealth::new(BreakerRule::defaults());
        assert!(health.breaker.available(Duration::ZERO));
        assert_eq!(health.breaker.rules(), BreakerRule::defaults().as_slice());
        assert_eq!(health.headroom.view(Duration::ZERO), None);
        assert_eq!(health.in_flight.load(Ordering::Relaxed), 0);
    }
}
