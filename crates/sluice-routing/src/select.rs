//! Choosing a backend for one attempt of a request.

use std::time::Duration;

use smallvec::SmallVec;

use crate::{Admit, BackendHealth, Fit, Member, Pool};

/// Indices of a pool's members, kept on the stack for pools of up to 8
/// members (selection runs for every attempt and allocates nothing then).
pub type Members = SmallVec<[usize; 8]>;

/// One flag or fit per member of a pool, on the stack like [`Members`].
type PerMember<T> = SmallVec<[T; 8]>;

/// What a request needs from a backend, for steering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    /// The tokens the request is expected to use, when known.
    pub tokens: Option<u64>,
}

/// The answer of [`select`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Send the attempt to this backend. `probe`: the attempt is the backend's half-open probe (report its outcome
    /// to the breaker). `steered`: a member that would otherwise have been preferred was passed over because its
    /// headroom could not fit the request.
    Backend {
        /// The backend's index.
        backend: usize,
        /// Whether this attempt is the breaker's probe.
        probe: bool,
        /// Whether headroom changed the choice.
        steered: bool,
    },
    /// No member can take the attempt: every member not yet tried is resting. `retry_after` is the shortest time
    /// until a resting member's breaker lets a probe through; `None` when no member not yet tried has an open
    /// breaker (all were tried, or the ones left are half-open with another request's probe in flight).
    Exhausted {
        /// How soon a member may be available again.
        retry_after: Option<Duration>,
    },
}

/// Picks a backend of `pool` for one attempt of a request.
///
/// `health` is indexed by [`Member::backend`] (a member whose backend has no entry is never chosen); `tried` lists
/// the backends this request has already tried, which are never chosen again. The steps:
///
/// 1. A member is *eligible* when its backend is not in `tried` and its breaker is available.
/// 2. [`candidates`] narrows the eligible members to one priority group, minding headroom when the pool steers.
/// 3. [`swrr_pick`] chooses among the candidates with the group's round-robin counters.
/// 4. The winner's breaker [`admit`](crate::Breaker::admit)s the attempt, as a probe when half-open. If it refuses
///    (another request took the probe slot, or opened the breaker, since step 1), the winner is treated as resting
///    and the steps are repeated, at most once per member.
/// 5. With no candidate left, the answer is [`Choice::Exhausted`], with the shortest remaining rest among the
///    members not yet tried.
///
/// A winner refused at step 4 has had its round-robin turn counted; that skews the shares only when breakers
/// change under heavy concurrency, and only by one turn.
pub fn select(
    pool: &Pool,
    health: &[BackendHealth],
    need: Need,
    tried: &[usize],
    now: Duration,
) -> Choice {
    select_with(pool, health, need, tried, now, |health| {
        health.breaker.admit(now)
    })
}

/// [`select`], with the breaker's admission as a parameter so that tests can play the races it guards against.
fn select_with(
    pool: &Pool,
    health: &[BackendHealth],
    need: Need,
    tried: &[usize],
    now: Duration,
    admit: impl Fn(&BackendHealth) -> Admit,
) -> Choice {
    let members = &pool.members;
    if let [member] = members.as_slice() {
        // One member (a pool of one, or an API's single backend): its
        // round robin cannot move and headroom cannot steer it elsewhere,
        // so the answer is its breaker's. Its admission alone gives it: a
        // breaker admits exactly when it is available, and a refusal takes
        // nothing.
        if !tried.contains(&member.backend)
            && let Some(health) = health.get(member.backend)
        {
            match admit(health) {
                Admit::Yes => {
                    return Choice::Backend {
                        backend: member.backend,
                        probe: false,
                        steered: false,
                    };
                }
                Admit::Probe => {
                    return Choice::Backend {
                        backend: member.backend,
                        probe: true,
                        steered: false,
                    };
                }
                Admit::No { .. } => {}
            }
        }
        return exhausted(members, health, tried, now);
    }
    let mut refused: PerMember<bool> = smallvec::smallvec![false; members.len()];
    for _ in 0..members.len() {
        let eligible: PerMember<bool> = members
            .iter()
            .zip(&refused)
            .map(|(member, &refused)| {
                !refused
                    && !tried.contains(&member.backend)
                    && health
                        .get(member.backend)
                        .is_some_and(|health| health.breaker.available(now))
            })
            .collect();
        // Only eligible members' headroom is read: `candidates` ignores the fit of the others, so locking their
        // headroom would be wasted work.
        let fit: PerMember<Fit> = if pool.steering {
            members
                .iter()
                .zip(&eligible)
                .map(|(member, &eligible)| match health.get(member.backend) {
                    Some(health) if eligible => health.headroom.fits(need.tokens, now),
                    _ => Fit::Unknown,
                })
                .collect()
        } else {
            PerMember::new()
        };
        let (chosen, steered) = candidates(members, &eligible, &fit, pool.steering);
        let Some(winner) = pick(pool, &chosen) else {
            break;
        };
        let Some(member) = members.get(winner) else {
            break;
        };
        let admitted = health
            .get(member.backend)
            .map_or(Admit::No { until: now }, &admit);
        let probe = match admitted {
            Admit::Yes => false,
            Admit::Probe => true,
            Admit::No { .. } => {
                if let Some(refused) = refused.get_mut(winner) {
                    *refused = true;
                }
                continue;
            }
        };
        return Choice::Backend {
            backend: member.backend,
            probe,
            steered,
        };
    }
    exhausted(members, health, tried, now)
}

