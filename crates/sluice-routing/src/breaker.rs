//! Per-backend circuit breakers.

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::Outcome;

/// How long a half-open breaker waits for its probe to report before it lets another probe go. A probe whose client
/// went away may never report; this keeps such a probe from blocking the backend for good.
pub const PROBE_LEASE: Duration = Duration::from_secs(30);

/// One trip rule, like a rule of APIM's circuit breaker: which outcomes are failures, and how many of them within an
/// interval open the breaker, for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerRule {
    /// The rule's name, reported as the cause of a trip.
    pub name: String,
    /// Status ranges counted as failures, bounds included (such as `429..=429` or `500..=599`).
    pub statuses: Vec<RangeInclusive<u16>>,
    /// Whether [`Outcome::ConnectFailed`] and [`Outcome::ConnectionLost`] count as failures.
    pub connection_errors: bool,
    /// Whether [`Outcome::Timeout`] counts as a failure.
    pub timeouts: bool,
    /// How many failures within `interval` open the breaker; 0 is taken as 1.
    pub count: u32,
    /// How far back failures are counted.
    pub interval: Duration,
    /// How long the backend rests once the rule has opened its breaker.
    pub trip_duration: Duration,
    /// Rest for as long as the backend's own Retry-After says, when the failing answer carried one, instead of
    /// `trip_duration`.
    pub accept_retry_after: bool,
    /// The longest Retry-After honoured (Azure may ask for a whole day); a longer one is cut down to this.
    pub max_retry_after: Duration,
}

impl BreakerRule {
    /// Whether `outcome` is a failure under this rule.
    pub fn matches(&self, outcome: &Outcome) -> bool {
        match outcome {
            Outcome::Status { status, .. } => {
                self.statuses.iter().any(|range| range.contains(status))
            }
            Outcome::ConnectFailed | Outcome::ConnectionLost => self.connection_errors,
            Outcome::Timeout => self.timeouts,
        }
    }

    /// The rules a backend gets when its configuration names none:
    ///
    /// - `throttled`: one 429 within 10 s rests the backend for 5 s, or for its Retry-After up to 60 s;
    /// - `failures`: three 5xx answers, connection failures or timeouts within 10 s rest it for 10 s, or for its
    ///   Retry-After up to 60 s.
    pub fn defaults() -> Vec<BreakerRule> {
        vec![
            BreakerRule {
                name: "throttled".to_owned(),
                statuses: vec![429..=429],
                connection_errors: false,
                timeouts: false,
                count: 1,
                interval: Duration::from_secs(10),
                trip_duration: Duration::from_secs(5),
                accept_retry_after: true,
                max_retry_after: Duration::from_secs(60),
            },
            BreakerRule {
                name: "failures".to_owned(),
                statuses: vec![500..=599],
                connection_errors: true,
                timeouts: true,
                count: 3,
                interval: Duration::from_secs(10),
                trip_duration: Duration::from_secs(10),
                accept_retry_after: true,
                max_retry_after: Duration::from_secs(60),
            },
        ]
    }

    /// The failure count that trips the rule, at least 1, as a length.
    fn threshold(&self) -> usize {
        usize::try_from(self.count.max(1)).unwrap_or(usize::MAX)
    }

    /// How long a trip by `outcome` rests the backend.
    fn rest_for(&self, outcome: &Outcome) -> Duration {
        match outcome.retry_after() {
            Some(asked) if self.accept_retry_after => asked.min(self.max_retry_after),
            _ => self.trip_duration,
        }
    }
}

/// Why a breaker opened, for the management view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TripCause {
    /// The name of the rule that tripped.
    pub rule: String,
    /// The outcome that tripped it, as [`Outcome::label`] gives it.
    pub outcome: String,
    /// The Retry-After that outcome carried, as the backend sent it (before any cap).
    pub retry_after: Option<Duration>,
}

