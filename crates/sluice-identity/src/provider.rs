//! The per-backend token cache: refresh before expiry, at most one fetch in flight.
//!
//! # Refresh policy
//!
//! For a token fetched at `t0` that expires at `exp` (lifetime `L = exp - t0`):
//!
//! - **refresh window** `W = min(max(5 min, L / 10), L / 2)`: from `exp - W` on, the next call starts a refresh in
//!   the background and still gets the current token. For a 60-minute token that is 6 minutes before expiry, for a
//!   24-hour managed-identity token 2.4 hours; the `L / 2` cap keeps short-lived tokens from being refreshed on every
//!   call (a 2-minute token is refreshed after 1 minute).
//! - **usable until** `exp - min(30 s, L / 4)`: after that the token is never handed out (it could expire on the
//!   way to the backend); callers wait for a fetch instead.
//! - **one fetch at a time**: while a fetch runs, callers with a usable token get it at once; callers without one
//!   all wait for that same fetch and share its result, success or error.
//! - **failed refresh**: the current token keeps being used, and the next refresh is tried 10 seconds later. A
//!   failed fetch with no usable token fails every caller waiting on it; the next call starts a new fetch.
//! - A fetch gives up after 30 seconds. Fetches run as tokio tasks, so a caller that goes away does not cancel a
//!   fetch others are waiting on; a tokio runtime is required.

use crate::error::IdentityError;
use sluice_base::{Clock, Secret};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// The shortest refresh window.
const MIN_REFRESH_WINDOW: Duration = Duration::from_secs(5 * 60);
/// The longest safety margin before expiry in which a token is no longer handed out.
const MAX_EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// How long after a failed background refresh the next one may start.
const REFRESH_RETRY_DELAY: Duration = Duration::from_secs(10);
/// How long a fetch may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a caller starts over when the fetch it waited on vanished (its runtime shut down).
const MAX_ATTEMPTS: usize = 3;

/// A token as the identity endpoint returned it.
#[derive(Clone)]
pub(crate) struct Fetched {
    pub(crate) token: Secret,
    pub(crate) expires_at: SystemTime,
}

/// Obtains one token from the identity endpoint, bypassing any cache.
#[async_trait::async_trait]
pub(crate) trait Fetcher: Send + Sync + fmt::Debug {
    async fn fetch(&self) -> Result<Fetched, IdentityError>;
}

/// The shared result of one fetch: `None` until it finishes.
type Outcome = Option<Result<Secret, IdentityError>>;

struct Cached {
    token: Secret,
    refresh_at: SystemTime,
    usable_until: SystemTime,
}

#[derive(Default)]
struct State {
    cached: Option<Cached>,
    /// The fetch in flight. Its sender lives in the fetch task; a closed channel without a result means the task was
    /// dropped (its runtime shut down) and no fetch is running.
    inflight: Option<watch::Receiver<Outcome>>,
    /// No background refresh before this time (set after a failed one).
    retry_refresh_at: Option<SystemTime>,
}

impl State {
    fn fetch_running(&self) -> bool {
        self.inflight
            .as_ref()
            .is_some_and(|rx| rx.has_changed().is_ok())
    }
}

/// The refresh window for a token of this lifetime (see the module docs).
fn refresh_window(lifetime: Duration) -> Duration {
    MIN_REFRESH_WINDOW.max(lifetime / 10).min(lifetime / 2)
}

/// How long before expiry a token of this lifetime stops being handed out.
fn expiry_margin(lifetime: Duration) -> Duration {
    MAX_EXPIRY_MARGIN.min(lifetime / 4)
}

pub(crate) struct Inner {
    kind: &'static str,
    fetcher: Box<dyn Fetcher>,
    clock: Arc<dyn Clock>,
    fetch_timeout: Duration,
    fetches: AtomicU64,
    state: Mutex<State>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("kind", &self.kind)
            .field("fetcher", &self.fetcher)
            .field("fetches", &self.fetches.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What a caller does after looking at the cache.
enum Next {
    Ready(Secret),
    Wait(watch::Receiver<Outcome>),
}

impl Inner {
    pub(crate) fn new(
        kind: &'static str,
        fetcher: Box<dyn Fetcher>,
        clock: Arc<dyn Clock>,
        fetch_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Inner {
            kind,
            fetcher,
            clock,
            fetch_timeout,
            fetches: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        })
    }

    pub(crate) fn kind(&self) -> &'static str {
        self.kind
    }