/// The answer when no member can take the attempt: the shortest rest left
/// among the members not yet tried.
fn exhausted(
    members: &[Member],
    health: &[BackendHealth],
    tried: &[usize],
    now: Duration,
) -> Choice {
    let retry_after = members
        .iter()
        .filter(|member| !tried.contains(&member.backend))
        .filter_map(|member| health.get(member.backend)?.breaker.open_until(now))
        .map(|until| until.saturating_sub(now))
        .min();
    Choice::Exhausted { retry_after }
}

/// Runs the round robin of the group holding `chosen` (indices into the pool's members, all of one group) and returns
/// the winner's index among the pool's members.
fn pick(pool: &Pool, chosen: &[usize]) -> Option<usize> {
    let group = pool.group_of(*chosen.first()?)?;
    let local: Members = chosen
        .iter()
        .filter_map(|&index| index.checked_sub(group.start))
        .collect();
    let winner = swrr_pick(&mut group.current(), &group.weights, &local)?;
    Some(group.start + winner)
}

/// Which members take part in the round robin, and whether headroom changed that: the pure core of [`select`].
///
/// `members` are a pool's members in [`Pool::members`] order; `eligible[i]` and `fit[i]` describe `members[i]` (a
/// missing entry counts as not eligible, or as [`Fit::Unknown`]). Returns indices into `members`, all of one
/// priority, in ascending order.
///
/// - Without steering: the eligible members of the lowest priority that has any.
/// - With steering: the eligible members whose fit is not [`Fit::No`], of the lowest priority that has any; the
///   result is *steered* when that priority is not the lowest holding an eligible member, or when an eligible member
///   of that priority was left out for [`Fit::No`]. When no eligible member fits anywhere, the answer is the one
///   without steering (and not steered): the request goes where it would have gone anyway.
pub fn candidates(
    members: &[Member],
    eligible: &[bool],
    fit: &[Fit],
    steering: bool,
) -> (Members, bool) {
    let is_eligible = |index: usize| eligible.get(index).copied().unwrap_or(false);
    let fit_of = |index: usize| fit.get(index).copied().unwrap_or(Fit::Unknown);
    let Some(first) = lowest_priority(members, is_eligible) else {
        return (Members::new(), false);
    };
    if steering {
        let fits = |index: usize| is_eligible(index) && fit_of(index) != Fit::No;
        if let Some(priority) = lowest_priority(members, fits) {
            let passed_over = priority != first
                || members.iter().enumerate().any(|(index, member)| {
                    member.priority == priority && is_eligible(index) && fit_of(index) == Fit::No
                });
            return (of_priority(members, priority, fits), passed_over);
        }
    }
    (of_priority(members, first, is_eligible), false)
}

/// The lowest priority among the members that `keep` accepts.
fn lowest_priority(members: &[Member], keep: impl Fn(usize) -> bool) -> Option<u32> {
    members
        .iter()
        .enumerate()
        .filter(|&(index, _)| keep(index))
        .map(|(_, member)| member.priority)
        .min()
}

/// The indices of the members of `priority` that `keep` accepts.
fn of_priority(members: &[Member], priority: u32, keep: impl Fn(usize) -> bool) -> Members {
    members
        .iter()
        .enumerate()
        .filter(|&(index, member)| member.priority == priority && keep(index))
        .map(|(index, _)| index)
        .collect()
}