/// A breaker's state as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerView {
    /// Requests go through.
    Closed,
    /// The backend rests until `until` (a monotonic reading); `cause` says why.
    Open {
        /// When the rest ends and a probe may go.
        until: Duration,
        /// What opened the breaker.
        cause: TripCause,
    },
    /// The rest is over: the next request is a probe. `probing` is true while a probe is in flight.
    HalfOpen {
        /// Whether a probe is out and has not reported yet (nor outlived [`PROBE_LEASE`]).
        probing: bool,
    },
}

/// The answer of [`Breaker::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The breaker is closed: go ahead.
    Yes,
    /// The breaker is half-open and this request is its probe; report its outcome with [`Breaker::record`].
    Probe,
    /// Not now: the backend rests, or another request is probing it, until `until` (a monotonic reading).
    No {
        /// When the breaker may next let a request through.
        until: Duration,
    },
}

/// The circuit breaker of one backend.
///
/// While **closed**, every failure that a rule matches is remembered for that rule's interval; when a rule has seen
/// `count` failures within its interval, the breaker **opens** for the rule's rest (its `trip_duration`, or the
/// backend's Retry-After when the rule accepts one). Once the rest is over the breaker is **half-open**: the next
/// request admitted is a probe, and no other is admitted while it is in flight. The probe's outcome decides:
///
/// - a failure that some rule matches opens the breaker again, for that rule's rest (no count needed);
/// - a success ([`Outcome::is_success`]) closes it, with every rule's failure memory cleared;
/// - a failure that no rule matches (a 408 under the default rules) neither opens nor closes: the probe slot is
///   freed and the next request probes again.
///
/// A probe is in flight from the [`admit`](Self::admit) that returned [`Admit::Probe`] until the next
/// [`record`](Self::record); one that never reports stops blocking after [`PROBE_LEASE`].
///
/// Outcomes recorded while the breaker is open (requests sent before it opened) are ignored. While it is half-open,
/// the breaker cannot tell its probe's outcome from a late one of such a request, and takes whichever comes first.
///
/// When several rules trip on the same outcome, the first in the configured order sets the rest and the cause.
#[derive(Debug)]
pub struct Breaker {
    rules: Vec<BreakerRule>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// For each rule, the times of its recent failures, oldest first. A rule's list never grows past its threshold:
    /// reaching it opens the breaker, nothing is added until the breaker closes again, and closing clears every list.
    failures: Vec<VecDeque<Duration>>,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open {
        until: Duration,
        cause: TripCause,
    },
    /// `probe_since`: when the probe in flight was admitted, if one is.
    HalfOpen {
        probe_since: Option<Duration>,
    },
}

impl State {
    /// Moves an open breaker whose rest is over to half-open.
    fn settle(&mut self, now: Duration) {
        if let Phase::Open { until, .. } = self.phase
            && now >= until
        {
            self.phase = Phase::HalfOpen { probe_since: None };
        }
    }

    fn forget_failures(&mut self) {
        self.failures.iter_mut().for_each(VecDeque::clear);
    }
}

/// Whether a probe admitted at `since` still holds the slot at `now`.
fn probing(since: Option<Duration>, now: Duration) -> bool {
    since.is_some_and(|since| now.saturating_sub(since) < PROBE_LEASE)
}

impl Breaker {
    /// A closed breaker judging outcomes by `rules` (which may be empty: such a breaker never opens).
    pub fn new(rules: Vec<BreakerRule>) -> Self {
        let failures = rules.iter().map(|_| VecDeque::new()).collect();
        Breaker {
            rules,
            state: Mutex::new(State {
                phase: Phase::Closed,
                failures,
            }),
        }
    }

    /// The rules this breaker judges by.
    pub fn rules(&self) -> &[BreakerRule] {
        &self.rules
    }