    pub(crate) fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a single assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) async fn token(self: &Arc<Self>) -> Result<Secret, IdentityError> {
        for _ in 0..MAX_ATTEMPTS {
            let mut rx = match self.next()? {
                Next::Ready(token) => return Ok(token),
                Next::Wait(rx) => rx,
            };
            if let Ok(outcome) = rx.wait_for(Option::is_some).await
                && let Some(result) = outcome.as_ref()
            {
                return result.clone();
            }
            // The fetch task was dropped before it finished: look again, which starts a new fetch.
        }
        Err(IdentityError::new(
            self.kind,
            "the token fetch was cancelled",
            &[],
        ))
    }

    fn next(self: &Arc<Self>) -> Result<Next, IdentityError> {
        let now = self.clock.system_time();
        let mut state = self.lock();
        let running = state.fetch_running();
        if let Some(cached) = &state.cached
            && now < cached.usable_until
        {
            let token = cached.token.clone();
            let refresh_due =
                now >= cached.refresh_at && state.retry_refresh_at.is_none_or(|at| now >= at);
            if refresh_due && !running {
                tracing::debug!(
                    credential = self.kind,
                    "refreshing the Entra ID token before it expires"
                );
                self.start_fetch(&mut state, now)?;
            }
            return Ok(Next::Ready(token));
        }
        let rx = match (&state.inflight, running) {
            (Some(rx), true) => rx.clone(),
            _ => self.start_fetch(&mut state, now)?,
        };
        Ok(Next::Wait(rx))
    }

    /// Starts a fetch task and records it as the one in flight.
    fn start_fetch(
        self: &Arc<Self>,
        state: &mut State,
        started: SystemTime,
    ) -> Result<watch::Receiver<Outcome>, IdentityError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            IdentityError::new(
                self.kind,
                "a token fetch needs a tokio runtime, and none is running",
                &[],
            )
        })?;
        let (tx, rx) = watch::channel(None);
        state.inflight = Some(rx.clone());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::clone(self);
        runtime.spawn(async move { inner.run_fetch(tx, started).await });
        Ok(rx)
    }

    async fn run_fetch(self: Arc<Self>, tx: watch::Sender<Outcome>, started: SystemTime) {
        let result = match tokio::time::timeout(self.fetch_timeout, self.fetcher.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(IdentityError::new(
                self.kind,
                format!(
                    "the identity endpoint did not answer within {} seconds",
                    self.fetch_timeout.as_secs_f64()
                ),
                &[],
            )),
        };
        let now = self.clock.system_time();
        let outcome = {
            let mut state = self.lock();
            state.inflight = None;
            match result.and_then(|fetched| self.cache_entry(fetched, started, now)) {
                Ok((cached, lifetime)) => {
                    let token = cached.token.clone();
                    state.cached = Some(cached);
                    state.retry_refresh_at = None;
                    tracing::info!(
                        credential = self.kind,
                        lifetime_secs = lifetime.as_secs(),
                        "obtained an Entra ID token"
                    );
                    Ok(token)
                }
                Err(error) => {
                    let usable = state.cached.as_ref().is_some_and(|c| now < c.usable_until);
                    if usable {
                        state.retry_refresh_at = Some(now + REFRESH_RETRY_DELAY);
                        tracing::warn!(
                            credential = self.kind,
                            error = %error,
                            "refreshing the Entra ID token failed; the current token stays in use"
                        );
                    } else {
                        tracing::error!(credential = self.kind, error = %error, "no Entra ID token");
                    }
                    Err(error)
                }
            }
        };
        // Nobody listening is fine: the result is cached for the next caller.
        let _ = tx.send(Some(outcome));
    }

    fn cache_entry(
        &self,
        fetched: Fetched,
        started: SystemTime,
        now: SystemTime,
    ) -> Result<(Cached, Duration), IdentityError> {
        if fetched.expires_at <= now {
            return Err(IdentityError::new(
                self.kind,
                "the identity endpoint returned a token that has already expired (is the clock right?)",
                &[],
            ));
        }
        let issued = started.min(now);
        let lifetime = fetched
            .expires_at
            .duration_since(issued)
            .unwrap_or_default();
        let refresh_at = fetched.expires_at - refresh_window(lifetime);
        let usable_until = fetched.expires_at - expiry_margin(lifetime);
        Ok((
            Cached {
                token: fetched.token,
                refresh_at,
                usable_until,
            },
            lifetime,
        ))
    }

    #[cfg(test)]
    fn inflight(&self) -> Option<watch::Receiver<Outcome>> {
        self.lock().inflight.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_base::ManualClock;
    use std::collections::VecDeque;
    use tokio::sync::Semaphore;

    const MIN: Duration = Duration::from_secs(60);

    /// 2023-11-14T22:13:20Z, far from any real token's expiry.
    fn manual_clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new(Duration::from_secs(1_700_000_000)))
    }

    /// Answers each fetch with the next scripted reply, relative to the clock; `gate` holds fetches until released.
    #[derive(Debug)]
    struct Script {
        clock: Arc<ManualClock>,
        replies: Mutex<VecDeque<Result<Duration, &'static str>>>,
        gate: Option<Arc<Semaphore>>,
        served: AtomicU64,
    }

    #[async_trait::async_trait]
    impl Fetcher for Arc<Script> {
        async fn fetch(&self) -> Result<Fetched, IdentityError> {
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate open").forget();
            }
            let n = self.served.fetch_add(1, Ordering::SeqCst) + 1;
            let reply = self
                .replies
                .lock()
                .unwrap()
                .pop_front()
                .expect("a scripted reply");
            match reply {
                Ok(lifetime) => Ok(Fetched {
                    token: Secret::new(format!("token-{n}")),
                    expires_at: self.clock.system_time() + lifetime,
                }),
                Err(message) => Err(IdentityError::new("managed_identity", message, &[])),
            }
        }
    }

    fn setup(
        replies: Vec<Result<Duration, &'static str>>,
        gated: bool,
    ) -> (Arc<Inner>, Arc<ManualClock>, Option<Arc<Semaphore>>) {
        let clock = manual_clock();
        let gate = gated.then(|| Arc::new(Semaphore::new(0)));
        let script = Arc::new(Script {
            clock: clock.clone(),
            replies: Mutex::new(replies.into()),
            gate: gate.clone(),
            served: AtomicU64::new(0),
        });
        let inner = Inner::new(
            "managed_identity",
            Box::new(script),
            clock.clone(),
            FETCH_TIMEOUT,
        );
        (inner, clock, gate)
    }

    /// Waits for the fetch in flight, if any, to finish.
    async fn settle(inner: &Inner) {
        if let Some(mut rx) = inner.inflight() {
            let _ = rx.wait_for(Option::is_some).await;
        }
    }

    #[test]
    fn refresh_windows() {
        assert_eq!(refresh_window(60 * MIN), 6 * MIN);
        assert_eq!(refresh_window(24 * 60 * MIN), 144 * MIN);
        assert_eq!(refresh_window(20 * MIN), 5 * MIN);
        assert_eq!(refresh_window(8 * MIN), 4 * MIN);
        assert_eq!(refresh_window(2 * MIN), MIN);
        assert_eq!(expiry_margin(60 * MIN), Duration::from_secs(30));
        assert_eq!(expiry_margin(MIN), Duration::from_secs(15));
    }

    #[tokio::test]
    async fn a_cached_token_is_reused() {
        let (inner, clock, _) = setup(vec![Ok(60 * MIN)], false);
        assert_eq!(inner.token().await.unwrap().expose(), "token-1");
        clock.advance(53 * MIN);
        assert_eq!(inner.token().await.unwrap().expose(), "token-1");
        assert_eq!(inner.fetch_count(), 1);
    }

    #[tokio::test]
    async fn refresh_starts_at_the_window_and_keeps_serving_the_old_token() {
        let (inner, clock, _) = setup(vec![Ok(60 * MIN), Ok(60 * MIN)], false);
        inner.token().await.unwrap();
        clock.advance(54 * MIN - Duration::from_secs(1));
        assert_eq!(inner.token().await.unwrap().expose(), "token-1");
        assert_eq!(inner.fetch_count(), 1, "not yet in the refresh window");
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            inner.token().await.unwrap().expose(),
            "token-1",
            "the refreshing call keeps the valid token"
        );
        assert_eq!(inner.fetch_count(), 2);
        settle(&inner).await;
        assert_eq!(inner.token().await.unwrap().expose(), "token-2");
        assert_eq!(inner.fetch_count(), 2);
    }

    #[tokio::test]
    async fn callers_during_a_refresh_use_the_old_token_and_start_no_second_fetch() {
        let (inner, clock, gate) = setup(vec![Ok(10 * MIN), Ok(10 * MIN)], true);
        let gate = gate.unwrap();
        gate.add_permits(1);
        inner.token().await.unwrap();
        clock.advance(6 * MIN);
        let mut calls = Vec::new();
        for _ in 0..20 {
            let inner = inner.clone();
            calls.push(tokio::spawn(async move { inner.token().await }));
        }
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().expose(), "token-1");
        }
        assert_eq!(inner.fetch_count(), 2, "exactly one refresh in flight");
        gate.add_permits(1);
        settle(&inner).await;
        assert_eq!(inner.token().await.unwrap().expose(), "token-2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_without_a_token_share_one_fetch() {
        let (inner, _, gate) = setup(vec![Ok(60 * MIN)], true);
        let gate = gate.unwrap();
        let mut calls = Vec::new();
        for _ in 0..50 {
            let inner = inner.clone();
            calls.push(tokio::spawn(async move { inner.token().await }));
        }
        // Every caller is waiting on the one fetch, which cannot finish until the gate opens.
        while inner.fetches.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1);
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().expose(), "token-1");
        }
        assert_eq!(inner.fetch_count(), 1);
    }

    #[tokio::test]
    async fn an_unusable_token_makes_callers_wait_for_a_new_one() {
        let (inner, clock, _) = setup(vec![Ok(2 * MIN), Ok(2 * MIN)], false);
        inner.token().await.unwrap();
        // A 2-minute token: refresh after 1 minute, not handed out in its last 30 seconds.
        clock.advance(90 * Duration::from_secs(1));
        assert_eq!(inner.token().await.unwrap().expose(), "token-2");
        assert_eq!(inner.fetch_count(), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_token_and_retries_later() {
        let (inner, clock, _) = setup(vec![Ok(60 * MIN), Err("boom"), Ok(60 * MIN)], false);
        inner.token().await.unwrap();
        clock.advance(55 * MIN);
        assert_eq!(inner.token().await.unwrap().expose(), "token-1");
        settle(&inner).await;
        assert_eq!(inner.fetch_count(), 2);
        // The failure does not reach callers, and the next attempt waits for the retry delay.
        assert_eq!(inner.token().await.unwrap().expose(), "token-1");
        clock.advance(REFRESH_RETRY_DELAY - Duration::from_secs(1));
        assert_eq!(inner.token().await.unwrap().expose(), "token-1");
        assert_eq!(inner.fetch_count(), 2);
        clock.advance(Duration::from_secs(1));
        inner.token().await.unwrap();
        assert_eq!(inner.fetch_count(), 3);
        settle(&inner).await;
        assert_eq!(inner.token().await.unwrap().expose(), "token-3");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fetch_fails_every_waiter_and_the_next_call_tries_again() {
        let (inner, _, gate) = setup(vec![Err("endpoint said no"), Ok(60 * MIN)], true);
        let gate = gate.unwrap();
        let mut calls = Vec::new();
        for _ in 0..10 {
            let inner = inner.clone();
            calls.push(tokio::spawn(async move { inner.token().await }));
        }
        while inner.fetches.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // One permit for the failing fetch, one for the fetch after it.
        gate.add_permits(2);
        let mut failures = 0;
        for call in calls {
            match call.await.unwrap() {
                Err(error) => {
                    assert_eq!(error.kind, "managed_identity");
                    assert_eq!(error.message, "endpoint said no");
                    failures += 1;
                }
                // A caller scheduled only after the failure starts the second fetch and gets its token.
                Ok(token) => assert_eq!(token.expose(), "token-2"),
            }
        }
        assert!(failures >= 1);
        assert_eq!(inner.token().await.unwrap().expose(), "token-2");
        assert_eq!(inner.fetch_count(), 2);
    }

    #[tokio::test]
    async fn a_fetch_that_never_answers_times_out() {
        #[derive(Debug)]
        struct Never;
        #[async_trait::async_trait]
        impl Fetcher for Never {
            async fn fetch(&self) -> Result<Fetched, IdentityError> {
                std::future::pending().await
            }
        }
        let inner = Inner::new(
            "workload_identity",
            Box::new(Never),
            manual_clock(),
            Duration::from_millis(20),
        );
        let error = inner.token().await.unwrap_err();
        assert_eq!(error.kind, "workload_identity");
        assert!(error.message.contains("did not answer"), "{error}");
    }

    #[tokio::test]
    async fn an_already_expired_token_is_an_error() {
        let (inner, _, _) = setup(vec![Ok(Duration::ZERO)], false);
        let error = inner.token().await.unwrap_err();
        assert!(error.message.contains("already expired"), "{error}");
    }

    #[tokio::test]
    async fn a_vanished_fetch_is_replaced() {
        let (inner, _, _) = setup(vec![Ok(60 * MIN)], false);
        // A fetch whose task was dropped without a result: its sender is gone.
        let (tx, rx) = watch::channel(None);
        drop(tx);
        inner.lock().inflight = Some(rx);
        assert_eq!(inner.token().await.unwrap().expose(), "token-1");
        assert_eq!(inner.fetch_count(), 1);
    }

    #[test]
    fn without_a_runtime_the_error_says_so() {
        let (inner, _, _) = setup(vec![Ok(60 * MIN)], false);
        let error = poll_once(inner.token()).unwrap_err();
        assert!(error.message.contains("tokio runtime"), "{error}");
    }

    /// Polls a future that needs no waking (it fails before awaiting anything) on the current thread.
    fn poll_once<F: std::future::Future>(future: F) -> F::Output {
        use std::task::{Context, Poll, Waker};
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("the future was expected to finish without waiting"),
        }
    }
}