/// One step of smooth weighted round robin over `current` (one counter per member, as `weights`), among
/// `candidates` only; returns the winner's index.
///
/// Each candidate's counter grows by its weight; the candidate with the highest counter wins (ties go to the lowest
/// index) and its counter drops by the total weight of the candidates. Counters of members that are not candidates
/// do not move. Indices past the end of `current` or `weights` are ignored; `None` when no candidate is left.
/// Candidates should be distinct (a repeated index takes part twice).
pub fn swrr_pick(current: &mut [i64], weights: &[u32], candidates: &[usize]) -> Option<usize> {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for &index in candidates {
        let (Some(counter), Some(&weight)) = (current.get_mut(index), weights.get(index)) else {
            continue;
        };
        let weight = i64::from(weight);
        *counter = counter.saturating_add(weight);
        total = total.saturating_add(weight);
        let value = *counter;
        best = match best {
            Some((leader, lead)) if lead > value || (lead == value && leader < index) => best,
            _ => Some((index, value)),
        };
    }
    let (winner, _) = best?;
    if let Some(counter) = current.get_mut(winner) {
        *counter = counter.saturating_sub(total);
    }
    Some(winner)
}

#[cfg(test)]
mod tests {
    /// [`candidates`] with its members as a `Vec`, for comparing.
    fn cand(
        members: &[Member],
        eligible: &[bool],
        fit: &[Fit],
        steering: bool,
    ) -> (Vec<usize>, bool) {
        let (chosen, steered) = candidates(members, eligible, fit, steering);
        (chosen.to_vec(), steered)
    }

    use super::*;
    use crate::{BreakerRule, Outcome};
    use std::cell::Cell;

    const SEC: Duration = Duration::from_secs(1);
    const T0: Duration = Duration::from_secs(1_000);

    fn member(backend: usize, priority: u32, weight: u32) -> Member {
        Member {
            backend,
            priority,
            weight,
        }
    }

    fn pool(members: Vec<Member>, steering: bool) -> Pool {
        Pool::new("p", members, steering, Duration::from_secs(60))
    }

    fn healths(n: usize) -> Vec<BackendHealth> {
        (0..n)
            .map(|_| BackendHealth::new(BreakerRule::defaults()))
            .collect()
    }

    /// Opens `health`'s breaker with a 429 asking for `rest`.
    fn rest(health: &BackendHealth, rest: Duration) {
        let outcome = Outcome::Status {
            status: 429,
            retry_after: Some(rest),
        };
        assert!(health.breaker.record(&outcome, T0).is_some());
    }

    /// Reports room for `tokens` tokens until a minute after T0.
    fn room(health: &BackendHealth, tokens: &str) {
        health.headroom.observe(
            |name| (name == "x-ratelimit-remaining-tokens").then_some(tokens),
            T0,
            Duration::from_secs(60),
        );
    }

    fn backend(backend: usize) -> Choice {
        Choice::Backend {
            backend,
            probe: false,
            steered: false,
        }
    }

    fn steered(backend: usize) -> Choice {
        Choice::Backend {
            backend,
            probe: false,
            steered: true,
        }
    }