    fn lock(&self, now: Duration) -> MutexGuard<'_, State> {
        // Each update below leaves the state whole, so a lock poisoned by a panic elsewhere is safe to take over.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.settle(now);
        state
    }

    /// Whether a request could go to this backend now: closed, or half-open with no probe in flight. Unlike
    /// [`admit`](Self::admit), this takes nothing.
    pub fn available(&self, now: Duration) -> bool {
        match self.lock(now).phase {
            Phase::Closed => true,
            Phase::Open { .. } => false,
            Phase::HalfOpen { probe_since } => !probing(probe_since, now),
        }
    }

    /// Asks to send a request: [`Admit::Yes`] when closed; [`Admit::Probe`] when half-open with no probe in flight
    /// (this request becomes the probe); [`Admit::No`] otherwise, with the time the rest or the probe's lease ends.
    pub fn admit(&self, now: Duration) -> Admit {
        let mut state = self.lock(now);
        match &mut state.phase {
            Phase::Closed => Admit::Yes,
            Phase::Open { until, .. } => Admit::No { until: *until },
            Phase::HalfOpen { probe_since } => match *probe_since {
                Some(since) if probing(Some(since), now) => Admit::No {
                    until: since.saturating_add(PROBE_LEASE),
                },
                _ => {
                    *probe_since = Some(now);
                    Admit::Probe
                }
            },
        }
    }

    /// Records the outcome of an attempt at this backend. Returns the cause when this outcome opened the breaker.
    ///
    /// A rule's failures older than its interval are forgotten, and a rule never holds more than `count` of them
    /// (reaching `count` opens the breaker, which records nothing more until it closes with its memory cleared), so
    /// what a breaker holds is bounded by its rules.
    pub fn record(&self, outcome: &Outcome, now: Duration) -> Option<TripCause> {
        let mut state = self.lock(now);
        match state.phase {
            Phase::Open { .. } => None,
            Phase::HalfOpen { .. } => {
                if let Some(rule) = self.rules.iter().find(|rule| rule.matches(outcome)) {
                    Some(trip(&mut state, rule, outcome, now))
                } else {
                    state.phase = if outcome.is_success() {
                        state.forget_failures();
                        Phase::Closed
                    } else {
                        Phase::HalfOpen { probe_since: None }
                    };
                    None
                }
            }
            Phase::Closed => {
                let mut tripped = None;
                for (rule, failures) in self.rules.iter().zip(state.failures.iter_mut()) {
                    if !rule.matches(outcome) {
                        continue;
                    }
                    while failures
                        .front()
                        .is_some_and(|&at| now.saturating_sub(at) >= rule.interval)
                    {
                        failures.pop_front();
                    }
                    failures.push_back(now);
                    if tripped.is_none() && failures.len() >= rule.threshold() {
                        tripped = Some(rule);
                    }
                }
                tripped.map(|rule| trip(&mut state, rule, outcome, now))
            }
        }
    }

    /// The probe admitted at `since` ended without an outcome (the client left, a policy refused the request): free
    /// its slot so the next request probes at once instead of waiting out [`PROBE_LEASE`]. A later probe's slot (one
    /// admitted at another time) is left alone.
    pub fn abandon_probe(&self, since: Duration, now: Duration) {
        let mut state = self.lock(now);
        if let Phase::HalfOpen { probe_since } = &mut state.phase
            && *probe_since == Some(since)
        {
            *probe_since = None;
        }
    }

    /// The breaker's state at `now`. An open breaker whose rest is over shows as half-open with no probe.
    pub fn view(&self, now: Duration) -> BreakerView {
        match &self.lock(now).phase {
            Phase::Closed => BreakerView::Closed,
            Phase::Open { until, cause } => BreakerView::Open {
                until: *until,
                cause: cause.clone(),
            },
            Phase::HalfOpen { probe_since } => BreakerView::HalfOpen {
                probing: probing(*probe_since, now),
            },
        }
    }

    /// When an open breaker's rest ends and it will let a probe through; `None` when it is not open.
    pub fn open_until(&self, now: Duration) -> Option<Duration> {
        match self.lock(now).phase {
            Phase::Open { until, .. } => Some(until),
            Phase::Closed | Phase::HalfOpen { .. } => None,
        }
    }
}

/// Opens the breaker for `rule`'s rest after `outcome`.
fn trip(state: &mut State, rule: &BreakerRule, outcome: &Outcome, now: Duration) -> TripCause {
    let cause = TripCause {
        rule: rule.name.clone(),
        outcome: outcome.label().into_owned(),
        retry_after: outcome.retry_after(),
    };
    state.phase = Phase::Open {
        until: now.saturating_add(rule.rest_for(outcome)),
        cause: cause.clone(),
    };
    cause
}

#[cfg(test)]
mod abandon_tests {
    use super::*;

    #[test]
    fn an_abandoned_probe_frees_its_slot_at_once() {
        let rule = BreakerRule {
            name: "r".into(),
            statuses: vec![429..=429],
            connection_errors: false,
            timeouts: false,
            count: 1,
            interval: Duration::from_secs(10),
            trip_duration: Duration::from_secs(5),
            accept_retry_after: false,
            max_retry_after: Duration::from_secs(60),
        };
        let b = Breaker::new(vec![rule]);
        let t0 = Duration::from_secs(100);
        let throttled = Outcome::Status {
            status: 429,
            retry_after: None,
        };
        assert!(b.record(&throttled, t0).is_some());
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(t1), Admit::Probe);
        assert!(!b.available(t1));
        // Another probe's abandonment does not free this one.
        b.abandon_probe(t0, t1);
        assert!(!b.available(t1));
        b.abandon_probe(t1, t1 + Duration::from_millis(1));
        assert!(b.available(t1 + Duration::from_millis(1)));
        assert_eq!(b.admit(t1 + Duration::from_millis(2)), Admit::Probe);
        // On a closed breaker it does nothing.
        let closed = Breaker::new(Vec::new());
        closed.abandon_probe(t1, t1);
        assert_eq!(closed.admit(t1), Admit::Yes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_base::{Clock, ManualClock};

    const SEC: Duration = Duration::from_secs(1);
    const NANO: Duration = Duration::from_nanos(1);

    fn status(status: u16) -> Outcome {
        Outcome::Status {
            status,
            retry_after: None,
        }
    }

    fn status_after(status: u16, retry_after: Duration) -> Outcome {
        Outcome::Status {
            status,
            retry_after: Some(retry_after),
        }
    }

    fn rule(name: &str, statuses: Vec<RangeInclusive<u16>>, count: u32) -> BreakerRule {
        BreakerRule {
            name: name.to_owned(),
            statuses,
            connection_errors: false,
            timeouts: false,
            count,
            interval: 10 * SEC,
            trip_duration: 7 * SEC,
            accept_retry_after: false,
            max_retry_after: 60 * SEC,
        }
    }

    fn default_breaker() -> Breaker {
        Breaker::new(BreakerRule::defaults())
    }

    /// Opens `breaker` with a 429 at `now` (default rules: rests 5 s).
    fn throttle(breaker: &Breaker, now: Duration) {
        assert!(breaker.record(&status(429), now).is_some());
    }

    #[test]
    fn the_default_rules() {
        let rules = BreakerRule::defaults();
        assert_eq!(
            rules,
            vec![
                BreakerRule {
                    name: "throttled".into(),
                    statuses: vec![429..=429],
                    connection_errors: false,
                    timeouts: false,
                    count: 1,
                    interval: 10 * SEC,
                    trip_duration: 5 * SEC,
                    accept_retry_after: true,
                    max_retry_after: 60 * SEC,
                },
                BreakerRule {
                    name: "failures".into(),
                    statuses: vec![500..=599],
                    connection_errors: true,
                    timeouts: true,
                    count: 3,
                    interval: 10 * SEC,
                    trip_duration: 10 * SEC,
                    accept_retry_after: true,
                    max_retry_after: 60 * SEC,
                },
            ]
        );
        assert_eq!(default_breaker().rules(), rules.as_slice());
    }

    #[test]
    fn a_rule_matches_its_statuses_and_chosen_connection_failures() {
        let mut r = rule("r", vec![429..=429, 500..=503], 1);
        for hit in [429, 500, 501, 503] {
            assert!(r.matches(&status(hit)), "{hit}");
        }
        for miss in [200, 428, 430, 499, 504, 599] {
            assert!(!r.matches(&status(miss)), "{miss}");
        }
        assert!(!r.matches(&Outcome::ConnectFailed));
        assert!(!r.matches(&Outcome::ConnectionLost));
        assert!(!r.matches(&Outcome::Timeout));
        r.connection_errors = true;
        assert!(r.matches(&Outcome::ConnectFailed));
        assert!(r.matches(&Outcome::ConnectionLost));
        assert!(!r.matches(&Outcome::Timeout));
        r.connection_errors = false;
        r.timeouts = true;
        assert!(!r.matches(&Outcome::ConnectFailed));
        assert!(!r.matches(&Outcome::ConnectionLost));
        assert!(r.matches(&Outcome::Timeout));
    }

    /// The one-member pool asks only for admission: a breaker admits exactly
    /// when it is available, in every phase, and a refusal changes nothing.
    #[test]
    fn admission_is_refused_exactly_when_the_breaker_is_unavailable() {
        let breaker = default_breaker();
        let mut phases = 0;
        let mut check = |now: Duration| {
            let available = breaker.available(now);
            let view = breaker.view(now);
            match breaker.admit(now) {
                Admit::No { .. } => {
                    assert!(!available, "{view:?}");
                    // Nothing was taken.
                    assert_eq!(breaker.view(now), view);
                }
                Admit::Yes | Admit::Probe => assert!(available, "{view:?}"),
            }
            phases += 1;
        };
        check(Duration::ZERO); // closed
        throttle(&breaker, SEC);
        check(2 * SEC); // open, resting
        check(7 * SEC); // half-open: this one becomes the probe
        check(8 * SEC); // half-open, the probe out
        check(8 * SEC + PROBE_LEASE); // the probe outlived its lease
        assert_eq!(phases, 5);
    }

    #[test]
    fn a_new_breaker_is_closed() {
        let breaker = default_breaker();
        assert!(breaker.available(Duration::ZERO));
        assert_eq!(breaker.admit(Duration::ZERO), Admit::Yes);
        assert_eq!(breaker.view(Duration::ZERO), BreakerView::Closed);
        assert_eq!(breaker.open_until(Duration::ZERO), None);
        assert_eq!(breaker.record(&status(200), Duration::ZERO), None);
        assert_eq!(breaker.view(Duration::ZERO), BreakerView::Closed);
    }

    #[test]
    fn one_429_rests_the_backend_for_the_trip_duration() {
        let breaker = default_breaker();
        let now = 100 * SEC;
        let cause = TripCause {
            rule: "throttled".into(),
            outcome: "429".into(),
            retry_after: None,
        };
        assert_eq!(breaker.record(&status(429), now), Some(cause.clone()));
        let until = now + 5 * SEC;
        assert_eq!(breaker.open_until(now), Some(until));
        assert_eq!(
            breaker.view(now),
            BreakerView::Open {
                until,
                cause: cause.clone()
            }
        );
        assert!(!breaker.available(now));
        assert_eq!(breaker.admit(now), Admit::No { until });
        let just_before = until - NANO;
        assert!(!breaker.available(just_before));
        assert_eq!(breaker.admit(just_before), Admit::No { until });
        assert_eq!(breaker.open_until(just_before), Some(until));
        assert_eq!(
            breaker.view(just_before),
            BreakerView::Open { until, cause }
        );
    }

    #[test]
    fn the_rest_ends_exactly_at_until() {
        let breaker = default_breaker();
        throttle(&breaker, Duration::ZERO);
        let until = 5 * SEC;
        assert_eq!(breaker.open_until(until), None);
        assert_eq!(
            breaker.view(until),
            BreakerView::HalfOpen { probing: false }
        );
        assert!(breaker.available(until));
        assert_eq!(breaker.admit(until), Admit::Probe);
    }

    #[test]
    fn a_retry_after_sets_the_rest_when_the_rule_accepts_it_up_to_the_cap() {
        let breaker = default_breaker();
        let cause = breaker.record(&status_after(429, 20 * SEC), SEC);
        assert_eq!(
            cause,
            Some(TripCause {
                rule: "throttled".into(),
                outcome: "429".into(),
                retry_after: Some(20 * SEC),
            })
        );
        assert_eq!(breaker.open_until(SEC), Some(21 * SEC));

        // A day is cut to the 60 s cap; the cause still shows what the backend asked for.
        let breaker = default_breaker();
        let cause = breaker.record(&status_after(429, 86_400 * SEC), SEC);
        assert_eq!(cause.map(|c| c.retry_after), Some(Some(86_400 * SEC)));
        assert_eq!(breaker.open_until(SEC), Some(61 * SEC));

        // A rule that ignores Retry-After rests for its trip duration.
        let breaker = Breaker::new(vec![rule("r", vec![429..=429], 1)]);
        breaker.record(&status_after(429, 20 * SEC), SEC);
        assert_eq!(breaker.open_until(SEC), Some(8 * SEC));
        // A shorter Retry-After is honoured as it is.
        let mut short = rule("r", vec![429..=429], 1);
        short.accept_retry_after = true;
        let breaker = Breaker::new(vec![short]);
        breaker.record(&status_after(429, 2 * SEC), SEC);
        assert_eq!(breaker.open_until(SEC), Some(3 * SEC));
    }

    #[test]
    fn failures_trip_when_count_fall_within_the_interval() {
        let breaker = default_breaker();
        assert_eq!(breaker.record(&status(500), Duration::ZERO), None);
        assert_eq!(breaker.record(&Outcome::Timeout, 5 * SEC), None);
        assert_eq!(breaker.view(5 * SEC), BreakerView::Closed);
        let cause = breaker.record(&Outcome::ConnectFailed, 10 * SEC - NANO);
        assert_eq!(
            cause,
            Some(TripCause {
                rule: "failures".into(),
                outcome: "connect_failed".into(),
                retry_after: None,
            })
        );
        assert_eq!(breaker.open_until(10 * SEC), Some(20 * SEC - NANO));
    }

    #[test]
    fn failures_as_old_as_the_interval_are_forgotten() {
        let breaker = default_breaker();
        breaker.record(&status(503), Duration::ZERO);
        breaker.record(&Outcome::ConnectionLost, 5 * SEC);
        assert_eq!(breaker.record(&status(502), 10 * SEC), None);
        assert_eq!(breaker.view(10 * SEC), BreakerView::Closed);
        // 5 s and 10 s are still within 10 s of 14.9 s.
        assert!(breaker.record(&status(500), 15 * SEC - NANO).is_some());
    }

    #[test]
    fn successes_between_failures_do_not_reset_the_count() {
        let breaker = default_breaker();
        breaker.record(&status(500), Duration::ZERO);
        breaker.record(&status(200), SEC);
        breaker.record(&status(500), 2 * SEC);
        breaker.record(&status(404), 3 * SEC);
        assert!(breaker.record(&status(500), 4 * SEC).is_some());
    }

    #[test]
    fn outcomes_no_rule_matches_are_not_counted() {
        let breaker = Breaker::new(vec![rule("r", vec![500..=599], 1)]);
        for outcome in [
            status(429),
            status(408),
            Outcome::ConnectFailed,
            Outcome::Timeout,
            Outcome::ConnectionLost,
        ] {
            assert_eq!(breaker.record(&outcome, Duration::ZERO), None);
        }
        assert_eq!(breaker.view(Duration::ZERO), BreakerView::Closed);
        assert!(breaker.lock(Duration::ZERO).failures[0].is_empty());
    }

    #[test]
    fn a_count_of_zero_is_taken_as_one() {
        let breaker = Breaker::new(vec![rule("r", vec![500..=599], 0)]);
        assert!(breaker.record(&status(500), Duration::ZERO).is_some());
    }

    #[test]
    fn a_breaker_without_rules_never_opens() {
        let breaker = Breaker::new(Vec::new());
        for _ in 0..10 {
            assert_eq!(breaker.record(&status(503), Duration::ZERO), None);
            assert_eq!(
                breaker.record(&Outcome::ConnectFailed, Duration::ZERO),
                None
            );
        }
        assert_eq!(breaker.admit(Duration::ZERO), Admit::Yes);
    }

    #[test]
    fn the_first_rule_that_trips_sets_rest_and_cause() {
        let first = rule("first", vec![500..=599], 3);
        let mut second = rule("second", vec![503..=503], 1);
        second.trip_duration = 3 * SEC;
        let mut third = rule("third", vec![503..=503], 1);
        third.trip_duration = 30 * SEC;
        let breaker = Breaker::new(vec![first, second, third]);
        breaker.record(&status(500), Duration::ZERO);
        let cause = breaker.record(&status(503), SEC);
        assert_eq!(cause.map(|c| c.rule), Some("second".to_owned()));
        assert_eq!(breaker.open_until(SEC), Some(4 * SEC));
    }

    #[test]
    fn a_rule_never_holds_more_than_its_count() {
        let breaker = Breaker::new(vec![
            rule("many", vec![500..=599], 3),
            rule("other", vec![502..=502], 1),
        ]);
        breaker.record(&status(500), Duration::ZERO);
        breaker.record(&status(500), SEC);
        assert_eq!(breaker.lock(SEC).failures[0].len(), 2);
        // "other" trips; "many" reaches its count too, and nothing more is kept while open or half-open.
        assert!(breaker.record(&status(502), 2 * SEC).is_some());
        for at in 3..20 {
            breaker.record(&status(500), at * SEC);
        }
        let state = breaker.lock(20 * SEC);
        assert_eq!(state.failures[0].len(), 3);
        assert_eq!(state.failures[1].len(), 1);
    }

    #[test]
    fn outcomes_recorded_while_open_are_ignored() {
        let breaker = default_breaker();
        throttle(&breaker, Duration::ZERO);
        assert_eq!(breaker.record(&status_after(429, 50 * SEC), SEC), None);
        assert_eq!(breaker.record(&status(200), 2 * SEC), None);
        assert_eq!(breaker.open_until(2 * SEC), Some(5 * SEC));
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let breaker = default_breaker();
        throttle(&breaker, Duration::ZERO);
        let at = 6 * SEC;
        assert_eq!(breaker.admit(at), Admit::Probe);
        assert_eq!(breaker.view(at), BreakerView::HalfOpen { probing: true });
        assert!(!breaker.available(at));
        assert_eq!(
            breaker.admit(at + SEC),
            Admit::No {
                until: at + PROBE_LEASE
            }
        );
        assert_eq!(breaker.open_until(at + SEC), None);
    }

    #[test]
    fn a_probe_that_never_reports_loses_its_slot_after_the_lease() {
        let breaker = default_breaker();
        throttle(&breaker, Duration::ZERO);
        let at = 5 * SEC;
        assert_eq!(breaker.admit(at), Admit::Probe);
        let expiry = at + PROBE_LEASE;
        assert!(!breaker.available(expiry - NANO));
        assert_eq!(
            breaker.view(expiry - NANO),
            BreakerView::HalfOpen { probing: true }
        );
        assert_eq!(breaker.admit(expiry - NANO), Admit::No { until: expiry });
        assert!(breaker.available(expiry));
        assert_eq!(
            breaker.view(expiry),
            BreakerView::HalfOpen { probing: false }
        );
        assert_eq!(breaker.admit(expiry), Admit::Probe);
        assert_eq!(
            breaker.admit(expiry),
            Admit::No {
                until: expiry + PROBE_LEASE
            }
        );
    }

    #[test]
    fn a_successful_probe_closes_and_clears_the_failure_memory() {
        let breaker = default_breaker();
        breaker.record(&status(500), Duration::ZERO);
        breaker.record(&status(500), SEC);
        throttle(&breaker, 2 * SEC);
        assert_eq!(breaker.admit(7 * SEC), Admit::Probe);
        assert_eq!(breaker.record(&status(200), 8 * SEC), None);
        assert_eq!(breaker.view(8 * SEC), BreakerView::Closed);
        assert_eq!(breaker.admit(8 * SEC), Admit::Yes);
        // The two 5xx from before the trip no longer count.
        assert_eq!(breaker.record(&status(500), 9 * SEC), None);
        assert_eq!(breaker.record(&status(500), 9 * SEC), None);
        assert!(breaker.record(&status(500), 9 * SEC).is_some());
    }

    #[test]
    fn a_failed_probe_reopens_without_counting() {
        let breaker = default_breaker();
        throttle(&breaker, Duration::ZERO);
        assert_eq!(breaker.admit(5 * SEC), Admit::Probe);
        let cause = breaker.record(&status_after(503, 2 * SEC), 6 * SEC);
        assert_eq!(
            cause,
            Some(TripCause {
                rule: "failures".into(),
                outcome: "503".into(),
                retry_after: Some(2 * SEC),
            })
        );
        assert_eq!(breaker.open_until(6 * SEC), Some(8 * SEC));
        assert!(!breaker.available(6 * SEC));
        // Rest over again: a new probe may go.
        assert_eq!(breaker.admit(8 * SEC), Admit::Probe);
        assert!(breaker.record(&Outcome::Timeout, 9 * SEC).is_some());
        assert_eq!(breaker.open_until(9 * SEC), Some(19 * SEC));
    }

    #[test]
    fn a_probe_failure_no_rule_matches_frees_the_slot_and_stays_half_open() {
        let breaker = default_breaker();
        throttle(&breaker, Duration::ZERO);
        assert_eq!(breaker.admit(5 * SEC), Admit::Probe);
        assert_eq!(breaker.record(&status(408), 6 * SEC), None);
        assert_eq!(
            breaker.view(6 * SEC),
            BreakerView::HalfOpen { probing: false }
        );
        assert!(breaker.available(6 * SEC));
        assert_eq!(breaker.admit(6 * SEC), Admit::Probe);
        assert_eq!(breaker.record(&status(201), 7 * SEC), None);
        assert_eq!(breaker.view(7 * SEC), BreakerView::Closed);
    }

    #[test]
    fn a_rest_past_the_end_of_time_saturates() {
        let mut forever = rule("r", vec![500..=599], 1);
        forever.trip_duration = Duration::MAX;
        let breaker = Breaker::new(vec![forever]);
        breaker.record(&status(500), SEC);
        assert_eq!(breaker.open_until(SEC), Some(Duration::MAX));
    }

    #[test]
    fn driven_by_a_manual_clock() {
        let clock = ManualClock::from_millis(0);
        let breaker = default_breaker();
        breaker.record(&status_after(429, 2 * SEC), clock.monotonic());
        clock.advance(SEC);
        assert_eq!(
            breaker.admit(clock.monotonic()),
            Admit::No { until: 2 * SEC }
        );
        clock.advance(SEC);
        assert_eq!(breaker.admit(clock.monotonic()), Admit::Probe);
    }

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let breaker = std::sync::Arc::new(default_breaker());
        let holder = breaker.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = holder.state.lock();
            panic!("poison the breaker's lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(breaker.state.is_poisoned());
        throttle(&breaker, Duration::ZERO);
        assert_eq!(breaker.admit(SEC), Admit::No { until: 5 * SEC });
    }
}