    fn picks(pool: &Pool, health: &[BackendHealth], need: Need, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| match select(pool, health, need, &[], T0) {
                Choice::Backend { backend, .. } => backend,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    // ---- swrr_pick

    #[test]
    fn swrr_spreads_smoothly_by_weight() {
        let weights = [5, 1, 1];
        let mut current = [0; 3];
        let order: Vec<_> = (0..7)
            .filter_map(|_| swrr_pick(&mut current, &weights, &[0, 1, 2]))
            .collect();
        assert_eq!(order, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(current, [0, 0, 0], "a full cycle comes back to the start");
    }

    #[test]
    fn swrr_moves_only_the_candidates() {
        let weights = [1, 4, 1];
        let mut current = [0, 7, 0];
        assert_eq!(swrr_pick(&mut current, &weights, &[0, 2]), Some(0));
        assert_eq!(current, [-1, 7, 1]);
        assert_eq!(swrr_pick(&mut current, &weights, &[0, 2]), Some(2));
        assert_eq!(current, [0, 7, 0]);
    }

    #[test]
    fn swrr_ties_go_to_the_lowest_index_whatever_the_order() {
        let weights = [1, 1, 1];
        let mut current = [0; 3];
        assert_eq!(swrr_pick(&mut current, &weights, &[2, 1]), Some(1));
        assert_eq!(current, [0, -1, 1]);
        let mut current = [0; 3];
        assert_eq!(swrr_pick(&mut current, &weights, &[2, 0, 1]), Some(0));
        assert_eq!(current, [-2, 1, 1]);
    }

    #[test]
    fn swrr_a_later_higher_counter_wins() {
        let weights = [1, 1, 1];
        let mut current = [0, 0, 5];
        assert_eq!(swrr_pick(&mut current, &weights, &[0, 1, 2]), Some(2));
        assert_eq!(current, [1, 1, 3]);
        let mut current = [5, 0, 0];
        assert_eq!(swrr_pick(&mut current, &weights, &[2, 1, 0]), Some(0));
        assert_eq!(current, [3, 1, 1]);
    }

    #[test]
    fn swrr_ignores_what_is_out_of_range() {
        let mut current = [0, 0];
        assert_eq!(swrr_pick(&mut current, &[3, 3], &[]), None);
        assert_eq!(swrr_pick(&mut current, &[3, 3], &[2, 7]), None);
        assert_eq!(current, [0, 0]);
        assert_eq!(swrr_pick(&mut current, &[3, 3], &[9, 1, 4]), Some(1));
        assert_eq!(current, [0, 0]);
        // A counter without a weight is out of range too.
        let mut current = [0, 0];
        assert_eq!(swrr_pick(&mut current, &[3], &[1]), None);
        assert_eq!(current, [0, 0]);
    }

    #[test]
    fn swrr_counters_saturate() {
        let mut current = [i64::MAX, i64::MIN];
        assert_eq!(swrr_pick(&mut current, &[u32::MAX, 1], &[0, 1]), Some(0));
        assert_eq!(current, [i64::MAX - i64::from(u32::MAX) - 1, i64::MIN + 1]);
    }

    // ---- candidates

    fn two_groups() -> Vec<Member> {
        vec![
            member(10, 1, 1),
            member(11, 1, 1),
            member(20, 2, 1),
            member(21, 2, 1),
        ]
    }

    #[test]
    fn no_eligible_member_no_candidates() {
        let members = two_groups();
        for steering in [false, true] {
            assert_eq!(
                cand(&members, &[false; 4], &[Fit::Yes; 4], steering),
                (vec![], false)
            );
            assert_eq!(cand(&members, &[], &[], steering), (vec![], false));
            assert_eq!(cand(&[], &[], &[], steering), (vec![], false));
        }
    }

    #[test]
    fn without_steering_the_first_group_with_an_eligible_member() {
        let members = two_groups();
        let no_fit = [Fit::No; 4];
        assert_eq!(
            cand(&members, &[true; 4], &no_fit, false),
            (vec![0, 1], false)
        );
        assert_eq!(
            cand(&members, &[false, true, true, true], &no_fit, false),
            (vec![1], false)
        );
        assert_eq!(
            cand(&members, &[false, false, true, true], &no_fit, false),
            (vec![2, 3], false)
        );
        // Missing entries are not eligible.
        assert_eq!(
            cand(&members, &[false, false, true], &[], false),
            (vec![2], false)
        );
    }

    #[test]
    fn priorities_need_not_be_sorted() {
        let members = vec![member(0, 5, 1), member(1, 3, 1), member(2, 5, 1)];
        assert_eq!(cand(&members, &[true; 3], &[], false), (vec![1], false));
        assert_eq!(
            cand(&members, &[true, false, true], &[], true),
            (vec![0, 2], false)
        );
    }

    #[test]
    fn steering_with_unknown_or_fitting_room_changes_nothing() {
        let members = two_groups();
        for fit in [
            vec![Fit::Unknown; 4],
            vec![Fit::Yes; 4],
            vec![Fit::Yes, Fit::Unknown, Fit::No, Fit::No],
            vec![],
        ] {
            assert_eq!(
                cand(&members, &[true; 4], &fit, true),
                (vec![0, 1], false),
                "{fit:?}"
            );
        }
    }

    #[test]
    fn steering_leaves_out_a_member_without_room() {
        let members = two_groups();
        assert_eq!(
            cand(
                &members,
                &[true; 4],
                &[Fit::No, Fit::Yes, Fit::Yes, Fit::Yes],
                true
            ),
            (vec![1], true)
        );
        assert_eq!(
            cand(
                &members,
                &[true; 4],
                &[Fit::Unknown, Fit::No, Fit::No, Fit::No],
                true
            ),
            (vec![0], true)
        );
    }

    #[test]
    fn steering_moves_to_a_later_group_with_room() {
        let members = two_groups();
        assert_eq!(
            cand(
                &members,
                &[true; 4],
                &[Fit::No, Fit::No, Fit::No, Fit::Unknown],
                true
            ),
            (vec![3], true)
        );
        // The first group's eligible member has no room; the other one is resting.
        assert_eq!(
            cand(
                &members,
                &[false, true, true, true],
                &[Fit::Unknown, Fit::No, Fit::Yes, Fit::Yes],
                true
            ),
            (vec![2, 3], true)
        );
    }

    #[test]
    fn steering_is_not_counted_for_resting_members() {
        let members = two_groups();
        // The first group is all resting: moving on is failover, not steering.
        assert_eq!(
            cand(
                &members,
                &[false, false, true, true],
                &[Fit::No, Fit::No, Fit::Yes, Fit::Unknown],
                true
            ),
            (vec![2, 3], false)
        );
        // A resting member without room does not make its group's choice steered.
        assert_eq!(
            cand(
                &members,
                &[false, true, true, true],
                &[Fit::No, Fit::Yes, Fit::Yes, Fit::Yes],
                true
            ),
            (vec![1], false)
        );
        // Nor does a member without room in a later group.
        assert_eq!(
            cand(
                &members,
                &[true, true, true, true],
                &[Fit::Yes, Fit::Yes, Fit::No, Fit::Yes],
                true
            ),
            (vec![0, 1], false)
        );
    }

    #[test]
    fn when_nothing_fits_steering_falls_back() {
        let members = two_groups();
        assert_eq!(
            cand(&members, &[true; 4], &[Fit::No; 4], true),
            (vec![0, 1], false)
        );
        assert_eq!(
            cand(&members, &[false, true, true, false], &[Fit::No; 4], true),
            (vec![1], false)
        );
    }

    // ---- select

    #[test]
    fn equal_weights_take_turns() {
        let pool = pool(
            vec![member(0, 1, 1), member(1, 1, 1), member(2, 1, 1)],
            false,
        );
        let health = healths(3);
        assert_eq!(
            picks(&pool, &health, Need::default(), 6),
            vec![0, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn weights_set_the_shares() {
        let pool = pool(vec![member(0, 1, 3), member(1, 1, 1)], true);
        let health = healths(2);
        let chosen = picks(&pool, &health, Need::default(), 40);
        assert_eq!(chosen.iter().filter(|&&b| b == 0).count(), 30);
        assert_eq!(&chosen[..4], &[0, 0, 1, 0]);
    }

    #[test]
    fn the_first_choice_is_a_plain_one() {
        let pool = pool(vec![member(0, 1, 1), member(1, 2, 1)], true);
        let health = healths(2);
        assert_eq!(select(&pool, &health, Need::default(), &[], T0), backend(0));
    }

    #[test]
    fn tried_backends_are_not_chosen_again() {
        let pool = pool(
            vec![member(0, 1, 1), member(1, 1, 1), member(2, 2, 1)],
            false,
        );
        let health = healths(3);
        for _ in 0..4 {
            assert_eq!(
                select(&pool, &health, Need::default(), &[0], T0),
                backend(1)
            );
        }
        assert_eq!(
            select(&pool, &health, Need::default(), &[1, 0], T0),
            backend(2)
        );
        assert_eq!(
            select(&pool, &health, Need::default(), &[0, 1, 2], T0),
            Choice::Exhausted { retry_after: None }
        );
    }

    #[test]
    fn resting_backends_are_skipped_and_the_next_priority_takes_over() {
        let pool = pool(
            vec![
                member(0, 1, 1),
                member(1, 1, 1),
                member(2, 2, 1),
                member(3, 2, 1),
            ],
            true,
        );
        let health = healths(4);
        rest(&health[0], 5 * SEC);
        assert_eq!(picks(&pool, &health, Need::default(), 3), vec![1, 1, 1]);
        rest(&health[1], 5 * SEC);
        assert_eq!(picks(&pool, &health, Need::default(), 4), vec![2, 3, 2, 3]);
        let choice = select(&pool, &health, Need::default(), &[], T0);
        assert_eq!(choice, backend(2), "failover is not steering");
    }

    #[test]
    fn exhausted_reports_the_shortest_rest_among_members_not_tried() {
        let pool = pool(
            vec![member(0, 1, 1), member(1, 1, 1), member(2, 2, 1)],
            false,
        );
        let health = healths(3);
        rest(&health[0], 2 * SEC);
        rest(&health[1], 9 * SEC);
        rest(&health[2], 4 * SEC);
        let now = T0 + SEC;
        assert_eq!(
            select(&pool, &health, Need::default(), &[], now),
            Choice::Exhausted {
                retry_after: Some(SEC)
            }
        );
        assert_eq!(
            select(&pool, &health, Need::default(), &[0], now),
            Choice::Exhausted {
                retry_after: Some(3 * SEC)
            }
        );
        assert_eq!(
            select(&pool, &health, Need::default(), &[0, 2], now),
            Choice::Exhausted {
                retry_after: Some(8 * SEC)
            }
        );
        // Once a rest is over, that backend is probed.
        assert_eq!(
            select(&pool, &health, Need::default(), &[], T0 + 2 * SEC),
            Choice::Backend {
                backend: 0,
                probe: true,
                steered: false
            }
        );
    }

    #[test]
    fn a_half_open_backend_gets_one_probe() {
        let pool = pool(vec![member(0, 1, 1)], false);
        let health = healths(1);
        rest(&health[0], SEC);
        let later = T0 + SEC;
        assert_eq!(
            select(&pool, &health, Need::default(), &[], later),
            Choice::Backend {
                backend: 0,
                probe: true,
                steered: false
            }
        );
        // The probe is out: no other request may go, and no rest can be promised.
        assert_eq!(
            select(&pool, &health, Need::default(), &[], later),
            Choice::Exhausted { retry_after: None }
        );
        health[0].breaker.record(
            &Outcome::Status {
                status: 200,
                retry_after: None,
            },
            later,
        );
        assert_eq!(
            select(&pool, &health, Need::default(), &[], later),
            backend(0)
        );
    }

    #[test]
    fn members_without_health_are_never_chosen() {
        let pool = pool(vec![member(0, 1, 1), member(5, 1, 1)], true);
        let health = healths(1);
        assert_eq!(picks(&pool, &health, Need::default(), 3), vec![0, 0, 0]);
        let pool = self::pool(vec![member(5, 1, 1)], true);
        assert_eq!(
            select(&pool, &health, Need::default(), &[], T0),
            Choice::Exhausted { retry_after: None }
        );
        let empty = self::pool(Vec::new(), true);
        assert_eq!(
            select(&empty, &health, Need::default(), &[], T0),
            Choice::Exhausted { retry_after: None }
        );
    }

    #[test]
    fn steering_passes_over_a_backend_without_room() {
        let members = vec![member(0, 1, 1), member(1, 1, 1), member(2, 2, 1)];
        let health = healths(3);
        room(&health[0], "100");
        room(&health[1], "5000");
        let big = Need {
            tokens: Some(1_000),
        };
        let steering = pool(members.clone(), true);
        for _ in 0..3 {
            assert_eq!(select(&steering, &health, big, &[], T0), steered(1));
        }
        // A small request fits both.
        assert_eq!(
            picks(&steering, &health, Need { tokens: Some(50) }, 2),
            vec![0, 1]
        );
        // An unknown size fits anywhere with room left.
        assert_eq!(
            select(&steering, &health, Need::default(), &[], T0),
            backend(0)
        );
        // Without steering, the request goes where the round robin says.
        let plain = pool(members, false);
        assert_eq!(picks(&plain, &health, big, 2), vec![0, 1]);
    }

    #[test]
    fn steering_to_a_later_priority_and_back() {
        let pool = pool(vec![member(0, 1, 1), member(1, 2, 1)], true);
        let health = healths(2);
        room(&health[0], "100");
        let big = Need {
            tokens: Some(1_000),
        };
        assert_eq!(select(&pool, &health, big, &[], T0), steered(1));
        // The second member has no room either: back to the first choice, unsteered.
        room(&health[1], "10");
        assert_eq!(select(&pool, &health, big, &[], T0), backend(0));
        // Once the reading expires, nothing is known and nothing is steered.
        assert_eq!(
            select(&pool, &health, big, &[], T0 + Duration::from_secs(60)),
            backend(0)
        );
        // An exhausted backend is avoided even for a request of unknown size.
        room(&health[1], "10");
        health[0].headroom.exhaust(T0 + SEC);
        assert_eq!(select(&pool, &health, Need::default(), &[], T0), steered(1));
    }

    #[test]
    fn the_headroom_of_resting_or_tried_members_is_not_read() {
        // Both are short of room, but one is tried and the other resting: the choice is plain failover.
        let pool = pool(
            vec![member(0, 1, 1), member(1, 1, 1), member(2, 2, 1)],
            true,
        );
        let health = healths(3);
        room(&health[0], "1");
        room(&health[1], "1");
        rest(&health[1], SEC);
        let big = Need { tokens: Some(100) };
        assert_eq!(select(&pool, &health, big, &[0], T0), backend(2));
    }

    #[test]
    fn a_member_refused_at_admission_is_passed_over() {
        let pool = pool(vec![member(0, 1, 1), member(1, 1, 1)], false);
        let health = healths(2);
        let asked = Cell::new(Vec::new());
        let refuse_0 = |h: &BackendHealth| {
            let index = if std::ptr::eq(h, &health[0]) { 0 } else { 1 };
            let mut seen = asked.take();
            seen.push(index);
            asked.set(seen);
            if index == 0 {
                Admit::No { until: T0 + SEC }
            } else {
                Admit::Yes
            }
        };
        assert_eq!(
            select_with(&pool, &health, Need::default(), &[], T0, refuse_0),
            backend(1)
        );
        assert_eq!(asked.take(), vec![0, 1]);
        let refuse_all = |_: &BackendHealth| Admit::No { until: T0 + SEC };
        assert_eq!(
            select_with(&pool, &health, Need::default(), &[], T0, refuse_all),
            Choice::Exhausted { retry_after: None }
        );
        let probe = |_: &BackendHealth| Admit::Probe;
        let fresh = self::pool(vec![member(0, 1, 1), member(1, 1, 1)], false);
        assert_eq!(
            select_with(&fresh, &health, Need::default(), &[1], T0, probe),
            Choice::Backend {
                backend: 0,
                probe: true,
                steered: false
            }
        );
    }

    #[test]
    fn a_pool_of_one_answers_with_its_breaker() {
        for steering in [false, true] {
            let pool = pool(vec![member(0, 1, 1)], steering);
            let health = healths(1);
            // No room reported: steering has nowhere else to go.
            room(&health[0], "1");
            let big = Need { tokens: Some(100) };
            assert_eq!(select(&pool, &health, big, &[], T0), backend(0));
            assert_eq!(
                select(&pool, &health, big, &[0], T0),
                Choice::Exhausted { retry_after: None }
            );
            let refuse = |_: &BackendHealth| Admit::No { until: T0 + SEC };
            assert_eq!(
                select_with(&pool, &health, big, &[], T0, refuse),
                Choice::Exhausted { retry_after: None }
            );
            let probe = |_: &BackendHealth| Admit::Probe;
            assert_eq!(
                select_with(&pool, &health, big, &[], T0, probe),
                Choice::Backend {
                    backend: 0,
                    probe: true,
                    steered: false
                }
            );
            rest(&health[0], 3 * SEC);
            assert_eq!(
                select(&pool, &health, big, &[], T0 + SEC),
                Choice::Exhausted {
                    retry_after: Some(2 * SEC)
                }
            );
            assert_eq!(
                select(&pool, &health, big, &[0], T0 + SEC),
                Choice::Exhausted { retry_after: None },
                "a tried member's rest is not waited for"
            );
            // A member whose backend has no health entry is never chosen.
            assert_eq!(
                select(&pool, &[], big, &[], T0),
                Choice::Exhausted { retry_after: None }
            );
        }
    }

    #[test]
    fn priority_groups_keep_separate_turns() {
        let pool = pool(
            vec![
                member(0, 1, 1),
                member(1, 1, 1),
                member(2, 2, 1),
                member(3, 2, 1),
            ],
            false,
        );
        let health = healths(4);
        assert_eq!(picks(&pool, &health, Need::default(), 1), vec![0]);
        assert_eq!(
            select(&pool, &health, Need::default(), &[0, 1], T0),
            backend(2)
        );
        assert_eq!(picks(&pool, &health, Need::default(), 1), vec![1]);
        assert_eq!(
            select(&pool, &health, Need::default(), &[0, 1], T0),
            backend(3)
        );
    }
}
